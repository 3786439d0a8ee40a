//! An idempotent producer whose broker lost its producer state (a
//! restarted broker answering with an out-of-order sequence) fails fatally
//! and refuses every later record; the publisher replaces it and the
//! record that met the error is sent again, so tier and DLQ copies keep
//! flowing. On librdkafka's mock cluster, which injects the broker's error.

use backstop_core::Message;
use backstop_kafka::{KafkaConfig, KafkaPublisher};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_is_healed_by_a_new_producer() {
    // The mock cluster is !Send: it lives on this test's thread, outside
    // the awaits that need Send.
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("fatal", 1, 1).expect("topic");
    let config = KafkaConfig::new(cluster.bootstrap_servers())
        .with_delivery_timeout(Duration::from_secs(10));
    let publisher = KafkaPublisher::new(&config).expect("config");
    for n in 0..3 {
        publisher
            .send("fatal", Message::new(format!("before {n}")))
            .await
            .expect("acknowledged");
    }
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    publisher
        .send("fatal", Message::new("meets the error"))
        .await
        .expect("sent again on a new producer");
    assert_eq!(
        publisher.renewals(),
        1,
        "the error was fatal and the producer was replaced once"
    );
    for n in 0..3 {
        publisher
            .send("fatal", Message::new(format!("after {n}")))
            .await
            .expect("later records flow");
    }
    assert_eq!(
        publisher.renewals(),
        1,
        "no renewal without a new fatal error"
    );
}
