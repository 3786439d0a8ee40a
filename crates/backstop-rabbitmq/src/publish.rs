//! Publishing with confirms: to a queue, a delay tier, the DLQ.

use crate::config::{dlq_queue, tier_queue};
use crate::convert::properties;
use crate::transport::{RabbitTransport, lost, soft_error};
use backstop_core::{
    DeadLetterPublisher, DelayPublisher, DelayTier, Message, PublishError, Publisher, Subscription,
    TransportError, TransportErrorKind,
};
use lapin::Confirmation;
use lapin::options::BasicPublishOptions;
use lapin::protocol::AMQPSoftError;
use lapin::types::ShortString;

/// A failed publish: a message the broker refuses for what it is (over its
/// `max_message_size`, a malformed property) closes the channel with
/// PRECONDITION_FAILED, and sending it again cannot succeed; any other
/// failure is the link's.
fn publish_failed(context: String, e: lapin::Error) -> TransportError {
    if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) {
        TransportError::new(TransportErrorKind::Invalid, context).with_source(e)
    } else {
        lost(context, e)
    }
}

impl RabbitTransport {
    /// Publishes on the link's channel and waits for the confirm. A publish
    /// the channel refused to send (it was closed under it: the broker closed
    /// the connection, which the link learns only now) is sent once more on
    /// a fresh link: nothing reached the broker, so no duplicate.
    async fn send(&self, queue: &str, message: Message) -> Result<(), PublishError> {
        let props = properties(&message, queue);
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut tries = 0;
        let confirm = loop {
            tries += 1;
            let (_, channel) = match self.link().await {
                Ok(l) => l,
                Err(e) => return Err(PublishError::new(e, message)),
            };
            let published = channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue),
                    opts,
                    message.payload(),
                    props.clone(),
                )
                .await;
            match published {
                Ok(c) => break c,
                Err(e) => {
                    self.forget_link().await;
                    if tries < 2 && !channel.status().connected() {
                        tracing::debug!(error = %e, "publish channel closed; publishing on a fresh link");
                        continue;
                    }
                    return Err(PublishError::new(
                        publish_failed(format!("publish to {queue:?}"), e),
                        message,
                    ));
                }
            }
        };
        let outcome = tokio::time::timeout(self.inner.config.confirm_timeout(), confirm).await;
        let error = match outcome {
            Ok(Ok(Confirmation::Ack(None))) => return Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => TransportError::new(
                TransportErrorKind::NotFound,
                format!("no queue {queue:?}: the message was returned unroutable"),
            ),
            Ok(Ok(Confirmation::Nack(_))) => TransportError::new(
                TransportErrorKind::Rejected,
                format!("the broker nacked the publish to {queue:?}"),
            ),
            Ok(Ok(Confirmation::NotRequested)) => TransportError::new(
                TransportErrorKind::Other,
                "publisher confirms are not enabled on the channel",
            ),
            Ok(Err(e)) => {
                self.forget_link().await;
                publish_failed(format!("confirm of the publish to {queue:?}"), e)
            }
            Err(_) => {
                self.forget_link().await;
                TransportError::new(
                    TransportErrorKind::Rejected,
                    format!("no confirm for the publish to {queue:?} in time"),
                )
            }
        };
        Err(PublishError::new(error, message))
    }
}

impl Publisher for RabbitTransport {
    async fn publish(&self, destination: &str, message: Message) -> Result<(), PublishError> {
        self.send(destination, message).await
    }
}

impl DelayPublisher for RabbitTransport {
    async fn publish_delayed(
        &self,
        subscription: &Subscription,
        tier: &DelayTier,
        message: Message,
    ) -> Result<(), PublishError> {
        self.send(&tier_queue(&subscription.source, tier), message)
            .await
    }
}

impl DeadLetterPublisher for RabbitTransport {
    fn dead_letter_destination(&self, subscription: &Subscription) -> String {
        dlq_queue(&subscription.source)
    }

    async fn publish_dead_letter(
        &self,
        subscription: &Subscription,
        message: Message,
    ) -> Result<(), PublishError> {
        self.send(&dlq_queue(&subscription.source), message).await
    }
}
