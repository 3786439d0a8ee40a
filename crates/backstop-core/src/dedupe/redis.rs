//! The Redis dedupe store: shared by every instance of a service.

use super::{Claim, DedupeError, DedupeStore};
use crate::transport::{BoxFuture, redacted};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};
use std::fmt;
use std::time::Duration;

/// The key prefix unless [`RedisDedupeStore::with_prefix`] sets another.
const DEFAULT_PREFIX: &str = "backstop:dedupe:";

/// The value of a done key.
const DONE: &str = "d";

/// Deletes `KEYS[1]` only while its value is `ARGV[1]` (the caller's claim).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";

/// A dedupe store in Redis, shared by every instance of a service. A claim
/// is `SET <prefix><key> "c:<owner>" NX PX <lease>`, a done mark
/// `SET <prefix><key> "d" PX <retention>`; Redis expires both, so there is
/// nothing to sweep. The connection is a [`ConnectionManager`], which
/// reconnects after Redis restarts or the network drops.
///
/// Cloning is cheap and shares the connection.
///
/// ```no_run
/// use backstop_core::dedupe::{Dedupe, RedisDedupeStore};
/// # async fn demo() -> Result<(), backstop_core::dedupe::DedupeError> {
/// let store = RedisDedupeStore::connect("redis://127.0.0.1:6379")
///     .await?
///     .with_prefix("orders:dedupe:");
/// let dedupe = Dedupe::new(store);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisDedupeStore {
    conn: ConnectionManager,
    /// The URL with any password replaced by `***`.
    url: String,
    prefix: String,
    release: Script,
}

impl fmt::Debug for RedisDedupeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDedupeStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisDedupeStore {
    /// Connects to Redis at `url` (`redis://[user][:password@]host[:port][/db]`,
    /// `rediss://` needs TLS support in the `redis` crate). Fails when the
    /// URL is invalid or Redis cannot be reached now; once connected, the
    /// store reconnects by itself.
    pub async fn connect(url: &str) -> Result<Self, DedupeError> {
        let shown = redacted(url);
        let client = Client::open(url)
            .map_err(|e| DedupeError::new(format!("redis {shown}: invalid URL")).with_source(e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| DedupeError::new(format!("redis {shown}: connect")).with_source(e))?;
        Ok(Self {
            conn,
            url: shown,
            prefix: DEFAULT_PREFIX.to_owned(),
            release: Script::new(RELEASE),
        })
    }

    /// Prefixes every key with `prefix` (default `"backstop:dedupe:"`), e.g.
    /// to keep services or environments that share a Redis apart.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn error(&self, what: &str, key: &str, e: RedisError) -> DedupeError {
        DedupeError::new(format!("redis {}: {what} {key:?}", self.url)).with_source(e)
    }

    async fn claim_inner(
        &self,
        key: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Claim, DedupeError> {
        let full = self.key(key);
        let value = format!("c:{owner}");
        let mut conn = self.conn.clone();
        // A key that expires between the SET and the GET is tried again once;
        // one that vanishes twice in a row counts as busy (the caller waits).
        for _ in 0..2 {
            let set: Option<String> = redis::cmd("SET")
                .arg(&full)
                .arg(&value)
                .arg("NX")
                .arg("PX")
                .arg(millis(lease))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error("claim", key, e))?;
            if set.is_some() {
                return Ok(Claim::Claimed);
            }
            let current: Option<String> = redis::cmd("GET")
                .arg(&full)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error("claim", key, e))?;
            match current {
                Some(v) if v.starts_with(DONE) => return Ok(Claim::Done),
                Some(_) => return Ok(Claim::Busy),
                None => {}
            }
        }
        Ok(Claim::Busy)
    }

    async fn complete_inner(&self, key: &str, retention: Duration) -> Result<(), DedupeError> {
        let mut conn = self.conn.clone();
        let _: Option<String> = redis::cmd("SET")
            .arg(self.key(key))
            .arg(DONE)
            .arg("PX")
            .arg(millis(retention))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error("complete", key, e))?;
        Ok(())
    }

    async fn release_inner(&self, key: &str, owner: &str) -> Result<(), DedupeError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .release
            .key(self.key(key))
            .arg(format!("c:{owner}"))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error("release", key, e))?;
        Ok(())
    }
}

/// `d` in whole milliseconds for `PX`: at least 1 (Redis rejects 0).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl DedupeStore for RedisDedupeStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupeError>> {
        Box::pin(self.claim_inner(key, owner, lease))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        _owner: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<(), DedupeError>> {
        Box::pin(self.complete_inner(key, retention))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupeError>> {
        Box::pin(self.release_inner(key, owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::check_store_contract;
    use std::error::Error as _;

    /// `BACKSTOP_REDIS_URL`, else the local Redis.
    fn url() -> String {
        std::env::var("BACKSTOP_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// A connected store with a prefix of its own; fails (never skips) when
    /// Redis is not running.
    async fn store(prefix: &str) -> RedisDedupeStore {
        let url = url();
        match RedisDedupeStore::connect(&url).await {
            Ok(store) => store.with_prefix(prefix),
            Err(e) => {
                let mut msg = e.to_string();
                let mut source = e.source();
                while let Some(s) = source {
                    let s_text = s.to_string();
                    if !msg.ends_with(&s_text) {
                        msg.push_str(": ");
                        msg.push_str(&s_text);
                    }
                    source = s.source();
                }
                panic!(
                    "Redis is not reachable at {} ({msg}). These tests need it: start it with \
                     `redis-server --daemonize yes` (or run ./scripts/test.sh), or point \
                     BACKSTOP_REDIS_URL at one.",
                    redacted(&url)
                )
            }
        }
    }

    fn unique_prefix() -> String {
        format!("backstop-test:dedupe:{}:", uuid::Uuid::now_v7())
    }

    #[tokio::test]
    async fn redis_store_keeps_the_contract() {
        let store = store("backstop-test:dedupe:").await;
        let prefix = format!("contract-{}", uuid::Uuid::now_v7());
        check_store_contract(&store, &prefix, |d| tokio::time::sleep(d)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_instances_claim_each_key_once() {
        let prefix = unique_prefix();
        let (a, b) = tokio::join!(store(&prefix), store(&prefix));
        let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
        let lease = Duration::from_secs(60);
        let claim_all = |store: RedisDedupeStore, owner: &'static str, reverse: bool| {
            let mut keys = keys.clone();
            if reverse {
                keys.reverse();
            }
            tokio::spawn(async move {
                let claims = futures_util::future::join_all(
                    keys.iter().map(|k| store.claim(k, owner, lease)),
                )
                .await;
                keys.into_iter()
                    .zip(claims)
                    .map(|(k, c)| (k, c.expect("claim")))
                    .collect::<std::collections::HashMap<_, _>>()
            })
        };
        let (got_a, got_b) = tokio::join!(
            claim_all(a.clone(), "a", false),
            claim_all(b.clone(), "b", true)
        );
        let (got_a, got_b) = (got_a.expect("task a"), got_b.expect("task b"));
        for key in &keys {
            let pair = (got_a[key], got_b[key]);
            assert!(
                matches!(
                    pair,
                    (Claim::Claimed, Claim::Busy) | (Claim::Busy, Claim::Claimed)
                ),
                "{key}: {pair:?}: exactly one instance must claim it"
            );
        }
        for key in &keys {
            let (store, owner) = if got_a[key] == Claim::Claimed {
                (&a, "a")
            } else {
                (&b, "b")
            };
            store.release(key, owner).await.expect("release");
        }
    }

    #[tokio::test]
    async fn errors_name_the_url_without_the_password() {
        let err = RedisDedupeStore::connect("redis://:hunter2@127.0.0.1:1/0")
            .await
            .expect_err("nothing listens on port 1");
        let msg = err.to_string();
        assert!(msg.contains("redis://:***@127.0.0.1:1/0"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redacted("redis://:pw@host:6379/2"),
            "redis://:***@host:6379/2"
        );
        assert_eq!(redacted("rediss://user:p@w@host"), "rediss://user:***@host");
        assert_eq!(redacted("redis://user@host"), "redis://user@host");
        assert_eq!(
            redacted("redis+unix:///tmp/r.sock?db=1&pass=pw"),
            "redis+unix:///tmp/r.sock?db=1&pass=***"
        );
        assert_eq!(redacted("not a url"), "not a url");
    }
}
