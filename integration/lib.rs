//! Helpers shared by the end-to-end tests under `tests/`.

use std::process::ExitStatus;
use std::time::Duration;

/// Sends SIGTERM to a worker process and waits up to `timeout` for it to exit;
/// panics when it does not stop in time.
pub async fn terminate(child: &mut tokio::process::Child, timeout: Duration) -> ExitStatus {
    let pid = child.id().expect("the worker is running");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(sent.success(), "could not signal pid {pid}");
    tokio::time::timeout(timeout, child.wait())
        .await
        .expect("the worker stops after SIGTERM")
        .expect("exit status")
}

/// The Kafka brokers of the tests (`BACKSTOP_KAFKA_BROKERS`, else tansu on
/// 127.0.0.1:19092); panics with how to start tansu when nothing listens.
pub fn kafka_brokers() -> String {
    let brokers =
        std::env::var("BACKSTOP_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let first = brokers.split(',').next().unwrap_or_default().to_owned();
    assert!(
        first
            .parse()
            .ok()
            .is_some_and(
                |a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
            ),
        "no Kafka broker at {brokers}: start tansu with `./scripts/tansu.sh start` or run `./scripts/test.sh`"
    );
    brokers
}
