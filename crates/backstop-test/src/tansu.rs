//! A tansu broker of a test's own (the binary `scripts/tansu.sh install`
//! builds), on a free port with its own SQLite folder, for tests that kill
//! the broker or put a proxy in front of it without disturbing the shared
//! one. It can advertise another address than the one it listens on (a
//! proxy's), since Kafka clients connect to what the broker advertises.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
