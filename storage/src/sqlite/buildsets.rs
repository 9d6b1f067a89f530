//! Submitting buildsets in SQLite: a batch of any size in one transaction, each row
//! through a prepared statement on the writer's synchronous connection.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use serde_json::Value;

use super::{SqliteStore, outbox};
use crate::idempotency;
use crate::rows::micros;
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
    // Inside BEGIN IMMEDIATE nobody else inserts, so the next free ids can be handed out
    // here: the answer is known without reading anything back.
    let (next_buildset, next_request): (i64, i64) = tx
        .prepare_cached(
            "SELECT (SELECT COALESCE(MAX(id), 0) + 1 FROM buildsets),
                    (SELECT COALESCE(MAX(id), 0) + 1 FROM buildrequests)",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let wanted: BTreeSet<BuilderId> = params
        .iter()
        .flat_map(|p| p.builder_ids.iter().copied())
        .collect();
    {
        let mut known = tx.prepare_cached("SELECT 1 FROM builders WHERE id = ?")?;
        for builder in &wanted {
            if !known.exists([builder.0])? {
                return Err(StorageError::UnknownBuilder(format!("#{builder}")));
            }
        }
    }
    let mut buildset = tx.prepare_cached(
        "INSERT INTO buildsets (id, reason, external_idstring, submitted_at, complete, complete_at, results,
                                parent_buildid, parent_relationship, rebuilt_buildid, parent_request_id, trigger_key,
                                depth, idempotency_key, resubmitted_from)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?;
    let mut request = tx.prepare_cached(
        "INSERT INTO buildrequests (id, buildset_id, builder_id, priority, submitted_at, waited_for, not_before)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )?;
    let mut added = Vec::with_capacity(params.len());
    let mut empty = Vec::new();
    let mut request_id = next_request;
    for (i, p) in params.iter().enumerate() {
        let buildset_id = next_buildset + i as i64;
        let submitted = micros(p.submitted_at);
        let no_builders = p.builder_ids.is_empty();
        buildset
            .execute(rusqlite::params![
                buildset_id,
                p.reason,
                p.external_idstring,
                submitted,
                no_builders,
                no_builders.then_some(submitted),
                no_builders.then_some(ResultCode::Success.code()),
                p.parent_buildid.map(|b| b.0),
                p.parent_relationship,
                p.rebuilt_buildid.map(|b| b.0),
                p.parent_request_id.map(|r| r.0),
                p.trigger_key,
                p.depth,
                p.idempotency_key,
                p.resubmitted_from.map(|b| b.0),
            ])
            .map_err(|e| {
                let referenced = p
                    .parent_buildid
                    .or(p.rebuilt_buildid)
                    .map(|b| b.0)
                    .or(p.parent_request_id.map(|r| r.0));
                StorageError::from(e).fk_not_found(
                    "build or request",
                    referenced.map_or_else(|| "?".to_owned(), |id| id.to_string()),
                )
            })?;
        let mut by_builder = BTreeMap::new();
        for builder in &p.builder_ids {
            request.execute(rusqlite::params![
                request_id,
                buildset_id,
                builder.0,
                p.priority,
                submitted,
                p.waited_for,
                p.not_before.map(micros),
            ])?;
            by_builder.insert(*builder, RequestId(request_id));
            request_id += 1;
        }
        if !p.sourcestamps.is_empty() {
            // Both statements take the same parameters: the buildset, then the stamp.
            let mut stamp = tx.prepare_cached(
                "INSERT INTO sourcestamps (codebase, repository, branch, revision, project)
                 SELECT ?2, ?3, ?4, ?5, ?6 WHERE ?1 IS NOT NULL ON CONFLICT DO NOTHING",
            )?;
            let mut link = tx.prepare_cached(
                "INSERT OR IGNORE INTO buildset_sourcestamps (buildset_id, sourcestamp_id)
                 SELECT ?1, id FROM sourcestamps
                 WHERE codebase = ?2 AND repository = ?3 AND branch = ?4 AND revision = ?5 AND project = ?6",
            )?;
            for s in &p.sourcestamps {
                let values = rusqlite::params![
                    buildset_id,
                    s.codebase,
                    s.repository,
                    s.branch.as_deref().unwrap_or(""),
                    s.revision.as_deref().unwrap_or(""),
                    s.project
                ];
                stamp.execute(values)?;
                link.execute(values)?;
            }
        }
        if !p.properties.is_empty() {
            let mut property = tx.prepare_cached(
                "INSERT INTO buildset_properties (buildset_id, name, value, source) VALUES (?, ?, ?, ?)",
            )?;
            for (name, value) in &p.properties {
                property.execute(rusqlite::params![
                    buildset_id,
                    name,
                    value.value.to_string(),
                    value.source
                ])?;
            }
        }
        if no_builders {
            empty.push(buildset_id);
        }
        added.push(AddedBuildset {
            buildset_id: BuildsetId(buildset_id),
            requests: by_builder,
            existing: false,
        });
    }
    let new_ids: Vec<i64> = added.iter().map(|a| a.buildset_id.0).collect();
    outbox::record_submitted(tx, &new_ids)?;
    outbox::record_complete(tx, &empty)?;
    Ok(added)
}
