//! Build requests in PostgreSQL: claims, completion and cancellation, each locking the
//! requests it decides on, in id order.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use async_trait::async_trait;
use sqlx::{PgConnection, Row};

use super::{
    MAX_TX_ATTEMPTS, PostgresStore, ids_of, listen, lock_active_master, outbox, retryable, retrying,
};
use crate::rows::{micros, result_code};
use crate::seam::RequestWrites;
use crate::{CancelOutcome, CompletedBuildset, Result, StorageError, StoreSignal, validate};
use kiln_model::{BuildsetId, MasterId, RequestId, ResultCode, Timestamp};

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
pub(super) async fn complete_buildsets(
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
        .bind(micros(now))
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

#[async_trait]
impl RequestWrites for PostgresStore {
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
            .bind(micros(now))
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
            .bind(micros(now))
            .bind(results.code())
            .bind(&list)
            .execute(&mut *tx)
            .await?;
            let completed = complete_buildsets(&mut tx, buildsets, now).await?;
            tx.commit().await?;
            Ok(completed)
        })
    }

    async fn request_cancel_each(
        &self,
        groups: &[Vec<RequestId>],
        now: Timestamp,
    ) -> Result<Vec<CancelOutcome>> {
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let mut outcomes = Vec::with_capacity(groups.len());
            for ids in groups {
                outcomes.push(cancel_in(&mut tx, ids, now).await?);
            }
            // One notification for the whole transaction, however many it flagged.
            if outcomes.iter().any(|o| !o.flagged.is_empty()) {
                listen::notify(&mut tx, &[StoreSignal::Cancel]).await?;
            }
            tx.commit().await?;
            Ok(outcomes)
        })
    }
}

/// Cancels `ids` (and what hangs off them) inside the caller's transaction; the caller
/// notifies the masters of what it flagged.
async fn cancel_in(
    tx: &mut PgConnection,
    ids: &[RequestId],
    now: Timestamp,
) -> Result<CancelOutcome> {
    let list = ids_of(ids, |r| r.0);
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
    }
    if !outcome.completed.is_empty() {
        sqlx::query(
                    "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2, cancel_requested = 1
                     WHERE id = ANY($3)",
                )
                .bind(micros(now))
                .bind(ResultCode::Cancelled.code())
                .bind(ids_of(&outcome.completed, |r| r.0))
                .execute(&mut *tx)
                .await?;
    }
    outcome.buildsets_completed = complete_buildsets(&mut *tx, buildsets, now).await?;
    Ok(outcome)
}
