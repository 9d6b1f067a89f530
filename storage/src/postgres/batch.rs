//! The set-based operations the scheduler's hot path runs, in PostgreSQL: many
//! buildsets, many builds started or finished per transaction, each with a fixed number
//! of statements however many rows it touches. Per-row values travel as arrays, one per
//! column, unpacked with `unnest`.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row;

use super::{
    PostgresStore, complete_buildsets, ids_of, listen, lock_active_master, lock_builders, outbox,
};
use crate::rows::{started_from_json, us};
use crate::{
    AddedBuildset, BuildEnd, NewBuildset, Result, Settled, StartAvailable, StartOutcome,
    StartedBuild, StorageError, StoreSignal, fk_to_not_found, validate_buildset,
};
use kiln_model::{BuilderId, BuildsetId, MasterId, RequestId, ResultCode};

/// A build as one JSON object, with `b` as the table alias (the keys of
/// [`BUILD_COLUMNS`](crate::rows::BUILD_COLUMNS)).
const BUILD_JSON: &str = "json_build_object('id', b.id, 'number', b.number, 'builder_id', b.builder_id, \
     'buildrequest_id', b.buildrequest_id, 'master_id', b.master_id, 'worker_slot', b.worker_slot, \
     'started_at', b.started_at, 'complete_at', b.complete_at, 'state_string', b.state_string, \
     'locks_duration_s', b.locks_duration_s, 'results', b.results, 'return_value', b.return_value, \
     'error', b.error, 'traceback', b.traceback)";

/// A request joined with its claim, as one JSON object (`r` and `c`).
const REQUEST_JSON: &str = "json_build_object('id', r.id, 'buildset_id', r.buildset_id, \
     'builder_id', r.builder_id, 'priority', r.priority, 'submitted_at', r.submitted_at, 'waited_for', r.waited_for, \
     'complete', r.complete, 'complete_at', r.complete_at, 'results', r.results, 'cancel_requested', r.cancel_requested, \
     'claimed_by', c.master_id, 'claimed_at', c.claimed_at)";

/// A buildset's reason, properties, stamps and depth as one JSON array, with `bs` as the
/// alias.
const CONTEXT_JSON: &str = "json_build_array(bs.reason, \
     (SELECT COALESCE(json_agg(json_build_array(p.name, p.value, p.source)), '[]'::json) \
      FROM buildset_properties p WHERE p.buildset_id = bs.id), \
     (SELECT COALESCE(json_agg(json_build_array(s.codebase, s.repository, s.branch, s.revision, s.project)), '[]'::json) \
      FROM buildset_sourcestamps bss JOIN sourcestamps s ON s.id = bss.sourcestamp_id \
      WHERE bss.buildset_id = bs.id), bs.depth)";

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
}

#[derive(Default)]
struct RequestRows {
    id: Vec<i64>,
    buildset: Vec<i64>,
    builder: Vec<i64>,
    priority: Vec<i32>,
    submitted: Vec<i64>,
    waited_for: Vec<i64>,
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

impl PostgresStore {
    pub(super) async fn add_buildsets(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>> {
        for p in params {
            validate_buildset(p)?;
        }
        if params.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
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
            let submitted = us(p.submitted_at);
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
            });
        }

        sqlx::query(
            "INSERT INTO buildsets (id, reason, external_idstring, submitted_at, complete, complete_at, results,
                                    parent_buildid, parent_relationship, rebuilt_buildid, parent_request_id, trigger_key,
                                    depth)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                                  $7::bigint[], $8::bigint[], $9::text[], $10::bigint[], $11::bigint[], $12::text[],
                                  $13::bigint[])",
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
                "INSERT INTO buildrequests (id, buildset_id, builder_id, priority, submitted_at, waited_for)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::integer[], $5::bigint[], $6::bigint[])",
            )
            .bind(&rq.id)
            .bind(&rq.buildset)
            .bind(&rq.builder)
            .bind(&rq.priority)
            .bind(&rq.submitted)
            .bind(&rq.waited_for)
            .execute(&mut *tx)
            .await?;
        }
        if !st.buildset.is_empty() {
            // Sorted, so that two masters adding the same new stamps lock them in one
            // order; a stamp another transaction is adding waits for it to commit.
            sqlx::query(
                "INSERT INTO sourcestamps (codebase, repository, branch, revision, project)
                 SELECT DISTINCT c, r, b, v, p FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                     AS t(c, r, b, v, p)
                 ORDER BY c, r, b, v, p
                 ON CONFLICT DO NOTHING",
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
        outbox::record_submitted(&mut tx, &buildset_ids).await?;
        let empty: Vec<i64> = added
            .iter()
            .filter(|a| a.requests.is_empty())
            .map(|a| a.buildset_id.0)
            .collect();
        outbox::record_complete(&mut tx, &empty).await?;
        if !rq.id.is_empty() {
            listen::notify(&mut tx, &[StoreSignal::Work]).await?;
        }
        tx.commit().await?;
        Ok(added)
    }

    pub(super) async fn start_available(&self, params: &StartAvailable) -> Result<StartOutcome> {
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
        // The builders with queued work, in Buildbot's order across builders, each with
        // how many of its free slots it can fill; the limit is shared out in that order.
        let heads = sqlx::query(
            "SELECT w.builder, LEAST(w.n, h.queued) AS available
             FROM unnest($1::bigint[], $2::bigint[]) AS w(builder, n)
             JOIN builders bl ON bl.id = w.builder
             CROSS JOIN LATERAL (
                 SELECT r.priority FROM buildrequests r
                 WHERE r.builder_id = w.builder AND r.complete = 0
                   AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                 ORDER BY r.priority DESC, r.id LIMIT 1) top
             CROSS JOIN LATERAL (
                 SELECT r.submitted_at FROM buildrequests r
                 WHERE r.builder_id = w.builder AND r.complete = 0
                   AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                 ORDER BY r.submitted_at LIMIT 1) oldest
             CROSS JOIN LATERAL (
                 SELECT count(*) AS queued FROM (
                     SELECT 1 FROM buildrequests r
                     WHERE r.builder_id = w.builder AND r.complete = 0
                       AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                     LIMIT w.n) q) h
             ORDER BY top.priority DESC, oldest.submitted_at, bl.name COLLATE \"C\"",
        )
        .bind(ids_of(&wanted, |(b, _)| b.0))
        .bind(ids_of(&wanted, |(_, s)| s.len() as i64))
        .fetch_all(&mut *tx)
        .await?;
        let mut room = params.limit as i64;
        let mut shares: Vec<(i64, i64)> = Vec::new();
        for head in &heads {
            if room == 0 {
                break;
            }
            let take = head.try_get::<i64, _>("available")?.min(room);
            room -= take;
            shares.push((head.try_get("builder")?, take));
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
                 ORDER BY r.priority DESC, r.id
                 LIMIT w.n
                 FOR UPDATE OF r SKIP LOCKED) x",
        )
        .bind(ids_of(&shares, |(b, _)| *b))
        .bind(ids_of(&shares, |(_, n)| *n))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(StartOutcome::default());
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
        .bind(us(params.now))
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
        let mut outcome = StartOutcome::default();
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
            .bind(us(params.now))
            .bind(ResultCode::Cancelled.code())
            .bind(ids_of(&flagged, |(id, _)| *id))
            .execute(&mut *tx)
            .await?;
            outcome.cancelled = flagged.iter().map(|(id, _)| RequestId(*id)).collect();
            outcome.cancelled.sort();
            let buildsets = flagged.iter().map(|(_, bs)| BuildsetId(*bs));
            outcome.buildsets_completed =
                complete_buildsets(&mut tx, buildsets, params.now).await?;
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
        sqlx::query(
            "INSERT INTO builds (number, builder_id, buildrequest_id, master_id, worker_slot, started_at, state_string)
             SELECT (SELECT COALESCE(MAX(number), 0) FROM builds WHERE builder_id = t.builder) + t.k,
                    t.builder, t.request, $5, t.slot, $6, $7
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS t(builder, request, slot, k)",
        )
        .bind(&builders)
        .bind(&requests)
        .bind(&slots)
        .bind(&offsets)
        .bind(params.master_id.0)
        .bind(us(params.now))
        .bind(&params.state_string)
        .execute(&mut *tx)
        .await?;
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

    pub(super) async fn finish_and_settle(
        &self,
        master: MasterId,
        ends: &[BuildEnd],
    ) -> Result<Settled> {
        if ends.is_empty() {
            return Ok(Settled::default());
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
        let mut settled = Settled::default();
        if running.is_empty() {
            tx.rollback().await?;
            settled.refused = ends.iter().map(|e| e.build_id).collect();
            settled.refused.sort();
            return Ok(settled);
        }
        let mine: Vec<&BuildEnd> = ends
            .iter()
            .filter(|e| running.contains(&e.build_id.0))
            .collect();
        sqlx::query(
            "UPDATE builds SET complete_at = t.at, results = t.res, return_value = t.rv, error = t.err,
                               traceback = t.tb, state_string = COALESCE(t.st, builds.state_string)
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[])
                 AS t(id, at, res, rv, err, tb, st)
             WHERE builds.id = t.id",
        )
        .bind(ids_of(&mine, |e| e.build_id.0))
        .bind(ids_of(&mine, |e| us(e.complete_at)))
        .bind(ids_of(&mine, |e| i64::from(e.results.code())))
        .bind(
            mine.iter()
                .map(|e| e.return_value.as_ref().map(|v| v.to_string()))
                .collect::<Vec<_>>(),
        )
        .bind(mine.iter().map(|e| e.error.clone()).collect::<Vec<_>>())
        .bind(mine.iter().map(|e| e.traceback.clone()).collect::<Vec<_>>())
        .bind(mine.iter().map(|e| e.state_string.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        outbox::record_finished(&mut tx, &running.iter().copied().collect::<Vec<_>>()).await?;
        let mut complete = Vec::new();
        let mut release = Vec::new();
        for e in ends {
            if !running.contains(&e.build_id.0) {
                settled.refused.push(e.build_id);
            } else if e.results == ResultCode::Retry {
                release.push(e.request_id.0);
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
            .bind(ids_of(&complete, |e| us(e.complete_at)))
            .bind(ids_of(&complete, |e| i64::from(e.results.code())))
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                settled.completed.push(RequestId(row.try_get("id")?));
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
            if !held.is_empty() {
                listen::notify(&mut tx, &[StoreSignal::Work]).await?;
            }
            settled.released = held.into_iter().map(RequestId).collect();
        }
        let artifacts: Vec<(i64, &kiln_model::Artifact)> = mine
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
