/// `backstop-error-message` is cut to this many bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4 * 1024;
/// `backstop-error-chain` is cut to this many bytes.
pub const MAX_ERROR_CHAIN_BYTES: usize = 8 * 1024;

const MARKER: &str = "…[truncated]";

/// Cuts `s` to at most `max` bytes on a character boundary. When it had to cut,
/// the result ends with `…[truncated]` (still within `max`), so a reader knows.
pub fn truncate_utf8(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    if max < MARKER.len() {
        return s[..floor_boundary(s, max)].to_owned();
    }
    let keep = floor_boundary(s, max - MARKER.len());
    let mut out = String::with_capacity(keep + MARKER.len());
    out.push_str(&s[..keep]);
    out.push_str(MARKER);
    out
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_are_kept_whole() {
        assert_eq!(truncate_utf8("boom", 4096), "boom");
        let exact = "x".repeat(4096);
        assert_eq!(truncate_utf8(&exact, 4096), exact);
    }

    #[test]
    fn long_strings_are_cut_within_the_limit_with_a_marker() {
        let long = "a".repeat(10_000);
        let cut = truncate_utf8(&long, MAX_ERROR_MESSAGE_BYTES);
        assert!(cut.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(cut.ends_with("…[truncated]"));
        assert!(cut.starts_with(&"a".repeat(4000)));
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        // 'é' is 2 bytes, '💥' is 4: every cut position must land on a boundary.
        for max in [13usize, 14, 15, 16, 17, 100, 4096, 8192] {
            let s = "é💥".repeat(3000);
            let cut = truncate_utf8(&s, max);
            assert!(cut.len() <= max, "max {max}: got {}", cut.len());
            assert!(std::str::from_utf8(cut.as_bytes()).is_ok());
            let body = cut.trim_end_matches("…[truncated]");
            assert!(s.starts_with(body));
        }
    }

    #[test]
    fn tiny_limits_still_respect_the_bound() {
        assert_eq!(truncate_utf8("💥💥", 5), "💥");
        assert_eq!(truncate_utf8("💥💥", 3), "");
    }
}
