//! Settling a delivery on the channel it came on (or the pipelined
//! settlements of a stream).

use crate::settle::Settlements;
use crate::subscriber::close_later;
use crate::transport::lost;
use backstop_core::transport::BoxFuture;
use backstop_core::{Acknowledge, TransportError};
use lapin::Acker;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::sync::Arc;

pub(crate) struct RabbitAck {
    pub(crate) acker: Option<Acker>,
    /// For DLQ takes: the channel the message was fetched on.
    pub(crate) channel: Option<Channel>,
    /// For subscriptions: settlements are pipelined through these.
    pub(crate) settlements: Option<Arc<Settlements>>,
}

impl Acknowledge for RabbitAck {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        if let (Some(s), Some(a)) = (&self.settlements, self.acker.take()) {
            // Pipelined: the frame is handed to lapin now; a failure means a
            // redelivery (the channel is gone), never a loss.
            s.start(async move {
                match a.ack(BasicAckOptions::default()).await {
                    Ok(true) => {}
                    // lapin sends nothing for an acker already used or whose
                    // channel failed: say so (it was silent).
                    Ok(false) => tracing::warn!(
                        "ack not sent: the delivery's acker was used or its channel failed; \
                         the message will be redelivered"
                    ),
                    Err(e) => {
                        tracing::debug!(error = %e, "ack not sent; the message will be redelivered");
                    }
                }
            });
            return backstop_core::transport::settled();
        }
        let acker = self.acker.take();
        let channel = self.channel.take();
        Box::pin(async move {
            let r = match acker {
                Some(a) => a
                    .ack(BasicAckOptions::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| lost("ack".to_owned(), e)),
                None => Ok(()),
            };
            if let Some(c) = channel {
                close_later(c);
            }
            r
        })
    }

    fn nack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        if let (Some(s), Some(a)) = (&self.settlements, self.acker.take()) {
            s.start(async move {
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                if let Err(e) = a.nack(requeue).await {
                    tracing::debug!(error = %e, "nack not sent; the channel's close requeues the message");
                }
            });
            return backstop_core::transport::settled();
        }
        let acker = self.acker.take();
        let channel = self.channel.take();
        Box::pin(async move {
            let r = match acker {
                Some(a) => a
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| lost("nack".to_owned(), e)),
                None => Ok(()),
            };
            if let Some(c) = channel {
                close_later(c);
            }
            r
        })
    }
}

impl Drop for RabbitAck {
    fn drop(&mut self) {
        // Unsettled: left unacked; the broker redelivers it when the channel closes.
        if let Some(c) = self.channel.take() {
            close_later(c);
        }
    }
}
