//! A handler's dedupe store as `[handlers.<source>.dedupe]` names it.

use super::config::{DedupeSection, DedupeStoreName, WorkerConfigError};
use backstop_core::dedupe::{Dedupe, MemoryDedupeStore};

pub(super) async fn open(source: &str, d: &DedupeSection) -> Result<Dedupe, WorkerConfigError> {
    let field = |f: &str| format!("handlers.{source}.dedupe.{f}");
    let mut dedupe = match d.store {
        DedupeStoreName::Memory => Dedupe::new(MemoryDedupeStore::new()),
        DedupeStoreName::Sqlite => {
            #[cfg(feature = "dedupe-sqlite")]
            {
                let path = d.path.as_ref().ok_or_else(|| {
                    WorkerConfigError::new(field("path"), "the sqlite store needs a file path")
                })?;
                Dedupe::new(
                    backstop_core::dedupe::SqliteDedupeStore::open(path)
                        .map_err(|e| WorkerConfigError::new(field("path"), e.to_string()))?,
                )
            }
            #[cfg(not(feature = "dedupe-sqlite"))]
            return Err(WorkerConfigError::new(
                field("store"),
                "\"sqlite\" needs the backstop feature `dedupe-sqlite`",
            ));
        }
        DedupeStoreName::Redis => {
            #[cfg(feature = "dedupe-redis")]
            {
                let url = d.url.as_ref().ok_or_else(|| {
                    WorkerConfigError::new(field("url"), "the redis store needs a URL")
                })?;
                Dedupe::new(
                    backstop_core::dedupe::RedisDedupeStore::connect(url)
                        .await
                        .map_err(|e| {
                            WorkerConfigError::new(
                                field("url"),
                                format!("{}: {e}", backstop_core::transport::redacted(url)),
                            )
                        })?,
                )
            }
            #[cfg(not(feature = "dedupe-redis"))]
            return Err(WorkerConfigError::new(
                field("store"),
                "\"redis\" needs the backstop feature `dedupe-redis`",
            ));
        }
    };
    if let Some(h) = &d.key_header {
        dedupe = dedupe.with_key_header(h.clone());
    }
    if let Some(r) = d.retention {
        dedupe = dedupe.with_retention(r.0);
    }
    if let Some(l) = d.lease {
        dedupe = dedupe.with_lease(l.0);
    }
    Ok(dedupe)
}
