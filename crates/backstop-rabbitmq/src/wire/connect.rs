//! Connecting lapin through [`Guarded`]: a tokio runtime kit whose TCP
//! stream type is the guarded stream, and a connect function that puts the
//! guard above TLS (so `amqps://` is mended too) for every connection and
//! every reconnection lapin makes.

use super::stream::Guarded;
use async_rs::traits::{Executor, Reactor, RuntimeKit};
use async_rs::util::Task;
use async_rs::{Runtime, Tokio};
use futures_util::FutureExt as _;
use lapin::tcp::{AMQPUriTcpExt as _, AsyncTcpStream, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use std::io::{self, Read, Write};
use std::net::SocketAddr;

type Plain = AsyncTcpStream<<Tokio as Reactor>::TcpStream>;

/// tokio for lapin, its TCP streams guarded.
#[derive(Clone, Debug)]
pub(crate) struct GuardedTokio(Tokio);

impl RuntimeKit for GuardedTokio {}

impl Executor for GuardedTokio {
    type Task<T: Send + 'static> = <Tokio as Executor>::Task<T>;

    fn block_on<T, F: Future<Output = T>>(&self, f: F) -> T {
        self.0.block_on(f)
    }

    fn spawn<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.0.spawn(f)
    }

    fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.0.spawn_blocking(f)
    }
}

impl Reactor for GuardedTokio {
    type TcpStream = Guarded<Plain>;
    type Sleep = <Tokio as Reactor>::Sleep;

    /// Not used by lapin; registering raw handles is not offered.
    fn register<H: Read + Write + Send + 'static>(
        &self,
        _socket: H,
    ) -> io::Result<impl futures_io::AsyncRead + futures_io::AsyncWrite + Send + Unpin + 'static>
    {
        Err::<Guarded<Plain>, _>(io::Error::other(
            "backstop-rabbitmq's runtime kit registers no raw handles",
        ))
    }

    fn sleep(&self, dur: std::time::Duration) -> Self::Sleep {
        self.0.sleep(dur)
    }

    fn interval(
        &self,
        dur: std::time::Duration,
    ) -> impl futures_util::Stream<Item = std::time::Instant> + Send + 'static {
        self.0.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        self.0
            .tcp_connect_addr(addr)
            .map(|r| r.map(|s| Guarded::new(AsyncTcpStream::Plain(s))))
    }
}

/// Connects to `url` as `Connection::connect` would (same TLS defaults),
/// with every byte from the broker read through [`Guarded`].
pub(crate) async fn connect(url: &str, props: ConnectionProperties) -> lapin::Result<Connection> {
    let uri: AMQPUri = url
        .parse()
        .map_err(|e: String| lapin::Error::from(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let tokio = Tokio::current();
    let plain = Runtime::new(tokio.clone());
    let guarded = Runtime::new(GuardedTokio(tokio));
    Connection::connector(
        uri,
        guarded,
        async move |uri: AMQPUri, _| {
            let tls = OwnedTLSConfig::default();
            let stream: Plain = uri
                .connect_with_config_async(tls.as_ref(), &plain)
                .await
                .map_err(lapin::Error::from)?;
            Ok(AsyncTcpStream::Plain(Guarded::new(stream)))
        },
        props,
    )
    .await
}
