//! One Kafka consumer in a child process: raw rdkafka or Backstop, then the
//! checks (exactly once, DLQ, committed offsets at the end of the partitions).

use super::{Mock, fill, tansu_config};
use crate::backstop::{Probe, dlq_problems, drive, stats_json};
use crate::measure::{Measured, RunResult, STALL};
use crate::scenario::{Broker, Contender, Record, Scenario, Spec, Work, parse_id};
use anyhow::{Context as _, anyhow};
use backstop_kafka::{KafkaConfig, KafkaTransport, dlq_topic};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// How long the committed offsets may take to reach the end after the run.
const COMMIT_WAIT: Duration = Duration::from_secs(15);

/// Runs `spec` (mock: starts and fills its own cluster first).
pub(crate) async fn run_child(scenario: &Scenario, spec: &Spec) -> anyhow::Result<RunResult> {
    let (config, _mock) = if scenario.broker == Broker::Mock {
        let mock = Mock::start(scenario, &spec.source, &spec.group)?;
        fill(&mock.servers, &spec.source, spec.messages).await?;
        (
            KafkaConfig::new(&mock.servers)
                .with_fetch_wait_max(std::time::Duration::from_millis(20)),
            Some(mock),
        )
    } else {
        (tansu_config(), None)
    };
    let n = spec.messages;
    let probe = Probe::new(scenario.work, n);
    let (measured, stats, mut problems) = match spec.contender {
        Contender::Raw => {
            let (m, p) = raw(&config, scenario, spec, &probe).await?;
            (m, serde_json::Value::Null, p)
        }
        Contender::Backstop | Contender::BackstopPc64 => {
            let ours = if spec.contender == Contender::BackstopPc64 {
                config.clone().with_partition_concurrency(64)
            } else {
                config.clone()
            };
            let transport = KafkaTransport::new(ours).context("Kafka config")?;
            let (m, s) = drive(
                transport.clone(),
                scenario,
                &spec.group,
                &spec.source,
                n,
                &probe,
            )
            .await?;
            let dlq = dlq_topic(&spec.group, &spec.source);
            let mut p = dlq_problems(&transport, &dlq, n, scenario.work).await;
            p.extend(committed_problems(&config, spec, scenario.partitions, None).await);
            (m, stats_json(&s), p)
        }
    };
    let work = (spec.contender != Contender::Raw).then_some(scenario.work);
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

/// The raw baseline: a `StreamConsumer` with auto commit every second and
/// `enable.auto.offset.store=false`, `recv()` then `store_offset_from_message`
/// for every record. S1 decodes the JSON like Backstop's handler; every other
/// scenario runs the no-op loop (S2/S3 raw is the no-op reference).
async fn raw(
    config: &KafkaConfig,
    scenario: &Scenario,
    spec: &Spec,
    probe: &Probe,
) -> anyhow::Result<(Measured, Vec<String>)> {
    let consumer: StreamConsumer = config
        .to_client_config()
        .set("group.id", &spec.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("raw consumer")?;
    consumer.subscribe(&[&spec.source])?;
    let decode = scenario.work == Work::S1;
    let mut count = 0;
    while count < spec.messages {
        let m = tokio::time::timeout(STALL, consumer.recv())
            .await
            .map_err(|_| anyhow!("no record for {STALL:?} at {count}/{}", spec.messages))??;
        probe.window.open();
        let body = m.payload().unwrap_or_default();
        let id = if decode {
            serde_json::from_slice::<Record>(body).ok().map(|r| r.id)
        } else {
            parse_id(body)
        };
        probe.tally.record(id);
        consumer.store_offset_from_message(&m)?;
        count += 1;
    }
    let measured = probe
        .window
        .close()
        .ok_or_else(|| anyhow!("no record came"))?;
    // What a careful consumer does on the way out (outside the window).
    consumer.commit_consumer_state(CommitMode::Sync)?;
    let problems = committed_problems(config, spec, scenario.partitions, Some(&consumer)).await;
    // Closing blocks for about session.timeout.ms (BROKERS.md): the child
    // exits right after reporting, so the consumer is simply leaked.
    std::mem::forget(consumer);
    Ok((measured, problems))
}

/// The group's committed offset of every partition must be its high
/// watermark. Waits up to `COMMIT_WAIT` (Backstop's final commit happens as
/// its consumer closes). `consumer`: ask it (raw); else a fresh
/// non-subscribed consumer of the same group.
async fn committed_problems(
    config: &KafkaConfig,
    spec: &Spec,
    partitions: i32,
    consumer: Option<&StreamConsumer>,
) -> Vec<String> {
    let lookup: BaseConsumer = match config
        .to_client_config()
        .set("group.id", &spec.group)
        .create()
    {
        Ok(c) => c,
        Err(e) => return vec![format!("committed offsets: {e}")],
    };
    let deadline = Instant::now() + COMMIT_WAIT;
    loop {
        let behind =
            tokio::task::block_in_place(|| behind(&lookup, consumer, &spec.source, partitions));
        match behind {
            Ok(b) if b.is_empty() => return Vec::new(),
            Ok(b) if Instant::now() >= deadline => {
                return vec![format!(
                    "committed offsets not at the end after {COMMIT_WAIT:?}: {}",
                    b.join(", ")
                )];
            }
            Err(e) if Instant::now() >= deadline => return vec![format!("committed offsets: {e}")],
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Partitions whose committed offset is not the high watermark, as
/// `p<i>: committed/high`.
fn behind(
    lookup: &BaseConsumer,
    consumer: Option<&StreamConsumer>,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<String>> {
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = match consumer {
        Some(c) => c.committed_offsets(tpl, timeout)?,
        None => lookup.committed_offsets(tpl, timeout)?,
    };
    let mut out = Vec::new();
    for p in 0..partitions {
        let (_, high) = lookup.fetch_watermarks(topic, p, timeout)?;
        let at = committed
            .find_partition(topic, p)
            .map(|e| e.offset())
            .unwrap_or(Offset::Invalid);
        if at != Offset::Offset(high) {
            out.push(format!("p{p}: {at:?}/{high}"));
        }
    }
    Ok(out)
}
