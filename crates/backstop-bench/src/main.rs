//! # backstop-bench
//!
//! Raw broker clients and Backstop's `Runner` side by side, in one run, each
//! consumer in a child process of its own (this binary re-executed with the
//! hidden `child <json-spec>` subcommand; the child prints one JSON line).
//!
//! ```text
//! cargo run --release -p backstop-bench -- [SCENARIO...] [--runs N] [--messages N] [--json FILE]
//! ```
//!
//! No scenario = all but the backlogs. `--runs` (default 3) runs per (scenario, contender);
//! `--messages` overrides every scenario's count; `--json FILE` also writes
//! the summary lines there. Prints min / median / max msg/s per (scenario,
//! contender), then a table (ratio = median / raw median, peak RSS = the
//! child's `VmHWM`, allocs/msg = Rust heap allocations inside the timed
//! window / messages; librdkafka's and other C allocations are not counted)
//! and one JSON line per (scenario, contender). Exits non-zero if any run is
//! not correct.
//!
//! ## Timing
//! Every consumer's clock starts at its first message (raw: the first record
//! or delivery received; Backstop: the first handler call), so connecting and
//! the consumer-group join (about 3 s on the mock cluster) are outside the
//! window for both, and stops when the last message is settled (raw: stored /
//! acked; Backstop: counted `ok` or `dead_lettered`, polled every 1 ms).
//! rate = (messages - 1) / window.
//!
//! ## Contenders
//! - `raw rdkafka`: `StreamConsumer`, `enable.auto.commit=true` every 1 s,
//!   `enable.auto.offset.store=false`, `recv()` then
//!   `store_offset_from_message` for every record; a synchronous commit after
//!   the window.
//! - `raw lapin`: the same quorum queue type and prefetch (64) as Backstop's
//!   default, manual acks pipelined (ack futures polled alongside the next
//!   deliveries, never awaited one by one).
//! - `backstop`: `Runner::builder(transport)` with default options; only the
//!   scenario's retry policy is set (no raised max in flight or concurrency).
//! - `backstop pc=64` (Kafka S1 only): the same on
//!   `KafkaConfig::with_partition_concurrency(64)`.
//!
//! Raw contenders decode the JSON in S1 (like Backstop's `Json` handler) and
//! run the no-op loop elsewhere: in S2/S3 they are the reference cost per
//! message on the same data, not a retrying consumer.
//!
//! ## Scenarios
//! - `noop-mock` (50,000), `noop-tansu` (20,000), `noop-rabbitmq` (20,000):
//!   200-byte messages, a handler that does nothing (it reads the id for the
//!   exactly-once check). Kafka topics have 4 partitions. On the mock
//!   cluster each child starts its own in-process cluster (it is `!Send` and
//!   in-process) and fills it the same way before consuming.
//! - `s1-mock` (20,000: the mock cluster stops serving a partition after
//!   about 24,000 such records, raw client included), `s1-tansu` (20,000,
//!   see below), `s1-rabbitmq` (50,000): JSON messages of 200 bytes (`{"id":i,"pad":"..."}`), all
//!   succeed. On one Kafka partition every record is usually fetched before
//!   the first is handled, so S1 on Kafka measures the cost per message of
//!   the consumer itself, not the broker's.
//! - `s2-tansu`, `s2-rabbitmq` (and `s2-tier-mock`, `s3-tier-mock`: the
//!   tier variants on the mock cluster, where the broker's speed does not
//!   hide Backstop's): 10,000; ids with `i % 100 < 10` fail
//!   (transient) on their first two attempts; in-process retries after up to
//!   10, 20, 40 ms (full jitter). `s2-tier-*`: no in-process retry, failures
//!   go to 200 ms delay tiers at once.
//! - `s3-tansu`, `s3-rabbitmq`, `s3-tier-*`: 10,000; `i % 100 < 5` always
//!   fail and are dead-lettered after three retries (in process, or through
//!   three 200 ms tiers: the policy needs one tier per hop).
//!
//! S1-S3 Kafka topics have one partition. Topics and queues are new for every
//! run (`<scenario>-<millis>-<pid>-<run>`). Kafka topics are created with
//! rdkafka's `AdminClient` (tansu does not auto-create; the mock cluster gets
//! `MockCluster::create_topic`) and filled with PLAIN records from a raw
//! `FutureProducer` (no idempotence, no headers: tansu 0.6's sqlite storage
//! stalls otherwise), acks=all, key `k<i % 64>`; tansu topics are left in
//! place (deleting topics has broken tansu here). All contenders of a run read
//! the same topic, each in its own consumer group. Against tansu and the
//! mock cluster both sides use `fetch.wait.max.ms=20`: both brokers hold a
//! fetch for that long instead of answering when new records arrive (on
//! the mock, S2 through tiers took 1.1 s at librdkafka's 500 ms, 0.54 s at
//! 20 ms; Apache Kafka answers at once). RabbitMQ queues are filled per contender
//! (persistent, confirmed) right before it runs and deleted after.
//!
//! ## Correctness (`correct` or the reasons)
//! Each id handled successfully exactly once (S3's failing ids never); S3:
//! the DLQ (`<group>.<topic>.dlq`, `<queue>.dlq`) read back holds exactly the
//! failing ids, other scenarios leave it empty; Kafka: the group's committed
//! offsets at the end of every partition after the run; RabbitMQ: the queue
//! (and tier queues) empty afterwards.
//!
//! - `outbox-rabbitmq` (20,000): publishing, not consuming. Raw: lapin with
//!   publisher confirms, 256 publishes on their way at once (each send not
//!   awaited before the next starts, as the relay does not either). Backstop:
//!   `OutboxPublisher` (durable: every accepted send fsynced) with 256
//!   concurrent senders, its relay publishing meanwhile. Both rates are end
//!   to end (first send to the broker's last confirm); Backstop's durable
//!   send rate and send latency p50/p99 are in its `stats`. Correct: the
//!   queue holds exactly the messages sent.
//! - `backlog-tansu`, `backlog-rabbitmq`: 1,000,000 no-op messages waiting
//!   in the broker before the consumer starts (4 partitions on tansu): the
//!   drain rate and, above all, peak RSS against the raw client's (the goal:
//!   at most 1.5 times raw and under 100 MiB). They take minutes a run: name
//!   them with `--runs 1` to measure them alone.
//!
//! Known limit: on tansu 0.6 sqlite, a one-partition topic of 50,000 such
//! records stalled here in most tries (every consumer, raw included, at
//! record 25,846; the broker then stays slow), so `s1-tansu` reads 20,000.
//!
//! Brokers: tansu at `BACKSTOP_KAFKA_BROKERS` (default 127.0.0.1:19092,
//! `./scripts/tansu.sh start`), RabbitMQ at `BACKSTOP_AMQP_URL` (default
//! guest@127.0.0.1:5672). A missing broker fails its scenarios with how to
//! start it.

mod alloc;
mod backstop;
mod kafka;
mod measure;
mod outbox;
mod rabbit;
mod report;
mod scenario;

use anyhow::{Context as _, anyhow, bail, ensure};
use clap::Parser;
use measure::RunResult;
use report::{Series, Summary};
use scenario::{Broker, Contender, SCENARIOS, Scenario, Spec};
use std::io::Write as _;
use std::process::{ExitCode, Stdio};

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

#[derive(Parser, Debug)]
#[command(about = "Raw broker clients against Backstop, each consumer in its own process")]
struct Cli {
    /// Scenarios to run (default: all).
    scenarios: Vec<String>,
    /// Runs per scenario and contender.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Messages per run, overriding every scenario's count.
    #[arg(long)]
    messages: Option<u64>,
    /// Also write the JSON summary lines to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        return child(args.get(2).map(String::as_str));
    }
    let cli = Cli::parse();
    let result = runtime()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(parent(&cli)));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------- the child

/// Runs one spec and prints its result line; exits without dropping clients
/// (closing rdkafka consumers can block for many seconds).
fn child(spec: Option<&str>) -> ExitCode {
    // Warnings of Backstop and the clients reach the parent's output
    // (RUST_LOG overrides the level).
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    let run = || -> anyhow::Result<RunResult> {
        let spec: Spec = serde_json::from_str(spec.ok_or_else(|| anyhow!("child needs a spec"))?)
            .context("child spec")?;
        let scenario = scenario::find(&spec.scenario)
            .ok_or_else(|| anyhow!("unknown scenario {}", spec.scenario))?;
        runtime()?.block_on(async {
            match scenario.broker {
                Broker::Mock | Broker::Tansu => kafka::run_child(&scenario, &spec).await,
                Broker::Rabbitmq => rabbit::run_child(&scenario, &spec).await,
            }
        })
    };
    let code = match run().and_then(|r| Ok(serde_json::to_string(&r)?)) {
        Ok(line) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            0
        }
        Err(e) => {
            eprintln!("child error: {e:#}");
            1
        }
    };
    std::process::exit(code)
}

// ---------------------------------------------------------------- the parent

/// Runs the child for `spec` and reads its result line.
async fn spawn_child(spec: &Spec) -> anyhow::Result<RunResult> {
    // `/proc/self/exe` still names this very build when a newer one has
    // replaced the file meanwhile (a workspace build): every child runs the
    // code the parent started with.
    let exe = match std::path::Path::new("/proc/self/exe") {
        p if p.exists() => p.to_path_buf(),
        _ => std::env::current_exe().context("path of this binary")?,
    };
    let out = tokio::process::Command::new(exe)
        .arg("child")
        .arg(serde_json::to_string(spec)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .context("run the child")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        eprintln!("    | {line}");
    }
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("the child failed ({}): {}", out.status, tail.join(" / "));
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow!("the child printed no result: {stdout:?}"))?;
    serde_json::from_str(line).context("the child's result")
}

async fn ensure_broker(broker: Broker) -> anyhow::Result<()> {
    match broker {
        Broker::Mock => Ok(()),
        Broker::Tansu => kafka::ensure_reachable(),
        Broker::Rabbitmq => rabbit::ensure_reachable().await,
    }
}

/// One run of every contender of `scenario`; the order alternates between
/// runs so neither side always goes first.
async fn one_run(scenario: &Scenario, n: u64, run: usize, series: &mut [Series]) {
    let base = scenario::unique(scenario.name, run);
    if scenario.broker == Broker::Tansu {
        let brokers = kafka::brokers();
        let prepared = async {
            kafka::create_topic(&brokers, &base, scenario.partitions).await?;
            kafka::fill(&brokers, &base, n).await
        }
        .await;
        if let Err(e) = prepared {
            for s in series.iter_mut() {
                s.runs.push(Err(format!("prepare topic {base}: {e:#}")));
            }
            return;
        }
    }
    let mut order: Vec<usize> = (0..series.len()).collect();
    if run.is_multiple_of(2) {
        order.reverse();
    }
    for i in order {
        let contender = series[i].contender;
        let spec = Spec {
            scenario: scenario.name.to_owned(),
            contender,
            messages: n,
            source: match scenario.broker {
                Broker::Rabbitmq => format!("{base}.{}", contender.tag()),
                _ => base.clone(),
            },
            group: format!("{}.{base}", contender.tag()),
        };
        eprintln!(
            "==> {} run {run}: {}",
            scenario.name,
            contender.label(scenario.broker)
        );
        let result = if scenario.broker == Broker::Rabbitmq {
            let r = match rabbit::prepare(scenario, contender, &spec.source, n).await {
                Ok(()) => spawn_child(&spec).await,
                Err(e) => Err(e.context("prepare the queue")),
            };
            rabbit::cleanup(scenario, &spec.source).await;
            r
        } else {
            spawn_child(&spec).await
        };
        match &result {
            Ok(r) => eprintln!(
                "    {:.0} msg/s over {:.2} s, {:.1} allocs/msg, peak RSS {:.1} MiB, {}",
                r.rate, r.seconds, r.allocs_per_msg, r.peak_rss_mib, r.correct
            ),
            Err(e) => eprintln!("    failed: {e:#}"),
        }
        series[i].runs.push(result.map_err(|e| format!("{e:#}")));
    }
}

async fn parent(cli: &Cli) -> anyhow::Result<bool> {
    ensure!(cli.runs > 0, "--runs must be at least 1");
    ensure!(cli.messages != Some(0), "--messages must be at least 1");
    let mut summaries: Vec<Summary> = Vec::new();
    for scenario in &selected(cli)? {
        summaries.extend(run_scenario(cli, scenario).await);
    }
    println!();
    print!("{}", report::table(&summaries));
    let lines: Vec<String> = summaries
        .iter()
        .map(|s| report::json_line(s).to_string())
        .collect();
    for l in &lines {
        println!("{l}");
    }
    if let Some(path) = &cli.json {
        std::fs::write(path, lines.join("\n") + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    if summaries.is_empty() {
        bail!("nothing ran");
    }
    Ok(summaries.iter().all(Summary::is_correct))
}

/// The scenarios named on the command line, or all but the backlogs.
fn selected(cli: &Cli) -> anyhow::Result<Vec<Scenario>> {
    if cli.scenarios.is_empty() {
        // The backlogs take minutes a run: only when named.
        return Ok(SCENARIOS
            .iter()
            .copied()
            .filter(|s| !s.name.starts_with("backlog-"))
            .collect());
    }
    let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
    cli.scenarios
        .iter()
        .map(|name| {
            scenario::find(name)
                .ok_or_else(|| anyhow!("unknown scenario {name:?}; known: {}", names.join(", ")))
        })
        .collect()
}

/// Every run of every contender of `scenario`, summarised (each against the
/// raw contender's median).
async fn run_scenario(cli: &Cli, scenario: &Scenario) -> Vec<Summary> {
    let n = cli.messages.unwrap_or(scenario.messages);
    let mut series: Vec<Series> = scenario
        .contenders()
        .into_iter()
        .map(|contender| Series {
            scenario: scenario.name,
            broker: scenario.broker,
            contender,
            messages: n,
            runs: Vec::new(),
        })
        .collect();
    match ensure_broker(scenario.broker).await {
        Err(e) => {
            eprintln!("==> {}: {e:#}", scenario.name);
            for s in &mut series {
                s.runs.push(Err(format!("{e:#}")));
            }
        }
        Ok(()) => {
            for run in 1..=cli.runs {
                one_run(scenario, n, run, &mut series).await;
            }
        }
    }
    let raw = series
        .iter()
        .find(|s| s.contender == Contender::Raw)
        .map(|s| s.summary(None).median);
    let mut summaries = Vec::new();
    for s in &series {
        let sum = s.summary(raw);
        println!(
            "{} {}: min {}  median {}  max {} msg/s ({} runs)",
            sum.scenario,
            sum.contender,
            report::num(sum.min, 0),
            report::num(sum.median, 0),
            report::num(sum.max, 0),
            sum.runs
        );
        summaries.push(sum);
    }
    summaries
}
