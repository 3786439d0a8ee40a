//! The scenarios, the contenders, the messages and the spec a child runs.

use backstop_core::{Backoff, DelayTier, RetryPolicy};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Where a scenario's messages live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Broker {
    /// librdkafka's in-process mock cluster, started by each child itself.
    Mock,
    /// The Kafka-protocol broker at `BACKSTOP_KAFKA_BROKERS` (tansu here).
    Tansu,
    /// RabbitMQ at `BACKSTOP_AMQP_URL`.
    Rabbitmq,
}

/// What the handler does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Work {
    /// Nothing (the id is read from the payload for the exactly-once check).
    Noop,
    /// Decode the JSON payload, succeed.
    S1,
    /// `id % 100 < 10` fail transiently on their first two attempts.
    S2,
    /// `id % 100 < 5` always fail and end in the DLQ after three retries.
    S3,
    /// Publishing through the outbox (see `outbox`), no consumer.
    Outbox,
}

impl Work {
    /// True for ids that fail on every attempt (S3): never handled successfully.
    pub(crate) fn always_fails(self, id: u64) -> bool {
        self == Work::S3 && id % 100 < 5
    }

    /// Whether attempt `attempt` (1 = first) of message `id` fails.
    pub(crate) fn fails(self, id: u64, attempt: u32) -> bool {
        match self {
            Work::Noop | Work::S1 | Work::Outbox => false,
            Work::S2 => id % 100 < 10 && attempt <= 2,
            Work::S3 => self.always_fails(id),
        }
    }
}

/// One named scenario of the command line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) broker: Broker,
    pub(crate) work: Work,
    /// Failures go through the broker's delay tier instead of in-process retries.
    pub(crate) tier: bool,
    pub(crate) messages: u64,
    /// Kafka partitions of the source topic.
    pub(crate) partitions: i32,
}

const fn sc(name: &'static str, broker: Broker, work: Work, tier: bool, messages: u64) -> Scenario {
    let partitions = if matches!(work, Work::Noop) { 4 } else { 1 };
    Scenario {
        name,
        broker,
        work,
        tier,
        messages,
        partitions,
    }
}

/// Every scenario, in the order they run.
pub(crate) const SCENARIOS: [Scenario; 19] = [
    sc("noop-mock", Broker::Mock, Work::Noop, false, 50_000),
    sc("noop-tansu", Broker::Tansu, Work::Noop, false, 20_000),
    sc("noop-rabbitmq", Broker::Rabbitmq, Work::Noop, false, 20_000),
    sc("s1-mock", Broker::Mock, Work::S1, false, 20_000),
    sc("s1-tansu", Broker::Tansu, Work::S1, false, 20_000),
    sc("s1-rabbitmq", Broker::Rabbitmq, Work::S1, false, 50_000),
    sc("s2-tansu", Broker::Tansu, Work::S2, false, 10_000),
    sc("s2-rabbitmq", Broker::Rabbitmq, Work::S2, false, 10_000),
    sc("s2-tier-mock", Broker::Mock, Work::S2, true, 10_000),
    sc("s2-tier-tansu", Broker::Tansu, Work::S2, true, 10_000),
    sc("s2-tier-rabbitmq", Broker::Rabbitmq, Work::S2, true, 10_000),
    sc("s3-tansu", Broker::Tansu, Work::S3, false, 10_000),
    sc("s3-rabbitmq", Broker::Rabbitmq, Work::S3, false, 10_000),
    sc("s3-tier-mock", Broker::Mock, Work::S3, true, 10_000),
    sc("s3-tier-tansu", Broker::Tansu, Work::S3, true, 10_000),
    sc("s3-tier-rabbitmq", Broker::Rabbitmq, Work::S3, true, 10_000),
    sc(
        "outbox-rabbitmq",
        Broker::Rabbitmq,
        Work::Outbox,
        false,
        20_000,
    ),
    sc("backlog-tansu", Broker::Tansu, Work::Noop, false, 1_000_000),
    sc(
        "backlog-rabbitmq",
        Broker::Rabbitmq,
        Work::Noop,
        false,
        1_000_000,
    ),
];

/// Who consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Contender {
    /// The broker's client alone (rdkafka `StreamConsumer` / lapin).
    Raw,
    /// `Runner` with default options.
    Backstop,
    /// `Runner` with default options on a `KafkaConfig` with partition concurrency 64.
    BackstopPc64,
}

impl Contender {
    /// For names of groups and queues.
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Contender::Raw => "raw",
            Contender::Backstop => "backstop",
            Contender::BackstopPc64 => "backstop-pc64",
        }
    }

    pub(crate) fn label(self, broker: Broker) -> &'static str {
        match (self, broker) {
            (Contender::Raw, Broker::Rabbitmq) => "raw lapin",
            (Contender::Raw, _) => "raw rdkafka",
            (Contender::Backstop, _) => "backstop",
            (Contender::BackstopPc64, _) => "backstop pc=64",
        }
    }
}

impl Scenario {
    /// The contenders of this scenario, raw first (the ratio's reference).
    pub(crate) fn contenders(&self) -> Vec<Contender> {
        let mut all = vec![Contender::Raw, Contender::Backstop];
        if self.work == Work::S1 && self.broker != Broker::Rabbitmq {
            all.push(Contender::BackstopPc64);
        }
        all
    }

    /// Backstop's retry policy here: the default for no-op and S1 (nothing
    /// fails); S2/S3: three in-process retries after 10, 20, 40 ms (full
    /// jitter, so up to those), no tiers; tier variants: no in-process retry
    /// (one attempt per delivery) and three 200 ms tiers, see `tiers`.
    pub(crate) fn policy(&self) -> RetryPolicy {
        match (self.work, self.tier) {
            (Work::Noop | Work::S1 | Work::Outbox, _) => RetryPolicy::default(),
            (_, false) => RetryPolicy::default()
                .with_immediate_attempts(4)
                .with_backoff(Backoff::exponential(
                    Duration::from_millis(10),
                    Duration::from_millis(40),
                ))
                .with_tiers([]),
            (_, true) => RetryPolicy::default()
                .with_immediate_attempts(1)
                .with_tiers(tiers()),
        }
    }
}

/// The delay tiers of the tier variants: three hops of 200 ms. The policy
/// moves to the next tier on each hop and dead-letters past the last one, so
/// "fail twice, then succeed" (S2) needs two hops and "dead-lettered after
/// three retries" (S3) three; a single 200 ms tier would dead-letter S2's
/// messages on their second failure. Tier names must be unique, hence
/// `200ms-1..3`.
fn tiers() -> Vec<DelayTier> {
    (1..=3)
        .map(|i| DelayTier::named(format!("200ms-{i}"), Duration::from_millis(200)))
        .collect()
}

/// Payload size target in bytes.
pub(crate) const PAYLOAD_BYTES: usize = 200;

/// The payload of message `i`: `{"id":i,"pad":"xxx..."}`, 200 bytes.
pub(crate) fn payload(i: u64) -> Vec<u8> {
    let head = format!(r#"{{"id":{i},"pad":""#);
    let pad = PAYLOAD_BYTES.saturating_sub(head.len() + 2);
    let mut out = Vec::with_capacity(PAYLOAD_BYTES);
    out.extend_from_slice(head.as_bytes());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// The id of a payload without a JSON parser (no-op handlers), `None` when
/// it does not start with `{"id":<digits>`.
pub(crate) fn parse_id(payload: &[u8]) -> Option<u64> {
    let digits = payload.strip_prefix(br#"{"id":"#)?;
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// What S1-S3 handlers decode.
#[derive(Debug, Deserialize)]
pub(crate) struct Record {
    pub(crate) id: u64,
    #[allow(dead_code)]
    pub(crate) pad: String,
}

/// What one child process runs: one contender on one prepared source.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Spec {
    pub(crate) scenario: String,
    pub(crate) contender: Contender,
    pub(crate) messages: u64,
    /// Topic or queue (for `mock`: the topic the child creates and fills).
    pub(crate) source: String,
    /// Kafka consumer group / Backstop group.
    pub(crate) group: String,
}

/// A name unique to this run: `<prefix>-<millis>-<pid>-<run>`.
pub(crate) fn unique(prefix: &str, run: usize) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{prefix}-{ms}-{}-{run}", std::process::id())
}

/// The scenario named `name`.
pub(crate) fn find(name: &str) -> Option<Scenario> {
    SCENARIOS.iter().copied().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_200_bytes_and_carry_their_id() {
        for i in [0, 7, 49_999, 1_000_000] {
            let p = payload(i);
            assert_eq!(p.len(), PAYLOAD_BYTES);
            assert_eq!(parse_id(&p), Some(i));
            let r: Record = serde_json::from_slice(&p).expect("json");
            assert_eq!(r.id, i);
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert!(
                SCENARIOS[..i].iter().all(|o| o.name != s.name),
                "{}",
                s.name
            );
        }
    }
}
