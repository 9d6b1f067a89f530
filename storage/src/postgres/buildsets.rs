//! Submitting buildsets in PostgreSQL: a batch of any size in a fixed number of
//! statements. Per-row values travel as arrays, one per column, unpacked with `unnest`.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use sqlx::Row;

use super::{MAX_TX_ATTEMPTS, PostgresStore, listen, outbox, retryable, retrying};
use crate::idempotency;
use crate::rows::micros;
use crate::seam::BuildsetWrites;
use crate::{
    AddedBuildset, NewBuildset, Result, StorageError, StoreSignal, fk_to_not_found, text, validate,
};
use kiln_model::{BuildsetId, RequestId, ResultCode};
use sqlx::PgConnection;

/// Column arrays for one multi-row INSERT.
#[derive(Default)]
struct BuildsetRows {
    id: Vec<i64>,
    reason: Vec<String>,
    external: Vec<Option<String>>,
    submitted: Vec<i64>,
    complete: Vec<i64>,
    complete_at: Vec<Option<i64>>,
    results: Vec<Option<i64>>,
    parent_build: Vec<Option<i64>>,
    relationship: Vec<Option<String>>,
    rebuilt: Vec<Option<i64>>,
    parent_request: Vec<Option<i64>>,
    trigger_key: Vec<Option<String>>,
    depth: Vec<i64>,
    key: Vec<Option<String>>,
    resubmitted: Vec<Option<i64>>,
}

#[derive(Default)]
struct RequestRows {
    id: Vec<i64>,
    buildset: Vec<i64>,
    builder: Vec<i64>,
    priority: Vec<i32>,
    submitted: Vec<i64>,
    waited_for: Vec<i64>,
    not_before: Vec<Option<i64>>,
}

#[derive(Default)]
struct StampRows {
    buildset: Vec<i64>,
    codebase: Vec<String>,
    repository: Vec<String>,
    branch: Vec<String>,
    revision: Vec<String>,
    project: Vec<String>,
}

#[derive(Default)]
struct PropertyRows {
    buildset: Vec<i64>,
    name: Vec<String>,
    value: Vec<String>,
    source: Vec<String>,
}

/// The first key of the two-key advisory locks that make idempotency keys atomic
/// across masters ("KILN" in ASCII).
const IDEMPOTENCY_LOCK_CLASS: i32 = 0x4b49_4c4e;

#[async_trait]
impl BuildsetWrites for PostgresStore {
    async fn buildset_add_many(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>> {
        let params = &*text::buildsets(params);
        let added = retrying!(self.add_buildsets(params))?;
        self.grew(
            super::Hot::Queue,
            added.iter().map(|a| 1 + a.requests.len()).sum(),
        );
        Ok(added)
    }
}

impl PostgresStore {
    async fn add_buildsets(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>> {
        for p in params {
            validate::buildset(p)?;
        }
        if params.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let keys = idempotency::keys(params);
        let mut held = Vec::new();
        if !keys.is_empty() {
            // One transaction-scoped advisory lock per key, in sorted order (a deadlock
            // is retried all the same): a concurrent submit with the same key, from any
            // master, waits here until this one commits and then finds its buildset.
            // The two-key form keeps Kiln's keys apart from single-key locks.
            sqlx::query(
                "SELECT pg_advisory_xact_lock($1, hashtext(k)) FROM unnest($2::text[]) AS k",
            )
            .bind(IDEMPOTENCY_LOCK_CLASS)
            .bind(&keys)
            .execute(&mut *tx)
            .await?;
            let rows = sqlx::query(
                "SELECT bs.idempotency_key, bs.id, r.builder_id, r.id AS request_id
                 FROM buildsets bs LEFT JOIN buildrequests r ON r.buildset_id = bs.id
                 WHERE bs.idempotency_key = ANY($1)",
            )
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                held.push((
                    row.try_get("idempotency_key")?,
                    row.try_get("id")?,
                    row.try_get("builder_id")?,
                    row.try_get("request_id")?,
                ));
            }
        }
        let plan = idempotency::plan(params, idempotency::gather(held));
        let added = if plan.fresh.is_empty() {
            Vec::new()
        } else {
            insert(&mut tx, &plan.fresh).await?
        };
        tx.commit().await?;
        plan.answer(added)
    }
}

/// Inserts new buildsets, their requests, stamps, properties and reports.
async fn insert(tx: &mut PgConnection, params: &[&NewBuildset]) -> Result<Vec<AddedBuildset>> {
    let wanted: Vec<i64> = params
        .iter()
        .flat_map(|p| p.builder_ids.iter().map(|b| b.0))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let known: Vec<i64> = sqlx::query_scalar("SELECT id FROM builders WHERE id = ANY($1)")
        .bind(&wanted)
        .fetch_all(&mut *tx)
        .await?;
    if let Some(unknown) = wanted.iter().find(|b| !known.contains(b)) {
        return Err(StorageError::UnknownBuilder(format!("#{unknown}")));
    }
    // Ids are drawn from the sequences up front, so that every row of the batch can
    // be written with one statement per table.
    let n_requests: i64 = params.iter().map(|p| p.builder_ids.len() as i64).sum();
    let row = sqlx::query(
            "SELECT ARRAY(SELECT nextval(pg_get_serial_sequence('buildsets', 'id')) FROM generate_series(1, $1)) AS bs,
                    ARRAY(SELECT nextval(pg_get_serial_sequence('buildrequests', 'id')) FROM generate_series(1, $2)) AS br",
        )
        .bind(params.len() as i64)
        .bind(n_requests)
        .fetch_one(&mut *tx)
        .await?;
    let mut buildset_ids: Vec<i64> = row.try_get("bs")?;
    let mut request_ids: Vec<i64> = row.try_get("br")?;
    buildset_ids.sort_unstable();
    request_ids.sort_unstable();
    let mut next_request = request_ids.into_iter();

    let mut bs = BuildsetRows::default();
    let mut rq = RequestRows::default();
    let mut st = StampRows::default();
    let mut pr = PropertyRows::default();
    let mut added = Vec::with_capacity(params.len());
    for (p, &buildset_id) in params.iter().zip(&buildset_ids) {
        let submitted = micros(p.submitted_at);
        let empty = p.builder_ids.is_empty();
        bs.id.push(buildset_id);
        bs.reason.push(p.reason.clone());
        bs.external.push(p.external_idstring.clone());
        bs.submitted.push(submitted);
        bs.complete.push(i64::from(empty));
        bs.complete_at.push(empty.then_some(submitted));
        bs.results
            .push(empty.then_some(i64::from(ResultCode::Success.code())));
        bs.parent_build.push(p.parent_buildid.map(|b| b.0));
        bs.relationship.push(p.parent_relationship.clone());
        bs.rebuilt.push(p.rebuilt_buildid.map(|b| b.0));
        bs.parent_request.push(p.parent_request_id.map(|r| r.0));
        bs.trigger_key.push(p.trigger_key.clone());
        bs.depth.push(i64::from(p.depth));
        bs.key.push(p.idempotency_key.clone());
        bs.resubmitted.push(p.resubmitted_from.map(|b| b.0));
        let mut by_builder = BTreeMap::new();
        for builder in &p.builder_ids {
            let request_id = next_request.next().ok_or_else(|| {
                StorageError::Invalid("the database handed out too few request ids".into())
            })?;
            rq.id.push(request_id);
            rq.buildset.push(buildset_id);
            rq.builder.push(builder.0);
            rq.priority.push(p.priority);
            rq.submitted.push(submitted);
            rq.waited_for.push(i64::from(p.waited_for));
            rq.not_before.push(p.not_before.map(micros));
            by_builder.insert(*builder, RequestId(request_id));
        }
        for s in &p.sourcestamps {
            st.buildset.push(buildset_id);
            st.codebase.push(s.codebase.clone());
            st.repository.push(s.repository.clone());
            st.branch.push(s.branch.clone().unwrap_or_default());
            st.revision.push(s.revision.clone().unwrap_or_default());
            st.project.push(s.project.clone());
        }
        for (name, property) in &p.properties {
            pr.buildset.push(buildset_id);
            pr.name.push(name.clone());
            pr.value.push(property.value.to_string());
            pr.source.push(property.source.clone());
        }
        added.push(AddedBuildset {
            buildset_id: BuildsetId(buildset_id),
            requests: by_builder,
            existing: false,
        });
    }

    sqlx::query(
            "INSERT INTO buildsets (id, reason, external_idstring, submitted_at, complete, complete_at, results,
                                    parent_buildid, parent_relationship, rebuilt_buildid, parent_request_id, trigger_key,
                                    depth, idempotency_key, resubmitted_from)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                                  $7::bigint[], $8::bigint[], $9::text[], $10::bigint[], $11::bigint[], $12::text[],
                                  $13::bigint[], $14::text[], $15::bigint[])",
        )
        .bind(&bs.id)
        .bind(&bs.reason)
        .bind(&bs.external)
        .bind(&bs.submitted)
        .bind(&bs.complete)
        .bind(&bs.complete_at)
        .bind(&bs.results)
        .bind(&bs.parent_build)
        .bind(&bs.relationship)
        .bind(&bs.rebuilt)
        .bind(&bs.parent_request)
        .bind(&bs.trigger_key)
        .bind(&bs.depth)
        .bind(&bs.key)
        .bind(&bs.resubmitted)
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
    if !rq.id.is_empty() {
        sqlx::query(
                "INSERT INTO buildrequests (id, buildset_id, builder_id, priority, submitted_at, waited_for, not_before)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::integer[], $5::bigint[], $6::bigint[],
                                      $7::bigint[])",
            )
            .bind(&rq.id)
            .bind(&rq.buildset)
            .bind(&rq.builder)
            .bind(&rq.priority)
            .bind(&rq.submitted)
            .bind(&rq.waited_for)
            .bind(&rq.not_before)
            .execute(&mut *tx)
            .await?;
    }
    if !st.buildset.is_empty() {
        // Sorted, so that two masters adding the same stamps lock them in one order; a
        // stamp another transaction is adding waits for it to commit. A stamp that
        // exists is updated to itself: that locks its row until this transaction has
        // linked it, so retention (which skips locked stamps) cannot delete it between
        // this statement and the next and leave the buildset without it.
        sqlx::query(
                "INSERT INTO sourcestamps (codebase, repository, branch, revision, project)
                 SELECT DISTINCT c, r, b, v, p FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                     AS t(c, r, b, v, p)
                 ORDER BY c, r, b, v, p
                 ON CONFLICT (codebase, repository, branch, revision, project)
                 DO UPDATE SET codebase = EXCLUDED.codebase",
            )
            .bind(&st.codebase)
            .bind(&st.repository)
            .bind(&st.branch)
            .bind(&st.revision)
            .bind(&st.project)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
                "INSERT INTO buildset_sourcestamps (buildset_id, sourcestamp_id)
                 SELECT t.bs, s.id
                 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS t(bs, c, r, b, v, p)
                 JOIN sourcestamps s ON s.codebase = t.c AND s.repository = t.r AND s.branch = t.b
                                    AND s.revision = t.v AND s.project = t.p
                 ON CONFLICT DO NOTHING",
            )
            .bind(&st.buildset)
            .bind(&st.codebase)
            .bind(&st.repository)
            .bind(&st.branch)
            .bind(&st.revision)
            .bind(&st.project)
            .execute(&mut *tx)
            .await?;
    }
    if !pr.buildset.is_empty() {
        sqlx::query(
            "INSERT INTO buildset_properties (buildset_id, name, value, source)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])",
        )
        .bind(&pr.buildset)
        .bind(&pr.name)
        .bind(&pr.value)
        .bind(&pr.source)
        .execute(&mut *tx)
        .await?;
    }
    outbox::record_submitted(&mut *tx, &buildset_ids).await?;
    let empty: Vec<i64> = added
        .iter()
        .filter(|a| a.requests.is_empty())
        .map(|a| a.buildset_id.0)
        .collect();
    outbox::record_complete(&mut *tx, &empty).await?;
    if !rq.id.is_empty() {
        listen::notify(&mut *tx, &[StoreSignal::Work]).await?;
    }
    Ok(added)
}
