//! The reporters' outbox in PostgreSQL: events recorded inside the transactions that
//! make the changes they describe, and the reporters' cursors and leases.
//!
//! Each `record_*` function first takes the outbox's transaction-level advisory lock,
//! but only while a reporter is registered (a database without reporters pays that one
//! statement and stores nothing). Holding the lock until commit makes the order in which
//! seqs are handed out the order in which they become visible, so a reporter reading
//! "everything after my cursor" never steps over an event that commits late.

use async_trait::async_trait;
use sqlx::PgConnection;

use super::{MAX_TX_ATTEMPTS, PostgresStore, retryable, retrying};
use crate::common::REPORTER_COLUMNS;
use crate::rows::{micros, reporter_from_row};
use crate::seam::OutboxWrites;
use crate::{ReporterProgress, Result, StorageError, text, validate};
use kiln_model::ReporterState;

/// The advisory lock key that serialises outbox writers ("kiln" in ASCII).
const OUTBOX_LOCK: i64 = 0x6b69_6c6e;

/// Seconds since the epoch as a JSON number, from stored microseconds.
fn secs(column: &str) -> String {
    format!("({column} / 1000000.0)::float8")
}

/// Takes the outbox lock if anyone listens; false means nothing needs recording.
async fn lock_if_reporters(tx: &mut PgConnection, ids: &[i64]) -> Result<bool> {
    if ids.is_empty() {
        return Ok(false);
    }
    let locked: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM (SELECT pg_advisory_xact_lock($1) FROM reporters LIMIT 1) l",
    )
    .bind(OUTBOX_LOCK)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(locked.is_some())
}

async fn insert(tx: &mut PgConnection, ids: &[i64], select: String) -> Result<()> {
    if !lock_if_reporters(tx, ids).await? {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO events (kind, buildset_id, build_id, builder, results, at, payload) {select}"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ids)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The names of a buildset's builders (alias `bs`), as a JSON array.
const BUILDERS_OF_BS: &str =
    "(SELECT COALESCE(json_agg(bl.name ORDER BY r.id), '[]'::json) FROM buildrequests r
     JOIN builders bl ON bl.id = r.builder_id WHERE r.buildset_id = bs.id)";

/// Records `buildset_submitted` for buildsets.
pub(super) async fn record_submitted(tx: &mut PgConnection, ids: &[i64]) -> Result<()> {
    let select = format!(
        "SELECT 'buildset_submitted', bs.id, NULL, NULL, NULL, bs.submitted_at,
                json_build_object('event', 'buildset_submitted', 'buildset_id', bs.id, 'reason', bs.reason,
                            'external_idstring', bs.external_idstring, 'submitted_at', {},
                            'parent_buildid', bs.parent_buildid, 'parent_relationship', bs.parent_relationship,
                            'builders', {BUILDERS_OF_BS})::text
         FROM buildsets bs WHERE bs.id = ANY($1) ORDER BY bs.id",
        secs("bs.submitted_at")
    );
    insert(tx, ids, select).await
}

/// The fields every build event carries.
fn build_fields() -> String {
    format!(
        "'build_id', b.id, 'number', b.number, 'builder', bl.name, 'buildset_id', r.buildset_id,
         'request_id', r.id, 'master_id', b.master_id, 'started_at', {}",
        secs("b.started_at")
    )
}

const BUILD_FROM: &str = "FROM builds b JOIN buildrequests r ON r.id = b.buildrequest_id
     JOIN builders bl ON bl.id = b.builder_id
     WHERE b.id = ANY($1) ORDER BY b.id";

/// Records `build_started` for builds.
pub(super) async fn record_started(tx: &mut PgConnection, ids: &[i64]) -> Result<()> {
    let select = format!(
        "SELECT 'build_started', r.buildset_id, b.id, bl.name, NULL::bigint, b.started_at,
                json_build_object('event', 'build_started', {})::text {BUILD_FROM}",
        build_fields()
    );
    insert(tx, ids, select).await
}

/// Records `build_finished` for builds (finished by now).
pub(super) async fn record_finished(tx: &mut PgConnection, ids: &[i64]) -> Result<()> {
    let select = format!(
        "SELECT 'build_finished', r.buildset_id, b.id, bl.name, b.results, b.complete_at,
                json_build_object('event', 'build_finished', {},
                            'complete_at', {}, 'duration_s', {},
                            'results', b.results, 'state_string', b.state_string,
                            'return_value', COALESCE(b.return_value, 'null')::json,
                            'error', b.error)::text {BUILD_FROM}",
        build_fields(),
        secs("b.complete_at"),
        secs("(b.complete_at - b.started_at)")
    );
    insert(tx, ids, select).await
}

/// Records `buildset_complete` for buildsets (complete by now).
pub(super) async fn record_complete(tx: &mut PgConnection, ids: &[i64]) -> Result<()> {
    let select = format!(
        "SELECT 'buildset_complete', bs.id, NULL, NULL, bs.results, bs.complete_at,
                json_build_object('event', 'buildset_complete', 'buildset_id', bs.id, 'reason', bs.reason,
                            'external_idstring', bs.external_idstring, 'results', bs.results,
                            'submitted_at', {}, 'complete_at', {}, 'duration_s', {},
                            'parent_buildid', bs.parent_buildid, 'builders', {BUILDERS_OF_BS})::text
         FROM buildsets bs WHERE bs.id = ANY($1) ORDER BY bs.id",
        secs("bs.submitted_at"),
        secs("bs.complete_at"),
        secs("(bs.complete_at - bs.submitted_at)")
    );
    insert(tx, ids, select).await
}

#[async_trait]
impl OutboxWrites for PostgresStore {
    async fn reporter_register(&self, name: &str) -> Result<ReporterState> {
        validate::name("reporter", name)?;
        let name = &*text::storable(name);
        let mut tx = self.pool.begin().await?;
        // Under the outbox lock, so that "the end of the outbox" is not overtaken by an
        // event committing late.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(OUTBOX_LOCK)
            .execute(&mut *tx)
            .await?;
        let sql = format!(
            "INSERT INTO reporters (name, cursor) VALUES ($1, (SELECT COALESCE(MAX(seq), 0) FROM events))
             ON CONFLICT (name) DO UPDATE SET name = excluded.name
             RETURNING {REPORTER_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        reporter_from_row(&row)
    }

    async fn reporter_progress(&self, p: &ReporterProgress) -> Result<()> {
        let p = &*text::delivery(p);
        retrying!(self.progress(p))
    }
}

impl PostgresStore {
    /// Records delivery progress, once.
    async fn progress(&self, p: &ReporterProgress) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE reporters SET cursor = GREATEST(cursor, $1), delivered = delivered + $2,
                                  dropped = dropped + $3, attempts = $4,
                                  last_error = COALESCE($5, last_error), lease_until = $6
             WHERE name = $7 AND owner = $8 AND lease_until >= $9",
        )
        .bind(p.cursor)
        .bind(i64::try_from(p.delivered).unwrap_or(i64::MAX))
        .bind(p.dropped.len() as i64)
        .bind(i64::from(p.attempts))
        .bind(&p.last_error)
        .bind(micros(p.lease_until))
        .bind(&p.name)
        .bind(p.master.0)
        .bind(micros(p.now))
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(StorageError::LeaseLost {
                reporter: p.name.clone(),
                master: p.master,
            });
        }
        if !p.dropped.is_empty() {
            sqlx::query(
                "INSERT INTO reporter_dropped (reporter, seq, attempts, error, at)
                 SELECT $1, t.seq, t.attempts, t.error, $2
                 FROM unnest($3::bigint[], $4::bigint[], $5::text[]) AS t(seq, attempts, error)
                 ON CONFLICT (reporter, seq) DO UPDATE
                     SET attempts = excluded.attempts, error = excluded.error, at = excluded.at",
            )
            .bind(&p.name)
            .bind(micros(p.now))
            .bind(p.dropped.iter().map(|(seq, _, _)| *seq).collect::<Vec<_>>())
            .bind(
                p.dropped
                    .iter()
                    .map(|(_, attempts, _)| i64::from(*attempts))
                    .collect::<Vec<_>>(),
            )
            .bind(
                p.dropped
                    .iter()
                    .map(|(_, _, e)| e.clone())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
