//! Build requests in SQLite: claims, completion and cancellation, each one `BEGIN
//! IMMEDIATE` transaction that checks before it writes.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use async_trait::async_trait;
use sqlx::{Connection, Row, SqliteConnection};

use super::{SqliteStore, outbox};
use crate::rows::{self, json_ids, micros, result_code};
use crate::seam::RequestWrites;
use crate::{CancelOutcome, CompletedBuildset, Result, StorageError, fk_to_not_found, validate};
use kiln_model::{BuildsetId, MasterId, RequestId, ResultCode, Timestamp};

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
pub(super) async fn complete_buildsets(
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
    .bind(micros(now))
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
impl RequestWrites for SqliteStore {
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
            .bind(micros(now))
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

    async fn request_complete(
        &self,
        ids: &[RequestId],
        results: ResultCode,
        now: Timestamp,
    ) -> Result<Vec<CompletedBuildset>> {
        validate::completion(results)?;
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
            .bind(micros(now))
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
        .bind(micros(now))
        .bind(ResultCode::Cancelled.code())
        .bind(json_ids(outcome.completed.iter().map(|r| r.0)))
        .execute(&mut *tx)
        .await?;
        outcome.buildsets_completed = complete_buildsets(&mut tx, buildsets, now).await?;
        tx.commit().await?;
        Ok(outcome)
    }
}
