//! The outbox producer example: sends demo orders through the disk-backed
//! outbox to Kafka or RabbitMQ, printing progress.

use backstop::kafka::{KafkaConfig, KafkaTransport};
use backstop::outbox::{Mode, OutboxConfig, OutboxPublisher, Sent};
use backstop::rabbitmq::{RabbitConfig, RabbitTransport};
use backstop::{Message, Publisher, Subscription};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The broker behind the outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Broker {
    /// RabbitMQ (lapin), `--amqp-url`.
    Rabbitmq,
    /// Kafka (rdkafka), `--brokers`.
    Kafka,
}

/// Command-line flags.
#[derive(Clone, Debug, clap::Parser)]
#[command(about = "Sends demo orders through Backstop's disk-backed outbox to Kafka or RabbitMQ")]
pub struct Args {
    /// Which broker.
    #[arg(long, value_enum, default_value = "rabbitmq")]
    pub broker: Broker,
    /// AMQP URL (RabbitMQ).
    #[arg(
        long,
        env = "BACKSTOP_AMQP_URL",
        // `--help` would print the variable's value, password included.
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Bootstrap servers (Kafka).
    #[arg(long, env = "BACKSTOP_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic or queue the orders go to (created if missing).
    #[arg(long, default_value = "orders")]
    pub destination: String,
    /// The outbox file.
    #[arg(long, default_value = "outbox.db")]
    pub db: PathBuf,
    /// Orders to send.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Sends in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u64,
    /// Distinct keys (customers); order is kept per key.
    #[arg(long, default_value_t = 16)]
    pub keys: u64,
    /// Publish directly with this timeout and spool to disk only on failure
    /// (default: every send goes through the disk).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub direct_timeout: Option<Duration>,
    /// Print `acked <message id>` on stdout for every accepted send (crash tests).
    #[arg(long)]
    pub print_acked: bool,
    /// How long to keep publishing what is pending before exiting.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub flush_deadline: Duration,
}

/// What a run did.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    /// Sends accepted (on disk or published).
    pub accepted: u64,
    /// Of those, published directly.
    pub direct: u64,
    /// Entries left on disk at exit.
    pub left_pending: u64,
    /// Wall time of the sends.
    pub elapsed: Duration,
}

/// Sends `args.count` orders through an outbox in `args.db`.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    match args.broker {
        Broker::Rabbitmq => {
            let transport = RabbitTransport::new(RabbitConfig::new(&args.amqp_url))?;
            transport
                .declare(
                    &Subscription::new(args.destination.clone(), "outbox-producer")
                        .with_prefetch(1),
                )
                .await?;
            send_all(transport, args).await
        }
        Broker::Kafka => {
            let transport = KafkaTransport::new(KafkaConfig::new(&args.brokers))?;
            transport.admin().ensure_topic(&args.destination, 3).await?;
            send_all(transport, args).await
        }
    }
}

async fn send_all<P: Publisher>(publisher: P, args: &Args) -> anyhow::Result<Report> {
    let mut config = OutboxConfig::new(&args.db);
    if let Some(timeout) = args.direct_timeout {
        config = config.with_mode(Mode::DirectWithFallback { timeout });
    }
    let outbox = Arc::new(OutboxPublisher::open(publisher, config).await?);
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let direct = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = {
        let (outbox, accepted) = (outbox.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let s = outbox.stats();
                eprintln!(
                    "accepted {} | pending {} | delivered {} | publish failures {}",
                    accepted.load(Ordering::Relaxed),
                    s.pending,
                    s.delivered,
                    s.publish_failures
                );
            }
        })
    };
    let mut senders = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (outbox, next, accepted, direct) = (
            outbox.clone(),
            next.clone(),
            accepted.clone(),
            direct.clone(),
        );
        let (count, keys, print, destination) = (
            args.count,
            args.keys.max(1),
            args.print_acked,
            args.destination.clone(),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let customer = n % keys;
                let order = Message::new(format!(
                    r#"{{"order":{n},"customer":{customer},"amount_cents":{}}}"#,
                    1000 + n % 500
                ))
                .with_key(format!("customer-{customer}"));
                let id = order.id().unwrap_or_default().to_owned();
                match outbox.send(&destination, order).await {
                    Ok(sent) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        if sent == Sent::Published {
                            direct.fetch_add(1, Ordering::Relaxed);
                        }
                        if print {
                            // One line per accepted send, written before the
                            // next send: what a crash test may rely on.
                            let mut out = std::io::stdout().lock();
                            writeln!(out, "acked {id}")?;
                            out.flush()?;
                        }
                    }
                    Err(e) => anyhow::bail!("send {n} refused: {e}"),
                }
            }
        }));
    }
    for s in senders {
        s.await??;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{} orders accepted in {:.2?} ({:.0}/s); flushing",
        accepted.load(Ordering::Relaxed),
        elapsed,
        accepted.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    progress.abort();
    let _ = progress.await;
    let outbox =
        Arc::try_unwrap(outbox).map_err(|_| anyhow::anyhow!("the outbox is still shared"))?;
    let report = outbox.shutdown(args.flush_deadline).await;
    Ok(Report {
        accepted: accepted.load(Ordering::Relaxed),
        direct: direct.load(Ordering::Relaxed),
        left_pending: report.left_pending,
        elapsed,
    })
}
