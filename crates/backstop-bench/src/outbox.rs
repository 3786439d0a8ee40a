//! `outbox-rabbitmq`: publishing, not consuming. The raw contender is lapin
//! with publisher confirms and up to [`WINDOW`] publishes on their way at
//! once, sends not awaited one by one (what a tuned producer does without an
//! outbox). Backstop is `OutboxPublisher` in durable mode (every accepted
//! send fsynced, group commit) with [`WINDOW`] concurrent senders, its relay
//! publishing to the same broker meanwhile.
//!
//! The rate of both is end to end: from the first publish (send) until the
//! broker confirmed the last message. Backstop's durable send rate (every
//! send accepted, fsynced, not yet published) and its send latency p50/p99
//! go in `stats`. Correct: the queue holds exactly the messages sent.

use crate::alloc;
use crate::measure::{Measured, RunResult};
use crate::rabbit::{publish_confirmed, url};
use crate::scenario::{Contender, Spec, payload};
use anyhow::{Context as _, anyhow, ensure};
use backstop_core::Message;
use backstop_outbox::{OutboxConfig, OutboxPublisher};
use backstop_rabbitmq::{RabbitConfig, RabbitTransport};
use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Publishes on their way (raw), concurrent senders (outbox).
const WINDOW: usize = 256;
/// How long the outbox may take to drain after the last send.
const DRAIN: Duration = Duration::from_secs(300);

/// Runs `spec` against its declared, empty queue.
pub(crate) async fn run_child(spec: &Spec) -> anyhow::Result<RunResult> {
    let t = RabbitTransport::new(RabbitConfig::new(url())).context("RabbitMQ config")?;
    let (measured, stats) = match spec.contender {
        Contender::Raw => (raw(&spec.source, spec.messages).await?, json!(null)),
        Contender::Backstop | Contender::BackstopPc64 => {
            outbox(&t, &spec.source, spec.messages).await?
        }
    };
    let mut problems = Vec::new();
    match t.ready_count(&spec.source).await {
        Ok(Some(n)) if u64::from(n) == spec.messages => {}
        Ok(Some(n)) => problems.push(format!(
            "{} holds {n} messages, {} were sent",
            spec.source, spec.messages
        )),
        Ok(None) => problems.push(format!("{} is gone", spec.source)),
        Err(e) => problems.push(format!("could not count {}: {e}", spec.source)),
    }
    Ok(RunResult::new(
        &spec.scenario,
        spec.contender,
        spec.messages,
        measured,
        &problems,
        stats,
    ))
}

async fn raw(queue: &str, n: u64) -> anyhow::Result<Measured> {
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let bodies: Vec<Vec<u8>> = (0..n).map(payload).collect();
    let props = BasicProperties::default().with_delivery_mode(2);
    let (started, allocs) = (Instant::now(), alloc::count());
    publish_confirmed(&ch, queue, &bodies, WINDOW, &props).await?;
    let measured = Measured {
        elapsed: started.elapsed(),
        allocs: alloc::count().saturating_sub(allocs),
    };
    let _ = conn.close(200, ShortString::from("done")).await;
    Ok(measured)
}

async fn outbox(
    t: &RabbitTransport,
    queue: &str,
    n: u64,
) -> anyhow::Result<(Measured, serde_json::Value)> {
    let dir = std::env::temp_dir().join(format!("backstop-bench-outbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).context("temp dir")?;
    let outbox = Arc::new(
        OutboxPublisher::open(t.clone(), OutboxConfig::new(dir.join("outbox.db")))
            .await
            .context("open the outbox")?,
    );
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..n).map(payload).collect());
    let next = Arc::new(AtomicU64::new(0));
    let (started, allocs) = (Instant::now(), alloc::count());
    let mut senders = Vec::new();
    for _ in 0..WINDOW {
        let (outbox, next, bodies, queue) = (
            outbox.clone(),
            next.clone(),
            bodies.clone(),
            queue.to_owned(),
        );
        senders.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = usize::try_from(i).ok().and_then(|i| bodies.get(i)) else {
                    return Ok::<_, anyhow::Error>(latencies);
                };
                let t0 = Instant::now();
                outbox
                    .send(&queue, Message::new(body.clone()))
                    .await
                    .context("send")?;
                latencies.push(t0.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for s in senders {
        latencies.extend(s.await.context("sender")??);
    }
    let sent = started.elapsed();
    ensure!(
        outbox.wait_empty(DRAIN).await,
        "the outbox did not drain within {DRAIN:?}"
    );
    let measured = Measured {
        elapsed: started.elapsed(),
        allocs: alloc::count().saturating_sub(allocs),
    };
    let commits = outbox.stats().commits;
    let outbox = Arc::try_unwrap(outbox).map_err(|_| anyhow!("the outbox is still shared"))?;
    outbox.shutdown(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
    latencies.sort();
    let at = |q: f64| {
        let last = latencies.len().saturating_sub(1);
        let i = (last as f64 * q) as usize;
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let stats = json!({
        "durable_send_rate": n as f64 / sent.as_secs_f64().max(1e-9),
        "send_p50_ms": at(0.50),
        "send_p99_ms": at(0.99),
        "commits": commits,
    });
    Ok((measured, stats))
}
