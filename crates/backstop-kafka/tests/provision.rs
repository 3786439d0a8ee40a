//! Provisioning on tansu: dead letters are kept (the DLQ topic and its
//! handled log are created to keep records for ever, `retention.ms` =
//! `Long.MAX_VALUE`, unless configured), and
//! tier and DLQ topics take the source's `max.message.bytes`, so that a
//! copy of a record the source accepted fits where it goes.

mod common;

use backstop_core::{DelayTier, Subscription};
use backstop_kafka::{KafkaAdmin, dlq_topic, handled_topic, tier_topic};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::time::Duration;

/// Creates `name` with `configs`, as an operator would.
async fn create(brokers: &str, name: &str, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let topic = configs.iter().fold(
        NewTopic::new(name, 1, TopicReplication::Fixed(-1)),
        |t, (k, v)| t.set(k, v),
    );
    let results = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create topics");
    for r in results {
        r.expect("topic created");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_kept_and_copies_fit_where_the_source_did() {
    let brokers = common::brokers();
    common::require_broker(&brokers);
    let source = common::unique("provision");
    let group = common::unique("provision-group");
    create(&brokers, &source, &[("max.message.bytes", "2097152")]).await;
    let tier = DelayTier::new(Duration::from_secs(5));
    let subscription = Subscription::new(source.clone(), group.clone())
        .with_tiers(vec![tier.clone()])
        .with_prefetch(16);
    let admin = KafkaAdmin::new(&common::test_config(&brokers)).expect("admin");
    admin.provision(&subscription).await.expect("provisioned");

    let dlq = admin
        .topic_config(&dlq_topic(&group, &source))
        .await
        .expect("the broker describes topic configs");
    assert_eq!(
        dlq.get("retention.ms").map(String::as_str),
        Some("9223372036854775807")
    );
    assert_eq!(
        dlq.get("cleanup.policy").map(String::as_str),
        Some("delete")
    );
    assert_eq!(
        dlq.get("max.message.bytes").map(String::as_str),
        Some("2097152")
    );
    let tier = admin
        .topic_config(&tier_topic(&group, &source, &tier))
        .await
        .expect("described");
    assert_eq!(
        tier.get("max.message.bytes").map(String::as_str),
        Some("2097152")
    );
    assert_eq!(tier.get("retention.ms"), None, "tiers keep the cluster's");

    let log = handled_topic(&dlq_topic(&group, &source));
    admin.ensure_kept_topic(&log, 1).await.expect("created");
    let log = admin.topic_config(&log).await.expect("described");
    assert_eq!(
        log.get("retention.ms").map(String::as_str),
        Some("9223372036854775807")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_dead_letter_retention_is_used() {
    let brokers = common::brokers();
    common::require_broker(&brokers);
    let source = common::unique("provision-retention");
    let group = common::unique("provision-retention-group");
    create(&brokers, &source, &[]).await;
    let config = common::test_config(&brokers)
        .with_dead_letter_retention(Duration::from_secs(30 * 24 * 3600));
    let admin = KafkaAdmin::new(&config).expect("admin");
    admin
        .provision(&Subscription::new(source.clone(), group.clone()).with_prefetch(16))
        .await
        .expect("provisioned");
    let dlq = admin
        .topic_config(&dlq_topic(&group, &source))
        .await
        .expect("described");
    assert_eq!(
        dlq.get("retention.ms").map(String::as_str),
        Some("2592000000")
    );
    let zero = common::test_config(&brokers).with_dead_letter_retention(Duration::ZERO);
    let e = KafkaAdmin::new(&zero).expect_err("refused");
    assert_eq!(e.field, "kafka.dead_letter_retention");
}
