//! What a delivery's headers and broker count are believed for: attempt
//! headers only on sources the framework owns (HEADERS.md, "Trust"), a
//! malformed framework header counted and ignored, a delivery count over
//! the handler's limit ended without handling.

use super::ctx::Ctx;
use super::invoke::Failed;
use crate::delivered::Delivered;
use crate::message::{RetryMeta, names};
use crate::stats::RunnerStats;

/// The attempt headers of `d`, under the trust rule: read on owned sources
/// (tiers, replays), default on a main source.
pub(super) fn retry_meta<T>(ctx: &Ctx<T>, d: &Delivered) -> RetryMeta {
    if d.source.kind.is_owned() {
        let (meta, malformed) = RetryMeta::read(d.message.headers());
        for m in malformed {
            count_malformed(ctx, m.header, &m.reason);
        }
        meta
    } else {
        if let Some(note) = d.message.headers().get_str(names::DROPPED_HEADERS) {
            count_malformed(ctx, names::DROPPED_HEADERS, note);
        }
        RetryMeta::default()
    }
}

/// The failure of a delivery the broker counts past the handler's
/// `max_deliveries`: it is dead-lettered without handling.
pub(super) fn over_delivery_limit<T>(ctx: &Ctx<T>, d: &Delivered) -> Option<Failed> {
    let (Some(limit), Some(count)) = (ctx.route.max_deliveries, d.source.delivery_count) else {
        return None;
    };
    if count <= limit {
        return None;
    }
    let failed = Failed::delivery_limit(count, limit);
    ctx.metrics.error(failed.class);
    tracing::warn!(
        count,
        limit,
        "delivery limit exceeded: dead-lettering without handling"
    );
    Some(failed)
}

pub(super) fn count_malformed<T>(ctx: &Ctx<T>, header: &'static str, reason: &str) {
    RunnerStats::bump(&ctx.shared.stats.malformed_headers);
    ctx.metrics.malformed_header(header);
    tracing::warn!(header, reason, "malformed framework header ignored");
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`),
/// `None` when the header is malformed or the id is all zeros.
pub(crate) fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0'))
    .then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::trace_id;

    #[test]
    fn trace_ids_come_only_from_well_formed_traceparents() {
        let t = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id(&format!("00-{t}-00f067aa0ba902b7-01")), Some(t));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }
}
