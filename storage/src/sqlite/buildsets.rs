//! Submitting buildsets in SQLite: a batch of any size in a fixed number of statements.
//!
//! Per-row values travel as one JSON array bound to a single parameter and are unpacked
//! with `json_each`: a fixed number of prepared statements per transaction, however
//! many buildsets it adds.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{SqliteStore, outbox};
use crate::idempotency;
use crate::rows::{from_json, json_ids, micros};
use crate::seam::BuildsetWrites;
use crate::{AddedBuildset, NewBuildset, Result, StorageError, text, validate};
use kiln_model::{BuilderId, BuildsetId, RequestId, ResultCode};

#[async_trait]
impl BuildsetWrites for SqliteStore {
    async fn buildset_add_many(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>> {
        if params.is_empty() {
            return Ok(Vec::new());
        }
        let params = text::buildsets(params).into_owned();
        for p in &params {
            validate::buildset(p)?;
        }
        self.transaction(move |tx| add_many(tx, &params)).await
    }
}

/// Adds buildsets inside the caller's transaction; those whose idempotency key a
/// buildset holds already get that buildset back (inside BEGIN IMMEDIATE nobody else
/// can take a key between the look-up and the insert).
fn add_many(tx: &rusqlite::Connection, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>> {
    let keys = idempotency::keys(params);
    if keys.is_empty() {
        return insert(tx, &params.iter().collect::<Vec<_>>());
    }
    let mut held = Vec::new();
    for row in tx
        .prepare_cached(
            "SELECT bs.idempotency_key, bs.id, r.builder_id, r.id
             FROM buildsets bs LEFT JOIN buildrequests r ON r.buildset_id = bs.id
             WHERE bs.idempotency_key IN (SELECT value FROM json_each(?))",
        )?
        .query_map([Value::from(keys).to_string()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
    {
        held.push(row?);
    }
    let plan = idempotency::plan(params, idempotency::gather(held));
    let added = if plan.fresh.is_empty() {
        Vec::new()
    } else {
        insert(tx, &plan.fresh)?
    };
    plan.answer(added)
}

/// Inserts new buildsets, their requests, stamps, properties and reports.
fn insert(tx: &rusqlite::Connection, params: &[&NewBuildset]) -> Result<Vec<AddedBuildset>> {
    // One statement checks the builders and finds the next free ids: inside BEGIN
    // IMMEDIATE nobody else inserts, so the ids can be handed out here and every row
    // of the batch written with one statement per table.
    let wanted: BTreeSet<BuilderId> = params
        .iter()
        .flat_map(|p| p.builder_ids.iter().copied())
        .collect();
    let (known, next_buildset, next_request): (String, i64, i64) = tx
            .prepare_cached(
                "SELECT (SELECT json_group_array(id) FROM builders WHERE id IN (SELECT value FROM json_each(?))),
                        (SELECT COALESCE(MAX(id), 0) + 1 FROM buildsets),
                        (SELECT COALESCE(MAX(id), 0) + 1 FROM buildrequests)",
            )?
            .query_row([json_ids(wanted.iter().map(|b| b.0))], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
    let known: Vec<i64> = from_json(&known)?;
    if let Some(unknown) = wanted.iter().find(|b| !known.contains(&b.0)) {
        return Err(StorageError::UnknownBuilder(format!("#{unknown}")));
    }
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
            p.idempotency_key,
            p.resubmitted_from.map(|b| b.0),
        ]));
        let mut by_builder = BTreeMap::new();
        for builder in &p.builder_ids {
            requests.push(json!([
                request_id,
                buildset_id,
                builder.0,
                p.priority,
                submitted,
                p.waited_for,
                p.not_before.map(micros),
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
            existing: false,
        });
    }

    tx.prepare_cached(
            "INSERT INTO buildsets (id, reason, external_idstring, submitted_at, complete, complete_at, results,
                                    parent_buildid, parent_relationship, rebuilt_buildid, parent_request_id, trigger_key,
                                    depth, idempotency_key, resubmitted_from)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
                    value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11, value ->> 12, value ->> 13,
                    value ->> 14
             FROM json_each(?)",
        )?
        .execute([Value::from(buildsets).to_string()])
        .map_err(|e| {
            let referenced = params.iter().find_map(|p| {
                p.parent_buildid
                    .or(p.rebuilt_buildid)
                    .map(|b| b.0)
                    .or(p.parent_request_id.map(|r| r.0))
            });
            StorageError::from(e).fk_not_found(
                "build or request",
                referenced.map_or_else(|| "?".to_owned(), |id| id.to_string()),
            )
        })?;
    if !requests.is_empty() {
        tx.prepare_cached(
                "INSERT INTO buildrequests (id, buildset_id, builder_id, priority, submitted_at, waited_for, not_before)
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6
                 FROM json_each(?)",
            )?
            .execute([Value::from(requests).to_string()])?;
    }
    if !stamps.is_empty() {
        let stamps = Value::from(stamps).to_string();
        // The WHERE clause is required by SQLite's grammar for INSERT ... SELECT ... ON CONFLICT.
        tx.prepare_cached(
            "INSERT INTO sourcestamps (codebase, repository, branch, revision, project)
                 SELECT DISTINCT value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5
                 FROM json_each(?) WHERE true
                 ON CONFLICT DO NOTHING",
        )?
        .execute([&stamps])?;
        tx.prepare_cached(
                "INSERT OR IGNORE INTO buildset_sourcestamps (buildset_id, sourcestamp_id)
                 SELECT j.value ->> 0, s.id FROM json_each(?) j JOIN sourcestamps s
                   ON s.codebase = j.value ->> 1 AND s.repository = j.value ->> 2 AND s.branch = j.value ->> 3
                  AND s.revision = j.value ->> 4 AND s.project = j.value ->> 5",
            )?
            .execute([&stamps])?;
    }
    if !properties.is_empty() {
        tx.prepare_cached(
            "INSERT INTO buildset_properties (buildset_id, name, value, source)
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?)",
        )?
        .execute([Value::from(properties).to_string()])?;
    }
    let new_ids = json_ids(added.iter().map(|a| a.buildset_id.0));
    outbox::record_submitted(tx, &new_ids)?;
    let empty: Vec<i64> = added
        .iter()
        .filter(|a| a.requests.is_empty())
        .map(|a| a.buildset_id.0)
        .collect();
    if !empty.is_empty() {
        outbox::record_complete(tx, &json_ids(empty))?;
    }
    Ok(added)
}
