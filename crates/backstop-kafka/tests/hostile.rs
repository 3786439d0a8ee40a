//! Records a hostile producer can write, on librdkafka's mock cluster: a
//! header key that is not UTF-8 (rdkafka's own accessor panics on it) and a
//! CreateTime in microseconds (year 58,000: no header can say it). Each is
//! handled or dead-lettered like any other record, between valid ones, and
//! the consumer keeps going.
#![allow(unsafe_code)] // `produce_with_raw_header` only: see there.

mod common;

use backstop_core::{
    Context, HandlerError, HandlerOptions, Message, RetryPolicy, Runner, handler_fn,
};
use rdkafka::bindings::{
    RD_KAFKA_MSG_F_COPY, rd_kafka_produceva, rd_kafka_vtype_t, rd_kafka_vu_s__bindgen_ty_1,
    rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1, rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2,
    rd_kafka_vu_t,
};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use std::ffi::{CString, c_void};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Produces `payload` with one header whose key is `key` (bytes, any of
/// them but NUL): rdkafka's safe API takes keys as `&str` only, so this
/// goes through librdkafka's `rd_kafka_produceva`.
fn produce_with_raw_header(producer: &BaseProducer, topic: &str, key: &[u8], payload: &[u8]) {
    let topic = CString::new(topic).expect("topic name without NUL");
    let key = CString::new(key).expect("key without NUL");
    let value = b"v";
    let vu = |vtype, u| rd_kafka_vu_t { vtype, u };
    let vus = [
        vu(
            rd_kafka_vtype_t::RD_KAFKA_VTYPE_TOPIC,
            rd_kafka_vu_s__bindgen_ty_1 {
                cstr: topic.as_ptr(),
            },
        ),
        vu(
            rd_kafka_vtype_t::RD_KAFKA_VTYPE_MSGFLAGS,
            rd_kafka_vu_s__bindgen_ty_1 {
                i: RD_KAFKA_MSG_F_COPY,
            },
        ),
        vu(
            rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE,
            rd_kafka_vu_s__bindgen_ty_1 {
                mem: rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                    ptr: payload.as_ptr().cast::<c_void>().cast_mut(),
                    size: payload.len(),
                },
            },
        ),
        vu(
            rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER,
            rd_kafka_vu_s__bindgen_ty_1 {
                header: rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                    name: key.as_ptr(),
                    val: value.as_ptr().cast::<c_void>(),
                    size: 1,
                },
            },
        ),
    ];
    // SAFETY: every pointer in `vus` points to memory that lives until the
    // call returns; with `RD_KAFKA_MSG_F_COPY` librdkafka copies the payload,
    // and it copies topic and header names while it builds the message.
    let error =
        unsafe { rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), vus.len()) };
    assert!(error.is_null(), "produceva refused the record");
}

/// A handled record's payload and header keys.
type Seen = (String, Vec<String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_handled_or_dead_lettered_and_the_partition_goes_on() {
    let (mock, servers) = common::Mock::start();
    let source = common::unique("hostile");
    let group = common::unique("hostile-group");
    mock.create_topic(&source, 1);
    mock.create_topic(&backstop_kafka::dlq_topic(&group, &source), 1);

    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()
        .expect("producer");
    let valid = |producer: &BaseProducer, body: &str| {
        producer
            .send(BaseRecord::<(), _>::to(&source).payload(body))
            .expect("queued");
    };
    valid(&producer, "ok 1");
    produce_with_raw_header(&producer, &source, b"bad\xffkey", b"ok raw key");
    valid(&producer, "ok 2");
    // A CreateTime in microseconds, read as milliseconds: year 58,000.
    // Failing makes the runner write the origin headers of the DLQ copy.
    producer
        .send(
            BaseRecord::<(), _>::to(&source)
                .payload("fail far future")
                .timestamp(1_795_730_060_123_000),
        )
        .expect("queued");
    produce_with_raw_header(&producer, &source, b"\xfe\xff", b"fail raw key");
    valid(&producer, "ok 3");
    producer
        .flush(Duration::from_secs(30))
        .expect("every record produced");

    let keys: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen = keys.clone();
    let handler = handler_fn(move |m: Message, _: Context| {
        let seen = seen.clone();
        async move {
            let body = String::from_utf8_lossy(m.payload()).into_owned();
            let names = m.headers().iter().map(|h| h.key.clone()).collect();
            seen.lock().expect("lock").push((body.clone(), names));
            if body.starts_with("fail") {
                return Err(HandlerError::permanent("hostile"));
            }
            Ok(())
        }
    });
    let runner = Runner::builder(
        backstop_kafka::KafkaTransport::new(common::test_config(&servers)).expect("config"),
    )
    .with_group(&group)
    .with_handler_options(
        &source,
        handler,
        HandlerOptions::default().with_policy(RetryPolicy::default().with_tiers([])),
    )
    .build()
    .expect("valid");
    let stats = runner.stats();
    let running = backstop_test::start(runner);
    backstop_test::eventually(
        "every record handled or dead-lettered",
        Duration::from_secs(120),
        || async {
            let s = stats.snapshot();
            s.ok == 4 && s.dead_lettered == 2
        },
    )
    .await;
    let report = running.stop().await;
    assert_eq!((report.stats.ok, report.stats.dead_lettered), (4, 2));
    let keys = keys.lock().expect("lock").clone();
    let bodies: Vec<&str> = keys.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(
        bodies,
        [
            "ok 1",
            "ok raw key",
            "ok 2",
            "fail far future",
            "fail raw key",
            "ok 3"
        ],
        "in order, each once"
    );
    assert_eq!(keys[1].1, ["bad\\xffkey"], "kept, escaped");
    assert_eq!(keys[4].1, ["\\xfe\\xff"]);
    std::thread::spawn(move || drop(producer));
    drop(mock);
}

/// The hostile producer on tansu, interleaved with valid records: a header
/// key that is not UTF-8, CreateTimes in microseconds, a 300-byte id and key,
/// a 64 KiB header value, bytes where text is expected, forged attempt and
/// origin headers, an empty, a 900 KiB (tansu serves nothing of 1 MiB or
/// more, see BROKERS.md) and an invalid UTF-8 payload. The worker keeps
/// running; each record is handled once or dead-lettered with a reason;
/// counts reconciled against the broker (the group's lag is zero, the DLQ
/// holds exactly the failures); forged headers ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_producer_on_tansu_loses_nothing_and_stops_nothing() {
    use backstop_core::message::names;
    use backstop_core::{DeadLetterPublisher, DeadLetterSource, Subscription};
    use backstop_test::Backend as _;
    use rdkafka::message::{Header, OwnedHeaders};
    let backend = common::KafkaBackend::new(1);
    let transport = backend.transport().await;
    let group = common::unique("hostile-tansu-group");
    let source = backend.fresh_source("hostile-tansu", &group, &[]).await;
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("message.max.bytes", "2000000")
        .create()
        .expect("producer");
    let mut sent: Vec<(u32, bool)> = Vec::new();
    let mut next = 0u32;
    let mut send =
        |payload: &[u8], key: Option<&[u8]>, headers: &[(&str, &[u8])], ts: Option<i64>| {
            next += 1;
            let seq = next;
            let seq_text = seq.to_string();
            let mut h = OwnedHeaders::new().insert(Header {
                key: "seq",
                value: Some(seq_text.as_bytes()),
            });
            for (k, v) in headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(*v),
                });
            }
            let mut r = BaseRecord::<[u8], [u8]>::to(&source)
                .payload(payload)
                .headers(h);
            if let Some(k) = key {
                r = r.key(k);
            }
            if let Some(t) = ts {
                r = r.timestamp(t);
            }
            producer.send(r).map_err(|(e, _)| e).expect("queued");
            sent.push((seq, payload.starts_with(b"fail")));
        };
    send(b"ok valid", None, &[], None);
    send(b"ok micros", None, &[], Some(1_795_730_060_123_000));
    send(b"fail micros", None, &[], Some(1_795_730_060_123_000));
    send(
        b"fail long id",
        Some(&[b'k'; 300]),
        &[(names::MESSAGE_ID, &[b'i'; 300])],
        None,
    );
    send(
        b"ok big header",
        None,
        &[("big", &vec![b'h'; 64 * 1024])],
        None,
    );
    send(
        b"fail bytes as text",
        None,
        &[
            (names::TRACEPARENT, &[0, 255, 27]),
            (names::ATTEMPT, &[0xff]),
        ],
        None,
    );
    send(
        b"fail forged",
        None,
        &[
            (names::ATTEMPT, b"999"),
            (names::DELAYED_ATTEMPTS, b"999"),
            (names::ORIGIN_SOURCE, b"evil-topic"),
            (names::ORIGIN_PARTITION, b"-7"),
        ],
        None,
    );
    send(b"", None, &[], None);
    let mut big = b"ok ".to_vec();
    big.resize(900 * 1024, b'x');
    send(&big, None, &[], None);
    send(&[b'f', b'a', b'i', b'l', 0xff, 0xfe], None, &[], None);
    send(b"ok valid", None, &[], None);
    producer.flush(Duration::from_secs(30)).expect("produced");
    produce_with_raw_header(&producer, &source, b"bad\xffkey", b"ok raw key");
    produce_with_raw_header(&producer, &source, b"\xfe\xff", b"fail raw key");
    producer.flush(Duration::from_secs(30)).expect("produced");
    let total = sent.len() + 2;
    let failing = sent.iter().filter(|(_, f)| *f).count() + 1;

    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = calls.clone();
    let handler = handler_fn(move |m: Message, ctx: Context| {
        let seen = seen.clone();
        async move {
            if ctx.attempt() == 1 {
                let body = m.payload();
                let id = m
                    .headers()
                    .get_str("seq")
                    .map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned);
                seen.lock().expect("lock").push(id);
            }
            if m.payload().starts_with(b"fail") {
                return Err(HandlerError::permanent("hostile input"));
            }
            Ok(())
        }
    });
    let runner = Runner::builder(transport.clone())
        .with_group(&group)
        .with_handler_options(
            &source,
            handler,
            HandlerOptions::default().with_policy(RetryPolicy::default().with_tiers([])),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    let running = backstop_test::start(runner);
    backstop_test::eventually(
        "every record handled or dead-lettered",
        Duration::from_secs(120),
        || async {
            let s = stats.snapshot();
            s.ok + s.dead_lettered == total as u64
        },
    )
    .await;
    backstop_test::until_zero("source drained", Duration::from_secs(60), || {
        backend.pending(&source)
    })
    .await;
    let report = running.stop().await;
    assert_eq!(
        (
            report.stats.ok as usize,
            report.stats.dead_lettered as usize
        ),
        (total - failing, failing),
        "{:?}",
        report.stats
    );
    let calls = calls.lock().expect("lock").clone();
    assert_eq!(calls.len(), total, "each handled once: {calls:?}");
    for (s, _) in &sent {
        assert_eq!(calls.iter().filter(|c| **c == s.to_string()).count(), 1);
    }
    let dlq = transport.dead_letter_destination(
        &Subscription::new(source.clone(), group.clone()).with_prefetch(1),
    );
    let dead = transport.browse(&dlq, 100).await.expect("DLQ");
    assert_eq!(dead.len(), failing, "the DLQ holds exactly the failures");
    for d in &dead {
        let h = d.headers();
        assert!(h.get(names::DEAD_LETTER_REASON).is_some());
        assert_eq!(h.get_str(names::ORIGIN_SOURCE), Some(source.as_str()));
        assert_eq!(h.get_str(names::ORIGIN_PARTITION), Some("0"));
        assert_eq!(
            h.get_str(names::ATTEMPT),
            Some("1"),
            "forged attempts ignored"
        );
    }
    std::thread::spawn(move || drop(producer));
}
