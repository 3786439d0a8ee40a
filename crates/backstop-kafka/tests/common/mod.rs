#![allow(dead_code)] // each test binary uses a different part
//! A real Kafka-protocol broker (tansu, started by scripts/test.sh) as a
//! conformance backend.

use backstop_core::DelayTier;
use backstop_kafka::{KafkaConfig, KafkaTransport, dlq_topic, tier_topic};
use backstop_test::{Backend, Faults, Features};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The broker the tests use: `BACKSTOP_KAFKA_BROKERS`, else tansu's port.
pub(crate) fn brokers() -> String {
    std::env::var(backstop_kafka::BROKERS_ENV).unwrap_or_else(|_| "127.0.0.1:19092".to_owned())
}

/// Panics with the command that starts the broker when it is not reachable.
pub(crate) fn require_broker(brokers: &str) {
    let first = brokers.split(',').next().unwrap_or_default();
    let reachable = first
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "no Kafka broker at {brokers}. Start tansu with `./scripts/tansu.sh start` \
         (or run the whole suite with `./scripts/test.sh`), or point {} at a broker.",
        backstop_kafka::BROKERS_ENV
    );
}

/// Client settings for tests: short fetch waits (tansu holds every fetch for
/// the client's maximum), quick commits and group membership changes.
pub(crate) fn test_config(brokers: &str) -> KafkaConfig {
    KafkaConfig::new(brokers)
        .with_fetch_wait_max(Duration::from_millis(20))
        .with_property("auto.commit.interval.ms", "100")
        .with_property("session.timeout.ms", "6000")
        .with_property("heartbeat.interval.ms", "500")
}

/// A unique name per call, per process, per run.
pub(crate) fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!(
        "{prefix}-{t}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// What the mock-cluster thread is asked to do.
enum Cmd {
    CreateTopic(String, i32, mpsc::Sender<()>),
    FailProduce(u32),
    BrokerDownFor(Duration),
}

/// librdkafka's in-process mock cluster, owned by a thread of its own
/// (`MockCluster` is `!Send`); faults are injected through commands.
pub(crate) struct Mock {
    commands: Mutex<mpsc::Sender<Cmd>>,
}

impl Mock {
    pub(crate) fn start() -> (Self, String) {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (boot_tx, boot_rx) = mpsc::channel::<String>();
        std::thread::Builder::new()
            .name("mock-kafka".into())
            .spawn(move || {
                let cluster = MockCluster::new(1).expect("mock cluster");
                boot_tx
                    .send(cluster.bootstrap_servers())
                    .expect("report servers");
                // Ends (dropping the cluster) when the backend drops its sender.
                for cmd in rx {
                    match cmd {
                        Cmd::CreateTopic(name, partitions, done) => {
                            cluster
                                .create_topic(&name, partitions, 1)
                                .expect("create topic");
                            let _ = done.send(());
                        }
                        Cmd::FailProduce(n) => {
                            // Not retriable, and unlike TOPIC_AUTHORIZATION_FAILED it does
                            // not mark the whole topic failed: exactly `n` deliveries fail.
                            // Not MSG_SIZE_TOO_LARGE: the runner answers that (Invalid) by
                            // resending a slimmer copy at once, which would hide the fault.
                            let errors = vec![
                                RDKafkaRespErr::RD_KAFKA_RESP_ERR_POLICY_VIOLATION;
                                n as usize
                            ];
                            cluster.request_errors(RDKafkaApiKey::Produce, &errors);
                        }
                        Cmd::BrokerDownFor(d) => {
                            cluster.broker_down(1).expect("broker down");
                            std::thread::sleep(d);
                            cluster.broker_up(1).expect("broker up");
                        }
                    }
                }
            })
            .expect("spawn mock thread");
        let servers = boot_rx.recv().expect("mock cluster started");
        (
            Self {
                commands: Mutex::new(tx),
            },
            servers,
        )
    }

    fn send(&self, cmd: Cmd) {
        self.commands
            .lock()
            .expect("lock")
            .send(cmd)
            .expect("mock thread alive");
    }

    pub(crate) fn create_topic(&self, name: &str, partitions: i32) {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::CreateTopic(name.to_owned(), partitions, tx));
        rx.recv().expect("topic created");
    }
}

/// Kafka as a conformance backend: tansu, or the mock cluster with faults.
pub(crate) struct KafkaBackend {
    config: KafkaConfig,
    transport: KafkaTransport,
    partitions: i32,
    sources: Mutex<HashMap<String, (String, Vec<DelayTier>)>>,
    mock: Option<Mock>,
}

impl KafkaBackend {
    /// Against the test broker, sources with `partitions` partitions.
    pub(crate) fn new(partitions: i32) -> Self {
        let brokers = brokers();
        require_broker(&brokers);
        Self::with(test_config(&brokers), partitions, None)
    }

    /// Against a fresh in-process mock cluster, with fault injection.
    pub(crate) fn mock(partitions: i32) -> Self {
        let (mock, servers) = Mock::start();
        let config = test_config(&servers).with_delivery_timeout(Duration::from_secs(5));
        Self::with(config, partitions, Some(mock))
    }

    /// Against the broker at `brokers` (a test's own), test settings.
    #[allow(dead_code)] // not every test binary uses it
    pub(crate) fn at(brokers: &str, partitions: i32) -> Self {
        Self::with_config(test_config(brokers), partitions)
    }

    /// Against the broker these client settings name.
    #[allow(dead_code)] // not every test binary uses it
    pub(crate) fn with_config(config: KafkaConfig, partitions: i32) -> Self {
        require_broker(config.brokers());
        Self::with(config, partitions, None)
    }

    fn with(config: KafkaConfig, partitions: i32, mock: Option<Mock>) -> Self {
        // RUST_LOG=backstop_core=debug shows the runner's decisions in test output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        Self {
            transport: KafkaTransport::new(config.clone()).expect("valid config"),
            config,
            partitions,
            sources: Mutex::new(HashMap::new()),
            mock,
        }
    }

    /// The client settings the backend's transport uses.
    pub(crate) fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Unconsumed messages of `group` on `topics`: high watermark minus
    /// committed. `usize::MAX` (never "done") when the broker did not answer
    /// in time, as a busy tansu sometimes does mid-rebalance: the waits
    /// that call this poll again.
    pub(crate) async fn lag(&self, group: &str, topics: Vec<String>) -> usize {
        match self.transport.admin().group_lag(group, &topics).await {
            Ok(lag) => usize::try_from(lag.values().sum::<i64>()).unwrap_or(0),
            Err(e) => {
                eprintln!("group lag of {group:?} unknown for now: {e}");
                usize::MAX
            }
        }
    }
}

impl Backend for KafkaBackend {
    type Transport = KafkaTransport;

    fn features(&self) -> Features {
        if self.mock.is_some() {
            Features::default().with_fault_injection().with_keys()
        } else {
            Features::default().with_keys()
        }
    }

    async fn transport(&self) -> KafkaTransport {
        self.transport.clone()
    }

    async fn fresh_source(&self, prefix: &str, group: &str, tiers: &[DelayTier]) -> String {
        let source = unique(prefix);
        match &self.mock {
            // The mock cluster has no CreateTopics: make every topic up front.
            Some(mock) => {
                mock.create_topic(&source, self.partitions);
                for t in tiers {
                    mock.create_topic(&tier_topic(group, &source, t), self.partitions);
                }
                mock.create_topic(&dlq_topic(group, &source), self.partitions);
            }
            None => self
                .transport
                .admin()
                .ensure_topic(&source, self.partitions)
                .await
                .expect("create source topic"),
        }
        self.sources
            .lock()
            .expect("lock")
            .insert(source.clone(), (group.to_owned(), tiers.to_vec()));
        source
    }

    async fn pending(&self, source: &str) -> usize {
        let (group, tiers) = self
            .sources
            .lock()
            .expect("lock")
            .get(source)
            .cloned()
            .expect("a source made by fresh_source");
        let mut topics = vec![source.to_owned()];
        topics.extend(tiers.iter().map(|t| tier_topic(&group, source, t)));
        self.lag(&group, topics).await
    }

    fn faults(&self) -> Option<&dyn Faults> {
        self.mock.as_ref().map(|m| m as &dyn Faults)
    }
}

impl Faults for Mock {
    fn fail_next_dead_letter_publishes(&self, n: u32) {
        self.send(Cmd::FailProduce(n));
    }

    fn fail_next_delay_publishes(&self, n: u32) {
        self.send(Cmd::FailProduce(n));
    }

    fn drop_connection(&self) {
        self.send(Cmd::BrokerDownFor(Duration::from_secs(2)));
    }
}

/// Publishes one plain record (no idempotence, no headers: what tansu serves
/// well at volume, BROKERS.md) per body, keyed by the body's part before a
/// `:` (the whole body when it has none), and waits for every one.
pub(crate) fn produce_plain(brokers: &str, source: &str, bodies: impl IntoIterator<Item = String>) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for body in bodies {
        let key = body.split(':').next().unwrap_or_default();
        while producer
            .send(BaseRecord::to(source).payload(&body).key(key))
            .is_err()
        {
            producer.poll(Duration::from_millis(10));
        }
    }
    producer.flush(Duration::from_secs(60)).expect("produced");
}
