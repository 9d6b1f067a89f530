//! The SQLite backend: one file in WAL mode, zero set-up. The embedded default.
//!
//! Every write transaction starts with `BEGIN IMMEDIATE`, so that several processes on
//! one file serialise on SQLite's write lock instead of failing to upgrade a read
//! snapshot. The hot paths (submit, claim and start, finish) write row by row through
//! cached prepared statements; the colder ones pass lists of ids as one JSON array
//! (`json_each(?)`), which keeps their statements fixed and prepared once.
//!
//! Writes run on a synchronous connection (rusqlite) owned by a writer thread of their
//! own, which runs the work of every caller queued meanwhile in one transaction, each in
//! a savepoint ([`writer`]); reads run on sqlx's async pool.
//! Through sqlx every statement was its own hand-off to the connection's worker thread
//! and back: measured here, an UPDATE cost 60 µs through it and 16 µs raw, and the
//! lifecycle's 6–8 statements per transaction made the writer a chain of thread wake-ups.

mod builders;
mod builds;
mod buildsets;
mod masters;
mod outbox;
mod requests;
mod retention;
mod walbuf;
mod writer;

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

use crate::sql::{Dialect, Param, Part, Sql, sqlx_builder};
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
/// Writes go through the store's own connections, one at a time behind an async mutex
/// (the writer's turn): the tasks of one process queue for it instead of racing for
/// SQLite's write lock and sleeping in its busy handler, and no pool bookkeeping is paid
/// per write. Transactions run on the writer thread's synchronous connection, reached
/// through `jobs`; `writer`, the async one, keeps the migrations and the few writes that
/// hand rows back through sqlx's row type (`RETURNING` in the SQL shared with
/// PostgreSQL). Reads use a pool of their own. Other processes on the same file still
/// meet the busy timeout, which is what it is for.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    writer: Arc<Mutex<SqliteConnection>>,
    /// The writer thread's queue ([`writer`]).
    jobs: tokio::sync::mpsc::UnboundedSender<Box<dyn writer::Job>>,
    /// What the writer thread committed.
    commits: Arc<writer::Counters>,
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
        let sync = open_sync(connect.get_filename(), options, background_checkpoints).map_err(
            |e| match e {
                StorageError::Sqlite(e) => StorageError::NotKilnDatabase(format!(
                    "{url}: the writer's connection could not be opened: {e}"
                )),
                other => other,
            },
        )?;
        let writer = Arc::new(Mutex::new(writer));
        if background_checkpoints {
            let checkpointer = connect.connect().await.map_err(open_error)?;
            tokio::spawn(checkpoint_loop(
                checkpointer,
                options.checkpoint_interval,
                Arc::downgrade(&writer),
            ));
        }
        let commits = Arc::new(writer::Counters::default());
        let jobs = writer::start(sync, writer.clone(), commits.clone())
            .map_err(|e| StorageError::Internal(format!("cannot start the SQLite writer: {e}")))?;
        Ok(SqliteStore {
            writer,
            jobs,
            commits,
            reader,
            _scratch: scratch,
        })
    }
}

/// The writer's synchronous connection, set up as sqlx sets up its own.
fn open_sync(
    path: &std::path::Path,
    options: &StoreOptions,
    background_checkpoints: bool,
) -> Result<rusqlite::Connection> {
    let flags =
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    // The writer's log goes to the kernel one commit per write ([`walbuf`]); should the
    // VFS not register, the writer still works through SQLite's own, a write per half
    // frame.
    let conn = match walbuf::register() {
        Ok(()) => rusqlite::Connection::open_with_flags_and_vfs(path, flags, walbuf::NAME)?,
        Err(reason) => {
            tracing::warn!(%reason, "SQLite writes its log without batching");
            rusqlite::Connection::open_with_flags(path, flags)?
        }
    };
    conn.busy_timeout(options.busy_timeout)?;
    let synchronous = match options.durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON;
         PRAGMA cache_size = -{PAGE_CACHE_KIB}; PRAGMA mmap_size = {MMAP_BYTES};
         PRAGMA temp_store = memory;"
    ))?;
    if background_checkpoints {
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_BACKSTOP_PAGES)?;
    }
    // Every statement of the backend stays prepared (each is fixed text).
    conn.set_prepared_statement_cache_capacity(SYNC_STATEMENT_CACHE);
    // Plans that do not depend on the values bound: without this, SQLite (built with
    // STAT4) marked parameters compared while it weighed the partial queue indexes and
    // recompiled the claim's statements whenever `now` changed, which is every time
    // (15% of the writer's time under a serial submitter). The plans are the ones the
    // plan tests check.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(conn)
}

/// Prepared statements the synchronous writer keeps: more than the backend has.
const SYNC_STATEMENT_CACHE: usize = 128;

impl SqliteStore {
    /// Runs `work` in a `BEGIN IMMEDIATE` transaction of the writer thread, in a
    /// savepoint of its own when other callers' work shares the transaction: its writes
    /// commit when it returns `Ok` (once the whole transaction has committed) and are
    /// undone when it returns an error. Dropping the returned future does not stop work
    /// already handed over.
    pub(super) async fn transaction<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(writer::Pending::new(work, reply)))
            .map_err(|_| StorageError::Internal("the SQLite writer has stopped".into()))?;
        answer.await.map_err(|_| {
            StorageError::Internal("the SQLite writer stopped before answering".into())
        })?
    }
}

/// A statement of the dialect layer as text with `?` placeholders and its values.
fn sync_statement(sql: Sql) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut text = String::new();
    let mut values = Vec::new();
    for part in sql.parts() {
        match part {
            Part::Text(t) => text.push_str(&t),
            Part::Param(p) => {
                text.push('?');
                values.push(match p {
                    Param::Int(v) => Value::Integer(v),
                    Param::Float(v) => Value::Real(v),
                    Param::Text(v) => Value::Text(v),
                    Param::Null => Value::Null,
                });
            }
        }
    }
    (text, values)
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
        let mut changed = self.write_all(vec![sql]).await?;
        Ok(changed.pop().unwrap_or(0))
    }

    async fn write_all(&self, statements: Vec<Sql>) -> Result<Vec<u64>> {
        if statements.is_empty() {
            return Ok(Vec::new());
        }
        let statements: Vec<_> = statements.into_iter().map(sync_statement).collect();
        self.transaction(move |tx| {
            let mut changed = Vec::with_capacity(statements.len());
            for (text, values) in &statements {
                let mut statement = tx.prepare_cached(text)?;
                changed.push(statement.execute(rusqlite::params_from_iter(values))? as u64);
            }
            Ok(changed)
        })
        .await
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

    fn groups_writes(&self) -> bool {
        true
    }

    fn commit_stats(&self) -> Option<crate::seam::CommitStats> {
        Some(self.commits.read())
    }
}

#[cfg(test)]
mod plans {
    //! The dashboard's and the API's common reads seek with indexes: none walks a large
    //! table or sorts every row of one, however many the database holds.

    use std::collections::BTreeMap;

    use sqlx::Row;

    use super::*;
    use crate::collections::{DashboardRead, LARGE_TABLES, dashboard_reads};

    async fn plan(store: &SqliteStore, sql: Sql) -> Result<Vec<String>> {
        let (text, values) = sync_statement(sql);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {text}")));
        for v in values {
            query = match v {
                rusqlite::types::Value::Integer(i) => query.bind(i),
                rusqlite::types::Value::Real(f) => query.bind(f),
                rusqlite::types::Value::Text(t) => query.bind(t),
                _ => query.bind(None::<i64>),
            };
        }
        let mut conn = store.writer.lock().await;
        let rows = query.fetch_all(&mut *conn).await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("detail")?))
            .collect()
    }

    /// The steps of a plan that walk a large table without an index or sort a whole
    /// result: what makes a read slower as the database grows. A page of a whole table
    /// in key order may walk that table's own B-tree as its outer loop: it stops at the
    /// page's limit; the rows of one buildset may be sorted.
    fn unbounded<'a>(steps: &'a [String], read: &DashboardRead) -> Vec<&'a String> {
        steps
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                let walks = s.starts_with("SCAN ")
                    && !s.contains(" USING ")
                    && !(read.key_order_page && *i == 0)
                    && LARGE_TABLES.iter().any(|(table, alias)| {
                        let rest = &s["SCAN ".len()..];
                        rest == *table || rest == *alias
                    });
                let sorts = s.contains("USE TEMP B-TREE FOR ORDER BY") && !read.one_buildsets_rows;
                walks || sorts
            })
            .map(|(_, s)| s)
            .collect()
    }

    /// Deleting a row makes SQLite find the rows that reference it, by the referencing
    /// columns (to check them, or to cascade or set them to NULL): every foreign key to a
    /// table whose rows are deleted is served by an index, or each delete walks the
    /// referencing table. Retention at 200,000 buildsets took 34 ms a deleted build for
    /// want of two such indexes.
    #[tokio::test]
    async fn every_reference_to_a_deletable_row_is_found_by_an_index() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Internal(e.to_string()))?;
        let url = format!("sqlite://{}", dir.path().join("references.db").display());
        let store = SqliteStore::open(&url, &StoreOptions::default()).await?;
        let references: Vec<(String, i64, String, String)> = {
            let mut conn = store.writer.lock().await;
            sqlx::query(
                "SELECT m.name AS child, f.id AS id, f.\"table\" AS parent, f.\"from\" AS col
                 FROM sqlite_master m, pragma_foreign_key_list(m.name) f
                 WHERE m.type = 'table' ORDER BY m.name, f.id, f.seq",
            )
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get("child")?,
                    r.try_get("id")?,
                    r.try_get("parent")?,
                    r.try_get("col")?,
                ))
            })
            .collect::<Result<_>>()?
        };
        let mut keys: BTreeMap<(String, i64), (String, Vec<String>)> = BTreeMap::new();
        for (child, id, parent, col) in references {
            keys.entry((child, id))
                .or_insert_with(|| (parent, Vec::new()))
                .1
                .push(col);
        }
        assert!(keys.len() > 20, "only {} foreign keys found", keys.len());
        let mut checked = 0;
        for ((child, _), (parent, cols)) in &keys {
            if crate::common::NEVER_DELETED.contains(&parent.as_str()) {
                continue;
            }
            let mut sql = Sql::new(format!("SELECT 1 FROM {child} WHERE "));
            for (i, col) in cols.iter().enumerate() {
                if i > 0 {
                    sql.push(" AND ");
                }
                sql.push(format!("{col} = ")).bind(1i64);
            }
            let steps = plan(&store, sql).await?;
            assert!(
                !steps.iter().any(|s| s.starts_with("SCAN ")),
                "deleting from {parent} walks {child} to find its {cols:?}: {steps:?}"
            );
            checked += 1;
        }
        assert!(checked > 20, "only {checked} references checked");
        Ok(())
    }

    #[tokio::test]
    async fn the_dashboards_reads_neither_scan_nor_sort_a_large_table() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Internal(e.to_string()))?;
        let url = format!("sqlite://{}", dir.path().join("plans.db").display());
        let store = SqliteStore::open(&url, &StoreOptions::default()).await?;
        for read in dashboard_reads(<SqliteStore as Dialect>::CONTAINS, "")? {
            let steps = plan(&store, read.sql.clone()).await?;
            let bad = unbounded(&steps, &read);
            assert!(
                bad.is_empty(),
                "{}: {bad:?} walks or sorts a whole table (plan: {steps:?})",
                read.what
            );
        }
        Ok(())
    }
}
