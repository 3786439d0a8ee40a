//! A small TCP proxy for network faults between a worker and its broker:
//! it can delay every chunk, hold all traffic (a blackhole: connections stay
//! open and nothing moves, as in a partition, until it heals) and cut every
//! connection at once (as a broker restart or a load balancer would).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug)]
struct State {
    delay_ms: AtomicU64,
    holding: watch::Sender<bool>,
    /// Bumped by [`Proxy::cut`]: connections of an older cut end.
    cuts: watch::Sender<u64>,
    stopped: AtomicBool,
}

/// A proxy to one upstream address; see the module docs.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State {
            delay_ms: AtomicU64::new(0),
            holding: watch::channel(false).0,
            cuts: watch::channel(0).0,
            stopped: AtomicBool::new(false),
        });
        let s = state.clone();
        tokio::spawn(async move {
            while !s.stopped.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        connect(client, server, s).await;
                    }
                });
            }
        });
        Self { addr, state }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every chunk waits this long before it is forwarded.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Holds all traffic (new connections too) until called with `false`.
    pub fn blackhole(&self, on: bool) {
        self.state.holding.send_replace(on);
    }

    /// Closes every open connection now.
    pub fn cut(&self) {
        self.state.cuts.send_modify(|c| *c += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.cut();
    }
}

async fn connect(client: TcpStream, server: TcpStream, s: Arc<State>) {
    let mut cuts = s.cuts.subscribe();
    let born = *cuts.borrow_and_update();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, s.clone());
    let down = pump(sr, cw, s.clone());
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cuts.wait_for(|c| *c != born) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    s: Arc<State>,
) {
    let mut holding = s.holding.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if holding.wait_for(|h| !*h).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = s.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        // Read during a blackhole's start: held until it heals.
        if holding.wait_for(|h| !*h).await.is_err() {
            return;
        }
        let Some(chunk) = buf.get(..n) else { return };
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}
