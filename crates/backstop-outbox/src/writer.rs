//! The one writer: a thread that owns the write connection and commits every
//! queued command in one transaction (group commit: many sends, one fsync).

use crate::shared::Shared;
use crate::store::{self, StorageError};
use backstop_core::Message;
use rusqlite::Connection;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::{mpsc, oneshot};

/// What a send is answered with: its sequence number, or the message back.
pub(crate) type InsertReply = oneshot::Sender<Result<i64, (StorageError, Message)>>;

pub(crate) enum Command {
    Insert {
        destination: String,
        message: Message,
        size: u64,
        reply: InsertReply,
    },
    /// The broker confirmed it.
    Delete { seq: i64, size: u64 },
    /// The broker refused it for good.
    Bury { seq: i64, size: u64, reason: String },
    /// A publish attempt failed; the entry stays.
    Failure { seq: i64, error: String },
}

/// Runs until every sender is gone and the queue is drained.
pub(crate) fn run(
    mut conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
    max_batch: usize,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        commit(&mut conn, &mut batch, &shared);
    }
}

/// Writes `batch` in one transaction (one fsync), then answers each sender.
fn commit(conn: &mut Connection, batch: &mut Vec<Command>, shared: &Shared) {
    let mut seqs: Vec<Option<i64>> = Vec::with_capacity(batch.len());
    let result = write(conn, batch, &mut seqs);
    let mut inserted = false;
    for (c, seq) in batch
        .drain(..)
        .zip(seqs.into_iter().chain(std::iter::repeat(None)))
    {
        inserted |= answer(c, seq, &result, shared);
    }
    if let Err(e) = &result {
        tracing::error!(error = %crate::report::with_causes(e), "outbox commit failed");
    }
    shared.publish_gauges();
    if inserted {
        shared.new_data.notify_one();
    }
    shared.commits.fetch_add(1, Ordering::Relaxed);
}

/// The batch in one transaction; `seqs` gets each insert's sequence number.
fn write(
    conn: &mut Connection,
    batch: &[Command],
    seqs: &mut Vec<Option<i64>>,
) -> Result<(), StorageError> {
    let now = store::now_ms();
    let tx = conn
        .transaction()
        .map_err(|e| StorageError::new("begin", e))?;
    for c in batch {
        let seq = match c {
            Command::Insert {
                destination,
                message,
                size,
                ..
            } => Some(
                store::insert(&tx, destination, message, *size, now)
                    .map_err(|e| StorageError::new("insert", e))?,
            ),
            Command::Delete { seq, .. } => {
                store::delete(&tx, *seq).map_err(|e| StorageError::new("delete", e))?;
                None
            }
            Command::Bury { seq, reason, .. } => {
                store::bury(&tx, *seq, reason, now)
                    .map_err(|e| StorageError::new("move to outbox_dead", e))?;
                None
            }
            Command::Failure { seq, error } => {
                store::note_failure(&tx, *seq, error)
                    .map_err(|e| StorageError::new("record failure", e))?;
                None
            }
        };
        seqs.push(seq);
    }
    // With synchronous=FULL the commit returns after the WAL is fsynced.
    tx.commit().map_err(|e| StorageError::new("commit", e))
}

/// Tells a command's sender how its write went; true for a stored insert.
fn answer(
    c: Command,
    seq: Option<i64>,
    result: &Result<(), StorageError>,
    shared: &Shared,
) -> bool {
    match c {
        Command::Insert {
            message,
            size,
            reply,
            ..
        } => match (result, seq) {
            (Ok(()), Some(seq)) => {
                let _ = reply.send(Ok(seq));
                true
            }
            // Not committed (or, impossibly, committed without a seq):
            // the sender gets its message back.
            (result, _) => {
                shared.release(1, size);
                let error = result.as_ref().err().map_or_else(
                    || StorageError::msg("insert left no sequence number"),
                    StorageError::duplicate,
                );
                let _ = reply.send(Err((error, message)));
                false
            }
        },
        Command::Delete { size, .. } | Command::Bury { size, .. } => {
            if result.is_ok() {
                shared.release(1, size);
            } else {
                // The entry stays on disk and will be published again after
                // a restart (a duplicate with the same id, never a loss).
                tracing::error!("outbox: could not record a confirmed publish");
            }
            false
        }
        Command::Failure { .. } => false,
    }
}
