//! Lanes in the runner, on a stream whose lanes hold their whole backlog
//! from the start: the task that settles a delivery takes its lane's next
//! one itself (the stream hands out one delivery per lane, not one per
//! message), and lanes sharing one in-flight slot take turns.

use backstop_core::transport::BoxFuture;
use backstop_core::{
    Acknowledge, Context, DeadLetterPublisher, DelayPublisher, DelayTier, Delivery, DeliveryStream,
    HandlerOptions, Lane, Lanes, Message, PublishError, Publisher, RetryPolicy, Runner, SourceInfo,
    Subscriber, Subscription, TransportError, handler_fn,
};
use bytes::Bytes;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Lanes of numbered messages; a lane is handed out to one holder at a time.
#[derive(Default)]
struct Backlog {
    lanes: Mutex<(Vec<VecDeque<u32>>, HashSet<u64>)>,
    /// Woken when a lane is left.
    left: Notify,
    /// Deliveries handed out by the stream itself.
    from_stream: AtomicUsize,
    /// Deliveries taken through `Lanes::next`.
    from_lane: AtomicUsize,
}

struct NoAck;

impl Acknowledge for NoAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn nack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Backlog {
    fn new(lanes: usize, each: u32) -> Arc<Self> {
        let backlog = Self::default();
        backlog.lock().0 = (0..lanes).map(|_| (0..each).collect()).collect();
        Arc::new(backlog)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<VecDeque<u32>>, HashSet<u64>)> {
        self.lanes.lock().expect("lock")
    }

    fn delivery(self: &Arc<Self>, lane: u64, n: u32) -> Delivery {
        let mut source = SourceInfo::main("lanes");
        source.partition = i32::try_from(lane).ok();
        source.offset = Some(i64::from(n));
        let lanes: Arc<dyn Lanes> = self.clone();
        Delivery::new(Message::new(n.to_string()), source, Box::new(NoAck))
            .with_lane(Lane::new(lanes, lane))
    }

    fn all_done(&self) -> bool {
        let l = self.lock();
        l.0.iter().all(VecDeque::is_empty) && l.1.is_empty()
    }
}

impl Lanes for Backlog {
    fn next(self: Arc<Self>, id: u64) -> Option<Delivery> {
        let mut l = self.lock();
        let lane = usize::try_from(id).expect("small");
        let Some(n) = l.0[lane].pop_front() else {
            l.1.remove(&id);
            drop(l);
            self.left.notify_one();
            return None;
        };
        drop(l);
        self.from_lane.fetch_add(1, Ordering::SeqCst);
        Some(self.delivery(id, n))
    }

    fn leave(&self, id: u64) {
        self.lock().1.remove(&id);
        self.left.notify_one();
    }
}

/// Round robin over the lanes nobody holds.
struct Stream {
    backlog: Arc<Backlog>,
    turn: usize,
}

impl DeliveryStream for Stream {
    async fn next_delivery(&mut self) -> Option<Result<Delivery, TransportError>> {
        loop {
            let left = self.backlog.left.notified();
            {
                let mut l = self.backlog.lock();
                let n = l.0.len();
                for i in 0..n {
                    let lane = (self.turn + i) % n;
                    let id = u64::try_from(lane).expect("small");
                    if l.1.contains(&id) {
                        continue;
                    }
                    if let Some(m) = l.0[lane].pop_front() {
                        l.1.insert(id);
                        drop(l);
                        self.turn = (lane + 1) % n;
                        self.backlog.from_stream.fetch_add(1, Ordering::SeqCst);
                        return Some(Ok(self.backlog.delivery(id, m)));
                    }
                }
            }
            left.await;
        }
    }
}

#[derive(Clone)]
struct Transport(Arc<Backlog>);

impl Subscriber for Transport {
    type Stream = Stream;

    async fn subscribe(&self, _: &Subscription) -> Result<Stream, TransportError> {
        Ok(Stream {
            backlog: self.0.clone(),
            turn: 0,
        })
    }
}

impl Publisher for Transport {
    async fn publish(&self, _: &str, _: Message) -> Result<(), PublishError> {
        Ok(())
    }
}

impl DelayPublisher for Transport {
    async fn publish_delayed(
        &self,
        _: &Subscription,
        _: &DelayTier,
        _: Message,
    ) -> Result<(), PublishError> {
        Ok(())
    }
}

impl DeadLetterPublisher for Transport {
    fn dead_letter_destination(&self, _: &Subscription) -> String {
        "lanes.dlq".to_owned()
    }

    async fn publish_dead_letter(&self, _: &Subscription, _: Message) -> Result<(), PublishError> {
        Ok(())
    }
}

/// Runs the backlog through a no-op handler at `concurrency`; returns the
/// lane of each handled message, in the order handled.
async fn run(backlog: &Arc<Backlog>, concurrency: usize) -> Vec<i32> {
    let order: Arc<Mutex<Vec<i32>>> = Arc::default();
    let o = order.clone();
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let o = o.clone();
        async move {
            o.lock()
                .expect("lock")
                .push(ctx.source().partition.expect("lane"));
            Ok(())
        }
    });
    let runner = Runner::builder(Transport(backlog.clone()))
        .with_group("g")
        .with_handler_options(
            "lanes",
            handler,
            HandlerOptions::default()
                .with_concurrency(concurrency)
                .with_policy(RetryPolicy::default().with_tiers([])),
        )
        .build()
        .expect("valid");
    let b = backlog.clone();
    let report = runner
        .run(async move {
            while !b.all_done() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await;
    assert!(report.drained);
    order.lock().expect("lock").clone()
}

#[tokio::test(start_paused = true)]
async fn the_task_that_settles_a_delivery_takes_its_lanes_next_one() {
    let backlog = Backlog::new(1, 1_000);
    let order = run(&backlog, 16).await;
    assert_eq!(order.len(), 1_000);
    assert_eq!(
        backlog.from_stream.load(Ordering::SeqCst),
        1,
        "the stream hands the lane out once"
    );
    assert_eq!(backlog.from_lane.load(Ordering::SeqCst), 999);
}

#[tokio::test(start_paused = true)]
async fn lanes_sharing_one_slot_take_turns() {
    let backlog = Backlog::new(2, 1_000);
    let order = run(&backlog, 1).await;
    assert_eq!(order.len(), 2_000);
    // While both lanes have messages, neither runs more than a turn (64)
    // before the other gets the slot.
    let both = order.len()
        - order
            .iter()
            .rev()
            .take_while(|l| **l == order[order.len() - 1])
            .count();
    let longest = order[..both]
        .chunk_by(|a, b| a == b)
        .map(<[i32]>::len)
        .max()
        .unwrap_or(0);
    assert!(longest <= 64, "one lane ran {longest} messages in a row");
    assert!(
        backlog.from_stream.load(Ordering::SeqCst) >= 2_000 / 64 - 1,
        "the lanes changed hands every turn"
    );
}
