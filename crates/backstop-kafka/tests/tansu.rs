//! The conformance suite against a real Kafka-protocol broker (tansu with
//! SQLite storage, started by scripts/test.sh).

mod common;

backstop_test::conformance_tests!(
    tokio::test(flavor = "multi_thread", worker_threads = 2),
    common::KafkaBackend::new(2)
);
