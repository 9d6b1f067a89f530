//! The SQLite backend: one file in WAL mode, zero set-up. The embedded default.
//!
//! Every transaction that reads before it writes starts with `BEGIN IMMEDIATE`, so that
//! several processes on one file serialise on SQLite's write lock instead of failing to
//! upgrade a read snapshot. Lists of ids travel as one JSON array (`json_each(?)`), which
//! keeps statements fixed and their prepared forms cached.

mod batch;
mod json;
mod outbox;

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::Mutex;

use super::{
    AddedBuildset, BuildEnd, BuildFilter, BuildsetFilter, CancelOutcome, CompletedBuildset,
    Durability, ExpireMasters, ExpiredMaster, FinishBuild, NewBuild, NewBuildset, RegisteredMaster,
    ReporterProgress, RequestFilter, Result, Settled, StartAvailable, StartOutcome, StorageError,
    Store, StoreOptions, clamp_u64, collections, fk_to_not_found, found_or,
    query::{Collection, Page, Query},
    text,
};
use crate::rows::{
    self, BUILD_COLUMNS, REQUEST_FROM, build_from_row, buildset_from_row, json_ids, log_from_row,
    master_from_row, properties_from_rows, request_from_row, result_code, us,
};
use kiln_model::{
    Artifact, Build, BuildId, BuildRequest, Builder, BuilderId, Buildset, BuildsetId,
    ChildBuildset, LogEntry, LogLevel, LogQuery, LogRecord, MAX_PRIORITY, MIN_PRIORITY, Master,
    MasterId, ProgressRecord, ProgressReport, Properties, Property, Report, ReporterState,
    RequestId, ResultCode, SourceStamp, SourceStampId, Timestamp,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite's "file is not a database" error code.
const SQLITE_NOTADB: &str = "26";

/// Page cache per connection, in KiB (SQLite's default is 2 MiB).
const PAGE_CACHE_KIB: u64 = 64 << 10;
/// How much of the database file each connection maps into memory for reading.
const MMAP_BYTES: u64 = 256 << 20;

/// SQLite's "unable to open database file" error code.
const SQLITE_CANTOPEN: &str = "14";

/// How many log records go into one INSERT statement.
const LOG_INSERT_CHUNK: usize = 200;

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
        let mut writer = connect.connect().await.map_err(open_error)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // A local file connection does not go stale; pinging it before every use
            // doubled the cost of each read.
            .test_before_acquire(false)
            .connect_with(connect)
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
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(writer)),
            reader,
            _scratch: scratch,
        })
    }
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

/// Marks a master's earlier work as lost: unfinished builds end as RETRY and claims on
/// incomplete requests are released.
async fn take_back(
    tx: &mut SqliteConnection,
    master: MasterId,
    now: Timestamp,
    why: &str,
) -> Result<(Vec<RequestId>, Vec<BuildId>)> {
    let retried: Vec<i64> = sqlx::query_scalar(
        "UPDATE builds SET complete_at = ?, results = ?, state_string = ?, error = ?
         WHERE master_id = ? AND complete_at IS NULL RETURNING id",
    )
    .bind(us(now))
    .bind(ResultCode::Retry.code())
    .bind(why)
    .bind(why)
    .bind(master.0)
    .fetch_all(&mut *tx)
    .await?;
    let released: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM buildrequest_claims
         WHERE master_id = ? AND request_id IN (SELECT id FROM buildrequests WHERE complete = 0)
         RETURNING request_id",
    )
    .bind(master.0)
    .fetch_all(&mut *tx)
    .await?;
    outbox::record_finished(&mut *tx, &json_ids(retried.iter().copied())).await?;
    // Its reporter leases go too, so that another master delivers at once.
    sqlx::query("UPDATE reporters SET owner = NULL, lease_until = NULL WHERE owner = ?")
        .bind(master.0)
        .execute(&mut *tx)
        .await?;
    let mut released: Vec<RequestId> = released.into_iter().map(RequestId).collect();
    released.sort();
    let mut retried: Vec<BuildId> = retried.into_iter().map(BuildId).collect();
    retried.sort();
    Ok((released, retried))
}

/// Finds which of a JSON array of buildsets have all their requests complete, with the
/// worst of their results, as one JSON array of `[id, results]`. The ranking is generated
/// from [`ResultCode::severity`] so that SQL and Rust cannot disagree.
static COMPLETABLE_BUILDSETS_SQL: LazyLock<String> = LazyLock::new(|| {
    let to_severity: String = ResultCode::ALL
        .iter()
        .map(|r| format!(" WHEN {} THEN {}", r.code(), r.severity()))
        .collect();
    let to_code: String = ResultCode::ALL
        .iter()
        .map(|r| format!(" WHEN {} THEN {}", r.severity(), r.code()))
        .collect();
    format!(
        "SELECT json_group_array(json_array(bs.id,
             (SELECT CASE MAX(CASE r.results{to_severity} END){to_code} END
              FROM buildrequests r WHERE r.buildset_id = bs.id)))
         FROM buildsets bs
         WHERE bs.id IN (SELECT value FROM json_each(?)) AND bs.complete = 0
           AND NOT EXISTS (SELECT 1 FROM buildrequests r WHERE r.buildset_id = bs.id AND r.complete = 0)"
    )
});

/// Completes those of the given buildsets whose requests are all complete now, with the
/// worst of their results.
async fn complete_buildsets(
    tx: &mut SqliteConnection,
    ids: impl IntoIterator<Item = BuildsetId>,
    now: Timestamp,
) -> Result<Vec<CompletedBuildset>> {
    let ids: BTreeSet<BuildsetId> = ids.into_iter().collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let found: String = sqlx::query_scalar(sqlx::AssertSqlSafe(COMPLETABLE_BUILDSETS_SQL.as_str()))
        .bind(json_ids(ids.iter().map(|b| b.0)))
        .fetch_one(&mut *tx)
        .await?;
    let found: Vec<(i64, Option<i64>)> = rows::from_json(&found)?;
    if found.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query(
        "UPDATE buildsets SET complete = 1, complete_at = ?, results = j.value ->> 1
         FROM json_each(?) j WHERE buildsets.id = j.value ->> 0",
    )
    .bind(us(now))
    .bind(serde_json::to_string(&found).map_err(|e| StorageError::Invalid(e.to_string()))?)
    .execute(&mut *tx)
    .await?;
    outbox::record_complete(&mut *tx, &json_ids(found.iter().map(|(id, _)| *id))).await?;
    found
        .into_iter()
        .map(|(id, results)| {
            Ok(CompletedBuildset {
                buildset_id: BuildsetId(id),
                results: result_code(results)?.unwrap_or(ResultCode::Success),
            })
        })
        .collect()
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn master_register(&self, name: &str, now: Timestamp) -> Result<RegisteredMaster> {
        let name = &*text::storable(name);
        if name.trim().is_empty() {
            return Err(StorageError::Invalid("master name is empty".into()));
        }
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO masters (name, active, last_active) VALUES (?, 1, ?)
             ON CONFLICT (name) DO UPDATE SET active = 1, last_active = excluded.last_active
             RETURNING id",
        )
        .bind(name)
        .bind(us(now))
        .fetch_one(&mut *tx)
        .await?;
        let (released, retried_builds) = take_back(
            &mut tx,
            MasterId(id),
            now,
            "the master restarted while this build ran",
        )
        .await?;
        tx.commit().await?;
        Ok(RegisteredMaster {
            master_id: MasterId(id),
            released,
            retried_builds,
        })
    }

    async fn master_heartbeat(&self, id: MasterId, now: Timestamp) -> Result<()> {
        let updated = sqlx::query("UPDATE masters SET last_active = ? WHERE id = ? AND active = 1")
            .bind(us(now))
            .bind(id.0)
            .execute(&mut *self.writer.lock().await)
            .await?;
        if updated.rows_affected() == 1 {
            return Ok(());
        }
        self.master_get(id).await?;
        Err(StorageError::MasterInactive(id))
    }

    async fn master_deactivate(&self, id: MasterId) -> Result<Vec<RequestId>> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let updated = sqlx::query("UPDATE masters SET active = 0 WHERE id = ?")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(StorageError::not_found("master", id));
        }
        let (released, _) = take_back(
            &mut tx,
            id,
            kiln_model::now(),
            "the master shut down while this build ran",
        )
        .await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn master_expire_stale(&self, params: &ExpireMasters) -> Result<Vec<ExpiredMaster>> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let stale = sqlx::query(
            "UPDATE masters SET active = 0 WHERE active = 1 AND last_active < ? AND id != ? RETURNING id, name",
        )
        .bind(us(params.silent_since))
        .bind(params.by.0)
        .fetch_all(&mut *tx)
        .await?;
        let mut expired = Vec::with_capacity(stale.len());
        for row in stale {
            let master_id = MasterId(row.try_get("id")?);
            let name: String = row.try_get("name")?;
            let why = format!("master {name} stopped heartbeating and was expired");
            let (released, retried_builds) =
                take_back(&mut tx, master_id, params.now, &why).await?;
            expired.push(ExpiredMaster {
                master_id,
                name,
                released,
                retried_builds,
            });
        }
        tx.commit().await?;
        Ok(expired)
    }

    async fn master_get(&self, id: MasterId) -> Result<Master> {
        let row = sqlx::query("SELECT id, name, active, last_active FROM masters WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StorageError::not_found("master", id))?;
        master_from_row(&row)
    }

    async fn master_list(&self) -> Result<Vec<Master>> {
        let rows = sqlx::query("SELECT id, name, active, last_active FROM masters ORDER BY id")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(master_from_row).collect()
    }

    async fn builder_ensure(&self, name: &str, description: Option<&str>) -> Result<BuilderId> {
        let name = &*text::storable(name);
        let description = description.map(text::storable);
        let description = description.as_deref();
        if name.trim().is_empty() {
            return Err(StorageError::Invalid("builder name is empty".into()));
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO builders (name, description) VALUES (?, ?)
             ON CONFLICT (name) DO UPDATE SET description = COALESCE(excluded.description, builders.description)
             RETURNING id",
        )
        .bind(name)
        .bind(description)
        .fetch_one(&mut *self.writer.lock().await)
        .await?;
        Ok(BuilderId(id))
    }

    async fn builder_get_by_name(&self, name: &str) -> Result<Option<Builder>> {
        let name = &*text::storable(name);
        let row =
            sqlx::query("SELECT id, name, description, depends_on FROM builders WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.reader)
                .await?;
        row.map(|r| rows::builder_from_row(&r)).transpose()
    }

    async fn builder_get(&self, id: BuilderId) -> Result<Builder> {
        let row =
            sqlx::query("SELECT id, name, description, depends_on FROM builders WHERE id = ?")
                .bind(id.0)
                .fetch_optional(&self.reader)
                .await?
                .ok_or_else(|| StorageError::not_found("builder", id))?;
        rows::builder_from_row(&row)
    }

    async fn builder_list(&self) -> Result<Vec<Builder>> {
        let rows =
            sqlx::query("SELECT id, name, description, depends_on FROM builders ORDER BY name")
                .fetch_all(&self.reader)
                .await?;
        rows.iter().map(rows::builder_from_row).collect()
    }

    async fn builder_set_depends_on(&self, id: BuilderId, depends_on: &[String]) -> Result<()> {
        let list =
            serde_json::to_string(depends_on).map_err(|e| StorageError::Invalid(e.to_string()))?;
        let done = sqlx::query("UPDATE builders SET depends_on = ? WHERE id = ?")
            .bind(list)
            .bind(id.0)
            .execute(&mut *self.writer.lock().await)
            .await?;
        found_or(done.rows_affected(), "builder", id)
    }

    async fn buildset_add_many(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>> {
        let params = &*text::buildsets(params);
        self.add_buildsets(params).await
    }

    async fn buildset_get(&self, id: BuildsetId) -> Result<Buildset> {
        let row = sqlx::query("SELECT * FROM buildsets WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StorageError::not_found("buildset", id))?;
        buildset_from_row(&row)
    }

    async fn buildset_list(&self, filter: &BuildsetFilter) -> Result<Vec<Buildset>> {
        let mut qb = collections::buildset_list::<Sqlite>(filter);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(buildset_from_row).collect()
    }

    async fn buildset_properties(&self, id: BuildsetId) -> Result<Properties> {
        self.buildset_get(id).await?;
        let rows = sqlx::query(
            "SELECT name, value, source FROM buildset_properties WHERE buildset_id = ?",
        )
        .bind(id.0)
        .fetch_all(&self.reader)
        .await?;
        properties_from_rows(&rows)
    }

    async fn buildset_sourcestamps(&self, id: BuildsetId) -> Result<Vec<SourceStamp>> {
        self.buildset_get(id).await?;
        let rows = sqlx::query(
            "SELECT s.codebase, s.repository, s.branch, s.revision, s.project
             FROM buildset_sourcestamps bs JOIN sourcestamps s ON s.id = bs.sourcestamp_id
             WHERE bs.buildset_id = ? ORDER BY s.codebase, s.repository, s.branch, s.revision, s.project",
        )
        .bind(id.0)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::sourcestamp_from_row).collect()
    }

    async fn buildset_sourcestamp_ids(&self, id: BuildsetId) -> Result<Vec<SourceStampId>> {
        self.buildset_get(id).await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT sourcestamp_id FROM buildset_sourcestamps WHERE buildset_id = ? ORDER BY sourcestamp_id",
        )
        .bind(id.0)
        .fetch_all(&self.reader)
        .await?;
        Ok(ids.into_iter().map(SourceStampId).collect())
    }

    async fn buildset_children(&self, parent_request: RequestId) -> Result<Vec<ChildBuildset>> {
        let found: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(bs.id, bs.trigger_key, bs.parent_relationship, r.waited_for,
                                                bs.parent_buildid, r.id, r.builder_id, bl.name, r.complete, r.results,
                                                lb.id, lb.return_value) ORDER BY bs.id, r.id)
             FROM buildsets bs JOIN buildrequests r ON r.buildset_id = bs.id
             JOIN builders bl ON bl.id = r.builder_id
             LEFT JOIN builds lb ON lb.id = (SELECT MAX(b.id) FROM builds b WHERE b.buildrequest_id = r.id)
             WHERE bs.parent_request_id = ?",
        )
        .bind(parent_request.0)
        .fetch_one(&self.reader)
        .await?;
        type Row = (
            i64,
            Option<String>,
            Option<String>,
            i64,
            Option<i64>,
            i64,
            i64,
            String,
            i64,
            Option<i64>,
            Option<i64>,
            Option<String>,
        );
        let rows: Vec<Row> = rows::from_json(&found)?;
        rows.into_iter()
            .map(
                |(
                    bs,
                    key,
                    rel,
                    waited,
                    parent,
                    req,
                    builder_id,
                    builder,
                    complete,
                    results,
                    build,
                    rv,
                )| {
                    Ok(ChildBuildset {
                        buildset_id: BuildsetId(bs),
                        trigger_key: key,
                        relationship: rel,
                        waited_for: waited != 0,
                        parent_buildid: parent.map(BuildId),
                        request_id: RequestId(req),
                        builder_id: BuilderId(builder_id),
                        builder,
                        complete: complete != 0,
                        results: result_code(results)?,
                        build_id: build.map(BuildId),
                        return_value: rv.as_deref().map(rows::from_json).transpose()?,
                    })
                },
            )
            .collect()
    }

    async fn buildset_adopt(&self, ids: &[BuildsetId], parent_build: BuildId) -> Result<()> {
        sqlx::query(
            "UPDATE buildsets SET parent_buildid = ? WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(parent_build.0)
        .bind(json_ids(ids.iter().map(|b| b.0)))
        .execute(&mut *self.writer.lock().await)
        .await
        .map_err(|e| fk_to_not_found(e, "build", Some(parent_build)))?;
        Ok(())
    }

    async fn request_get(&self, id: RequestId) -> Result<BuildRequest> {
        let sql = format!("{REQUEST_FROM} WHERE r.id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StorageError::not_found("build request", id))?;
        request_from_row(&row)
    }

    async fn request_list(&self, filter: &RequestFilter) -> Result<Vec<BuildRequest>> {
        let mut qb = collections::request_list::<Sqlite>(filter);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(request_from_row).collect()
    }

    async fn request_claim(
        &self,
        ids: &[RequestId],
        master: MasterId,
        now: Timestamp,
    ) -> Result<()> {
        let ids: BTreeSet<RequestId> = ids.iter().copied().collect();
        if ids.is_empty() {
            return Ok(());
        }
        let list = json_ids(ids.iter().map(|r| r.0));
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(
            "SELECT r.id, r.complete, c.master_id FROM buildrequests r
             LEFT JOIN buildrequest_claims c ON c.request_id = r.id
             WHERE r.id IN (SELECT value FROM json_each(?))",
        )
        .bind(&list)
        .fetch_all(&mut *tx)
        .await?;
        let mut found = BTreeSet::new();
        let mut taken = Vec::new();
        for row in &rows {
            let id = RequestId(row.try_get("id")?);
            found.insert(id);
            let claimed: Option<i64> = row.try_get("master_id")?;
            if claimed.is_some() || row.try_get::<i64, _>("complete")? != 0 {
                taken.push(id);
            }
        }
        if let Some(missing) = ids.difference(&found).next() {
            return Err(StorageError::not_found("build request", missing));
        }
        if !taken.is_empty() {
            return Err(StorageError::AlreadyClaimed(taken));
        }
        sqlx::query("INSERT INTO buildrequest_claims (request_id, master_id, claimed_at) SELECT value, ?, ? FROM json_each(?)")
            .bind(master.0)
            .bind(us(now))
            .bind(&list)
            .execute(&mut *tx)
            .await
            .map_err(|e| fk_to_not_found(e, "master", Some(master)))?;
        tx.commit().await?;
        Ok(())
    }

    async fn request_unclaim(&self, ids: &[RequestId], master: MasterId) -> Result<()> {
        sqlx::query(
            "DELETE FROM buildrequest_claims
             WHERE master_id = ? AND request_id IN (SELECT value FROM json_each(?))
               AND request_id IN (SELECT id FROM buildrequests WHERE complete = 0)",
        )
        .bind(master.0)
        .bind(json_ids(ids.iter().map(|r| r.0)))
        .execute(&mut *self.writer.lock().await)
        .await?;
        Ok(())
    }

    async fn request_set_priority(&self, id: RequestId, priority: i32) -> Result<()> {
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&priority) {
            return Err(StorageError::Invalid(format!(
                "priority {priority} is outside {MIN_PRIORITY}..={MAX_PRIORITY}"
            )));
        }
        let done =
            sqlx::query("UPDATE buildrequests SET priority = ? WHERE id = ? AND complete = 0")
                .bind(priority)
                .bind(id.0)
                .execute(&mut *self.writer.lock().await)
                .await?;
        if done.rows_affected() == 0 {
            self.request_get(id).await?;
            return Err(StorageError::Invalid(format!(
                "build request {id} is complete; its priority no longer matters"
            )));
        }
        Ok(())
    }

    async fn request_complete(
        &self,
        ids: &[RequestId],
        results: ResultCode,
        now: Timestamp,
    ) -> Result<Vec<CompletedBuildset>> {
        if results == ResultCode::Retry {
            return Err(StorageError::Invalid(
                "RETRY is not a completion result: unclaim the request so that it runs again"
                    .into(),
            ));
        }
        let ids: BTreeSet<RequestId> = ids.iter().copied().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let list = json_ids(ids.iter().map(|r| r.0));
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query("SELECT id, complete, buildset_id FROM buildrequests WHERE id IN (SELECT value FROM json_each(?))")
            .bind(&list)
            .fetch_all(&mut *tx)
            .await?;
        let mut open = BTreeSet::new();
        let mut buildsets = BTreeSet::new();
        for row in &rows {
            if row.try_get::<i64, _>("complete")? == 0 {
                open.insert(RequestId(row.try_get("id")?));
                buildsets.insert(BuildsetId(row.try_get("buildset_id")?));
            }
        }
        let refused: Vec<RequestId> = ids.difference(&open).copied().collect();
        if !refused.is_empty() {
            return Err(StorageError::NotClaimed(refused));
        }
        sqlx::query("UPDATE buildrequests SET complete = 1, complete_at = ?, results = ? WHERE id IN (SELECT value FROM json_each(?))")
            .bind(us(now))
            .bind(results.code())
            .bind(&list)
            .execute(&mut *tx)
            .await?;
        let completed = complete_buildsets(&mut tx, buildsets, now).await?;
        tx.commit().await?;
        Ok(completed)
    }

    async fn request_cancel(&self, ids: &[RequestId], now: Timestamp) -> Result<CancelOutcome> {
        let list = json_ids(ids.iter().map(|r| r.0));
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        // The requests asked for and, recursively, those of the waited-for child
        // buildsets their builds started.
        let rows = sqlx::query(
            "WITH RECURSIVE tree (id) AS (
                 SELECT value FROM json_each(?)
                 UNION
                 SELECT r.id FROM tree t JOIN buildsets bs ON bs.parent_request_id = t.id
                 JOIN buildrequests r ON r.buildset_id = bs.id WHERE r.waited_for = 1)
             SELECT r.id, r.buildset_id, c.master_id FROM buildrequests r
             LEFT JOIN buildrequest_claims c ON c.request_id = r.id
             WHERE r.complete = 0 AND r.id IN (SELECT id FROM tree) ORDER BY r.id",
        )
        .bind(&list)
        .fetch_all(&mut *tx)
        .await?;
        let mut outcome = CancelOutcome::default();
        let mut buildsets = BTreeSet::new();
        for row in &rows {
            let id = RequestId(row.try_get("id")?);
            if row.try_get::<Option<i64>, _>("master_id")?.is_some() {
                outcome.flagged.push(id);
            } else {
                outcome.completed.push(id);
                buildsets.insert(BuildsetId(row.try_get("buildset_id")?));
            }
        }
        sqlx::query("UPDATE buildrequests SET cancel_requested = 1 WHERE id IN (SELECT value FROM json_each(?))")
            .bind(json_ids(outcome.flagged.iter().map(|r| r.0)))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE buildrequests SET complete = 1, complete_at = ?, results = ?, cancel_requested = 1
             WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(us(now))
        .bind(ResultCode::Cancelled.code())
        .bind(json_ids(outcome.completed.iter().map(|r| r.0)))
        .execute(&mut *tx)
        .await?;
        outcome.buildsets_completed = complete_buildsets(&mut tx, buildsets, now).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn request_cancel_pending(&self, master: MasterId) -> Result<Vec<RequestId>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT r.id FROM buildrequests r JOIN buildrequest_claims c ON c.request_id = r.id
             WHERE c.master_id = ? AND r.complete = 0 AND r.cancel_requested = 1 ORDER BY r.id",
        )
        .bind(master.0)
        .fetch_all(&self.reader)
        .await?;
        Ok(ids.into_iter().map(RequestId).collect())
    }

    async fn build_start_available(&self, params: &StartAvailable) -> Result<StartOutcome> {
        self.start_available(params).await
    }

    async fn build_finish_and_settle(
        &self,
        master: MasterId,
        ends: &[BuildEnd],
    ) -> Result<Settled> {
        let ends = &*text::ends(ends);
        self.finish_and_settle(master, ends).await
    }

    async fn build_add(&self, params: &NewBuild) -> Result<Build> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(
            "SELECT r.builder_id, r.complete, c.master_id FROM buildrequests r
             LEFT JOIN buildrequest_claims c ON c.request_id = r.id WHERE r.id = ?",
        )
        .bind(params.request_id.0)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StorageError::not_found("build request", params.request_id))?;
        let holder: Option<i64> = row.try_get("master_id")?;
        if holder != Some(params.master_id.0) || row.try_get::<i64, _>("complete")? != 0 {
            return Err(StorageError::ClaimLost {
                request: params.request_id,
                master: params.master_id,
            });
        }
        let builder_id: i64 = row.try_get("builder_id")?;
        let sql = format!(
            "INSERT INTO builds (number, builder_id, buildrequest_id, master_id, worker_slot, started_at, state_string)
             SELECT COALESCE(MAX(number), 0) + 1, ?, ?, ?, ?, ?, ? FROM builds WHERE builder_id = ?
             RETURNING {}",
            BUILD_COLUMNS.replace("b.", "")
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(builder_id)
            .bind(params.request_id.0)
            .bind(params.master_id.0)
            .bind(params.worker_slot)
            .bind(us(params.started_at))
            .bind(&params.state_string)
            .bind(builder_id)
            .fetch_one(&mut *tx)
            .await?;
        let build = build_from_row(&row)?;
        outbox::record_started(&mut tx, &json_ids([build.id.0])).await?;
        tx.commit().await?;
        Ok(build)
    }

    async fn build_get(&self, id: BuildId) -> Result<Build> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds b WHERE b.id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StorageError::not_found("build", id))?;
        build_from_row(&row)
    }

    async fn build_get_by_number(&self, builder: BuilderId, number: i64) -> Result<Build> {
        let sql =
            format!("SELECT {BUILD_COLUMNS} FROM builds b WHERE b.builder_id = ? AND b.number = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(builder.0)
            .bind(number)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| {
                StorageError::not_found("build", format!("#{number} of builder {builder}"))
            })?;
        build_from_row(&row)
    }

    async fn build_list(&self, filter: &BuildFilter) -> Result<Vec<Build>> {
        let mut qb = collections::build_list::<Sqlite>(filter);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(build_from_row).collect()
    }

    async fn build_set_state(&self, id: BuildId, state: &str) -> Result<()> {
        let state = &*text::storable(state);
        let updated = sqlx::query("UPDATE builds SET state_string = ? WHERE id = ?")
            .bind(state)
            .bind(id.0)
            .execute(&mut *self.writer.lock().await)
            .await?;
        found_or(updated.rows_affected(), "build", id)
    }

    async fn build_add_locks_duration(&self, id: BuildId, seconds: f64) -> Result<()> {
        if !seconds.is_finite() || seconds < 0.0 {
            return Err(StorageError::Invalid(format!(
                "locks duration {seconds} is not a non-negative number"
            )));
        }
        let updated =
            sqlx::query("UPDATE builds SET locks_duration_s = locks_duration_s + ? WHERE id = ?")
                .bind(seconds)
                .bind(id.0)
                .execute(&mut *self.writer.lock().await)
                .await?;
        found_or(updated.rows_affected(), "build", id)
    }

    async fn build_finish(&self, params: &FinishBuild) -> Result<()> {
        let params = &*text::finish(params);
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let updated = sqlx::query(
            "UPDATE builds SET complete_at = ?, results = ?, return_value = ?, error = ?, traceback = ?,
                               state_string = COALESCE(?, state_string)
             WHERE id = ? AND master_id = ? AND complete_at IS NULL",
        )
        .bind(us(params.complete_at))
        .bind(params.results.code())
        .bind(params.return_value.as_ref().map(|v| v.to_string()))
        .bind(&params.error)
        .bind(&params.traceback)
        .bind(&params.state_string)
        .bind(params.build_id.0)
        .bind(params.master_id.0)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 1 {
            outbox::record_finished(&mut tx, &json_ids([params.build_id.0])).await?;
            tx.commit().await?;
            return Ok(());
        }
        tx.rollback().await?;
        drop(conn);
        self.build_get(params.build_id).await?;
        Err(StorageError::NotOwner {
            build: params.build_id,
            master: params.master_id,
        })
    }

    async fn build_previous_successful(&self, id: BuildId) -> Result<Option<Build>> {
        let build = self.build_get(id).await?;
        let sql = format!(
            "WITH target AS (
                 SELECT bss.sourcestamp_id AS ss FROM buildrequests r
                 JOIN buildset_sourcestamps bss ON bss.buildset_id = r.buildset_id WHERE r.id = ?)
             SELECT {BUILD_COLUMNS} FROM builds b JOIN buildrequests r ON r.id = b.buildrequest_id
             WHERE b.builder_id = ? AND b.number < ? AND b.results = ?
               AND NOT EXISTS (SELECT 1 FROM buildset_sourcestamps x
                               WHERE x.buildset_id = r.buildset_id AND x.sourcestamp_id NOT IN (SELECT ss FROM target))
               AND NOT EXISTS (SELECT 1 FROM target t
                               WHERE t.ss NOT IN (SELECT y.sourcestamp_id FROM buildset_sourcestamps y
                                                  WHERE y.buildset_id = r.buildset_id))
             ORDER BY b.number DESC LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(build.request_id.0)
            .bind(build.builder_id.0)
            .bind(build.number)
            .bind(ResultCode::Success.code())
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| build_from_row(&r)).transpose()
    }

    async fn build_latest_successful(&self, builder: BuilderId) -> Result<Option<Build>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds b WHERE b.builder_id = ? AND b.results IN (?, ?)
             ORDER BY b.complete_at DESC, b.id DESC LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(builder.0)
            .bind(ResultCode::Success.code())
            .bind(ResultCode::Warnings.code())
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| build_from_row(&r)).transpose()
    }

    async fn build_latest_with(
        &self,
        builder: BuilderId,
        results: &[ResultCode],
    ) -> Result<Option<Build>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds b
             WHERE b.builder_id = ? AND b.complete_at IS NOT NULL AND b.results IN (SELECT value FROM json_each(?))
             ORDER BY b.complete_at DESC, b.id DESC LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(builder.0)
            .bind(json_ids(results.iter().map(|r| i64::from(r.code()))))
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| build_from_row(&r)).transpose()
    }

    async fn build_delete(&self, id: BuildId) -> Result<()> {
        let build = self.build_get(id).await?;
        if !build.is_complete() {
            return Err(StorageError::Invalid(format!(
                "build {id} is still running; stop it before deleting it"
            )));
        }
        sqlx::query("DELETE FROM builds WHERE id = ?")
            .bind(id.0)
            .execute(&mut *self.writer.lock().await)
            .await?;
        Ok(())
    }

    async fn build_set_property(&self, id: BuildId, name: &str, property: &Property) -> Result<()> {
        let name = &*text::storable(name);
        let property = &*text::property(property);
        if name.trim().is_empty() {
            return Err(StorageError::Invalid("property name is empty".into()));
        }
        sqlx::query(
            "INSERT INTO build_properties (build_id, name, value, source) VALUES (?, ?, ?, ?)
             ON CONFLICT (build_id, name) DO UPDATE SET value = excluded.value, source = excluded.source",
        )
        .bind(id.0)
        .bind(name)
        .bind(property.value.to_string())
        .bind(&property.source)
        .execute(&mut *self.writer.lock().await)
        .await
        .map_err(|e| fk_to_not_found(e, "build", Some(id)))?;
        Ok(())
    }

    async fn build_properties(&self, id: BuildId) -> Result<Properties> {
        self.build_get(id).await?;
        let rows =
            sqlx::query("SELECT name, value, source FROM build_properties WHERE build_id = ?")
                .bind(id.0)
                .fetch_all(&self.reader)
                .await?;
        properties_from_rows(&rows)
    }

    async fn build_artifacts(&self, id: BuildId) -> Result<Vec<Artifact>> {
        self.build_get(id).await?;
        let rows = sqlx::query(
            "SELECT path, size, location FROM build_artifacts WHERE build_id = ? ORDER BY path",
        )
        .bind(id.0)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let size: i64 = row.try_get("size")?;
                Ok(Artifact {
                    path: row.try_get("path")?,
                    size: size.max(0) as u64,
                    location: row.try_get("location")?,
                })
            })
            .collect()
    }

    async fn progress_report(
        &self,
        build: BuildId,
        report: &ProgressReport,
        now: Timestamp,
    ) -> Result<()> {
        let report = &*text::report(report);
        if report.group.iter().any(|g| g.is_empty()) {
            return Err(StorageError::Invalid(format!(
                "progress group {:?} has an empty name",
                report.group
            )));
        }
        let path = serde_json::to_string(&report.group)
            .map_err(|e| StorageError::Invalid(e.to_string()))?;
        sqlx::query(
            "INSERT INTO build_progress (build_id, group_path, seq, current, total, status, updated_at)
             VALUES (?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM build_progress WHERE build_id = ?), ?, ?, ?, ?)
             ON CONFLICT (build_id, group_path) DO UPDATE SET
                 current = excluded.current, total = excluded.total,
                 status = excluded.status, updated_at = excluded.updated_at",
        )
        .bind(build.0)
        .bind(path)
        .bind(build.0)
        .bind(clamp_u64(report.current))
        .bind(clamp_u64(report.total))
        .bind(&report.status)
        .bind(us(now))
        .execute(&mut *self.writer.lock().await)
        .await
        .map_err(|e| fk_to_not_found(e, "build", Some(build)))?;
        Ok(())
    }

    async fn progress_list(&self, build: BuildId) -> Result<Vec<ProgressRecord>> {
        let rows = sqlx::query(
            "SELECT group_path, current, total, status, updated_at FROM build_progress WHERE build_id = ? ORDER BY seq",
        )
        .bind(build.0)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::progress_from_row).collect()
    }

    async fn log_append(&self, build: BuildId, records: &[LogRecord]) -> Result<()> {
        let records = &*text::logs(records);
        if records.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        for chunk in records.chunks(LOG_INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO build_logs (build_id, at, level, message, fields) ",
            );
            qb.push_values(chunk, |mut row, record| {
                row.push_bind(build.0)
                    .push_bind(us(record.at))
                    .push_bind(record.level.number())
                    .push_bind(record.message.clone())
                    .push_bind(serde_json::Value::Object(record.fields.clone()).to_string());
            });
            qb.build()
                .execute(&mut *tx)
                .await
                .map_err(|e| fk_to_not_found(e, "build", Some(build)))?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn log_list(&self, query: &LogQuery) -> Result<Vec<LogEntry>> {
        let mut qb = collections::log_list::<Sqlite>(query);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(log_from_row).collect()
    }

    async fn log_prune(&self, older_than: Timestamp, below: LogLevel) -> Result<u64> {
        let deleted = sqlx::query("DELETE FROM build_logs WHERE at < ? AND level < ?")
            .bind(us(older_than))
            .bind(below.number())
            .execute(&mut *self.writer.lock().await)
            .await?;
        Ok(deleted.rows_affected())
    }

    async fn reporter_register(&self, name: &str) -> Result<ReporterState> {
        let name = &*text::storable(name);
        self.reporter_register_impl(name).await
    }

    async fn reporter_get(&self, name: &str) -> Result<ReporterState> {
        let name = &*text::storable(name);
        self.reporter_get_impl(name).await
    }

    async fn reporter_list(&self) -> Result<Vec<ReporterState>> {
        self.reporter_list_impl().await
    }

    async fn reporter_remove(&self, name: &str) -> Result<()> {
        let name = &*text::storable(name);
        self.reporter_remove_impl(name).await
    }

    async fn reporter_lease(
        &self,
        name: &str,
        master: MasterId,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<Option<ReporterState>> {
        let name = &*text::storable(name);
        self.reporter_lease_impl(name, master, now, until).await
    }

    async fn reporter_progress(&self, progress: &ReporterProgress) -> Result<()> {
        let progress = &*text::delivery(progress);
        self.reporter_progress_impl(progress).await
    }

    async fn outbox_read(&self, after: i64, limit: u32) -> Result<Vec<Report>> {
        self.outbox_read_impl(after, limit).await
    }

    async fn outbox_prune(&self) -> Result<u64> {
        self.outbox_prune_impl().await
    }

    async fn query_buildsets(&self, q: &Query) -> Result<Page<Buildset>> {
        let (rows, total) = self.run_query(Collection::Buildsets, q).await?;
        collections::page(&rows, total, buildset_from_row)
    }

    async fn query_requests(&self, q: &Query) -> Result<Page<BuildRequest>> {
        let (rows, total) = self.run_query(Collection::BuildRequests, q).await?;
        collections::page(&rows, total, request_from_row)
    }

    async fn query_builds(&self, q: &Query) -> Result<Page<Build>> {
        let (rows, total) = self.run_query(Collection::Builds, q).await?;
        collections::page(&rows, total, build_from_row)
    }

    async fn query_builders(&self, q: &Query) -> Result<Page<Builder>> {
        let (rows, total) = self.run_query(Collection::Builders, q).await?;
        collections::page(&rows, total, rows::builder_from_row)
    }

    async fn query_masters(&self, q: &Query) -> Result<Page<Master>> {
        let (rows, total) = self.run_query(Collection::Masters, q).await?;
        collections::page(&rows, total, master_from_row)
    }
}

impl SqliteStore {
    /// Runs a collection query: the page and the total.
    async fn run_query(
        &self,
        collection: Collection,
        q: &Query,
    ) -> Result<(Vec<sqlx::sqlite::SqliteRow>, i64)> {
        let mut statements = collections::statements::<Sqlite>(collection, q, "instr")?;
        let total: i64 = statements
            .count
            .build_query_scalar()
            .fetch_one(&self.reader)
            .await?;
        let rows = statements.select.build().fetch_all(&self.reader).await?;
        Ok((rows, total))
    }
}
