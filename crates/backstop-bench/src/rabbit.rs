//! RabbitMQ: the quorum queue of one run filled before its consumer starts,
//! the consumer in a child process (raw lapin or Backstop), the checks.

use crate::backstop::{Probe, dlq_problems, drive, stats_json};
use crate::measure::{Measured, RunResult, STALL};
use crate::scenario::{Contender, Record, Scenario, Spec, Work, parse_id, payload};
use anyhow::{Context as _, anyhow, bail};
use backstop_core::Subscription;
use backstop_rabbitmq::{
    AMQP_URL_ENV, RabbitConfig, RabbitTransport, dlq_queue, redacted, tier_queue,
};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::time::Instant;

/// The prefetch of a default `Runner` (handler concurrency 16 under max in
/// flight 64, four deliveries per slot); the raw consumer uses the same.
pub(crate) const PREFETCH: u16 = 64;
/// Confirms awaited at once while filling.
const FILL_WINDOW: usize = 4096;

pub(crate) fn url() -> String {
    std::env::var(AMQP_URL_ENV).unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn transport() -> anyhow::Result<RabbitTransport> {
    RabbitTransport::new(RabbitConfig::new(url())).context("RabbitMQ config")
}

/// The subscription Backstop's runner will declare for `queue` (quorum main
/// queue, the policy's tier queues, the DLQ); raw gets no tiers.
fn subscription(scenario: &Scenario, queue: &str, with_tiers: bool) -> Subscription {
    Subscription::new(queue.to_owned(), "bench")
        .with_tiers(if with_tiers {
            scenario.policy().tiers().to_vec()
        } else {
            Vec::new()
        })
        .with_prefetch(usize::from(PREFETCH))
}

/// Fails with how to start RabbitMQ when it does not answer.
pub(crate) async fn ensure_reachable() -> anyhow::Result<()> {
    let url = url();
    match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(conn) => {
            let _ = conn.close(200, ShortString::from("probe")).await;
            Ok(())
        }
        Err(e) => bail!(
            "RabbitMQ does not answer at {} ({AMQP_URL_ENV}): {e}; start it with \
             `rabbitmq-server -detached && rabbitmqctl await_startup`",
            redacted(&url)
        ),
    }
}

/// Declares `queue` (and for Backstop its tiers and DLQ) and fills it with
/// ids `0..n`: persistent messages, publisher confirms, no headers.
pub(crate) async fn prepare(
    scenario: &Scenario,
    contender: Contender,
    queue: &str,
    n: u64,
) -> anyhow::Result<()> {
    let t = transport()?;
    t.declare(&subscription(scenario, queue, contender != Contender::Raw))
        .await
        .context("declare the queues")?;
    if scenario.work == Work::Outbox {
        return Ok(()); // the contenders fill it
    }
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"));
    publish_confirmed(&ch, queue, (0..n).map(payload), FILL_WINDOW, &props).await?;
    eprintln!(
        "    filled {queue} with {n} messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _ = conn.close(200, ShortString::from("filled")).await;
    Ok(())
}

/// Publishes `bodies` (made as they go) to `queue` (default exchange) with up to `window`
/// publishes on their way at once, each from its send until its confirm (a
/// send is not awaited before the next one starts: that would make every
/// publish wait for lapin's I/O loop in turn); fails unless every one is
/// confirmed.
pub(crate) async fn publish_confirmed(
    ch: &lapin::Channel,
    queue: &str,
    bodies: impl IntoIterator<Item = impl AsRef<[u8]>>,
    window: usize,
    props: &BasicProperties,
) -> anyhow::Result<()> {
    let publish = |body| async move {
        let confirmation = ch
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                AsRef::<[u8]>::as_ref(&body),
                props.clone(),
            )
            .await
            .context("publish")?
            .await
            .context("publisher confirm")?;
        match confirmation {
            lapin::Confirmation::Ack(_) => Ok(()),
            other => bail!("publish not confirmed: {other:?}"),
        }
    };
    let mut waiting = FuturesUnordered::new();
    for body in bodies {
        if waiting.len() == window
            && let Some(done) = waiting.next().await
        {
            done?;
        }
        waiting.push(publish(body));
    }
    while let Some(done) = waiting.next().await {
        done?;
    }
    Ok(())
}

/// Deletes the queue of a run with its tiers and DLQ (warnings only).
pub(crate) async fn cleanup(scenario: &Scenario, queue: &str) {
    let Ok(t) = transport() else { return };
    let mut doomed = vec![queue.to_owned(), dlq_queue(queue)];
    doomed.extend(
        scenario
            .policy()
            .tiers()
            .iter()
            .map(|tier| tier_queue(queue, tier)),
    );
    for q in doomed {
        if let Err(e) = t.delete_queue(&q).await {
            eprintln!("warning: could not delete {q}: {e}");
        }
    }
}

/// Runs `spec` on its prepared queue.
pub(crate) async fn run_child(scenario: &Scenario, spec: &Spec) -> anyhow::Result<RunResult> {
    if scenario.work == Work::Outbox {
        return crate::outbox::run_child(spec).await;
    }
    let n = spec.messages;
    let probe = Probe::new(scenario.work, n);
    let t = transport()?;
    let (measured, stats, mut problems) = match spec.contender {
        Contender::Raw => (
            raw(scenario, spec, &probe).await?,
            serde_json::Value::Null,
            Vec::new(),
        ),
        Contender::Backstop | Contender::BackstopPc64 => {
            let (m, s) = drive(t.clone(), scenario, &spec.group, &spec.source, n, &probe).await?;
            let p = dlq_problems(&t, &dlq_queue(&spec.source), n, scenario.work).await;
            (m, stats_json(&s), p)
        }
    };
    let with_tiers = spec.contender != Contender::Raw;
    for q in std::iter::once(spec.source.clone()).chain(
        subscription(scenario, &spec.source, with_tiers)
            .tiers
            .iter()
            .map(|tier| tier_queue(&spec.source, tier)),
    ) {
        match t.ready_count(&q).await {
            Ok(Some(0)) => {}
            Ok(Some(left)) => problems.push(format!("{left} messages left in {q}")),
            Ok(None) => problems.push(format!("{q} is gone")),
            Err(e) => problems.push(format!("could not count {q}: {e}")),
        }
    }
    let work = with_tiers.then_some(scenario.work);
    problems.splice(0..0, probe.tally.problems(work));
    Ok(RunResult::new(
        &spec.scenario,
        spec.contender,
        n,
        measured,
        &problems,
        stats,
    ))
}

/// The raw baseline: lapin on a quorum queue, `basic.qos(PREFETCH)`, manual
/// acks pipelined (each ack's future is polled alongside the next deliveries
/// instead of being awaited before taking the next one). S1 decodes the JSON
/// like Backstop's handler; the other scenarios run the no-op loop.
async fn raw(scenario: &Scenario, spec: &Spec, probe: &Probe) -> anyhow::Result<Measured> {
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            ShortString::from(spec.source.as_str()),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let decode = scenario.work == Work::S1;
    let mut acks = FuturesUnordered::new();
    let mut count = 0;
    while count < spec.messages {
        tokio::select! {
            biased;
            Some(acked) = acks.next(), if !acks.is_empty() => {
                let _: bool = acked?;
            }
            next = tokio::time::timeout(STALL, consumer.next()) => {
                let d = next
                    .map_err(|_| anyhow!("no delivery for {STALL:?} at {count}/{}", spec.messages))?
                    .ok_or_else(|| anyhow!("the consumer ended at {count}"))??;
                probe.window.open();
                let id = if decode {
                    serde_json::from_slice::<Record>(&d.data).ok().map(|r| r.id)
                } else {
                    parse_id(&d.data)
                };
                probe.tally.record(id);
                let acker = d.acker;
                acks.push(async move { acker.ack(BasicAckOptions::default()).await });
                count += 1;
            }
        }
    }
    while let Some(acked) = acks.next().await {
        acked?;
    }
    let measured = probe
        .window
        .close()
        .ok_or_else(|| anyhow!("no delivery came"))?;
    // Cancel before the close, as Backstop's stream does: a quorum queue's
    // channel that is behind keeps settles to itself, and a close drops
    // them (the acked messages come back; see `RabbitStream::close`).
    let _ = ch
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let _ = ch.close(200, ShortString::from("done")).await;
    let _ = conn.close(200, ShortString::from("done")).await;
    Ok(measured)
}
