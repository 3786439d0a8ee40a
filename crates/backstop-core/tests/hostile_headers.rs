//! Property tests: whatever bytes a broker hands over as framework headers
//! and timestamps, reading them never panics, a malformed value is reported
//! and treated as absent, and what the runner writes back is always
//! well-formed. A fixed budget of cases per property, so the suite's time
//! stays bounded.

use backstop_core::message::{
    Failure, Headers, Message, Origin, ReplayMeta, RetryMeta, format_timestamp, names,
    parse_timestamp, representable,
};
use bytes::Bytes;
use proptest::prelude::*;
use std::time::{Duration, SystemTime};

/// Header names a reader looks at, plus anything else.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(names::ATTEMPT.to_owned()),
        Just(names::DELAYED_ATTEMPTS.to_owned()),
        Just(names::RETRY_TIER.to_owned()),
        Just(names::DUE_AT.to_owned()),
        Just(names::FIRST_FAILED_AT.to_owned()),
        Just(names::ORIGIN_SOURCE.to_owned()),
        Just(names::ORIGIN_PARTITION.to_owned()),
        Just(names::ORIGIN_OFFSET.to_owned()),
        Just(names::ORIGIN_TIMESTAMP.to_owned()),
        Just(names::ERROR_CLASS.to_owned()),
        Just(names::FAILED_AT.to_owned()),
        Just(names::REPLAY_COUNT.to_owned()),
        Just(names::REPLAYED_AT.to_owned()),
        Just(names::MESSAGE_ID.to_owned()),
        ".{0,300}",
    ]
}

/// Values: numbers of any size and sign, times in and out of range,
/// arbitrary text and arbitrary bytes.
fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop::option::of(prop_oneof![
        any::<i128>().prop_map(|n| n.to_string().into_bytes()),
        (0u64..400_000_000_000_000).prop_map(|ms| format!("{ms}").into_bytes()),
        "[0-9]{4,6}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z?"
            .prop_map(String::into_bytes),
        ".{0,64}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..64),
    ])
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn headers() -> impl Strategy<Value = Headers> {
    prop::collection::vec((name(), value()), 0..12).prop_map(|hs| {
        let mut h = Headers::new();
        for (k, v) in hs {
            h.append(k, v.map(Bytes::from));
        }
        h
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn reading_framework_headers_never_panics_and_writes_back_well_formed(h in headers()) {
        let (meta, _) = RetryMeta::read(&h);
        let (origin, _) = Origin::read(&h);
        let _ = Failure::read(&h);
        let _ = ReplayMeta::read(&h);
        // What was read is written back as values the reader accepts.
        let mut out = Headers::new();
        meta.write(&mut out);
        if let Some(o) = &origin {
            o.write(&mut out);
        }
        // Headers carry milliseconds: times compare at that precision.
        let (again, malformed) = RetryMeta::read(&out);
        prop_assert!(malformed.is_empty(), "{malformed:?}");
        prop_assert_eq!(
            (again.attempt, again.delayed_attempts, &again.retry_tier),
            (meta.attempt, meta.delayed_attempts, &meta.retry_tier)
        );
        prop_assert_eq!(again.due_at.map(millis), meta.due_at.map(millis));
        prop_assert_eq!(
            again.first_failed_at.map(millis),
            meta.first_failed_at.map(millis)
        );
        if let Some(o) = origin {
            let (o2, malformed) = Origin::read(&out);
            prop_assert!(malformed.is_empty(), "{malformed:?}");
            let o2 = o2.expect("written back");
            prop_assert_eq!(
                (&o2.source, o2.partition, o2.offset, &o2.group),
                (&o.source, o.partition, o.offset, &o.group)
            );
            prop_assert_eq!(o2.timestamp.map(millis), o.timestamp.map(millis));
        }
    }

    #[test]
    fn any_broker_timestamp_is_kept_only_when_a_header_can_say_it(
        secs in any::<u64>(),
        nanos in 0u32..1_000_000_000,
        before in any::<bool>(),
    ) {
        let d = Duration::new(secs, nanos);
        let t = if before {
            SystemTime::UNIX_EPOCH.checked_sub(d)
        } else {
            SystemTime::UNIX_EPOCH.checked_add(d)
        };
        let Some(t) = t else { return Ok(()) };
        let m = Message::new("x").with_timestamp(t);
        match m.timestamp() {
            Some(kept) => {
                let s = format_timestamp(kept).expect("kept times format");
                prop_assert!(parse_timestamp(&s).is_some(), "{s}");
            }
            None => prop_assert_eq!(representable(t), None),
        }
    }

    #[test]
    fn parsing_any_text_as_a_timestamp_never_panics(s in ".{0,40}") {
        if let Some(t) = parse_timestamp(&s) {
            prop_assert!(format_timestamp(t).is_some());
        }
    }
}
