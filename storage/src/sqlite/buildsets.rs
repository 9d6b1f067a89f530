//! Submitting buildsets in SQLite: a batch of any size in a fixed number of statements.
//!
//! Per-row values travel as one JSON array bound to a single parameter and are unpacked
//! with `json_each`; every statement goes to SQLite in one round trip, which is what
//! costs through sqlx (tens of microseconds), not the rows themselves.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::{Connection, Row};

use super::{SqliteStore, outbox};
use crate::rows::{from_json, json_ids, micros};
use crate::seam::BuildsetWrites;
use crate::{AddedBuildset, NewBuildset, Result, StorageError, fk_to_not_found, text, validate};
use kiln_model::{BuilderId, BuildsetId, RequestId, ResultCode};

#[async_trait]
impl BuildsetWrites for SqliteStore {
    async fn buildset_add_many(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>> {
        let params = &*text::buildsets(params);
        for p in params {
            validate::buildset(p)?;
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
            let submitted = micros(p.submitted_at);
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
}
