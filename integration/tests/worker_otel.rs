//! Feature `otel`: a worker exports its `backstop.handle` spans over OTLP/HTTP
//! to a collector (a stand-in that records what it receives), the span joins
//! the trace of the message's `traceparent`, and the DLQ copy carries the same
//! trace id with the delivery span as its parent.
//!
//! Its own test binary: the worker installs the process's tracing subscriber.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use backstop::memory::MemoryBroker;
use backstop::message::names;
use backstop::worker::{Worker, WorkerConfig};
use backstop::{Context, HandlerError, Json, Message, Publisher, handler_fn};
use std::sync::{Arc, Mutex};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

type Received = Arc<Mutex<Vec<Bytes>>>;

async fn collect(State(received): State<Received>, body: Bytes) -> &'static str {
    received.lock().expect("lock").push(body);
    ""
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_the_otlp_endpoint_and_copies_carry_the_trace() {
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = listener.local_addr().expect("addr");
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let broker = MemoryBroker::new();
    broker
        .publish(
            "orders",
            Message::new("0")
                .with_header(names::TRACEPARENT, format!("00-{TRACE}-{PRODUCER_SPAN}-01")),
        )
        .await
        .expect("publish");
    let config = WorkerConfig::from_toml(&format!(
        r#"
broker = "memory"
group = "otel-worker"
[http]
enabled = false
[metrics]
enabled = false
[tracing]
otlp_endpoint = "http://{collector}"
service_name = "otel-test"
"#
    ))
    .expect("config");
    let idle = broker.clone();
    let report = Worker::new(config)
        .with_memory_broker(broker.clone())
        .with_handler(
            "orders",
            handler_fn(|Json(n): Json<u32>, _: Context| async move {
                Err::<(), _>(HandlerError::permanent(format!("order {n} is invalid")))
            }),
        )
        .with_shutdown(async move { idle.wait_idle().await })
        .run()
        .await
        .expect("ran");
    assert_eq!(report.stats.dead_lettered, 1);

    // The DLQ copy: same trace, the delivery's span as parent.
    let dead = broker.messages("orders.dlq");
    let tp = dead[0]
        .headers()
        .get_str(names::TRACEPARENT)
        .expect("traceparent on the copy")
        .to_owned();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[1], TRACE, "same trace id: {tp}");
    assert_ne!(
        parts[2], PRODUCER_SPAN,
        "the parent is now the delivery's span: {tp}"
    );

    // The run flushed its spans: the collector has the trace, the delivery's
    // span (the copy's parent) and the service name.
    let bodies = received.lock().expect("lock").clone();
    assert!(!bodies.is_empty(), "spans exported to the OTLP endpoint");
    let all: Vec<u8> = bodies.iter().flat_map(|b| b.to_vec()).collect();
    assert!(contains(&all, &hex(TRACE)), "the trace id was exported");
    assert!(
        contains(&all, &hex(parts[2])),
        "the delivery span was exported"
    );
    assert!(
        contains(&all, &hex(PRODUCER_SPAN)),
        "with the producer's span as parent"
    );
    assert!(contains(&all, b"backstop.handle"), "span name");
    assert!(contains(&all, b"otel-test"), "service.name");
}
