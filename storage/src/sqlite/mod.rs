//! The SQLite backend: one file in WAL mode, zero set-up. The embedded default.
//!
//! Every transaction that reads before it writes starts with `BEGIN IMMEDIATE`, so that
//! several processes on one file serialise on SQLite's write lock instead of failing to
//! upgrade a read snapshot. Lists of ids travel as one JSON array (`json_each(?)`), which
//! keeps statements fixed and their prepared forms cached.

mod builds;
mod buildsets;
mod json;
mod masters;
mod outbox;
mod requests;

use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Sqlite, SqliteConnection};
use tokio::sync::Mutex;

use crate::sql::{Dialect, Sql, sqlx_builder};
use crate::{Durability, Result, StorageError, Store, StoreOptions};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite's "file is not a database" error code.
const SQLITE_NOTADB: &str = "26";

/// Page cache per connection, in KiB (SQLite's default is 2 MiB).
const PAGE_CACHE_KIB: u64 = 64 << 10;
/// How much of the database file each connection maps into memory for reading.
const MMAP_BYTES: u64 = 256 << 20;

/// With checkpoints in the background, the writer still checkpoints itself once the log
/// holds this many pages (64 MiB at 4 KiB pages): a backstop that bounds the log should
/// the background fall behind, far past what it lets accumulate.
const WRITER_CHECKPOINT_BACKSTOP_PAGES: u32 = 16_384;

/// SQLite's "unable to open database file" error code.
const SQLITE_CANTOPEN: &str = "14";

/// A Kiln store in one SQLite file.
///
/// Writes go through one connection the store owns, behind an async mutex: the tasks of
/// one process queue for it instead of racing for SQLite's write lock and sleeping in
/// its busy handler, and no pool bookkeeping is paid per write (measured: a pooled
/// UPDATE cost 159 µs, the same on a held connection 59 µs). Reads use a pool of their
/// own. Other processes on the same file still meet the busy timeout, which is what it
/// is for.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    writer: Arc<Mutex<SqliteConnection>>,
    reader: SqlitePool,
    /// Keeps the temporary file behind an in-memory database alive as long as the store.
    _scratch: Option<Arc<tempfile::TempDir>>,
}

impl SqliteStore {
    /// Opens (creating if missing) the SQLite database at `url` and migrates it.
    ///
    /// A file that is not a SQLite database, or one that holds tables but no Kiln schema,
    /// or one migrated by a newer Kiln, is refused with [`StorageError::NotKilnDatabase`].
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        // The writer and the readers are separate connections and must see one database,
        // which `:memory:` cannot give them: a private temporary file stands in for it.
        let scratch = match memory {
            true => Some(Arc::new(
                tempfile::tempdir().map_err(|e| StorageError::Database(sqlx::Error::Io(e)))?,
            )),
            false => None,
        };
        let base = match &scratch {
            Some(dir) => SqliteConnectOptions::new().filename(dir.path().join("memory.db")),
            None if url.starts_with("sqlite:") => {
                SqliteConnectOptions::from_str(url).map_err(|e| StorageError::BadUrl {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?
            }
            None => SqliteConnectOptions::new().filename(url),
        };
        let connect = base
            .create_if_missing(options.create_if_missing || memory)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode loses nothing when a process dies; only a power cut can
            // drop the last commits. It is what makes per-job commits cheap.
            .synchronous(match options.durability {
                Durability::Normal => SqliteSynchronous::Normal,
                Durability::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(options.busy_timeout)
            .foreign_keys(true)
            // A bigger page cache and memory-mapped reads keep the hot tables of a busy
            // engine off the read() path.
            .pragma("cache_size", format!("-{}", PAGE_CACHE_KIB))
            .pragma("mmap_size", MMAP_BYTES.to_string())
            .pragma("temp_store", "memory");
        let open_error = |e: sqlx::Error| match e {
            sqlx::Error::Database(db)
                if !options.create_if_missing && db.code().as_deref() == Some(SQLITE_CANTOPEN) =>
            {
                StorageError::Missing(url.to_owned())
            }
            e => not_kiln_or(url, e),
        };
        let background_checkpoints = !options.checkpoint_interval.is_zero();
        let mut writer = match background_checkpoints {
            true => connect
                .clone()
                .pragma(
                    "wal_autocheckpoint",
                    WRITER_CHECKPOINT_BACKSTOP_PAGES.to_string(),
                )
                .connect()
                .await
                .map_err(open_error)?,
            false => connect.connect().await.map_err(open_error)?,
        };
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // A local file connection does not go stale; pinging it before every use
            // doubled the cost of each read.
            .test_before_acquire(false)
            .connect_with(connect.clone())
            .await
            .map_err(open_error)?;
        check_foreign_schema(&mut writer, url).await?;
        MIGRATOR.run(&mut writer).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(v) => StorageError::NotKilnDatabase(format!(
                "{url} was written by a newer Kiln (it has migration {v}, which this Kiln does not know)"
            )),
            sqlx::migrate::MigrateError::VersionMismatch(v) => StorageError::NotKilnDatabase(format!(
                "{url} has a migration {v} that differs from this Kiln's: not a Kiln database"
            )),
            sqlx::migrate::MigrateError::Execute(inner) => not_kiln_or(url, inner),
            other => StorageError::Migration(other),
        })?;
        let writer = Arc::new(Mutex::new(writer));
        if background_checkpoints {
            let checkpointer = connect.connect().await.map_err(open_error)?;
            tokio::spawn(checkpoint_loop(
                checkpointer,
                options.checkpoint_interval,
                Arc::downgrade(&writer),
            ));
        }
        Ok(SqliteStore {
            writer,
            reader,
            _scratch: scratch,
        })
    }
}

/// Copies the write-ahead log into the database file every `every`, on a connection of
/// its own, until the store (its writer) is dropped. PASSIVE: it copies what no reader
/// still needs and never waits for, or blocks, the writer; the writer restarts the log
/// from its beginning once everything is copied.
async fn checkpoint_loop(
    mut conn: SqliteConnection,
    every: Duration,
    writer: Weak<Mutex<SqliteConnection>>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if writer.strong_count() == 0 {
            break;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            // The writer's backstop still bounds the log; say so once per failure.
            tracing::debug!(error = %e, "background WAL checkpoint failed");
        }
    }
    let _ = conn.close().await;
}

/// Refuses a database that already holds tables but not Kiln's migration history.
async fn check_foreign_schema(conn: &mut SqliteConnection, url: &str) -> Result<()> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| not_kiln_or(url, e))?;
    if !tables.is_empty() && !tables.iter().any(|t| t == "_sqlx_migrations") {
        return Err(StorageError::NotKilnDatabase(format!(
            "{url} is a SQLite database but not Kiln's (it has tables {}); refusing to touch it",
            tables.join(", ")
        )));
    }
    if tables.iter().any(|t| t == "_sqlx_migrations") && !tables.iter().any(|t| t == "buildsets") {
        return Err(StorageError::NotKilnDatabase(format!(
            "{url} holds another program's migrations, not Kiln's; refusing to touch it"
        )));
    }
    Ok(())
}
fn not_kiln_or(url: &str, e: sqlx::Error) -> StorageError {
    if let sqlx::Error::Database(db) = &e
        && db.code().as_deref() == Some(SQLITE_NOTADB)
    {
        return StorageError::NotKilnDatabase(format!(
            "{url} is not a SQLite database, so not a Kiln database"
        ));
    }
    StorageError::Database(e)
}

sqlx_builder!(Sqlite);

#[async_trait]
impl Dialect for SqliteStore {
    type Row = SqliteRow;
    const BYTE_ORDER: &'static str = "";
    const CONTAINS: &'static str = "instr";

    async fn read(&self, sql: Sql) -> Result<Vec<SqliteRow>> {
        Ok(builder(sql).build().fetch_all(&self.reader).await?)
    }

    async fn write(&self, sql: Sql) -> Result<u64> {
        let mut conn = self.writer.lock().await;
        Ok(builder(sql)
            .build()
            .execute(&mut *conn)
            .await?
            .rows_affected())
    }

    async fn write_all(&self, statements: Vec<Sql>) -> Result<u64> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let mut changed = 0;
        for sql in statements {
            changed += builder(sql)
                .build()
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn write_returning(&self, sql: Sql) -> Result<Vec<SqliteRow>> {
        let mut conn = self.writer.lock().await;
        Ok(builder(sql).build().fetch_all(&mut *conn).await?)
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }
}
