//! The set-based operations the scheduler's hot path runs: many buildsets, many builds
//! started or finished per transaction, each with a fixed number of statements however
//! many rows it touches.
//!
//! Per-row values travel as one JSON array bound to a single parameter and are unpacked
//! with `json_each`/`json_extract`; every statement goes to SQLite in one round trip,
//! which is what costs through sqlx (tens of microseconds), not the rows themselves.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use sqlx::{Connection, Row};

use super::json::{BUILD_JSON, CONTEXT_JSON, REQUEST_JSON};
use super::{SqliteStore, complete_buildsets, outbox};
use crate::rows::{from_json, json_ids, started_from_json, us};
use crate::{
    AddedBuildset, BuildEnd, NewBuildset, Result, Settled, StartAvailable, StartOutcome,
    StartedBuild, StorageError, fk_to_not_found, validate_buildset,
};
use kiln_model::{BuilderId, MasterId, RequestId};
use kiln_model::{BuildsetId, ResultCode};

/// A request about to be claimed: id, cancel_requested, buildset id.
type Candidate = (i64, i64, i64);

/// Of a JSON array of `[builder id, free slots]`, the builders with queued work that
/// nobody claimed, as a JSON array of `[builder id, free slots]` in Buildbot's order
/// across builders: highest queued priority first, then oldest queued request, then
/// name. Each builder costs two index seeks, however long its queue.
const HEADS_SQL: &str = "SELECT COALESCE(json_group_array(json_array(builder, slots) ORDER BY top DESC, oldest, name), '[]')
     FROM (SELECT w.value ->> 0 AS builder, w.value ->> 1 AS slots, bl.name AS name,
                  (SELECT r.priority FROM buildrequests r
                   WHERE r.builder_id = w.value ->> 0 AND r.complete = 0
                     AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                   ORDER BY r.priority DESC, r.id LIMIT 1) AS top,
                  (SELECT r.submitted_at FROM buildrequests r
                   WHERE r.builder_id = w.value ->> 0 AND r.complete = 0
                     AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                   ORDER BY r.submitted_at LIMIT 1) AS oldest
           FROM json_each(?) w JOIN builders bl ON bl.id = w.value ->> 0)
     WHERE top IS NOT NULL";

impl SqliteStore {
    pub(super) async fn add_buildsets(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>> {
        for p in params {
            validate_buildset(p)?;
        }
        if params.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;

        // One statement checks the builders and finds the next free ids: inside BEGIN
        // IMMEDIATE nobody else inserts, so the ids can be handed out here and every row
        // of the batch written with one statement per table.
        let wanted: BTreeSet<BuilderId> = params
            .iter()
            .flat_map(|p| p.builder_ids.iter().copied())
            .collect();
        let row = sqlx::query(
            "SELECT (SELECT json_group_array(id) FROM builders WHERE id IN (SELECT value FROM json_each(?))) AS known,
                    (SELECT COALESCE(MAX(id), 0) + 1 FROM buildsets) AS next_buildset,
                    (SELECT COALESCE(MAX(id), 0) + 1 FROM buildrequests) AS next_request",
        )
        .bind(json_ids(wanted.iter().map(|b| b.0)))
        .fetch_one(&mut *tx)
        .await?;
        let known: Vec<i64> = from_json(&row.try_get::<String, _>("known")?)?;
        if let Some(unknown) = wanted.iter().find(|b| !known.contains(&b.0)) {
            return Err(StorageError::UnknownBuilder(format!("#{unknown}")));
        }
        let next_buildset: i64 = row.try_get("next_buildset")?;
        let next_request: i64 = row.try_get("next_request")?;
        let mut buildsets = Vec::with_capacity(params.len());
        let mut requests = Vec::new();
        let mut stamps = Vec::new();
        let mut properties = Vec::new();
        let mut added = Vec::with_capacity(params.len());
        let mut request_id = next_request;
        for (i, p) in params.iter().enumerate() {
            let buildset_id = next_buildset + i as i64;
            let submitted = us(p.submitted_at);
            let empty = p.builder_ids.is_empty();
            buildsets.push(json!([
                buildset_id,
                p.reason,
                p.external_idstring,
                submitted,
                empty,
                empty.then_some(submitted),
                empty.then_some(ResultCode::Success.code()),
                p.parent_buildid.map(|b| b.0),
                p.parent_relationship,
                p.rebuilt_buildid.map(|b| b.0),
                p.parent_request_id.map(|r| r.0),
                p.trigger_key,
                p.depth,
            ]));
            let mut by_builder = BTreeMap::new();
            for builder in &p.builder_ids {
                requests.push(json!([
                    request_id,
                    buildset_id,
                    builder.0,
                    p.priority,
                    submitted,
                    p.waited_for
                ]));
                by_builder.insert(*builder, RequestId(request_id));
                request_id += 1;
            }
            for s in &p.sourcestamps {
                stamps.push(json!([
                    buildset_id,
                    s.codebase,
                    s.repository,
                    s.branch.as_deref().unwrap_or(""),
                    s.revision.as_deref().unwrap_or(""),
                    s.project,
                ]));
            }
            for (name, property) in &p.properties {
                properties.push(json!([
                    buildset_id,
                    name,
                    property.value.to_string(),
                    property.source
                ]));
            }
            added.push(AddedBuildset {
                buildset_id: BuildsetId(buildset_id),
                requests: by_builder,
            });
        }

        sqlx::query(
            "INSERT INTO buildsets (id, reason, external_idstring, submitted_at, complete, complete_at, results,
                                    parent_buildid, parent_relationship, rebuilt_buildid, parent_request_id, trigger_key,
                                    depth)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
                    value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11, value ->> 12
             FROM json_each(?)",
        )
        .bind(Value::from(buildsets).to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            fk_to_not_found(
                e,
                "build or request",
                params.iter().find_map(|p| {
                    p.parent_buildid
                        .or(p.rebuilt_buildid)
                        .map(|b| b.0)
                        .or(p.parent_request_id.map(|r| r.0))
                }),
            )
        })?;
        if !requests.is_empty() {
            sqlx::query(
                "INSERT INTO buildrequests (id, buildset_id, builder_id, priority, submitted_at, waited_for)
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5 FROM json_each(?)",
            )
            .bind(Value::from(requests).to_string())
            .execute(&mut *tx)
            .await?;
        }
        if !stamps.is_empty() {
            let stamps = Value::from(stamps).to_string();
            // The WHERE clause is required by SQLite's grammar for INSERT ... SELECT ... ON CONFLICT.
            sqlx::query(
                "INSERT INTO sourcestamps (codebase, repository, branch, revision, project)
                 SELECT DISTINCT value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5
                 FROM json_each(?) WHERE true
                 ON CONFLICT DO NOTHING",
            )
            .bind(&stamps)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT OR IGNORE INTO buildset_sourcestamps (buildset_id, sourcestamp_id)
                 SELECT j.value ->> 0, s.id FROM json_each(?) j JOIN sourcestamps s
                   ON s.codebase = j.value ->> 1 AND s.repository = j.value ->> 2 AND s.branch = j.value ->> 3
                  AND s.revision = j.value ->> 4 AND s.project = j.value ->> 5",
            )
            .bind(&stamps)
            .execute(&mut *tx)
            .await?;
        }
        if !properties.is_empty() {
            sqlx::query(
                "INSERT INTO buildset_properties (buildset_id, name, value, source)
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?)",
            )
            .bind(Value::from(properties).to_string())
            .execute(&mut *tx)
            .await?;
        }
        let new_ids = json_ids(added.iter().map(|a| a.buildset_id.0));
        outbox::record_submitted(&mut tx, &new_ids).await?;
        let empty: Vec<i64> = added
            .iter()
            .filter(|a| a.requests.is_empty())
            .map(|a| a.buildset_id.0)
            .collect();
        if !empty.is_empty() {
            outbox::record_complete(&mut tx, &json_ids(empty)).await?;
        }
        tx.commit().await?;
        Ok(added)
    }

    pub(super) async fn start_available(&self, params: &StartAvailable) -> Result<StartOutcome> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        // A master that was expired (or shut down) starts nothing until it registers
        // again: what it claimed now would belong to nobody alive.
        let active: Option<i64> = sqlx::query_scalar("SELECT active FROM masters WHERE id = ?")
            .bind(params.master_id.0)
            .fetch_optional(&mut *tx)
            .await?;
        match active {
            None => return Err(StorageError::not_found("master", params.master_id)),
            Some(0) => return Err(StorageError::MasterInactive(params.master_id)),
            Some(_) => {}
        }
        // The builders with queued work, in Buildbot's order across builders; then,
        // builder by builder in that order, its most urgent requests until the limit.
        let wanted: Vec<Value> = params
            .free_slots
            .iter()
            .filter(|(_, slots)| !slots.is_empty())
            .map(|(builder, slots)| json!([builder.0, slots.len()]))
            .collect();
        let heads: String = sqlx::query_scalar(HEADS_SQL)
            .bind(Value::from(wanted).to_string())
            .fetch_one(&mut *tx)
            .await?;
        let heads: Vec<(i64, usize)> = from_json(&heads)?;
        let mut claimed: Vec<(BuilderId, Vec<Candidate>)> = Vec::new();
        let mut room = params.limit;
        for (builder, slots) in heads {
            if room == 0 {
                break;
            }
            let found: String = sqlx::query_scalar(
                "SELECT json_group_array(json_array(id, cancel_requested, buildset_id) ORDER BY priority DESC, id) FROM (
                     SELECT r.id, r.cancel_requested, r.buildset_id, r.priority FROM buildrequests r
                     WHERE r.builder_id = ? AND r.complete = 0
                       AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                     ORDER BY r.priority DESC, r.id LIMIT ?)",
            )
            .bind(builder)
            .bind(slots.min(room) as i64)
            .fetch_one(&mut *tx)
            .await?;
            let found: Vec<Candidate> = from_json(&found)?;
            room = room.saturating_sub(found.len());
            if !found.is_empty() {
                claimed.push((BuilderId(builder), found));
            }
        }
        if claimed.is_empty() {
            tx.rollback().await?;
            return Ok(StartOutcome::default());
        }
        let all = json_ids(
            claimed
                .iter()
                .flat_map(|(_, found)| found.iter().map(|(id, _, _)| *id)),
        );
        sqlx::query("INSERT INTO buildrequest_claims (request_id, master_id, claimed_at) SELECT value, ?, ? FROM json_each(?)")
            .bind(params.master_id.0)
            .bind(us(params.now))
            .bind(&all)
            .execute(&mut *tx)
            .await
            .map_err(|e| fk_to_not_found(e, "master", Some(params.master_id)))?;

        // Requests cancelled while an earlier (now released) claim held them end here.
        let mut outcome = StartOutcome::default();
        let flagged: Vec<(i64, i64)> = claimed
            .iter()
            .flat_map(|(_, found)| {
                found
                    .iter()
                    .filter(|(_, cancel, _)| *cancel != 0)
                    .map(|(id, _, bs)| (*id, *bs))
            })
            .collect();
        if !flagged.is_empty() {
            sqlx::query(
                "UPDATE buildrequests SET complete = 1, complete_at = ?, results = ?
                 WHERE id IN (SELECT value FROM json_each(?))",
            )
            .bind(us(params.now))
            .bind(ResultCode::Cancelled.code())
            .bind(json_ids(flagged.iter().map(|(id, _)| *id)))
            .execute(&mut *tx)
            .await?;
            outcome.cancelled = flagged.iter().map(|(id, _)| RequestId(*id)).collect();
            outcome.cancelled.sort();
            let buildsets = flagged.iter().map(|(_, bs)| BuildsetId(*bs));
            outcome.buildsets_completed =
                complete_buildsets(&mut tx, buildsets, params.now).await?;
        }

        let mut runnable = Vec::new();
        for (builder, found) in &claimed {
            let slots = params
                .free_slots
                .iter()
                .find(|(b, _)| b == builder)
                .map(|(_, s)| s.as_slice())
                .unwrap_or(&[]);
            let pairs: Vec<Value> = found
                .iter()
                .filter(|(_, cancel, _)| *cancel == 0)
                .zip(slots)
                .map(|((id, _, _), slot)| json!([id, slot]))
                .collect();
            if pairs.is_empty() {
                continue;
            }
            runnable.extend(pairs.iter().filter_map(|p| p[0].as_i64()));
            sqlx::query(
                "INSERT INTO builds (number, builder_id, buildrequest_id, master_id, worker_slot, started_at, state_string)
                 SELECT (SELECT COALESCE(MAX(number), 0) FROM builds WHERE builder_id = ?1) + j.key + 1,
                        ?1, j.value ->> 0, ?2, j.value ->> 1, ?3, ?4
                 FROM json_each(?5) j ORDER BY j.key",
            )
            .bind(builder.0)
            .bind(params.master_id.0)
            .bind(us(params.now))
            .bind(&params.state_string)
            .bind(Value::from(pairs).to_string())
            .execute(&mut *tx)
            .await?;
        }
        if runnable.is_empty() {
            tx.commit().await?;
            return Ok(outcome);
        }
        // The new builds with their claimed requests and their buildsets' contexts, in
        // claim order, in one row.
        let sql = format!(
            "SELECT json_group_array(json_array({BUILD_JSON}, {REQUEST_JSON}, {CONTEXT_JSON})
                                     ORDER BY r.priority DESC, r.id)
             FROM builds b JOIN buildrequests r ON r.id = b.buildrequest_id
             JOIN buildsets bs ON bs.id = r.buildset_id
             LEFT JOIN buildrequest_claims c ON c.request_id = r.id
             WHERE b.buildrequest_id IN (SELECT value FROM json_each(?)) AND b.master_id = ? AND b.complete_at IS NULL"
        );
        let started: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(json_ids(runnable))
            .bind(params.master_id.0)
            .fetch_one(&mut *tx)
            .await?;
        let started = started_from_json(&started)?;
        outbox::record_started(&mut tx, &json_ids(started.iter().map(|(b, _, _)| b.id.0))).await?;
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

    pub(super) async fn finish_and_settle(
        &self,
        master: MasterId,
        ends: &[BuildEnd],
    ) -> Result<Settled> {
        if ends.is_empty() {
            return Ok(Settled::default());
        }
        let ids = json_ids(ends.iter().map(|e| e.build_id.0));
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        // Which builds still run on this master: only those are finished. Inside this
        // BEGIN IMMEDIATE transaction nobody can change that before the UPDATE below.
        let running: String = sqlx::query_scalar(
            "SELECT json_group_array(id) FROM builds
             WHERE id IN (SELECT value FROM json_each(?)) AND master_id = ? AND complete_at IS NULL",
        )
        .bind(&ids)
        .bind(master.0)
        .fetch_one(&mut *tx)
        .await?;
        let running: BTreeSet<i64> = from_json(&running)?;
        let mut settled = Settled::default();
        if running.is_empty() {
            tx.rollback().await?;
            settled.refused = ends.iter().map(|e| e.build_id).collect();
            settled.refused.sort();
            return Ok(settled);
        }
        let values = Value::from(
            ends.iter()
                .filter(|e| running.contains(&e.build_id.0))
                .map(|e| {
                    json!([
                        e.build_id.0,
                        us(e.complete_at),
                        e.results.code(),
                        e.return_value.as_ref().map(|v| v.to_string()),
                        e.error,
                        e.traceback,
                        e.state_string,
                    ])
                })
                .collect::<Vec<_>>(),
        )
        .to_string();
        // Joined on the primary key alone, so that SQLite walks the JSON array once and
        // looks each build up (with the master's running builds as the outer loop it
        // rescanned the array per build: quadratic in the batch).
        sqlx::query(
            "UPDATE builds SET complete_at = j.value ->> 1, results = j.value ->> 2, return_value = j.value ->> 3,
                               error = j.value ->> 4, traceback = j.value ->> 5,
                               state_string = COALESCE(j.value ->> 6, builds.state_string)
             FROM json_each(?) j
             WHERE builds.id = j.value ->> 0",
        )
        .bind(&values)
        .execute(&mut *tx)
        .await?;
        outbox::record_finished(&mut tx, &json_ids(running.iter().copied())).await?;
        let mut complete = Vec::new();
        let mut release = Vec::new();
        for e in ends {
            if !running.contains(&e.build_id.0) {
                settled.refused.push(e.build_id);
            } else if e.results == ResultCode::Retry {
                release.push(e.request_id.0);
            } else {
                complete.push(json!([e.request_id.0, us(e.complete_at), e.results.code()]));
            }
        }
        let mut buildsets = Vec::new();
        if !complete.is_empty() {
            let complete = Value::from(complete).to_string();
            let open: String = sqlx::query_scalar(
                "SELECT json_group_array(json_array(id, buildset_id)) FROM buildrequests
                 WHERE id IN (SELECT value ->> 0 FROM json_each(?)) AND complete = 0",
            )
            .bind(&complete)
            .fetch_one(&mut *tx)
            .await?;
            let open: Vec<(i64, i64)> = from_json(&open)?;
            sqlx::query(
                "UPDATE buildrequests SET complete = 1, complete_at = j.value ->> 1, results = j.value ->> 2
                 FROM json_each(?) j
                 WHERE buildrequests.id = j.value ->> 0 AND buildrequests.complete = 0",
            )
            .bind(&complete)
            .execute(&mut *tx)
            .await?;
            settled.completed = open.iter().map(|(id, _)| RequestId(*id)).collect();
            buildsets = open.iter().map(|(_, bs)| BuildsetId(*bs)).collect();
        }
        if !release.is_empty() {
            let release = json_ids(release);
            let held: String = sqlx::query_scalar(
                "SELECT json_group_array(request_id) FROM buildrequest_claims
                 WHERE master_id = ? AND request_id IN (SELECT value FROM json_each(?))
                   AND request_id IN (SELECT id FROM buildrequests WHERE complete = 0)",
            )
            .bind(master.0)
            .bind(&release)
            .fetch_one(&mut *tx)
            .await?;
            let held: Vec<i64> = from_json(&held)?;
            sqlx::query("DELETE FROM buildrequest_claims WHERE request_id IN (SELECT value FROM json_each(?))")
                .bind(json_ids(held.iter().copied()))
                .execute(&mut *tx)
                .await?;
            settled.released = held.into_iter().map(RequestId).collect();
        }
        let artifacts: Vec<Value> = ends
            .iter()
            .filter(|e| running.contains(&e.build_id.0))
            .flat_map(|e| {
                e.artifacts
                    .iter()
                    .map(move |a| json!([e.build_id.0, a.path, a.size, a.location]))
            })
            .collect();
        if !artifacts.is_empty() {
            sqlx::query(
                "INSERT OR REPLACE INTO build_artifacts (build_id, path, size, location)
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?)",
            )
            .bind(Value::from(artifacts).to_string())
            .execute(&mut *tx)
            .await?;
        }
        let latest = ends
            .iter()
            .map(|e| e.complete_at)
            .max()
            .unwrap_or_else(kiln_model::now);
        settled.buildsets_completed = complete_buildsets(&mut tx, buildsets, latest).await?;
        tx.commit().await?;
        settled.completed.sort();
        settled.released.sort();
        settled.refused.sort();
        Ok(settled)
    }
}
