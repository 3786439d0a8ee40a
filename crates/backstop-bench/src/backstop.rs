//! The Backstop contender, for any backend: a `Runner` with default options
//! (only the scenario's retry policy set), the handlers, and the DLQ check.

use crate::measure::{Measured, STALL, Tally, Window};
use crate::scenario::{Record, Scenario, Work, parse_id};
use anyhow::{Context as _, anyhow, bail};
use backstop_core::{
    Context, DeadLetterSource, Handler, HandlerError, HandlerOptions, Json, Runner, StatsSnapshot,
    Transport,
};
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What every handler invocation reports to.
#[derive(Debug)]
pub(crate) struct Probe {
    pub(crate) window: Window,
    pub(crate) tally: Tally,
    pub(crate) work: Work,
}

impl Probe {
    pub(crate) fn new(work: Work, messages: u64) -> Arc<Self> {
        Arc::new(Self {
            window: Window::default(),
            tally: Tally::new(messages),
            work,
        })
    }
}

/// No-op: takes the payload as bytes, reads the id without a JSON parser.
#[derive(Debug)]
struct Noop(Arc<Probe>);

impl Handler for Noop {
    type Payload = Bytes;

    async fn handle(&self, payload: Bytes, _: Context) -> Result<(), HandlerError> {
        self.0.window.open();
        self.0.tally.record(parse_id(&payload));
        Ok(())
    }
}

/// S1-S3: decodes the JSON record (through Backstop's `Json`), fails as the
/// scenario says.
#[derive(Debug)]
struct Decoding(Arc<Probe>);

impl Handler for Decoding {
    type Payload = Json<Record>;

    async fn handle(&self, Json(record): Json<Record>, ctx: Context) -> Result<(), HandlerError> {
        self.0.window.open();
        if self.0.work.fails(record.id, ctx.attempt()) {
            return Err(HandlerError::transient("injected failure"));
        }
        self.0.tally.record(Some(record.id));
        Ok(())
    }
}

/// Runs a default `Runner` on `source` until `messages` are settled (handled
/// successfully or dead-lettered), then shuts it down and returns the window
/// and the final counters.
pub(crate) async fn drive<T>(
    transport: T,
    scenario: &Scenario,
    group: &str,
    source: &str,
    messages: u64,
    probe: &Arc<Probe>,
) -> anyhow::Result<(Measured, StatsSnapshot)>
where
    T: Transport,
{
    let options = HandlerOptions::default().with_policy(scenario.policy());
    let builder = Runner::builder(transport).with_group(group);
    let builder = match scenario.work {
        Work::Noop => builder.with_handler_options(source, Noop(probe.clone()), options),
        _ => builder.with_handler_options(source, Decoding(probe.clone()), options),
    };
    let runner = builder.build().context("build the runner")?;
    let stats = runner.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    // Settled = ok + dead-lettered, read every millisecond (tokio's timer
    // resolution): the window may close up to about 1 ms late.
    let mut last = (0, Instant::now());
    let measured = loop {
        let s = stats.snapshot();
        let settled = s.ok + s.dead_lettered;
        if settled >= messages {
            break probe.window.close();
        }
        if settled != last.0 {
            last = (settled, Instant::now());
        }
        if last.1.elapsed() > STALL {
            let _ = stop.send(());
            bail!("the runner settled nothing for {STALL:?} at {settled}/{messages}: {s:?}");
        }
        if run.is_finished() {
            bail!("the runner stopped at {settled}/{messages}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let _ = stop.send(());
    let report = run.await.context("runner task")?;
    let measured = measured.ok_or_else(|| anyhow!("the handler was never called"))?;
    Ok((measured, report.stats))
}

/// The counters worth keeping in the report.
pub(crate) fn stats_json(s: &StatsSnapshot) -> Value {
    json!({
        "ok": s.ok,
        "retried": s.retried,
        "delayed": s.delayed,
        "dead_lettered": s.dead_lettered,
        "handler_errors": s.handler_errors,
        "failed_to_route": s.failed_to_route,
        "abandoned": s.abandoned,
        "duplicates": s.duplicates,
    })
}

/// S3: the DLQ must hold exactly the always-failing ids, each once. Other
/// work: the DLQ must be empty (or absent).
pub(crate) async fn dlq_problems<T: DeadLetterSource>(
    transport: &T,
    dlq: &str,
    messages: u64,
    work: Work,
) -> Vec<String> {
    let expected: BTreeSet<u64> = (0..messages).filter(|&i| work.always_fails(i)).collect();
    let limit = usize::try_from(messages)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let found = match transport.browse(dlq, limit).await {
        Ok(found) => found,
        // Nothing was expected: a DLQ that was never created is fine.
        Err(_) if expected.is_empty() => return Vec::new(),
        Err(e) => return vec![format!("could not read the DLQ {dlq}: {e}")],
    };
    let ids: Vec<Option<u64>> = found.iter().map(|m| parse_id(m.payload())).collect();
    let unique: BTreeSet<u64> = ids.iter().flatten().copied().collect();
    let mut out = Vec::new();
    if ids.len() != expected.len() || unique != expected {
        let missing = expected.difference(&unique).count();
        let extra = unique.difference(&expected).count();
        out.push(format!(
            "DLQ {dlq} holds {} messages ({} distinct ids), expected {}: {missing} missing, {extra} unexpected",
            ids.len(),
            unique.len(),
            expected.len()
        ));
    }
    out
}
