use bytes::Bytes;

/// One header. Kafka allows null values and duplicate keys, so both are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Raw value; `None` is a Kafka null header.
    pub value: Option<Bytes>,
}

/// Ordered headers with raw byte values; typed views live in [`RetryMeta`](crate::RetryMeta) & co.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<Header>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries, duplicates included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is no header.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All entries in order.
    pub fn iter(&self) -> impl Iterator<Item = &Header> {
        self.entries.iter()
    }

    /// The last value with this key (null values are skipped).
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .rev()
            .filter(|h| h.key == key)
            .find_map(|h| h.value.as_deref())
    }

    /// The last value with this key, if it is UTF-8.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// True when a header with this key exists.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.iter().any(|h| h.key == key)
    }

    /// Sets `key` to `value`, removing every other entry with that key.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Bytes>) {
        let key = key.into();
        self.remove(&key);
        self.entries.push(Header {
            key,
            value: Some(value.into()),
        });
    }

    /// Adds an entry, keeping existing ones with the same key.
    pub fn append(&mut self, key: impl Into<String>, value: Option<Bytes>) {
        self.entries.push(Header {
            key: key.into(),
            value,
        });
    }

    /// Removes every entry with this key; returns how many were removed.
    pub fn remove(&mut self, key: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|h| h.key != key);
        before - self.entries.len()
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, keep: impl FnMut(&Header) -> bool) {
        self.entries.retain(keep);
    }
}

impl FromIterator<(String, Option<Bytes>)> for Headers {
    fn from_iter<I: IntoIterator<Item = (String, Option<Bytes>)>>(iter: I) -> Self {
        Self {
            entries: iter
                .into_iter()
                .map(|(key, value)| Header { key, value })
                .collect(),
        }
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = &'a Header;
    type IntoIter = std::slice::Iter<'a, Header>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_every_duplicate_and_append_keeps_them() {
        let mut h = Headers::new();
        h.append("k", Some(Bytes::from_static(b"1")));
        h.append("k", Some(Bytes::from_static(b"2")));
        h.append("n", None);
        assert_eq!(h.get("k"), Some(&b"2"[..]));
        assert!(h.contains("n"));
        assert_eq!(h.get("n"), None);
        h.insert("k", "3");
        assert_eq!(h.iter().filter(|e| e.key == "k").count(), 1);
        assert_eq!(h.get_str("k"), Some("3"));
        assert_eq!(h.remove("k"), 1);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn get_str_refuses_invalid_utf8() {
        let mut h = Headers::new();
        h.insert("b", Bytes::from_static(&[0xff, 0xfe]));
        assert_eq!(h.get("b"), Some(&[0xff, 0xfe][..]));
        assert_eq!(h.get_str("b"), None);
    }
}
