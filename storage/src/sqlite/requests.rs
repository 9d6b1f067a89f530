//! Build requests in SQLite: claims, completion and cancellation, each one `BEGIN
//! IMMEDIATE` transaction that checks before it writes.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use async_trait::async_trait;
use rusqlite::{Connection, params};

use super::{SqliteStore, outbox};
use crate::rows::{json_ids, micros};
use crate::seam::RequestWrites;
use crate::{CancelOutcome, CompletedBuildset, Result, StorageError, validate};
use kiln_model::{BuildsetId, MasterId, RequestId, ResultCode, Timestamp};

/// The severity ranking of results as a SQL `CASE` on `r.results`, generated from
/// [`ResultCode::severity`] so that SQL and Rust cannot disagree.
fn severity_of_results() -> String {
    let to_severity: String = ResultCode::ALL
        .iter()
        .map(|r| format!(" WHEN {} THEN {}", r.code(), r.severity()))
        .collect();
    format!("CASE r.results{to_severity} END")
}

/// For one buildset (`?1`): the worst severity among its requests' results and how
/// many of its requests are open, from the index on (buildset, complete, results)
/// alone.
pub(super) static BUILDSET_STATE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT ?1, MAX({}), COALESCE(SUM(r.complete = 0), 0)
         FROM buildrequests r WHERE r.buildset_id = ?1",
        severity_of_results()
    )
});

/// The same for the buildset of one request (`?1`): its id (NULL for an unknown
/// request), then the same two figures. A seek by key, then the same index range.
pub(super) static BUILDSET_STATE_OF_REQUEST_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT mine.buildset_id, MAX({}), COALESCE(SUM(r.complete = 0), 0)
         FROM buildrequests mine JOIN buildrequests r ON r.buildset_id = mine.buildset_id
         WHERE mine.id = ?1",
        severity_of_results()
    )
});

/// Completes those of the given buildsets whose requests are all complete now, with the
/// worst of their results: per buildset, one read of an index range and, when none of
/// its requests is open, one update by key (no `RETURNING`, whose temporary table cost
/// more than the update itself).
pub(super) fn complete_buildsets(
    tx: &Connection,
    ids: impl IntoIterator<Item = BuildsetId>,
    now: Timestamp,
) -> Result<Vec<CompletedBuildset>> {
    let ids: BTreeSet<i64> = ids.into_iter().map(|id| id.0).collect();
    close_buildsets(tx, BUILDSET_STATE_SQL.as_str(), ids, now)
}

/// [`complete_buildsets`] for the buildsets of requests: what finishing builds has,
/// without a read of each request's buildset first.
pub(super) fn complete_buildsets_of(
    tx: &Connection,
    requests: &[RequestId],
    now: Timestamp,
) -> Result<Vec<CompletedBuildset>> {
    close_buildsets(
        tx,
        BUILDSET_STATE_OF_REQUEST_SQL.as_str(),
        requests.iter().map(|r| r.0),
        now,
    )
}

/// Reads `state_sql` (a buildset id, the worst severity, the open requests) for each of
/// `keys` and completes each buildset found with no open request, once.
fn close_buildsets(
    tx: &Connection,
    state_sql: &str,
    keys: impl IntoIterator<Item = i64>,
    now: Timestamp,
) -> Result<Vec<CompletedBuildset>> {
    let mut keys = keys.into_iter().peekable();
    if keys.peek().is_none() {
        return Ok(Vec::new());
    }
    let mut state = tx.prepare_cached(state_sql)?;
    let mut complete = tx.prepare_cached(
        "UPDATE buildsets SET complete = 1, complete_at = ?2, results = ?3 WHERE id = ?1 AND complete = 0",
    )?;
    let mut seen = BTreeSet::new();
    let mut completed = Vec::new();
    for key in keys {
        let (id, worst, open): (Option<i64>, Option<i64>, i64) =
            state.query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let Some(id) = id else { continue };
        if open > 0 || !seen.insert(id) {
            continue;
        }
        let worst = worst
            .map(|severity| {
                ResultCode::ALL
                    .iter()
                    .find(|r| i64::from(r.severity()) == severity)
                    .copied()
                    .ok_or_else(|| {
                        StorageError::Internal(format!("no result has severity {severity}"))
                    })
            })
            .transpose()?;
        if complete.execute(params![id, micros(now), worst.map(|r| r.code())])? == 1 {
            completed.push(CompletedBuildset {
                buildset_id: BuildsetId(id),
                results: worst.unwrap_or(ResultCode::Success),
            });
        }
    }
    drop((state, complete));
    completed.sort_by_key(|c| c.buildset_id);
    let done: Vec<i64> = completed.iter().map(|c| c.buildset_id.0).collect();
    outbox::record_complete(tx, &done)?;
    Ok(completed)
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
        self.transaction(move |tx| {
            let mut found = BTreeSet::new();
            let mut taken = Vec::new();
            let mut statement = tx.prepare_cached(
                "SELECT r.id, r.complete, c.master_id FROM buildrequests r
                 LEFT JOIN buildrequest_claims c ON c.request_id = r.id
                 WHERE r.id IN (SELECT value FROM json_each(?))",
            )?;
            let mut rows = statement.query([&list])?;
            while let Some(row) = rows.next()? {
                let id = RequestId(row.get("id")?);
                found.insert(id);
                let claimed: Option<i64> = row.get("master_id")?;
                if claimed.is_some() || row.get::<_, i64>("complete")? != 0 {
                    taken.push(id);
                }
            }
            if let Some(missing) = ids.difference(&found).next() {
                return Err(StorageError::not_found("build request", missing));
            }
            if !taken.is_empty() {
                return Err(StorageError::AlreadyClaimed(taken));
            }
            tx.prepare_cached(
                "INSERT INTO buildrequest_claims (request_id, master_id, claimed_at)
                 SELECT value, ?, ? FROM json_each(?)",
            )?
            .execute(params![master.0, micros(now), list])
            .map_err(|e| StorageError::from(e).fk_not_found("master", master))?;
            Ok(())
        })
        .await
    }

    async fn request_unclaim(&self, ids: &[RequestId], master: MasterId) -> Result<()> {
        let list = json_ids(ids.iter().map(|r| r.0));
        self.transaction(move |tx| {
            tx.prepare_cached(
                "DELETE FROM buildrequest_claims
                 WHERE master_id = ? AND request_id IN (SELECT value FROM json_each(?))
                   AND request_id IN (SELECT id FROM buildrequests WHERE complete = 0)",
            )?
            .execute(params![master.0, list])?;
            Ok(())
        })
        .await
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
        self.transaction(move |tx| {
            let mut open = BTreeSet::new();
            let mut buildsets = BTreeSet::new();
            {
                let mut statement = tx.prepare_cached(
                    "SELECT id, complete, buildset_id FROM buildrequests
                     WHERE id IN (SELECT value FROM json_each(?))",
                )?;
                let mut rows = statement.query([&list])?;
                while let Some(row) = rows.next()? {
                    if row.get::<_, i64>("complete")? == 0 {
                        open.insert(RequestId(row.get("id")?));
                        buildsets.insert(BuildsetId(row.get("buildset_id")?));
                    }
                }
            }
            let refused: Vec<RequestId> = ids.difference(&open).copied().collect();
            if !refused.is_empty() {
                return Err(StorageError::NotClaimed(refused));
            }
            tx.prepare_cached(
                "UPDATE buildrequests SET complete = 1, complete_at = ?, results = ?
                 WHERE id IN (SELECT value FROM json_each(?))",
            )?
            .execute(params![micros(now), results.code(), list])?;
            complete_buildsets(tx, buildsets, now)
        })
        .await
    }

    async fn request_cancel_each(
        &self,
        groups: &[Vec<RequestId>],
        now: Timestamp,
    ) -> Result<Vec<CancelOutcome>> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let groups = groups.to_vec();
        self.transaction(move |tx| groups.iter().map(|ids| cancel_in(tx, ids, now)).collect())
            .await
    }
}

/// Cancels `ids` (and what hangs off them) inside the caller's transaction.
fn cancel_in(tx: &Connection, ids: &[RequestId], now: Timestamp) -> Result<CancelOutcome> {
    // The requests asked for and, recursively, those of the waited-for child buildsets
    // their builds started.
    let mut outcome = CancelOutcome::default();
    let mut buildsets = BTreeSet::new();
    {
        let mut statement = tx.prepare_cached(
            "WITH RECURSIVE tree (id) AS (
                 SELECT value FROM json_each(?)
                 UNION
                 SELECT r.id FROM tree t JOIN buildsets bs ON bs.parent_request_id = t.id
                 JOIN buildrequests r ON r.buildset_id = bs.id WHERE r.waited_for = 1)
             SELECT r.id, r.buildset_id, c.master_id FROM buildrequests r
             LEFT JOIN buildrequest_claims c ON c.request_id = r.id
             WHERE r.complete = 0 AND r.id IN (SELECT id FROM tree) ORDER BY r.id",
        )?;
        let mut rows = statement.query([json_ids(ids.iter().map(|r| r.0))])?;
        while let Some(row) = rows.next()? {
            let id = RequestId(row.get("id")?);
            if row.get::<_, Option<i64>>("master_id")?.is_some() {
                outcome.flagged.push(id);
            } else {
                outcome.completed.push(id);
                buildsets.insert(BuildsetId(row.get("buildset_id")?));
            }
        }
    }
    if !outcome.flagged.is_empty() {
        tx.prepare_cached(
            "UPDATE buildrequests SET cancel_requested = 1 WHERE id IN (SELECT value FROM json_each(?))",
        )?
        .execute([json_ids(outcome.flagged.iter().map(|r| r.0))])?;
    }
    if !outcome.completed.is_empty() {
        tx.prepare_cached(
            "UPDATE buildrequests SET complete = 1, complete_at = ?, results = ?, cancel_requested = 1
             WHERE id IN (SELECT value FROM json_each(?))",
        )?
        .execute(params![
            micros(now),
            ResultCode::Cancelled.code(),
            json_ids(outcome.completed.iter().map(|r| r.0))
        ])?;
    }
    outcome.buildsets_completed = complete_buildsets(tx, buildsets, now)?;
    Ok(outcome)
}
