//! The demo order handler the broker examples share: it fails according to the
//! payload, so a run shows immediate retries, delay tiers and the DLQ.

use backstop::{
    Backoff, Context, DelayTier, Handler, HandlerError, HandlerOptions, Json, Message, Publisher,
    RetryPolicy, RunReport, Runner, Transport,
};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a demo order behaves in the handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Behaviour {
    /// Handled at once.
    #[default]
    Ok,
    /// Rejected as invalid: dead-lettered at once.
    Permanent,
    /// Fails transiently this many times, then succeeds.
    Flaky {
        /// Failures before success.
        failures: u32,
    },
    /// Takes this long, then succeeds (shutdown drain tests).
    Slow {
        /// Milliseconds of work.
        ms: u64,
    },
}

/// A demo order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoOrder {
    /// Order number.
    pub id: u64,
    /// What the handler does with it.
    #[serde(default)]
    pub behaviour: Behaviour,
}

/// Demo message `n`: every `permanent_every`-th is invalid, every
/// `flaky_every`-th fails twice before it succeeds (0 turns either off).
pub fn demo_message(n: u64, permanent_every: u64, flaky_every: u64) -> Message {
    let behaviour = if permanent_every > 0 && n % permanent_every == permanent_every - 1 {
        Behaviour::Permanent
    } else if flaky_every > 0 && n % flaky_every == flaky_every - 1 {
        Behaviour::Flaky { failures: 2 }
    } else {
        Behaviour::Ok
    };
    let order = DemoOrder { id: n, behaviour };
    Message::new(serde_json::to_vec(&order).expect("serialises"))
        .with_key(format!("customer-{}", n % 16))
}

/// The demo handler; optionally appends the id of each handled message to a
/// file (one line each, written before the ack), for crash tests.
#[derive(Clone, Debug, Default)]
pub struct DemoHandler {
    log: Option<Arc<Mutex<File>>>,
}

impl DemoHandler {
    /// A handler that records handled message ids in `path`.
    pub fn recording(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            log: Some(Arc::new(Mutex::new(file))),
        })
    }
}

impl Handler for DemoHandler {
    type Payload = Json<DemoOrder>;

    async fn handle(&self, Json(order): Json<DemoOrder>, ctx: Context) -> Result<(), HandlerError> {
        match order.behaviour {
            Behaviour::Permanent => {
                return Err(HandlerError::permanent(format!(
                    "order {} rejected: invalid line items",
                    order.id
                )));
            }
            Behaviour::Flaky { failures } if ctx.attempt() <= failures => {
                return Err(HandlerError::transient(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("payment service timed out (order {})", order.id),
                )));
            }
            Behaviour::Slow { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            _ => {}
        }
        if let Some(log) = &self.log {
            let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
            // One write call per line: a SIGKILL cannot leave half a line
            // for the next process to append its first id to.
            f.write_all(format!("{}\n", ctx.message_id()).as_bytes())
                .map_err(HandlerError::transient)?;
        }
        Ok(())
    }
}

/// Publishes `count` demo orders to `destination` (pipelined, each confirmed);
/// returns their message ids.
pub async fn publish_demo<P: Publisher + Clone>(
    publisher: &P,
    destination: &str,
    count: u64,
    permanent_every: u64,
    flaky_every: u64,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut sends = Vec::new();
    for n in 0..count {
        let m = demo_message(n, permanent_every, flaky_every);
        ids.push(m.id().unwrap_or_default().to_owned());
        let (p, d) = (publisher.clone(), destination.to_owned());
        sends.push(tokio::spawn(async move { p.publish(&d, m).await }));
    }
    for s in sends {
        s.await??;
    }
    Ok(ids)
}

/// The examples' retry policy: 3 attempts with 50 ms..1 s backoff, then `tiers`.
pub fn demo_policy(tiers: &[Duration]) -> RetryPolicy {
    RetryPolicy::default()
        .with_backoff(Backoff::exponential(
            Duration::from_millis(50),
            Duration::from_secs(1),
        ))
        .with_tiers(tiers.iter().map(|d| DelayTier::new(*d)))
}

/// Runs [`DemoHandler`] on `source` until `shutdown` completes.
pub async fn run_demo<T>(
    transport: T,
    group: &str,
    source: &str,
    concurrency: usize,
    tiers: &[Duration],
    handled_log: Option<&Path>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunReport>
where
    T: Transport,
{
    let handler = match handled_log {
        Some(path) => DemoHandler::recording(path)?,
        None => DemoHandler::default(),
    };
    let runner = Runner::builder(transport)
        .with_group(group)
        .with_max_in_flight(concurrency)
        .with_handler_options(
            source,
            handler,
            HandlerOptions::default()
                .with_name("demo-orders")
                .with_concurrency(concurrency)
                .with_timeout(Duration::from_secs(10))
                .with_policy(demo_policy(tiers)),
        )
        .build()?;
    Ok(runner.run(shutdown).await)
}
