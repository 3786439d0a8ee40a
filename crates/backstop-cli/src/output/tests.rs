use super::*;
use backstop::Message;
use backstop::message::names;

fn letter(n: u32, class: &str, message: &str, ago: u64) -> DeadLetter {
    let failed = fixed_now() - Duration::from_secs(ago);
    let m = Message::new(format!(r#"{{"order":{n}}}"#))
        .with_id(format!("0000000{n}-aaaa-7bbb-8ccc-dddddddddddd"))
        .with_key(format!("customer-{n}"))
        .with_header(names::ERROR_CLASS, class.to_owned())
        .with_header(names::ERROR_TYPE, "billing::InvalidOrder")
        .with_header(names::ERROR_MESSAGE, message.to_owned())
        .with_header(names::ORIGIN_SOURCE, "orders")
        .with_header(names::ORIGIN_PARTITION, "1")
        .with_header(names::ORIGIN_OFFSET, (100 + n).to_string())
        .with_header(names::ATTEMPT, "1")
        .with_header(names::FAILED_AT, shown_time(failed));
    DeadLetter::read(m)
}

#[test]
fn list_table_reads_well() {
    let letters = vec![
        letter(1, "permanent", "order 1 has no lines", 90),
        letter(
            2,
            "transient",
            "inventory service timed out after 30s while reserving stock for order 2",
            7200,
        ),
    ];
    let got = table(&letters, fixed_now(), 100);
    let want = "\
ID                                    AGE  ORIGIN         CLASS      ATTEMPTS  ERROR
00000001-aaaa-7bbb-8ccc-dddddddddddd  1m   orders[1]@101  permanent  1         order 1 has no lines
00000002-aaaa-7bbb-8ccc-dddddddddddd  2h   orders[1]@102  transient  1         inventory service ti…
2 dead letter(s)
";
    assert_eq!(got, want, "\n{got}");
}

#[test]
fn stats_group_by_fingerprint() {
    let letters = vec![
        letter(1, "permanent", "order 1 has no lines", 90),
        letter(2, "permanent", "order 2 has no lines", 30),
        letter(3, "transient", "timeout", 10),
    ];
    let groups = group(&letters);
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0].count, 2);
    let got = stats_table(&groups, 3, fixed_now());
    let want = format!(
        "\
3 dead letter(s) in 2 group(s), largest first

     2  {}  permanent  billing::InvalidOrder
        order 1 has no lines
        first 1m ago, last 30s ago, e.g. 00000001-aaaa-7bbb-8ccc-dddddddddddd

     1  {}  transient  billing::InvalidOrder
        timeout
        first 10s ago, last 10s ago, e.g. 00000003-aaaa-7bbb-8ccc-dddddddddddd
",
        groups[0].fingerprint, groups[1].fingerprint
    );
    assert_eq!(got, want, "\n{got}");
}

#[test]
fn show_reads_well() {
    let d = letter(7, "permanent", "order 7 has no lines", 600);
    let got = show(&d, fixed_now());
    let want = "\
id:          00000007-aaaa-7bbb-8ccc-dddddddddddd
key:         customer-7
origin:      orders[1]@107
failed:      2026-05-28T20:16:40.000Z (10m ago)
class:       permanent (backstop)
reason:      -
attempts:    1
error type:  billing::InvalidOrder
error:       order 7 has no lines
fingerprint: ";
    assert!(got.starts_with(want), "\n{got}");
    assert!(
        got.contains("\nheaders:\n  backstop-message-id: 00000007-aaaa-7bbb-8ccc-dddddddddddd\n"),
        "\n{got}"
    );
    assert!(
        got.ends_with("payload (11 bytes):\n{\n  \"order\": 7\n}\n"),
        "\n{got}"
    );
}

#[test]
fn what_a_producer_wrote_never_reaches_the_terminal_raw() {
    let evil = "\x1b]0;owned\x07\x1b[2J";
    let m = Message::new(format!("text {evil}\r\nforged line"))
        .with_id(format!("id{evil}"))
        .with_header(names::ERROR_CLASS, "permanent")
        .with_header(names::ERROR_MESSAGE, format!("bad {evil}"))
        .with_header(names::ERROR_CHAIN, format!("a\nb {evil}"))
        .with_header(format!("key{evil}"), format!("value{evil}"));
    let d = DeadLetter::read(m);
    let shown = [
        show(&d, fixed_now()),
        table(std::slice::from_ref(&d), fixed_now(), 200),
        stats_table(&group(std::slice::from_ref(&d)), 1, fixed_now()),
    ];
    for text in &shown {
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
        assert!(!text.contains('\r'), "{text:?}");
    }
    assert!(
        shown[0].contains("bad \\x1b]0;owned\\x07\\x1b[2J"),
        "{}",
        shown[0]
    );
    assert!(shown[0].contains("  key\\x1b]0;owned"), "{}", shown[0]);
    assert!(
        shown[0].ends_with("text \\x1b]0;owned\\x07\\x1b[2J\nforged line\n"),
        "{}",
        shown[0]
    );
    // --json stays exact.
    let json = json_line(&d).to_string();
    let back: Value = serde_json::from_str(&json).expect("json");
    assert_eq!(back["error_message"], format!("bad {evil}"));
}

#[test]
fn binary_headers_are_shown_decoded_or_as_hex() {
    let m = Message::new("x")
        .with_header("kafka_dlt-original-offset", 918i64.to_be_bytes().to_vec())
        .with_header(
            "kafka_dlt-original-timestamp",
            1_764_280_000_123i64.to_be_bytes().to_vec(),
        )
        .with_header("blob", vec![0xffu8, 0x00, 0x1b]);
    let got = show(&DeadLetter::read(m), fixed_now());
    assert!(got.contains("  kafka_dlt-original-offset: 918\n"), "{got}");
    assert!(
        got.contains("  kafka_dlt-original-timestamp: 1764280000123 (2025-11-27T21:46:40.123Z)\n"),
        "{got}"
    );
    assert!(got.contains("  blob: hex:ff001b\n"), "{got}");
}

#[test]
fn outbox_status_reads_well() {
    let status = OutboxStatus {
        pending: 12,
        pending_bytes: 3400,
        oldest_pending: Some(fixed_now() - Duration::from_secs(95)),
        dead: 1,
    };
    assert_eq!(
        outbox_status(Path::new("/var/lib/orders/outbox.db"), &status, fixed_now()),
        "\
outbox:        /var/lib/orders/outbox.db
pending:       12 (3400 bytes)
oldest:        1m
dead (local):  1
"
    );
}

#[test]
fn json_lines_carry_headers_and_binary_payloads() {
    let m = Message::from_parts(
        None,
        bytes::Bytes::from_static(&[0xff, 0x01]),
        backstop::Headers::new(),
    )
    .with_header(names::ERROR_CLASS, "poison");
    let v = json_line(&DeadLetter::read(m));
    assert_eq!(v["payload"]["base64"], "/wE=");
    assert_eq!(v["class"], "poison");
    assert_eq!(v["headers"][0][0], names::ERROR_CLASS);
}
