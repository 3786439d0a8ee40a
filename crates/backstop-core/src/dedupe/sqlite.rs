//! The SQLite dedupe store: one node, survives restarts.

use super::{Claim, DedupeError, DedupeStore};
use crate::transport::BoxFuture;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `state` of a claimed row.
const CLAIMED: i64 = 0;
/// `state` of a done row.
const DONE: i64 = 1;
/// Expired rows are swept after this many claims...
const SWEEP_EVERY_CLAIMS: u64 = 1_000;
/// ...or when this much time has passed since the last sweep.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How long a write waits for another process holding the file's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dedupe (
    key TEXT PRIMARY KEY NOT NULL,
    owner TEXT NOT NULL,
    state INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dedupe_expires_at ON dedupe (expires_at_ms);
";

const UPSERT: &str = "
INSERT INTO dedupe (key, owner, state, expires_at_ms) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (key) DO UPDATE SET
    owner = excluded.owner,
    state = excluded.state,
    expires_at_ms = excluded.expires_at_ms
";

/// A dedupe store in a SQLite file (WAL mode): claims and done marks of one
/// node that survive a restart. Times are wall-clock milliseconds since the
/// Unix epoch, so leases and retention keep counting while the process is
/// down. Expired rows are swept every 1,000 claims or once a minute.
///
/// Cloning is cheap and shares the connection.
///
/// ```no_run
/// use backstop_core::dedupe::{Dedupe, SqliteDedupeStore};
/// let store = SqliteDedupeStore::open("/var/lib/my-service/dedupe.sqlite")?;
/// let dedupe = Dedupe::new(store);
/// # Ok::<(), backstop_core::dedupe::DedupeError>(())
/// ```
#[derive(Clone)]
pub struct SqliteDedupeStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
    claims: AtomicU64,
    last_sweep_ms: AtomicU64,
}

impl fmt::Debug for SqliteDedupeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteDedupeStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl SqliteDedupeStore {
    /// Opens (creating if needed) the store at `path`: WAL journal, the
    /// `dedupe` table and its expiry index.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DedupeError> {
        let path = path.as_ref().to_path_buf();
        let fail = |what: &str, e: rusqlite::Error| {
            DedupeError::new(format!("sqlite {}: {what}", path.display())).with_source(e)
        };
        let conn = Connection::open(&path).map_err(|e| fail("open", e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| fail("set busy timeout", e))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(|e| fail("set WAL journal mode", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DedupeError::new(format!(
                "sqlite {}: journal mode is {mode:?}, WAL expected",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| fail("set synchronous", e))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| fail("create the dedupe table", e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                conn: Mutex::new(conn),
                claims: AtomicU64::new(0),
                last_sweep_ms: AtomicU64::new(now_ms().max(0).cast_unsigned()),
            }),
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `work` on the connection in the blocking pool.
    fn run<'a, T, F>(&'a self, what: String, work: F) -> BoxFuture<'a, Result<T, DedupeError>>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let joined = tokio::task::spawn_blocking(move || {
                let mut conn = inner.lock();
                work(&inner, &mut conn)
            })
            .await;
            let path = self.inner.path.display();
            match joined {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => {
                    Err(DedupeError::new(format!("sqlite {path}: {what}")).with_source(e))
                }
                Err(e) => Err(DedupeError::new(format!(
                    "sqlite {path}: {what}: the blocking task failed"
                ))
                .with_source(e)),
            }
        })
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deletes expired rows every [`SWEEP_EVERY_CLAIMS`] claims or
    /// [`SWEEP_EVERY`], whichever comes first.
    fn maybe_sweep(&self, conn: &Connection, now: i64) -> rusqlite::Result<()> {
        let claims = self.claims.fetch_add(1, Ordering::Relaxed) + 1;
        let now_u = now.max(0).cast_unsigned();
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        let every_ms = u64::try_from(SWEEP_EVERY.as_millis()).unwrap_or(u64::MAX);
        if !claims.is_multiple_of(SWEEP_EVERY_CLAIMS) && now_u.saturating_sub(last) < every_ms {
            return Ok(());
        }
        self.last_sweep_ms.store(now_u, Ordering::Relaxed);
        let swept = conn.execute("DELETE FROM dedupe WHERE expires_at_ms < ?1", params![now])?;
        tracing::debug!(path = %self.path.display(), swept, "dedupe store: swept expired keys");
        Ok(())
    }
}

/// Wall-clock milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `now + d` in milliseconds, saturating.
fn after(now: i64, d: Duration) -> i64 {
    now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl DedupeStore for SqliteDedupeStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupeError>> {
        let (key, owner) = (key.to_owned(), owner.to_owned());
        self.run(format!("claim {key:?}"), move |inner, conn| {
            let now = now_ms();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT state, expires_at_ms FROM dedupe WHERE key = ?1",
                    params![key],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let claim = match found {
                Some((DONE, expires)) if expires > now => Claim::Done,
                Some((CLAIMED, expires)) if expires > now => Claim::Busy,
                _ => {
                    tx.execute(UPSERT, params![key, owner, CLAIMED, after(now, lease)])?;
                    Claim::Claimed
                }
            };
            tx.commit()?;
            // The claim is committed: a failed sweep must not turn it into an
            // error (a retry would then find its own claim busy).
            if let Err(e) = inner.maybe_sweep(conn, now) {
                tracing::warn!(
                    path = %inner.path.display(),
                    error = %e,
                    "dedupe store: sweeping expired keys failed"
                );
            }
            Ok(claim)
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<(), DedupeError>> {
        let (key, owner) = (key.to_owned(), owner.to_owned());
        self.run(format!("complete {key:?}"), move |_, conn| {
            let expires = after(now_ms(), retention);
            conn.execute(UPSERT, params![key, owner, DONE, expires])?;
            Ok(())
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupeError>> {
        let (key, owner) = (key.to_owned(), owner.to_owned());
        self.run(format!("release {key:?}"), move |_, conn| {
            conn.execute(
                "DELETE FROM dedupe WHERE key = ?1 AND owner = ?2 AND state = ?3",
                params![key, owner, CLAIMED],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::check_store_contract;

    /// A fresh folder under the temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "backstop-dedupe-sqlite-{}",
                uuid::Uuid::now_v7().simple()
            ));
            std::fs::create_dir_all(&dir).expect("create the temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn sqlite_store_keeps_the_contract() {
        let dir = TempDir::new();
        let store = SqliteDedupeStore::open(dir.0.join("dedupe.sqlite")).expect("open");
        let prefix = format!("t-{}", uuid::Uuid::now_v7());
        check_store_contract(&store, &prefix, |d| tokio::time::sleep(d)).await;
    }

    #[tokio::test]
    async fn done_survives_a_restart() {
        let dir = TempDir::new();
        let path = dir.0.join("dedupe.sqlite");
        let hour = Duration::from_secs(3600);
        {
            let store = SqliteDedupeStore::open(&path).expect("open");
            assert_eq!(
                store.claim("k", "w1", hour).await.expect("claim"),
                Claim::Claimed
            );
            store.complete("k", "w1", hour).await.expect("complete");
            assert_eq!(
                store.claim("held", "w1", hour).await.expect("claim"),
                Claim::Claimed
            );
        }
        let store = SqliteDedupeStore::open(&path).expect("reopen");
        assert_eq!(
            store.claim("k", "w2", hour).await.expect("claim"),
            Claim::Done,
            "a done key is still done after reopening the file"
        );
        assert_eq!(
            store.claim("held", "w2", hour).await.expect("claim"),
            Claim::Busy,
            "a live lease is still held after reopening the file"
        );
        assert_eq!(
            store.claim("new", "w2", hour).await.expect("claim"),
            Claim::Claimed
        );
    }

    #[tokio::test]
    async fn sweep_deletes_expired_rows() {
        let dir = TempDir::new();
        let store = SqliteDedupeStore::open(dir.0.join("dedupe.sqlite")).expect("open");
        store
            .complete("old", "w1", Duration::ZERO)
            .await
            .expect("complete");
        store
            .complete("kept", "w1", Duration::from_secs(3600))
            .await
            .expect("complete");
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The next claim reaches the sweep threshold.
        store
            .inner
            .claims
            .store(SWEEP_EVERY_CLAIMS - 1, Ordering::Relaxed);
        let lease = Duration::from_secs(1);
        assert_eq!(
            store.claim("x", "w1", lease).await.expect("claim"),
            Claim::Claimed
        );
        let keys: Vec<String> = {
            let conn = store.inner.lock();
            let mut stmt = conn
                .prepare("SELECT key FROM dedupe ORDER BY key")
                .expect("prepare");
            stmt.query_map([], |row| row.get(0))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows")
        };
        assert_eq!(keys, ["kept", "x"]);
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = TempDir::new();
        let path = dir.0.join("missing-folder").join("dedupe.sqlite");
        let err = SqliteDedupeStore::open(&path).expect_err("no such folder");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
