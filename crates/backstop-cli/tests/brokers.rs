//! The CLI against the real brokers: a RabbitMQ DLQ filled through the worker
//! path (a handler failing messages), and a Kafka DLQ topic written with
//! Spring- and Kafka-Connect-style headers. Reading never removes anything.

use backstop::DeadLetterSource;
use backstop::kafka::{KafkaConfig, KafkaTransport};
use backstop::message::names;
use backstop::rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue};
use backstop::{
    Backoff, Context, HandlerError, HandlerOptions, Message, Publisher, RetryPolicy, Runner,
    Subscription, handler_fn,
};
use backstop_cli::{Cli, run_with};
use backstop_test::eventually;
use bytes::Bytes;
use clap::Parser;
use serde_json::Value;
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn unique(prefix: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("backstop-test.{prefix}-{t}")
}

async fn cli(args: &[&str]) -> String {
    cli_answering(args, "").await
}

/// Runs the CLI with `answers` on its standard input.
async fn cli_answering(args: &[&str], answers: &str) -> String {
    let mut argv = vec!["backstop"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    let mut input = answers.as_bytes();
    run_with(Cli::parse_from(argv), &mut out, &mut input)
        .await
        .unwrap_or_else(|e| panic!("backstop {args:?}: {e:#}"));
    String::from_utf8(out).expect("utf-8 output")
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect()
}

/// `BACKSTOP_KAFKA_BROKERS` (default tansu's 127.0.0.1:19092), checked to be up.
fn kafka_brokers() -> String {
    let brokers =
        std::env::var("BACKSTOP_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let first: std::net::SocketAddr = brokers
        .split(',')
        .next()
        .unwrap_or_default()
        .parse()
        .expect("host:port");
    assert!(
        TcpStream::connect_timeout(&first, Duration::from_secs(2)).is_ok(),
        "no Kafka broker at {brokers}: start tansu with `./scripts/tansu.sh start` or run `./scripts/test.sh`"
    );
    brokers
}

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A queue whose DLQ the worker path filled: 4 permanent failures, 2
/// transient ones exhausted. Returns the transport, the queue and the DLQ.
async fn filled_dlq(prefix: &str) -> (RabbitTransport, String, String) {
    let queue = unique(prefix);
    let transport = RabbitTransport::new(RabbitConfig::new(AMQP)).expect("config");
    transport
        .declare(&Subscription::new(queue.clone(), "billing").with_prefetch(8))
        .await
        .expect("RabbitMQ at 127.0.0.1:5672 (rabbitmq-server -detached, or ./scripts/test.sh)");
    for n in 0..6 {
        let kind = if n < 4 { "invalid" } else { "flaky" };
        let m =
            Message::new(format!(r#"{{"order":{n},"kind":"{kind}"}}"#)).with_header("kind", kind);
        transport.publish(&queue, m).await.expect("publish");
    }
    let runner = Runner::builder(transport.clone())
        .with_group("billing")
        .with_handler_options(
            &queue,
            handler_fn(|_: Bytes, ctx: Context| async move {
                if ctx.headers().get_str("kind") == Some("invalid") {
                    Err(HandlerError::permanent(format!(
                        "order {} has no lines",
                        ctx.attempt() * 7
                    )))
                } else {
                    Err(HandlerError::transient("inventory timed out"))
                }
            }),
            HandlerOptions::default().with_policy(
                RetryPolicy::default()
                    .with_immediate_attempts(2)
                    .with_backoff(Backoff::exponential(
                        Duration::from_millis(1),
                        Duration::from_millis(5),
                    ))
                    .with_tiers([]),
            ),
        )
        .build()
        .expect("valid");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner.run(async move {
        let _ = rx.await;
    }));
    let dlq = dlq_queue(&queue);
    eventually("six dead letters", Duration::from_secs(60), || async {
        transport.ready_count(&dlq).await.ok().flatten() == Some(6)
    })
    .await;
    let _ = tx.send(());
    running.await.expect("runner");

    (transport, queue, dlq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_dlq_filled_by_a_worker_is_listed_shown_and_grouped() {
    let (transport, queue, dlq) = filled_dlq("cli-orders").await;
    let url = format!("{AMQP}/{dlq}");
    let listed = json_lines(&cli(&["dlq", "list", &url, "--json"]).await);
    assert_eq!(listed.len(), 6);
    assert!(listed.iter().all(|v| v["origin"] == queue.as_str()));
    let permanent = listed.iter().filter(|v| v["class"] == "permanent").count();
    assert_eq!(permanent, 4);
    assert!(listed.iter().all(|v| v["convention"] == "backstop"));

    let only = json_lines(&cli(&["dlq", "list", &url, "--json", "--class", "transient"]).await);
    assert_eq!(only.len(), 2);
    assert!(
        only.iter()
            .all(|v| v["reason"] == "exhausted" && v["attempts"] == 2)
    );
    let limited = json_lines(&cli(&["dlq", "list", &url, "--json", "--limit", "3"]).await);
    assert_eq!(limited.len(), 3);
    let grep = json_lines(
        &cli(&[
            "dlq",
            "list",
            &url,
            "--json",
            "--error-contains",
            "inventory",
        ])
        .await,
    );
    assert_eq!(grep.len(), 2);

    let table = cli(&["dlq", "list", &url]).await;
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains("6 dead letter(s)"), "{table}");

    let stats = json_lines(&cli(&["dlq", "stats", &url, "--json"]).await);
    let counts: Vec<u64> = stats
        .iter()
        .map(|g| g["count"].as_u64().expect("count"))
        .collect();
    assert_eq!(
        counts,
        [4, 2],
        "permanent failures grouped despite their numbers"
    );

    let id = listed[0]["id"].as_str().expect("id");
    let shown = cli(&["dlq", "show", &url, &id[..id.len() - 2]]).await;
    assert!(shown.contains(&format!("id:          {id}")), "{shown}");
    assert!(shown.contains("backstop-error-chain"), "{shown}");
    assert!(shown.contains("\"order\""), "pretty JSON payload: {shown}");

    assert_eq!(
        transport.ready_count(&dlq).await.expect("depth"),
        Some(6),
        "reading removed nothing"
    );
    for q in [&queue, &dlq] {
        let _ = transport.delete_queue(q).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_dlq_with_foreign_headers_is_listed_and_grouped() {
    let brokers = kafka_brokers();
    let topic = unique("cli-foreign-dlt");
    let transport = KafkaTransport::new(KafkaConfig::new(&brokers)).expect("config");
    transport
        .admin()
        .ensure_topic(&topic, 1)
        .await
        .expect("topic");
    for n in 0..3 {
        let m = Message::from_parts(
            None,
            Bytes::from(format!("spring {n}")),
            backstop::Headers::new(),
        )
        .with_header(
            "kafka_dlt-exception-fqcn",
            "java.lang.IllegalArgumentException",
        )
        .with_header(
            "kafka_dlt-exception-message",
            format!("bad amount in order {n}"),
        )
        .with_header("kafka_dlt-original-topic", "payments")
        .with_header("kafka_dlt-original-partition", "0")
        .with_header("kafka_dlt-original-offset", (40 + n).to_string());
        transport.publish(&topic, m).await.expect("publish");
    }
    for n in 0..2 {
        let m = Message::from_parts(
            None,
            Bytes::from(format!("connect {n}")),
            backstop::Headers::new(),
        )
        .with_header("__connect.errors.topic", "ledger")
        .with_header("__connect.errors.partition", "3")
        .with_header("__connect.errors.offset", (7 + n).to_string())
        .with_header(
            "__connect.errors.exception.class.name",
            "org.apache.kafka.connect.errors.DataException",
        )
        .with_header(
            "__connect.errors.exception.message",
            "Converting byte[] to Kafka Connect data failed",
        );
        transport.publish(&topic, m).await.expect("publish");
    }
    let url = format!("kafka://{brokers}/{topic}");
    let listed = json_lines(&cli(&["dlq", "list", &url, "--json"]).await);
    assert_eq!(listed.len(), 5);
    let spring: Vec<&Value> = listed
        .iter()
        .filter(|v| v["convention"] == "spring")
        .collect();
    assert_eq!(spring.len(), 3);
    assert!(spring.iter().any(|v| v["origin"] == "payments[0]@41"));
    let from_ledger =
        json_lines(&cli(&["dlq", "list", &url, "--json", "--origin", "ledger"]).await);
    assert_eq!(from_ledger.len(), 2);
    assert!(
        from_ledger
            .iter()
            .all(|v| v["convention"] == "kafka-connect")
    );
    let stats = json_lines(&cli(&["dlq", "stats", &url, "--json"]).await);
    let groups: Vec<(u64, String)> = stats
        .iter()
        .map(|g| {
            (
                g["count"].as_u64().expect("count"),
                g["error_type"].as_str().expect("type").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            (3, "java.lang.IllegalArgumentException".to_owned()),
            (
                2,
                "org.apache.kafka.connect.errors.DataException".to_owned()
            )
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_replay_and_purge_move_exactly_the_selection() {
    let (transport, queue, dlq) = filled_dlq("cli-replay").await;
    let url = format!("{AMQP}/{dlq}");
    // The broker takes back what the CLI read and did not remove as a message
    // of its own (quorum queues through their log): wait for the count to settle.
    let depth = |q: String, want: u32| {
        let t = transport.clone();
        async move {
            let mut seen = None;
            for _ in 0..100 {
                seen = t.ready_count(&q).await.expect("depth");
                if seen == Some(want) {
                    return want;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen.unwrap_or(0)
        }
    };

    let dry = cli(&["dlq", "replay", &url, "--class", "transient", "--dry-run"]).await;
    assert_eq!(dry.matches(&format!("-> {queue}")).count(), 2, "{dry}");
    assert!(dry.contains("nothing changed"), "{dry}");
    let declined = cli_answering(&["dlq", "replay", &url, "--class", "transient"], "n\n").await;
    assert!(declined.contains("nothing changed"), "{declined}");
    assert_eq!(
        depth(dlq.clone(), 6).await,
        6,
        "a dry run or a no changes nothing"
    );

    let replayed = cli(&["dlq", "replay", &url, "--class", "transient", "--yes"]).await;
    assert!(replayed.contains("2 replayed, 0 failed"), "{replayed}");
    assert_eq!(depth(dlq.clone(), 4).await, 4);
    let back = transport.browse(&queue, 100).await.expect("main queue");
    assert_eq!(back.len(), 2, "replayed to the origin queue");
    for m in &back {
        assert_eq!(m.headers().get_str(names::REPLAY_COUNT), Some("1"));
        assert_eq!(
            m.headers().get_str(names::REPLAYED_FROM),
            Some(dlq.as_str())
        );
        assert!(
            m.headers().get(names::ERROR_CLASS).is_none(),
            "failure headers stripped"
        );
        assert!(
            m.headers().get(names::ATTEMPT).is_none(),
            "attempt headers stripped"
        );
        assert_eq!(
            m.headers().get_str(names::ORIGIN_SOURCE),
            Some(queue.as_str()),
            "origin kept"
        );
        assert_eq!(
            m.headers().get_str("kind"),
            Some("flaky"),
            "application headers kept"
        );
    }
    let again = cli(&["dlq", "replay", &url, "--class", "transient", "--yes"]).await;
    assert!(
        again.contains("nothing in"),
        "replayed messages left the DLQ: {again}"
    );

    let canary = cli_answering(&["dlq", "replay", &url, "--canary", "1"], "no\n").await;
    assert!(
        canary.contains("1 replayed") && canary.contains("stopped after the canary"),
        "{canary}"
    );
    assert_eq!(depth(dlq.clone(), 3).await, 3);

    let purged = cli(&[
        "dlq",
        "purge",
        &url,
        "--error-contains",
        "no lines",
        "--yes",
    ])
    .await;
    assert!(purged.contains("3 deleted"), "{purged}");
    assert_eq!(depth(dlq.clone(), 0).await, 0);
    assert_eq!(
        depth(queue.clone(), 3).await,
        3,
        "purge touched only the DLQ"
    );
    for q in [&queue, &dlq] {
        let _ = transport.delete_queue(q).await;
    }
}

/// Dead letters sharing one id (a replayed message that failed again; a
/// forged id): replay moves exactly the previewed deliveries, all of them,
/// and none of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_replay_acts_on_the_previewed_deliveries_not_on_their_ids() {
    let queue = unique("cli-same-id");
    let transport = RabbitTransport::new(RabbitConfig::new(AMQP)).expect("config");
    transport
        .declare(&Subscription::new(queue.clone(), "billing").with_prefetch(8))
        .await
        .expect("RabbitMQ at 127.0.0.1:5672 (rabbitmq-server -detached, or ./scripts/test.sh)");
    let dlq = dlq_queue(&queue);
    let letter = |payload: &str, class: &str| {
        Message::new(payload.to_owned())
            .with_header(names::MESSAGE_ID, "shared-id")
            .with_header(names::ERROR_CLASS, class.to_owned())
            .with_header(names::ORIGIN_SOURCE, queue.clone())
    };
    for m in [
        letter("first, permanent", "permanent"),
        letter("second, transient", "transient"),
        letter("third, transient", "transient"),
    ] {
        transport.publish(&dlq, m).await.expect("dead letter");
    }
    let url = format!("{AMQP}/{dlq}");
    let replayed = cli(&["dlq", "replay", &url, "--class", "transient", "--yes"]).await;
    assert!(replayed.contains("2 replayed, 0 failed"), "{replayed}");
    let left = transport.browse(&dlq, 10).await.expect("DLQ");
    let payloads = |ms: &[Message]| {
        let mut p: Vec<String> = ms
            .iter()
            .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
            .collect();
        p.sort();
        p
    };
    assert_eq!(
        payloads(&left),
        ["first, permanent"],
        "only the unselected letter stays"
    );
    let moved = transport.browse(&queue, 10).await.expect("main queue");
    assert_eq!(payloads(&moved), ["second, transient", "third, transient"]);
    for q in [&queue, &dlq] {
        let _ = transport.delete_queue(q).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_replay_and_purge_record_what_they_handled() {
    use backstop::kafka::dlq_topic;
    let brokers = kafka_brokers();
    let topic = unique("cli-kafka-orders");
    let group = format!("{topic}-billing");
    let transport = KafkaTransport::new(
        KafkaConfig::new(&brokers).with_fetch_wait_max(Duration::from_millis(20)),
    )
    .expect("config");
    transport
        .admin()
        .ensure_topic(&topic, 1)
        .await
        .expect("topic");
    for n in 0..4 {
        let kind = if n < 2 { "invalid" } else { "flaky" };
        let m = Message::new(format!(r#"{{"order":{n}}}"#))
            .with_key(format!("customer-{n}"))
            .with_header("kind", kind);
        transport.publish(&topic, m).await.expect("publish");
    }
    // The worker path: a handler fails them; the runner dead-letters them.
    let runner = Runner::builder(transport.clone())
        .with_group(&group)
        .with_handler_options(
            &topic,
            handler_fn(|_: Bytes, ctx: Context| async move {
                if ctx.headers().get_str("kind") == Some("invalid") {
                    Err(HandlerError::permanent("order has no lines"))
                } else {
                    Err(HandlerError::transient("inventory timed out"))
                }
            }),
            HandlerOptions::default().with_policy(
                RetryPolicy::default()
                    .with_immediate_attempts(1)
                    .with_tiers([]),
            ),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner.run(async move {
        let _ = rx.await;
    }));
    eventually("four dead letters", Duration::from_secs(120), || async {
        stats.snapshot().dead_lettered == 4
    })
    .await;
    let _ = tx.send(());
    running.await.expect("runner");

    let dlq = dlq_topic(&group, &topic);
    let url = format!("kafka://{brokers}/{dlq}");
    let count = |args: Vec<&'static str>| {
        let url = url.clone();
        async move {
            let mut a = vec!["dlq", "list", url.as_str(), "--json"];
            a.extend(args);
            json_lines(&cli(&a).await).len()
        }
    };
    assert_eq!(count(vec![]).await, 4);

    let replayed = cli(&["dlq", "replay", &url, "--class", "transient", "--yes"]).await;
    assert!(replayed.contains("2 replayed, 0 failed"), "{replayed}");
    assert_eq!(count(vec![]).await, 2, "replayed ones are no longer listed");
    assert_eq!(count(vec!["--all"]).await, 4, "the topic keeps them");
    let back: Vec<Message> = transport
        .browse(&topic, 100)
        .await
        .expect("origin topic")
        .into_iter()
        .filter(|m| m.headers().get(names::REPLAY_COUNT).is_some())
        .collect();
    assert_eq!(back.len(), 2, "replayed to the origin topic");
    assert!(
        back.iter()
            .all(|m| m.headers().get(names::ERROR_CLASS).is_none())
    );
    assert!(back.iter().all(|m| m.key().is_some()), "keys kept");

    let again = cli(&["dlq", "replay", &url, "--class", "transient", "--yes"]).await;
    assert!(
        again.contains("nothing in"),
        "a second replay does nothing: {again}"
    );
    let forced = cli(&[
        "dlq",
        "replay",
        &url,
        "--class",
        "transient",
        "--again",
        "--yes",
    ])
    .await;
    assert!(
        forced.contains("2 replayed"),
        "--again replays them again: {forced}"
    );

    let purged = cli(&["dlq", "purge", &url, "--yes"]).await;
    assert!(purged.contains("2 deleted"), "{purged}");
    assert_eq!(count(vec![]).await, 0);

    // A replayed message fails again: the worker dead-letters it under the
    // same id, at a new position. It is a new letter, listed and replayable.
    let replayed_before = transport
        .browse(&dlq, 100)
        .await
        .expect("DLQ")
        .into_iter()
        .find(|m| m.headers().get_str(names::ERROR_CLASS) == Some("transient"))
        .expect("a replayed letter");
    let id = replayed_before.id().expect("id").to_owned();
    transport
        .publish(&dlq, replayed_before)
        .await
        .expect("failed again");
    let listed = cli(&["dlq", "list", url.as_str(), "--json"]).await;
    let rows = json_lines(&listed);
    assert_eq!(rows.len(), 1, "the new failure is listed: {listed}");
    assert_eq!(rows[0]["id"].as_str(), Some(id.as_str()), "{listed}");
}

#[tokio::test]
async fn an_unreachable_broker_is_named_without_its_password() {
    let mut out = Vec::new();
    let cli = Cli::parse_from([
        "backstop",
        "dlq",
        "list",
        "amqp://app:s3cret@127.0.0.1:1/%2f/orders.dlq",
    ]);
    let e = run_with(cli, &mut out, &mut &b""[..])
        .await
        .expect_err("nothing listens on port 1");
    let text = format!("{e:#}");
    assert!(text.contains("amqp://app:***@127.0.0.1:1/%2f"), "{text}");
    assert!(text.contains("is RabbitMQ running?"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}
