//! Text from brokers made safe for a terminal: any producer can put ESC and
//! OSC sequences (colour, cursor moves, window titles, hyperlinks, the
//! clipboard) or a carriage return that overwrites a line into a header, an
//! error message or a payload. Every human-readable output shows such
//! characters escaped; `--json` stays exact (JSON escapes them itself).

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as it is: control characters (C0,
/// DEL, C1, line breaks and tabs included, so one value stays one line) and
/// the bidirectional overrides that make text read other than it is.
fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character written as an escape (`\x1b`, `\n`,
/// `\u{202e}`); borrowed when there is none.
pub fn esc(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) && u32::from(c) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` line by line, each escaped: for text that is meant to span lines
/// (an error chain, a text payload).
pub fn esc_lines(s: &str) -> impl Iterator<Item = Cow<'_, str>> {
    s.lines().map(esc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_act_on_and_nothing_else() {
        assert!(matches!(esc("plain text, ünïcode ✓"), Cow::Borrowed(_)));
        assert_eq!(esc("\x1b[31mred\x1b[0m"), "\\x1b[31mred\\x1b[0m");
        assert_eq!(
            esc("\x1b]52;c;aGk=\x07"),
            "\\x1b]52;c;aGk=\\x07",
            "OSC 52 (clipboard)"
        );
        assert_eq!(esc("a\rb\nc\td"), "a\\rb\\nc\\td");
        assert_eq!(esc("\u{9b}2J"), "\\x9b2J", "C1 CSI");
        assert_eq!(esc("\u{7f}"), "\\x7f");
        assert_eq!(esc("abc\u{202e}fed"), "abc\\u{202e}fed");
        let lines: Vec<_> = esc_lines("one\n\x1btwo").collect();
        assert_eq!(lines, ["one", "\\x1btwo"]);
    }
}
