use crate::Backend;
use backstop_core::{
    Context, DeadLetterSource, Message, RetryPolicy, RunReport, Runner, SourceKind, Subscription,
    Transport,
};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One handler invocation, as the handler saw it.
#[derive(Clone, Debug)]
pub struct Call {
    /// `backstop-message-id`.
    pub id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Delay hops before it.
    pub delayed: u32,
    /// Where it came from.
    pub kind: SourceKind,
    /// The broker marked it redelivered.
    pub redelivered: bool,
    /// When (tokio clock).
    pub at: Instant,
}

/// Records every invocation; cheap to clone into handlers.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Recorder {
    /// Records the invocation described by `ctx`; returns its attempt number.
    pub fn record(&self, ctx: &Context) -> u32 {
        let call = Call {
            id: ctx.message_id().to_owned(),
            attempt: ctx.attempt(),
            delayed: ctx.delayed_attempts(),
            kind: ctx.source().kind.clone(),
            redelivered: ctx.source().redelivered,
            at: Instant::now(),
        };
        self.lock().push(call);
        ctx.attempt()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handler taking raw bytes that records each call, then answers with `f`.
    pub fn handler<F>(&self, f: F) -> impl backstop_core::Handler<Payload = bytes::Bytes>
    where
        F: Fn(&Context) -> Result<(), backstop_core::HandlerError> + Send + Sync + 'static,
    {
        let rec = self.clone();
        backstop_core::handler_fn(move |_: bytes::Bytes, ctx: Context| {
            rec.record(&ctx);
            std::future::ready(f(&ctx))
        })
    }

    /// A handler taking raw bytes that records each call, then takes `takes`
    /// (tokio time) and succeeds: slow work, or work stuck past a deadline.
    pub fn slow_handler(
        &self,
        takes: std::time::Duration,
    ) -> impl backstop_core::Handler<Payload = bytes::Bytes> {
        let rec = self.clone();
        backstop_core::handler_fn(move |_: bytes::Bytes, ctx: Context| {
            rec.record(&ctx);
            async move {
                tokio::time::sleep(takes).await;
                Ok(())
            }
        })
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().clone()
    }

    /// Calls for one message id.
    pub fn calls_for(&self, id: &str) -> Vec<Call> {
        self.lock().iter().filter(|c| c.id == id).cloned().collect()
    }

    /// Number of calls.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True before the first call.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Number of distinct message ids seen.
    pub fn distinct(&self) -> usize {
        let mut ids: Vec<_> = self.lock().iter().map(|c| c.id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    }
}

/// A running runner; [`stop`](Self::stop) triggers graceful shutdown.
#[derive(Debug)]
pub struct Running {
    shutdown: oneshot::Sender<()>,
    join: JoinHandle<RunReport>,
}

impl Running {
    /// Triggers shutdown and waits for the report.
    pub async fn stop(self) -> RunReport {
        let _ = self.shutdown.send(());
        self.join.await.expect("runner task panicked")
    }
}

/// Spawns `runner.run` with a shutdown you trigger through [`Running::stop`].
pub fn start<T>(runner: Runner<T>) -> Running
where
    T: Transport,
{
    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(runner.run(async move {
        let _ = rx.await;
    }));
    Running { shutdown: tx, join }
}

/// Polls `cond` every 10 ms (tokio clock) until it holds; panics with `what`
/// after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_every(what, timeout, Duration::from_millis(10), cond).await;
}

/// [`eventually`] with a chosen polling interval, for conditions that are
/// expensive to check (broker metadata, consumer lag).
pub async fn eventually_every<F, Fut>(what: &str, timeout: Duration, every: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Polls `count` every 50 ms (tokio clock) until it is 0. The deadline
/// restarts whenever the count drops below the lowest seen so far: a slow,
/// loaded machine that is still making progress never fails the wait, a
/// stall of `quiet` does, with `what` and the count left.
pub async fn until_zero<F, Fut>(what: &str, quiet: Duration, mut count: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = usize>,
{
    let mut lowest = usize::MAX;
    let mut deadline = Instant::now() + quiet;
    loop {
        let n = count().await;
        if n == 0 {
            return;
        }
        if n < lowest {
            lowest = n;
            deadline = Instant::now() + quiet;
        }
        assert!(
            Instant::now() < deadline,
            "no progress for {quiet:?} waiting for: {what} ({n} left)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `state` every 200 ms until it says done. The deadline restarts
/// whenever what it describes changes: progress never fails the wait, a
/// stall of `quiet` does, naming `what` and the last state.
pub async fn until_settled<F, Fut>(what: &str, quiet: Duration, mut state: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (bool, String)>,
{
    let mut last = String::new();
    let mut deadline = Instant::now() + quiet;
    loop {
        let (done, now) = state().await;
        if done {
            return;
        }
        if now != last {
            last = now;
            deadline = Instant::now() + quiet;
        }
        assert!(
            Instant::now() < deadline,
            "no progress for {quiet:?} waiting for: {what} ({last})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One test's world: a transport, a fresh source, a group and a policy.
#[derive(Debug)]
pub struct Harness<T> {
    /// The transport.
    pub transport: T,
    /// The fresh source.
    pub source: String,
    /// The consumer group.
    pub group: String,
    /// The policy the test's handler uses.
    pub policy: RetryPolicy,
}

impl<T> Harness<T>
where
    T: Transport + DeadLetterSource + Clone,
{
    /// A fresh source on `backend` for `policy`.
    pub async fn new<B: Backend<Transport = T>>(
        backend: &B,
        prefix: &str,
        policy: RetryPolicy,
    ) -> Self {
        let group = format!("{prefix}-group");
        let source = backend.fresh_source(prefix, &group, policy.tiers()).await;
        Self {
            transport: backend.transport().await,
            source,
            group,
            policy,
        }
    }

    /// The subscription the runner will use.
    pub fn subscription(&self) -> Subscription {
        Subscription::new(self.source.clone(), self.group.clone())
            .with_tiers(self.policy.tiers().to_vec())
            .with_prefetch(16)
    }

    /// Publishes to the source; panics when not confirmed.
    pub async fn publish(&self, message: Message) {
        self.transport
            .publish(&self.source, message)
            .await
            .expect("publish confirmed");
    }

    /// The DLQ's name.
    pub fn dlq_name(&self) -> String {
        self.transport.dead_letter_destination(&self.subscription())
    }

    /// Everything in the DLQ (empty while the DLQ does not exist yet: backends
    /// that provision it do so when the runner subscribes).
    pub async fn dlq(&self) -> Vec<Message> {
        match self.transport.browse(&self.dlq_name(), 100_000).await {
            Ok(messages) => messages,
            Err(e) if e.kind() == backstop_core::TransportErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("browse DLQ: {e:?}"),
        }
    }
}

impl<T> Harness<T>
where
    T: Transport + Clone,
{
    /// A runner builder on this harness's transport, group and source.
    pub fn runner<H: backstop_core::Handler>(
        &self,
        handler: H,
        options: backstop_core::HandlerOptions,
    ) -> backstop_core::RunnerBuilder<T> {
        Runner::builder(self.transport.clone())
            .with_group(self.group.clone())
            .with_shutdown_deadline(Duration::from_secs(10))
            .with_handler_options(
                self.source.clone(),
                handler,
                options.with_policy(self.policy.clone()),
            )
    }
}

/// Runs `rabbitmqctl` (stop_app/start_app in broker-outage tests) and returns
/// its stdout; panics with its stderr when it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl is installed with RabbitMQ (it runs the local broker)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::until_zero;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_slow_drain_that_keeps_moving_is_waited_for() {
        // One message every 40 s against a 60 s stall limit: 400 s in all,
        // far past the limit, never a minute without progress.
        let left = AtomicUsize::new(10);
        let started = tokio::time::Instant::now();
        until_zero("drained", Duration::from_secs(60), || async {
            if started.elapsed()
                >= Duration::from_secs(40) * (11 - left.load(Ordering::SeqCst)) as u32
            {
                let _ = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            }
            left.load(Ordering::SeqCst)
        })
        .await;
        assert!(started.elapsed() > Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "no progress for 60s waiting for: drained (3 left)")]
    async fn a_stall_fails_the_wait() {
        until_zero("drained", Duration::from_secs(60), || async { 3 }).await;
    }
}
