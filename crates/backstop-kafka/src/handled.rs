//! The handled log of a Kafka DLQ topic, `<dlq>.backstop-handled`: what the
//! `backstop` CLI replayed or purged (Kafka cannot delete one record).
//!
//! A record names the dead letter by its **position** (partition and offset
//! in the DLQ topic), never by its message id: a replayed message that fails
//! again re-enters the DLQ under the same id at a new position, and must be
//! seen there. Key and [`POSITION_HEADER`] are `<partition>:<offset>`; the
//! value says what was done; `backstop-message-id` carries the letter's id
//! for people reading the log.
//!
//! Records an earlier Backstop wrote (key = message id, no position header)
//! still count, for the letters with that id that reached the DLQ before the
//! record was written (record timestamps; a letter or record without one
//! counts as earlier, as it did then).

use backstop_core::Message;
use backstop_core::message::names;
use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

/// The header naming the handled letter's position, `<partition>:<offset>`.
pub const POSITION_HEADER: &str = "backstop-handled-position";

fn position_text(partition: i32, offset: i64) -> String {
    format!("{partition}:{offset}")
}

fn parse_position(text: &[u8]) -> Option<(i32, i64)> {
    let text = std::str::from_utf8(text).ok()?;
    let (p, o) = text.split_once(':')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

/// The record saying the letter at `partition`/`offset` (id `id`) was
/// handled: `what` is `replayed to <dest> at <time>` or `purged at <time>`.
pub fn handled_record(partition: i32, offset: i64, id: Option<&str>, what: String) -> Message {
    let position = position_text(partition, offset);
    let mut m = Message::new(what)
        .with_key(position.clone())
        .with_header(POSITION_HEADER, position);
    match id {
        Some(id) => m.headers_mut().insert(names::MESSAGE_ID, id.to_owned()),
        None => {
            m.headers_mut().remove(names::MESSAGE_ID);
        }
    }
    m
}

/// What a handled log says, read from its records.
#[derive(Clone, Debug, Default)]
pub struct Handled {
    positions: HashSet<(i32, i64)>,
    /// Records of an earlier Backstop: id → when written (latest).
    by_id: HashMap<String, Option<SystemTime>>,
}

impl Handled {
    /// Reads the log's records (any order). A record that names neither a
    /// position nor an id is ignored.
    pub fn read(records: impl IntoIterator<Item = Message>) -> Self {
        let mut h = Self::default();
        for r in records {
            if let Some(position) = r.headers().get(POSITION_HEADER) {
                if let Some(p) = parse_position(position) {
                    h.positions.insert(p);
                }
                continue;
            }
            let Some(id) = r.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
                continue;
            };
            let at = r.timestamp();
            let e = h.by_id.entry(id).or_insert(at);
            *e = match (*e, at) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        h
    }

    /// True when the letter `letter` at `partition`/`offset` was handled.
    pub fn covers(&self, letter: &Message, partition: i32, offset: i64) -> bool {
        if self.positions.contains(&(partition, offset)) {
            return true;
        }
        let Some(written) = letter.id().and_then(|id| self.by_id.get(id)) else {
            return false;
        };
        match (letter.timestamp(), written) {
            (Some(arrived), Some(written)) => arrived <= *written,
            _ => true,
        }
    }

    /// How many records say something (for a DLQ depth: retained records
    /// minus these).
    pub fn len(&self) -> usize {
        self.positions.len() + self.by_id.len()
    }

    /// True when nothing was handled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_letter_is_handled_at_its_position_not_wherever_its_id_appears() {
        let h = Handled::read([handled_record(0, 7, Some("a"), "purged".into())]);
        let letter = Message::new("x").with_header(names::MESSAGE_ID, "a");
        assert!(h.covers(&letter, 0, 7));
        assert!(!h.covers(&letter, 0, 8), "the same id failing again");
        assert!(!h.covers(&letter, 1, 7));
    }

    #[test]
    fn records_of_an_earlier_backstop_cover_the_letters_before_them() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let old = Message::new("replayed to x")
            .with_key("a")
            .with_timestamp(t);
        let h = Handled::read([old]);
        let before = Message::new("x")
            .with_header(names::MESSAGE_ID, "a")
            .with_timestamp(t - Duration::from_secs(5));
        let after = before.clone().with_timestamp(t + Duration::from_secs(5));
        assert!(h.covers(&before, 0, 1));
        assert!(!h.covers(&after, 0, 2), "failed again after the replay");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1_000))]

        /// Whatever a handled log holds (anyone may write to it), reading
        /// it and asking it never panics.
        #[test]
        fn any_log_reads_without_a_panic(
            records in proptest::collection::vec(
                (
                    proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24)),
                    proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24)),
                    proptest::option::of(proptest::prelude::any::<u64>()),
                ),
                0..16,
            ),
            partition in proptest::prelude::any::<i32>(),
            offset in proptest::prelude::any::<i64>(),
        ) {
            let log: Vec<Message> = records
                .into_iter()
                .map(|(key, position, ts)| {
                    let mut m = Message::new("x");
                    if let Some(k) = key {
                        m = m.with_key(k);
                    }
                    if let Some(p) = position {
                        m.headers_mut().insert(POSITION_HEADER, p);
                    }
                    if let Some(ms) = ts {
                        m = m.with_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(ms % (1 << 48)));
                    }
                    m
                })
                .collect();
            let h = Handled::read(log);
            let letter = Message::new("letter");
            let _ = h.covers(&letter, partition, offset);
            proptest::prop_assert!(h.len() <= 16);
        }
    }

    #[test]
    fn garbage_positions_are_ignored() {
        let mut bad = Message::new("?").with_key("k");
        bad.headers_mut().insert(POSITION_HEADER, "nine:ten");
        let h = Handled::read([bad]);
        assert!(h.is_empty());
    }
}
