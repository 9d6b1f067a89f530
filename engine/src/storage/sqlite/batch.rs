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

use super::rows::{BUILD_COLUMNS, REQUEST_FROM, build_from_row, json_ids, request_from_row, us};
use super::{SqliteStore, complete_buildsets, fk_to_not_found, validate_buildset};
use crate::model::{BuildRequest, BuildsetId, ResultCode};
use crate::model::{BuilderId, MasterId, RequestId};
use crate::storage::{
    AddedBuildset, BuildEnd, BuildsetContext, NewBuildset, Result, Settled, StartAvailable,
    StartOutcome, StartedBuild, StorageError,
};

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

        let wanted: BTreeSet<BuilderId> = params
            .iter()
            .flat_map(|p| p.builder_ids.iter().copied())
            .collect();
        let known: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM builders WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(json_ids(wanted.iter().map(|b| b.0)))
        .fetch_all(&mut *tx)
        .await?;
        if let Some(unknown) = wanted.iter().find(|b| !known.contains(&b.0)) {
            return Err(StorageError::UnknownBuilder(format!("#{unknown}")));
        }

        // Inside BEGIN IMMEDIATE nobody else inserts, so ids can be handed out here and
        // every row of the batch written with one statement per table.
        let next_buildset: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM buildsets")
                .fetch_one(&mut *tx)
                .await?;
        let next_request: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM buildrequests")
                .fetch_one(&mut *tx)
                .await?;
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
                                    parent_buildid, parent_relationship, rebuilt_buildid)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
                    value ->> 7, value ->> 8, value ->> 9
             FROM json_each(?)",
        )
        .bind(Value::from(buildsets).to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| fk_to_not_found(e, "build", params.iter().find_map(|p| p.parent_buildid.or(p.rebuilt_buildid))))?;
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
        tx.commit().await?;
        Ok(added)
    }

    pub(super) async fn contexts(
        &self,
        ids: &[BuildsetId],
    ) -> Result<BTreeMap<BuildsetId, BuildsetContext>> {
        let list = json_ids(ids.iter().map(|b| b.0));
        let mut contexts = BTreeMap::new();
        let rows = sqlx::query(
            "SELECT id, reason FROM buildsets WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(&list)
        .fetch_all(&self.reader)
        .await?;
        for row in &rows {
            contexts.insert(
                BuildsetId(row.try_get("id")?),
                BuildsetContext {
                    reason: row.try_get("reason")?,
                    properties: BTreeMap::new(),
                    sourcestamps: Vec::new(),
                },
            );
        }
        let rows = sqlx::query(
            "SELECT buildset_id, name, value, source FROM buildset_properties
             WHERE buildset_id IN (SELECT value FROM json_each(?))",
        )
        .bind(&list)
        .fetch_all(&self.reader)
        .await?;
        for row in &rows {
            if let Some(ctx) = contexts.get_mut(&BuildsetId(row.try_get("buildset_id")?)) {
                let (name, property) = super::rows::property_from_row(row)?;
                ctx.properties.insert(name, property);
            }
        }
        let rows = sqlx::query(
            "SELECT bss.buildset_id, s.codebase, s.repository, s.branch, s.revision, s.project
             FROM buildset_sourcestamps bss JOIN sourcestamps s ON s.id = bss.sourcestamp_id
             WHERE bss.buildset_id IN (SELECT value FROM json_each(?))",
        )
        .bind(&list)
        .fetch_all(&self.reader)
        .await?;
        for row in &rows {
            if let Some(ctx) = contexts.get_mut(&BuildsetId(row.try_get("buildset_id")?)) {
                ctx.sourcestamps
                    .push(super::rows::sourcestamp_from_row(row)?);
            }
        }
        for ctx in contexts.values_mut() {
            ctx.sourcestamps.sort();
        }
        Ok(contexts)
    }

    pub(super) async fn start_available(&self, params: &StartAvailable) -> Result<StartOutcome> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let mut claimed: Vec<(BuilderId, Vec<i64>)> = Vec::new();
        for (builder, slots) in &params.free_slots {
            if slots.is_empty() {
                continue;
            }
            let ids: Vec<i64> = sqlx::query_scalar(
                "SELECT r.id FROM buildrequests r
                 WHERE r.builder_id = ? AND r.complete = 0
                   AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                 ORDER BY r.priority DESC, r.submitted_at ASC, r.id ASC LIMIT ?",
            )
            .bind(builder.0)
            .bind(slots.len() as i64)
            .fetch_all(&mut *tx)
            .await?;
            if !ids.is_empty() {
                claimed.push((*builder, ids));
            }
        }
        if claimed.is_empty() {
            tx.rollback().await?;
            return Ok(StartOutcome::default());
        }
        let all = json_ids(claimed.iter().flat_map(|(_, ids)| ids.iter().copied()));
        sqlx::query("INSERT INTO buildrequest_claims (request_id, master_id, claimed_at) SELECT value, ?, ? FROM json_each(?)")
            .bind(params.master_id.0)
            .bind(us(params.now))
            .bind(&all)
            .execute(&mut *tx)
            .await
            .map_err(|e| fk_to_not_found(e, "master", Some(params.master_id)))?;

        // Requests cancelled while an earlier (now released) claim held them end here.
        let cancelled_rows = sqlx::query(
            "UPDATE buildrequests SET complete = 1, complete_at = ?, results = ?
             WHERE id IN (SELECT value FROM json_each(?)) AND cancel_requested = 1
             RETURNING id, buildset_id",
        )
        .bind(us(params.now))
        .bind(ResultCode::Cancelled.code())
        .bind(&all)
        .fetch_all(&mut *tx)
        .await?;
        let mut outcome = StartOutcome::default();
        let mut cancelled_buildsets = Vec::new();
        for row in &cancelled_rows {
            outcome.cancelled.push(RequestId(row.try_get("id")?));
            cancelled_buildsets.push(BuildsetId(row.try_get("buildset_id")?));
        }
        outcome.cancelled.sort();
        outcome.buildsets_completed =
            complete_buildsets(&mut tx, cancelled_buildsets, params.now).await?;

        let returning = BUILD_COLUMNS.replace("b.", "");
        let insert_builds = format!(
            "INSERT INTO builds (number, builder_id, buildrequest_id, master_id, worker_slot, started_at, state_string)
             SELECT (SELECT COALESCE(MAX(number), 0) FROM builds WHERE builder_id = ?1) + j.key + 1,
                    ?1, j.value ->> 0, ?2, j.value ->> 1, ?3, ?4
             FROM json_each(?5) j ORDER BY j.key
             RETURNING {returning}"
        );
        let mut builds = BTreeMap::new();
        for (builder, ids) in &claimed {
            let slots = params
                .free_slots
                .iter()
                .find(|(b, _)| b == builder)
                .map(|(_, s)| s.as_slice())
                .unwrap_or(&[]);
            let pairs: Vec<Value> = ids
                .iter()
                .filter(|id| !outcome.cancelled.contains(&RequestId(**id)))
                .zip(slots)
                .map(|(id, slot)| json!([id, slot]))
                .collect();
            if pairs.is_empty() {
                continue;
            }
            let rows = sqlx::query(sqlx::AssertSqlSafe(insert_builds.clone()))
                .bind(builder.0)
                .bind(params.master_id.0)
                .bind(us(params.now))
                .bind(&params.state_string)
                .bind(Value::from(pairs).to_string())
                .fetch_all(&mut *tx)
                .await?;
            for row in &rows {
                let build = build_from_row(row)?;
                builds.insert(build.request_id, build);
            }
        }
        let sql = format!(
            "{REQUEST_FROM} WHERE r.id IN (SELECT value FROM json_each(?))
             ORDER BY r.priority DESC, r.submitted_at ASC, r.id ASC"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(json_ids(builds.keys().map(|r| r.0)))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let requests: Vec<BuildRequest> =
            rows.iter().map(request_from_row).collect::<Result<_>>()?;
        outcome.started = requests
            .into_iter()
            .filter_map(|request| {
                builds
                    .remove(&request.id)
                    .map(|build| StartedBuild { request, build })
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
        let values: Vec<Value> = ends
            .iter()
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
            .collect();
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let finished: Vec<i64> = sqlx::query_scalar(
            "UPDATE builds SET complete_at = j.value ->> 1, results = j.value ->> 2, return_value = j.value ->> 3,
                               error = j.value ->> 4, traceback = j.value ->> 5,
                               state_string = COALESCE(j.value ->> 6, builds.state_string)
             FROM json_each(?) j
             WHERE builds.id = j.value ->> 0 AND builds.master_id = ? AND builds.complete_at IS NULL
             RETURNING builds.id",
        )
        .bind(Value::from(values).to_string())
        .bind(master.0)
        .fetch_all(&mut *tx)
        .await?;
        let finished: BTreeSet<i64> = finished.into_iter().collect();
        let mut settled = Settled::default();
        let mut complete = Vec::new();
        let mut release = Vec::new();
        for e in ends {
            if !finished.contains(&e.build_id.0) {
                settled.refused.push(e.build_id);
            } else if e.results == ResultCode::Retry {
                release.push(e.request_id.0);
            } else {
                complete.push(json!([e.request_id.0, us(e.complete_at), e.results.code()]));
            }
        }
        let mut buildsets = Vec::new();
        if !complete.is_empty() {
            let rows = sqlx::query(
                "UPDATE buildrequests SET complete = 1, complete_at = j.value ->> 1, results = j.value ->> 2
                 FROM json_each(?) j
                 WHERE buildrequests.id = j.value ->> 0 AND buildrequests.complete = 0
                 RETURNING buildrequests.id, buildrequests.buildset_id",
            )
            .bind(Value::from(complete).to_string())
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                settled.completed.push(RequestId(row.try_get("id")?));
                buildsets.push(BuildsetId(row.try_get("buildset_id")?));
            }
        }
        if !release.is_empty() {
            let released: Vec<i64> = sqlx::query_scalar(
                "DELETE FROM buildrequest_claims
                 WHERE master_id = ? AND request_id IN (SELECT value FROM json_each(?))
                   AND request_id IN (SELECT id FROM buildrequests WHERE complete = 0)
                 RETURNING request_id",
            )
            .bind(master.0)
            .bind(json_ids(release))
            .fetch_all(&mut *tx)
            .await?;
            settled.released = released.into_iter().map(RequestId).collect();
        }
        let latest = ends
            .iter()
            .map(|e| e.complete_at)
            .max()
            .unwrap_or_else(crate::model::now);
        settled.buildsets_completed = complete_buildsets(&mut tx, buildsets, latest).await?;
        tx.commit().await?;
        settled.completed.sort();
        settled.released.sort();
        settled.refused.sort();
        Ok(settled)
    }
}
