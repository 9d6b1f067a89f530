//! Builds in SQLite: the scheduler's hot path (claim and start many, finish many, each
//! in one transaction with a fixed number of statements however many rows it touches)
//! and the one-at-a-time starts and finishes.
//!
//! The writer's connection is synchronous (rusqlite), so a batch is a loop over
//! prepared statements, row by row, as SQLite's own floor does it: no JSON encoded in
//! Rust and decoded again inside SQLite (a fifth of the lifecycle's samples when every
//! statement was a hand-off through sqlx and batches travelled as JSON arrays), and the
//! builds a claim starts are answered from what the transaction just wrote.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, named_params, params};
use serde_json::{Value, json};

use super::requests::{complete_buildsets, complete_buildsets_of};
use super::{SqliteStore, outbox};
use crate::rows::{
    BUILD_COLUMNS, RawProperty, RawStamp, SyncRow, build_from_row, context_from_raw, from_json,
    json_ids, micros, opt_ts, ts,
};
use crate::seam::{BuildWrites, Builds};
use crate::{
    BuildsetContext, FinishOutcome, FinishedBuild, NewBuild, Result, StartAvailable, StartOutcome,
    StartedBuild, StorageError, text,
};
use kiln_model::{
    Build, BuildId, BuildRequest, BuilderId, BuildsetId, MasterId, RequestId, ResultCode, Timestamp,
};

use crate::lock_budget::{BUDGET_COLUMNS, LockBudget};

/// A request about to be claimed, with what its build needs of it and its buildset.
struct Candidate {
    id: i64,
    cancel_requested: bool,
    buildset_id: i64,
    priority: i32,
    submitted_at: i64,
    waited_for: bool,
    not_before: Option<i64>,
    reason: String,
    depth: i64,
    /// Whether its buildset has properties, and sourcestamps: most have neither, and
    /// then reading them would be two statements per build for nothing.
    has_properties: bool,
    has_stamps: bool,
}

/// Of a JSON array of `[builder id, free slots]` (`:wanted`), the builders not paused with
/// queued work that nobody claimed and that is due by `:now`, as a JSON array of `[builder id, free slots]` in Buildbot's order
/// across builders: highest queued priority first, then oldest queued request, then
/// name. Each builder costs two index seeks, however long its queue.
const HEADS_SQL: &str = "SELECT COALESCE(json_group_array(json_array(builder, slots) ORDER BY top DESC, oldest, name), '[]')
     FROM (SELECT w.value ->> 0 AS builder, w.value ->> 1 AS slots, bl.name AS name,
                  (SELECT r.priority FROM buildrequests r
                   WHERE r.builder_id = w.value ->> 0 AND r.complete = 0
                     AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                     AND (r.not_before IS NULL OR r.not_before <= :now)
                   ORDER BY r.priority DESC, r.id LIMIT 1) AS top,
                  (SELECT r.submitted_at FROM buildrequests r
                   WHERE r.builder_id = w.value ->> 0 AND r.complete = 0
                     AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                     AND (r.not_before IS NULL OR r.not_before <= :now)
                   ORDER BY r.submitted_at LIMIT 1) AS oldest
           FROM json_each(:wanted) w JOIN builders bl ON bl.id = w.value ->> 0 AND bl.paused = 0)
     WHERE top IS NOT NULL";

/// Of one builder (`:builder`), its most urgent unclaimed requests due by `:now` (at most
/// `:limit`), by priority then id, with their buildsets' reason and depth and whether
/// they have properties and sourcestamps. One seek into the partial queue index, however
/// long the queue, and a seek per candidate into each of the buildset's tables.
const CANDIDATES_SQL: &str =
    "SELECT r.id, r.cancel_requested, r.buildset_id, r.priority, r.submitted_at,
            r.waited_for, r.not_before, bs.reason, bs.depth,
            EXISTS (SELECT 1 FROM buildset_properties p WHERE p.buildset_id = r.buildset_id),
            EXISTS (SELECT 1 FROM buildset_sourcestamps s WHERE s.buildset_id = r.buildset_id)
     FROM buildrequests r JOIN buildsets bs ON bs.id = r.buildset_id
     WHERE r.builder_id = :builder AND r.complete = 0
       AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
       AND (r.not_before IS NULL OR r.not_before <= :now)
     ORDER BY r.priority DESC, r.id LIMIT :limit";

/// Writes the ends of those of `ends` still running on `master`: their columns, their
/// lock holds, their artifacts and their `build_finished` reports. Returns the builds it
/// ended; the others (not running, or not on `master`) are left alone.
fn end_builds<'a>(
    tx: &Connection,
    master: MasterId,
    ends: &[&'a FinishedBuild],
) -> Result<Vec<&'a FinishedBuild>> {
    let mut ended = Vec::with_capacity(ends.len());
    {
        let mut end = tx.prepare_cached(
            "UPDATE builds SET complete_at = ?2, results = ?3, return_value = ?4, error = ?5,
                               traceback = ?6, state_string = COALESCE(?7, state_string)
             WHERE id = ?1 AND master_id = ?8 AND complete_at IS NULL",
        )?;
        // Most engines define no locks: one look at the table spares a delete per build.
        let holding: bool = tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM lock_holds)")?
            .query_row([], |r| r.get(0))?;
        let mut unlock = tx.prepare_cached("DELETE FROM lock_holds WHERE build_id = ?")?;
        for e in ends {
            let changed = end.execute(params![
                e.build_id.0,
                micros(e.complete_at),
                e.results.code(),
                e.return_value.as_ref().map(|v| v.to_string()),
                e.error,
                e.traceback,
                e.state_string,
                master.0,
            ])?;
            if changed == 1 {
                if holding {
                    unlock.execute([e.build_id.0])?;
                }
                ended.push(*e);
            }
        }
    }
    let ids: Vec<i64> = ended.iter().map(|e| e.build_id.0).collect();
    outbox::record_finished(tx, &ids)?;
    let mut artifact = None;
    for e in &ended {
        for a in &e.artifacts {
            let statement = match &mut artifact {
                Some(s) => s,
                None => artifact.insert(tx.prepare_cached(
                    "INSERT OR REPLACE INTO build_artifacts (build_id, path, size, location)
                     VALUES (?, ?, ?, ?)",
                )?),
            };
            statement.execute(params![
                e.build_id.0,
                a.path,
                i64::try_from(a.size).unwrap_or(i64::MAX),
                a.location
            ])?;
        }
    }
    Ok(ended)
}

#[async_trait]
impl BuildWrites for SqliteStore {
    async fn build_start_available(&self, params: &StartAvailable) -> Result<StartOutcome> {
        let params = params.clone();
        self.transaction(move |tx| start_available(tx, &params))
            .await
    }

    async fn build_finish_batch(
        &self,
        master: MasterId,
        ends: &[FinishedBuild],
    ) -> Result<FinishOutcome> {
        let ends = text::finished_all(ends).into_owned();
        if ends.is_empty() {
            return Ok(FinishOutcome::default());
        }
        self.transaction(move |tx| finish_batch(tx, master, &ends))
            .await
    }

    async fn build_add(&self, params: &NewBuild) -> Result<Build> {
        let params = params.clone();
        self.transaction(move |tx| {
            let (builder_id, complete, holder): (i64, i64, Option<i64>) = tx
                .prepare_cached(
                    "SELECT r.builder_id, r.complete, c.master_id FROM buildrequests r
                     LEFT JOIN buildrequest_claims c ON c.request_id = r.id WHERE r.id = ?",
                )?
                .query_row([params.request_id.0], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?
                .ok_or_else(|| StorageError::not_found("build request", params.request_id))?;
            if holder != Some(params.master_id.0) || complete != 0 {
                return Err(StorageError::ClaimLost {
                    request: params.request_id,
                    master: params.master_id,
                });
            }
            let build = tx.prepare_cached(&BUILD_ADD_SQL)?.query_row(
                params![
                    builder_id,
                    params.request_id.0,
                    params.master_id.0,
                    params.worker_slot,
                    micros(params.started_at),
                    params.state_string,
                    builder_id
                ],
                |row| Ok(build_from_row(&SyncRow(row))),
            )??;
            outbox::record_started(tx, &[build.id.0])?;
            Ok(build)
        })
        .await
    }

    async fn build_finish(&self, master: MasterId, build: &FinishedBuild) -> Result<()> {
        let build = text::finished(build).into_owned();
        let id = build.build_id;
        let finished = self
            .transaction(move |tx| Ok(!end_builds(tx, master, &[&build])?.is_empty()))
            .await?;
        if finished {
            return Ok(());
        }
        self.build_get(id).await?;
        Err(StorageError::NotOwner { build: id, master })
    }
}

/// Inserts one build numbered after its builder's highest, handing the row back.
static BUILD_ADD_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO builds (number, builder_id, buildrequest_id, master_id, worker_slot, started_at, state_string)
         SELECT COALESCE(MAX(number), 0) + 1, ?, ?, ?, ?, ?, ? FROM builds WHERE builder_id = ?
         RETURNING {}",
        BUILD_COLUMNS.replace("b.", "")
    )
});

/// Of one collapsing builder (`:builder`), its queued requests due by `:now` that a newer
/// queued one supersedes (same set of sourcestamps and, when `:props` is 1, the same
/// properties), as a JSON array of `[request, newest, buildset]`. Looks at the
/// `:window` newest queued requests; a paused builder collapses nothing.
const COLLAPSIBLE_SQL: &str = "WITH q AS (
         SELECT r.id, r.buildset_id,
                (SELECT group_concat(sourcestamp_id, ',') FROM (
                     SELECT sourcestamp_id FROM buildset_sourcestamps s
                     WHERE s.buildset_id = r.buildset_id ORDER BY sourcestamp_id)) AS stamps,
                CASE WHEN :props THEN (SELECT json_group_array(json_array(name, value)) FROM (
                     SELECT name, value FROM buildset_properties p
                     WHERE p.buildset_id = r.buildset_id ORDER BY name)) END AS props
         FROM buildrequests r
         WHERE r.builder_id = :builder AND r.complete = 0
           AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
           AND (r.not_before IS NULL OR r.not_before <= :now)
           AND NOT EXISTS (SELECT 1 FROM builders bl WHERE bl.id = :builder AND bl.paused = 1)
         ORDER BY r.id DESC LIMIT :window),
     g AS (SELECT stamps, props, MAX(id) AS newest FROM q GROUP BY stamps, props)
     SELECT COALESCE(json_group_array(json_array(q.id, g.newest, q.buildset_id)), '[]')
     FROM q JOIN g ON q.stamps IS g.stamps AND q.props IS g.props
     WHERE q.id < g.newest";

/// Collapses the queues of the collapsing builders: what a newer request supersedes
/// completes as SKIPPED, naming it. Returns the pairs and the buildsets they completed.
fn collapse(tx: &Connection, params: &StartAvailable) -> Result<crate::params::Collapsed> {
    let mut pairs = Vec::new();
    let mut buildsets = Vec::new();
    for (builder, properties) in &params.collapse {
        let found: String = tx.prepare_cached(COLLAPSIBLE_SQL)?.query_row(
            named_params! {
                ":builder": builder.0,
                ":props": i64::from(*properties),
                ":now": micros(params.now),
                ":window": i64::from(crate::COLLAPSE_WINDOW),
            },
            |r| r.get(0),
        )?;
        let found: Vec<(i64, i64, i64)> = from_json(&found)?;
        if found.is_empty() {
            continue;
        }
        tx.prepare_cached(
            "UPDATE buildrequests SET complete = 1, complete_at = ?, results = ?, superseded_by = j.value ->> 1
             FROM json_each(?) j
             WHERE buildrequests.id = j.value ->> 0 AND buildrequests.complete = 0",
        )?
        .execute(params![
            micros(params.now),
            ResultCode::Skipped.code(),
            Value::from(
                found
                    .iter()
                    .map(|(r, n, _)| json!([r, n]))
                    .collect::<Vec<_>>()
            )
            .to_string()
        ])?;
        pairs.extend(found.iter().map(|(r, n, _)| (RequestId(*r), RequestId(*n))));
        buildsets.extend(found.iter().map(|(_, _, bs)| BuildsetId(*bs)));
    }
    let completed = complete_buildsets(tx, buildsets, params.now)?;
    pairs.sort();
    Ok((pairs, completed))
}

/// Collapses, then claims and starts what the master has room for, inside the caller's
/// transaction.
fn start_available(tx: &Connection, params: &StartAvailable) -> Result<StartOutcome> {
    let (collapsed, completed) = if params.collapse.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        collapse(tx, params)?
    };
    let mut outcome = claim_and_start(tx, params)?;
    outcome.collapsed = collapsed;
    outcome.buildsets_completed.extend(completed);
    Ok(outcome)
}

/// Claims and starts what the master has room for, inside the caller's transaction.
fn claim_and_start(tx: &Connection, params: &StartAvailable) -> Result<StartOutcome> {
    // A master that was expired (or shut down) starts nothing until it registers again:
    // what it claimed now would belong to nobody alive.
    let active: Option<i64> = tx
        .prepare_cached("SELECT active FROM masters WHERE id = ?")?
        .query_row([params.master_id.0], |r| r.get(0))
        .optional()?;
    match active {
        None => return Err(StorageError::not_found("master", params.master_id)),
        Some(0) => return Err(StorageError::MasterInactive(params.master_id)),
        Some(_) => {}
    }
    // The builders with queued work, in Buildbot's order across builders; then, builder
    // by builder in that order, its most urgent requests until the limit.
    let wanted: Vec<Value> = params
        .free_slots
        .iter()
        .filter(|(_, slots)| !slots.is_empty())
        .map(|(builder, slots)| json!([builder.0, slots.len()]))
        .collect();
    let now = micros(params.now);
    let heads: String = tx.prepare_cached(HEADS_SQL)?.query_row(
        named_params! {":wanted": Value::from(wanted).to_string(), ":now": now},
        |r| r.get(0),
    )?;
    let heads: Vec<(i64, usize)> = from_json(&heads)?;
    let mut budget = lock_budget(tx, &params.lock_builders)?;
    let mut claimed: Vec<(BuilderId, Vec<Candidate>)> = Vec::new();
    let mut room = params.limit;
    for (builder, slots) in heads {
        if room == 0 {
            break;
        }
        let want = slots.min(room);
        let allowed = budget.allowance(builder, want);
        if allowed < want {
            // Its next requests wait for a lock from now (if they were not already).
            tx.prepare_cached(
                "UPDATE buildrequests SET lock_wait_since = :now
                 WHERE lock_wait_since IS NULL AND id IN (
                     SELECT r.id FROM buildrequests r
                     WHERE r.builder_id = :builder AND r.complete = 0
                       AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                       AND (r.not_before IS NULL OR r.not_before <= :now)
                     ORDER BY r.priority DESC, r.id LIMIT :limit)",
            )?
            .execute(named_params! {":builder": builder, ":limit": want as i64, ":now": now})?;
        }
        if allowed == 0 {
            continue;
        }
        let found = tx
            .prepare_cached(CANDIDATES_SQL)?
            .query_map(
                named_params! {":builder": builder, ":limit": allowed as i64, ":now": now},
                |r| {
                    Ok(Candidate {
                        id: r.get(0)?,
                        cancel_requested: r.get::<_, i64>(1)? != 0,
                        buildset_id: r.get(2)?,
                        priority: r.get(3)?,
                        submitted_at: r.get(4)?,
                        waited_for: r.get::<_, i64>(5)? != 0,
                        not_before: r.get(6)?,
                        reason: r.get(7)?,
                        depth: r.get(8)?,
                        has_properties: r.get(9)?,
                        has_stamps: r.get(10)?,
                    })
                },
            )?
            .collect::<rusqlite::Result<Vec<Candidate>>>()?;
        budget.take(builder, found.len());
        room = room.saturating_sub(found.len());
        if !found.is_empty() {
            claimed.push((BuilderId(builder), found));
        }
    }
    if claimed.is_empty() {
        return Ok(StartOutcome::default());
    }
    {
        let mut claim = tx.prepare_cached(
            "INSERT INTO buildrequest_claims (request_id, master_id, claimed_at) VALUES (?, ?, ?)",
        )?;
        for (_, found) in &claimed {
            for c in found {
                claim
                    .execute(params![c.id, params.master_id.0, now])
                    .map_err(|e| StorageError::from(e).fk_not_found("master", params.master_id))?;
            }
        }
    }

    // Requests cancelled while an earlier (now released) claim held them end here.
    let mut outcome = StartOutcome::default();
    let flagged: Vec<&Candidate> = claimed
        .iter()
        .flat_map(|(_, found)| found.iter().filter(|c| c.cancel_requested))
        .collect();
    if !flagged.is_empty() {
        let mut cancel = tx.prepare_cached(
            "UPDATE buildrequests SET complete = 1, complete_at = ?, results = ? WHERE id = ?",
        )?;
        for c in &flagged {
            cancel.execute(params![now, ResultCode::Cancelled.code(), c.id])?;
        }
        drop(cancel);
        outcome.cancelled = flagged.iter().map(|c| RequestId(c.id)).collect();
        outcome.cancelled.sort();
        let buildsets = flagged.iter().map(|c| BuildsetId(c.buildset_id));
        outcome.buildsets_completed = complete_buildsets(tx, buildsets, params.now)?;
    }

    // The builds, numbered after each builder's highest, one row at a time.
    let mut started: Vec<(Build, &Candidate)> = Vec::new();
    for (builder, found) in &claimed {
        let slots = params
            .free_slots
            .iter()
            .find(|(b, _)| b == builder)
            .map(|(_, s)| s.as_slice())
            .unwrap_or(&[]);
        let runnable: Vec<(&Candidate, i64)> = found
            .iter()
            .filter(|c| !c.cancel_requested)
            .zip(slots.iter().copied())
            .collect();
        if runnable.is_empty() {
            continue;
        }
        let highest: i64 = tx
            .prepare_cached("SELECT COALESCE(MAX(number), 0) FROM builds WHERE builder_id = ?")?
            .query_row([builder.0], |r| r.get(0))?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO builds (number, builder_id, buildrequest_id, master_id, worker_slot, started_at, state_string)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )?;
        for (k, (c, slot)) in runnable.into_iter().enumerate() {
            let number = highest + k as i64 + 1;
            insert.execute(params![
                number,
                builder.0,
                c.id,
                params.master_id.0,
                slot,
                now,
                params.state_string
            ])?;
            let build = Build {
                id: BuildId(tx.last_insert_rowid()),
                number,
                builder_id: *builder,
                request_id: RequestId(c.id),
                master_id: params.master_id,
                worker_slot: Some(slot),
                started_at: ts(now)?,
                complete_at: None,
                state_string: params.state_string.clone(),
                locks_duration_s: 0.0,
                results: None,
                return_value: None,
                error: None,
                traceback: None,
            };
            started.push((build, c));
        }
    }
    if started.is_empty() {
        return Ok(outcome);
    }
    let locking: Vec<i64> = claimed
        .iter()
        .filter(|(builder, _)| budget.takes_locks(builder.0))
        .flat_map(|(_, found)| found.iter().map(|c| c.id))
        .collect();
    if !locking.is_empty() {
        take_locks(tx, &json_ids(locking), params.now)?;
        // What each locking build waited is what take_locks just wrote.
        let mut waited = tx.prepare_cached("SELECT locks_duration_s FROM builds WHERE id = ?")?;
        for (build, _) in started
            .iter_mut()
            .filter(|(b, _)| budget.takes_locks(b.builder_id.0))
        {
            build.locks_duration_s = waited.query_row([build.id.0], |r| r.get(0))?;
        }
    }
    let ids: Vec<i64> = started.iter().map(|(b, _)| b.id.0).collect();
    outbox::record_started(tx, &ids)?;
    started.sort_by_key(|(_, c)| (std::cmp::Reverse(c.priority), c.id));
    let mut contexts: HashMap<i64, BuildsetContext> = HashMap::new();
    let mut out = Vec::with_capacity(started.len());
    for (build, c) in started {
        let context = match contexts.get(&c.buildset_id) {
            Some(context) => context.clone(),
            None => {
                let context = buildset_context(tx, c)?;
                contexts.insert(c.buildset_id, context.clone());
                context
            }
        };
        let request = BuildRequest {
            id: RequestId(c.id),
            buildset_id: BuildsetId(c.buildset_id),
            builder_id: build.builder_id,
            priority: c.priority,
            submitted_at: ts(c.submitted_at)?,
            waited_for: c.waited_for,
            complete: false,
            complete_at: None,
            results: None,
            claimed_by: Some(params.master_id),
            claimed_at: Some(ts(now)?),
            cancel_requested: false,
            not_before: opt_ts(c.not_before)?,
            superseded_by: None,
        };
        out.push(StartedBuild {
            request,
            build,
            context,
        });
    }
    outcome.started = out;
    Ok(outcome)
}

/// A started build's buildset as its job sees it: reason and depth (read with the
/// claim), properties and sourcestamps (read only where the claim saw some).
fn buildset_context(tx: &Connection, c: &Candidate) -> Result<BuildsetContext> {
    let mut properties = Vec::new();
    if c.has_properties {
        properties = tx
            .prepare_cached(
                "SELECT name, value, source FROM buildset_properties WHERE buildset_id = ?",
            )?
            .query_map([c.buildset_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<Vec<RawProperty>>>()?;
    }
    let mut stamps = Vec::new();
    if c.has_stamps {
        stamps = tx
            .prepare_cached(
                "SELECT s.codebase, s.repository, s.branch, s.revision, s.project
                 FROM buildset_sourcestamps bss JOIN sourcestamps s ON s.id = bss.sourcestamp_id
                 WHERE bss.buildset_id = ?",
            )?
            .query_map([c.buildset_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<Vec<RawStamp>>>()?;
    }
    context_from_raw((c.reason.clone(), properties, stamps, c.depth))
}

/// What this claim may take of the locks of `builders` (nothing to load without any).
fn lock_budget(tx: &Connection, builders: &[BuilderId]) -> Result<LockBudget> {
    if builders.is_empty() {
        return Ok(LockBudget::default());
    }
    let sql =
        format!("SELECT {BUDGET_COLUMNS} WHERE bl.builder_id IN (SELECT value FROM json_each(?))");
    let rows = tx
        .prepare_cached(&sql)?
        .query_map([json_ids(builders.iter().map(|b| b.0))], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(LockBudget::new(rows))
}

/// The builds just started for `requests` (a JSON array) take their builders' locks, and
/// each records how long its request waited for them.
fn take_locks(tx: &Connection, requests: &str, now: Timestamp) -> Result<()> {
    tx.prepare_cached(
        "UPDATE builds SET locks_duration_s = (?1 - r.lock_wait_since) / 1e6
         FROM buildrequests r
         WHERE builds.buildrequest_id = r.id AND builds.complete_at IS NULL
           AND r.lock_wait_since IS NOT NULL AND r.id IN (SELECT value FROM json_each(?2))",
    )?
    .execute(params![micros(now), requests])?;
    tx.prepare_cached(
        "UPDATE buildrequests SET lock_wait_since = NULL
         WHERE lock_wait_since IS NOT NULL AND id IN (SELECT value FROM json_each(?))",
    )?
    .execute([requests])?;
    tx.prepare_cached(
        "INSERT INTO lock_holds (lock_name, build_id, master_id, units, acquired_at)
         SELECT bl.lock_name, b.id, b.master_id, bl.units, ?1
         FROM builds b JOIN builder_locks bl ON bl.builder_id = b.builder_id
         WHERE b.complete_at IS NULL AND b.buildrequest_id IN (SELECT value FROM json_each(?2))",
    )?
    .execute(params![micros(now), requests])?;
    Ok(())
}

/// Finishes the builds still running on `master` among `ends`, inside the caller's
/// transaction (which, being `BEGIN IMMEDIATE`, nobody can change that in meanwhile).
fn finish_batch(
    tx: &Connection,
    master: MasterId,
    ends: &[FinishedBuild],
) -> Result<FinishOutcome> {
    let all: Vec<&FinishedBuild> = ends.iter().collect();
    let ended = end_builds(tx, master, &all)?;
    let running: BTreeSet<i64> = ended.iter().map(|e| e.build_id.0).collect();
    let mut outcome = FinishOutcome::default();
    {
        let mut complete = tx.prepare_cached(
            "UPDATE buildrequests SET complete = 1, complete_at = ?2, results = ?3
             WHERE id = ?1 AND complete = 0",
        )?;
        let mut release = tx.prepare_cached(
            "DELETE FROM buildrequest_claims
             WHERE request_id = ?1 AND master_id = ?2
               AND EXISTS (SELECT 1 FROM buildrequests r WHERE r.id = ?1 AND r.complete = 0)",
        )?;
        // A retry waits out its backoff: not claimable again before its time.
        let mut delay =
            tx.prepare_cached("UPDATE buildrequests SET not_before = ?2 WHERE id = ?1")?;
        for e in ends {
            if !running.contains(&e.build_id.0) {
                outcome.refused.push(e.build_id);
            } else if e.results == ResultCode::Retry || e.retry_at.is_some() {
                if release.execute(params![e.request_id.0, master.0])? == 1 {
                    if let Some(at) = e.retry_at {
                        delay.execute(params![e.request_id.0, micros(at)])?;
                    }
                    outcome.released.push(e.request_id);
                }
            } else if complete.execute(params![
                e.request_id.0,
                micros(e.complete_at),
                e.results.code()
            ])? == 1
            {
                outcome.completed.push(e.request_id);
            }
        }
    }
    let latest = ends
        .iter()
        .map(|e| e.complete_at)
        .max()
        .unwrap_or_else(kiln_model::now);
    // Each completed request's buildset is found by the read that decides whether it is
    // complete (no separate read of the request's buildset first).
    outcome.buildsets_completed = complete_buildsets_of(tx, &outcome.completed, latest)?;
    outcome.completed.sort();
    outcome.released.sort();
    outcome.refused.sort();
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan SQLite chooses for `sql`, one line per step, with `binds` for its
    /// parameters in the order SQLite numbers them (named ones by first appearance).
    /// Run on the synchronous writer connection, the one the claim queries run on.
    async fn plan(store: &SqliteStore, sql: &str, binds: &[&str]) -> Result<Vec<String>> {
        let sql = format!("EXPLAIN QUERY PLAN {sql}");
        let binds: Vec<String> = binds.iter().map(|b| (*b).to_owned()).collect();
        store
            .transaction(move |tx| {
                let mut statement = tx.prepare(&sql)?;
                let rows = statement.query_map(rusqlite::params_from_iter(binds.iter()), |r| {
                    r.get::<_, String>("detail")
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
            })
            .await
    }

    /// The claim path seeks; it never walks a whole table, however many requests are
    /// queued (Buildbot's users report a master unusable at 25,000 pending).
    #[tokio::test]
    async fn the_claim_queries_seek_with_indexes_and_scan_no_table() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Database(sqlx::Error::Io(e)))?;
        let url = format!("sqlite://{}", dir.path().join("plan.db").display());
        let store = SqliteStore::open(&url, &crate::StoreOptions::default()).await?;
        for (what, sql, binds) in [
            // Named parameters are numbered by first appearance: :now, :wanted.
            ("heads", HEADS_SQL, &["1700000000000000", "[[1, 4]]"][..]),
            // :builder, :now, :limit.
            (
                "candidates",
                CANDIDATES_SQL,
                &["1", "1700000000000000", "4"][..],
            ),
            // The buildset: the requests' (buildset, complete, results) index alone.
            (
                "buildset state",
                super::super::requests::BUILDSET_STATE_SQL.as_str(),
                &["1"][..],
            ),
            (
                "buildset state of a request",
                super::super::requests::BUILDSET_STATE_OF_REQUEST_SQL.as_str(),
                &["1"][..],
            ),
        ] {
            let steps = plan(&store, sql, binds).await?;
            let scans: Vec<&String> = steps
                .iter()
                // A scan of a subquery's (limited) rows, of json_each or of a constant
                // row is not a scan of a table.
                .filter(|s| {
                    s.starts_with("SCAN")
                        && !s.contains("VIRTUAL TABLE")
                        && !s.starts_with("SCAN (subquery")
                        && !s.contains("CONSTANT ROW")
                })
                .collect();
            assert!(
                scans.is_empty(),
                "the {what} query scans a table: {scans:?} (plan: {steps:?})"
            );
            assert!(
                steps
                    .iter()
                    .any(|s| s.contains("USING") && s.contains("INDEX")),
                "the {what} query uses no index: {steps:?}"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod reprepare {
    use super::*;

    /// The claim's statements stay compiled from one claim to the next: binding a new
    /// `now` (every claim does) does not make SQLite plan them again.
    #[tokio::test]
    async fn the_claim_statements_are_not_recompiled_for_each_new_time() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Internal(e.to_string()))?;
        let url = format!("sqlite://{}", dir.path().join("reprepare.db").display());
        let store = SqliteStore::open(&url, &crate::StoreOptions::default()).await?;
        let recompiled = store
            .transaction(|tx| {
                let mut total = 0;
                for sql in [CANDIDATES_SQL, HEADS_SQL] {
                    let mut statement = tx.prepare_cached(sql)?;
                    for now in 1..=5_i64 {
                        let mut rows = match sql == CANDIDATES_SQL {
                            true => statement.query(named_params! {
                                ":builder": 1, ":limit": 10, ":now": now * 1_000_003
                            })?,
                            false => statement.query(named_params! {
                                ":wanted": "[[1, 2]]", ":now": now * 1_000_003
                            })?,
                        };
                        while rows.next()?.is_some() {}
                    }
                    total += statement.get_status(rusqlite::StatementStatus::RePrepare);
                }
                Ok(total)
            })
            .await?;
        assert_eq!(recompiled, 0, "the claim's statements were compiled again");
        Ok(())
    }
}
