//! A tansu broker of a test's own (the binary `scripts/tansu.sh install`
//! builds), on a free port with its own SQLite folder, for tests that kill
//! the broker or put a proxy in front of it without disturbing the shared
//! one. It can advertise another address than the one it listens on (a
//! proxy's), since Kafka clients connect to what the broker advertises.

use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running (or killed) tansu broker.
#[derive(Debug)]
pub struct Tansu {
    dir: PathBuf,
    listen: SocketAddr,
    advertised: SocketAddr,
    child: Option<Child>,
}

/// A loopback port nothing listens on now.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

impl Tansu {
    /// A fresh broker listening on a free port and advertising it.
    pub fn start(name: &str) -> Self {
        let listen = free_port();
        Self::start_advertising(name, listen, listen)
    }

    /// A fresh broker listening on `listen` that tells clients to connect
    /// to `advertised`.
    pub fn start_advertising(name: &str, listen: SocketAddr, advertised: SocketAddr) -> Self {
        let dir =
            std::env::temp_dir().join(format!("backstop-tansu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tansu data folder");
        let mut t = Self {
            dir,
            listen,
            advertised,
            child: None,
        };
        t.restart();
        t
    }

    /// Where it listens.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// `host:port` clients bootstrap from (the advertised address).
    pub fn brokers(&self) -> String {
        self.advertised.to_string()
    }

    /// kill -9: no clean shutdown.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it on the same data (after [`Tansu::kill9`]) and waits until
    /// it listens.
    pub fn restart(&mut self) {
        self.kill9();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("tansu log");
        let child = Command::new("tansu")
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{}", self.listen),
                "--advertised-listener-url",
                &format!("tcp://{}", self.advertised),
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect(
                "tansu is installed (`./scripts/tansu.sh install`, or run `./scripts/test.sh`)",
            );
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect_timeout(&self.listen, Duration::from_millis(200)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "tansu did not listen on {} within 60 s; log in {}",
                self.listen,
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            // Kept for the post-mortem: the broker's log and data.
            eprintln!("tansu's log and data kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `test` on a two-thread runtime, with `broker` shared as
/// `Arc<Mutex<Tansu>>`, and stops the runtime (10 s at most) before the
/// broker: when the test fails, its clients are not left closing against
/// a broker already killed, which could hang the test binary for minutes.
/// A panic of the test is passed on.
pub fn run_against<F, Fut>(broker: Tansu, test: F)
where
    F: FnOnce(Arc<Mutex<Tansu>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let broker = Arc::new(Mutex::new(broker));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(rt.spawn(test(broker.clone())));
    rt.shutdown_timeout(Duration::from_secs(10));
    drop(broker);
    if let Err(e) = result {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("the test task ended without finishing: {e}"),
        }
    }
}

/// The broker behind [`run_against`]'s lock (a poisoned lock still holds it).
pub fn lock(broker: &Mutex<Tansu>) -> std::sync::MutexGuard<'_, Tansu> {
    broker.lock().unwrap_or_else(|p| p.into_inner())
}
