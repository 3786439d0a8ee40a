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
