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

mod builders;
mod builds;
mod buildsets;
mod listen;
mod masters;
mod outbox;
mod requests;
mod retention;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Postgres};
use tokio::sync::broadcast;

use crate::sql::{Dialect, Sql, sqlx_builder};
use crate::{Result, StorageError, Store, StoreOptions, StoreSignal};
use kiln_model::MasterId;
use listen::Notifier;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How often a transaction that PostgreSQL aborted to break a deadlock (or a
/// serialization failure) is tried again before the error reaches the caller.
const MAX_TX_ATTEMPTS: u32 = 5;

/// PostgreSQL's "invalid_catalog_name": the database does not exist.
const PG_NO_DATABASE: &str = "3D000";
/// PostgreSQL's "deadlock_detected" and "serialization_failure".
const PG_RETRYABLE: [&str; 2] = ["40P01", "40001"];

/// A Kiln store in a PostgreSQL database (or one schema of it, chosen with the URL's
/// `options=-c search_path=...`).
#[derive(Debug)]
pub struct PostgresStore {
    pool: PgPool,
    notifier: Notifier,
    /// The queue's and the claims' growth ([`Hot`]).
    growth: [Arc<Growth>; 2],
}

/// The hot tables, in the two groups that grow at different moments and are analyzed
/// apart: the queue (buildsets and their requests, grown by submits) and the claims
/// (claims and builds, grown by starts).
#[derive(Debug, Clone, Copy)]
pub(super) enum Hot {
    Queue,
    Claims,
}

impl Hot {
    fn tables(self) -> &'static str {
        match self {
            Hot::Queue => "buildsets, buildrequests",
            Hot::Claims => "buildrequest_claims, builds",
        }
    }
}

/// Rows this process added to one group of hot tables, and how many there were when it
/// last had them analyzed.
#[derive(Debug, Default)]
struct Growth {
    added: AtomicU64,
    analyzed: AtomicU64,
    running: AtomicBool,
}

/// The hot tables are analyzed again once this many rows were added since the last time,
/// or a tenth of all added so far if that is more (autovacuum's own rule, without its
/// wait). The planner chooses by the tables' statistics, and a queue's tables go from
/// empty to tens of thousands of rows within seconds, long before autovacuum's next
/// round (a minute apart) looks: planned for the empty tables, completing a buildset
/// walked every open buildset (`complete = 0` looked selective) and each batch grew with
/// the queue. sqlx prepares statements, and PostgreSQL may keep a generic plan per
/// connection made from the tables' statistics at the time (seen in the benchmark's
/// floor before it took this rule too: `id = ANY($1)` tested on every row of a sequential
/// scan, half the server's samples); an ANALYZE invalidates those plans too. Planning
/// every statement afresh instead (`plan_cache_mode = force_custom_plan`) cost 13% of
/// the server's samples. PostgreSQL's advice after a bulk load is to ANALYZE; this is
/// that advice, taken as the engine bulk-loads its own queue.
///
/// Each group counts and is analyzed on its own ([`Hot`]). Analyzed together on a large
/// submit, the claims table was sampled while the first claims were still uncommitted:
/// ANALYZE counts only committed rows but all pages, so its statistics said a few rows
/// per page, and the planner, believing the growing claims table nearly empty, skipped
/// claimed requests by scanning all of it once per request it walked (seen with two
/// masters: 200–700 ms per claim turn at 8,000 claims, ~1,700 jobs/s instead of
/// ~8,000). A group first analyzed after thousands of its own rows were committed is
/// not misread that way by the few hundred of one batch in flight; before its first
/// ANALYZE, PostgreSQL estimates a table from its current size.
pub const ANALYZE_AFTER_ROWS: u64 = 5_000;

/// Whether tables that have had `added` rows added, `analyzed` of them when they were
/// last analyzed, are due for an ANALYZE by the rule of [`ANALYZE_AFTER_ROWS`] (public
/// for the benchmark's floor, which follows the same rule).
pub fn analyze_due(added: u64, analyzed: u64) -> bool {
    added.saturating_sub(analyzed) >= ANALYZE_AFTER_ROWS.max(analyzed / 10)
}

impl PostgresStore {
    /// Counts rows added to a group of hot tables and, when it has grown enough since it
    /// was last analyzed, analyzes it in the background (one ANALYZE per group at a
    /// time).
    pub(super) fn grew(&self, hot: Hot, rows: usize) {
        let growth = match hot {
            Hot::Queue => &self.growth[0],
            Hot::Claims => &self.growth[1],
        };
        let total = growth.added.fetch_add(rows as u64, Ordering::Relaxed) + rows as u64;
        let last = growth.analyzed.load(Ordering::Relaxed);
        if !analyze_due(total, last) || growth.running.swap(true, Ordering::AcqRel) {
            return;
        }
        growth.analyzed.store(total, Ordering::Relaxed);
        let pool = self.pool.clone();
        let growth = growth.clone();
        tokio::spawn(async move {
            let sql = format!("ANALYZE {}", hot.tables());
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await {
                tracing::debug!(error = %e, "analyzing the hot tables failed");
            }
            growth.running.store(false, Ordering::Release);
        });
    }
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
        Ok(PostgresStore {
            pool,
            notifier,
            growth: Default::default(),
        })
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
pub(crate) use retrying;

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

sqlx_builder!(Postgres);

#[async_trait]
impl Dialect for PostgresStore {
    type Row = PgRow;
    const BYTE_ORDER: &'static str = " COLLATE \"C\"";
    const CONTAINS: &'static str = "strpos";

    async fn read(&self, sql: Sql) -> Result<Vec<PgRow>> {
        Ok(builder(sql).build().fetch_all(&self.pool).await?)
    }

    async fn write(&self, sql: Sql) -> Result<u64> {
        Ok(builder(sql)
            .build()
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn write_returning(&self, sql: Sql) -> Result<Vec<PgRow>> {
        Ok(builder(sql).build().fetch_all(&self.pool).await?)
    }

    async fn write_all(&self, statements: Vec<Sql>) -> Result<Vec<u64>> {
        if statements.is_empty() {
            return Ok(Vec::new());
        }
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let mut changed = Vec::with_capacity(statements.len());
            for sql in statements.iter().cloned() {
                changed.push(
                    builder(sql)
                        .build()
                        .execute(&mut *tx)
                        .await?
                        .rows_affected(),
                );
            }
            tx.commit().await?;
            Ok(changed)
        })
    }
}

impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn signals(&self) -> Option<broadcast::Receiver<StoreSignal>> {
        Some(self.notifier.subscribe())
    }
}

#[cfg(test)]
mod plans {
    //! The dashboard's and the API's common reads can be served by indexes: with
    //! sequential scans and sorts priced out, PostgreSQL's plan for each still has
    //! neither on a large table. (On a test's few rows PostgreSQL rightly prefers a
    //! sequential scan; pricing it out asks whether an index could serve instead.)

    use sqlx::Row;

    use super::*;
    use crate::collections::{LARGE_TABLES, dashboard_reads};
    use crate::sql::Sql;

    /// Deleting a row makes PostgreSQL find the rows that reference it, by the
    /// referencing columns (the foreign key's checks and actions): every foreign key to a
    /// table whose rows are deleted can be served by an index, or each delete walks the
    /// referencing table.
    #[tokio::test]
    async fn every_reference_to_a_deletable_row_is_found_by_an_index() -> anyhow::Result<()> {
        let Some((_schema, mut conn)) = priced_out("references", &["enable_seqscan"]).await? else {
            return Ok(());
        };
        let keys = sqlx::query(
            "SELECT child.relname AS child, parent.relname AS parent,
                    array_agg(quote_ident(a.attname) ORDER BY k.ord) AS cols,
                    array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord) AS types
             FROM pg_constraint c
             JOIN pg_class child ON child.oid = c.conrelid
             JOIN pg_class parent ON parent.oid = c.confrelid
             CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k (attnum, ord)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
             WHERE c.contype = 'f' AND c.connamespace = current_schema()::regnamespace
             GROUP BY c.oid, child.relname, parent.relname
             ORDER BY child.relname, c.oid",
        )
        .fetch_all(&mut *conn)
        .await?;
        anyhow::ensure!(keys.len() > 20, "only {} foreign keys found", keys.len());
        let mut checked = 0;
        for key in &keys {
            let child: String = key.try_get("child")?;
            let parent: String = key.try_get("parent")?;
            let cols: Vec<String> = key.try_get("cols")?;
            let types: Vec<String> = key.try_get("types")?;
            if crate::common::NEVER_DELETED.contains(&parent.as_str()) {
                continue;
            }
            let matches: Vec<String> = cols
                .iter()
                .zip(&types)
                .map(|(col, ty)| format!("{col} = '1'::{ty}"))
                .collect();
            let explain = format!(
                "EXPLAIN SELECT 1 FROM {} WHERE {}",
                quote(&child),
                matches.join(" AND ")
            );
            let steps: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(explain))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<_, _>>()?;
            anyhow::ensure!(
                !steps.iter().any(|s| s.contains("Seq Scan on ")),
                "deleting from {parent} walks {child} to find its {cols:?}: {steps:#?}"
            );
            checked += 1;
        }
        anyhow::ensure!(checked > 20, "only {checked} references checked");
        Ok(())
    }

    /// A connection to a store in a fresh schema, with each of `settings` (the planner's
    /// `enable_*`) off; `None` without a PostgreSQL to test against. The schema lives as
    /// long as the first value returned.
    async fn priced_out(
        what: &str,
        settings: &[&str],
    ) -> anyhow::Result<
        Option<(
            kiln_testdb::postgres::Schema,
            sqlx::pool::PoolConnection<sqlx::Postgres>,
        )>,
    > {
        let Some(schema) = kiln_testdb::postgres::Schema::create(what).await? else {
            return Ok(None);
        };
        let store = PostgresStore::open(&schema.url, &StoreOptions::default()).await?;
        let mut conn = store.pool.acquire().await?;
        for setting in settings {
            sqlx::query(sqlx::AssertSqlSafe(format!("SET {setting} = off")))
                .execute(&mut *conn)
                .await?;
        }
        Ok(Some((schema, conn)))
    }

    /// A table's name as an identifier.
    fn quote(name: &str) -> String {
        format!("\"{}\"", name.replace('"', "\"\""))
    }

    #[tokio::test]
    async fn the_dashboards_reads_can_be_served_by_indexes() -> anyhow::Result<()> {
        let Some((_schema, mut conn)) =
            priced_out("plans", &["enable_seqscan", "enable_sort"]).await?
        else {
            return Ok(());
        };
        for read in dashboard_reads(
            <PostgresStore as Dialect>::CONTAINS,
            <PostgresStore as Dialect>::BYTE_ORDER,
        )? {
            let mut explain = Sql::new("EXPLAIN ");
            for part in read.sql.parts() {
                match part {
                    crate::sql::Part::Text(t) => {
                        explain.push(t);
                    }
                    crate::sql::Part::Param(p) => {
                        explain.bind(p);
                    }
                }
            }
            let rows = builder(explain).build().fetch_all(&mut *conn).await?;
            let steps: Vec<String> = rows
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<_, _>>()?;
            let bad: Vec<&String> = steps
                .iter()
                .filter(|s| {
                    let s = s.trim_start().trim_start_matches("-> ");
                    let scans = LARGE_TABLES
                        .iter()
                        .any(|(table, _)| s.starts_with(&format!("Seq Scan on {table} ")));
                    let sorts = s.starts_with("Sort ") && !s.starts_with("Sort Key");
                    scans || sorts
                })
                .collect();
            anyhow::ensure!(
                bad.is_empty(),
                "{}: {bad:?} walks or sorts a whole table (plan: {steps:#?})",
                read.what
            );
        }
        Ok(())
    }
}

/// A store in a fresh schema with one builder, and a buildset of one request for it to
/// submit as many times as a test needs; `None` without a PostgreSQL to test against.
/// The schema lives as long as the returned [`kiln_testdb::postgres::Schema`].
#[cfg(test)]
pub(super) async fn store_with_one_builder(
    what: &str,
) -> anyhow::Result<
    Option<(
        kiln_testdb::postgres::Schema,
        PostgresStore,
        crate::NewBuildset,
    )>,
> {
    use crate::seam::Builders;
    let Some(schema) = kiln_testdb::postgres::Schema::create(what).await? else {
        return Ok(None);
    };
    let store = PostgresStore::open(&schema.url, &StoreOptions::default()).await?;
    let builder = store.builder_ensure("b", None).await?;
    let one = crate::NewBuildset {
        reason: "load".into(),
        builder_ids: vec![builder],
        submitted_at: kiln_model::now(),
        ..Default::default()
    };
    Ok(Some((schema, store, one)))
}

#[cfg(test)]
mod growth {
    //! The rule that analyzes the hot tables as they grow ([`ANALYZE_AFTER_ROWS`]).

    use super::*;
    use crate::seam::BuildsetWrites;

    /// The statistics PostgreSQL keeps of a table: -1 rows until it is first analyzed.
    async fn reltuples(store: &PostgresStore, table: &str) -> anyhow::Result<f32> {
        Ok(
            sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)")
                .bind(table)
                .fetch_one(&store.pool)
                .await?,
        )
    }

    #[tokio::test]
    async fn a_large_submit_analyzes_the_queue_and_leaves_the_claims_to_be_sampled_later()
    -> anyhow::Result<()> {
        let Some((_schema, store, one)) = store_with_one_builder("growth").await? else {
            return Ok(());
        };
        // Each buildset adds two rows to the queue: itself and its request.
        let batch = vec![one; (ANALYZE_AFTER_ROWS / 2) as usize];
        store.buildset_add_many(&batch).await?;
        // The ANALYZE runs in the background; its commit updates pg_class.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while reltuples(&store, "buildrequests").await? < 1.0 {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the queue was not analyzed after {} rows",
                ANALYZE_AFTER_ROWS
            );
            tokio::task::yield_now().await;
        }
        // Sampled now, while no claim exists, the claims table would read as empty and
        // stay so to the planner while it fills.
        for table in ["buildrequest_claims", "builds"] {
            assert_eq!(
                reltuples(&store, table).await?,
                -1.0,
                "{table} was analyzed"
            );
        }
        Ok(())
    }
}
