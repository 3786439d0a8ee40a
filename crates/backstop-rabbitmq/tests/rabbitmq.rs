//! The conformance suite against the RabbitMQ running on 127.0.0.1:5672.

mod common;

use common::RabbitBackend;

backstop_test::conformance_tests!(
    tokio::test(flavor = "multi_thread", worker_threads = 2),
    RabbitBackend::new()
);
