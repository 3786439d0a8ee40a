//! One loop per source: the intake gate (in-flight slots, circuit
//! breaker, rate limit, pausing the stream on a long wait), the stream,
//! and a task per message that goes on with its lane's next one.

use super::ctx::Ctx;
use super::held::Held;
use super::intake::{Bucket, Gate, Slot};
use super::{Route, Shared, health, process};
use crate::circuit::CircuitState;
use crate::delivered::Delivered;
use crate::observability::RouteMetrics;
use crate::retry::Backoff;
use crate::runner::{Priority, RunnerStats};
use crate::transport::{Delivery, DeliveryStream, Transport, TransportError};
use futures_util::FutureExt as _;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(super) struct SourceLoop<T> {
    pub(super) shared: Arc<Shared<T>>,
    /// Copies of this source on their way to a tier or the DLQ, out of
    /// `routing_slots`.
    pub(super) routing: Arc<Semaphore>,
    pub(super) routing_slots: usize,
    pub(super) route: Arc<Route>,
    pub(super) metrics: Arc<RouteMetrics>,
    pub(super) global: Arc<Gate>,
    pub(super) intake: CancellationToken,
    pub(super) hard: CancellationToken,
    pub(super) tracker: TaskTracker,
    pub(super) resubscribe_backoff: Backoff,
    /// The runner's shutdown deadline: bounds the stream's close.
    pub(super) shutdown_deadline: Duration,
}

/// After this long without a free in-flight slot, the stream is paused (and
/// resumed when a slot frees). Pausing at once for every short wait would
/// make Kafka drop and refetch its prefetched data all the time.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Copies on their way to a tier or the DLQ per in-flight slot of a source:
/// they no longer hold a slot (see `process::route_off`), but stay bounded.
const ROUTING_PER_SLOT: usize = 4;

pub(super) fn routing_slots(concurrency: usize) -> usize {
    concurrency.saturating_mul(ROUTING_PER_SLOT).max(64)
}

/// The least time a source gives its stream to close at the end (it gives
/// what is left of the shutdown deadline when that is more).
pub(super) const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// How many messages of one lane a task handles before it lets another
/// lane have its slot (when the source has no free slot).
const LANE_TURN: u32 = 64;

/// The ticks of a waiting source loop's heartbeat.
fn beats() -> tokio::time::Interval {
    let mut beat =
        tokio::time::interval_at(tokio::time::Instant::now() + health::BEAT, health::BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat
}

/// What waiting for the next intake slot ended with.
#[expect(
    clippy::large_enum_variant,
    reason = "one short-lived value per intake step, moved once"
)]
enum Gated {
    /// Take the next message with these slots (and this one, if the stream
    /// handed it out while paused).
    Go(
        (OwnedSemaphorePermit, Slot),
        Option<Delivery>,
        Option<crate::circuit::Permit>,
    ),
    /// Shutting down.
    Stop,
    /// The stream failed or ended while paused.
    Lost(Option<TransportError>),
}

impl<T> SourceLoop<T>
where
    T: Transport,
{
    /// Waits until this source may take a message: a slot of its own and one
    /// of the runner's, the circuit breaker letting intake through, and the
    /// rate limit. A long wait pauses the stream, which stays serviced.
    async fn gate(
        &self,
        local: &Arc<Semaphore>,
        bucket: &mut Option<Bucket>,
        stream: &mut T::Stream,
        beat: &mut tokio::time::Interval,
    ) -> Gated {
        let route = &self.route;
        let ready = async {
            // Nothing closes this semaphore; were it closed, intake would
            // wait here for the shutdown instead of panicking.
            let Ok(l) = local.clone().acquire_owned().await else {
                return std::future::pending().await;
            };
            let g = self.global.acquire(route.priority).await;
            let mut probe = None;
            if let Some(c) = &route.circuits {
                c.intake_ready().await;
                // Half-open: intake takes the probe slot itself, so one
                // probe (not a prefetch window of messages) comes in.
                if c.state() == CircuitState::HalfOpen {
                    probe = Some(c.permit().await);
                }
            }
            if let Some(b) = bucket.as_mut() {
                b.take().await;
            }
            ((l, g), probe)
        };
        tokio::pin!(ready);
        let pause_after = match &route.circuits {
            Some(c) if c.state() != CircuitState::Closed => Duration::ZERO,
            _ => PAUSE_AFTER,
        };
        let pausing = tokio::time::sleep(pause_after);
        tokio::pin!(pausing);
        let mut paused = false;
        let mut held: Option<Delivery> = None;
        let gated = loop {
            tokio::select! {
                biased;
                () = self.intake.cancelled() => break Gated::Stop,
                (slots, probe) = &mut ready => break Gated::Go(slots, held.take(), probe),
                _ = beat.tick() => route.pulse.beat(),
                () = &mut pausing, if !paused => {
                    paused = true;
                    stream.pause();
                }
                next = stream.next_delivery(), if paused && held.is_none() => match next {
                    Some(Ok(d)) => held = Some(d),
                    Some(Err(e)) => break Gated::Lost(Some(e)),
                    None => break Gated::Lost(None),
                },
            }
        };
        if paused {
            stream.resume();
        }
        gated
    }

    fn dispatch(
        &self,
        slots: (OwnedSemaphorePermit, Slot),
        delivery: Delivery,
        probe: Option<crate::circuit::Permit>,
    ) {
        let ctx = Ctx {
            shared: self.shared.clone(),
            route: self.route.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.intake.clone(),
            system: self.shared.transport.system(),
            tracker: self.tracker.clone(),
            hard: self.hard.clone(),
            routing: self.routing.clone(),
        };
        let hard = self.hard.clone();
        let abandoning = self.shared.abandoning.clone();
        let stats = self.shared.stats.clone();
        let yields = (self.route.priority == Priority::Low).then(|| self.global.clone());
        self.tracker.spawn(async move {
            // Held whole until the task ends (a field used alone below would
            // otherwise be all the block keeps).
            let held = slots;
            let (mut next, mut probe) = (Some(delivery), probe);
            // A lane (Kafka partition) goes on in this task while it has a
            // message that may go: no hand-over per message. Every
            // `LANE_TURN` messages it gives its slot up if the source has
            // none left, so other partitions get their turn.
            let mut run = 0u32;
            // One wait for the whole task, not one per message.
            let abandon = hard.cancelled();
            tokio::pin!(abandon);
            while let Some(mut delivery) = next.take() {
                let lane = delivery.take_lane();
                let (message, source, mut settlement) = delivery.into_parts();
                // Dropped at the shutdown deadline: left to the broker, as
                // documented; dropped otherwise (a panic): given back.
                settlement.leave_unsettled_when(abandoning.clone());
                let d = Arc::new(Delivered::new(message, source));
                // Everything after intake runs under one panic guard: a
                // panic gives the message back (its settlement nacks as it
                // is dropped) and is remembered, the lane goes on.
                // Pinned where it is made: the future is kilobytes, and
                // `select!` would otherwise move it once more per message.
                let processed = std::pin::pin!(
                    AssertUnwindSafe(process::process(&ctx, d.clone(), settlement, probe.take()))
                        .catch_unwind()
                );
                // The message first: one that settles on its first poll never
                // polls the hard stop (a lock each time).
                tokio::select! {
                    biased;
                    done = processed => {
                        if let Err(payload) = done {
                            process::panicked(&ctx, d.id(), "outside the handler", payload.as_ref());
                        }
                    }
                    () = &mut abandon => {
                        RunnerStats::bump(&stats.abandoned);
                        return;
                    }
                }
                let Some(lane) = lane else { return };
                run = run.wrapping_add(1);
                let turn_over =
                    run.is_multiple_of(LANE_TURN) && held.0.semaphore().available_permits() == 0;
                if ctx.may_go_on()
                    && !turn_over
                    && !yields.as_ref().is_some_and(|g| g.normal_waiting())
                {
                    next = lane.next();
                } else {
                    drop(lane); // leaves it to the stream
                }
            }
        });
    }
}

pub(super) async fn source_loop<T>(s: SourceLoop<T>)
where
    T: Transport,
{
    let local = Arc::new(Semaphore::new(s.route.concurrency));
    let mut bucket = s.route.rate_limit.map(Bucket::new);
    let mut failures = 0u32;
    // One heartbeat for the loop's life: every wait below ticks it.
    let mut beat = beats();
    while let Some(mut stream) = s.subscribe(failures, &mut beat).await {
        match s
            .intake(&local, &mut bucket, &mut stream, &mut beat, &mut failures)
            .await
        {
            Ended::Lost => failures = failures.saturating_add(1),
            Ended::Stopped => {
                s.close(&local, stream).await;
                break;
            }
        }
    }
}

/// Why intake from one stream ended.
enum Ended {
    /// Shutting down: the stream is to be closed once in-flight work is done.
    Stopped,
    /// The stream failed or ended: subscribe again.
    Lost,
}

impl<T> SourceLoop<T>
where
    T: Transport,
{
    /// A stream of the source, after a backoff when the last one was lost
    /// (`failures` in a row); `None` when shutdown came first.
    async fn subscribe(
        &self,
        mut failures: u32,
        beat: &mut tokio::time::Interval,
    ) -> Option<T::Stream> {
        let source = &self.route.subscription.source;
        loop {
            if self.intake.is_cancelled() {
                return None;
            }
            if failures > 0 {
                // Lost (or never got) the stream: not ready until subscribed again.
                self.route.pulse.subscribed(false);
                let wait = tokio::time::sleep(self.resubscribe_backoff.delay(failures));
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        () = self.intake.cancelled() => return None,
                        () = &mut wait => break,
                        _ = beat.tick() => self.route.pulse.beat(),
                    }
                }
            }
            let subscribed = tokio::select! {
                () = self.intake.cancelled() => return None,
                r = self.shared.transport.subscribe(&self.route.subscription) => r,
            };
            match subscribed {
                Ok(stream) => {
                    self.route.pulse.subscribed(true);
                    return Some(stream);
                }
                Err(error) => {
                    self.route.pulse.subscribed(false);
                    failures = failures.saturating_add(1);
                    tracing::warn!(%source, %error, failures, "subscribe failed; retrying with backoff");
                }
            }
        }
    }

    /// Takes messages from `stream`, each once it has its slots, until
    /// shutdown or the stream is lost. `failures` starts again at a
    /// delivery.
    async fn intake(
        &self,
        local: &Arc<Semaphore>,
        bucket: &mut Option<Bucket>,
        stream: &mut T::Stream,
        beat: &mut tokio::time::Interval,
        failures: &mut u32,
    ) -> Ended {
        let source = &self.route.subscription.source;
        loop {
            // Bounded in-flight: take the slots before pulling, so a full runner
            // stops fetching instead of buffering.
            let (slots, probe) = match self.gate(local, bucket, stream, beat).await {
                Gated::Stop => return Ended::Stopped,
                Gated::Go(slots, Some(held), probe) => {
                    self.dispatch(slots, held, probe);
                    continue;
                }
                Gated::Go(slots, None, probe) => (slots, probe),
                Gated::Lost(error) => {
                    tracing::warn!(%source, error = ?error.map(|e| e.to_string()), "delivery stream lost while paused; resubscribing");
                    return Ended::Lost;
                }
            };
            // Armed only when closed now: half-open intake (a probe) waits
            // for its message like any other.
            let tripped = async {
                match &self.route.circuits {
                    Some(c) if c.state() == CircuitState::Closed => c.tripped().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::pin!(tripped);
            let next = loop {
                tokio::select! {
                    () = self.intake.cancelled() => return Ended::Stopped,
                    n = stream.next_delivery() => break Some(n),
                    // Waiting for a message is progress: prove it to /healthz.
                    _ = beat.tick() => self.route.pulse.beat(),
                    // The breaker opened while we waited for a message: give
                    // the slots (and the probe) back and let the gate pause
                    // the stream.
                    () = &mut tripped => break None,
                }
            };
            let Some(next) = next else {
                drop(Held::new(self.route.circuits.as_ref(), probe));
                continue;
            };
            self.route.pulse.beat();
            match next {
                Some(Ok(delivery)) => {
                    *failures = 0;
                    self.dispatch(slots, delivery, probe);
                }
                Some(Err(error)) => {
                    tracing::warn!(%source, %error, "delivery stream failed; resubscribing");
                    return Ended::Lost;
                }
                None => {
                    tracing::warn!(%source, "delivery stream ended; resubscribing");
                    return Ended::Lost;
                }
            }
        }
    }

    /// Intake stopped: keeps the stream (and so the backend's
    /// consumer/channel) alive until this source's in-flight messages are
    /// settled, copies on their way included (their originals are acked on
    /// it), then closes it.
    async fn close(&self, local: &Arc<Semaphore>, stream: T::Stream) {
        let stopped = tokio::time::Instant::now();
        let all = u32::try_from(self.route.concurrency).unwrap_or(u32::MAX);
        let routing = u32::try_from(self.routing_slots).unwrap_or(u32::MAX);
        tokio::select! {
            () = self.hard.cancelled() => {}
            () = async {
                let _ = local.acquire_many(all).await;
                let _ = self.routing.acquire_many(routing).await;
            } => {}
        }
        // Settlements that travel on the stream's connection reach the
        // broker before the stream goes: the close may take what is left of
        // the shutdown deadline (a busy broker answers a channel close
        // late, and a process that exits before the answer can lose acks
        // the broker had not read yet), and at least `CLOSE_DEADLINE`.
        let close_within = self
            .shutdown_deadline
            .saturating_sub(stopped.elapsed())
            .max(CLOSE_DEADLINE);
        if tokio::time::timeout(close_within, stream.close())
            .await
            .is_err()
        {
            let source = &self.route.subscription.source;
            tracing::warn!(%source, waited = ?close_within, "closing the delivery stream took too long");
        }
    }
}
