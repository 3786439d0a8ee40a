//! `backstop unroutable list`: what a worker's local unroutable store holds.

/// `backstop unroutable list`: a line per kept message (escaped), or one
/// JSON object per line with the letter's every header and payload.
pub(crate) fn unroutable(kept: &[backstop::unroutable::Unroutable], json: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if kept.is_empty() && !json {
        out.push_str("nothing kept\n");
    }
    for u in kept {
        let d = crate::record::DeadLetter::read(u.message.clone());
        let at = u
            .written_at
            .map_or_else(|| "unknown time".to_owned(), crate::output::shown_time);
        if json {
            let v = serde_json::json!({
                "file": u.path.display().to_string(),
                "written_at": u.written_at.map(crate::output::shown_time),
                "destination": u.destination,
                "reason": u.reason,
                "letter": crate::output::json_line(&d),
            });
            let _ = writeln!(out, "{v}");
        } else {
            let _ = writeln!(
                out,
                "{at}  -> {}  {}  {}  refused: {}  ({})",
                crate::terminal::esc(&u.destination),
                crate::terminal::esc(&d.id),
                crate::terminal::esc(&d.class),
                crate::terminal::esc(&u.reason),
                crate::terminal::esc(&u.path.display().to_string()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use backstop::Message;
    use backstop::message::names;
    use backstop::unroutable::UnroutableStore;

    #[tokio::test]
    async fn kept_messages_are_listed_escaped_and_as_json() {
        let dir = std::env::temp_dir().join(format!(
            "backstop-cli-unroutable-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = UnroutableStore::new(&dir);
        let m = Message::new("body")
            .with_header(names::MESSAGE_ID, "id-\u{1b}]52;c;evil\u{7}")
            .with_header(names::ERROR_CLASS, "permanent");
        store
            .write(&m, "orders.dlq", "too large \u{1b}[31m")
            .await
            .expect("written");
        let listed = store.list().expect("listed");
        let text = super::unroutable(&listed, false);
        assert!(
            !text.contains('\u{1b}'),
            "no raw escape reaches the terminal: {text:?}"
        );
        assert!(
            text.contains("-> orders.dlq") && text.contains("permanent"),
            "{text}"
        );
        let json = super::unroutable(&listed, true);
        let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON line");
        assert_eq!(v["destination"], "orders.dlq");
        assert_eq!(v["reason"], "too large \u{1b}[31m", "JSON stays exact");
        assert_eq!(v["letter"]["id"], "id-\u{1b}]52;c;evil\u{7}");
        assert_eq!(super::unroutable(&[], false), "nothing kept\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
