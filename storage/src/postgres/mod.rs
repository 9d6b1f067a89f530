//! The PostgreSQL backend: several engine processes, on several machines, share one
//! database and split the work.
//!
//! Transactions run at READ COMMITTED. What must not race is made safe with row locks
//! rather than with a stricter isolation level:
//! - claiming locks the candidate requests `FOR UPDATE SKIP LOCKED`, so a master that
//!   loses a race moves on to other requests at once, and inserts its claims with
//!   `ON CONFLICT DO NOTHING`, so a claim that slipped in between is simply not taken;
//! - numbering builds locks the builder's row, so two masters never hand out one number;
//! - finishing builds locks them first, so a master expired meanwhile has its late
//!   results refused instead of merged;
//! - completing buildsets locks them first, so two masters finishing a buildset's last
//!   two requests at once cannot both miss that the buildset is complete;
//! - the claiming master's row is share-locked, so a master being expired cannot claim
//!   more work in the same instant.
//!
//! A deadlock or serialization failure (which PostgreSQL resolves by aborting one side)
//! is retried a few times. Transactions that make work for other masters end with a
//! `NOTIFY`; [`listen`] turns those into [`StoreSignal`](super::StoreSignal)s.

mod batch;
mod listen;
mod outbox;

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::LazyLock;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, Row};
use tokio::sync::broadcast;

use super::rows::{
    self, BUILD_COLUMNS, REQUEST_FROM, build_from_row, buildset_from_row, log_from_row,
    master_from_row, properties_from_rows, request_from_row, result_code, us,
};
use super::{
    AddedBuildset, BuildEnd, BuildFilter, BuildsetFilter, CancelOutcome, CompletedBuildset,
    ExpireMasters, ExpiredMaster, FinishBuild, NewBuild, NewBuildset, RegisteredMaster,
    ReporterProgress, RequestFilter, Result, Settled, StartAvailable, StartOutcome, StorageError,
    Store, StoreOptions, StoreSignal, clamp_u64, collections, fk_to_not_found, found_or,
    query::{Collection, Page, Query},
    text,
};
use kiln_model::{
    Artifact, Build, BuildId, BuildRequest, Builder, BuilderId, Buildset, BuildsetId,
    ChildBuildset, LogEntry, LogLevel, LogQuery, LogRecord, MAX_PRIORITY, MIN_PRIORITY, Master,
    MasterId, ProgressRecord, ProgressReport, Properties, Property, Report, ReporterState,
    RequestId, ResultCode, SourceStamp, SourceStampId, Timestamp,
};
use listen::Notifier;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How often a transaction that PostgreSQL aborted to break a deadlock (or a
/// serialization failure) is tried again before the error reaches the caller.
const MAX_TX_ATTEMPTS: u32 = 5;

/// PostgreSQL's "invalid_catalog_name": the database does not exist.
const PG_NO_DATABASE: &str = "3D000";
/// PostgreSQL's "deadlock_detected" and "serialization_failure".
const PG_RETRYABLE: [&str; 2] = ["40P01", "40001"];

/// How many log records go into one INSERT statement.
const LOG_INSERT_CHUNK: usize = 500;

/// A Kiln store in a PostgreSQL database (or one schema of it, chosen with the URL's
/// `options=-c search_path=...`).
#[derive(Debug)]
pub struct PostgresStore {
    pool: PgPool,
    notifier: Notifier,
}

impl PostgresStore {
    /// Connects to the database at `url`, migrates it and starts listening for other
    /// masters' notifications.
    ///
    /// A database that holds tables but no Kiln schema, or one migrated by a newer Kiln,
    /// is refused with [`StorageError::NotKilnDatabase`]; a database that does not exist
    /// is [`StorageError::Missing`].
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let connect = PgConnectOptions::from_str(url).map_err(|e| StorageError::BadUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        let shown = super::display_url(url);
        let open_error = |e: sqlx::Error| match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some(PG_NO_DATABASE) => {
                StorageError::Missing(shown.clone())
            }
            _ => StorageError::Database(e),
        };
        let origin = origin_token();
        let token = origin.clone();
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .min_connections(1)
            .acquire_timeout(options.busy_timeout)
            .after_connect(move |conn, _| {
                let token = token.clone();
                Box::pin(async move { listen::set_origin(conn, &token).await })
            })
            .connect_with(connect.clone())
            .await
            .map_err(open_error)?;
        check_foreign_schema(&pool, &shown).await?;
        MIGRATOR.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(v) => StorageError::NotKilnDatabase(format!(
                "{shown} was written by a newer Kiln (it has migration {v}, which this Kiln does not know)"
            )),
            sqlx::migrate::MigrateError::VersionMismatch(v) => StorageError::NotKilnDatabase(format!(
                "{shown} has a migration {v} that differs from this Kiln's: not a Kiln database"
            )),
            other => StorageError::Migration(other),
        })?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        let notifier = Notifier::start(connect, &schema, origin).await?;
        Ok(PostgresStore { pool, notifier })
    }
}

/// The URL of a schema within the database at `base`: Kiln's tables go there instead of
/// into `public`, so that several Kiln installations (or test runs) can share one
/// database. The schema must exist ([`create_schema`]).
pub fn schema_url(base: &str, schema: &str) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}options=-c%20search_path%3D{schema}")
}

/// Creates a schema (if missing) in the database at `base`; returns its URL.
pub async fn create_schema(base: &str, schema: &str) -> Result<String> {
    check_identifier(schema)?;
    let mut conn = sqlx::PgConnection::connect(base).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    Ok(schema_url(base, schema))
}

/// Drops a schema and everything in it from the database at `base`.
pub async fn drop_schema(base: &str, schema: &str) -> Result<()> {
    check_identifier(schema)?;
    let mut conn = sqlx::PgConnection::connect(base).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    Ok(())
}

fn check_identifier(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "schema name {schema:?} must be 1 to 63 lowercase letters, digits and underscores"
        )))
    }
}

/// A token unique to this store among all stores on the database: process id, time and
/// a counter, in hex (safe inside an SQL string literal).
fn origin_token() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}.{nanos:x}.{n:x}", std::process::id())
}

/// Refuses a schema that already holds tables but not Kiln's migration history.
async fn check_foreign_schema(pool: &PgPool, url: &str) -> Result<()> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    if !tables.is_empty() && !tables.iter().any(|t| t == "_sqlx_migrations") {
        return Err(StorageError::NotKilnDatabase(format!(
            "{url} is a PostgreSQL database but not Kiln's (its schema has tables {}); refusing to touch it",
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

/// Whether PostgreSQL aborted the transaction to break a deadlock or a serialization
/// conflict, so that running it again can succeed.
fn retryable(e: &StorageError) -> bool {
    matches!(e, StorageError::Database(sqlx::Error::Database(db))
        if db.code().is_some_and(|c| PG_RETRYABLE.contains(&c.as_ref())))
}

/// Runs a transaction body again while PostgreSQL aborts it to break a deadlock.
macro_rules! retrying {
    ($body:expr) => {{
        let mut attempt = 1;
        loop {
            match $body.await {
                Err(e) if attempt < MAX_TX_ATTEMPTS && retryable(&e) => {
                    tracing::debug!(error = %e, attempt, "transaction aborted by the database; trying again");
                    attempt += 1;
                }
                other => break other,
            }
        }
    }};
}

/// Marks a master's earlier work as lost: unfinished builds end as RETRY and claims on
/// incomplete requests are released.
async fn take_back(
    tx: &mut PgConnection,
    master: MasterId,
    now: Timestamp,
    why: &str,
) -> Result<(Vec<RequestId>, Vec<BuildId>)> {
    let mut retried: Vec<i64> = sqlx::query_scalar(
        "UPDATE builds SET complete_at = $1, results = $2, state_string = $3, error = $3
         WHERE master_id = $4 AND complete_at IS NULL RETURNING id",
    )
    .bind(us(now))
    .bind(ResultCode::Retry.code())
    .bind(why)
    .bind(master.0)
    .fetch_all(&mut *tx)
    .await?;
    retried.sort_unstable();
    let mut released: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM buildrequest_claims c USING buildrequests r
         WHERE c.master_id = $1 AND r.id = c.request_id AND r.complete = 0
         RETURNING c.request_id",
    )
    .bind(master.0)
    .fetch_all(&mut *tx)
    .await?;
    released.sort_unstable();
    outbox::record_finished(&mut *tx, &retried).await?;
    // Its reporter leases go too, so that another master delivers at once.
    sqlx::query("UPDATE reporters SET owner = NULL, lease_until = NULL WHERE owner = $1")
        .bind(master.0)
        .execute(&mut *tx)
        .await?;
    if !released.is_empty() {
        listen::notify(&mut *tx, &[StoreSignal::Work]).await?;
    }
    Ok((
        released.into_iter().map(RequestId).collect(),
        retried.into_iter().map(BuildId).collect(),
    ))
}

/// Completes those of the given buildsets whose requests are all complete now, with the
/// worst of their results. The ranking is generated from [`ResultCode::severity`] so
/// that SQL and Rust cannot disagree.
static COMPLETE_BUILDSETS_SQL: LazyLock<String> = LazyLock::new(|| {
    let to_severity: String = ResultCode::ALL
        .iter()
        .map(|r| format!(" WHEN {} THEN {}", r.code(), r.severity()))
        .collect();
    let to_code: String = ResultCode::ALL
        .iter()
        .map(|r| format!(" WHEN {} THEN {}", r.severity(), r.code()))
        .collect();
    format!(
        "UPDATE buildsets bs SET complete = 1, complete_at = $2,
             results = (SELECT CASE MAX(CASE r.results{to_severity} END){to_code} END
                        FROM buildrequests r WHERE r.buildset_id = bs.id)
         WHERE bs.id = ANY($1) AND bs.complete = 0
           AND NOT EXISTS (SELECT 1 FROM buildrequests r WHERE r.buildset_id = bs.id AND r.complete = 0)
         RETURNING bs.id, bs.results"
    )
});

/// Completes those of the given buildsets whose requests are all complete now.
async fn complete_buildsets(
    tx: &mut PgConnection,
    ids: impl IntoIterator<Item = BuildsetId>,
    now: Timestamp,
) -> Result<Vec<CompletedBuildset>> {
    let ids: Vec<i64> = ids
        .into_iter()
        .map(|b| b.0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // Locked first, in id order: a transaction completing a sibling request waits here,
    // and its own check below then sees this one's requests as committed.
    sqlx::query(
        "SELECT id FROM buildsets WHERE id = ANY($1) AND complete = 0 ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(COMPLETE_BUILDSETS_SQL.as_str()))
        .bind(&ids)
        .bind(us(now))
        .fetch_all(&mut *tx)
        .await?;
    let mut completed = rows
        .iter()
        .map(|row| {
            Ok(CompletedBuildset {
                buildset_id: BuildsetId(row.try_get("id")?),
                results: result_code(row.try_get("results")?)?.unwrap_or(ResultCode::Success),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    completed.sort_by_key(|c| c.buildset_id);
    let done: Vec<i64> = completed.iter().map(|c| c.buildset_id.0).collect();
    outbox::record_complete(&mut *tx, &done).await?;
    if !completed.is_empty() {
        let list = completed
            .iter()
            .map(|c| (c.buildset_id, c.results))
            .collect();
        listen::notify(&mut *tx, &[StoreSignal::Complete(list)]).await?;
    }
    Ok(completed)
}

/// Refuses work for a master that is not active (expired or shut down), and holds its
/// row share-locked so that expiring it waits until this transaction is over.
async fn lock_active_master(tx: &mut PgConnection, master: MasterId) -> Result<()> {
    let active: Option<i64> =
        sqlx::query_scalar("SELECT active FROM masters WHERE id = $1 FOR SHARE")
            .bind(master.0)
            .fetch_optional(&mut *tx)
            .await?;
    match active {
        None => Err(StorageError::not_found("master", master)),
        Some(0) => Err(StorageError::MasterInactive(master)),
        Some(_) => Ok(()),
    }
}

/// Locks builders' rows, in id order, while their next build numbers are handed out.
async fn lock_builders(tx: &mut PgConnection, ids: &[i64]) -> Result<()> {
    sqlx::query("SELECT id FROM builders WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(ids)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

fn ids_of<T>(items: &[T], id: impl Fn(&T) -> i64) -> Vec<i64> {
    items.iter().map(id).collect()
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn signals(&self) -> Option<broadcast::Receiver<StoreSignal>> {
        Some(self.notifier.subscribe())
    }

    async fn master_register(&self, name: &str, now: Timestamp) -> Result<RegisteredMaster> {
        let name = &*text::storable(name);
        if name.trim().is_empty() {
            return Err(StorageError::Invalid("master name is empty".into()));
        }
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO masters (name, active, last_active) VALUES ($1, 1, $2)
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
        })
    }

    async fn master_heartbeat(&self, id: MasterId, now: Timestamp) -> Result<()> {
        let updated =
            sqlx::query("UPDATE masters SET last_active = $1 WHERE id = $2 AND active = 1")
                .bind(us(now))
                .bind(id.0)
                .execute(&self.pool)
                .await?;
        if updated.rows_affected() == 1 {
            return Ok(());
        }
        self.master_get(id).await?;
        Err(StorageError::MasterInactive(id))
    }

    async fn master_deactivate(&self, id: MasterId) -> Result<Vec<RequestId>> {
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let updated = sqlx::query("UPDATE masters SET active = 0 WHERE id = $1")
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
        })
    }

    async fn master_expire_stale(&self, params: &ExpireMasters) -> Result<Vec<ExpiredMaster>> {
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let stale = sqlx::query(
                "UPDATE masters SET active = 0 WHERE active = 1 AND last_active < $1 AND id != $2
                 RETURNING id, name",
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
            expired.sort_by_key(|m| m.master_id);
            Ok(expired)
        })
    }

    async fn master_get(&self, id: MasterId) -> Result<Master> {
        let row = sqlx::query("SELECT id, name, active, last_active FROM masters WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StorageError::not_found("master", id))?;
        master_from_row(&row)
    }

    async fn master_list(&self) -> Result<Vec<Master>> {
        let rows = sqlx::query("SELECT id, name, active, last_active FROM masters ORDER BY id")
            .fetch_all(&self.pool)
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
            "INSERT INTO builders (name, description) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET description = COALESCE(excluded.description, builders.description)
             RETURNING id",
        )
        .bind(name)
        .bind(description)
        .fetch_one(&self.pool)
        .await?;
        Ok(BuilderId(id))
    }

    async fn builder_get_by_name(&self, name: &str) -> Result<Option<Builder>> {
        let name = &*text::storable(name);
        let row =
            sqlx::query("SELECT id, name, description, depends_on FROM builders WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| rows::builder_from_row(&r)).transpose()
    }

    async fn builder_get(&self, id: BuilderId) -> Result<Builder> {
        let row =
            sqlx::query("SELECT id, name, description, depends_on FROM builders WHERE id = $1")
                .bind(id.0)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| StorageError::not_found("builder", id))?;
        rows::builder_from_row(&row)
    }

    async fn builder_list(&self) -> Result<Vec<Builder>> {
        let rows = sqlx::query(
            "SELECT id, name, description, depends_on FROM builders ORDER BY name COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::builder_from_row).collect()
    }

    async fn builder_set_depends_on(&self, id: BuilderId, depends_on: &[String]) -> Result<()> {
        let list =
            serde_json::to_string(depends_on).map_err(|e| StorageError::Invalid(e.to_string()))?;
        let done = sqlx::query("UPDATE builders SET depends_on = $1 WHERE id = $2")
            .bind(list)
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        found_or(done.rows_affected(), "builder", id)
    }

    async fn buildset_add_many(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>> {
        let params = &*text::buildsets(params);
        retrying!(self.add_buildsets(params))
    }

    async fn buildset_get(&self, id: BuildsetId) -> Result<Buildset> {
        let row = sqlx::query("SELECT * FROM buildsets WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StorageError::not_found("buildset", id))?;
        buildset_from_row(&row)
    }

    async fn buildset_list(&self, filter: &BuildsetFilter) -> Result<Vec<Buildset>> {
        let mut qb = collections::buildset_list::<Postgres>(filter);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(buildset_from_row).collect()
    }

    async fn buildset_properties(&self, id: BuildsetId) -> Result<Properties> {
        self.buildset_get(id).await?;
        let rows = sqlx::query(
            "SELECT name, value, source FROM buildset_properties WHERE buildset_id = $1",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        properties_from_rows(&rows)
    }

    async fn buildset_sourcestamps(&self, id: BuildsetId) -> Result<Vec<SourceStamp>> {
        self.buildset_get(id).await?;
        let rows = sqlx::query(
            "SELECT s.codebase, s.repository, s.branch, s.revision, s.project
             FROM buildset_sourcestamps bs JOIN sourcestamps s ON s.id = bs.sourcestamp_id
             WHERE bs.buildset_id = $1
             ORDER BY s.codebase COLLATE \"C\", s.repository COLLATE \"C\", s.branch COLLATE \"C\",
                      s.revision COLLATE \"C\", s.project COLLATE \"C\"",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::sourcestamp_from_row).collect()
    }

    async fn buildset_sourcestamp_ids(&self, id: BuildsetId) -> Result<Vec<SourceStampId>> {
        self.buildset_get(id).await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT sourcestamp_id FROM buildset_sourcestamps WHERE buildset_id = $1 ORDER BY sourcestamp_id",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(SourceStampId).collect())
    }

    async fn buildset_children(&self, parent_request: RequestId) -> Result<Vec<ChildBuildset>> {
        let rows = sqlx::query(
            "SELECT bs.id AS bs, bs.trigger_key, bs.parent_relationship, r.waited_for, bs.parent_buildid,
                    r.id AS req, r.builder_id, bl.name, r.complete, r.results, lb.id AS build, lb.return_value
             FROM buildsets bs JOIN buildrequests r ON r.buildset_id = bs.id
             JOIN builders bl ON bl.id = r.builder_id
             LEFT JOIN builds lb ON lb.id = (SELECT MAX(b.id) FROM builds b WHERE b.buildrequest_id = r.id)
             WHERE bs.parent_request_id = $1 ORDER BY bs.id, r.id",
        )
        .bind(parent_request.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let rv: Option<String> = row.try_get("return_value")?;
                Ok(ChildBuildset {
                    buildset_id: BuildsetId(row.try_get("bs")?),
                    trigger_key: row.try_get("trigger_key")?,
                    relationship: row.try_get("parent_relationship")?,
                    waited_for: row.try_get::<i64, _>("waited_for")? != 0,
                    parent_buildid: row
                        .try_get::<Option<i64>, _>("parent_buildid")?
                        .map(BuildId),
                    request_id: RequestId(row.try_get("req")?),
                    builder_id: BuilderId(row.try_get("builder_id")?),
                    builder: row.try_get("name")?,
                    complete: row.try_get::<i64, _>("complete")? != 0,
                    results: result_code(row.try_get("results")?)?,
                    build_id: row.try_get::<Option<i64>, _>("build")?.map(BuildId),
                    return_value: rv.as_deref().map(rows::from_json).transpose()?,
                })
            })
            .collect()
    }

    async fn buildset_adopt(&self, ids: &[BuildsetId], parent_build: BuildId) -> Result<()> {
        sqlx::query("UPDATE buildsets SET parent_buildid = $1 WHERE id = ANY($2)")
            .bind(parent_build.0)
            .bind(ids_of(ids, |b| b.0))
            .execute(&self.pool)
            .await
            .map_err(|e| fk_to_not_found(e, "build", Some(parent_build)))?;
        Ok(())
    }

    async fn request_get(&self, id: RequestId) -> Result<BuildRequest> {
        let sql = format!("{REQUEST_FROM} WHERE r.id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StorageError::not_found("build request", id))?;
        request_from_row(&row)
    }

    async fn request_list(&self, filter: &RequestFilter) -> Result<Vec<BuildRequest>> {
        let mut qb = collections::request_list::<Postgres>(filter);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(request_from_row).collect()
    }

    async fn request_claim(
        &self,
        ids: &[RequestId],
        master: MasterId,
        now: Timestamp,
    ) -> Result<()> {
        let ids: Vec<i64> = ids
            .iter()
            .map(|r| r.0)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            lock_active_master(&mut tx, master).await?;
            let rows = sqlx::query(
                "SELECT r.id, r.complete, c.master_id FROM buildrequests r
                 LEFT JOIN buildrequest_claims c ON c.request_id = r.id
                 WHERE r.id = ANY($1) ORDER BY r.id FOR UPDATE OF r",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            let mut found = BTreeSet::new();
            let mut taken = Vec::new();
            for row in &rows {
                let id: i64 = row.try_get("id")?;
                found.insert(id);
                let claimed: Option<i64> = row.try_get("master_id")?;
                if claimed.is_some() || row.try_get::<i64, _>("complete")? != 0 {
                    taken.push(RequestId(id));
                }
            }
            if let Some(missing) = ids.iter().find(|id| !found.contains(*id)) {
                return Err(StorageError::not_found("build request", missing));
            }
            if !taken.is_empty() {
                return Err(StorageError::AlreadyClaimed(taken));
            }
            let inserted: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO buildrequest_claims (request_id, master_id, claimed_at)
                 SELECT id, $2, $3 FROM unnest($1::bigint[]) id
                 ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            )
            .bind(&ids)
            .bind(master.0)
            .bind(us(now))
            .fetch_all(&mut *tx)
            .await?;
            if inserted.len() != ids.len() {
                let lost = ids
                    .iter()
                    .filter(|id| !inserted.contains(id))
                    .map(|id| RequestId(*id))
                    .collect();
                return Err(StorageError::AlreadyClaimed(lost));
            }
            tx.commit().await?;
            Ok(())
        })
    }

    async fn request_unclaim(&self, ids: &[RequestId], master: MasterId) -> Result<()> {
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let released = sqlx::query(
                "DELETE FROM buildrequest_claims c USING buildrequests r
                 WHERE c.master_id = $1 AND c.request_id = ANY($2) AND r.id = c.request_id AND r.complete = 0",
            )
            .bind(master.0)
            .bind(ids_of(ids, |r| r.0))
            .execute(&mut *tx)
            .await?;
            if released.rows_affected() > 0 {
                listen::notify(&mut tx, &[StoreSignal::Work]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    async fn request_set_priority(&self, id: RequestId, priority: i32) -> Result<()> {
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&priority) {
            return Err(StorageError::Invalid(format!(
                "priority {priority} is outside {MIN_PRIORITY}..={MAX_PRIORITY}"
            )));
        }
        let done =
            sqlx::query("UPDATE buildrequests SET priority = $1 WHERE id = $2 AND complete = 0")
                .bind(priority)
                .bind(id.0)
                .execute(&self.pool)
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
        let list: Vec<i64> = ids.iter().map(|r| r.0).collect();
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let rows = sqlx::query(
                "SELECT id, complete, buildset_id FROM buildrequests WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            )
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
            sqlx::query(
                "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2 WHERE id = ANY($3)",
            )
            .bind(us(now))
            .bind(results.code())
            .bind(&list)
            .execute(&mut *tx)
            .await?;
            let completed = complete_buildsets(&mut tx, buildsets, now).await?;
            tx.commit().await?;
            Ok(completed)
        })
    }

    async fn request_cancel(&self, ids: &[RequestId], now: Timestamp) -> Result<CancelOutcome> {
        let list = ids_of(ids, |r| r.0);
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            // The requests asked for and, recursively, those of the waited-for child
            // buildsets their builds started; locked so that a claim cannot slip in.
            let locked: Vec<i64> = sqlx::query_scalar(
                "WITH RECURSIVE tree (id) AS (
                     SELECT unnest($1::bigint[])
                     UNION
                     SELECT r.id FROM tree t JOIN buildsets bs ON bs.parent_request_id = t.id
                     JOIN buildrequests r ON r.buildset_id = bs.id WHERE r.waited_for = 1)
                 SELECT r.id FROM buildrequests r
                 WHERE r.complete = 0 AND r.id IN (SELECT id FROM tree) ORDER BY r.id FOR UPDATE OF r",
            )
            .bind(&list)
            .fetch_all(&mut *tx)
            .await?;
            // Their claims, read by a statement of its own: one that waited for a
            // claimer's lock sees the claim only with a snapshot taken after that claimer
            // committed. (Claiming locks the request row but does not change it, so the
            // locking statement's own join would still see no claim, and the request
            // would complete as CANCELLED while its build ran.)
            let rows = sqlx::query(
                "SELECT r.id, r.buildset_id, c.master_id FROM buildrequests r
                 LEFT JOIN buildrequest_claims c ON c.request_id = r.id
                 WHERE r.id = ANY($1) ORDER BY r.id",
            )
            .bind(&locked)
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
            if !outcome.flagged.is_empty() {
                sqlx::query("UPDATE buildrequests SET cancel_requested = 1 WHERE id = ANY($1)")
                    .bind(ids_of(&outcome.flagged, |r| r.0))
                    .execute(&mut *tx)
                    .await?;
                listen::notify(&mut tx, &[StoreSignal::Cancel]).await?;
            }
            if !outcome.completed.is_empty() {
                sqlx::query(
                    "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2, cancel_requested = 1
                     WHERE id = ANY($3)",
                )
                .bind(us(now))
                .bind(ResultCode::Cancelled.code())
                .bind(ids_of(&outcome.completed, |r| r.0))
                .execute(&mut *tx)
                .await?;
            }
            outcome.buildsets_completed = complete_buildsets(&mut tx, buildsets, now).await?;
            tx.commit().await?;
            Ok(outcome)
        })
    }

    async fn request_cancel_pending(&self, master: MasterId) -> Result<Vec<RequestId>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT r.id FROM buildrequests r JOIN buildrequest_claims c ON c.request_id = r.id
             WHERE c.master_id = $1 AND r.complete = 0 AND r.cancel_requested = 1 ORDER BY r.id",
        )
        .bind(master.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(RequestId).collect())
    }

    async fn build_start_available(&self, params: &StartAvailable) -> Result<StartOutcome> {
        retrying!(self.start_available(params))
    }

    async fn build_finish_and_settle(
        &self,
        master: MasterId,
        ends: &[BuildEnd],
    ) -> Result<Settled> {
        let ends = &*text::ends(ends);
        retrying!(self.finish_and_settle(master, ends))
    }

    async fn build_add(&self, params: &NewBuild) -> Result<Build> {
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let row = sqlx::query(
                "SELECT r.builder_id, r.complete, c.master_id FROM buildrequests r
                 LEFT JOIN buildrequest_claims c ON c.request_id = r.id WHERE r.id = $1 FOR UPDATE OF r",
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
            lock_builders(&mut tx, &[builder_id]).await?;
            let sql = format!(
                "INSERT INTO builds (number, builder_id, buildrequest_id, master_id, worker_slot, started_at, state_string)
                 SELECT COALESCE(MAX(number), 0) + 1, $1, $2, $3, $4, $5, $6 FROM builds WHERE builder_id = $1
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
                .fetch_one(&mut *tx)
                .await?;
            let build = build_from_row(&row)?;
            outbox::record_started(&mut tx, &[build.id.0]).await?;
            tx.commit().await?;
            Ok(build)
        })
    }

    async fn build_get(&self, id: BuildId) -> Result<Build> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds b WHERE b.id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StorageError::not_found("build", id))?;
        build_from_row(&row)
    }

    async fn build_get_by_number(&self, builder: BuilderId, number: i64) -> Result<Build> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds b WHERE b.builder_id = $1 AND b.number = $2"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(builder.0)
            .bind(number)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| {
                StorageError::not_found("build", format!("#{number} of builder {builder}"))
            })?;
        build_from_row(&row)
    }

    async fn build_list(&self, filter: &BuildFilter) -> Result<Vec<Build>> {
        let mut qb = collections::build_list::<Postgres>(filter);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(build_from_row).collect()
    }

    async fn build_set_state(&self, id: BuildId, state: &str) -> Result<()> {
        let state = &*text::storable(state);
        let updated = sqlx::query("UPDATE builds SET state_string = $1 WHERE id = $2")
            .bind(state)
            .bind(id.0)
            .execute(&self.pool)
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
            sqlx::query("UPDATE builds SET locks_duration_s = locks_duration_s + $1 WHERE id = $2")
                .bind(seconds)
                .bind(id.0)
                .execute(&self.pool)
                .await?;
        found_or(updated.rows_affected(), "build", id)
    }

    async fn build_finish(&self, params: &FinishBuild) -> Result<()> {
        let params = &*text::finish(params);
        let finished = retrying!(async {
            let mut tx = self.pool.begin().await?;
            let updated = sqlx::query(
                "UPDATE builds SET complete_at = $1, results = $2, return_value = $3, error = $4, traceback = $5,
                                   state_string = COALESCE($6, state_string)
                 WHERE id = $7 AND master_id = $8 AND complete_at IS NULL",
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
                outbox::record_finished(&mut tx, &[params.build_id.0]).await?;
                tx.commit().await?;
                return Ok(true);
            }
            tx.rollback().await?;
            Ok(false)
        })?;
        if finished {
            return Ok(());
        }
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
                 JOIN buildset_sourcestamps bss ON bss.buildset_id = r.buildset_id WHERE r.id = $1)
             SELECT {BUILD_COLUMNS} FROM builds b JOIN buildrequests r ON r.id = b.buildrequest_id
             WHERE b.builder_id = $2 AND b.number < $3 AND b.results = $4
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
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| build_from_row(&r)).transpose()
    }

    async fn build_latest_successful(&self, builder: BuilderId) -> Result<Option<Build>> {
        self.build_latest_with(builder, &[ResultCode::Success, ResultCode::Warnings])
            .await
    }

    async fn build_latest_with(
        &self,
        builder: BuilderId,
        results: &[ResultCode],
    ) -> Result<Option<Build>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds b
             WHERE b.builder_id = $1 AND b.complete_at IS NOT NULL AND b.results = ANY($2)
             ORDER BY b.complete_at DESC, b.id DESC LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(builder.0)
            .bind(ids_of(results, |r| i64::from(r.code())))
            .fetch_optional(&self.pool)
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
        sqlx::query("DELETE FROM builds WHERE id = $1")
            .bind(id.0)
            .execute(&self.pool)
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
            "INSERT INTO build_properties (build_id, name, value, source) VALUES ($1, $2, $3, $4)
             ON CONFLICT (build_id, name) DO UPDATE SET value = excluded.value, source = excluded.source",
        )
        .bind(id.0)
        .bind(name)
        .bind(property.value.to_string())
        .bind(&property.source)
        .execute(&self.pool)
        .await
        .map_err(|e| fk_to_not_found(e, "build", Some(id)))?;
        Ok(())
    }

    async fn build_properties(&self, id: BuildId) -> Result<Properties> {
        self.build_get(id).await?;
        let rows =
            sqlx::query("SELECT name, value, source FROM build_properties WHERE build_id = $1")
                .bind(id.0)
                .fetch_all(&self.pool)
                .await?;
        properties_from_rows(&rows)
    }

    async fn build_artifacts(&self, id: BuildId) -> Result<Vec<Artifact>> {
        self.build_get(id).await?;
        let rows = sqlx::query(
            "SELECT path, size, location FROM build_artifacts WHERE build_id = $1 ORDER BY path COLLATE \"C\"",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
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
             VALUES ($1, $2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM build_progress WHERE build_id = $1), $3, $4, $5, $6)
             ON CONFLICT (build_id, group_path) DO UPDATE SET
                 current = excluded.current, total = excluded.total,
                 status = excluded.status, updated_at = excluded.updated_at",
        )
        .bind(build.0)
        .bind(&path)
        .bind(clamp_u64(report.current))
        .bind(clamp_u64(report.total))
        .bind(&report.status)
        .bind(us(now))
        .execute(&self.pool)
        .await
        .map_err(|e| fk_to_not_found(e, "build", Some(build)))?;
        Ok(())
    }

    async fn progress_list(&self, build: BuildId) -> Result<Vec<ProgressRecord>> {
        let rows = sqlx::query(
            "SELECT group_path, current, total, status, updated_at FROM build_progress
             WHERE build_id = $1 ORDER BY seq",
        )
        .bind(build.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::progress_from_row).collect()
    }

    async fn log_append(&self, build: BuildId, records: &[LogRecord]) -> Result<()> {
        let records = &*text::logs(records);
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in records.chunks(LOG_INSERT_CHUNK) {
            sqlx::query(
                "INSERT INTO build_logs (build_id, at, level, message, fields)
                 SELECT $1, at, level, message, fields
                 FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[]) AS t(at, level, message, fields)",
            )
            .bind(build.0)
            .bind(ids_of(chunk, |r| us(r.at)))
            .bind(ids_of(chunk, |r| i64::from(r.level.number())))
            .bind(chunk.iter().map(|r| r.message.clone()).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|r| serde_json::Value::Object(r.fields.clone()).to_string())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await
            .map_err(|e| fk_to_not_found(e, "build", Some(build)))?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn log_list(&self, query: &LogQuery) -> Result<Vec<LogEntry>> {
        let mut qb = collections::log_list::<Postgres>(query);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(log_from_row).collect()
    }

    async fn log_prune(&self, older_than: Timestamp, below: LogLevel) -> Result<u64> {
        let deleted = sqlx::query("DELETE FROM build_logs WHERE at < $1 AND level < $2")
            .bind(us(older_than))
            .bind(i64::from(below.number()))
            .execute(&self.pool)
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
        retrying!(self.reporter_progress_impl(progress))
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

impl PostgresStore {
    /// Runs a collection query: the page and the total.
    async fn run_query(
        &self,
        collection: Collection,
        q: &Query,
    ) -> Result<(Vec<sqlx::postgres::PgRow>, i64)> {
        let mut statements = collections::statements::<Postgres>(collection, q, "strpos")?;
        let total: i64 = statements
            .count
            .build_query_scalar()
            .fetch_one(&self.pool)
            .await?;
        let rows = statements.select.build().fetch_all(&self.pool).await?;
        Ok((rows, total))
    }
}
