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
