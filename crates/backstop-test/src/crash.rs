//! kill -9 tests: a worker that is the test binary itself run again in
//! child mode, a 10,000-message mixed stream, and the reconciliation of what
//! was handled and dead-lettered against what was sent.
//!
//! A test calls [`child_spec`] first: in the child it runs [`run_worker`]
//! until killed; in the parent it publishes [`body`]`(0..TOTAL)`, starts
//! and kills workers with [`spawn_child`], and checks [`reconcile`]. The
//! worker's handler records a success in an append-only log before it
//! returns, so a kill between the record and the ack shows up as a
//! duplicate, never as a loss.

use backstop_core::{
    Context, DelayTier, HandlerError, HandlerOptions, Message, RetryPolicy, Runner, Transport,
    handler_fn,
};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Set in the child: `<source>\n<log path>`.
pub const CHILD_ENV: &str = "BACKSTOP_CRASH_CHILD";
/// Messages in the stream.
pub const TOTAL: u32 = 10_000;
/// Workers killed.
pub const KILLS: u32 = 20;
/// The workers' consumer group.
pub const GROUP: &str = "crash";

/// The stream's one delay tier.
pub fn tier() -> DelayTier {
    DelayTier::named("crash-200ms", Duration::from_millis(200))
}

/// One attempt in process, then the tier, then the DLQ.
pub fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_immediate_attempts(1)
        .with_tiers([tier()])
}

/// Message `n`'s fate: every 20th fails for good, every 10th (else) fails
/// once and takes the tier, the rest succeed.
pub fn kind(n: u32) -> &'static str {
    if n % 20 == 7 {
        "dead"
    } else if n % 10 == 3 {
        "once"
    } else {
        "ok"
    }
}

/// Message `n`'s payload.
pub fn body(n: u32) -> String {
    format!("{n}:{}", kind(n))
}

/// Messages of the stream that end in the DLQ.
pub fn expected_dead() -> usize {
    (0..TOTAL).filter(|n| kind(*n) == "dead").count()
}

/// A crash test's body: on a two-thread runtime, the worker on the
/// transport `connect` makes when this process is a child, else `parent`.
pub fn main<T, P, PF>(connect: impl FnOnce() -> T, parent: P)
where
    T: Transport + Clone,
    P: FnOnce() -> PF,
    PF: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match child_spec() {
        Some((source, log)) => rt.block_on(run_worker(connect(), &source, &log)),
        None => rt.block_on(parent()),
    }
}

/// In the child: its source and log.
pub fn child_spec() -> Option<(String, PathBuf)> {
    let spec = std::env::var(CHILD_ENV).ok()?;
    let (source, log) = spec.split_once('\n')?;
    Some((source.to_owned(), PathBuf::from(log)))
}

/// The child's worker on `transport`: handles `source` (8 at a time, 15 ms
/// each) and logs each success to `log`, until the process is killed.
pub async fn run_worker<T>(transport: T, source: &str, log: &Path)
where
    T: Transport + Clone,
{
    let file = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("the crash test's log"),
    ));
    let handler = handler_fn(move |body: String, ctx: Context| {
        let file = file.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(15)).await;
            let (n, k) = body.split_once(':').unwrap_or(("?", "ok"));
            match k {
                "dead" => return Err(HandlerError::permanent("dead on arrival")),
                "once" if ctx.delayed_attempts() == 0 => {
                    return Err(HandlerError::transient("once"));
                }
                _ => {}
            }
            // One write call per line: a kill lands before or after it,
            // never inside a line (`writeln!` may write in pieces).
            let line = format!("{n}\n");
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(line.as_bytes()).expect("the crash test's log");
            Ok(())
        }
    });
    let runner = Runner::builder(transport)
        .with_group(GROUP)
        .with_handler_options(
            source,
            handler,
            HandlerOptions::default()
                .with_concurrency(8)
                .with_policy(policy()),
        )
        .build()
        .expect("valid");
    runner.run(std::future::pending::<()>()).await;
}

/// Starts the worker: this test binary again, running only `test`, in
/// child mode.
/// Its standard error goes to `<log>.<n>.stderr` when `BACKSTOP_CRASH_LOGS`
/// is set (with `RUST_LOG`, to see what a worker did), else nowhere.
pub fn spawn_child(test: &str, source: &str, log: &Path) -> Child {
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stderr = if std::env::var_os("BACKSTOP_CRASH_LOGS").is_some() {
        std::fs::File::create(format!("{}.{n}.stderr", log.display()))
            .map_or(Stdio::null(), Stdio::from)
    } else {
        Stdio::null()
    };
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{source}\n{}", log.display()))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn the worker")
}

/// kill -9, and reaped.
pub fn kill(mut worker: Child) {
    worker.kill().expect("kill -9");
    let _ = worker.wait();
}

/// A small generator for the kills' moments (xorshift, seeded by the
/// clock): no dependency for one test.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded by the clock.
    pub fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(88_172_645_463_325_252, |d| {
                u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(1)
            });
        Self(t | 1)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// How often each message was logged as handled, by number.
pub fn handled(log: &Path) -> HashMap<String, u32> {
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
    counts
}

/// What a crash run did, against what was sent.
#[derive(Debug)]
pub struct Reconciled {
    /// Messages neither handled nor dead-lettered as they should be.
    pub lost: Vec<u32>,
    /// Handlings and dead letters past the first of each message.
    pub duplicates: u32,
    /// Messages handled (distinct).
    pub handled: usize,
    /// Dead letters (all copies).
    pub dead: usize,
}

/// Reconciles the log and the DLQ's letters with the stream.
pub fn reconcile(log: &Path, dead: &[Message]) -> Reconciled {
    let counts = handled(log);
    let mut dead_counts: HashMap<String, u32> = HashMap::new();
    for m in dead {
        let body = String::from_utf8_lossy(m.payload()).into_owned();
        *dead_counts.entry(body).or_default() += 1;
    }
    let lost = (0..TOTAL)
        .filter(|n| match kind(*n) {
            "dead" => !dead_counts.contains_key(&body(*n)),
            _ => !counts.contains_key(&n.to_string()),
        })
        .collect();
    let duplicates = counts.values().map(|c| c - 1).sum::<u32>()
        + dead_counts.values().map(|c| c - 1).sum::<u32>();
    Reconciled {
        lost,
        duplicates,
        handled: counts.len(),
        dead: dead.len(),
    }
}

/// Waits until the stream is done: nothing `waiting`, every success logged
/// and at least every failure `dead-lettered` (`read` gives both). Fails
/// when nothing moves for `stall`; the wait restarts on any progress.
pub async fn until_drained<F, Fut>(log: &Path, stall: Duration, mut read: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (usize, usize)>,
{
    let want_handled = TOTAL as usize - expected_dead();
    let (mut last, mut progress) = ((0, 0, 0), std::time::Instant::now());
    loop {
        let (dead, waiting) = read().await;
        let now = (dead, waiting, handled(log).len());
        if waiting == 0 && dead >= expected_dead() && now.2 == want_handled {
            return;
        }
        if now != last {
            (last, progress) = (now, std::time::Instant::now());
        }
        assert!(
            progress.elapsed() < stall,
            "no progress for {stall:?}: (dead-lettered, waiting, handled) = {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints the run's figures (for the notes) and fails on any loss, or when
/// fewer than half the kills found work waiting.
pub fn report(broker: &str, mid_stream: u32, r: &Reconciled, drained: Duration) {
    eprintln!(
        "crash test ({broker}): {TOTAL} messages, {KILLS} kill -9 ({mid_stream} with work \
         waiting), {} handled, {} dead-lettered, {} duplicates, {} lost; drained {drained:?} \
         after the kills",
        r.handled,
        r.dead,
        r.duplicates,
        r.lost.len(),
    );
    assert!(r.lost.is_empty(), "lost: {:?}", r.lost);
    assert!(mid_stream >= KILLS / 2, "the kills landed mid-stream");
}
