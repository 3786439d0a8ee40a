//! What the commands print: tables for people, JSON lines for tools.

use crate::record::DeadLetter;
use crate::terminal::{esc, esc_lines};
use backstop::message::format_timestamp;
use backstop::outbox::{OutboxStatus, StoredEntry};
use base64::Engine;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// A time for people: RFC 3339 UTC, or that no such date can be written
/// (a broker's timestamp can be anything).
pub(crate) fn shown_time(t: SystemTime) -> String {
    format_timestamp(t).unwrap_or_else(|| "(out of range)".to_owned())
}

/// The terminal width: `COLUMNS`, else 120.
pub fn width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|w| *w >= 40)
        .unwrap_or(120)
}

/// `3s`, `5m`, `2h`, `4d`: an age in its largest whole unit.
pub fn age(since: Option<SystemTime>, now: SystemTime) -> String {
    let Some(d) = since.and_then(|t| now.duration_since(t).ok()) else {
        return "-".to_owned();
    };
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Cuts `s` to `max` characters, marking the cut with `…`; one line.
pub fn cut(s: &str, max: usize) -> String {
    let one_line = esc(&s.replace(['\n', '\r', '\t'], " ")).into_owned();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn pad(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n >= w {
        s.to_owned()
    } else {
        format!("{s}{}", " ".repeat(w - n))
    }
}

/// The `dlq list` table, the error column cut to `width`.
pub fn table(letters: &[DeadLetter], now: SystemTime, width: usize) -> String {
    let rows: Vec<[String; 5]> = letters
        .iter()
        .map(|d| {
            [
                esc(&d.id).into_owned(),
                age(d.failed_at, now),
                d.origin
                    .as_deref()
                    .map_or_else(|| "-".into(), |o| esc(o).into_owned()),
                esc(&d.class).into_owned(),
                d.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
            ]
        })
        .collect();
    let heads = ["ID", "AGE", "ORIGIN", "CLASS", "ATTEMPTS"];
    let mut widths = heads.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let used: usize = widths.iter().sum::<usize>() + 2 * widths.len();
    let error_width = width.saturating_sub(used).max(20);
    let mut out = String::new();
    let line = |cells: [&str; 5], error: &str, out: &mut String| {
        for (c, w) in cells.iter().zip(widths) {
            out.push_str(&pad(c, w));
            out.push_str("  ");
        }
        out.push_str(error);
        out.push('\n');
    };
    line(heads, "ERROR", &mut out);
    for (r, d) in rows.iter().zip(letters) {
        let cells = [
            r[0].as_str(),
            r[1].as_str(),
            r[2].as_str(),
            r[3].as_str(),
            r[4].as_str(),
        ];
        line(cells, &cut(&d.error_message, error_width), &mut out);
    }
    let _ = writeln!(out, "{} dead letter(s)", letters.len());
    out
}

fn payload_json(payload: &[u8]) -> Value {
    match std::str::from_utf8(payload) {
        Ok(s) => json!({ "text": s }),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(payload) }),
    }
}

fn header_value(v: Option<&[u8]>) -> Value {
    match v {
        None => Value::Null,
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) }),
        },
    }
}

/// A header value for people: text as it is (escaped by the caller),
/// Spring's big-endian numbers decoded (timestamps as times too), other
/// bytes as hex.
fn shown_header(key: &str, v: Option<&[u8]>) -> String {
    let Some(b) = v else {
        return "(null)".to_owned();
    };
    if crate::record::SPRING_NUMBERS.contains(&key)
        && let Some(n) = crate::record::spring_number(b)
    {
        return match crate::record::epoch_millis(n).filter(|_| key.ends_with("timestamp")) {
            Some(t) => format!("{n} ({})", shown_time(t)),
            None => n.to_string(),
        };
    }
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => {
            let mut hex = String::with_capacity(4 + 2 * b.len());
            hex.push_str("hex:");
            for byte in b {
                let _ = write!(hex, "{byte:02x}");
            }
            hex
        }
    }
}

/// One `dlq list --json` line: the parsed view, every header, the payload.
pub fn json_line(d: &DeadLetter) -> Value {
    let headers: Vec<Value> = d
        .message
        .headers()
        .iter()
        .map(|h| json!([h.key, header_value(h.value.as_deref())]))
        .collect();
    json!({
        "id": d.id,
        "key": d.key,
        "convention": d.convention.as_str(),
        "class": d.class,
        "error_type": d.error_type,
        "error_message": d.error_message,
        "fingerprint": d.fingerprint,
        "origin": d.origin,
        "failed_at": d.failed_at.and_then(format_timestamp),
        "attempts": d.attempts,
        "reason": d.reason,
        "headers": headers,
        "payload": payload_json(d.message.payload()),
    })
}

/// `dlq show`: every header, the error chain, the payload (pretty when JSON).
pub fn show(d: &DeadLetter, now: SystemTime) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "id:          {}", esc(&d.id));
    let _ = writeln!(out, "key:         {}", esc(d.key.as_deref().unwrap_or("-")));
    let _ = writeln!(
        out,
        "origin:      {}",
        esc(d.origin.as_deref().unwrap_or("-"))
    );
    let _ = writeln!(
        out,
        "failed:      {} ({} ago)",
        d.failed_at.map_or_else(|| "-".into(), shown_time),
        age(d.failed_at, now)
    );
    let _ = writeln!(
        out,
        "class:       {} ({})",
        esc(&d.class),
        d.convention.as_str()
    );
    let _ = writeln!(
        out,
        "reason:      {}",
        esc(d.reason.as_deref().unwrap_or("-"))
    );
    let _ = writeln!(
        out,
        "attempts:    {}",
        d.attempts.map_or_else(|| "-".into(), |a| a.to_string())
    );
    let _ = writeln!(out, "error type:  {}", esc(&d.error_type));
    let _ = writeln!(out, "error:       {}", esc(&d.error_message));
    let _ = writeln!(out, "fingerprint: {}", esc(&d.fingerprint));
    if !d.error_chain.is_empty() {
        let _ = writeln!(out, "\nerror chain:");
        for l in esc_lines(&d.error_chain) {
            let _ = writeln!(out, "  {l}");
        }
    }
    let _ = writeln!(out, "\nheaders:");
    for h in d.message.headers().iter() {
        let value = shown_header(&h.key, h.value.as_deref());
        let _ = writeln!(out, "  {}: {}", esc(&h.key), esc(&value));
    }
    let _ = writeln!(out, "\npayload ({} bytes):", d.message.payload().len());
    let payload = d.message.payload();
    // Pretty JSON escapes control characters in its strings itself.
    let body = match serde_json::from_slice::<Value>(payload) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(_) => match std::str::from_utf8(payload) {
            Ok(s) => esc_lines(s).collect::<Vec<_>>().join("\n"),
            Err(_) => format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(payload)
            ),
        },
    };
    let _ = writeln!(out, "{body}");
    out
}

/// Dead letters sharing one failure.
#[derive(Debug, Clone)]
pub struct Group<'a> {
    /// The fingerprint.
    pub fingerprint: String,
    /// How many.
    pub count: usize,
    /// Earliest and latest failure.
    pub first: Option<SystemTime>,
    /// Latest failure.
    pub last: Option<SystemTime>,
    /// One of them.
    pub sample: &'a DeadLetter,
}

/// Groups by fingerprint, largest group first.
pub fn group(letters: &[DeadLetter]) -> Vec<Group<'_>> {
    let mut by: BTreeMap<&str, Group<'_>> = BTreeMap::new();
    for d in letters {
        let g = by.entry(d.fingerprint.as_str()).or_insert_with(|| Group {
            fingerprint: d.fingerprint.clone(),
            count: 0,
            first: None,
            last: None,
            sample: d,
        });
        g.count += 1;
        if let Some(t) = d.failed_at {
            g.first = Some(g.first.map_or(t, |f| f.min(t)));
            g.last = Some(g.last.map_or(t, |l| l.max(t)));
        }
    }
    let mut groups: Vec<Group<'_>> = by.into_values().collect();
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.fingerprint.cmp(&b.fingerprint))
    });
    groups
}

/// One `dlq stats --json` line.
pub fn group_json(g: &Group<'_>) -> Value {
    json!({
        "fingerprint": g.fingerprint,
        "count": g.count,
        "class": g.sample.class,
        "error_type": g.sample.error_type,
        "error_message": g.sample.error_message,
        "first_seen": g.first.and_then(format_timestamp),
        "last_seen": g.last.and_then(format_timestamp),
        "sample_id": g.sample.id,
    })
}

/// The `dlq stats` table.
pub fn stats_table(groups: &[Group<'_>], total: usize, now: SystemTime) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{total} dead letter(s) in {} group(s), largest first",
        groups.len()
    );
    for g in groups {
        let _ = writeln!(
            out,
            "\n{:>6}  {}  {}  {}",
            g.count,
            esc(&g.fingerprint),
            esc(&g.sample.class),
            esc(&g.sample.error_type)
        );
        let _ = writeln!(out, "        {}", cut(&g.sample.error_message, 100));
        let _ = writeln!(
            out,
            "        first {} ago, last {} ago, e.g. {}",
            age(g.first, now),
            age(g.last, now),
            esc(&g.sample.id)
        );
    }
    out
}

/// `outbox status`.
pub fn outbox_status(path: &Path, s: &OutboxStatus, now: SystemTime) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "outbox:        {}", path.display());
    let _ = writeln!(
        out,
        "pending:       {} ({} bytes)",
        s.pending, s.pending_bytes
    );
    let _ = writeln!(out, "oldest:        {}", age(s.oldest_pending, now));
    let _ = writeln!(out, "dead (local):  {}", s.dead);
    out
}

/// `outbox list`.
pub fn outbox_entries(entries: &[StoredEntry], now: SystemTime) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "SEQ  AGE  DESTINATION  ATTEMPTS  ID  ERROR");
    for e in entries {
        let _ = writeln!(
            out,
            "{}  {}  {}  {}  {}  {}",
            e.seq,
            age(Some(e.accepted_at), now),
            esc(&e.destination),
            e.attempts,
            esc(e.message.id().unwrap_or("-")),
            cut(e.error.as_deref().unwrap_or("-"), 80)
        );
    }
    let _ = writeln!(
        out,
        "{} entr{}",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" }
    );
    out
}

/// A fixed `now` for snapshot tests.
pub fn fixed_now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000)
}

#[cfg(test)]
mod tests;
