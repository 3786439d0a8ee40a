//! The RabbitMQ test backend and broker controls shared by the test binaries.
#![allow(dead_code, unreachable_pub)]

use backstop_core::{DelayTier, Subscription};
use backstop_rabbitmq::{
    AMQP_URL_ENV, QueueType, RabbitConfig, RabbitTransport, dlq_queue, tier_queue,
};
use backstop_test::{Backend, Faults, Features};
use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub struct RabbitBackend {
    config: RabbitConfig,
    transport: RabbitTransport,
    sources: Mutex<HashMap<String, Vec<DelayTier>>>,
}

impl Drop for RabbitBackend {
    /// Deletes every queue this test declared, so reruns do not pile them up.
    fn drop(&mut self) {
        let sources = std::mem::take(&mut *self.sources.lock().unwrap_or_else(|p| p.into_inner()));
        let mut queues = Vec::new();
        for (source, tiers) in sources {
            queues.extend(tiers.iter().map(|t| tier_queue(&source, t)));
            queues.push(dlq_queue(&source));
            queues.push(source);
        }
        let config = self.config.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let transport = RabbitTransport::new(config).expect("config");
                for q in queues {
                    let _ = transport.delete_queue(&q).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

impl RabbitBackend {
    /// The configuration its transport uses.
    pub fn config(&self) -> &RabbitConfig {
        &self.config
    }

    /// Quorum queues (the default).
    pub fn new() -> Self {
        Self::with_queue_type(QueueType::Quorum)
    }

    /// Queues of `queue_type`.
    pub fn with_queue_type(queue_type: QueueType) -> Self {
        let config = RabbitConfig::from_env().with_queue_type(queue_type);
        let reachable = std::env::var(AMQP_URL_ENV)
            .ok()
            .and_then(|u| {
                let rest = u.split_once("://")?.1;
                let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                Some(host.split('/').next()?.to_owned())
            })
            .unwrap_or_else(|| "127.0.0.1:5672".to_owned())
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
        assert!(
            reachable,
            "no RabbitMQ at {}: start it with `rabbitmq-server -detached` and wait for \
             `rabbitmqctl await_startup` (or run `./scripts/test.sh`), or set {AMQP_URL_ENV}",
            config.display_url()
        );
        // A name of its own, so a test can have the broker close exactly its
        // connections.
        let config = config.with_connection_name(unique("connection"));
        Self {
            transport: RabbitTransport::new(config.clone()).expect("valid config"),
            config,
            sources: Mutex::new(HashMap::new()),
        }
    }
}

pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!(
        "backstop-test.{prefix}-{t}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Backend for RabbitBackend {
    type Transport = RabbitTransport;

    fn features(&self) -> Features {
        Features::default().with_delivery_counts()
    }

    async fn transport(&self) -> RabbitTransport {
        self.transport.clone()
    }

    async fn fresh_source(&self, prefix: &str, group: &str, tiers: &[DelayTier]) -> String {
        let source = unique(prefix);
        self.transport
            .declare(
                &Subscription::new(source.clone(), group.to_owned())
                    .with_tiers(tiers.to_vec())
                    .with_prefetch(1),
            )
            .await
            .expect("declare queues");
        self.sources
            .lock()
            .expect("lock")
            .insert(source.clone(), tiers.to_vec());
        source
    }

    /// Ready messages in the source and its tier queues (RabbitMQ reports
    /// unacked ones only through the management API).
    async fn pending(&self, source: &str) -> usize {
        let tiers = self
            .sources
            .lock()
            .expect("lock")
            .get(source)
            .cloned()
            .unwrap_or_default();
        let mut queues = vec![source.to_owned()];
        queues.extend(tiers.iter().map(|t| tier_queue(source, t)));
        let mut n = 0;
        for q in queues {
            n += self
                .transport
                .ready_count(&q)
                .await
                .expect("queue depth")
                .unwrap_or(0) as usize;
        }
        n
    }

    fn faults(&self) -> Option<&dyn Faults> {
        None
    }
}

pub use backstop_test::rabbitmqctl;

/// A policy on exactly `queue` (priority above any other), removed on drop.
pub struct Policy {
    name: String,
}

impl Policy {
    pub fn on_queue(queue: &str, definition: &str) -> Self {
        let name = format!("{queue}.fault");
        let pattern = format!("^{}$", regex_escape(queue));
        rabbitmqctl(&[
            "set_policy",
            "--apply-to",
            "queues",
            "--priority",
            "999",
            &name,
            &pattern,
            definition,
        ]);
        Self { name }
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["clear_policy", &self.name])
            .output();
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

/// Has the broker close every connection whose client-provided name is
/// `name`; returns how many it closed.
pub fn close_connections_named(name: &str) -> usize {
    let listed = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "--quiet",
        "--no-table-headers",
    ]);
    // One row per connection: `<pid>\t[..., {"connection_name","<name>"}, ...]`.
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let mut closed = 0;
    for row in listed.lines() {
        if let Some((pid, props)) = row.split_once('\t')
            && props.contains(&needle)
        {
            rabbitmqctl(&[
                "close_connection",
                pid.trim(),
                "backstop test: injected fault",
            ]);
            closed += 1;
        }
    }
    closed
}

/// The broker URL the tests use: `BACKSTOP_AMQP_URL`, else the local guest.
pub fn amqp_url() -> String {
    std::env::var(AMQP_URL_ENV)
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The test broker's address and login, for `backstop_test::raw_amqp`.
pub fn amqp_login() -> backstop_test::raw_amqp::Login {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("BACKSTOP_AMQP_URL parses");
    backstop_test::raw_amqp::Login {
        addr: format!("{}:{}", uri.authority.host, uri.authority.port),
        user: uri.authority.userinfo.username.clone(),
        password: uri.authority.userinfo.password.clone(),
    }
}

/// Publishes `payload` with `props` to `queue` with lapin alone (as a
/// producer that is not Backstop would), confirmed.
pub async fn publish_amqp(url: &str, queue: &str, payload: &[u8], props: lapin::BasicProperties) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        payload,
        props,
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");
    let _ = conn.close(200, "done".into()).await;
}
