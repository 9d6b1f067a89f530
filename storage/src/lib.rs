//! Kiln's storage: every read and write of buildsets, build requests, claims, builds,
//! logs, progress and the reporters' outbox goes through the [`Store`] seam, to SQLite
//! (one file, the embedded default) or PostgreSQL (several masters on one database).
//!
//! Layout: [`seam`] declares the seam in one part per entity; [`params`](crate::params)
//! holds what its methods take and give back; [`query`] the typed collection queries;
//! `sql` is the dialect layer (a statement written once, spelled by each backend) and
//! `common` the parts whose SQL is the same on every backend, written once over it;
//! `validate` and [`text`] the rules every write follows; `rows` decodes rows of either
//! backend; [`sqlite`] and [`postgres`] are the backends, one file per part, with what
//! truly differs between them: the hot path's batch statements, locking, the outbox's
//! writes and notifications.
//!
//! Architecture invariants: SQL exists only in this crate; nothing here knows wasm,
//! HTTP, executors or the scheduler. Every backend passes the same conformance suite
//! (`storage/tests/conformance/`).

mod collections;
mod common;
mod error;
mod filters;
mod idempotency;
mod lock_budget;
mod params;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod query;
mod rows;
pub mod seam;
mod sql;
pub mod sqlite;
pub mod text;
mod validate;

use std::sync::Arc;
use std::time::Duration;

pub use error::{Result, StorageError};
pub(crate) use error::{clamp_u64, found_or};
// Only PostgreSQL's writes turn foreign-key errors into not-found ones by hand.
#[cfg(feature = "postgres")]
pub(crate) use error::fk_to_not_found;
pub use filters::{
    BuildFilter, BuildsetFilter, ClaimFilter, RequestFilter, RequestOrder, RequestOrderField,
};
pub use params::*;
pub use query::{
    BuildField, BuilderField, BuildsetField, Field, FieldType, Filter, FilterValue, MasterField,
    Op, Page, Query, RequestField,
};
pub use seam::{CommitStats, Store};

/// Opens the store named by a database URL and brings its schema up to date.
///
/// `sqlite://path/to/kiln.db` (created if missing) and `sqlite::memory:` are understood;
/// a bare path is taken as a SQLite file. `postgres://user@host/db` (or `postgresql://`)
/// opens a PostgreSQL database, which must exist; `?options=-c%20search_path%3Dname`
/// puts Kiln's tables in another schema.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    open_with(url, &StoreOptions::default()).await
}

/// Like [`open`], with options.
pub async fn open_with(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(Arc::new(postgres::PostgresStore::open(url, options).await?));
        #[cfg(not(feature = "postgres"))]
        return Err(StorageError::BadUrl {
            url: display_url(url),
            reason: "this Kiln was built without PostgreSQL (the `postgres` feature)".into(),
        });
    }
    if let Some((scheme, _)) = url.split_once("://")
        && scheme != "sqlite"
    {
        return Err(StorageError::BadUrl {
            url: url.to_owned(),
            reason: format!("unsupported scheme {scheme:?}: expected sqlite:// or postgres://"),
        });
    }
    Ok(Arc::new(sqlite::SqliteStore::open(url, options).await?))
}

/// A database URL fit for messages: a password in it is replaced by `***`.
pub fn display_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_owned(),
    }
}

/// The URL of a database given as a URL or as a SQLite file path.
pub fn database_url(database: &str) -> String {
    if database.contains("://") || database.starts_with("sqlite:") {
        database.to_owned()
    } else {
        format!("sqlite://{database}")
    }
}

/// Whether a database names a SQLite file (a path or a `sqlite:` URL).
pub fn is_sqlite(database: &str) -> bool {
    database_url(database).starts_with("sqlite:")
}

/// Tuning for a store connection.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a write waits for another process's write lock before failing.
    pub busy_timeout: Duration,
    /// The most connections a store keeps open.
    pub max_connections: u32,
    /// Whether to create the database when it does not exist (tools that only read or
    /// control existing work turn this off, so that a mistyped path is an error).
    pub create_if_missing: bool,
    /// How hard a commit works to survive a power cut.
    pub durability: Durability,
    /// SQLite: how often a background connection copies the write-ahead log into the
    /// database file (see [`DEFAULT_CHECKPOINT_INTERVAL`]). Zero leaves checkpoints to
    /// the writer, as SQLite does by default.
    pub checkpoint_interval: Duration,
}

/// How hard a commit works to survive a power cut (SQLite's `synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// The default: in WAL mode nothing is lost when a process dies, but a power cut or
    /// an OS crash may lose the last commits. Commits cost no disk flush.
    #[default]
    Normal,
    /// Every commit waits for the disk: survives a power cut, costs a flush per commit.
    Full,
}

/// How long a SQLite write waits for another writer: long enough to ride out a burst of
/// claims from several masters on one file.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a SQLite store checkpoints its write-ahead log in the background. SQLite
/// otherwise checkpoints on the writer's own turn every 1,000 pages, and that commit then
/// waits for the checkpoint's copy and disk flush: on this machine the 15 ms at the p99
/// of submit-to-start. Off the writer, a checkpoint runs beside the writes (SQLite's
/// PASSIVE mode never blocks a writer).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// Connections per store: SQLite serialises writes anyway, a few readers help the API.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            create_if_missing: true,
            durability: Durability::Normal,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
        }
    }
}
