//! A panic outside the handler (here: in the trace propagation hooks, which
//! the runner calls around the handler, and in a dead-letter publish) never
//! leaks its delivery: the message comes back, the panic counts as a failed
//! attempt of class `panic`, and a message that keeps panicking ends in the
//! DLQ as a stub. The messages around it are handled as usual.

use backstop_core::memory::MemoryBroker;
use backstop_core::message::names;
use backstop_core::{
    Context, DeadLetterPublisher, DelayPublisher, DelayTier, HandlerError, HandlerOptions, Headers,
    Message, PublishError, Publisher, RetryPolicy, Runner, Subscriber, Subscription,
    TracePropagation, TransportError, handler_fn,
};
use bytes::Bytes;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Panics in `on_consume` and/or `on_publish` for messages with a `boom`
/// header.
#[derive(Debug)]
struct Bomb {
    on_consume: bool,
    on_publish: bool,
}

impl TracePropagation for Bomb {
    fn on_consume(&self, headers: &Headers, _: &tracing::Span) {
        assert!(
            !(self.on_consume && headers.get("boom").is_some()),
            "bomb on consume"
        );
    }

    fn on_publish(&self, headers: &mut Headers, _: &tracing::Span) {
        assert!(
            !(self.on_publish && headers.get("boom").is_some()),
            "bomb on publish"
        );
    }
}

/// Publishes `ok 0..n` with `boom` after the first, as the test's source.
async fn fill(broker: &MemoryBroker, n: usize) {
    for i in 0..n {
        broker
            .publish("q", Message::new(format!("ok {i}")))
            .await
            .expect("publish");
        if i == 0 {
            broker
                .publish("q", Message::new("fail").with_header("boom", "1"))
                .await
                .expect("publish");
        }
    }
}

/// Succeeds, except for `fail` (permanent); records what it handled.
fn handler(seen: Arc<Mutex<Vec<String>>>) -> impl backstop_core::Handler {
    handler_fn(move |body: Bytes, _: Context| {
        let seen = seen.clone();
        async move {
            let body = String::from_utf8_lossy(&body).into_owned();
            seen.lock().expect("lock").push(body.clone());
            if body == "fail" {
                return Err(HandlerError::permanent("refused"));
            }
            Ok(())
        }
    })
}

/// One attempt per delivery, no tiers: a failure is dead-lettered at once.
fn options() -> HandlerOptions {
    HandlerOptions::default().with_policy(
        RetryPolicy::default()
            .with_immediate_attempts(1)
            .with_tiers([]),
    )
}

/// The stub's failure headers say where Backstop panicked.
fn assert_panic_stub(dead: &Message) {
    assert_eq!(dead.payload(), &Bytes::from_static(b"fail"));
    assert_eq!(dead.headers().get_str(names::ERROR_CLASS), Some("panic"));
    let what = dead
        .headers()
        .get_str(names::ERROR_MESSAGE)
        .expect("an error message");
    assert!(what.contains("panicked outside the handler at"), "{what}");
    assert!(what.contains("tests/panics.rs"), "{what}");
    assert!(dead.id().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_message_that_panics_before_its_handler_ends_in_the_dlq() {
    let broker = MemoryBroker::new();
    fill(&broker, 5).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let runner = Runner::builder(broker.clone())
        .with_handler_options("q", handler(seen.clone()), options())
        .with_trace_propagation(Arc::new(Bomb {
            on_consume: true,
            on_publish: false,
        }))
        .build()
        .expect("valid");
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        ["ok 0", "ok 1", "ok 2", "ok 3", "ok 4"],
        "never handled"
    );
    assert_eq!(report.stats.panics, 2, "the first two deliveries panicked");
    assert_eq!((report.stats.ok, report.stats.dead_lettered), (5, 1));
    let dead = broker.messages("q.dlq");
    assert_eq!(dead.len(), 1);
    assert_panic_stub(&dead[0]);
    assert_eq!(
        broker.ready_len("q") + broker.unacked_len("q"),
        0,
        "settled"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_whose_copy_panics_is_handled_once_then_dead_lettered() {
    let broker = MemoryBroker::new();
    fill(&broker, 3).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let runner = Runner::builder(broker.clone())
        .with_handler_options("q", handler(seen.clone()), options())
        .with_trace_propagation(Arc::new(Bomb {
            on_consume: false,
            on_publish: true,
        }))
        .build()
        .expect("valid");
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    let fails = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|b| *b == "fail")
        .count();
    // Handled once; the second delivery counts the panic as that attempt's
    // failure (its DLQ copy panics again), the third goes as a stub.
    assert_eq!(fails, 1);
    assert_eq!(report.stats.panics, 2);
    assert_eq!((report.stats.ok, report.stats.dead_lettered), (3, 1));
    let dead = broker.messages("q.dlq");
    assert_eq!(dead.len(), 1);
    assert_panic_stub(&dead[0]);
}

/// The memory broker, except that its first dead-letter publishes panic.
#[derive(Clone)]
struct PanickyDlq {
    inner: MemoryBroker,
    panics_left: Arc<AtomicU32>,
}

impl Subscriber for PanickyDlq {
    type Stream = <MemoryBroker as Subscriber>::Stream;

    async fn subscribe(&self, s: &Subscription) -> Result<Self::Stream, TransportError> {
        self.inner.subscribe(s).await
    }
}

impl Publisher for PanickyDlq {
    async fn publish(&self, destination: &str, message: Message) -> Result<(), PublishError> {
        self.inner.publish(destination, message).await
    }
}

impl DelayPublisher for PanickyDlq {
    async fn publish_delayed(
        &self,
        s: &Subscription,
        tier: &DelayTier,
        message: Message,
    ) -> Result<(), PublishError> {
        self.inner.publish_delayed(s, tier, message).await
    }
}

impl DeadLetterPublisher for PanickyDlq {
    fn dead_letter_destination(&self, s: &Subscription) -> String {
        self.inner.dead_letter_destination(s)
    }

    async fn publish_dead_letter(
        &self,
        s: &Subscription,
        message: Message,
    ) -> Result<(), PublishError> {
        let left = self.panics_left.load(Ordering::SeqCst);
        if left > 0 {
            self.panics_left.store(left - 1, Ordering::SeqCst);
            panic!("the backend's dead-letter publish panicked");
        }
        self.inner.publish_dead_letter(s, message).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_routing_gives_the_message_back_and_the_next_try_delivers_it() {
    let broker = MemoryBroker::new();
    fill(&broker, 3).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let transport = PanickyDlq {
        inner: broker.clone(),
        panics_left: Arc::new(AtomicU32::new(1)),
    };
    let runner = Runner::builder(transport)
        .with_handler_options("q", handler(seen.clone()), options())
        .build()
        .expect("valid");
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    assert_eq!(report.stats.panics, 1);
    assert_eq!((report.stats.ok, report.stats.dead_lettered), (3, 1));
    let dead = broker.messages("q.dlq");
    assert_eq!(dead.len(), 1, "one copy: the panicked publish sent nothing");
    // The redelivery's attempt failed with the routing panic; the policy
    // (no retries left) dead-lettered it with that failure.
    assert_eq!(dead[0].headers().get_str(names::ERROR_CLASS), Some("panic"));
    let what = dead[0]
        .headers()
        .get_str(names::ERROR_MESSAGE)
        .expect("an error message");
    assert!(what.contains("panicked routing a copy at"), "{what}");
    assert_eq!(
        broker.ready_len("q") + broker.unacked_len("q"),
        0,
        "settled"
    );
}
