//! The reporters' outbox in SQLite: events recorded inside the transactions that make
//! the changes they describe, and the reporters' cursors and leases.
//!
//! Each `record_*` function first asks whether any reporter is registered: a database
//! without reporters pays that one cheap statement and stores nothing. With reporters,
//! it is one `INSERT ... SELECT` over a JSON array of the ids.

use std::sync::LazyLock;

use async_trait::async_trait;
use rusqlite::Connection;

use super::SqliteStore;
use crate::common::REPORTER_COLUMNS;
use crate::rows::{json_ids, micros, reporter_from_row};
use crate::seam::OutboxWrites;
use crate::{ReporterProgress, Result, StorageError, text, validate};
use kiln_model::ReporterState;

/// Seconds since the epoch as a JSON number, from stored microseconds.
fn secs(column: &str) -> String {
    format!("({column} / 1000000.0)")
}

fn insert(select: &str) -> String {
    format!(
        "INSERT INTO events (kind, buildset_id, build_id, builder, results, at, payload)
         {select}"
    )
}

/// The names of a buildset's builders (alias `bs`), as a JSON array.
const BUILDERS_OF_BS: &str = "(SELECT json_group_array(bl.name) FROM buildrequests r
     JOIN builders bl ON bl.id = r.builder_id WHERE r.buildset_id = bs.id)";

/// Whether any reporter is registered (else nothing is recorded).
fn reporting(tx: &Connection) -> Result<bool> {
    Ok(tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM reporters)")?
        .query_row([], |r| r.get(0))?)
}

static RECORD_SUBMITTED_SQL: LazyLock<String> = LazyLock::new(|| {
    insert(&format!(
        "SELECT 'buildset_submitted', bs.id, NULL, NULL, NULL, bs.submitted_at,
                json_object('event', 'buildset_submitted', 'buildset_id', bs.id, 'reason', bs.reason,
                            'external_idstring', bs.external_idstring, 'submitted_at', {},
                            'parent_buildid', bs.parent_buildid, 'parent_relationship', bs.parent_relationship,
                            'builders', {BUILDERS_OF_BS})
         FROM buildsets bs
         WHERE bs.id IN (SELECT value FROM json_each(?))
         ORDER BY bs.id",
        secs("bs.submitted_at")
    ))
});

/// Records `buildset_submitted` for buildset ids.
pub(super) fn record_submitted(tx: &Connection, ids: &[i64]) -> Result<()> {
    if ids.is_empty() || !reporting(tx)? {
        return Ok(());
    }
    tx.prepare_cached(&RECORD_SUBMITTED_SQL)?
        .execute([json_ids(ids.iter().copied())])?;
    Ok(())
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
     WHERE b.id IN (SELECT value FROM json_each(?))
     ORDER BY b.id";

static RECORD_STARTED_SQL: LazyLock<String> = LazyLock::new(|| {
    insert(&format!(
        "SELECT 'build_started', r.buildset_id, b.id, bl.name, NULL, b.started_at,
                json_object('event', 'build_started', {}) {BUILD_FROM}",
        build_fields()
    ))
});

/// Records `build_started` for build ids.
pub(super) fn record_started(tx: &Connection, ids: &[i64]) -> Result<()> {
    if ids.is_empty() || !reporting(tx)? {
        return Ok(());
    }
    tx.prepare_cached(&RECORD_STARTED_SQL)?
        .execute([json_ids(ids.iter().copied())])?;
    Ok(())
}

static RECORD_FINISHED_SQL: LazyLock<String> = LazyLock::new(|| {
    insert(&format!(
        "SELECT 'build_finished', r.buildset_id, b.id, bl.name, b.results, b.complete_at,
                json_object('event', 'build_finished', {},
                            'complete_at', {}, 'duration_s', {},
                            'results', b.results, 'state_string', b.state_string,
                            'return_value', json(COALESCE(b.return_value, 'null')),
                            'error', b.error) {BUILD_FROM}",
        build_fields(),
        secs("b.complete_at"),
        secs("(b.complete_at - b.started_at)")
    ))
});

/// Records `build_finished` for build ids (finished by now).
pub(super) fn record_finished(tx: &Connection, ids: &[i64]) -> Result<()> {
    if ids.is_empty() || !reporting(tx)? {
        return Ok(());
    }
    tx.prepare_cached(&RECORD_FINISHED_SQL)?
        .execute([json_ids(ids.iter().copied())])?;
    Ok(())
}

static RECORD_COMPLETE_SQL: LazyLock<String> = LazyLock::new(|| {
    insert(&format!(
        "SELECT 'buildset_complete', bs.id, NULL, NULL, bs.results, bs.complete_at,
                json_object('event', 'buildset_complete', 'buildset_id', bs.id, 'reason', bs.reason,
                            'external_idstring', bs.external_idstring, 'results', bs.results,
                            'submitted_at', {}, 'complete_at', {}, 'duration_s', {},
                            'parent_buildid', bs.parent_buildid, 'builders', {BUILDERS_OF_BS})
         FROM buildsets bs
         WHERE bs.id IN (SELECT value FROM json_each(?))
         ORDER BY bs.id",
        secs("bs.submitted_at"),
        secs("bs.complete_at"),
        secs("(bs.complete_at - bs.submitted_at)")
    ))
});

/// Records `buildset_complete` for buildset ids (complete by now).
pub(super) fn record_complete(tx: &Connection, ids: &[i64]) -> Result<()> {
    if ids.is_empty() || !reporting(tx)? {
        return Ok(());
    }
    tx.prepare_cached(&RECORD_COMPLETE_SQL)?
        .execute([json_ids(ids.iter().copied())])?;
    Ok(())
}

#[async_trait]
impl OutboxWrites for SqliteStore {
    async fn reporter_register(&self, name: &str) -> Result<ReporterState> {
        validate::name("reporter", name)?;
        let name = &*text::storable(name);
        let sql = format!(
            "INSERT INTO reporters (name, cursor) VALUES (?, (SELECT COALESCE(MAX(seq), 0) FROM events))
             ON CONFLICT (name) DO UPDATE SET name = excluded.name
             RETURNING {REPORTER_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_one(&mut *self.writer.lock().await)
            .await?;
        reporter_from_row(&row)
    }

    async fn reporter_progress(&self, p: &ReporterProgress) -> Result<()> {
        let p = text::delivery(p).into_owned();
        self.transaction(move |tx| {
            let updated = tx
                .prepare_cached(
                    "UPDATE reporters SET cursor = MAX(cursor, ?1), delivered = delivered + ?2, dropped = dropped + ?3,
                                          attempts = ?4, last_error = COALESCE(?5, last_error), lease_until = ?6
                     WHERE name = ?7 AND owner = ?8 AND lease_until >= ?9",
                )?
                .execute(rusqlite::params![
                    p.cursor,
                    i64::try_from(p.delivered).unwrap_or(i64::MAX),
                    p.dropped.len() as i64,
                    i64::from(p.attempts),
                    p.last_error,
                    micros(p.lease_until),
                    p.name,
                    p.master.0,
                    micros(p.now),
                ])?;
            if updated == 0 {
                return Err(StorageError::LeaseLost {
                    reporter: p.name.clone(),
                    master: p.master,
                });
            }
            if !p.dropped.is_empty() {
                let rows: Vec<serde_json::Value> = p
                    .dropped
                    .iter()
                    .map(|(seq, attempts, error)| serde_json::json!([seq, attempts, error]))
                    .collect();
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO reporter_dropped (reporter, seq, attempts, error, at)
                     SELECT ?, value ->> 0, value ->> 1, value ->> 2, ? FROM json_each(?)",
                )?
                .execute(rusqlite::params![
                    p.name,
                    micros(p.now),
                    serde_json::Value::from(rows).to_string()
                ])?;
            }
            Ok(())
        })
        .await
    }
}
