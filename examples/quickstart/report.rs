//! What a run did: the counts, and the table and dead letters printed.

use crate::SOURCE;
use backstop::message::names;
use backstop::{Message, StatsSnapshot};

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
