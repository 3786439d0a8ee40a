//! Connecting: a broker that never answers fails a publish within the
//! connect timeout (the connection lock is held meanwhile, so without one
//! every publish of the process would wait); a refused login says so instead
//! of asking whether RabbitMQ runs.

mod common;

use backstop_core::{Message, Publisher};
use backstop_rabbitmq::{AMQP_URL_ENV, RabbitConfig, RabbitTransport};
use std::error::Error;
use std::time::Duration;

/// An error and its causes, one per line.
fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push('\n');
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

#[tokio::test]
async fn a_broker_that_never_answers_fails_within_the_connect_timeout() {
    // Accepts the TCP connection and never says a word: what a blackholed
    // or wedged broker looks like to the client.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            kept.push(socket);
        }
    });
    let transport = RabbitTransport::new(
        RabbitConfig::new(format!("amqp://app:s3cret@127.0.0.1:{port}/%2f"))
            .with_connect_timeout(Duration::from_millis(500)),
    )
    .expect("valid config");
    let publishes: Vec<_> = (0..2)
        .map(|i| {
            let t = transport.clone();
            tokio::spawn(async move { t.publish("orders", Message::new(format!("m{i}"))).await })
        })
        .collect();
    for p in publishes {
        // Generous: the point is that it ends at all, with this reason.
        let r = tokio::time::timeout(Duration::from_secs(60), p)
            .await
            .expect("a publish gives up instead of waiting for ever")
            .expect("task");
        let e = r.expect_err("nothing answered");
        let text = chain(&e.error);
        assert!(text.contains("no answer within 500ms"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
    held.abort();
}

#[tokio::test]
async fn a_refused_login_is_named_as_such() {
    // Fails saying how to start RabbitMQ when it is not there.
    drop(common::RabbitBackend::new());
    let url = std::env::var(AMQP_URL_ENV)
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let (scheme, rest) = url.split_once("://").expect("an AMQP URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let url = format!("{scheme}://nobody-here:wrong@{host}");
    let transport = RabbitTransport::new(RabbitConfig::new(url)).expect("valid config");
    let e = transport
        .publish("orders", Message::new("m"))
        .await
        .expect_err("wrong password");
    let text = chain(&e.error);
    assert!(text.contains("refused the login"), "{text}");
    assert!(!text.contains("is RabbitMQ running"), "{text}");
    assert!(!text.contains("wrong@"), "{text}");
}
