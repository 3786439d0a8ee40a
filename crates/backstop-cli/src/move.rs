//! `dlq replay` and `dlq purge`: select with the filters, preview, ask, then
//! act on exactly the previewed messages, each leaving the DLQ only once its
//! republish is confirmed (replay) or on purpose (purge).

use crate::record::DeadLetter;
use crate::target::{Broker, Target};
use crate::{Filter, SCAN_LIMIT};
use anyhow::{Context, bail};
use backstop::message::ReplayMeta;
use backstop::{Message, Publisher};
use std::collections::HashSet;
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

pub(crate) async fn run(
    plan: Plan,
    out: &mut dyn Write,
    input: &mut dyn BufRead,
) -> anyhow::Result<()> {
    let target = Target::parse(&plan.dlq)?;
    let broker = target.open()?;
    let Broker::Rabbit(transport) = &broker else {
        bail!(
            "replay and purge work on RabbitMQ DLQs so far; for the Kafka topic {} use \
             `backstop dlq list --json` and republish, support is coming",
            target.display()
        );
    };
    let now = SystemTime::now();
    let mut letters: Vec<DeadLetter> = broker
        .browse(&target, SCAN_LIMIT)
        .await?
        .into_iter()
        .enumerate()
        .map(|(i, m)| DeadLetter::read(m, i))
        .filter(|d| plan.filter.matches(d, now))
        .collect();
    if let Some(limit) = plan.filter.limit {
        letters.truncate(limit);
    }
    let verb = match plan.action {
        Action::Replay { .. } => "replay",
        Action::Purge => "delete",
    };
    if letters.is_empty() {
        writeln!(out, "nothing in {} matches", target.display())?;
        return Ok(());
    }
    if plan.dry_run {
        for d in &letters {
            match destination(&plan.action, d) {
                Some(dest) => writeln!(out, "would replay {} -> {dest}", d.id)?,
                None if matches!(plan.action, Action::Replay { .. }) => {
                    writeln!(out, "would skip {}: no origin header (use --to)", d.id)?;
                }
                None => writeln!(out, "would delete {}", d.id)?,
            }
        }
        writeln!(
            out,
            "dry run: {} dead letter(s) would {verb}; nothing changed",
            letters.len()
        )?;
        return Ok(());
    }
    if !plan.yes
        && plan.canary.is_none()
        && !ask(
            out,
            input,
            &format!(
                "{verb} {} dead letter(s) in {}?",
                letters.len(),
                target.display()
            ),
        )?
    {
        writeln!(out, "nothing changed")?;
        return Ok(());
    }

    let wanted: HashSet<String> = letters.iter().map(|d| d.id.clone()).collect();
    let mut reader = transport
        .reader(target.name())
        .await
        .with_context(|| format!("reading {}", target.display()))?;
    let (mut done, mut failed, mut no_origin, mut position) = (0usize, 0usize, 0usize, 0usize);
    let started = Instant::now();
    let mut stopped = false;
    // On a terminal only (indicatif draws nothing when stderr is not one).
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(letters.len() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(past_tense(&plan.action));
    while let Some((message, tag)) = reader.next().await? {
        let d = DeadLetter::read(message, position);
        position += 1;
        if !wanted.contains(&d.id) {
            continue;
        }
        match &plan.action {
            Action::Purge => {
                reader.ack(tag).await?;
                done += 1;
            }
            Action::Replay { .. } => {
                let Some(dest) = destination(&plan.action, &d) else {
                    no_origin += 1;
                    writeln!(out, "skipped {}: no origin header (use --to)", d.id)?;
                    continue;
                };
                if let Some(rate) = plan.rate.filter(|r| *r > 0.0) {
                    let due = started + Duration::from_secs_f64(done as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let copy = replay_copy(&d.message, target.name(), SystemTime::now());
                match transport.publish(&dest, copy).await {
                    Ok(()) => {
                        reader.ack(tag).await?;
                        done += 1;
                        writeln!(out, "replayed {} -> {dest}", d.id)?;
                    }
                    Err(e) => {
                        failed += 1;
                        writeln!(
                            out,
                            "kept {}: republish to {dest} failed: {}",
                            d.id, e.error
                        )?;
                    }
                }
                if plan.canary == Some(done)
                    && !plan.yes
                    && done < letters.len()
                    && !ask(
                        out,
                        input,
                        &format!("canary of {done} replayed; replay the rest?"),
                    )?
                {
                    stopped = true;
                    break;
                }
            }
        }
        bar.set_position((done + failed + no_origin) as u64);
        if done + failed + no_origin >= wanted.len() {
            break;
        }
    }
    bar.finish_and_clear();
    reader.release().await;
    let past = past_tense(&plan.action);
    writeln!(
        out,
        "{done} {past}, {failed} failed, {no_origin} without origin{}",
        if stopped {
            "; stopped after the canary"
        } else {
            ""
        }
    )?;
    if failed > 0 {
        bail!("{failed} dead letter(s) could not be replayed; they are still in the DLQ");
    }
    Ok(())
}
