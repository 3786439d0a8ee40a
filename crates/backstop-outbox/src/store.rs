//! The SQLite file: schema, row encoding, and read-only inspection.

use backstop_core::{Headers, Message};
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The schema version this crate writes (`outbox_meta.schema_version`).
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_pending (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    destination      TEXT    NOT NULL,
    message_id       TEXT    NOT NULL,
    msg_key          BLOB,
    payload          BLOB    NOT NULL,
    headers          TEXT    NOT NULL,
    msg_timestamp_ms INTEGER,
    created_at_ms    INTEGER NOT NULL,
    size             INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT
);
CREATE TABLE IF NOT EXISTS outbox_dead (
    seq              INTEGER PRIMARY KEY,
    destination      TEXT    NOT NULL,
    message_id       TEXT    NOT NULL,
    msg_key          BLOB,
    payload          BLOB    NOT NULL,
    headers          TEXT    NOT NULL,
    msg_timestamp_ms INTEGER,
    created_at_ms    INTEGER NOT NULL,
    size             INTEGER NOT NULL,
    attempts         INTEGER NOT NULL,
    reason           TEXT    NOT NULL,
    dead_at_ms       INTEGER NOT NULL
);
";

/// Storage failure (disk full, corrupt file, wrong schema).
#[derive(Debug, thiserror::Error)]
#[error("outbox storage: {context}")]
pub struct StorageError {
    context: String,
    #[source]
    source: Option<rusqlite::Error>,
}

impl StorageError {
    pub(crate) fn new(context: impl Into<String>, source: rusqlite::Error) -> Self {
        Self {
            context: context.into(),
            source: Some(source),
        }
    }

    pub(crate) fn msg(context: impl Into<String>) -> Self {
        Self {
            context: context.into(),
            source: None,
        }
    }

    /// The same failure, for another waiting sender.
    /// (rusqlite's error is not `Clone`: the copy carries the cause as text.)
    pub(crate) fn duplicate(&self) -> Self {
        Self::msg(match &self.source {
            Some(cause) => format!("{}: {cause}", self.context),
            None => self.context.clone(),
        })
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn to_ms(t: SystemTime) -> Option<i64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Opens (creating) the file for writing: WAL, `synchronous=FULL` (every
/// commit is fsynced before it returns), the schema.
pub(crate) fn open_writer(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open(path)
        .map_err(|e| StorageError::new(format!("open {}", path.display()), e))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| StorageError::new("journal_mode=WAL", e))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| StorageError::new("synchronous=FULL", e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| StorageError::new("busy_timeout", e))?;
    conn.execute_batch(SCHEMA)
        .map_err(|e| StorageError::new("create schema", e))?;
    let version: Option<String> = conn
        .query_row(
            "SELECT value FROM outbox_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| StorageError::new("read schema version", e))?;
    match version {
        None => {
            conn.execute(
                "INSERT INTO outbox_meta (key, value) VALUES ('schema_version', ?1)",
                params![SCHEMA_VERSION.to_string()],
            )
            .map_err(|e| StorageError::new("write schema version", e))?;
        }
        Some(v) if v == SCHEMA_VERSION.to_string() => {}
        Some(v) => {
            return Err(StorageError::msg(format!(
                "{} has outbox schema version {v}; this build reads {SCHEMA_VERSION}",
                path.display()
            )));
        }
    }
    Ok(conn)
}

/// A second connection on the same file for reading (WAL readers do not block
/// the writer).
pub(crate) fn open_reader(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StorageError::new(format!("open {} for reading", path.display()), e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| StorageError::new("busy_timeout", e))?;
    Ok(conn)
}

/// Header values are UTF-8 strings in the JSON, `null` for a header without a
/// value, `{"hex": "..."}` for bytes that are not UTF-8.
fn encode_headers(headers: &Headers) -> String {
    let rows: Vec<Value> = headers
        .iter()
        .map(|h| {
            let value = match &h.value {
                None => Value::Null,
                Some(v) => match std::str::from_utf8(v) {
                    Ok(s) => Value::String(s.to_owned()),
                    Err(_) => serde_json::json!({ "hex": hex(v) }),
                },
            };
            Value::Array(vec![Value::String(h.key.clone()), value])
        })
        .collect();
    Value::Array(rows).to_string()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn decode_headers(text: &str) -> Headers {
    let Ok(Value::Array(rows)) = serde_json::from_str::<Value>(text) else {
        return Headers::new();
    };
    rows.into_iter()
        .filter_map(|row| {
            let Value::Array(mut kv) = row else {
                return None;
            };
            let value = kv.pop()?;
            let key = kv.pop()?.as_str()?.to_owned();
            let value = match value {
                Value::Null => None,
                Value::String(s) => Some(Bytes::from(s)),
                Value::Object(o) => Some(Bytes::from(unhex(o.get("hex")?.as_str()?)?)),
                _ => return None,
            };
            Some((key, value))
        })
        .collect()
}

/// Bytes an entry counts against `max_pending_bytes`.
pub(crate) fn entry_size(destination: &str, message: &Message) -> u64 {
    let headers: usize = message
        .headers()
        .iter()
        .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len))
        .sum();
    let n =
        destination.len() + message.key().map_or(0, Bytes::len) + message.payload().len() + headers;
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// One pending entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) seq: i64,
    pub(crate) destination: String,
    pub(crate) message: Message,
    pub(crate) created_at_ms: i64,
    pub(crate) size: u64,
    pub(crate) attempts: u32,
}

pub(crate) fn insert(
    tx: &Transaction<'_>,
    destination: &str,
    message: &Message,
    size: u64,
    now: i64,
) -> rusqlite::Result<i64> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO outbox_pending
           (destination, message_id, msg_key, payload, headers, msg_timestamp_ms, created_at_ms, size)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    stmt.execute(params![
        destination,
        message.id().unwrap_or_default(),
        message.key().map(|k| &k[..]),
        &message.payload()[..],
        encode_headers(message.headers()),
        message.timestamp().and_then(to_ms),
        now,
        i64::try_from(size).unwrap_or(i64::MAX),
    ])?;
    Ok(tx.last_insert_rowid())
}

pub(crate) fn delete(tx: &Transaction<'_>, seq: i64) -> rusqlite::Result<usize> {
    tx.prepare_cached("DELETE FROM outbox_pending WHERE seq = ?1")?
        .execute(params![seq])
}

/// Moves an entry to `outbox_dead` with the reason.
pub(crate) fn bury(
    tx: &Transaction<'_>,
    seq: i64,
    reason: &str,
    now: i64,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO outbox_dead
           (seq, destination, message_id, msg_key, payload, headers, msg_timestamp_ms,
            created_at_ms, size, attempts, reason, dead_at_ms)
         SELECT seq, destination, message_id, msg_key, payload, headers, msg_timestamp_ms,
                created_at_ms, size, attempts + 1, ?2, ?3
         FROM outbox_pending WHERE seq = ?1",
    )?
    .execute(params![seq, reason, now])?;
    delete(tx, seq)
}

pub(crate) fn note_failure(tx: &Transaction<'_>, seq: i64, error: &str) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "UPDATE outbox_pending SET attempts = attempts + 1, last_error = ?2 WHERE seq = ?1",
    )?
    .execute(params![seq, error])
}

const COLUMNS: &str = "seq, destination, msg_key, payload, headers, msg_timestamp_ms, \
                       created_at_ms, size, attempts";

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let key: Option<Vec<u8>> = r.get(2)?;
    let payload: Vec<u8> = r.get(3)?;
    let headers: String = r.get(4)?;
    let ts: Option<i64> = r.get(5)?;
    let mut message = Message::from_parts(
        key.map(Bytes::from),
        Bytes::from(payload),
        decode_headers(&headers),
    );
    message.set_timestamp(ts.map(from_ms));
    Ok(Entry {
        seq: r.get(0)?,
        destination: r.get(1)?,
        message,
        created_at_ms: r.get(6)?,
        size: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
        attempts: u32::try_from(r.get::<_, i64>(8)?).unwrap_or(u32::MAX),
    })
}

/// Pending entries after `seq`, oldest first.
pub(crate) fn load_after(
    conn: &Connection,
    seq: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM outbox_pending WHERE seq > ?1 ORDER BY seq LIMIT ?2"
    ))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    stmt.query_map(params![seq, limit], entry_from_row)?
        .collect()
}

/// Pending count and bytes.
pub(crate) fn pending_totals(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    conn.query_row(
        "SELECT count(*), coalesce(sum(size), 0) FROM outbox_pending",
        [],
        |r| {
            Ok((
                u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            ))
        },
    )
}

/// Pending entries per (destination, key), for keyed entries.
pub(crate) fn pending_keys(conn: &Connection) -> rusqlite::Result<Vec<(String, Bytes, u32)>> {
    let mut stmt = conn.prepare(
        "SELECT destination, msg_key, count(*) FROM outbox_pending
         WHERE msg_key IS NOT NULL GROUP BY destination, msg_key",
    )?;
    stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Bytes::from(r.get::<_, Vec<u8>>(1)?),
            u32::try_from(r.get::<_, i64>(2)?).unwrap_or(u32::MAX),
        ))
    })?
    .collect()
}

/// What an outbox file holds, for operators (`backstop outbox status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStatus {
    /// Entries not yet confirmed by the broker.
    pub pending: u64,
    /// Their bytes (as counted against `max_pending_bytes`).
    pub pending_bytes: u64,
    /// When the oldest pending entry was accepted.
    pub oldest_pending: Option<SystemTime>,
    /// Entries the broker refused for good (`outbox_dead`).
    pub dead: u64,
}

/// One row of `outbox_pending` or `outbox_dead`, for listing.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    /// Position in the outbox (send order).
    pub seq: i64,
    /// Topic or queue it goes to.
    pub destination: String,
    /// The message as it will be published.
    pub message: Message,
    /// When `send` accepted it.
    pub accepted_at: SystemTime,
    /// Failed publish attempts so far.
    pub attempts: u32,
    /// The last publish error (pending) or why it was given up (dead).
    pub error: Option<String>,
}

/// Read-only access to an outbox file, safe while a relay is running.
#[derive(Debug)]
pub struct OutboxInspector {
    conn: Connection,
}

impl OutboxInspector {
    /// Opens `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(StorageError::msg(format!(
                "{} does not exist",
                path.display()
            )));
        }
        Ok(Self {
            conn: open_reader(path)?,
        })
    }

    /// Counts and the oldest pending entry's age.
    pub fn status(&self) -> Result<OutboxStatus, StorageError> {
        let (pending, pending_bytes) =
            pending_totals(&self.conn).map_err(|e| StorageError::new("count pending", e))?;
        let oldest: Option<i64> = self
            .conn
            .query_row("SELECT min(created_at_ms) FROM outbox_pending", [], |r| {
                r.get(0)
            })
            .map_err(|e| StorageError::new("oldest pending", e))?;
        let dead: i64 = self
            .conn
            .query_row("SELECT count(*) FROM outbox_dead", [], |r| r.get(0))
            .map_err(|e| StorageError::new("count dead", e))?;
        Ok(OutboxStatus {
            pending,
            pending_bytes,
            oldest_pending: oldest.map(from_ms),
            dead: u64::try_from(dead).unwrap_or(0),
        })
    }

    /// Up to `limit` pending entries, oldest first.
    pub fn pending(&self, limit: usize) -> Result<Vec<StoredEntry>, StorageError> {
        self.list("outbox_pending", "last_error", limit)
    }

    /// Up to `limit` dead entries, oldest first.
    pub fn dead(&self, limit: usize) -> Result<Vec<StoredEntry>, StorageError> {
        self.list("outbox_dead", "reason", limit)
    }

    fn list(
        &self,
        table: &str,
        error: &str,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StorageError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {COLUMNS}, {error} FROM {table} ORDER BY seq LIMIT ?1"
            ))
            .map_err(|e| StorageError::new(format!("list {table}"), e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        stmt.query_map(params![limit], |r| {
            let e = entry_from_row(r)?;
            Ok(StoredEntry {
                seq: e.seq,
                destination: e.destination,
                message: e.message,
                accepted_at: from_ms(e.created_at_ms),
                attempts: e.attempts,
                error: r.get(9)?,
            })
        })
        .and_then(Iterator::collect)
        .map_err(|e| StorageError::new(format!("list {table}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_with_nulls_and_binary() {
        let mut m = Message::new("x").with_header("tenant", "acme");
        m.headers_mut().append("flag", None);
        m.headers_mut()
            .insert("raw", Bytes::from_static(&[0xff, 0x00, 0x10]));
        let back = decode_headers(&encode_headers(m.headers()));
        assert_eq!(&back, m.headers());
    }
}
