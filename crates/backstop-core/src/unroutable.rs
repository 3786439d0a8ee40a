//! The local unroutable store: the last stop of a message whose DLQ refuses
//! even its stub (every header, no payload), for good (a size or length
//! policy, a destination that does not accept it). Rather than give the
//! original back to be delivered and handled again for ever, the runner
//! writes the whole failed copy (payload, every header, where it was going
//! and why it could not) to a file here, synced to disk, and only then acks
//! the original. `backstop unroutable list <dir>` shows what is there.
//!
//! One file per message, `<unix-ms>-<sha256 prefix>.json`, written to a
//! temporary name, synced and renamed, so a reader never sees half a file.
//! The directory is created on first use.

use crate::message::{Message, format_timestamp, parse_timestamp};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where a runner writes what no destination would take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnroutableStore {
    dir: PathBuf,
}

/// One message in the store.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Unroutable {
    /// Its file.
    pub path: PathBuf,
    /// When it was written.
    pub written_at: Option<SystemTime>,
    /// Where its copy was going (a DLQ, a tier).
    pub destination: String,
    /// Why the destination refused it.
    pub reason: String,
    /// The failed copy, whole.
    pub message: Message,
}

#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    written_at: Option<String>,
    destination: String,
    reason: String,
    key: Option<String>,
    /// `[name, base64 value or null]`, in order.
    headers: Vec<(String, Option<String>)>,
    payload: String,
}

impl UnroutableStore {
    /// A store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `message`, refused by `destination` for `reason`, durably;
    /// returns its file.
    pub async fn write(
        &self,
        message: &Message,
        destination: &str,
        reason: &str,
    ) -> std::io::Result<PathBuf> {
        let now = SystemTime::now();
        let record = Record {
            version: 1,
            written_at: format_timestamp(now),
            destination: destination.to_owned(),
            reason: reason.to_owned(),
            key: message.key().map(|k| STANDARD.encode(k)),
            headers: message
                .headers()
                .iter()
                .map(|h| (h.key.clone(), h.value.as_ref().map(|v| STANDARD.encode(v))))
                .collect(),
            payload: STANDARD.encode(message.payload()),
        };
        let bytes = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        let name = {
            use sha2::{Digest, Sha256};
            let digest = Sha256::digest(&bytes);
            let ms = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("{ms}-{hex}.json")
        };
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_durably(&dir, &name, &bytes))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Every message in the store, oldest first. A file that cannot be read
    /// is an error naming it; an empty or missing directory is no messages.
    pub fn list(&self) -> std::io::Result<Vec<Unroutable>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        paths.into_iter().map(|p| read(&p)).collect()
    }
}

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    // The rename itself, durable.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

fn read(path: &Path) -> std::io::Result<Unroutable> {
    let bad = |why: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )
    };
    let bytes = std::fs::read(path)?;
    let r: Record = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let decode = |s: &str| STANDARD.decode(s).map_err(|e| bad(e.to_string()));
    let key = r.key.as_deref().map(decode).transpose()?;
    let mut headers = crate::message::Headers::new();
    for (name, value) in &r.headers {
        let value = value.as_deref().map(decode).transpose()?;
        headers.append(name.clone(), value.map(Into::into));
    }
    let message = Message::from_parts(key.map(Into::into), decode(&r.payload)?.into(), headers);
    Ok(Unroutable {
        path: path.to_owned(),
        written_at: r.written_at.as_deref().and_then(parse_timestamp),
        destination: r.destination,
        reason: r.reason,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::names;

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(500))]

        /// A damaged or foreign file in the store is an error naming it,
        /// never a panic.
        #[test]
        fn any_file_reads_without_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let dir = std::env::temp_dir().join(format!(
                "backstop-unroutable-fuzz-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&dir).expect("dir");
            let path = dir.join("0-garbage.json");
            std::fs::write(&path, &bytes).expect("write");
            match read(&path) {
                Ok(u) => proptest::prop_assert_eq!(u.path, path.clone()),
                Err(e) => proptest::prop_assert!(e.to_string().contains("0-garbage.json")),
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[tokio::test]
    async fn a_message_comes_back_whole_with_where_and_why() {
        let dir = std::env::temp_dir().join(format!(
            "backstop-unroutable-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = UnroutableStore::new(&dir);
        assert!(store.list().expect("missing dir").is_empty());
        let m = Message::new(vec![0u8, 159, 255])
            .with_key(vec![1u8, 2])
            .with_header(names::ERROR_CLASS, "permanent")
            .with_header("binary", vec![0u8, 255]);
        let path = store
            .write(&m, "orders.dlq", "larger than the DLQ's limit")
            .await
            .expect("written");
        assert!(path.starts_with(&dir));
        let listed = store.list().expect("listed");
        assert_eq!(listed.len(), 1);
        let u = &listed[0];
        assert_eq!(u.destination, "orders.dlq");
        assert_eq!(u.reason, "larger than the DLQ's limit");
        assert_eq!(u.message.payload(), m.payload());
        assert_eq!(u.message.key(), m.key());
        assert_eq!(u.message.headers(), m.headers());
        assert!(u.written_at.is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
