//! Reading Kafka DLQs: browse, take (the handled log records what was
//! replayed or purged), and the readings a backlog needs.

use crate::convert::{Arena, from_record};
use crate::transport::KafkaTransport;
use backstop_core::transport::BoxFuture;
use backstop_core::{
    Acknowledge, DeadLetterSource, Delivery, Message, SourceInfo, SourceKind, TransportError,
    TransportErrorKind,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) fn unique_group(purpose: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "backstop-{purpose}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn blocking_error(e: tokio::task::JoinError) -> TransportError {
    TransportError::new(TransportErrorKind::Other, "blocking task").with_source(e)
}

fn kafka(context: &str, e: rdkafka::error::KafkaError) -> TransportError {
    TransportError::new(TransportErrorKind::ConnectionLost, context.to_owned()).with_source(e)
}

/// Reads every partition of `topic` from `start` up to its high watermark
/// (or `limit` records). `timeout` bounds the wait for the next record, not
/// the whole read: a big topic on a slow broker is read to its end. A read
/// that stops short is an error, never a partial answer taken for the whole
/// (a DLQ listing, a replay's selection, the handled log).
fn read_to_end(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: usize,
    start: impl Fn(i32) -> Offset,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<(Message, i32, i64)>, TransportError> {
    let mut ends = assign(consumer, topic, partitions, start, timeout)?;
    let mut out = Vec::new();
    let mut deadline = Instant::now() + timeout;
    let mut arena = Arena::default();
    while ends.remaining > 0 && out.len() < limit && Instant::now() < deadline {
        let Some(r) = consumer.poll(Duration::from_millis(100)) else {
            // A partition whose last offsets are no records (transaction
            // markers) ends where the consumer's position passed its end.
            if let Ok(positions) = consumer.position() {
                for e in positions.elements_for_topic(topic) {
                    if let Offset::Offset(at) = e.offset() {
                        ends.reached(e.partition(), at);
                    }
                }
            }
            continue;
        };
        let m = r.map_err(|e| kafka("read", e))?;
        deadline = Instant::now() + timeout;
        out.push((from_record(&m, &mut arena), m.partition(), m.offset()));
        ends.reached(m.partition(), m.offset().saturating_add(1));
    }
    if ends.remaining > 0 && out.len() < limit {
        return Err(TransportError::new(
            TransportErrorKind::ConnectionLost,
            format!(
                "reading {topic:?} stopped: no record for {timeout:?} with {} \
                 partition(s) not read to their end ({} records read)",
                ends.remaining,
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// Assigns every partition of `topic` to `consumer` from `start` (never
/// below the log start) and returns where each ends now.
fn assign(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: usize,
    start: impl Fn(i32) -> Offset,
    timeout: Duration,
) -> Result<Ends, TransportError> {
    let mut tpl = TopicPartitionList::new();
    let mut ends = Ends::default();
    for p in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| kafka("fetch watermarks", e))?;
        let from = match start(p) {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        ends.add(from, high);
        tpl.add_partition_offset(topic, p, Offset::Offset(from))
            .map_err(|e| kafka("assign", e))?;
    }
    consumer.assign(&tpl).map_err(|e| kafka("assign", e))?;
    Ok(ends)
}

/// Where the partitions of a read end (their high watermark when it began),
/// and which have been read to there.
#[derive(Default)]
struct Ends {
    ends: Vec<i64>,
    done: Vec<bool>,
    /// Partitions not read to their end yet.
    remaining: usize,
}

impl Ends {
    /// The next partition, read from `from`, ends at `high`.
    fn add(&mut self, from: i64, high: i64) {
        let done = from >= high;
        if !done {
            self.remaining += 1;
        }
        self.ends.push(high);
        self.done.push(done);
    }

    /// Partition `p` (a broker's number: anything) has been read up to
    /// `at` (the next offset).
    fn reached(&mut self, p: i32, at: i64) {
        let p = usize::try_from(p).unwrap_or(usize::MAX);
        if let (Some(end), Some(done)) = (self.ends.get(p), self.done.get_mut(p))
            && at >= *end
            && !*done
        {
            *done = true;
            self.remaining -= 1;
        }
    }
}

impl DeadLetterSource for KafkaTransport {
    async fn browse(&self, dlq: &str, limit: usize) -> Result<Vec<Message>, TransportError> {
        Ok(self
            .browse_positioned(dlq, limit)
            .await?
            .into_iter()
            .map(|(m, _, _)| m)
            .collect())
    }

    async fn take(&self, dlq: &str) -> Result<Option<Delivery>, TransportError> {
        let topics = self.admin.topics().await?;
        let Some(&partitions) = topics.get(dlq) else {
            return Err(TransportError::new(
                TransportErrorKind::NotFound,
                format!("DLQ topic {dlq:?} does not exist"),
            ));
        };
        // The reader group of this DLQ remembers (by committing) what was taken.
        let consumer = self.reader(&format!("backstop-dlq-reader.{dlq}"))?;
        let timeout = self.config.request_timeout();
        let topic = dlq.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
                tpl.add_partition(&topic, p);
            }
            let committed = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| kafka("committed offsets", e))?;
            let start = |p: i32| {
                committed
                    .find_partition(&topic, p)
                    .map_or(Offset::Beginning, |e| e.offset())
            };
            let first = read_to_end(&consumer, &topic, partitions, start, 1, timeout)?;
            let Some((message, partition, offset)) = first.into_iter().next() else {
                close_off_thread(consumer);
                return Ok(None);
            };
            let info = SourceInfo::new(topic.as_str(), SourceKind::DeadLetter)
                .at(Some(partition), Some(offset));
            let ack = TakeAck {
                consumer: Some(consumer),
                topic,
                partition,
                offset,
            };
            Ok(Some(Delivery::new(message, info, Box::new(ack))))
        })
        .await
        .map_err(blocking_error)?
    }
}

/// How many retained DLQ records a backlog reading scans, from the oldest, for
/// the oldest one not yet replayed or purged.
const OLDEST_SCAN: usize = 1_000;

impl KafkaTransport {
    /// Up to `limit` records of `dlq`, oldest first, each with its partition
    /// and offset (what the handled log names), nothing removed.
    pub async fn browse_positioned(
        &self,
        dlq: &str,
        limit: usize,
    ) -> Result<Vec<(Message, i32, i64)>, TransportError> {
        let topics = self.admin.topics().await?;
        let Some(&partitions) = topics.get(dlq) else {
            return Err(TransportError::new(
                TransportErrorKind::NotFound,
                format!("DLQ topic {dlq:?} does not exist"),
            ));
        };
        let consumer = self.reader(&unique_group("browse"))?;
        let timeout = self.config.request_timeout();
        let topic = dlq.to_owned();
        let mut found = tokio::task::spawn_blocking(move || {
            let r = read_to_end(
                &consumer,
                &topic,
                partitions,
                |_| Offset::Beginning,
                limit,
                timeout,
            );
            close_off_thread(consumer);
            r
        })
        .await
        .map_err(blocking_error)??;
        found.sort_by_key(|(m, p, o)| (m.timestamp(), *p, *o));
        found.truncate(limit);
        Ok(found)
    }
}

/// Retained records of `dlq` not recorded in `handled`, and the oldest
/// failure time among the first [`OLDEST_SCAN`] of them.
pub(crate) fn dlq_reading(
    consumer: &BaseConsumer,
    dlq: &str,
    partitions: usize,
    handled: &str,
    handled_partitions: usize,
    timeout: Duration,
) -> Result<(u64, Option<std::time::SystemTime>), TransportError> {
    let retained = |topic: &str, partitions: usize| -> Result<u64, TransportError> {
        let mut n = 0u64;
        for p in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, timeout)
                .map_err(|e| kafka("fetch watermarks", e))?;
            n += u64::try_from(high - low).unwrap_or(0);
        }
        Ok(n)
    };
    let records = retained(dlq, partitions)?;
    let log = if handled_partitions > 0 {
        crate::handled::Handled::read(
            read_to_end(
                consumer,
                handled,
                handled_partitions,
                |_| Offset::Beginning,
                usize::MAX,
                timeout,
            )?
            .into_iter()
            .map(|(m, _, _)| m),
        )
    } else {
        crate::handled::Handled::default()
    };
    let depth = records.saturating_sub(log.len() as u64);
    if depth == 0 {
        return Ok((0, None));
    }
    let oldest = read_to_end(
        consumer,
        dlq,
        partitions,
        |_| Offset::Beginning,
        OLDEST_SCAN,
        timeout,
    )?
    .into_iter()
    .filter(|(m, p, o)| !log.covers(m, *p, *o))
    .filter_map(|(m, _, _)| {
        m.headers()
            .get_str(backstop_core::message::names::FAILED_AT)
            .and_then(backstop_core::message::parse_timestamp)
    })
    .min();
    Ok((depth, oldest))
}

/// Closes a consumer on its own thread (see the rust-rdkafka shutdown trap).
pub(crate) fn close_off_thread(consumer: BaseConsumer) {
    let _ = std::thread::Builder::new()
        .name("backstop-kafka-close".into())
        .spawn(move || drop(consumer));
}

struct TakeAck {
    consumer: Option<BaseConsumer>,
    topic: String,
    partition: i32,
    offset: i64,
}

impl Acknowledge for TakeAck {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let Some(consumer) = self.consumer.take() else {
                return Err(TransportError::new(
                    TransportErrorKind::Invalid,
                    "a taken DLQ message settled twice",
                ));
            };
            let (topic, partition) = (self.topic.clone(), self.partition);
            // The position after the record; the broker's offset is not
            // trusted to leave room for it.
            let Some(next) = self.offset.checked_add(1) else {
                close_off_thread(consumer);
                return Err(TransportError::new(
                    TransportErrorKind::Invalid,
                    format!("offset {} of {topic:?} has no next position", self.offset),
                ));
            };
            tokio::task::spawn_blocking(move || {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, partition, Offset::Offset(next))
                    .map_err(|e| kafka("commit", e))?;
                let r = consumer
                    .commit(&tpl, CommitMode::Sync)
                    .map_err(|e| kafka("commit taken DLQ message", e));
                close_off_thread(consumer);
                r
            })
            .await
            .map_err(blocking_error)?
        })
    }

    fn nack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        if let Some(c) = self.consumer.take() {
            close_off_thread(c);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Drop for TakeAck {
    fn drop(&mut self) {
        if let Some(c) = self.consumer.take() {
            close_off_thread(c);
        }
    }
}
