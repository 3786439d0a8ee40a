//! Property tests: a dead letter with any headers and payload (foreign
//! conventions included: Spring's binary numbers, RabbitMQ's `x-death`)
//! is read and rendered without a panic, and nothing it carries reaches a
//! terminal raw. A fixed budget of cases.

use backstop::Message;
use backstop::message::names;
use backstop_cli::output::{fixed_now, group, json_line, show, stats_table, table};
use backstop_cli::record::DeadLetter;
use bytes::Bytes;
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(names::ERROR_CLASS.to_owned()),
        Just(names::ERROR_MESSAGE.to_owned()),
        Just(names::ERROR_CHAIN.to_owned()),
        Just(names::FAILED_AT.to_owned()),
        Just(names::ATTEMPT.to_owned()),
        Just(names::ORIGIN_SOURCE.to_owned()),
        Just(names::MESSAGE_ID.to_owned()),
        Just("kafka_dlt-exception-fqcn".to_owned()),
        Just("kafka_dlt-original-partition".to_owned()),
        Just("kafka_dlt-original-offset".to_owned()),
        Just("kafka_dlt-original-timestamp".to_owned()),
        Just("retry_topic-attempts".to_owned()),
        Just("x-first-death-reason".to_owned()),
        Just("x-first-death-queue".to_owned()),
        Just("x-death".to_owned()),
        ".{0,40}",
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..16),
        any::<i64>().prop_map(|n| n.to_be_bytes().to_vec()),
        any::<i32>().prop_map(|n| n.to_be_bytes().to_vec()),
        ".{0,80}".prop_map(String::into_bytes),
        (any::<i64>(), any::<i64>(), ".{0,8}").prop_map(|(c, t, r)| {
            format!(r#"[{{"count":{c},"time":{t},"reason":{r:?},"queue":"q"}}]"#).into_bytes()
        }),
    ]
}

fn letter() -> impl Strategy<Value = DeadLetter> {
    (
        prop::collection::vec((name(), value()), 0..10),
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(headers, payload)| {
            let mut m = Message::from_parts(None, Bytes::from(payload), Default::default());
            for (k, v) in headers {
                m.headers_mut().append(k, Some(Bytes::from(v)));
            }
            DeadLetter::read(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn any_dead_letter_renders_safely(d in letter()) {
        let letters = vec![d];
        let human = [
            show(&letters[0], fixed_now()),
            table(&letters, fixed_now(), 120),
            stats_table(&group(&letters), 1, fixed_now()),
        ];
        for text in &human {
            prop_assert!(
                !text.chars().any(|c| c.is_control() && c != '\n'),
                "{text:?}"
            );
        }
        let json = json_line(&letters[0]).to_string();
        prop_assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
    }
}
