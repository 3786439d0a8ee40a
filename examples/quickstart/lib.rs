//! The quickstart scenario: 1,000 orders through the in-memory broker, some
//! failing transiently (they recover), some permanently, some undecodable.

use backstop::memory::MemoryBroker;
use backstop::message::names;
use backstop::{
    Backoff, Context, DelayTier, Handler, HandlerError, HandlerOptions, Json, Message, Publisher,
    RetryPolicy, Runner, StatsSnapshot,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The source queue.
pub const SOURCE: &str = "orders";

/// One order as producers send it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Order {
    /// Order number.
    pub id: u32,
    /// Items ordered; 0 is invalid.
    pub quantity: u32,
    /// Simulates a flaky dependency: the first `flaky_attempts` attempts fail.
    pub flaky_attempts: u32,
}

/// What kind of trouble message `i` of the scenario has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Handled at the first attempt.
    Fine,
    /// Fails twice, recovers through immediate retries.
    Blip,
    /// Fails four times, recovers after one delay tier.
    Outage,
    /// Always fails: exhausts retries and tiers, dead-lettered.
    Down,
    /// Quantity 0: permanent, dead-lettered at once.
    Invalid,
    /// Not JSON: poison, dead-lettered at once.
    Garbage,
}

/// The kind of message `i`.
pub fn kind(i: u32) -> Kind {
    match (i % 50, i % 20, i % 10) {
        (11, _, _) => Kind::Down,
        (_, 5, _) => Kind::Garbage,
        (_, 7, _) => Kind::Invalid,
        (_, 9, _) => Kind::Outage,
        (_, _, 3) => Kind::Blip,
        _ => Kind::Fine,
    }
}

fn message(i: u32) -> Message {
    let order = |quantity, flaky_attempts| Order {
        id: i,
        quantity,
        flaky_attempts,
    };
    let payload = match kind(i) {
        Kind::Garbage => format!("<order id={i}>not json</order>").into_bytes(),
        Kind::Fine => serde_json::to_vec(&order(1, 0)).expect("serialises"),
        Kind::Blip => serde_json::to_vec(&order(1, 2)).expect("serialises"),
        Kind::Outage => serde_json::to_vec(&order(1, 4)).expect("serialises"),
        Kind::Down => serde_json::to_vec(&order(1, u32::MAX)).expect("serialises"),
        Kind::Invalid => serde_json::to_vec(&order(0, 0)).expect("serialises"),
    };
    Message::new(payload).with_key(format!("customer-{}", i % 37))
}

/// The handler: validates, then calls a (simulated) flaky inventory service.
#[derive(Clone, Debug, Default)]
pub struct Fulfil {
    handled: Arc<Mutex<HashSet<String>>>,
}

impl Handler for Fulfil {
    type Payload = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, ctx: Context) -> Result<(), HandlerError> {
        if order.quantity == 0 {
            return Err(HandlerError::permanent(format!(
                "order {} has quantity 0",
                order.id
            )));
        }
        if ctx.attempt() <= order.flaky_attempts {
            return Err(HandlerError::transient(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("inventory service refused connection (order {})", order.id),
            )));
        }
        self.handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctx.message_id().to_owned());
        Ok(())
    }
}

/// The outcome of one quickstart run.
#[derive(Debug)]
pub struct Summary {
    /// Messages published.
    pub published: usize,
    /// Distinct messages handled successfully.
    pub ok: usize,
    /// Distinct messages in the DLQ.
    pub dead_lettered: usize,
    /// Published messages neither handled nor dead-lettered.
    pub lost: usize,
    /// The runner's counters.
    pub stats: StatsSnapshot,
    /// The DLQ, oldest first.
    pub dlq: Vec<Message>,
}

impl Summary {
    /// The one-line summary the README promises.
    pub fn line(&self) -> String {
        format!(
            "summary: published={} ok={} dead_lettered={} retried={} delayed={} lost={}",
            self.published,
            self.ok,
            self.dead_lettered,
            self.stats.retried,
            self.stats.delayed,
            self.lost
        )
    }
}

/// The retry policy of the quickstart: short tiers so it ends in about a second.
pub fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_immediate_attempts(3)
        .with_backoff(Backoff::exponential(
            Duration::from_millis(5),
            Duration::from_millis(50),
        ))
        .with_tiers([
            DelayTier::new(Duration::from_millis(100)),
            DelayTier::new(Duration::from_millis(300)),
        ])
}

/// Publishes `count` orders, runs a worker until every message is settled, and
/// reports what happened.
pub async fn run(count: u32) -> Result<Summary, backstop::ConfigError> {
    let broker = MemoryBroker::new();
    let mut ids = Vec::with_capacity(count as usize);
    for i in 0..count {
        let m = message(i);
        ids.push(m.id().expect("new messages have an id").to_owned());
        broker
            .publish(SOURCE, m)
            .await
            .expect("the in-memory broker confirms every publish");
    }
    let handler = Fulfil::default();
    let handled = handler.handled.clone();
    let runner = Runner::builder(broker.clone())
        .with_group("fulfilment")
        .with_handler_options(
            SOURCE,
            handler,
            HandlerOptions::default()
                .with_name("fulfil")
                .with_timeout(Duration::from_secs(2))
                .with_concurrency(64)
                .with_policy(policy()),
        )
        .build()?;
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;

    let dlq = broker.messages(&MemoryBroker::dlq(SOURCE));
    let handled = handled.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let dead: HashSet<String> = dlq
        .iter()
        .filter_map(|m| m.id().map(str::to_owned))
        .collect();
    let lost = ids
        .iter()
        .filter(|id| !handled.contains(*id) && !dead.contains(*id))
        .count();
    Ok(Summary {
        published: ids.len(),
        ok: handled.len(),
        dead_lettered: dead.len(),
        lost,
        stats: report.stats,
        dlq,
    })
}

/// Renders the outcome table and the first DLQ entries.
pub fn render(s: &Summary, show_dead: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let reason = |r: &str| {
        s.dlq
            .iter()
            .filter(|m| m.headers().get_str(names::DEAD_LETTER_REASON) == Some(r))
            .count()
    };
    let _ = writeln!(
        out,
        "Backstop quickstart: {} orders through the in-memory broker\n",
        s.published
    );
    let _ = writeln!(out, "  {:<28} {:>8}", "outcome", "messages");
    let _ = writeln!(out, "  {:-<28} {:->8}", "", "");
    let _ = writeln!(out, "  {:<28} {:>8}", "handled ok", s.ok);
    let _ = writeln!(out, "  {:<28} {:>8}", "dead-lettered", s.dead_lettered);
    for r in ["permanent", "poison", "exhausted"] {
        let _ = writeln!(out, "  {:<28} {:>8}", format!("  reason {r}"), reason(r));
    }
    let _ = writeln!(out, "  {:<28} {:>8}", "lost", s.lost);
    let _ = writeln!(out, "  {:-<28} {:->8}", "", "");
    let _ = writeln!(out, "  {:<28} {:>8}", "immediate retries", s.stats.retried);
    let _ = writeln!(out, "  {:<28} {:>8}", "delay-tier hops", s.stats.delayed);
    let _ = writeln!(
        out,
        "  {:<28} {:>8}",
        "failed handler attempts", s.stats.handler_errors
    );
    let _ = writeln!(out, "\nFirst {show_dead} dead letters ({}.dlq):", SOURCE);
    for m in s.dlq.iter().take(show_dead) {
        let _ = writeln!(out, "\n  message {}", m.id().unwrap_or("?"));
        for h in m
            .headers()
            .iter()
            .filter(|h| h.key.starts_with("backstop-"))
        {
            let value = h
                .value
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let value = value.replace('\n', " | ");
            let _ = writeln!(out, "    {:<30} {}", h.key, value);
        }
    }
    out
}
