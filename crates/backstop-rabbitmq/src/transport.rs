//! `RabbitTransport`: every transport capability over one AMQP connection.
//! This file holds the connection (a link with its publish channel, made
//! again when lost), queue administration and inspection; publishing is in
//! `publish`, consuming in `subscriber`, settling in `ack`, reading DLQs in
//! `dead_letters`.

use crate::config::{RabbitConfig, dlq_queue, redacted, tier_queue};
use crate::topology::declare_all;
use backstop_core::{
    Backlog, ConfigError, DeadLetterSource, Inspect, Subscription, TransportError,
    TransportErrorKind,
};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

struct Link {
    connection: Arc<Connection>,
    publish: Channel,
}

pub(crate) struct Inner {
    pub(crate) config: RabbitConfig,
    link: tokio::sync::Mutex<Option<Link>>,
}

/// RabbitMQ as a Backstop transport: publisher confirms on every publish
/// (mandatory, so an unroutable message is an error), manual acks, delay tiers
/// as TTL queues `<queue>.retry.<tier>` dead-lettering back to `<queue>`, and
/// the DLQ `<queue>.dlq`. A lost connection is replaced on next use.
#[derive(Clone)]
pub struct RabbitTransport {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for RabbitTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lost(context: String, e: lapin::Error) -> TransportError {
    TransportError::new(TransportErrorKind::ConnectionLost, context).with_source(e)
}

/// What a failed connect most likely means, for its message: nothing
/// listening, or a broker that answered and refused the login.
/// The broker's channel-level refusal carried by `e`, if that is what it is
/// (`PRECONDITION_FAILED`, `NOT_FOUND`, ...): read from the error's type, not
/// its text.
pub(crate) fn soft_error(e: &lapin::Error) -> Option<lapin::protocol::AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            lapin::protocol::AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            lapin::protocol::AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

fn connect_hint(e: &lapin::Error) -> &'static str {
    match e.kind() {
        lapin::ErrorKind::IOError(_) => " (is RabbitMQ running?)",
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 403 => {
            " (the broker refused the login: check the user, password and vhost)"
        }
        lapin::ErrorKind::ProtocolError(_) => " (the broker refused the connection)",
        _ => "",
    }
}

impl RabbitTransport {
    /// Validates `config`; connects on first use.
    pub fn new(config: RabbitConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                link: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// A connection and its publish channel (confirms on).
    async fn connect(&self) -> Result<(Connection, Channel), TransportError> {
        let url = self.inner.config.url();
        let shown = redacted(url);
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.inner.config.connection_name()));
        let connection = crate::wire::connect(url, props)
            .await
            .map_err(|e| lost(format!("connect to {shown}{}", connect_hint(&e)), e))?;
        let publish = connection
            .create_channel()
            .await
            .map_err(|e| lost(format!("open channel on {shown}"), e))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| lost("enable publisher confirms".to_owned(), e))?;
        Ok((connection, publish))
    }

    pub(crate) async fn link(&self) -> Result<(Arc<Connection>, Channel), TransportError> {
        let mut guard = self.inner.link.lock().await;
        if let Some(l) = guard.as_ref()
            && l.connection.status().connected()
            && l.publish.status().connected()
        {
            return Ok((l.connection.clone(), l.publish.clone()));
        }
        let config = &self.inner.config;
        let shown = redacted(config.url());
        // Bounded: the lock is held meanwhile, and every publish waits on it.
        let (connection, publish) = tokio::time::timeout(config.connect_timeout(), self.connect())
            .await
            .map_err(|_| {
                TransportError::new(
                    TransportErrorKind::ConnectionLost,
                    format!(
                        "connect to {shown}: no answer within {:?} (is the address right and reachable?)",
                        config.connect_timeout()
                    ),
                )
            })??;
        let connection = Arc::new(connection);
        *guard = Some(Link {
            connection: connection.clone(),
            publish: publish.clone(),
        });
        Ok((connection, publish))
    }

    pub(crate) async fn forget_link(&self) {
        *self.inner.link.lock().await = None;
    }

    /// A fresh channel for one operation. A connection that died (closed by
    /// the broker, a protocol error, a restart) is replaced: up to three tries.
    pub(crate) async fn channel(&self) -> Result<Channel, TransportError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let (connection, _) = self.link().await?;
            match connection.create_channel().await {
                Ok(c) => return Ok(c),
                Err(e) if tries >= 3 => return Err(lost("open channel".to_owned(), e)),
                Err(e) => {
                    tracing::debug!(error = %e, tries, "opening an AMQP channel failed, reconnecting");
                    if !connection.status().connected() {
                        self.forget_link().await;
                    }
                    tokio::time::sleep(Duration::from_millis(50 * tries)).await;
                }
            }
        }
    }

    /// Declares the queues of `subscription` (main, tiers, DLQ), idempotently.
    pub async fn declare(&self, subscription: &Subscription) -> Result<(), TransportError> {
        let channel = self.channel().await?;
        let r = declare_all(&channel, self.inner.config.queue_type(), subscription).await;
        let _ = channel.close(200, ShortString::from("declared")).await;
        r?;
        self.declare_dead_letter_queue(&dlq_queue(&subscription.source))
            .await
    }

    /// Ready messages in `queue` (passive declare), `None` when it does not exist.
    pub async fn ready_count(&self, queue: &str) -> Result<Option<u32>, TransportError> {
        let channel = self.channel().await?;
        let opts = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let r = channel
            .queue_declare(ShortString::from(queue), opts, FieldTable::default())
            .await;
        let _ = channel.close(200, ShortString::from("done")).await;
        Ok(r.ok().map(|q| q.message_count()))
    }

    /// Deletes `queue` and its messages (tests and tooling).
    pub async fn delete_queue(&self, queue: &str) -> Result<(), TransportError> {
        let channel = self.channel().await?;
        let r = channel
            .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| lost(format!("delete queue {queue:?}"), e));
        let _ = channel.close(200, ShortString::from("done")).await;
        r
    }
}

impl Inspect for RabbitTransport {
    /// Opens (and closes) a channel, connecting first if the link is down.
    async fn check(&self) -> Result<(), TransportError> {
        let channel = self.channel().await?;
        let _ = channel.close(200, ShortString::from("checked")).await;
        Ok(())
    }

    /// Ready messages of the main queue, each tier queue and the DLQ (passive
    /// declares). The oldest dead letter's age is read by peeking at the
    /// DLQ's head only when the DLQ is a classic queue (as Backstop declares
    /// it): a quorum queue counts a peek (a get then a requeue) as a
    /// delivery, and under a delivery limit peeking would eventually drop
    /// the dead letter.
    async fn backlog(&self, subscription: &Subscription) -> Result<Backlog, TransportError> {
        let source = &subscription.source;
        let dlq = dlq_queue(source);
        let mut backlog = Backlog::new(dlq.clone());
        backlog.depth = self.ready_count(source).await?.map(u64::from);
        for tier in &subscription.tiers {
            if let Some(n) = self.ready_count(&tier_queue(source, tier)).await? {
                backlog.tiers.push((tier.name().to_owned(), u64::from(n)));
            }
        }
        backlog.dlq_depth = self.ready_count(&dlq).await?.map(u64::from);
        if backlog.dlq_depth.unwrap_or(0) > 0
            && self.dead_letter_queue_kind(&dlq).await? == crate::dead_letters::DlqKind::Classic
        {
            backlog.dlq_oldest_age = self
                .browse(&dlq, 1)
                .await?
                .first()
                .and_then(|m| {
                    m.headers()
                        .get_str(backstop_core::message::names::FAILED_AT)
                })
                .and_then(backstop_core::message::parse_timestamp)
                .map(|t| {
                    std::time::SystemTime::now()
                        .duration_since(t)
                        .unwrap_or_default()
                });
        }
        Ok(backlog)
    }
}
