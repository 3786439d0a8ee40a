use super::*;
use std::time::Duration;

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

#[test]
fn timestamps_are_rfc3339_utc_with_milliseconds() {
    let t = at(1_795_730_060_123);
    let s = format_timestamp(t).unwrap();
    assert_eq!(s.len(), "2026-11-26T21:54:20.123Z".len());
    assert!(s.ends_with(".123Z"), "{s}");
    assert_eq!(parse_timestamp(&s), Some(t));
    assert_eq!(parse_timestamp("2026-11-26 21:54:20"), None);
    assert_eq!(parse_timestamp("yesterday"), None);
}

#[test]
fn times_a_header_cannot_say_are_unknown_never_a_panic() {
    let last = at(253_402_300_799_999);
    assert_eq!(
        format_timestamp(last).as_deref(),
        Some("9999-12-31T23:59:59.999Z")
    );
    assert_eq!(parse_timestamp("9999-12-31T23:59:59.999Z"), Some(last));
    let beyond = [
        at(253_402_300_800_000),
        // Milliseconds written where seconds belong, read as seconds.
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_730_060_123),
        SystemTime::UNIX_EPOCH - Duration::from_secs(1),
    ];
    for t in beyond {
        assert_eq!(representable(t), None, "{t:?}");
        assert_eq!(format_timestamp(t), None, "{t:?}");
    }
    let origin = Origin {
        source: "orders".into(),
        timestamp: Some(beyond[1]),
        ..Origin::default()
    };
    let mut h = Headers::new();
    h.insert(ORIGIN_TIMESTAMP, "stale");
    origin.write(&mut h);
    assert_eq!(h.get(ORIGIN_TIMESTAMP), None, "unknown: not written");
}

#[test]
fn retry_meta_round_trips() {
    let meta = RetryMeta {
        attempt: 7,
        delayed_attempts: 2,
        retry_tier: Some("30s".into()),
        due_at: Some(at(1_800_000_000_000)),
        first_failed_at: Some(at(1_799_999_000_456)),
    };
    let mut h = Headers::new();
    meta.write(&mut h);
    assert_eq!(h.get_str(ATTEMPT), Some("7"));
    assert_eq!(RetryMeta::read(&h), (meta, vec![]));
}

#[test]
fn retry_meta_write_removes_absent_fields() {
    let mut h = Headers::new();
    h.insert(RETRY_TIER, "5s");
    h.insert(DUE_AT, format_timestamp(at(5)).unwrap());
    RetryMeta {
        attempt: 3,
        ..RetryMeta::default()
    }
    .write(&mut h);
    assert!(!h.contains(RETRY_TIER));
    assert!(!h.contains(DUE_AT));
}

#[test]
fn malformed_headers_are_reported_and_treated_as_absent() {
    let mut h = Headers::new();
    h.insert(ATTEMPT, "+5");
    h.insert(DELAYED_ATTEMPTS, "two");
    h.insert(DUE_AT, "tomorrow");
    h.insert(FIRST_FAILED_AT, bytes::Bytes::from_static(&[0xff]));
    h.insert(RETRY_TIER, "5s");
    let (meta, malformed) = RetryMeta::read(&h);
    assert_eq!(meta.attempt, 0);
    assert_eq!(meta.delayed_attempts, 0);
    assert_eq!(meta.due_at, None);
    assert_eq!(meta.first_failed_at, None);
    assert_eq!(meta.retry_tier.as_deref(), Some("5s"));
    let names: Vec<_> = malformed.iter().map(|m| m.header).collect();
    assert_eq!(names, [ATTEMPT, DELAYED_ATTEMPTS, DUE_AT, FIRST_FAILED_AT]);
    assert!(malformed[3].reason.contains("UTF-8"));
}

#[test]
fn huge_counter_is_malformed_not_a_panic() {
    let mut h = Headers::new();
    h.insert(ATTEMPT, "99999999999999999999999");
    let (meta, malformed) = RetryMeta::read(&h);
    assert_eq!(meta.attempt, 0);
    assert_eq!(malformed.len(), 1);
}

#[test]
fn origin_round_trips_and_needs_a_source() {
    let origin = Origin {
        source: "orders".into(),
        partition: Some(3),
        offset: Some(-1),
        timestamp: Some(at(1_000)),
        group: Some("billing".into()),
    };
    let mut h = Headers::new();
    origin.write(&mut h);
    assert_eq!(Origin::read(&h), (Some(origin), vec![]));
    h.remove(ORIGIN_SOURCE);
    assert_eq!(Origin::read(&h).0, None);
}

fn failure(message: &str) -> Failure {
    Failure {
        class: ErrorClass::Transient,
        error_type: "std::io::Error".into(),
        message: message.into(),
        chain: format!("{message}\nconnection reset"),
        fingerprint: fingerprint(ErrorClass::Transient, "std::io::Error", message),
        failed_at: at(2_000),
        handler: "orders".into(),
        host: "worker-1".into(),
        dead_letter_reason: Some(DeadLetterReason::Exhausted),
    }
}

#[test]
fn failure_round_trips() {
    let f = failure("db down");
    let mut h = Headers::new();
    f.write(&mut h);
    assert_eq!(Failure::read(&h), (Some(f), vec![]));
}

#[test]
fn failure_headers_are_replaced_not_appended() {
    let mut h = Headers::new();
    failure("first").write(&mut h);
    let mut second = failure("second");
    second.dead_letter_reason = None;
    second.write(&mut h);
    assert_eq!(h.iter().filter(|e| e.key == ERROR_MESSAGE).count(), 1);
    assert_eq!(h.get_str(ERROR_MESSAGE), Some("second"));
    assert!(!h.contains(DEAD_LETTER_REASON), "stale reason must go");
}

#[test]
fn failure_write_truncates_message_and_chain() {
    let mut f = failure(&"é".repeat(5000));
    f.chain = "💥".repeat(5000);
    let mut h = Headers::new();
    f.write(&mut h);
    let message = h.get_str(ERROR_MESSAGE).expect("utf-8");
    let chain = h.get_str(ERROR_CHAIN).expect("utf-8");
    assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES && message.len() > 4000);
    assert!(chain.len() <= MAX_ERROR_CHAIN_BYTES && chain.len() > 8000);
}

#[test]
fn unknown_error_class_is_malformed() {
    let mut h = Headers::new();
    h.insert(ERROR_CLASS, "catastrophic");
    let (f, malformed) = Failure::read(&h);
    assert_eq!(f, None);
    assert_eq!(malformed[0].header, ERROR_CLASS);
}

#[test]
fn fingerprint_groups_messages_that_differ_only_in_numbers_and_ids() {
    let a = fingerprint(
        ErrorClass::Permanent,
        "E",
        "order 17 not found (id 9f8e7d6c)",
    );
    let b = fingerprint(
        ErrorClass::Permanent,
        "E",
        "order 912 not found (id 0a1b2c3d)",
    );
    let c = fingerprint(
        ErrorClass::Permanent,
        "E",
        "customer 17 not found (id 9f8e7d6c)",
    );
    let d = fingerprint(
        ErrorClass::Transient,
        "E",
        "order 17 not found (id 9f8e7d6c)",
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, d);
    assert_eq!(a.len(), 16);
    // Stable across releases: a fixed input has a fixed value.
    assert_eq!(
        a,
        fingerprint(ErrorClass::Permanent, "E", "order 1 not found (id 2)")
    );
}

#[test]
fn replay_strips_failure_and_attempt_headers_and_counts() {
    let mut h = Headers::new();
    h.insert(MESSAGE_ID, "m1");
    h.insert("tenant", "acme");
    h.insert(ORIGIN_SOURCE, "orders");
    RetryMeta {
        attempt: 9,
        delayed_attempts: 3,
        ..RetryMeta::default()
    }
    .write(&mut h);
    failure("x").write(&mut h);
    ReplayMeta::apply(&mut h, "orders.dlq", at(3_000));
    ReplayMeta::apply(&mut h, "orders.dlq", at(4_000));
    assert!(!h.iter().any(|e| ATTEMPT_HEADERS.contains(&e.key.as_str())));
    assert!(!h.iter().any(|e| FAILURE_HEADERS.contains(&e.key.as_str())));
    assert_eq!(h.get_str(MESSAGE_ID), Some("m1"));
    assert_eq!(h.get_str("tenant"), Some("acme"));
    assert_eq!(h.get_str(ORIGIN_SOURCE), Some("orders"));
    let replay = ReplayMeta::read(&h).0.expect("replayed");
    assert_eq!(replay.replay_count, 2);
    assert_eq!(replay.replayed_at, at(4_000));
}
