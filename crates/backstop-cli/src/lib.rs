//! The `backstop` command, as a library so tests can run it in-process.
//!
//! ```text
//! backstop dlq list  <dlq> [filters] [--json]   dead letters, newest first
//! backstop dlq show  <dlq> <id>                 one dead letter, whole
//! backstop dlq stats <dlq> [filters] [--json]   counts by error fingerprint
//! backstop dlq replay <dlq> [filters] [--to D] [--dry-run] [--rate N] [--canary N] [--yes]
//! backstop dlq purge <dlq> [filters] [--dry-run] [--yes]
//! backstop outbox status <path>                 pending, oldest age, local dead letters
//! backstop outbox list <path> [--dead]          entries of an outbox file
//! ```
//!
//! `<dlq>` is `kafka://host:port/<topic>`, `amqp://user:pass@host:port/<vhost>/<queue>`
//! (or `amqps://`), or a bare name resolved with `BACKSTOP_AMQP_URL` or
//! `BACKSTOP_KAFKA_BROKERS`. Passwords are never printed.
//!
//! Replay and purge remove a message from a RabbitMQ DLQ (ack) only after its
//! republish is confirmed. A Kafka topic cannot drop single records: the CLI
//! records each replayed or purged letter by its position, after the
//! confirm, in the topic `<dlq>.backstop-handled`, and every command skips
//! those letters unless `--all` (alias `--again`); a replayed message that
//! fails again is a new letter at a new position.

#[path = "move.rs"]
mod move_;
pub mod output;
pub mod record;
pub mod target;
pub mod terminal;
mod unroutable;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use record::DeadLetter;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use target::Target;

/// Inspect, group, replay and purge dead letters on Kafka and RabbitMQ; inspect outbox files.
#[derive(Debug, Parser)]
#[command(name = "backstop", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Dead-letter queues and topics.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// A producer's outbox file.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// A worker's local unroutable store: messages whose DLQ refused even
    /// their stub, kept whole on the worker's disk.
    #[command(subcommand)]
    Unroutable(UnroutableCommand),
}

#[derive(Debug, Subcommand)]
enum UnroutableCommand {
    /// Lists what the store holds, oldest first: when, where it was going,
    /// id, class, why it was refused, its file.
    List {
        /// The store's directory (the worker's `unroutable_dir`).
        #[arg(default_value = "backstop-unroutable")]
        dir: PathBuf,
        /// One JSON object per line, with every header and the payload.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Lists dead letters, newest first: id, age, origin, class, attempts, error.
    List {
        /// kafka://host:port/<topic>, amqp://user:pass@host:port/<vhost>/<queue>, or a name.
        dlq: String,
        #[command(flatten)]
        filter: Filter,
        /// One JSON object per line, with every header and the payload.
        #[arg(long)]
        json: bool,
    },
    /// Shows one dead letter: every header, the error chain, the payload.
    Show {
        /// The DLQ (as for `list`).
        dlq: String,
        /// Its message id (a unique prefix is enough).
        id: String,
    },
    /// Counts dead letters by error fingerprint, with first and last seen and a sample.
    Stats {
        /// The DLQ (as for `list`).
        dlq: String,
        #[command(flatten)]
        filter: Filter,
        /// One JSON object per group and line.
        #[arg(long)]
        json: bool,
    },
    /// Republishes matching dead letters to their origin (or --to).
    ///
    /// Each copy gets provenance headers (backstop-replayed-at, -replay-count,
    /// -replayed-from), loses the failure and attempt headers, keeps its id,
    /// key and application headers; the original leaves the DLQ only once the
    /// broker confirmed the copy.
    Replay(ReplayArgs),
    /// Deletes matching dead letters (Kafka: records them as purged).
    Purge(PurgeArgs),
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The DLQ (as for `list`).
    dlq: String,
    #[command(flatten)]
    filter: Filter,
    /// Republish here instead of to each message's origin.
    #[arg(long)]
    to: Option<String>,
    /// Show what would move; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// At most this many messages per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Replay this many first, then ask before going on (unless --yes).
    #[arg(long)]
    canary: Option<usize>,
    /// Do not ask.
    #[arg(long)]
    yes: bool,
}

#[derive(Debug, Args)]
struct PurgeArgs {
    /// The DLQ (as for `list`).
    dlq: String,
    #[command(flatten)]
    filter: Filter,
    /// Show what would be deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask.
    #[arg(long)]
    yes: bool,
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// Pending entries, the oldest one's age, local dead letters.
    Status {
        /// The outbox file.
        path: PathBuf,
    },
    /// Lists entries, oldest first.
    List {
        /// The outbox file.
        path: PathBuf,
        /// The local dead letters instead of the pending entries.
        #[arg(long)]
        dead: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// Which dead letters a command applies to.
#[derive(Debug, Clone, Default, Args)]
pub struct Filter {
    /// Only this error class (transient, permanent, poison, timeout, panic, ...).
    #[arg(long)]
    pub class: Option<String>,
    /// Only errors whose message contains this text.
    #[arg(long)]
    pub error_contains: Option<String>,
    /// Only those failed within this long before now (`30m`, `2h`, `7d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Only those failed longer ago than this.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub until: Option<Duration>,
    /// Only this message key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only those from this source (topic or queue).
    #[arg(long)]
    pub origin: Option<String>,
    /// At most this many (after filtering).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Kafka: include dead letters already replayed or purged (a topic keeps
    /// them; the CLI records what it handled in `<dlq>.backstop-handled`).
    #[arg(long, visible_alias = "again")]
    pub all: bool,
}

/// How far a command reads into a DLQ.
pub(crate) const SCAN_LIMIT: usize = 100_000;

impl Filter {
    /// Whether `d` passes, at time `now`.
    pub fn matches(&self, d: &DeadLetter, now: SystemTime) -> bool {
        let age = d.failed_at.and_then(|t| now.duration_since(t).ok());
        self.class.as_ref().is_none_or(|c| &d.class == c)
            && self
                .error_contains
                .as_ref()
                .is_none_or(|s| d.error_message.contains(s.as_str()))
            && self.since.is_none_or(|s| age.is_some_and(|a| a <= s))
            && self.until.is_none_or(|u| age.is_some_and(|a| a >= u))
            && self.key.as_ref().is_none_or(|k| d.key.as_ref() == Some(k))
            && self
                .origin
                .as_ref()
                .is_none_or(|o| d.origin_source.as_ref() == Some(o))
    }
}

/// Runs a parsed command, writing to `out`; questions are answered with `no`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    run_with(cli, out, &mut std::io::empty()).await
}

/// Runs a parsed command, writing to `out` and reading answers from `input`.
pub async fn run_with(
    cli: Cli,
    out: &mut dyn Write,
    input: &mut dyn std::io::BufRead,
) -> anyhow::Result<()> {
    match cli.command {
        Command::Dlq(dlq) => run_dlq(dlq, out, input).await,
        Command::Unroutable(UnroutableCommand::List { dir, json }) => {
            let kept = backstop::unroutable::UnroutableStore::new(&dir)
                .list()
                .with_context(|| format!("reading the unroutable store {}", dir.display()))?;
            write!(out, "{}", unroutable::unroutable(&kept, json))?;
            Ok(())
        }
        Command::Outbox(command) => run_outbox(command, out),
    }
}

async fn run_dlq(
    command: DlqCommand,
    out: &mut dyn Write,
    input: &mut dyn std::io::BufRead,
) -> anyhow::Result<()> {
    match command {
        DlqCommand::Replay(a) => {
            let plan = move_::Plan {
                dlq: a.dlq,
                filter: a.filter,
                action: move_::Action::Replay { to: a.to },
                dry_run: a.dry_run,
                rate: a.rate,
                canary: a.canary,
                yes: a.yes,
            };
            move_::run(plan, out, input).await?;
        }
        DlqCommand::Purge(a) => {
            let plan = move_::Plan {
                dlq: a.dlq,
                filter: a.filter,
                action: move_::Action::Purge,
                dry_run: a.dry_run,
                rate: None,
                canary: None,
                yes: a.yes,
            };
            move_::run(plan, out, input).await?;
        }
        DlqCommand::List { dlq, filter, json } => {
            let letters = read(&dlq, &filter).await?;
            if json {
                for d in &letters {
                    writeln!(out, "{}", output::json_line(d))?;
                }
            } else {
                write!(
                    out,
                    "{}",
                    output::table(&letters, SystemTime::now(), output::width())
                )?;
            }
        }
        DlqCommand::Show { dlq, id } => {
            let letters = read(&dlq, &Filter::default()).await?;
            let found: Vec<&DeadLetter> =
                letters.iter().filter(|d| d.id.starts_with(&id)).collect();
            match found.as_slice() {
                [one] => write!(out, "{}", output::show(one, SystemTime::now()))?,
                [] => anyhow::bail!("no dead letter with id {id} in {dlq}"),
                many => anyhow::bail!(
                    "{} dead letters start with {id}; give more of the id",
                    many.len()
                ),
            }
        }
        DlqCommand::Stats { dlq, filter, json } => {
            let letters = read(&dlq, &filter).await?;
            let groups = output::group(&letters);
            if json {
                for g in &groups {
                    writeln!(out, "{}", output::group_json(g))?;
                }
            } else {
                write!(
                    out,
                    "{}",
                    output::stats_table(&groups, letters.len(), SystemTime::now())
                )?;
            }
        }
    }
    Ok(())
}

fn run_outbox(command: OutboxCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        OutboxCommand::Status { path } => {
            let status = backstop::outbox::OutboxInspector::open(&path)?.status()?;
            write!(
                out,
                "{}",
                output::outbox_status(&path, &status, SystemTime::now())
            )?;
        }
        OutboxCommand::List { path, dead, limit } => {
            let inspector = backstop::outbox::OutboxInspector::open(&path)?;
            let entries = if dead {
                inspector.dead(limit)?
            } else {
                inspector.pending(limit)?
            };
            write!(
                out,
                "{}",
                output::outbox_entries(&entries, SystemTime::now())
            )?;
        }
    }
    Ok(())
}

/// Reads and filters a DLQ, newest first.
async fn read(dlq: &str, filter: &Filter) -> anyhow::Result<Vec<DeadLetter>> {
    let target = Target::parse(dlq)?;
    let broker = target.open()?;
    let mut letters = select(&broker, &target, filter).await?;
    letters.reverse();
    if let Some(limit) = filter.limit {
        letters.truncate(limit);
    }
    Ok(letters)
}

/// The dead letters of `target` that pass `filter`, oldest first, without
/// those already handled (Kafka) unless `filter.all`; `limit` not applied.
pub(crate) async fn select(
    broker: &target::Broker,
    target: &Target,
    filter: &Filter,
) -> anyhow::Result<Vec<DeadLetter>> {
    let letters = broker
        .browse(target, SCAN_LIMIT)
        .await
        .with_context(|| format!("could not read {}", target.display()))?;
    let handled = if filter.all {
        Default::default()
    } else {
        broker.handled(target).await?
    };
    let now = SystemTime::now();
    Ok(letters
        .into_iter()
        .filter(|d| {
            !d.position
                .is_some_and(|(p, o)| handled.covers(&d.message, p, o))
                && filter.matches(d, now)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop::Message;
    use backstop::message::{format_timestamp, names};

    fn letter(key: &str, origin: &str, class: &str, ago: Duration, now: SystemTime) -> DeadLetter {
        DeadLetter::read(
            Message::new("{}")
                .with_key(key.to_owned())
                .with_header(names::ERROR_CLASS, class.to_owned())
                .with_header(names::ERROR_MESSAGE, format!("{class} failure"))
                .with_header(names::ORIGIN_SOURCE, origin.to_owned())
                .with_header(
                    names::FAILED_AT,
                    format_timestamp(now - ago).unwrap_or_default(),
                ),
        )
    }

    #[test]
    fn every_filter_selects_what_it_names() {
        let now = SystemTime::now();
        let old = letter(
            "a",
            "orders",
            "permanent",
            Duration::from_secs(3 * 3600),
            now,
        );
        let new = letter("b", "payments", "transient", Duration::from_secs(60), now);
        let pick = |f: Filter| -> Vec<String> {
            [&old, &new]
                .iter()
                .filter(|d| f.matches(d, now))
                .map(|d| d.key.clone().unwrap_or_default())
                .collect()
        };
        assert_eq!(pick(Filter::default()), ["a", "b"]);
        let f = |edit: fn(&mut Filter)| {
            let mut f = Filter::default();
            edit(&mut f);
            f
        };
        assert_eq!(pick(f(|f| f.class = Some("permanent".into()))), ["a"]);
        assert_eq!(
            pick(f(|f| f.error_contains = Some("transient fail".into()))),
            ["b"]
        );
        assert_eq!(
            pick(f(|f| f.since = Some(Duration::from_secs(3600)))),
            ["b"]
        );
        assert_eq!(
            pick(f(|f| f.until = Some(Duration::from_secs(3600)))),
            ["a"]
        );
        assert_eq!(pick(f(|f| f.key = Some("b".into()))), ["b"]);
        assert_eq!(pick(f(|f| f.origin = Some("orders".into()))), ["a"]);
    }
}
