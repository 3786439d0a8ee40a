//! `dlq replay` and `dlq purge`: select with the filters, preview, ask, then
//! act on exactly the previewed messages, each leaving the DLQ only once its
//! republish is confirmed (replay) or on purpose (purge).

use crate::Filter;
use crate::record::DeadLetter;
use crate::record::content_digest;
use crate::target::{Broker, Target};
use anyhow::{Context, bail};
use backstop::Message;
use backstop::message::ReplayMeta;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant, SystemTime};

pub(crate) enum Action {
    Replay { to: Option<String> },
    Purge,
}

pub(crate) struct Plan {
    pub(crate) dlq: String,
    pub(crate) filter: Filter,
    pub(crate) action: Action,
    pub(crate) dry_run: bool,
    pub(crate) rate: Option<f64>,
    pub(crate) canary: Option<usize>,
    pub(crate) yes: bool,
}

fn ask(out: &mut dyn Write, input: &mut dyn BufRead, question: &str) -> anyhow::Result<bool> {
    write!(out, "{question} [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    writeln!(out)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// RabbitMQ's own dead-letter bookkeeping describes the old life of a message;
/// a replayed copy starts without it.
fn strip_broker_headers(m: &mut Message) {
    m.headers_mut().retain(|h| {
        !(h.key == "x-death"
            || h.key == "x-delivery-count"
            || h.key.starts_with("x-first-death-")
            || h.key.starts_with("x-last-death-"))
    });
}

fn replay_copy(m: &Message, dlq: &str, now: SystemTime) -> Message {
    let mut copy = m.clone();
    ReplayMeta::apply(copy.headers_mut(), dlq, now);
    strip_broker_headers(&mut copy);
    copy
}

fn past_tense(action: &Action) -> &'static str {
    match action {
        Action::Replay { .. } => "replayed",
        Action::Purge => "deleted",
    }
}

fn destination(action: &Action, d: &DeadLetter) -> Option<String> {
    match action {
        Action::Replay { to } => to.clone().or_else(|| d.origin_source.clone()),
        Action::Purge => None,
    }
}

enum Outcome {
    Done(Option<String>),
    Failed(String),
    NoOrigin,
}

/// Does the action's broker-side work for `d` (the republish of a replay);
/// removing it from the DLQ is the caller's part.
async fn act(
    plan: &Plan,
    broker: &Broker,
    target: &Target,
    d: &DeadLetter,
    started: Instant,
    done: usize,
) -> Outcome {
    match &plan.action {
        Action::Purge => Outcome::Done(None),
        Action::Replay { .. } => {
            let Some(dest) = destination(&plan.action, d) else {
                return Outcome::NoOrigin;
            };
            if let Some(rate) = plan.rate.filter(|r| *r > 0.0) {
                let due = started + Duration::from_secs_f64(done as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let copy = replay_copy(&d.message, target.name(), SystemTime::now());
            match broker.publish(&dest, copy).await {
                Ok(()) => Outcome::Done(Some(dest)),
                Err(e) => Outcome::Failed(format!("{e:#}")),
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    done: usize,
    failed: usize,
    no_origin: usize,
    stopped: bool,
    /// Previewed letters no longer in the DLQ when acting (taken by someone
    /// else meanwhile).
    gone: usize,
}

impl Tally {
    fn seen(&self) -> usize {
        self.done + self.failed + self.no_origin
    }
}

pub(crate) async fn run(
    plan: Plan,
    out: &mut dyn Write,
    input: &mut dyn BufRead,
) -> anyhow::Result<()> {
    let target = Target::parse(&plan.dlq)?;
    let broker = target.open()?;
    let mut letters = crate::select(&broker, &target, &plan.filter).await?;
    if let Some(limit) = plan.filter.limit {
        letters.truncate(limit);
    }
    if letters.is_empty() {
        writeln!(out, "nothing in {} matches", target.display())?;
        return Ok(());
    }
    if plan.dry_run {
        return preview(&plan, &letters, out);
    }
    let question = format!(
        "{} {} dead letter(s) in {}?",
        verb(&plan.action),
        letters.len(),
        target.display()
    );
    if !plan.yes && plan.canary.is_none() && !ask(out, input, &question)? {
        writeln!(out, "nothing changed")?;
        return Ok(());
    }
    let mover = Mover {
        plan: &plan,
        broker: &broker,
        target: &target,
        total: letters.len(),
        started: Instant::now(),
        bar: progress_bar(letters.len(), &plan.action),
    };
    let tally = match &broker {
        Broker::Rabbit(transport) => mover.on_queue(transport, &letters, out, input).await?,
        Broker::Kafka(_) => mover.on_topic(&letters, out, input).await?,
    };
    mover.bar.finish_and_clear();
    report(&plan, &target, &tally, out)
}

fn verb(action: &Action) -> &'static str {
    match action {
        Action::Replay { .. } => "replay",
        Action::Purge => "delete",
    }
}

/// `--dry-run`: what would happen to each selected letter.
fn preview(plan: &Plan, letters: &[DeadLetter], out: &mut dyn Write) -> anyhow::Result<()> {
    for d in letters {
        let id = crate::terminal::esc(&d.id);
        match destination(&plan.action, d) {
            Some(dest) => writeln!(out, "would replay {id} -> {}", crate::terminal::esc(&dest))?,
            None if matches!(plan.action, Action::Replay { .. }) => {
                writeln!(out, "would skip {id}: no origin header (use --to)")?;
            }
            None => writeln!(out, "would delete {id}")?,
        }
    }
    writeln!(
        out,
        "dry run: {} dead letter(s) would {}; nothing changed",
        letters.len(),
        verb(&plan.action)
    )?;
    Ok(())
}

/// On a terminal only (indicatif draws nothing when stderr is not one).
fn progress_bar(len: usize, action: &Action) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(past_tense(action));
    bar
}

/// Acting on the previewed letters, one after another.
struct Mover<'a> {
    plan: &'a Plan,
    broker: &'a Broker,
    target: &'a Target,
    total: usize,
    started: Instant,
    bar: indicatif::ProgressBar,
}

impl Mover<'_> {
    /// RabbitMQ: the queue is read again, and what matches the preview by
    /// content is acted on, then taken off the queue.
    async fn on_queue(
        &self,
        transport: &backstop::rabbitmq::RabbitTransport,
        letters: &[DeadLetter],
        out: &mut dyn Write,
        input: &mut dyn BufRead,
    ) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        // The previewed deliveries by content, not by id: another dead
        // letter sharing an id (a replayed message that failed again, a
        // forged id) is neither moved nor counted.
        let mut wanted: HashMap<[u8; 32], usize> = HashMap::new();
        for d in letters {
            *wanted.entry(content_digest(&d.message)).or_default() += 1;
        }
        let mut remaining = letters.len();
        let mut reader = transport
            .reader(self.target.name())
            .await
            .with_context(|| format!("reading {}", self.target.display()))?;
        while remaining > 0 {
            let Some((message, tag)) = reader.next().await? else {
                break;
            };
            let Some(left) = wanted
                .get_mut(&content_digest(&message))
                .filter(|n| **n > 0)
            else {
                continue;
            };
            *left -= 1;
            remaining -= 1;
            let d = DeadLetter::read(message);
            let outcome = act(
                self.plan,
                self.broker,
                self.target,
                &d,
                self.started,
                tally.done,
            )
            .await;
            if let Outcome::Done(_) = outcome {
                // Removed from the DLQ only now: after the confirmed copy.
                reader.ack(tag).await?;
            }
            if !settle(self.plan, &d, outcome, &mut tally, self.total, out, input)? {
                break;
            }
            self.bar.set_position(tally.seen() as u64);
        }
        reader.release().await;
        tally.gone = if tally.stopped { 0 } else { remaining };
        Ok(tally)
    }

    /// Kafka: a letter stays in its topic; what was done is recorded in the
    /// handled log, so a later run skips it.
    async fn on_topic(
        &self,
        letters: &[DeadLetter],
        out: &mut dyn Write,
        input: &mut dyn BufRead,
    ) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        for d in letters {
            let outcome = act(
                self.plan,
                self.broker,
                self.target,
                d,
                self.started,
                tally.done,
            )
            .await;
            let outcome = match outcome {
                Outcome::Done(dest) => self.record_handled(d, dest).await,
                other => other,
            };
            if !settle(self.plan, d, outcome, &mut tally, self.total, out, input)? {
                break;
            }
            self.bar.set_position(tally.seen() as u64);
        }
        Ok(tally)
    }

    async fn record_handled(&self, d: &DeadLetter, dest: Option<String>) -> Outcome {
        let now = crate::output::shown_time(SystemTime::now());
        let what = match &dest {
            Some(dest) => format!("replayed to {dest} at {now}"),
            None => format!("purged at {now}"),
        };
        match self.broker.mark_handled(self.target, d, what).await {
            Ok(()) => Outcome::Done(dest),
            Err(e) => Outcome::Failed(format!(
                "recording it as handled failed (a later replay may repeat it): {e:#}"
            )),
        }
    }
}

/// The summary line; an error when some letters could not be handled.
fn report(plan: &Plan, target: &Target, tally: &Tally, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "{} {}, {} failed, {} without origin{}",
        tally.done,
        past_tense(&plan.action),
        tally.failed,
        tally.no_origin,
        if tally.stopped {
            "; stopped after the canary"
        } else {
            ""
        }
    )?;
    if tally.gone > 0 {
        writeln!(
            out,
            "{} previewed dead letter(s) were no longer in {}: nothing done to them",
            tally.gone,
            target.display()
        )?;
    }
    if tally.failed > 0 {
        bail!(
            "{} dead letter(s) could not be handled; they are still in the DLQ",
            tally.failed
        );
    }
    Ok(())
}

/// Reports one outcome; false when the canary says stop.
fn settle(
    plan: &Plan,
    d: &DeadLetter,
    outcome: Outcome,
    tally: &mut Tally,
    total: usize,
    out: &mut dyn Write,
    input: &mut dyn BufRead,
) -> anyhow::Result<bool> {
    match outcome {
        Outcome::Done(Some(dest)) => {
            tally.done += 1;
            writeln!(
                out,
                "replayed {} -> {}",
                crate::terminal::esc(&d.id),
                crate::terminal::esc(&dest)
            )?;
        }
        Outcome::Done(None) => tally.done += 1,
        Outcome::Failed(e) => {
            tally.failed += 1;
            writeln!(
                out,
                "kept {}: {}",
                crate::terminal::esc(&d.id),
                crate::terminal::esc(&e.to_string())
            )?;
        }
        Outcome::NoOrigin => {
            tally.no_origin += 1;
            writeln!(
                out,
                "skipped {}: no origin header (use --to)",
                crate::terminal::esc(&d.id)
            )?;
        }
    }
    if matches!(plan.action, Action::Replay { .. })
        && plan.canary == Some(tally.done)
        && !plan.yes
        && tally.seen() < total
        && !ask(
            out,
            input,
            &format!("canary of {} replayed; replay the rest?", tally.done),
        )?
    {
        tally.stopped = true;
        return Ok(false);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::replay_copy;
    use backstop::Message;
    use backstop::message::names;
    use std::time::SystemTime;

    #[test]
    fn a_replayed_copy_keeps_identity_and_trace_context_and_drops_its_failure() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let dead = Message::new("{}")
            .with_header(names::TRACEPARENT, tp)
            .with_header(names::TRACESTATE, "vendor=1")
            .with_header(names::ERROR_CLASS, "transient")
            .with_header(names::ATTEMPT, "4")
            .with_header("x-death", "[]");
        let copy = replay_copy(&dead, "orders.dlq", SystemTime::now());
        let h = copy.headers();
        assert_eq!(h.get_str(names::TRACEPARENT), Some(tp), "the trace goes on");
        assert_eq!(h.get_str(names::TRACESTATE), Some("vendor=1"));
        assert_eq!(h.get_str(names::MESSAGE_ID), dead.id());
        assert!(!h.contains(names::ERROR_CLASS) && !h.contains(names::ATTEMPT));
        assert!(!h.contains("x-death"));
    }
}
