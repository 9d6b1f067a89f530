//! Retention in SQLite: deleting a finished buildset, and one bounded batch of a
//! builder's old work, each in one transaction. Builds go first: a build's request may
//! not go while the build refers to it.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, named_params};

use super::SqliteStore;
use crate::rows::{BUILD_COLUMNS, SyncRow, build_from_row, micros};
use crate::seam::RetentionWrites;
use crate::{Result, RetentionSweep, StorageError, Swept};
use kiln_model::{Build, BuildsetId};

/// Reads builds with a query over `b` that binds the named parameters given.
fn builds(
    tx: &Connection,
    sql: &str,
    params: &[(&str, &dyn rusqlite::ToSql)],
) -> Result<Vec<Build>> {
    let mut statement = tx.prepare_cached(sql)?;
    let rows = statement.query_map(params, |row| Ok(build_from_row(&SyncRow(row))))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row??);
    }
    Ok(out)
}

#[async_trait]
impl RetentionWrites for SqliteStore {
    async fn buildset_delete(&self, id: BuildsetId) -> Result<Vec<Build>> {
        self.transaction(move |tx| {
            let complete: Option<i64> = tx
                .prepare_cached("SELECT complete FROM buildsets WHERE id = ?")?
                .query_row([id.0], |r| r.get(0))
                .optional()?;
            match complete {
                None => return Err(StorageError::not_found("buildset", id)),
                Some(0) => {
                    return Err(StorageError::Invalid(format!(
                        "buildset {id} is not complete; cancel it before deleting it"
                    )));
                }
                Some(_) => {}
            }
            let gone = builds(
                tx,
                &format!(
                    "SELECT {BUILD_COLUMNS} FROM builds b
                     WHERE b.buildrequest_id IN (SELECT id FROM buildrequests WHERE buildset_id = :bs)"
                ),
                named_params! {":bs": id.0},
            )?;
            tx.prepare_cached(
                "DELETE FROM builds WHERE buildrequest_id IN (SELECT id FROM buildrequests WHERE buildset_id = ?)",
            )?
            .execute([id.0])?;
            let stamps = stamps_of(tx, &format!("[{}]", id.0))?;
            tx.prepare_cached("DELETE FROM buildsets WHERE id = ?")?
                .execute([id.0])?;
            prune_stamps(tx, &stamps)?;
            Ok(gone)
        })
        .await
    }

    async fn retention_sweep(&self, params: &RetentionSweep) -> Result<Swept> {
        let p = params.clone();
        self.transaction(move |tx| sweep(tx, &p)).await
    }
}

/// Builds of the builder finished before the cutoff and older than its `keep_last`
/// newest, oldest first: a seek on `builds (builder_id, id)`.
const OLD_BUILDS: &str = "FROM builds b
     WHERE b.builder_id = :builder AND b.complete_at IS NOT NULL AND b.complete_at < :cutoff
       AND b.id <= (SELECT id FROM builds WHERE builder_id = :builder ORDER BY id DESC LIMIT 1 OFFSET :keep)
     ORDER BY b.id LIMIT :batch";

fn sweep(tx: &Connection, p: &RetentionSweep) -> Result<Swept> {
    // The (keep_last + 1)th newest and older may go.
    let keep = i64::from(p.keep_last);
    let cutoff = micros(p.cutoff);
    let batch = i64::from(p.batch.max(1));
    let builder = p.builder_id.0;
    let gone = builds(
        tx,
        &format!("SELECT {BUILD_COLUMNS} {OLD_BUILDS}"),
        named_params! {":builder": builder, ":cutoff": cutoff, ":keep": keep, ":batch": batch},
    )?;
    if !gone.is_empty() {
        tx.prepare_cached(&format!(
            "DELETE FROM builds WHERE id IN (SELECT b.id {OLD_BUILDS})"
        ))?
        .execute(
            named_params! {":builder": builder, ":cutoff": cutoff, ":keep": keep, ":batch": batch},
        )?;
    }
    // Requests with no build left: those whose builds just went, and those that never
    // ran (cancelled while queued); never among the builder's newest.
    let buildsets: Vec<i64> = tx
        .prepare_cached(
            "DELETE FROM buildrequests WHERE id IN (
                 SELECT r.id FROM buildrequests r
                 WHERE r.builder_id = :builder AND r.complete = 1 AND r.complete_at < :cutoff
                   AND r.id <= (SELECT id FROM buildrequests WHERE builder_id = :builder ORDER BY id DESC LIMIT 1 OFFSET :keep)
                   AND NOT EXISTS (SELECT 1 FROM builds WHERE buildrequest_id = r.id)
                 ORDER BY r.id LIMIT :batch)
             RETURNING buildset_id",
        )?
        .query_map(
            named_params! {":builder": builder, ":cutoff": cutoff, ":keep": keep, ":batch": batch},
            |r| r.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let requests = buildsets.len() as u64;
    let mut deleted = 0;
    let mut sourcestamps = 0;
    if !buildsets.is_empty() {
        let ids = serde_json::Value::from(buildsets).to_string();
        let stamps = stamps_of(tx, &ids)?;
        deleted = tx
            .prepare_cached(
                "DELETE FROM buildsets WHERE id IN (SELECT value FROM json_each(?))
                   AND complete = 1
                   AND NOT EXISTS (SELECT 1 FROM buildrequests WHERE buildset_id = buildsets.id)",
            )?
            .execute([ids])? as u64;
        if deleted > 0 {
            sourcestamps = prune_stamps(tx, &stamps)?;
        }
    }
    Ok(Swept {
        builds: gone,
        requests,
        buildsets: deleted,
        sourcestamps,
        busy: false,
    })
}

/// The source stamps the buildsets of `ids` (a JSON array) name, as a JSON array.
fn stamps_of(tx: &Connection, ids: &str) -> Result<String> {
    Ok(tx
        .prepare_cached(
            "SELECT json_group_array(DISTINCT sourcestamp_id) FROM buildset_sourcestamps
             WHERE buildset_id IN (SELECT value FROM json_each(?))",
        )?
        .query_row([ids], |r| r.get(0))?)
}

/// Deletes those of `stamps` (a JSON array of ids) no buildset names any more: a seek on
/// `buildset_sourcestamps (sourcestamp_id)` each. SQLite runs one write transaction at
/// a time, across processes too, so nothing links a stamp between the check and the
/// delete.
fn prune_stamps(tx: &Connection, stamps: &str) -> Result<u64> {
    Ok(tx
        .prepare_cached(
            "DELETE FROM sourcestamps WHERE id IN (SELECT value FROM json_each(?))
               AND NOT EXISTS (SELECT 1 FROM buildset_sourcestamps WHERE sourcestamp_id = sourcestamps.id)",
        )?
        .execute([stamps])? as u64)
}
