//! The orders the quickstart publishes: most fine, some failing
//! transiently, some permanently, some not even JSON.

use crate::handler::Order;
use backstop::Message;

/// What kind of trouble message `i` of the scenario has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Handled at the first attempt.
    Fine,
    /// Fails twice, recovers through immediate retries.
    Blip,
    /// Fails four times, recovers after one delay tier.
    Outage,
    /// Always fails: exhausts retries and tiers, dead-lettered.
    Down,
    /// Quantity 0: permanent, dead-lettered at once.
    Invalid,
    /// Not JSON: poison, dead-lettered at once.
    Garbage,
}

/// The kind of message `i`.
pub fn kind(i: u32) -> Kind {
    match (i % 50, i % 20, i % 10) {
        (11, _, _) => Kind::Down,
        (_, 5, _) => Kind::Garbage,
        (_, 7, _) => Kind::Invalid,
        (_, 9, _) => Kind::Outage,
        (_, _, 3) => Kind::Blip,
        _ => Kind::Fine,
    }
}

pub(crate) fn message(i: u32) -> Message {
    let order = |quantity, flaky_attempts| Order {
        id: i,
        quantity,
        flaky_attempts,
    };
    let payload = match kind(i) {
        Kind::Garbage => format!("<order id={i}>not json</order>").into_bytes(),
        Kind::Fine => serde_json::to_vec(&order(1, 0)).expect("serialises"),
        Kind::Blip => serde_json::to_vec(&order(1, 2)).expect("serialises"),
        Kind::Outage => serde_json::to_vec(&order(1, 4)).expect("serialises"),
        Kind::Down => serde_json::to_vec(&order(1, u32::MAX)).expect("serialises"),
        Kind::Invalid => serde_json::to_vec(&order(0, 0)).expect("serialises"),
    };
    Message::new(payload).with_key(format!("customer-{}", i % 37))
}
