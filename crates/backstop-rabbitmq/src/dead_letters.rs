//! The DLQ of a RabbitMQ source: declared as a classic queue whatever the
//! main queue's type, read without counting toward any delivery limit
//! ([`DeadLetterSource`]), and read one message at a time for replay and
//! purge ([`QueueReader`]).

use crate::ack::RabbitAck;
use crate::config::QueueType;
use crate::convert::{delivery_count, from_delivery};
use crate::subscriber::close_later;
use crate::topology::declare_classic;
use crate::transport::{RabbitTransport, lost, soft_error};
use backstop_core::{
    DeadLetterSource, Delivery, Message, SourceInfo, SourceKind, TransportError, TransportErrorKind,
};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{FieldTable, ShortString};
use std::fmt;

/// What a DLQ is, as far as reading it safely goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DlqKind {
    /// No such queue.
    Missing,
    /// A classic queue: reading it counts nothing.
    Classic,
    /// Another type or other arguments (a quorum DLQ an earlier Backstop
    /// declared): a reading may count as a delivery.
    Other,
}

fn warn_counting(dlq: &str) {
    tracing::warn!(
        dlq,
        "this DLQ is not a plain classic queue (a quorum DLQ of an earlier Backstop?): \
         each reading may count as a delivery toward a delivery limit, which drops a \
         dead letter once reached. Make it classic: stop the workers, move its letters \
         out (a shovel, or `backstop dlq replay --to`), delete it, and start a worker, \
         which declares it classic"
    );
}

async fn close(channel: Channel) {
    let _ = channel
        .close(200, ShortString::from("backstop: done"))
        .await;
}

impl RabbitTransport {
    /// Declares `dlq` as a classic queue ([`declare_classic`]); a DLQ that
    /// exists with other arguments is kept, with a warning.
    pub(crate) async fn declare_dead_letter_queue(&self, dlq: &str) -> Result<(), TransportError> {
        let channel = self.channel().await?;
        let classic = declare_classic(&channel, dlq).await;
        close(channel).await;
        if !classic? {
            warn_counting(dlq);
        }
        Ok(())
    }

    /// What `dlq` is, without creating it: a passive declare, then (when it
    /// exists) a classic declare that changes nothing on a classic queue and
    /// is refused on any other.
    pub(crate) async fn dead_letter_queue_kind(
        &self,
        dlq: &str,
    ) -> Result<DlqKind, TransportError> {
        let channel = self.channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let exists = channel
            .queue_declare(ShortString::from(dlq), passive, FieldTable::default())
            .await;
        close(channel).await;
        match exists {
            Ok(_) => {}
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                return Ok(DlqKind::Missing);
            }
            Err(e) => return Err(lost(format!("inspect {dlq:?}"), e)),
        }
        let channel = self.channel().await?;
        let classic = declare_classic(&channel, dlq).await;
        close(channel).await;
        Ok(if classic? {
            DlqKind::Classic
        } else {
            DlqKind::Other
        })
    }
}

impl DeadLetterSource for RabbitTransport {
    /// Gets up to `limit` messages on one channel and closes it without
    /// acking any, which puts them all back in order. On a classic DLQ (as
    /// Backstop declares it) that is free: nothing counts it. On a DLQ of
    /// another type (a quorum DLQ of an earlier Backstop) every reading is a
    /// delivery toward its limit: the reading goes ahead, with a warning
    /// saying how to make the DLQ classic.
    async fn browse(&self, dlq: &str, limit: usize) -> Result<Vec<Message>, TransportError> {
        if self.dead_letter_queue_kind(dlq).await? == DlqKind::Other {
            warn_counting(dlq);
        }
        let channel = self.channel().await?;
        let mut out = Vec::new();
        let result = loop {
            if out.len() >= limit {
                break Ok(());
            }
            match channel
                .basic_get(ShortString::from(dlq), BasicGetOptions::default())
                .await
            {
                Ok(Some(m)) => out.push(from_delivery(
                    m.delivery.data,
                    &m.delivery.properties,
                    m.delivery.routing_key.as_str(),
                )),
                Ok(None) => break Ok(()),
                Err(e) => {
                    break Err(if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) {
                        TransportError::new(
                            TransportErrorKind::NotFound,
                            format!("DLQ queue {dlq:?} does not exist"),
                        )
                    } else {
                        lost(format!("read {dlq:?}"), e)
                    });
                }
            }
        };
        // Nothing was acked: closing the channel puts every message back.
        let _ = channel.close(200, ShortString::from("browsed")).await;
        result.map(|()| out)
    }

    async fn take(&self, dlq: &str) -> Result<Option<Delivery>, TransportError> {
        let channel = self.channel().await?;
        let got = channel
            .basic_get(ShortString::from(dlq), BasicGetOptions::default())
            .await
            .map_err(|e| lost(format!("read {dlq:?}"), e))?;
        let Some(m) = got else {
            close_later(channel);
            return Ok(None);
        };
        let d = m.delivery;
        let info = SourceInfo::new(dlq, SourceKind::DeadLetter)
            .redelivered(d.redelivered)
            .delivered_times(delivery_count(
                &d.properties,
                self.inner.config.queue_type() == QueueType::Quorum,
                dlq,
            ));
        let message = from_delivery(d.data, &d.properties, d.routing_key.as_str());
        let ack = RabbitAck {
            acker: Some(d.acker),
            channel: Some(channel),
            settlements: None,
        };
        Ok(Some(Delivery::new(message, info, Box::new(ack))))
    }
}

/// Reads a queue one message at a time on one channel without removing
/// anything until asked: [`ack`](Self::ack) removes a message, and everything
/// not acked goes back to the queue when the reader is released or dropped.
/// What the CLI uses to replay or purge a selection of a DLQ.
pub struct QueueReader {
    channel: Channel,
    queue: String,
    /// Messages read and not acked.
    outstanding: usize,
}

impl fmt::Debug for QueueReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueReader")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl RabbitTransport {
    /// A reader over `queue`.
    pub async fn reader(&self, queue: &str) -> Result<QueueReader, TransportError> {
        Ok(QueueReader {
            channel: self.channel().await?,
            queue: queue.to_owned(),
            outstanding: 0,
        })
    }
}

impl QueueReader {
    /// The next message and its delivery tag; `None` when the queue has no
    /// more (every message read stays unacked, so none is read twice).
    pub async fn next(&mut self) -> Result<Option<(Message, u64)>, TransportError> {
        let got = self
            .channel
            .basic_get(
                ShortString::from(self.queue.as_str()),
                BasicGetOptions::default(),
            )
            .await
            .map_err(|e| {
                if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) {
                    TransportError::new(
                        TransportErrorKind::NotFound,
                        format!("queue {:?} does not exist", self.queue),
                    )
                } else {
                    lost(format!("read {:?}", self.queue), e)
                }
            })?;
        Ok(got.map(|m| {
            let d = m.delivery;
            self.outstanding += 1;
            (
                from_delivery(d.data, &d.properties, d.routing_key.as_str()),
                d.delivery_tag,
            )
        }))
    }

    /// Removes the message read with `tag`.
    pub async fn ack(&mut self, tag: u64) -> Result<(), TransportError> {
        self.channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(|e| lost("ack".to_owned(), e))?;
        self.outstanding = self.outstanding.saturating_sub(1);
        Ok(())
    }

    /// Puts every message read and not acked back into the queue. The
    /// requeue is a `basic.nack` of every outstanding delivery (tag 0,
    /// multiple) sent before the channel's close: the broker handles a
    /// channel's frames in order, so the messages are back by the time the
    /// close is confirmed, rather than whenever the closed channel's
    /// clean-up runs.
    pub async fn release(self) {
        if self.outstanding > 0 {
            let requeue = self.channel.basic_nack(
                0,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            );
            if let Err(e) = requeue.await {
                tracing::debug!(error = %e, "requeue on release; the channel close requeues instead");
            }
        }
        let _ = self
            .channel
            .close(200, ShortString::from("backstop: released"))
            .await;
    }
}

impl Drop for QueueReader {
    fn drop(&mut self) {
        close_later(self.channel.clone());
    }
}
