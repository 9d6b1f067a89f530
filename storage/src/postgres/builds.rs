//! Builds in PostgreSQL: the scheduler's hot path (claim and start many, finish many,
//! each in one transaction with a fixed number of statements however many rows it
//! touches) and the one-at-a-time starts and finishes. Per-row values travel as arrays,
//! one per column, unpacked with `unnest`.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use sqlx::{PgConnection, Row};

use super::requests::complete_buildsets;
use super::{
    MAX_TX_ATTEMPTS, PostgresStore, ids_of, listen, lock_active_master, lock_builders, outbox,
    retryable, retrying,
};
use crate::rows::{BUILD_COLUMNS, build_from_row, micros, started_from_json};
use crate::seam::{BuildWrites, Builds};
use crate::{
    FinishOutcome, FinishedBuild, NewBuild, Result, StartAvailable, StartOutcome, StartedBuild,
    StorageError, StoreSignal, fk_to_not_found, text,
};
use kiln_model::{
    Artifact, Build, BuilderId, BuildsetId, MasterId, RequestId, ResultCode, Timestamp,
};

use crate::lock_budget::{BUDGET_COLUMNS, LockBudget};

/// PostgreSQL's "lock not available", what `FOR UPDATE NOWAIT` fails with.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A claim turn's first read: the builders with claimable work and not paused, in
/// Buildbot's order across builders, each with how many of its free slots it can fill.
/// `$1` builders, `$2` their free slots, `$3` now. The top priority and the count come
/// from one walk of the queue index in claim order (the first of up to n requests has
/// the top priority). Counted apart and unordered, the planner walked the primary key
/// from the first request ever submitted, past every completed one: 13 ms per turn at
/// 10,000 completed (the test `plans` below keeps it from coming back).
const CLAIM_HEADS: &str = "SELECT w.builder, LEAST(w.n, h.queued) AS available
             FROM unnest($1::bigint[], $2::bigint[]) AS w(builder, n)
             JOIN builders bl ON bl.id = w.builder AND bl.paused = 0
             CROSS JOIN LATERAL (
                 SELECT max(q.priority) AS priority, count(*) AS queued FROM (
                     SELECT r.priority FROM buildrequests r
                     WHERE r.builder_id = w.builder AND r.complete = 0
                       AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                       AND (r.not_before IS NULL OR r.not_before <= $3)
                     ORDER BY r.priority DESC, r.id LIMIT w.n) q) h
             CROSS JOIN LATERAL (
                 SELECT r.submitted_at FROM buildrequests r
                 WHERE r.builder_id = w.builder AND r.complete = 0
                   AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                   AND (r.not_before IS NULL OR r.not_before <= $3)
                 ORDER BY r.submitted_at LIMIT 1) oldest
             WHERE h.queued > 0
             ORDER BY h.priority DESC, oldest.submitted_at, bl.name COLLATE \"C\"";

/// A build as one JSON array, with `b` as the table alias: the columns of
/// [`BUILD_COLUMNS`](crate::rows::BUILD_COLUMNS) in the order `rows::RawBuild` declares
/// its fields, which serde reads positionally. An array, not an object with keys:
/// `json_build_object` cost PostgreSQL 4.1 µs a row of these fourteen columns,
/// `json_build_array` 1.25 µs, and the claim turn builds two per started build.
const BUILD_JSON: &str = "json_build_array(b.id, b.number, b.builder_id, b.buildrequest_id, \
     b.master_id, b.worker_slot, b.started_at, b.complete_at, b.state_string, b.locks_duration_s, \
     b.results, b.return_value, b.error, b.traceback)";

/// A request joined with its claim, as one JSON array (`r` and `c`), in the order
/// `rows::RawRequest` declares its fields.
const REQUEST_JSON: &str = "json_build_array(r.id, r.buildset_id, r.builder_id, r.priority, \
     r.submitted_at, r.waited_for, r.complete, r.complete_at, r.results, r.cancel_requested, \
     r.not_before, r.superseded_by, c.master_id, c.claimed_at)";

/// A buildset's reason, properties, stamps and depth as one JSON array, with `bs` as the
/// alias.
const CONTEXT_JSON: &str = "json_build_array(bs.reason, \
     (SELECT COALESCE(json_agg(json_build_array(p.name, p.value, p.source)), '[]'::json) \
      FROM buildset_properties p WHERE p.buildset_id = bs.id), \
     (SELECT COALESCE(json_agg(json_build_array(s.codebase, s.repository, s.branch, s.revision, s.project)), '[]'::json) \
      FROM buildset_sourcestamps bss JOIN sourcestamps s ON s.id = bss.sourcestamp_id \
      WHERE bss.buildset_id = bs.id), bs.depth)";

/// Writes the ends of builds known to run on the caller's master (and locked by it):
/// their columns, their artifacts, and their `build_finished` reports.
async fn end_builds(tx: &mut PgConnection, ends: &[&FinishedBuild]) -> Result<()> {
    // Their lock holds go in the same statement; when some went, masters waiting for
    // those locks are woken.
    let freed: Option<i64> = sqlx::query_scalar(
        "WITH freed AS (DELETE FROM lock_holds WHERE build_id = ANY($1) RETURNING 1)
         UPDATE builds SET complete_at = t.at, results = t.res, return_value = t.rv, error = t.err,
                           traceback = t.tb, state_string = COALESCE(t.st, builds.state_string)
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[])
             AS t(id, at, res, rv, err, tb, st)
         WHERE builds.id = t.id
         RETURNING (SELECT count(*) FROM freed)",
    )
    .bind(ids_of(ends, |e| e.build_id.0))
    .bind(ids_of(ends, |e| micros(e.complete_at)))
    .bind(ids_of(ends, |e| i64::from(e.results.code())))
    .bind(
        ends.iter()
            .map(|e| e.return_value.as_ref().map(|v| v.to_string()))
            .collect::<Vec<_>>(),
    )
    .bind(ends.iter().map(|e| e.error.clone()).collect::<Vec<_>>())
    .bind(ends.iter().map(|e| e.traceback.clone()).collect::<Vec<_>>())
    .bind(ends.iter().map(|e| e.state_string.clone()).collect::<Vec<_>>())
    .fetch_optional(&mut *tx)
    .await?;
    if freed.unwrap_or(0) > 0 {
        listen::notify(&mut *tx, &[StoreSignal::Work]).await?;
    }
    outbox::record_finished(&mut *tx, &ids_of(ends, |e| e.build_id.0)).await?;
    let artifacts: Vec<(i64, &Artifact)> = ends
        .iter()
        .flat_map(|e| e.artifacts.iter().map(move |a| (e.build_id.0, a)))
        .collect();
    if !artifacts.is_empty() {
        sqlx::query(
            "INSERT INTO build_artifacts (build_id, path, size, location)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[])
             ON CONFLICT (build_id, path) DO UPDATE SET size = excluded.size, location = excluded.location",
        )
        .bind(ids_of(&artifacts, |(b, _)| *b))
        .bind(artifacts.iter().map(|(_, a)| a.path.clone()).collect::<Vec<_>>())
        .bind(ids_of(&artifacts, |(_, a)| {
            i64::try_from(a.size).unwrap_or(i64::MAX)
        }))
        .bind(
            artifacts
                .iter()
                .map(|(_, a)| a.location.clone())
                .collect::<Vec<_>>(),
        )
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

#[async_trait]
impl BuildWrites for PostgresStore {
    async fn build_start_available(&self, params: &StartAvailable) -> Result<StartOutcome> {
        let outcome = retrying!(self.start_available(params))?;
        self.grew(super::Hot::Claims, outcome.started.len());
        Ok(outcome)
    }

    async fn build_finish_batch(
        &self,
        master: MasterId,
        ends: &[FinishedBuild],
    ) -> Result<FinishOutcome> {
        let ends = &*text::finished_all(ends);
        retrying!(self.finish_batch(master, ends))
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
                .bind(micros(params.started_at))
                .bind(&params.state_string)
                .fetch_one(&mut *tx)
                .await?;
            let build = build_from_row(&row)?;
            outbox::record_started(&mut tx, &[build.id.0]).await?;
            tx.commit().await?;
            Ok(build)
        })
    }

    async fn build_finish(&self, master: MasterId, build: &FinishedBuild) -> Result<()> {
        let build = &*text::finished(build);
        let finished = retrying!(async {
            let mut tx = self.pool.begin().await?;
            let running: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM builds WHERE id = $1 AND master_id = $2 AND complete_at IS NULL FOR UPDATE",
            )
            .bind(build.build_id.0)
            .bind(master.0)
            .fetch_optional(&mut *tx)
            .await?;
            if running.is_some() {
                end_builds(&mut tx, &[build]).await?;
                tx.commit().await?;
                return Ok(true);
            }
            tx.rollback().await?;
            Ok(false)
        })?;
        if finished {
            return Ok(());
        }
        self.build_get(build.build_id).await?;
        Err(StorageError::NotOwner {
            build: build.build_id,
            master,
        })
    }
}

/// Collapses the queues of the collapsing builders (see `StartAvailable::collapse`):
/// what a newer queued request supersedes (same set of sourcestamps and, when asked, the
/// same properties) completes as SKIPPED, naming it. A paused builder collapses nothing.
/// Rows another master is claiming are skipped, not waited for; once locked, a row some
/// committed claim holds is left alone (a claim locks its request row first, so none can
/// appear while the lock is held).
async fn collapse(
    tx: &mut PgConnection,
    params: &StartAvailable,
    claiming: &[i64],
) -> Result<crate::params::Collapsed> {
    let mut pairs: Vec<(RequestId, RequestId)> = Vec::new();
    let mut buildsets = Vec::new();
    for (builder, properties) in &params.collapse {
        if !claiming.contains(&builder.0) {
            continue;
        }
        let rows = sqlx::query(
            "WITH q AS (
                 SELECT r.id, r.buildset_id,
                        (SELECT string_agg(s.sourcestamp_id::text, ',' ORDER BY s.sourcestamp_id)
                         FROM buildset_sourcestamps s WHERE s.buildset_id = r.buildset_id) AS stamps,
                        CASE WHEN $2 THEN (SELECT string_agg(p.name || '=' || p.value, chr(31) ORDER BY p.name COLLATE \"C\")
                                           FROM buildset_properties p WHERE p.buildset_id = r.buildset_id) END AS props
                 FROM buildrequests r
                 WHERE r.builder_id = $1 AND r.complete = 0
                   AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                   AND (r.not_before IS NULL OR r.not_before <= $3)
                 ORDER BY r.id DESC LIMIT $4),
             g AS (SELECT stamps, props, MAX(id) AS newest FROM q GROUP BY stamps, props)
             SELECT q.id, g.newest, q.buildset_id
             FROM q JOIN g ON q.stamps IS NOT DISTINCT FROM g.stamps AND q.props IS NOT DISTINCT FROM g.props
             WHERE q.id < g.newest",
        )
        .bind(builder.0)
        .bind(*properties)
        .bind(micros(params.now))
        .bind(i64::from(crate::COLLAPSE_WINDOW))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            continue;
        }
        let mut found: Vec<(i64, i64, i64)> = Vec::with_capacity(rows.len());
        for row in &rows {
            found.push((
                row.try_get("id")?,
                row.try_get("newest")?,
                row.try_get("buildset_id")?,
            ));
        }
        let ids = ids_of(&found, |(r, _, _)| *r);
        let locked: Vec<i64> = sqlx::query_scalar(
            "SELECT r.id FROM buildrequests r WHERE r.id = ANY($1) AND r.complete = 0
             ORDER BY r.id FOR UPDATE SKIP LOCKED",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let held: Vec<i64> = sqlx::query_scalar(
            "SELECT request_id FROM buildrequest_claims WHERE request_id = ANY($1)",
        )
        .bind(&locked)
        .fetch_all(&mut *tx)
        .await?;
        found.retain(|(r, _, _)| locked.contains(r) && !held.contains(r));
        if found.is_empty() {
            continue;
        }
        sqlx::query(
            "UPDATE buildrequests r SET complete = 1, complete_at = $1, results = $2, superseded_by = t.newest
             FROM unnest($3::bigint[], $4::bigint[]) AS t(id, newest)
             WHERE r.id = t.id",
        )
        .bind(micros(params.now))
        .bind(ResultCode::Skipped.code())
        .bind(ids_of(&found, |(r, _, _)| *r))
        .bind(ids_of(&found, |(_, n, _)| *n))
        .execute(&mut *tx)
        .await?;
        pairs.extend(found.iter().map(|(r, n, _)| (RequestId(*r), RequestId(*n))));
        buildsets.extend(found.iter().map(|(_, _, bs)| BuildsetId(*bs)));
    }
    let completed = complete_buildsets(tx, buildsets, params.now).await?;
    pairs.sort();
    Ok((pairs, completed))
}

/// What this claim may take of the locks of `builders`, after locking their lock rows
/// (in name order, so that claims never wait on each other in a circle), and whether it
/// had to wait for another claim's turn on them.
async fn lock_budget(tx: &mut PgConnection, builders: &[BuilderId]) -> Result<(LockBudget, bool)> {
    if builders.is_empty() {
        return Ok((LockBudget::default(), false));
    }
    let ids: Vec<i64> = builders.iter().map(|b| b.0).collect();
    let lock_rows = |wait: &str| {
        format!(
            "SELECT name FROM locks
             WHERE name IN (SELECT lock_name FROM builder_locks WHERE builder_id = ANY($1))
             ORDER BY name FOR UPDATE{wait}"
        )
    };
    // Without waiting first, inside a savepoint: a failed statement would end the
    // transaction, and rolling back to the savepoint lets go of what it took.
    sqlx::query("SAVEPOINT kiln_lock_turn")
        .execute(&mut *tx)
        .await?;
    let waited = match sqlx::query(sqlx::AssertSqlSafe(lock_rows(" NOWAIT")))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
    {
        Ok(_) => false,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
            sqlx::query("ROLLBACK TO SAVEPOINT kiln_lock_turn")
                .execute(&mut *tx)
                .await?;
            sqlx::query(sqlx::AssertSqlSafe(lock_rows("")))
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
            true
        }
        Err(e) => return Err(e.into()),
    };
    let sql = format!("SELECT {BUDGET_COLUMNS} WHERE bl.builder_id = ANY($1)");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
    let mut budget = Vec::with_capacity(rows.len());
    for row in &rows {
        budget.push((
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
        ));
    }
    Ok((LockBudget::new(budget), waited))
}

/// The builds just started for `requests` take their builders' locks, and each records
/// how long its request waited for them.
async fn take_locks(tx: &mut PgConnection, requests: &[i64], now: Timestamp) -> Result<()> {
    sqlx::query(
        "WITH waited AS (
             UPDATE buildrequests SET lock_wait_since = NULL
             FROM buildrequests old
             WHERE old.id = buildrequests.id AND buildrequests.id = ANY($1)
               AND old.lock_wait_since IS NOT NULL
             RETURNING buildrequests.id, old.lock_wait_since),
         timed AS (
             UPDATE builds b SET locks_duration_s = ($2 - w.lock_wait_since) / 1e6
             FROM waited w WHERE b.buildrequest_id = w.id AND b.complete_at IS NULL)
         INSERT INTO lock_holds (lock_name, build_id, master_id, units, acquired_at)
         SELECT bl.lock_name, b.id, b.master_id, bl.units, $2
         FROM builds b JOIN builder_locks bl ON bl.builder_id = b.builder_id
         WHERE b.complete_at IS NULL AND b.buildrequest_id = ANY($1)",
    )
    .bind(requests)
    .bind(micros(now))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl PostgresStore {
    async fn start_available(&self, params: &StartAvailable) -> Result<StartOutcome> {
        let wanted: Vec<(BuilderId, &Vec<i64>)> = params
            .free_slots
            .iter()
            .filter(|(_, slots)| !slots.is_empty())
            .map(|(b, s)| (*b, s))
            .collect();
        if wanted.is_empty() {
            return Ok(StartOutcome::default());
        }
        let mut tx = self.pool.begin().await?;
        lock_active_master(&mut tx, params.master_id).await?;
        // Claims that take locks take turns on the lock rows, before any request row, so
        // that two masters never share out the same free units.
        let (mut budget, waited) = lock_budget(&mut tx, &params.lock_builders).await?;
        // A claim that waited for another master's turn on the lock rows dates what it
        // writes from when it got its own: its builds start after the units they take
        // were freed, not when the claim was asked for (dated before the end of the build
        // whose unit it took, two builds looked like holders of an exclusive lock at once).
        let dated;
        let params = if waited {
            dated = StartAvailable {
                now: params.now.max(kiln_model::now()),
                ..params.clone()
            };
            &dated
        } else {
            params
        };
        // The builders with claimable work (`CLAIM_HEADS`); the limit is shared out in
        // their order.
        let heads = sqlx::query(CLAIM_HEADS)
            .bind(ids_of(&wanted, |(b, _)| b.0))
            .bind(ids_of(&wanted, |(_, s)| s.len() as i64))
            .bind(micros(params.now))
            .fetch_all(&mut *tx)
            .await?;
        // Collapsing follows what this statement saw: a builder it found paused (or with
        // nothing queued) collapses nothing. Read committed, a later statement could see a
        // resume the first did not, and claim what should have collapsed.
        let claiming: Vec<i64> = heads
            .iter()
            .map(|h| h.try_get::<i64, _>("builder"))
            .collect::<std::result::Result<_, _>>()?;
        let (collapsed, collapsed_done) = collapse(&mut tx, params, &claiming).await?;
        let mut room = params.limit as i64;
        let mut shares: Vec<(i64, i64)> = Vec::new();
        let mut waiting: Vec<(i64, i64)> = Vec::new();
        for head in &heads {
            if room == 0 {
                break;
            }
            let builder: i64 = head.try_get("builder")?;
            let want = head.try_get::<i64, _>("available")?.min(room);
            let take = budget.allowance(builder, want as usize) as i64;
            if take < want {
                waiting.push((builder, want));
            }
            budget.take(builder, take as usize);
            room -= take;
            if take > 0 {
                shares.push((builder, take));
            }
        }
        if !waiting.is_empty() {
            // Their next requests wait for a lock from now (if they were not already).
            sqlx::query(
                "UPDATE buildrequests u SET lock_wait_since = $3
                 FROM unnest($1::bigint[], $2::bigint[]) AS w(builder, n)
                 CROSS JOIN LATERAL (
                     SELECT r.id FROM buildrequests r
                     WHERE r.builder_id = w.builder AND r.complete = 0
                       AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                       AND (r.not_before IS NULL OR r.not_before <= $3)
                     ORDER BY r.priority DESC, r.id LIMIT w.n
                     FOR UPDATE OF r SKIP LOCKED) x
                 WHERE u.id = x.id AND u.lock_wait_since IS NULL",
            )
            .bind(ids_of(&waiting, |(b, _)| *b))
            .bind(ids_of(&waiting, |(_, n)| *n))
            .bind(micros(params.now))
            .execute(&mut *tx)
            .await?;
        }
        // Per builder, its share of the most urgent requests nobody holds. Rows another
        // master is claiming right now are skipped, not waited for.
        let rows = sqlx::query(
            "SELECT x.id, x.cancel_requested, x.buildset_id, x.builder_id
             FROM unnest($1::bigint[], $2::bigint[]) AS w(builder, n)
             CROSS JOIN LATERAL (
                 SELECT r.id, r.cancel_requested, r.buildset_id, r.builder_id, r.priority
                 FROM buildrequests r
                 WHERE r.builder_id = w.builder AND r.complete = 0
                   AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                   AND (r.not_before IS NULL OR r.not_before <= $3)
                 ORDER BY r.priority DESC, r.id
                 LIMIT w.n
                 FOR UPDATE OF r SKIP LOCKED) x",
        )
        .bind(ids_of(&shares, |(b, _)| *b))
        .bind(ids_of(&shares, |(_, n)| *n))
        .bind(micros(params.now))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            if collapsed.is_empty() {
                tx.rollback().await?;
                return Ok(StartOutcome::default());
            }
            tx.commit().await?;
            return Ok(StartOutcome {
                collapsed,
                buildsets_completed: collapsed_done,
                ..StartOutcome::default()
            });
        }
        let candidates: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<std::result::Result<_, _>>()?;
        // A claim committed between the snapshot above and the lock is not taken twice:
        // the primary key turns it into "not inserted".
        let claimed: BTreeSet<i64> = sqlx::query_scalar(
            "INSERT INTO buildrequest_claims (request_id, master_id, claimed_at)
             SELECT id, $2, $3 FROM unnest($1::bigint[]) id
             ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
        )
        .bind(&candidates)
        .bind(params.master_id.0)
        .bind(micros(params.now))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| fk_to_not_found(e, "master", Some(params.master_id)))?
        .into_iter()
        .collect();

        // Per builder, in claim order: (request, cancel flag, buildset).
        let mut by_builder: BTreeMap<i64, Vec<(i64, bool, i64)>> = BTreeMap::new();
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            if claimed.contains(&id) {
                by_builder
                    .entry(row.try_get("builder_id")?)
                    .or_default()
                    .push((
                        id,
                        row.try_get::<i64, _>("cancel_requested")? != 0,
                        row.try_get("buildset_id")?,
                    ));
            }
        }

        // Requests cancelled while an earlier (now released) claim held them end here.
        let mut outcome = StartOutcome {
            collapsed,
            buildsets_completed: collapsed_done,
            ..StartOutcome::default()
        };
        let flagged: Vec<(i64, i64)> = by_builder
            .values()
            .flatten()
            .filter(|(_, cancel, _)| *cancel)
            .map(|(id, _, bs)| (*id, *bs))
            .collect();
        if !flagged.is_empty() {
            sqlx::query(
                "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2 WHERE id = ANY($3)",
            )
            .bind(micros(params.now))
            .bind(ResultCode::Cancelled.code())
            .bind(ids_of(&flagged, |(id, _)| *id))
            .execute(&mut *tx)
            .await?;
            outcome.cancelled = flagged.iter().map(|(id, _)| RequestId(*id)).collect();
            outcome.cancelled.sort();
            let buildsets = flagged.iter().map(|(_, bs)| BuildsetId(*bs));
            outcome
                .buildsets_completed
                .extend(complete_buildsets(&mut tx, buildsets, params.now).await?);
        }

        // Numbered under the builders' row locks, so that masters starting builds of one
        // builder at once take turns.
        let (mut builders, mut requests, mut slots, mut offsets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (builder, found) in &by_builder {
            let free = wanted
                .iter()
                .find(|(b, _)| b.0 == *builder)
                .map(|(_, s)| s.as_slice())
                .unwrap_or(&[]);
            let runnable = found.iter().filter(|(_, cancel, _)| !cancel).zip(free);
            for (offset, ((id, _, _), slot)) in runnable.enumerate() {
                builders.push(*builder);
                requests.push(*id);
                slots.push(*slot);
                offsets.push(offset as i64 + 1);
            }
        }
        if requests.is_empty() {
            tx.commit().await?;
            return Ok(outcome);
        }
        let distinct: Vec<i64> = by_builder.keys().copied().collect();
        lock_builders(&mut tx, &distinct).await?;
        // Each builder's last number is read once (materialized), not once per new build:
        // read per row, the backward index scan for the maximum stepped over the entries
        // this statement had already inserted (invisible to it), a number of heap
        // fetches quadratic in the batch (33,000 for 256 builds, 7–10 ms per turn).
        sqlx::query(
            "WITH last AS MATERIALIZED (
                 SELECT u.builder, (SELECT COALESCE(MAX(b.number), 0) FROM builds b
                                    WHERE b.builder_id = u.builder) AS number
                 FROM (SELECT DISTINCT unnest($1::bigint[]) AS builder) u)
             INSERT INTO builds (number, builder_id, buildrequest_id, master_id, worker_slot, started_at, state_string)
             SELECT last.number + t.k, t.builder, t.request, $5, t.slot, $6, $7
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS t(builder, request, slot, k)
             JOIN last ON last.builder = t.builder",
        )
        .bind(&builders)
        .bind(&requests)
        .bind(&slots)
        .bind(&offsets)
        .bind(params.master_id.0)
        .bind(micros(params.now))
        .bind(&params.state_string)
        .execute(&mut *tx)
        .await?;
        let locking: Vec<i64> = builders
            .iter()
            .zip(&requests)
            .filter(|(b, _)| budget.takes_locks(**b))
            .map(|(_, r)| *r)
            .collect();
        if !locking.is_empty() {
            take_locks(&mut tx, &locking, params.now).await?;
        }
        // The new builds with their claimed requests and their buildsets' contexts, in
        // claim order, in one value.
        let sql = format!(
            "SELECT COALESCE(json_agg(json_build_array({BUILD_JSON}, {REQUEST_JSON}, {CONTEXT_JSON})
                                      ORDER BY r.priority DESC, r.id), '[]'::json)::text
             FROM builds b JOIN buildrequests r ON r.id = b.buildrequest_id
             JOIN buildsets bs ON bs.id = r.buildset_id
             LEFT JOIN buildrequest_claims c ON c.request_id = r.id
             WHERE b.buildrequest_id = ANY($1) AND b.master_id = $2 AND b.complete_at IS NULL"
        );
        let started: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(&requests)
            .bind(params.master_id.0)
            .fetch_one(&mut *tx)
            .await?;
        let started = started_from_json(&started)?;
        let build_ids: Vec<i64> = started.iter().map(|(b, _, _)| b.id.0).collect();
        outbox::record_started(&mut tx, &build_ids).await?;
        tx.commit().await?;
        outcome.started = started
            .into_iter()
            .map(|(build, request, context)| StartedBuild {
                request,
                build,
                context,
            })
            .collect();
        Ok(outcome)
    }

    async fn finish_batch(
        &self,
        master: MasterId,
        ends: &[FinishedBuild],
    ) -> Result<FinishOutcome> {
        if ends.is_empty() {
            return Ok(FinishOutcome::default());
        }
        let mut tx = self.pool.begin().await?;
        // Which builds still run on this master: only those are finished. They are
        // locked, so that expiring this master meanwhile waits, then finds them done.
        let running: BTreeSet<i64> = sqlx::query_scalar(
            "SELECT id FROM builds WHERE id = ANY($1) AND master_id = $2 AND complete_at IS NULL
             ORDER BY id FOR UPDATE",
        )
        .bind(ids_of(ends, |e| e.build_id.0))
        .bind(master.0)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut outcome = FinishOutcome::default();
        if running.is_empty() {
            tx.rollback().await?;
            outcome.refused = ends.iter().map(|e| e.build_id).collect();
            outcome.refused.sort();
            return Ok(outcome);
        }
        let mine: Vec<&FinishedBuild> = ends
            .iter()
            .filter(|e| running.contains(&e.build_id.0))
            .collect();
        end_builds(&mut tx, &mine).await?;
        let mut complete = Vec::new();
        let mut release = Vec::new();
        let mut delays: Vec<(i64, i64)> = Vec::new();
        for e in ends {
            if !running.contains(&e.build_id.0) {
                outcome.refused.push(e.build_id);
            } else if e.results == ResultCode::Retry || e.retry_at.is_some() {
                release.push(e.request_id.0);
                if let Some(at) = e.retry_at {
                    delays.push((e.request_id.0, micros(at)));
                }
            } else {
                complete.push(e);
            }
        }
        let mut buildsets = Vec::new();
        if !complete.is_empty() {
            let rows = sqlx::query(
                "UPDATE buildrequests r SET complete = 1, complete_at = t.at, results = t.res
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS t(id, at, res)
                 WHERE r.id = t.id AND r.complete = 0
                 RETURNING r.id, r.buildset_id",
            )
            .bind(ids_of(&complete, |e| e.request_id.0))
            .bind(ids_of(&complete, |e| micros(e.complete_at)))
            .bind(ids_of(&complete, |e| i64::from(e.results.code())))
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                outcome.completed.push(RequestId(row.try_get("id")?));
                buildsets.push(BuildsetId(row.try_get("buildset_id")?));
            }
        }
        if !release.is_empty() {
            let held: Vec<i64> = sqlx::query_scalar(
                "DELETE FROM buildrequest_claims c USING buildrequests r
                 WHERE c.master_id = $1 AND c.request_id = ANY($2) AND r.id = c.request_id AND r.complete = 0
                 RETURNING c.request_id",
            )
            .bind(master.0)
            .bind(&release)
            .fetch_all(&mut *tx)
            .await?;
            // A retry waits out its backoff: not claimable again before its time.
            delays.retain(|(r, _)| held.contains(r));
            if !delays.is_empty() {
                sqlx::query(
                    "UPDATE buildrequests r SET not_before = t.at
                     FROM unnest($1::bigint[], $2::bigint[]) AS t(id, at) WHERE r.id = t.id",
                )
                .bind(ids_of(&delays, |(r, _)| *r))
                .bind(ids_of(&delays, |(_, at)| *at))
                .execute(&mut *tx)
                .await?;
            }
            if !held.is_empty() {
                listen::notify(&mut tx, &[StoreSignal::Work]).await?;
            }
            outcome.released = held.into_iter().map(RequestId).collect();
        }
        let latest = ends
            .iter()
            .map(|e| e.complete_at)
            .max()
            .unwrap_or_else(kiln_model::now);
        outcome.buildsets_completed = complete_buildsets(&mut tx, buildsets, latest).await?;
        tx.commit().await?;
        outcome.completed.sort();
        outcome.released.sort();
        outcome.refused.sort();
        Ok(outcome)
    }
}

#[cfg(test)]
mod plans {
    //! A claim turn's cost does not grow with the requests completed before it.

    use super::*;
    use crate::seam::BuildsetWrites;

    #[tokio::test]
    async fn finding_the_claimable_builders_does_not_walk_the_completed_requests()
    -> anyhow::Result<()> {
        let Some((_schema, store, one)) = super::super::store_with_one_builder("heads").await?
        else {
            return Ok(());
        };
        let builder = one.builder_ids[0];
        // Fewer rows than set off the engine's own ANALYZE; this test analyzes them
        // itself, while all are queued, as a large submit does.
        let completed = 2_000;
        store
            .buildset_add_many(&vec![one.clone(); completed])
            .await?;
        sqlx::query("ANALYZE buildsets, buildrequests")
            .execute(&store.pool)
            .await?;
        sqlx::query("UPDATE buildrequests SET complete = 1, complete_at = 0, results = 0")
            .execute(&store.pool)
            .await?;
        store.buildset_add_many(&[one]).await?;
        let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {CLAIM_HEADS}"
        )))
        .bind(vec![builder.0])
        .bind(vec![256i64])
        .bind(micros(kiln_model::now()))
        .fetch_one(&store.pool)
        .await?;
        let top = &plan[0]["Plan"];
        let read = top["Shared Hit Blocks"].as_u64().unwrap_or(0)
            + top["Shared Read Blocks"].as_u64().unwrap_or(0);
        // One queued request, past the queue index's entries for the completed ones
        // (left behind until found dead or vacuumed): 89 pages when written. Walking the
        // completed requests by primary key read 4,109.
        anyhow::ensure!(
            read < 200,
            "the claim turn read {read} pages with {completed} requests completed: {plan:#}"
        );
        let available: i64 = sqlx::query(CLAIM_HEADS)
            .bind(vec![builder.0])
            .bind(vec![256i64])
            .bind(micros(kiln_model::now()))
            .fetch_one(&store.pool)
            .await?
            .try_get("available")?;
        assert_eq!(available, 1, "one request is claimable");
        Ok(())
    }
}
