//! kill -9 of a worker 20 times at random moments under a 10,000-message
//! mixed stream on RabbitMQ (successes; transient failures that take a
//! 200 ms delay tier once; permanent failures to the DLQ): nothing lost,
//! duplicates counted and reported.
//!
//! The worker is this test binary run again in child mode (the same test,
//! with `BACKSTOP_CRASH_CHILD` set), so a kill is a real SIGKILL of a real
//! process, with its connection and unacked deliveries left to the broker.
//! A handler records a success in an append-only log before it returns, so
//! a kill between the record and the ack shows up as a duplicate, never as
//! a loss.

mod common;

use backstop_core::{
    Context, DeadLetterSource, DelayTier, HandlerError, HandlerOptions, Message, Publisher,
    RetryPolicy, Runner, Subscription, handler_fn,
};
use backstop_rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue, tier_queue};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHILD: &str = "BACKSTOP_CRASH_CHILD";
const TEST: &str = "kill_nine_twenty_times_under_a_mixed_stream_loses_nothing";
const TOTAL: u32 = 10_000;
const KILLS: u32 = 20;

fn tier() -> DelayTier {
    DelayTier::named("crash-200ms", Duration::from_millis(200))
}

fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_immediate_attempts(1)
        .with_tiers([tier()])
}

/// Message `n`: every 20th fails for good, every 10th (else) fails once.
fn kind(n: u32) -> &'static str {
    if n % 20 == 7 {
        "dead"
    } else if n % 10 == 3 {
        "once"
    } else {
        "ok"
    }
}

/// Child mode: a worker on `source` that logs each success to `log`,
/// until killed.
fn child(source: &str, log: PathBuf) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let transport = RabbitTransport::new(RabbitConfig::from_env()).expect("config");
        let file = std::sync::Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("log"),
        ));
        let handler = handler_fn(move |body: String, ctx: Context| {
            let file = file.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(8)).await;
                let (n, k) = body.split_once(':').unwrap_or(("?", "ok"));
                match k {
                    "dead" => return Err(HandlerError::permanent("dead on arrival")),
                    "once" if ctx.delayed_attempts() == 0 => {
                        return Err(HandlerError::transient("once"));
                    }
                    _ => {}
                }
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(f, "{n}");
                Ok(())
            }
        });
        let runner = Runner::builder(transport)
            .with_group("crash")
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
    });
}

fn spawn_child(source: &str, log: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{source}\n{}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the worker")
}

/// A small deterministic generator (no dependency for one test): xorshift.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn kill_nine_twenty_times_under_a_mixed_stream_loses_nothing() {
    if let Ok(spec) = std::env::var(CHILD) {
        let (source, log) = spec.split_once('\n').expect("source and log");
        return child(source, PathBuf::from(log));
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(parent());
}

async fn parent() {
    let backend = common::RabbitBackend::new();
    let transport = RabbitTransport::new(backend.config().clone()).expect("config");
    let source = common::unique("crash");
    let subscription = Subscription {
        source: source.clone(),
        group: "crash".into(),
        tiers: vec![tier()],
        prefetch: 8,
    };
    transport.declare(&subscription).await.expect("declare");
    let log = std::env::temp_dir().join(format!("{source}.log"));
    let _ = std::fs::remove_file(&log);
    for n in 0..TOTAL {
        transport
            .publish(&source, Message::new(format!("{n}:{}", kind(n))))
            .await
            .expect("publish");
    }
    let mut rng = Rng(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(88_172_645_463_325_252, |d| d.as_nanos() as u64)
        | 1);
    let pending = || async {
        let mut n = transport
            .ready_count(&source)
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
        n += transport
            .ready_count(&tier_queue(&source, &tier()))
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
        n
    };
    let mut killed_mid_stream = 0;
    for _ in 0..KILLS {
        let mut worker = spawn_child(&source, &log);
        std::thread::sleep(Duration::from_millis(300 + rng.below(1_200)));
        if pending().await > 0 {
            killed_mid_stream += 1;
        }
        worker.kill().expect("kill -9");
        let _ = worker.wait();
    }
    // The last worker runs until everything is handled or dead-lettered.
    let mut worker = spawn_child(&source, &log);
    let dlq = dlq_queue(&source);
    let expected_dead = (0..TOTAL).filter(|n| kind(*n) == "dead").count();
    let started = Instant::now();
    let mut last = (usize::MAX, u32::MAX);
    let mut progress = Instant::now();
    loop {
        let dead = transport
            .ready_count(&dlq)
            .await
            .ok()
            .flatten()
            .unwrap_or(0) as usize;
        let left = pending().await;
        if left == 0
            && dead >= expected_dead
            && handled(&log).len() == (TOTAL as usize - expected_dead)
        {
            break;
        }
        if (dead, left) != last {
            last = (dead, left);
            progress = Instant::now();
        }
        assert!(
            progress.elapsed() < Duration::from_secs(60),
            "no progress for 60 s: {left} waiting, {dead} dead-lettered, {} handled",
            handled(&log).len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.kill().expect("kill");
    let _ = worker.wait();

    let counts = handled(&log);
    let dead: Vec<Message> = transport.browse(&dlq, 100_000).await.expect("DLQ");
    let mut dead_counts: HashMap<String, u32> = HashMap::new();
    for m in &dead {
        let body = String::from_utf8_lossy(m.payload()).into_owned();
        *dead_counts.entry(body).or_default() += 1;
    }
    let mut lost = Vec::new();
    for n in 0..TOTAL {
        let found = match kind(n) {
            "dead" => dead_counts.contains_key(&format!("{n}:dead")),
            _ => counts.contains_key(&n.to_string()),
        };
        if !found {
            lost.push(n);
        }
    }
    let duplicates: u32 = counts.values().map(|c| c - 1).sum::<u32>()
        + dead_counts.values().map(|c| c - 1).sum::<u32>();
    eprintln!(
        "crash test (RabbitMQ): {TOTAL} messages, {KILLS} kill -9 ({killed_mid_stream} with work \
         waiting), {} handled, {} dead-lettered, {duplicates} duplicates, {} lost, {:?} after the kills",
        counts.len(),
        dead.len(),
        lost.len(),
        started.elapsed()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(
        killed_mid_stream >= KILLS / 2,
        "the kills landed mid-stream"
    );
    for q in [source.clone(), dlq, tier_queue(&source, &tier())] {
        let _ = transport.delete_queue(&q).await;
    }
    let _ = std::fs::remove_file(&log);
}

/// How often each message was logged as handled.
fn handled(log: &std::path::Path) -> HashMap<String, u32> {
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
    counts
}
