//! The reporters' outbox in PostgreSQL: events recorded inside the transactions that
//! make the changes they describe, and the reporters' cursors and leases.
//!
//! Each `record_*` function first takes the outbox's transaction-level advisory lock,
//! but only while a reporter is registered (a database without reporters pays that one
//! statement and stores nothing). Holding the lock until commit makes the order in which
//! seqs are handed out the order in which they become visible, so a reporter reading
//! "everything after my cursor" never steps over an event that commits late.

use sqlx::PgConnection;

use super::PostgresStore;
use crate::rows::{report_from_row, reporter_from_row, us};
use crate::{ReporterProgress, Result, StorageError};
use kiln_model::{MasterId, Report, ReporterState, Timestamp};

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

/// A reporter's row, with the events past its cursor counted (the outbox holds only
/// events some reporter still has to deal with, so the count is bounded by its size).
const REPORTER_COLUMNS: &str =
    "name, cursor, owner, lease_until, attempts, last_error, delivered, dropped,
     (SELECT COUNT(*) FROM events e WHERE e.seq > reporters.cursor) AS pending";

impl PostgresStore {
    pub(super) async fn reporter_register_impl(&self, name: &str) -> Result<ReporterState> {
        if name.trim().is_empty() {
            return Err(StorageError::Invalid("reporter name is empty".into()));
        }
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

    pub(super) async fn reporter_get_impl(&self, name: &str) -> Result<ReporterState> {
        let sql = format!("SELECT {REPORTER_COLUMNS} FROM reporters WHERE name = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StorageError::not_found("reporter", name))?;
        reporter_from_row(&row)
    }

    pub(super) async fn reporter_list_impl(&self) -> Result<Vec<ReporterState>> {
        let sql = format!("SELECT {REPORTER_COLUMNS} FROM reporters ORDER BY name COLLATE \"C\"");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(reporter_from_row).collect()
    }

    pub(super) async fn reporter_remove_impl(&self, name: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM reporters WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StorageError::not_found("reporter", name));
        }
        Ok(())
    }

    pub(super) async fn reporter_lease_impl(
        &self,
        name: &str,
        master: MasterId,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<Option<ReporterState>> {
        let sql = format!(
            "UPDATE reporters SET owner = $1, lease_until = $2
             WHERE name = $3 AND (owner IS NULL OR owner = $1 OR lease_until IS NULL OR lease_until < $4)
             RETURNING {REPORTER_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(master.0)
            .bind(us(until))
            .bind(name)
            .bind(us(now))
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Some(reporter_from_row(&row)?)),
            None => {
                // Tell "held by another" from "no such reporter".
                self.reporter_get_impl(name).await?;
                Ok(None)
            }
        }
    }

    pub(super) async fn reporter_progress_impl(&self, p: &ReporterProgress) -> Result<()> {
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
        .bind(us(p.lease_until))
        .bind(&p.name)
        .bind(p.master.0)
        .bind(us(p.now))
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
            .bind(us(p.now))
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

    pub(super) async fn outbox_read_impl(&self, after: i64, limit: u32) -> Result<Vec<Report>> {
        let rows = sqlx::query(
            "SELECT seq, kind, buildset_id, build_id, builder, results, at, payload FROM events
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(report_from_row).collect()
    }

    pub(super) async fn outbox_prune_impl(&self) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM events
             WHERE seq <= COALESCE((SELECT MIN(cursor) FROM reporters), (SELECT MAX(seq) FROM events))",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
