//! The storage conformance suite: every rule of the storage seam, written once and run
//! against every backend. A backend's test file provides a `Harness` factory and calls
//! `conformance_tests!(factory)`, which makes one `#[tokio::test]` per rule.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{Result, anyhow, ensure};
use chrono::TimeDelta;
use kiln_model::{
    BuildId, BuilderId, BuildsetId, LogLevel, LogQuery, LogRecord, MasterId, ProgressNode,
    ProgressReport, Property, ReportKind, RequestId, ResultCode, SourceStamp, Timestamp,
};
use kiln_storage::{
    BuildEnd, BuildFilter, BuildsetFilter, ClaimFilter, ExpireMasters, FinishBuild, NewBuild,
    NewBuildset, ReporterProgress, RequestFilter, RequestOrder, RequestOrderField, StartAvailable,
    StorageError, Store,
};
use kiln_storage::{Filter, FilterValue, Op, Query};
use serde_json::json;

/// A store under test, plus a way to open more connections to the same database (as
/// other processes would).
pub struct Harness {
    pub store: Arc<dyn Store>,
    pub url: String,
    pub keep: Box<dyn std::any::Any + Send>,
}

/// A harness, or none where the backend is not configured (the test then passes
/// without running, after saying why).
pub trait MaybeHarness {
    fn harness(self) -> Option<Harness>;
}

impl MaybeHarness for Harness {
    fn harness(self) -> Option<Harness> {
        Some(self)
    }
}

impl MaybeHarness for Option<Harness> {
    fn harness(self) -> Option<Harness> {
        self
    }
}

impl Harness {
    pub async fn another(&self) -> Result<Arc<dyn Store>> {
        Ok(kiln_storage::open(&self.url).await?)
    }
}

#[macro_export]
macro_rules! conformance_tests {
    ($open:path) => {
        $crate::conformance_tests!(@each $open;
            builders_are_created_once_and_found_by_name,
            identical_sourcestamps_are_stored_once,
            adding_a_buildset_creates_one_request_per_builder,
            a_buildset_with_an_unknown_builder_writes_nothing,
            a_buildset_without_builders_completes_at_once,
            buildset_properties_keep_their_values_and_sources,
            buildsets_list_newest_first_with_filters,
            listing_requests_filters_by_builder_buildset_completeness_and_claim,
            listing_requests_filters_by_branch_and_repository_of_the_stamps,
            listing_requests_orders_limits_and_offsets,
            claiming_is_all_or_nothing,
            claiming_a_request_the_caller_already_holds_fails,
            claiming_an_unknown_request_fails_without_side_effects,
            unclaiming_releases_only_the_callers_own_claims,
            completing_fails_for_the_whole_list_if_any_is_missing_or_complete,
            retry_is_not_a_completion_result,
            the_last_request_to_complete_completes_the_buildset_with_the_worst_result,
            concurrent_claims_from_several_masters_never_claim_a_request_twice,
            build_numbers_are_unique_per_builder_under_concurrent_starts,
            a_build_starts_only_on_a_request_its_master_holds,
            builds_are_found_by_id_by_number_and_by_filters,
            finishing_a_build_records_its_outcome_once_and_only_by_its_master,
            state_strings_are_set_and_lock_durations_accumulate,
            the_previous_successful_build_needs_exact_success_and_the_same_stamps,
            the_latest_successful_build_never_counts_skipped,
            deleting_a_build_removes_its_logs_progress_and_properties,
            build_properties_keep_their_values_and_sources,
            the_latest_progress_report_per_group_wins_and_reads_back_as_a_tree,
            logs_read_back_filtered_by_build_level_and_time_window,
            pruning_logs_removes_old_records_below_a_level,
            masters_register_heartbeat_and_list,
            an_expired_master_loses_its_claims_and_its_builds_end_as_retry,
            a_live_master_is_never_expired,
            registering_a_master_again_takes_back_its_earlier_work,
            deactivating_a_master_releases_its_claims,
            cancelling_completes_unclaimed_requests_and_flags_claimed_ones,
            cancelling_the_last_open_request_completes_the_buildset,
            invalid_input_is_refused_with_typed_errors,
            unknown_ids_are_not_found,
            adding_many_buildsets_is_all_or_nothing_and_keeps_their_order,
            starting_available_work_claims_and_numbers_builds_in_their_slots,
            starting_available_work_completes_cancel_flagged_requests_instead,
            concurrent_starts_from_several_masters_never_start_a_request_twice,
            finishing_and_settling_completes_or_releases_requests_and_refuses_foreign_builds,
            builders_record_their_dependencies,
            the_latest_build_with_given_results_is_found_by_completion_time,
            children_are_found_by_their_parent_request_and_adopted_by_a_new_build,
            cancelling_a_request_cancels_its_waited_for_children_recursively,
            nothing_is_written_to_the_outbox_while_no_reporter_is_registered,
            every_lifecycle_change_writes_its_event_in_the_same_transaction,
            a_new_reporter_starts_at_the_end_of_the_outbox_and_a_known_one_keeps_its_place,
            only_one_master_holds_a_reporters_lease_until_it_runs_out,
            delivery_progress_is_refused_without_the_lease,
            pruning_the_outbox_keeps_what_any_reporter_still_needs,
            collection_queries_filter_order_and_page_in_the_database,
            the_priority_of_an_open_request_can_change,
            an_expired_master_starts_nothing_until_it_registers_again,
            outbox_seqs_are_never_reused_after_the_prune_empties_the_outbox,
            a_reporters_pending_count_is_every_event_past_its_cursor,
            claim_capacity_goes_to_builders_with_queued_work_in_buildbots_order,
            unclaimed_requests_in_collection_queries_exclude_complete_ones,
        );
    };
    (@each $open:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                let Some(harness) = $crate::conformance::MaybeHarness::harness($open().await?) else {
                    return Ok(());
                };
                $crate::conformance::$name(&harness).await
            }
        )*
    };
}

// ---- helpers ----

fn t(seconds: i64) -> Timestamp {
    Timestamp::UNIX_EPOCH + TimeDelta::seconds(1_700_000_000 + seconds)
}

fn stamp(repository: &str, branch: &str, revision: &str) -> SourceStamp {
    SourceStamp {
        codebase: String::new(),
        repository: repository.into(),
        branch: Some(branch.into()),
        revision: Some(revision.into()),
        project: "kiln".into(),
    }
}

async fn builders(store: &dyn Store, names: &[&str]) -> Result<Vec<BuilderId>> {
    let mut ids = Vec::new();
    for name in names {
        ids.push(store.builder_ensure(name, None).await?);
    }
    Ok(ids)
}

async fn buildset(
    store: &dyn Store,
    builders: &[BuilderId],
    at: Timestamp,
) -> Result<(BuildsetId, Vec<RequestId>)> {
    buildset_with(
        store,
        NewBuildset {
            builder_ids: builders.to_vec(),
            submitted_at: at,
            ..NewBuildset::default()
        },
    )
    .await
}

async fn buildset_with(
    store: &dyn Store,
    params: NewBuildset,
) -> Result<(BuildsetId, Vec<RequestId>)> {
    let order = params.builder_ids.clone();
    let added = store
        .buildset_add(&NewBuildset {
            reason: "test".into(),
            ..params
        })
        .await?;
    let requests = order.iter().map(|b| added.requests[b]).collect();
    Ok((added.buildset_id, requests))
}

async fn master(store: &dyn Store, name: &str) -> Result<MasterId> {
    Ok(store.master_register(name, t(0)).await?.master_id)
}

async fn start(
    store: &dyn Store,
    request: RequestId,
    master: MasterId,
) -> Result<kiln_model::Build> {
    Ok(store
        .build_add(&NewBuild {
            request_id: request,
            master_id: master,
            worker_slot: Some(0),
            state_string: "starting".into(),
            started_at: t(10),
        })
        .await?)
}

fn finish(build: BuildId, master: MasterId, results: ResultCode, at: Timestamp) -> FinishBuild {
    FinishBuild {
        build_id: build,
        master_id: master,
        results,
        return_value: None,
        error: None,
        traceback: None,
        state_string: None,
        complete_at: at,
    }
}

/// Submits, claims, builds and finishes one request; returns the build.
async fn built(
    store: &dyn Store,
    builder: BuilderId,
    master: MasterId,
    stamps: Vec<SourceStamp>,
    results: ResultCode,
    at: Timestamp,
) -> Result<kiln_model::Build> {
    let (_, requests) = buildset_with(
        store,
        NewBuildset {
            builder_ids: vec![builder],
            sourcestamps: stamps,
            submitted_at: at,
            ..NewBuildset::default()
        },
    )
    .await?;
    store.request_claim(&requests, master, at).await?;
    let build = start(store, requests[0], master).await?;
    store
        .build_finish(&finish(build.id, master, results, at))
        .await?;
    Ok(store.build_get(build.id).await?)
}

fn ids(requests: &[kiln_model::BuildRequest]) -> Vec<RequestId> {
    requests.iter().map(|r| r.id).collect()
}

fn unclaimed() -> RequestFilter {
    RequestFilter {
        claimed: ClaimFilter::Unclaimed,
        ..RequestFilter::default()
    }
}

// ---- builders, sourcestamps, buildsets ----

pub async fn builders_are_created_once_and_found_by_name(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let a = s.builder_ensure("compile", Some("compiles")).await?;
    let again = s.builder_ensure("compile", None).await?;
    ensure!(a == again, "ensuring an existing builder returns its id");
    let found = s
        .builder_get_by_name("compile")
        .await?
        .ok_or_else(|| anyhow!("builder not found"))?;
    ensure!(
        found.description.as_deref() == Some("compiles"),
        "a missing description keeps the old one"
    );
    ensure!(s.builder_get_by_name("nope").await?.is_none());
    s.builder_ensure("alpha", None).await?;
    let names: Vec<String> = s
        .builder_list()
        .await?
        .into_iter()
        .map(|b| b.name)
        .collect();
    ensure!(
        names == ["alpha", "compile"],
        "builders list by name: {names:?}"
    );
    Ok(())
}

pub async fn identical_sourcestamps_are_stored_once(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["b"]).await?;
    let same = stamp("https://git/x", "main", "abc");
    let other = stamp("https://git/x", "main", "def");
    let (one, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![same.clone()],
            ..NewBuildset::default()
        },
    )
    .await?;
    let (two, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![other.clone(), same.clone(), same.clone()],
            ..NewBuildset::default()
        },
    )
    .await?;
    let ids_one = s.buildset_sourcestamp_ids(one).await?;
    let ids_two = s.buildset_sourcestamp_ids(two).await?;
    ensure!(
        ids_one.len() == 1 && ids_two.len() == 2,
        "{ids_one:?} {ids_two:?}"
    );
    ensure!(
        ids_two.contains(&ids_one[0]),
        "the identical stamp is shared"
    );
    let mut expected = vec![same, other];
    expected.sort();
    ensure!(s.buildset_sourcestamps(two).await? == expected);
    // A stamp without branch or revision keeps them absent.
    let bare = SourceStamp {
        repository: "r".into(),
        ..SourceStamp::default()
    };
    let (three, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b,
            sourcestamps: vec![bare.clone()],
            ..NewBuildset::default()
        },
    )
    .await?;
    ensure!(s.buildset_sourcestamps(three).await? == vec![bare]);
    Ok(())
}

pub async fn adding_a_buildset_creates_one_request_per_builder(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let added = s
        .buildset_add(&NewBuildset {
            reason: "push".into(),
            external_idstring: Some("ext-1".into()),
            builder_ids: b.clone(),
            priority: 5,
            waited_for: true,
            submitted_at: t(1),
            ..NewBuildset::default()
        })
        .await?;
    ensure!(
        added.requests.keys().copied().collect::<Vec<_>>() == b,
        "one request per builder"
    );
    let bs = s.buildset_get(added.buildset_id).await?;
    ensure!(bs.reason == "push" && bs.external_idstring.as_deref() == Some("ext-1"));
    ensure!(
        !bs.complete && bs.results.is_none() && bs.complete_at.is_none() && bs.submitted_at == t(1)
    );
    for (builder, request) in &added.requests {
        let r = s.request_get(*request).await?;
        ensure!(r.builder_id == *builder && r.buildset_id == added.buildset_id);
        ensure!(
            r.priority == 5
                && r.waited_for
                && !r.complete
                && r.claimed_by.is_none()
                && r.submitted_at == t(1)
        );
    }
    Ok(())
}

pub async fn a_buildset_with_an_unknown_builder_writes_nothing(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let mut b = builders(s, &["a"]).await?;
    b.push(BuilderId(9_999));
    let err = s
        .buildset_add(&NewBuildset {
            builder_ids: b,
            sourcestamps: vec![stamp("r", "m", "1")],
            ..NewBuildset::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("an unknown builder was accepted"))?;
    ensure!(matches!(err, StorageError::UnknownBuilder(_)), "{err}");
    ensure!(
        s.buildset_list(&BuildsetFilter::default())
            .await?
            .is_empty(),
        "no buildset was written"
    );
    ensure!(
        s.request_list(&RequestFilter::default()).await?.is_empty(),
        "no request was written"
    );
    Ok(())
}

pub async fn a_buildset_without_builders_completes_at_once(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let (id, requests) = buildset(s, &[], t(3)).await?;
    ensure!(requests.is_empty());
    let bs = s.buildset_get(id).await?;
    ensure!(
        bs.complete && bs.results == Some(ResultCode::Success) && bs.complete_at == Some(t(3)),
        "{bs:?}"
    );
    Ok(())
}

pub async fn buildset_properties_keep_their_values_and_sources(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let mut properties = BTreeMap::new();
    properties.insert("n".to_string(), Property::new(json!(3), "submit"));
    properties.insert(
        "deep".to_string(),
        Property::new(json!({"a": [1, null, "x"]}), "scheduler"),
    );
    let (id, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b,
            properties: properties.clone(),
            ..NewBuildset::default()
        },
    )
    .await?;
    ensure!(s.buildset_properties(id).await? == properties);
    Ok(())
}

pub async fn buildsets_list_newest_first_with_filters(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (first, _) = buildset(s, &b, t(1)).await?;
    let (second, _) = buildset(s, &[], t(2)).await?;
    let (third, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b,
            external_idstring: Some("x".into()),
            ..NewBuildset::default()
        },
    )
    .await?;
    let all: Vec<BuildsetId> = s
        .buildset_list(&BuildsetFilter::default())
        .await?
        .iter()
        .map(|b| b.id)
        .collect();
    ensure!(all == [third, second, first], "{all:?}");
    let complete: Vec<BuildsetId> = s
        .buildset_list(&BuildsetFilter {
            complete: Some(true),
            ..Default::default()
        })
        .await?
        .iter()
        .map(|b| b.id)
        .collect();
    ensure!(complete == [second]);
    let ext = s
        .buildset_list(&BuildsetFilter {
            external_idstring: Some("x".into()),
            ..Default::default()
        })
        .await?;
    ensure!(ext.len() == 1 && ext[0].id == third);
    let page = s
        .buildset_list(&BuildsetFilter {
            limit: Some(1),
            offset: Some(1),
            ..Default::default()
        })
        .await?;
    ensure!(page.len() == 1 && page[0].id == second);
    Ok(())
}

// ---- requests: listing ----

pub async fn listing_requests_filters_by_builder_buildset_completeness_and_claim(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let (bs1, r1) = buildset(s, &b, t(1)).await?;
    let (_, r2) = buildset(s, &b, t(2)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&[r1[0]], m1, t(3)).await?;
    s.request_claim(&[r2[0]], m2, t(3)).await?;
    s.request_claim(&[r1[1]], m1, t(3)).await?;
    s.request_complete(&[r1[1]], ResultCode::Success, t(4))
        .await?;

    let by_builder = s
        .request_list(&RequestFilter {
            builder_id: Some(b[0]),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&by_builder) == [r1[0], r2[0]]);
    let by_buildset = s
        .request_list(&RequestFilter {
            buildset_id: Some(bs1),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&by_buildset) == r1);
    let complete = s
        .request_list(&RequestFilter {
            complete: Some(true),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&complete) == [r1[1]]);
    let incomplete = s
        .request_list(&RequestFilter {
            complete: Some(false),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&incomplete) == [r1[0], r2[0], r2[1]]);
    let claimed = s
        .request_list(&RequestFilter {
            claimed: ClaimFilter::Claimed,
            ..Default::default()
        })
        .await?;
    ensure!(
        ids(&claimed) == [r1[0], r1[1], r2[0]],
        "a completed request keeps its claim: {:?}",
        ids(&claimed)
    );
    ensure!(
        ids(&s.request_list(&unclaimed()).await?) == [r2[1]],
        "unclaimed means no claim and not complete"
    );
    let mine = s
        .request_list(&RequestFilter {
            claimed: ClaimFilter::ClaimedBy(m1),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&mine) == [r1[0], r1[1]]);
    ensure!(mine[0].claimed_by == Some(m1) && mine[0].claimed_at == Some(t(3)));
    let both = s
        .request_list(&RequestFilter {
            builder_id: Some(b[0]),
            claimed: ClaimFilter::ClaimedBy(m2),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&both) == [r2[0]]);
    Ok(())
}

pub async fn listing_requests_filters_by_branch_and_repository_of_the_stamps(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, main_x) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![stamp("x", "main", "1")],
            ..Default::default()
        },
    )
    .await?;
    let (_, dev_x) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![stamp("x", "dev", "2")],
            ..Default::default()
        },
    )
    .await?;
    let (_, main_y) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![stamp("y", "main", "3")],
            ..Default::default()
        },
    )
    .await?;
    let main = s
        .request_list(&RequestFilter {
            branch: Some("main".into()),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&main) == [main_x[0], main_y[0]]);
    let x = s
        .request_list(&RequestFilter {
            repository: Some("x".into()),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&x) == [main_x[0], dev_x[0]]);
    let both = s
        .request_list(&RequestFilter {
            repository: Some("x".into()),
            branch: Some("dev".into()),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&both) == [dev_x[0]]);
    ensure!(
        s.request_list(&RequestFilter {
            branch: Some("none".into()),
            ..Default::default()
        })
        .await?
        .is_empty()
    );
    Ok(())
}

pub async fn listing_requests_orders_limits_and_offsets(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let mut made = Vec::new();
    for (i, priority) in [0, 10, 5, 10].into_iter().enumerate() {
        let (_, r) = buildset_with(
            s,
            NewBuildset {
                builder_ids: b.clone(),
                priority,
                submitted_at: t(10 - i as i64),
                ..Default::default()
            },
        )
        .await?;
        made.push(r[0]);
    }
    let by = |field, descending| RequestOrder { field, descending };
    let ordered = s
        .request_list(&RequestFilter {
            order: vec![
                by(RequestOrderField::Priority, true),
                by(RequestOrderField::SubmittedAt, false),
            ],
            ..Default::default()
        })
        .await?;
    ensure!(
        ids(&ordered) == [made[3], made[1], made[2], made[0]],
        "{:?}",
        ids(&ordered)
    );
    let desc = s
        .request_list(&RequestFilter {
            order: vec![by(RequestOrderField::Id, true)],
            ..Default::default()
        })
        .await?;
    ensure!(ids(&desc) == [made[3], made[2], made[1], made[0]]);
    let page = s
        .request_list(&RequestFilter {
            limit: Some(2),
            offset: Some(1),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&page) == [made[1], made[2]]);
    let tail = s
        .request_list(&RequestFilter {
            offset: Some(3),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&tail) == [made[3]]);
    Ok(())
}

// ---- requests: claims and completion ----

pub async fn claiming_is_all_or_nothing(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&[r[1]], m1, t(2)).await?;
    let err = s
        .request_claim(&r, m2, t(3))
        .await
        .err()
        .ok_or_else(|| anyhow!("claimed a held request"))?;
    match err {
        StorageError::AlreadyClaimed(taken) => ensure!(taken == [r[1]], "{taken:?}"),
        other => return Err(anyhow!("expected AlreadyClaimed, got {other}")),
    }
    let after = s
        .request_list(&RequestFilter {
            claimed: ClaimFilter::ClaimedBy(m2),
            ..Default::default()
        })
        .await?;
    ensure!(after.is_empty(), "nothing was claimed by the losing master");
    ensure!(
        s.request_get(r[1]).await?.claimed_by == Some(m1),
        "the existing claim is untouched"
    );
    s.request_claim(&[r[0], r[2]], m2, t(4)).await?;
    ensure!(
        ids(&s
            .request_list(&RequestFilter {
                claimed: ClaimFilter::ClaimedBy(m2),
                ..Default::default()
            })
            .await?)
            == [r[0], r[2]]
    );
    Ok(())
}

pub async fn claiming_a_request_the_caller_already_holds_fails(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&[r[0]], m, t(2)).await?;
    let err = s
        .request_claim(&r, m, t(3))
        .await
        .err()
        .ok_or_else(|| anyhow!("re-claim succeeded"))?;
    ensure!(
        matches!(err, StorageError::AlreadyClaimed(ref v) if v == &[r[0]]),
        "{err}"
    );
    ensure!(
        s.request_get(r[1]).await?.claimed_by.is_none(),
        "the free request stayed free"
    );
    // A complete request cannot be claimed either.
    s.request_complete(&[r[0]], ResultCode::Success, t(4))
        .await?;
    s.request_unclaim(&[r[0]], m).await?;
    ensure!(matches!(
        s.request_claim(&[r[0]], m, t(5)).await,
        Err(StorageError::AlreadyClaimed(_))
    ));
    Ok(())
}

pub async fn claiming_an_unknown_request_fails_without_side_effects(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m = master(s, "m").await?;
    let err = s
        .request_claim(&[r[0], RequestId(424_242)], m, t(2))
        .await
        .err()
        .ok_or_else(|| anyhow!("claimed a ghost"))?;
    ensure!(matches!(err, StorageError::NotFound { .. }), "{err}");
    ensure!(s.request_get(r[0]).await?.claimed_by.is_none());
    Ok(())
}

pub async fn unclaiming_releases_only_the_callers_own_claims(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&[r[0], r[2]], m1, t(2)).await?;
    s.request_claim(&[r[1]], m2, t(2)).await?;
    s.request_complete(&[r[2]], ResultCode::Success, t(3))
        .await?;
    s.request_unclaim(&[r[0], r[1], r[2], RequestId(777_777)], m1)
        .await?;
    ensure!(
        s.request_get(r[0]).await?.claimed_by.is_none(),
        "own claim released"
    );
    ensure!(
        s.request_get(r[1]).await?.claimed_by == Some(m2),
        "another master's claim untouched"
    );
    ensure!(
        s.request_get(r[2]).await?.claimed_by == Some(m1),
        "a complete request keeps its claim"
    );
    Ok(())
}

pub async fn completing_fails_for_the_whole_list_if_any_is_missing_or_complete(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, m, t(2)).await?;
    s.request_complete(&[r[0]], ResultCode::Success, t(3))
        .await?;
    let err = s
        .request_complete(&[r[0], r[1]], ResultCode::Failure, t(4))
        .await
        .err()
        .ok_or_else(|| anyhow!("completed twice"))?;
    ensure!(
        matches!(err, StorageError::NotClaimed(ref v) if v == &[r[0]]),
        "{err}"
    );
    ensure!(
        !s.request_get(r[1]).await?.complete,
        "nothing else completed"
    );
    let err = s
        .request_complete(&[r[1], RequestId(55_555)], ResultCode::Failure, t(4))
        .await
        .err()
        .ok_or_else(|| anyhow!("completed a ghost"))?;
    ensure!(
        matches!(err, StorageError::NotClaimed(ref v) if v == &[RequestId(55_555)]),
        "{err}"
    );
    ensure!(!s.request_get(r[1]).await?.complete);
    s.request_complete(&[r[1], r[2]], ResultCode::Warnings, t(5))
        .await?;
    let done = s.request_get(r[2]).await?;
    ensure!(
        done.complete
            && done.results == Some(ResultCode::Warnings)
            && done.complete_at == Some(t(5))
    );
    Ok(())
}

pub async fn retry_is_not_a_completion_result(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    ensure!(matches!(
        s.request_complete(&r, ResultCode::Retry, t(2)).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(!s.request_get(r[0]).await?.complete);
    Ok(())
}

pub async fn the_last_request_to_complete_completes_the_buildset_with_the_worst_result(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let cases = [
        (
            [
                ResultCode::Success,
                ResultCode::Skipped,
                ResultCode::Success,
            ],
            ResultCode::Success,
        ),
        (
            [
                ResultCode::Warnings,
                ResultCode::Success,
                ResultCode::Skipped,
            ],
            ResultCode::Warnings,
        ),
        (
            [
                ResultCode::Failure,
                ResultCode::Exception,
                ResultCode::Warnings,
            ],
            ResultCode::Exception,
        ),
        (
            [
                ResultCode::Cancelled,
                ResultCode::Exception,
                ResultCode::Failure,
            ],
            ResultCode::Cancelled,
        ),
        (
            [
                ResultCode::Skipped,
                ResultCode::Skipped,
                ResultCode::Skipped,
            ],
            ResultCode::Skipped,
        ),
    ];
    let m = master(s, "m").await?;
    for (results, worst) in cases {
        let (bs, r) = buildset(s, &b, t(1)).await?;
        s.request_claim(&r, m, t(2)).await?;
        let first = s.request_complete(&[r[0]], results[0], t(3)).await?;
        let second = s.request_complete(&[r[1]], results[1], t(4)).await?;
        ensure!(first.is_empty() && second.is_empty() && !s.buildset_get(bs).await?.complete);
        let last = s.request_complete(&[r[2]], results[2], t(5)).await?;
        ensure!(
            last.len() == 1 && last[0].buildset_id == bs && last[0].results == worst,
            "{results:?}: {last:?}"
        );
        let done = s.buildset_get(bs).await?;
        ensure!(done.complete && done.results == Some(worst) && done.complete_at == Some(t(5)));
    }
    Ok(())
}

pub async fn concurrent_claims_from_several_masters_never_claim_a_request_twice(
    h: &Harness,
) -> Result<()> {
    const MASTERS: usize = 4;
    const REQUESTS: usize = 300;
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    for i in 0..REQUESTS / 2 {
        buildset(s, &b, t(i as i64)).await?;
    }
    let all: Vec<RequestId> = ids(&s.request_list(&RequestFilter::default()).await?);
    let mut tasks = Vec::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(MASTERS));
    for n in 0..MASTERS {
        // Each master has its own connection pool, as a separate process would.
        let store = h.another().await?;
        let m = master(&*store, &format!("m{n}")).await?;
        let all = all.clone();
        let b = b.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            // Everyone starts together, so the claims really overlap.
            barrier.wait().await;
            let mut mine: Vec<RequestId> = Vec::new();
            let mut round = 0usize;
            loop {
                round += 1;
                // Alternate between both claim paths: explicit lists, and the scheduler's
                // claim-and-start of available work.
                let got = if round.is_multiple_of(2) {
                    let pick: Vec<RequestId> = all
                        .iter()
                        .skip((round * 7 + n * 13) % all.len())
                        .take(3)
                        .copied()
                        .collect();
                    match store.request_claim(&pick, m, t(0)).await {
                        Ok(()) => pick,
                        Err(StorageError::AlreadyClaimed(_)) => Vec::new(),
                        Err(e) => return Err(anyhow!(e)),
                    }
                } else {
                    let got = store
                        .build_start_available(&start_all(
                            m,
                            vec![(b[0], vec![0, 1]), (b[1], vec![0, 1])],
                            t(0),
                        ))
                        .await?;
                    if got.started.is_empty() {
                        return Ok(mine);
                    }
                    got.started.iter().map(|s| s.request.id).collect()
                };
                mine.extend(got);
            }
        }));
    }
    let mut seen = BTreeSet::new();
    for task in tasks {
        let mine = task.await??;
        for id in mine {
            ensure!(seen.insert(id), "request {id} was claimed twice");
        }
    }
    ensure!(
        seen.len() == REQUESTS,
        "every request claimed once: {} of {REQUESTS}",
        seen.len()
    );
    ensure!(s.request_list(&unclaimed()).await?.is_empty());
    Ok(())
}

// ---- builds ----

pub async fn build_numbers_are_unique_per_builder_under_concurrent_starts(
    h: &Harness,
) -> Result<()> {
    const BUILDS: usize = 40;
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    let mut requests = Vec::new();
    for i in 0..BUILDS / 2 {
        let (_, r) = buildset(s, &b, t(i as i64)).await?;
        requests.extend(r);
    }
    s.request_claim(&requests, m, t(0)).await?;
    let mut tasks = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let store = if i % 2 == 0 {
            h.store.clone()
        } else {
            h.another().await?
        };
        let request = *request;
        tasks.push(tokio::spawn(
            async move { start(&*store, request, m).await },
        ));
    }
    let mut numbers: BTreeMap<BuilderId, Vec<i64>> = BTreeMap::new();
    for task in tasks {
        let build = task.await??;
        numbers
            .entry(build.builder_id)
            .or_default()
            .push(build.number);
    }
    for (builder, mut n) in numbers {
        n.sort();
        ensure!(
            n == (1..=(BUILDS / 2) as i64).collect::<Vec<_>>(),
            "builder {builder}: {n:?}"
        );
    }
    Ok(())
}

pub async fn a_build_starts_only_on_a_request_its_master_holds(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    ensure!(matches!(
        start(s, r[0], m1)
            .await
            .map_err(|e| e.downcast::<StorageError>()),
        Err(Ok(StorageError::ClaimLost { .. }))
    ));
    s.request_claim(&r, m1, t(2)).await?;
    ensure!(matches!(
        start(s, r[0], m2)
            .await
            .map_err(|e| e.downcast::<StorageError>()),
        Err(Ok(StorageError::ClaimLost { .. }))
    ));
    let build = start(s, r[0], m1).await?;
    ensure!(
        build.number == 1
            && build.master_id == m1
            && build.request_id == r[0]
            && build.worker_slot == Some(0)
    );
    ensure!(build.state_string == "starting" && build.started_at == t(10) && !build.is_complete());
    Ok(())
}

pub async fn builds_are_found_by_id_by_number_and_by_filters(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    let one = built(s, b[0], m, vec![], ResultCode::Success, t(1)).await?;
    let two = built(s, b[1], m, vec![], ResultCode::Failure, t(2)).await?;
    let (bs3, r3) = buildset(s, &[b[0]], t(3)).await?;
    s.request_claim(&r3, m, t(3)).await?;
    let three = start(s, r3[0], m).await?;
    ensure!(s.build_get(one.id).await? == one);
    ensure!(s.build_get_by_number(b[0], 2).await?.id == three.id);
    ensure!(matches!(
        s.build_get_by_number(b[1], 2).await,
        Err(StorageError::NotFound { .. })
    ));
    let list = |f: BuildFilter| async move {
        s.build_list(&f)
            .await
            .map(|v| v.iter().map(|b| b.id).collect::<Vec<_>>())
    };
    ensure!(list(BuildFilter::default()).await? == [one.id, two.id, three.id]);
    ensure!(
        list(BuildFilter {
            builder_id: Some(b[0]),
            ..Default::default()
        })
        .await?
            == [one.id, three.id]
    );
    ensure!(
        list(BuildFilter {
            request_id: Some(r3[0]),
            ..Default::default()
        })
        .await?
            == [three.id]
    );
    ensure!(
        list(BuildFilter {
            buildset_id: Some(bs3),
            ..Default::default()
        })
        .await?
            == [three.id]
    );
    ensure!(
        list(BuildFilter {
            complete: Some(true),
            ..Default::default()
        })
        .await?
            == [one.id, two.id]
    );
    ensure!(
        list(BuildFilter {
            complete: Some(false),
            ..Default::default()
        })
        .await?
            == [three.id]
    );
    ensure!(
        list(BuildFilter {
            descending: true,
            limit: Some(2),
            ..Default::default()
        })
        .await?
            == [three.id, two.id]
    );
    Ok(())
}

pub async fn finishing_a_build_records_its_outcome_once_and_only_by_its_master(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&r, m1, t(2)).await?;
    let build = start(s, r[0], m1).await?;
    let outcome = FinishBuild {
        return_value: Some(json!({"artifacts": ["a.tar"], "n": 1.5})),
        error: Some("boom".into()),
        traceback: Some("at step 2".into()),
        state_string: Some("failed: boom".into()),
        ..finish(build.id, m1, ResultCode::Failure, t(20))
    };
    let err = s
        .build_finish(&FinishBuild {
            master_id: m2,
            ..outcome.clone()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("foreign finish"))?;
    ensure!(matches!(err, StorageError::NotOwner { .. }), "{err}");
    s.build_finish(&outcome).await?;
    let done = s.build_get(build.id).await?;
    ensure!(done.results == Some(ResultCode::Failure) && done.complete_at == Some(t(20)));
    ensure!(done.return_value == outcome.return_value && done.error.as_deref() == Some("boom"));
    ensure!(done.traceback.as_deref() == Some("at step 2") && done.state_string == "failed: boom");
    let again = s
        .build_finish(&finish(build.id, m1, ResultCode::Success, t(30)))
        .await;
    ensure!(
        matches!(again, Err(StorageError::NotOwner { .. })),
        "a finished build cannot finish again"
    );
    ensure!(s.build_get(build.id).await?.results == Some(ResultCode::Failure));
    Ok(())
}

pub async fn state_strings_are_set_and_lock_durations_accumulate(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, m, t(2)).await?;
    let build = start(s, r[0], m).await?;
    s.build_set_state(build.id, "compiling 3/4").await?;
    s.build_add_locks_duration(build.id, 1.5).await?;
    s.build_add_locks_duration(build.id, 2.25).await?;
    let now = s.build_get(build.id).await?;
    ensure!(now.state_string == "compiling 3/4" && (now.locks_duration_s - 3.75).abs() < 1e-9);
    ensure!(matches!(
        s.build_add_locks_duration(build.id, -1.0).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.build_set_state(BuildId(99_999), "x").await,
        Err(StorageError::NotFound { .. })
    ));
    s.build_finish(&finish(build.id, m, ResultCode::Success, t(3)))
        .await?;
    ensure!(
        s.build_get(build.id).await?.state_string == "compiling 3/4",
        "finishing without a final state keeps the last one"
    );
    Ok(())
}

pub async fn the_previous_successful_build_needs_exact_success_and_the_same_stamps(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    let x = stamp("r", "main", "1");
    let y = stamp("r2", "main", "9");
    let ok_xy = built(
        s,
        b[0],
        m,
        vec![x.clone(), y.clone()],
        ResultCode::Success,
        t(1),
    )
    .await?;
    let _ok_x = built(s, b[0], m, vec![x.clone()], ResultCode::Success, t(2)).await?;
    let _warn = built(
        s,
        b[0],
        m,
        vec![y.clone(), x.clone()],
        ResultCode::Warnings,
        t(3),
    )
    .await?;
    let _other_builder = built(
        s,
        b[1],
        m,
        vec![x.clone(), y.clone()],
        ResultCode::Success,
        t(4),
    )
    .await?;
    let current = built(
        s,
        b[0],
        m,
        vec![y.clone(), x.clone()],
        ResultCode::Failure,
        t(5),
    )
    .await?;
    let prev = s.build_previous_successful(current.id).await?;
    ensure!(prev.as_ref().map(|p| p.id) == Some(ok_xy.id), "{prev:?}");
    ensure!(
        s.build_previous_successful(ok_xy.id).await?.is_none(),
        "nothing before the first"
    );
    let z_only = built(
        s,
        b[0],
        m,
        vec![stamp("z", "main", "1")],
        ResultCode::Success,
        t(6),
    )
    .await?;
    ensure!(
        s.build_previous_successful(z_only.id).await?.is_none(),
        "different stamps never match"
    );
    Ok(())
}

pub async fn the_latest_successful_build_never_counts_skipped(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    ensure!(s.build_latest_successful(b[0]).await?.is_none());
    let ok = built(s, b[0], m, vec![], ResultCode::Success, t(1)).await?;
    let warn = built(s, b[0], m, vec![], ResultCode::Warnings, t(2)).await?;
    built(s, b[0], m, vec![], ResultCode::Skipped, t(3)).await?;
    built(s, b[0], m, vec![], ResultCode::Failure, t(4)).await?;
    let latest = s.build_latest_successful(b[0]).await?.map(|b| b.id);
    ensure!(
        latest == Some(warn.id),
        "WARNINGS counts, SKIPPED and FAILURE do not: {latest:?} (ok was {})",
        ok.id
    );
    built(s, b[1], m, vec![], ResultCode::Skipped, t(5)).await?;
    ensure!(s.build_latest_successful(b[1]).await?.is_none());
    Ok(())
}

pub async fn deleting_a_build_removes_its_logs_progress_and_properties(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    s.request_claim(&r, m, t(1)).await?;
    let build = start(s, r[0], m).await?;
    s.log_append(
        build.id,
        &[LogRecord {
            at: t(1),
            level: LogLevel::Info,
            message: "hi".into(),
            fields: Default::default(),
        }],
    )
    .await?;
    s.progress_report(
        build.id,
        &ProgressReport {
            group: vec!["x".into()],
            current: 1,
            total: 2,
            status: "".into(),
        },
        t(1),
    )
    .await?;
    s.build_set_property(build.id, "p", &Property::new(json!(1), "job"))
        .await?;
    ensure!(
        matches!(
            s.build_delete(build.id).await,
            Err(StorageError::Invalid(_))
        ),
        "a running build is not deleted"
    );
    s.build_finish(&finish(build.id, m, ResultCode::Success, t(2)))
        .await?;
    let keep = built(s, b[0], m, vec![], ResultCode::Success, t(3)).await?;
    s.log_append(
        keep.id,
        &[LogRecord {
            at: t(3),
            level: LogLevel::Info,
            message: "kept".into(),
            fields: Default::default(),
        }],
    )
    .await?;
    s.build_delete(build.id).await?;
    ensure!(matches!(
        s.build_get(build.id).await,
        Err(StorageError::NotFound { .. })
    ));
    ensure!(
        s.log_list(&LogQuery {
            build_id: Some(build.id),
            ..Default::default()
        })
        .await?
        .is_empty()
    );
    ensure!(s.progress_list(build.id).await?.is_empty());
    ensure!(
        s.log_list(&LogQuery::default()).await?.len() == 1,
        "other builds' logs stay"
    );
    ensure!(
        s.request_get(r[0]).await?.claimed_by == Some(m),
        "the request is untouched"
    );
    Ok(())
}

pub async fn build_properties_keep_their_values_and_sources(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let build = built(s, b[0], m, vec![], ResultCode::Success, t(1)).await?;
    s.build_set_property(build.id, "v", &Property::new(json!("1.0"), "job"))
        .await?;
    s.build_set_property(build.id, "v", &Property::new(json!({"major": 2}), "later"))
        .await?;
    s.build_set_property(build.id, "n", &Property::new(json!(null), "job"))
        .await?;
    let props = s.build_properties(build.id).await?;
    ensure!(
        props.len() == 2
            && props["v"] == Property::new(json!({"major": 2}), "later")
            && props["n"].value.is_null()
    );
    ensure!(matches!(
        s.build_set_property(BuildId(99_999), "x", &Property::new(json!(1), "s"))
            .await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

// ---- progress and logs ----

pub async fn the_latest_progress_report_per_group_wins_and_reads_back_as_a_tree(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let build = built(s, b[0], m, vec![], ResultCode::Success, t(1)).await?;
    let report = |g: &[&str], current, total, status: &str| ProgressReport {
        group: g.iter().map(|x| x.to_string()).collect(),
        current,
        total,
        status: status.into(),
    };
    s.progress_report(build.id, &report(&["compile", "a"], 1, 10, "a 1"), t(1))
        .await?;
    s.progress_report(build.id, &report(&["compile", "b"], 2, 5, "b 2"), t(2))
        .await?;
    s.progress_report(build.id, &report(&["test"], 0, 3, "t"), t(3))
        .await?;
    s.progress_report(build.id, &report(&["compile", "a"], 7, 10, "a 7"), t(4))
        .await?;
    let records = s.progress_list(build.id).await?;
    ensure!(records.len() == 3, "one record per group");
    ensure!(
        records[0].report == report(&["compile", "a"], 7, 10, "a 7")
            && records[0].updated_at == t(4),
        "latest wins, first order kept"
    );
    let tree = ProgressNode::tree(&records);
    ensure!((tree.current, tree.total) == (9, 18), "{tree:?}");
    ensure!(
        tree.children[0].name == "compile"
            && (tree.children[0].current, tree.children[0].total) == (9, 15)
    );
    ensure!(tree.children[0].children[0].status.as_deref() == Some("a 7"));
    ensure!(matches!(
        s.progress_report(build.id, &report(&["", "x"], 1, 1, ""), t(5))
            .await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.progress_report(BuildId(99_999), &report(&["x"], 1, 1, ""), t(5))
            .await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn logs_read_back_filtered_by_build_level_and_time_window(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let one = built(s, b[0], m, vec![], ResultCode::Success, t(1)).await?;
    let two = built(s, b[0], m, vec![], ResultCode::Success, t(1)).await?;
    let rec = |at, level, message: &str| {
        let mut fields = serde_json::Map::new();
        fields.insert("step".into(), json!(message));
        LogRecord {
            at: t(at),
            level,
            message: message.into(),
            fields,
        }
    };
    s.log_append(
        one.id,
        &[
            rec(1, LogLevel::Debug, "d"),
            rec(2, LogLevel::Info, "i"),
            rec(3, LogLevel::Warning, "w"),
        ],
    )
    .await?;
    s.log_append(two.id, &[rec(2, LogLevel::Error, "e")])
        .await?;
    s.log_append(one.id, &[rec(4, LogLevel::Critical, "c")])
        .await?;
    let messages = |q: LogQuery| async move {
        s.log_list(&q)
            .await
            .map(|v| v.into_iter().map(|e| e.record.message).collect::<Vec<_>>())
    };
    ensure!(
        messages(LogQuery {
            build_id: Some(one.id),
            ..Default::default()
        })
        .await?
            == ["d", "i", "w", "c"]
    );
    ensure!(
        messages(LogQuery {
            build_id: Some(one.id),
            min_level: Some(LogLevel::Warning),
            ..Default::default()
        })
        .await?
            == ["w", "c"]
    );
    ensure!(
        messages(LogQuery {
            since: Some(t(2)),
            until: Some(t(4)),
            ..Default::default()
        })
        .await?
            == ["i", "w", "e"]
    );
    ensure!(
        messages(LogQuery {
            limit: Some(2),
            ..Default::default()
        })
        .await?
            == ["d", "i"]
    );
    let all = s.log_list(&LogQuery::default()).await?;
    ensure!(
        all[0].record.fields["step"] == json!("d")
            && all[0].record.at == t(1)
            && all[0].build_id == one.id
    );
    let after = messages(LogQuery {
        after_id: Some(all[2].id),
        ..Default::default()
    })
    .await?;
    ensure!(after == ["e", "c"], "tailing after an id: {after:?}");
    ensure!(matches!(
        s.log_append(BuildId(99_999), &[rec(1, LogLevel::Info, "x")])
            .await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn pruning_logs_removes_old_records_below_a_level(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let build = built(s, b[0], m, vec![], ResultCode::Success, t(1)).await?;
    let rec = |at, level| LogRecord {
        at: t(at),
        level,
        message: format!("{level}@{at}"),
        fields: Default::default(),
    };
    s.log_append(
        build.id,
        &[
            rec(1, LogLevel::Debug),
            rec(1, LogLevel::Warning),
            rec(1, LogLevel::Error),
            rec(9, LogLevel::Debug),
        ],
    )
    .await?;
    let gone = s.log_prune(t(5), LogLevel::Error).await?;
    ensure!(gone == 2, "old debug and warning went: {gone}");
    let left: Vec<String> = s
        .log_list(&LogQuery::default())
        .await?
        .into_iter()
        .map(|e| e.record.message)
        .collect();
    ensure!(left == ["error@1", "debug@9"], "{left:?}");
    Ok(())
}

// ---- masters ----

pub async fn masters_register_heartbeat_and_list(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let a = s.master_register("a", t(1)).await?;
    ensure!(a.released.is_empty() && a.retried_builds.is_empty());
    let b = master(s, "b").await?;
    s.master_heartbeat(a.master_id, t(7)).await?;
    let got = s.master_get(a.master_id).await?;
    ensure!(got.name == "a" && got.active && got.last_active == t(7));
    let names: Vec<String> = s.master_list().await?.into_iter().map(|m| m.name).collect();
    ensure!(names == ["a", "b"]);
    ensure!(
        s.master_register("a", t(8)).await?.master_id == a.master_id,
        "a name keeps its id"
    );
    ensure!(b != a.master_id);
    ensure!(matches!(
        s.master_heartbeat(MasterId(99_999), t(9)).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn an_expired_master_loses_its_claims_and_its_builds_end_as_retry(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let dead = s.master_register("dead", t(0)).await?.master_id;
    let live = s.master_register("live", t(0)).await?.master_id;
    s.request_claim(&r, dead, t(1)).await?;
    let running = start(s, r[0], dead).await?;
    s.request_complete(&[r[2]], ResultCode::Success, t(2))
        .await?;
    s.master_heartbeat(live, t(100)).await?;
    let expired = s
        .master_expire_stale(&ExpireMasters {
            by: live,
            silent_since: t(50),
            now: t(100),
        })
        .await?;
    ensure!(expired.len() == 1 && expired[0].master_id == dead && expired[0].name == "dead");
    ensure!(
        expired[0].released == [r[0], r[1]] && expired[0].retried_builds == [running.id],
        "{expired:?}"
    );
    let build = s.build_get(running.id).await?;
    ensure!(build.results == Some(ResultCode::Retry) && build.complete_at == Some(t(100)));
    ensure!(
        build.error.as_deref().is_some_and(|e| e.contains("dead")),
        "{:?}",
        build.error
    );
    ensure!(
        ids(&s.request_list(&unclaimed()).await?) == [r[0], r[1]],
        "the requests are back in the queue"
    );
    ensure!(
        s.request_get(r[2]).await?.claimed_by == Some(dead),
        "a complete request keeps its claim"
    );
    ensure!(!s.master_get(dead).await?.active);
    ensure!(matches!(
        s.master_heartbeat(dead, t(101)).await,
        Err(StorageError::MasterInactive(_))
    ));
    let late = s
        .build_finish(&finish(running.id, dead, ResultCode::Success, t(102)))
        .await;
    ensure!(
        matches!(late, Err(StorageError::NotOwner { .. })),
        "the expired master's late write is refused"
    );
    // The work runs again elsewhere.
    s.request_claim(&[r[0]], live, t(103)).await?;
    let again = start(s, r[0], live).await?;
    ensure!(again.number == 2);
    Ok(())
}

pub async fn a_live_master_is_never_expired(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let a = s.master_register("a", t(0)).await?.master_id;
    let b = s.master_register("b", t(0)).await?.master_id;
    s.master_heartbeat(b, t(60)).await?;
    let expired = s
        .master_expire_stale(&ExpireMasters {
            by: a,
            silent_since: t(50),
            now: t(61),
        })
        .await?;
    ensure!(expired.is_empty(), "b beat recently");
    let expired = s
        .master_expire_stale(&ExpireMasters {
            by: a,
            silent_since: t(500),
            now: t(501),
        })
        .await?;
    ensure!(
        expired.len() == 1 && expired[0].master_id == b,
        "never the caller itself"
    );
    ensure!(s.master_get(a).await?.active);
    Ok(())
}

pub async fn registering_a_master_again_takes_back_its_earlier_work(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, m, t(1)).await?;
    let build = start(s, r[0], m).await?;
    let again = s.master_register("m", t(5)).await?;
    ensure!(
        again.master_id == m && again.released == r && again.retried_builds == [build.id],
        "{again:?}"
    );
    ensure!(s.build_get(build.id).await?.results == Some(ResultCode::Retry));
    ensure!(ids(&s.request_list(&unclaimed()).await?) == r);
    Ok(())
}

pub async fn deactivating_a_master_releases_its_claims(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, t(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, m, t(1)).await?;
    let released = s.master_deactivate(m).await?;
    ensure!(released == r && !s.master_get(m).await?.active);
    ensure!(matches!(
        s.master_heartbeat(m, t(2)).await,
        Err(StorageError::MasterInactive(_))
    ));
    Ok(())
}

// ---- cancel ----

pub async fn cancelling_completes_unclaimed_requests_and_flags_claimed_ones(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (bs, r) = buildset(s, &b, t(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&[r[1]], m, t(1)).await?;
    s.request_claim(&[r[2]], m, t(1)).await?;
    s.request_complete(&[r[2]], ResultCode::Success, t(2))
        .await?;
    let outcome = s
        .request_cancel(&[r[0], r[1], r[2], RequestId(88_888)], t(3))
        .await?;
    ensure!(
        outcome.completed == [r[0]]
            && outcome.flagged == [r[1]]
            && outcome.buildsets_completed.is_empty(),
        "{outcome:?}"
    );
    let cancelled = s.request_get(r[0]).await?;
    ensure!(
        cancelled.complete
            && cancelled.results == Some(ResultCode::Cancelled)
            && cancelled.complete_at == Some(t(3))
    );
    let flagged = s.request_get(r[1]).await?;
    ensure!(!flagged.complete && flagged.cancel_requested);
    ensure!(
        s.request_get(r[2]).await?.results == Some(ResultCode::Success),
        "complete requests are untouched"
    );
    ensure!(s.request_cancel_pending(m).await? == [r[1]]);
    s.request_complete(&[r[1]], ResultCode::Cancelled, t(4))
        .await?;
    ensure!(s.request_cancel_pending(m).await?.is_empty());
    ensure!(s.buildset_get(bs).await?.results == Some(ResultCode::Cancelled));
    Ok(())
}

pub async fn cancelling_the_last_open_request_completes_the_buildset(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let (bs, r) = buildset(s, &b, t(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&[r[0]], m, t(1)).await?;
    s.request_complete(&[r[0]], ResultCode::Failure, t(2))
        .await?;
    let outcome = s.request_cancel(&[r[1]], t(3)).await?;
    ensure!(
        outcome.buildsets_completed.len() == 1
            && outcome.buildsets_completed[0].results == ResultCode::Cancelled
    );
    let done = s.buildset_get(bs).await?;
    ensure!(done.complete && done.results == Some(ResultCode::Cancelled));
    Ok(())
}

// ---- bad input ----

pub async fn invalid_input_is_refused_with_typed_errors(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    for priority in [kiln_model::MAX_PRIORITY + 1, kiln_model::MIN_PRIORITY - 1] {
        let err = s
            .buildset_add(&NewBuildset {
                builder_ids: b.clone(),
                priority,
                ..Default::default()
            })
            .await;
        ensure!(
            matches!(err, Err(StorageError::Invalid(_))),
            "priority {priority}"
        );
    }
    let twice = s
        .buildset_add(&NewBuildset {
            builder_ids: vec![b[0], b[0]],
            ..Default::default()
        })
        .await;
    ensure!(matches!(twice, Err(StorageError::Invalid(_))));
    let mut properties = BTreeMap::new();
    properties.insert(" ".to_string(), Property::new(json!(1), "x"));
    let bad_name = s
        .buildset_add(&NewBuildset {
            builder_ids: b.clone(),
            properties,
            ..Default::default()
        })
        .await;
    ensure!(matches!(bad_name, Err(StorageError::Invalid(_))));
    ensure!(matches!(
        s.builder_ensure("  ", None).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.master_register("", t(0)).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(
        s.buildset_list(&BuildsetFilter::default())
            .await?
            .is_empty(),
        "nothing half-written"
    );
    Ok(())
}

pub async fn unknown_ids_are_not_found(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let nf =
        |r: std::result::Result<(), StorageError>| matches!(r, Err(StorageError::NotFound { .. }));
    ensure!(nf(s.buildset_get(BuildsetId(9)).await.map(|_| ())));
    ensure!(nf(s.buildset_properties(BuildsetId(9)).await.map(|_| ())));
    ensure!(nf(s.request_get(RequestId(9)).await.map(|_| ())));
    ensure!(nf(s.build_get(BuildId(9)).await.map(|_| ())));
    ensure!(nf(s
        .build_previous_successful(BuildId(9))
        .await
        .map(|_| ())));
    ensure!(nf(s.build_delete(BuildId(9)).await));
    ensure!(nf(s.master_get(MasterId(9)).await.map(|_| ())));
    ensure!(nf(s.builder_get(BuilderId(9)).await.map(|_| ())));
    ensure!(nf(s.master_deactivate(MasterId(9)).await.map(|_| ())));
    Ok(())
}

// ---- batches: the scheduler's hot path ----

fn end(build: &kiln_model::Build, results: ResultCode, at: Timestamp) -> BuildEnd {
    BuildEnd {
        build_id: build.id,
        request_id: build.request_id,
        results,
        return_value: Some(json!({"build": build.id.0})),
        error: None,
        traceback: None,
        state_string: Some(format!("ended {results}")),
        artifacts: Vec::new(),
        complete_at: at,
    }
}

fn start_all(
    master: MasterId,
    free_slots: Vec<(BuilderId, Vec<i64>)>,
    at: Timestamp,
) -> StartAvailable {
    StartAvailable {
        master_id: master,
        limit: free_slots.iter().map(|(_, slots)| slots.len()).sum(),
        free_slots,
        state_string: "starting".into(),
        now: at,
    }
}

pub async fn adding_many_buildsets_is_all_or_nothing_and_keeps_their_order(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let mut props = BTreeMap::new();
    props.insert("p".to_string(), Property::new(json!({"x": 1}), "batch"));
    let batch = vec![
        NewBuildset {
            reason: "one".into(),
            builder_ids: b.clone(),
            submitted_at: t(1),
            ..Default::default()
        },
        NewBuildset {
            reason: "two".into(),
            submitted_at: t(2),
            ..Default::default()
        },
        NewBuildset {
            reason: "three".into(),
            builder_ids: vec![b[1]],
            sourcestamps: vec![stamp("r", "main", "1"), stamp("r", "main", "1")],
            properties: props.clone(),
            priority: 9,
            submitted_at: t(3),
            ..Default::default()
        },
    ];
    let added = s.buildset_add_many(&batch).await?;
    ensure!(
        added.len() == 3
            && added[0].buildset_id < added[1].buildset_id
            && added[1].buildset_id < added[2].buildset_id
    );
    ensure!(
        added[0].requests.len() == 2
            && added[1].requests.is_empty()
            && added[2].requests.len() == 1
    );
    let two = s.buildset_get(added[1].buildset_id).await?;
    ensure!(two.reason == "two" && two.complete && two.results == Some(ResultCode::Success));
    let three = s.buildset_get(added[2].buildset_id).await?;
    ensure!(three.reason == "three" && !three.complete && three.submitted_at == t(3));
    ensure!(s.buildset_properties(added[2].buildset_id).await? == props);
    ensure!(s.buildset_sourcestamps(added[2].buildset_id).await? == vec![stamp("r", "main", "1")]);
    let r = s.request_get(added[2].requests[&b[1]]).await?;
    ensure!(r.priority == 9 && r.buildset_id == added[2].buildset_id && r.builder_id == b[1]);

    let before = s.buildset_list(&BuildsetFilter::default()).await?.len();
    let bad = vec![
        NewBuildset {
            reason: "fine".into(),
            builder_ids: vec![b[0]],
            ..Default::default()
        },
        NewBuildset {
            reason: "ghost".into(),
            builder_ids: vec![BuilderId(4_242)],
            ..Default::default()
        },
    ];
    ensure!(matches!(
        s.buildset_add_many(&bad).await,
        Err(StorageError::UnknownBuilder(_))
    ));
    ensure!(
        s.buildset_list(&BuildsetFilter::default()).await?.len() == before,
        "none of the batch was written"
    );
    ensure!(s.buildset_add_many(&[]).await?.is_empty());
    Ok(())
}

pub async fn starting_available_work_claims_and_numbers_builds_in_their_slots(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    // An earlier build on "a" so numbering continues from it.
    built(s, b[0], m, vec![], ResultCode::Success, t(0)).await?;
    let mut a = Vec::new();
    for (i, priority) in [0, 5, 5].into_iter().enumerate() {
        let (_, r) = buildset_with(
            s,
            NewBuildset {
                builder_ids: vec![b[0]],
                priority,
                submitted_at: t(i as i64),
                ..Default::default()
            },
        )
        .await?;
        a.push(r[0]);
    }
    let mut props = BTreeMap::new();
    props.insert("k".to_string(), Property::new(json!([1, 2]), "src"));
    let (_, rb) = buildset_with(
        s,
        NewBuildset {
            builder_ids: vec![b[1]],
            properties: props.clone(),
            sourcestamps: vec![stamp("z", "main", "2"), stamp("a", "dev", "1")],
            submitted_at: t(0),
            ..Default::default()
        },
    )
    .await?;
    let outcome = s
        .build_start_available(&start_all(
            m,
            vec![(b[0], vec![3, 7]), (b[1], vec![])],
            t(20),
        ))
        .await?;
    ensure!(outcome.cancelled.is_empty() && outcome.buildsets_completed.is_empty());
    let started: Vec<(RequestId, i64, Option<i64>)> = outcome
        .started
        .iter()
        .map(|sb| (sb.request.id, sb.build.number, sb.build.worker_slot))
        .collect();
    ensure!(
        started == [(a[1], 2, Some(3)), (a[2], 3, Some(7))],
        "{started:?}"
    );
    for sb in &outcome.started {
        ensure!(
            sb.request.claimed_by == Some(m) && sb.build.master_id == m && !sb.build.is_complete()
        );
        ensure!(
            sb.build.state_string == "starting"
                && sb.build.started_at == t(20)
                && sb.build.request_id == sb.request.id
        );
        ensure!(
            s.build_get(sb.build.id).await? == sb.build,
            "the returned build is what is stored"
        );
    }
    ensure!(
        s.request_get(a[0]).await?.claimed_by.is_none(),
        "one request per free slot"
    );
    ensure!(
        s.request_get(rb[0]).await?.claimed_by.is_none(),
        "no slots, no claim"
    );
    let again = s
        .build_start_available(&start_all(
            m,
            vec![(b[0], vec![0, 1, 2]), (b[1], vec![0])],
            t(21),
        ))
        .await?;
    let got: Vec<RequestId> = again.started.iter().map(|sb| sb.request.id).collect();
    ensure!(got == [a[0], rb[0]] || got == [rb[0], a[0]], "{got:?}");
    let with_context = again
        .started
        .iter()
        .find(|sb| sb.request.id == rb[0])
        .ok_or_else(|| anyhow!("the stamped request did not start"))?;
    ensure!(with_context.context.reason == "test" && with_context.context.properties == props);
    ensure!(
        with_context.context.sourcestamps == vec![stamp("a", "dev", "1"), stamp("z", "main", "2")],
        "each build gets its buildset's stamps, sorted"
    );
    ensure!(
        outcome
            .started
            .iter()
            .all(|sb| sb.context.properties.is_empty() && sb.context.sourcestamps.is_empty())
    );
    let none = s
        .build_start_available(&start_all(m, vec![(b[0], vec![0])], t(22)))
        .await?;
    ensure!(none == kiln_storage::StartOutcome::default());
    Ok(())
}

pub async fn starting_available_work_completes_cancel_flagged_requests_instead(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (bs, r) = buildset(s, &b, t(1)).await?;
    let (_, other) = buildset(s, &b, t(2)).await?;
    let gone = master(s, "gone").await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, gone, t(1)).await?;
    ensure!(s.request_cancel(&r, t(2)).await?.flagged == r);
    s.request_unclaim(&r, gone).await?;
    let outcome = s
        .build_start_available(&start_all(m, vec![(b[0], vec![0, 1])], t(3)))
        .await?;
    ensure!(outcome.cancelled == r, "{outcome:?}");
    ensure!(
        outcome.buildsets_completed.len() == 1 && outcome.buildsets_completed[0].buildset_id == bs
    );
    ensure!(outcome.buildsets_completed[0].results == ResultCode::Cancelled);
    ensure!(
        outcome.started.len() == 1
            && outcome.started[0].request.id == other[0]
            && outcome.started[0].build.number == 1
    );
    let done = s.request_get(r[0]).await?;
    ensure!(done.complete && done.results == Some(ResultCode::Cancelled));
    ensure!(
        s.build_list(&BuildFilter {
            request_id: Some(r[0]),
            ..Default::default()
        })
        .await?
        .is_empty()
    );
    Ok(())
}

pub async fn concurrent_starts_from_several_masters_never_start_a_request_twice(
    h: &Harness,
) -> Result<()> {
    const MASTERS: usize = 3;
    const REQUESTS: usize = 240;
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let batch: Vec<NewBuildset> = (0..REQUESTS / 2)
        .map(|i| NewBuildset {
            reason: format!("{i}"),
            builder_ids: b.clone(),
            submitted_at: t(i as i64),
            ..Default::default()
        })
        .collect();
    s.buildset_add_many(&batch).await?;
    let mut tasks = Vec::new();
    for n in 0..MASTERS {
        let store = h.another().await?;
        let m = master(&*store, &format!("m{n}")).await?;
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store
                    .build_start_available(&start_all(
                        m,
                        vec![(b[0], vec![0, 1, 2]), (b[1], vec![0, 1])],
                        t(0),
                    ))
                    .await?;
                if got.started.is_empty() {
                    return anyhow::Ok(mine);
                }
                let ends: Vec<BuildEnd> = got
                    .started
                    .iter()
                    .map(|sb| end(&sb.build, ResultCode::Success, t(1)))
                    .collect();
                store.build_finish_and_settle(m, &ends).await?;
                mine.extend(
                    got.started
                        .into_iter()
                        .map(|sb| (sb.request.id, sb.build.builder_id, sb.build.number)),
                );
            }
        }));
    }
    let mut requests = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for task in tasks {
        for (request, builder, number) in task.await?? {
            ensure!(requests.insert(request), "request {request} started twice");
            ensure!(
                numbers.insert((builder, number)),
                "build number {number} of builder {builder} used twice"
            );
        }
    }
    ensure!(
        requests.len() == REQUESTS,
        "{} of {REQUESTS} started",
        requests.len()
    );
    ensure!(
        s.buildset_list(&BuildsetFilter {
            complete: Some(false),
            ..Default::default()
        })
        .await?
        .is_empty()
    );
    Ok(())
}

pub async fn finishing_and_settling_completes_or_releases_requests_and_refuses_foreign_builds(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let m = master(s, "m").await?;
    let other = master(s, "other").await?;
    let (bs1, _) = buildset(s, &b[..2], t(1)).await?;
    let (bs2, _) = buildset(s, &[b[2]], t(1)).await?;
    let started = s
        .build_start_available(&start_all(
            m,
            vec![(b[0], vec![0]), (b[1], vec![0]), (b[2], vec![0])],
            t(2),
        ))
        .await?
        .started;
    ensure!(started.len() == 3);
    let by_builder = |i: usize| {
        started
            .iter()
            .find(|sb| sb.build.builder_id == b[i])
            .map(|sb| sb.build.clone())
    };
    let (a, bb, c) = (
        by_builder(0).ok_or_else(|| anyhow!("no a"))?,
        by_builder(1).ok_or_else(|| anyhow!("no b"))?,
        by_builder(2).ok_or_else(|| anyhow!("no c"))?,
    );
    // "c" runs on m, but "other" tries to finish it: refused, and nothing else changes.
    let artifact = |path: &str| kiln_model::Artifact {
        path: path.into(),
        size: 3,
        location: format!("/results/{path}"),
    };
    let refused = s
        .build_finish_and_settle(
            other,
            &[BuildEnd {
                artifacts: vec![artifact("stolen.txt")],
                ..end(&c, ResultCode::Success, t(3))
            }],
        )
        .await?;
    ensure!(refused.refused == [c.id] && refused.completed.is_empty());
    ensure!(!s.build_get(c.id).await?.is_complete());

    let settled = s
        .build_finish_and_settle(
            m,
            &[
                BuildEnd {
                    artifacts: vec![artifact("b/report.txt"), artifact("a.log")],
                    ..end(&a, ResultCode::Warnings, t(4))
                },
                end(&bb, ResultCode::Retry, t(4)),
                end(&c, ResultCode::Failure, t(5)),
            ],
        )
        .await?;
    ensure!(settled.refused.is_empty(), "{settled:?}");
    let mut completed = vec![a.request_id, c.request_id];
    completed.sort();
    ensure!(
        settled.completed == completed && settled.released == [bb.request_id],
        "{settled:?}"
    );
    ensure!(
        settled.buildsets_completed.len() == 1 && settled.buildsets_completed[0].buildset_id == bs2
    );
    ensure!(settled.buildsets_completed[0].results == ResultCode::Failure);
    let a_now = s.build_get(a.id).await?;
    ensure!(a_now.results == Some(ResultCode::Warnings) && a_now.complete_at == Some(t(4)));
    ensure!(
        a_now.return_value == Some(json!({"build": a.id.0}))
            && a_now.state_string == "ended WARNINGS"
    );
    ensure!(s.request_get(a.request_id).await?.results == Some(ResultCode::Warnings));
    let retried = s.request_get(bb.request_id).await?;
    ensure!(
        !retried.complete && retried.claimed_by.is_none(),
        "RETRY puts the request back: {retried:?}"
    );
    ensure!(!s.buildset_get(bs1).await?.complete);

    let stored: Vec<String> = s
        .build_artifacts(a.id)
        .await?
        .into_iter()
        .map(|x| x.path)
        .collect();
    ensure!(
        stored == ["a.log", "b/report.txt"],
        "artifacts are kept, by path: {stored:?}"
    );
    ensure!(
        s.build_artifacts(c.id).await?.is_empty(),
        "a refused build's artifacts are not"
    );
    ensure!(matches!(
        s.build_artifacts(BuildId(99_999)).await,
        Err(StorageError::NotFound { .. })
    ));
    let twice = s
        .build_finish_and_settle(m, &[end(&a, ResultCode::Success, t(6))])
        .await?;
    ensure!(
        twice.refused == [a.id],
        "a finished build cannot finish again"
    );
    ensure!(s.build_get(a.id).await?.results == Some(ResultCode::Warnings));

    // The retried request runs again and completes the first buildset.
    let again = s
        .build_start_available(&start_all(m, vec![(b[1], vec![0])], t(7)))
        .await?
        .started;
    ensure!(again.len() == 1 && again[0].build.number == 2);
    let last = s
        .build_finish_and_settle(m, &[end(&again[0].build, ResultCode::Success, t(8))])
        .await?;
    ensure!(last.buildsets_completed.len() == 1 && last.buildsets_completed[0].buildset_id == bs1);
    ensure!(last.buildsets_completed[0].results == ResultCode::Warnings);
    let done = s.buildset_get(bs1).await?;
    ensure!(done.complete_at == Some(t(8)) && done.results == Some(ResultCode::Warnings));
    Ok(())
}

// ---- relations ----

pub async fn builders_record_their_dependencies(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let [app, _lib] = builders(s, &["app", "lib"]).await?[..] else {
        return Err(anyhow!("two builders"));
    };
    ensure!(s.builder_get(app).await?.depends_on.is_empty());
    s.builder_set_depends_on(app, &["lib".to_owned(), "tools".to_owned()])
        .await?;
    ensure!(s.builder_get(app).await?.depends_on == ["lib", "tools"]);
    let listed = s.builder_list().await?;
    ensure!(
        listed
            .iter()
            .find(|b| b.name == "app")
            .map(|b| b.depends_on.len())
            == Some(2)
    );
    s.builder_set_depends_on(app, &[]).await?;
    ensure!(
        s.builder_get_by_name("app")
            .await?
            .is_some_and(|b| b.depends_on.is_empty())
    );
    ensure!(matches!(
        s.builder_set_depends_on(BuilderId(999), &[]).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn the_latest_build_with_given_results_is_found_by_completion_time(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["b"]).await?[0];
    let m = master(s, "m").await?;
    let failed = built(s, b, m, vec![], ResultCode::Failure, t(30)).await?;
    let ok = built(s, b, m, vec![], ResultCode::Success, t(20)).await?;
    built(s, b, m, vec![], ResultCode::Skipped, t(40)).await?;
    let any = [ResultCode::Success, ResultCode::Failure];
    ensure!(s.build_latest_with(b, &any).await?.map(|x| x.id) == Some(failed.id));
    ensure!(
        s.build_latest_with(b, &[ResultCode::Success])
            .await?
            .map(|x| x.id)
            == Some(ok.id)
    );
    ensure!(
        s.build_latest_with(b, &[ResultCode::Cancelled])
            .await?
            .is_none()
    );
    Ok(())
}

/// A parent build on `m` with two children keyed t0.0 and t0.1.
async fn parent_with_children(
    s: &dyn Store,
    m: MasterId,
    waited_for: bool,
) -> Result<(RequestId, BuildId, Vec<(BuildsetId, RequestId)>)> {
    let ids = builders(s, &["parent", "child"]).await?;
    let (_, requests) = buildset(s, &ids[..1], t(0)).await?;
    s.request_claim(&requests, m, t(1)).await?;
    let build = start(s, requests[0], m).await?;
    let mut children = Vec::new();
    for i in 0..2 {
        let (bs, reqs) = buildset_with(
            s,
            NewBuildset {
                builder_ids: vec![ids[1]],
                waited_for,
                parent_buildid: Some(build.id),
                parent_relationship: Some("triggers".into()),
                parent_request_id: Some(requests[0]),
                trigger_key: Some(format!("t0.{i}")),
                submitted_at: t(2),
                ..NewBuildset::default()
            },
        )
        .await?;
        children.push((bs, reqs[0]));
    }
    Ok((requests[0], build.id, children))
}

pub async fn children_are_found_by_their_parent_request_and_adopted_by_a_new_build(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let m = master(s, "m").await?;
    let (parent_request, parent_build, children) = parent_with_children(s, m, true).await?;
    // The first child ran and returned a value.
    s.request_claim(&[children[0].1], m, t(3)).await?;
    let child_build = start(s, children[0].1, m).await?;
    s.build_finish(&FinishBuild {
        return_value: Some(json!({"ok": true})),
        ..finish(child_build.id, m, ResultCode::Success, t(4))
    })
    .await?;
    s.request_complete(&[children[0].1], ResultCode::Success, t(4))
        .await?;

    let found = s.buildset_children(parent_request).await?;
    ensure!(found.len() == 2);
    ensure!(found[0].trigger_key.as_deref() == Some("t0.0") && found[0].builder == "child");
    ensure!(found[0].complete && found[0].results == Some(ResultCode::Success));
    ensure!(found[0].build_id == Some(child_build.id));
    ensure!(found[0].return_value == Some(json!({"ok": true})));
    ensure!(!found[1].complete && found[1].build_id.is_none() && found[1].waited_for);
    ensure!(found.iter().all(|c| c.parent_buildid == Some(parent_build)));
    ensure!(found[1].relationship.as_deref() == Some("triggers"));

    // The parent's master dies; a new build of the same request adopts the children.
    s.request_unclaim(&[parent_request], m).await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&[parent_request], m2, t(5)).await?;
    let rerun = start(s, parent_request, m2).await?;
    let all: Vec<BuildsetId> = children.iter().map(|(bs, _)| *bs).collect();
    s.buildset_adopt(&all, rerun.id).await?;
    let found = s.buildset_children(parent_request).await?;
    ensure!(found.iter().all(|c| c.parent_buildid == Some(rerun.id)));
    ensure!(s.buildset_children(RequestId(999)).await?.is_empty());
    Ok(())
}

pub async fn cancelling_a_request_cancels_its_waited_for_children_recursively(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let m = master(s, "m").await?;
    let (parent_request, _, children) = parent_with_children(s, m, true).await?;
    // One child runs and has a waited-for grandchild of its own.
    s.request_claim(&[children[0].1], m, t(3)).await?;
    let child_build = start(s, children[0].1, m).await?;
    let child_builder = s.build_get(child_build.id).await?.builder_id;
    let (_, grandchild) = buildset_with(
        s,
        NewBuildset {
            builder_ids: vec![child_builder],
            waited_for: true,
            parent_buildid: Some(child_build.id),
            parent_request_id: Some(children[0].1),
            trigger_key: Some("t0.0".into()),
            submitted_at: t(4),
            ..NewBuildset::default()
        },
    )
    .await?;
    // And an unwaited child of the parent is left alone.
    let (_, unwaited) = buildset_with(
        s,
        NewBuildset {
            builder_ids: vec![child_builder],
            waited_for: false,
            parent_request_id: Some(parent_request),
            trigger_key: Some("t1.0".into()),
            submitted_at: t(4),
            ..NewBuildset::default()
        },
    )
    .await?;
    let outcome = s.request_cancel(&[parent_request], t(5)).await?;
    ensure!(
        outcome.flagged == [parent_request, children[0].1],
        "flagged {:?}",
        outcome.flagged
    );
    let mut completed = outcome.completed.clone();
    completed.sort();
    ensure!(
        completed == [children[1].1, grandchild[0]],
        "completed {completed:?}"
    );
    ensure!(!s.request_get(unwaited[0]).await?.complete);
    Ok(())
}

// ---- the outbox ----

pub async fn nothing_is_written_to_the_outbox_while_no_reporter_is_registered(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["b"]).await?[0];
    let m = master(s, "m").await?;
    built(s, b, m, vec![], ResultCode::Success, t(1)).await?;
    ensure!(s.outbox_read(0, 100).await?.is_empty());
    Ok(())
}

pub async fn every_lifecycle_change_writes_its_event_in_the_same_transaction(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("r").await?;
    let b = builders(s, &["b"]).await?[0];
    let m = master(s, "m").await?;
    // The batch paths: add, start, finish and settle.
    let (bs, requests) = buildset(s, &[b], t(1)).await?;
    let started = s
        .build_start_available(&start_all(m, vec![(b, vec![0])], t(2)))
        .await?;
    let build = started.started[0].build.id;
    s.build_finish_and_settle(
        m,
        &[BuildEnd {
            build_id: build,
            request_id: requests[0],
            results: ResultCode::Warnings,
            return_value: Some(json!([1, 2])),
            error: None,
            traceback: None,
            state_string: Some("done".into()),
            artifacts: vec![],
            complete_at: t(5),
        }],
    )
    .await?;
    // An empty buildset is submitted and complete at once; a cancel completes another.
    buildset(s, &[], t(6)).await?;
    let (cancelled, open) = buildset(s, &[b], t(7)).await?;
    s.request_cancel(&open, t(8)).await?;

    let events = s.outbox_read(0, 100).await?;
    let kinds: Vec<(ReportKind, BuildsetId)> =
        events.iter().map(|e| (e.kind, e.buildset_id)).collect();
    use ReportKind::*;
    ensure!(
        kinds
            == [
                (BuildsetSubmitted, bs),
                (BuildStarted, bs),
                (BuildFinished, bs),
                (BuildsetComplete, bs),
                (BuildsetSubmitted, BuildsetId(bs.0 + 1)),
                (BuildsetComplete, BuildsetId(bs.0 + 1)),
                (BuildsetSubmitted, cancelled),
                (BuildsetComplete, cancelled),
            ],
        "{kinds:?}"
    );
    ensure!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let finished = &events[2];
    ensure!(finished.build_id == Some(build) && finished.builder.as_deref() == Some("b"));
    ensure!(finished.results == Some(ResultCode::Warnings));
    let p = &finished.payload;
    ensure!(p["event"] == "build_finished" && p["results"] == 1 && p["state_string"] == "done");
    ensure!(
        p["return_value"] == json!([1, 2]) && p["duration_s"] == json!(3.0),
        "{p}"
    );
    ensure!(events[7].payload["results"] == ResultCode::Cancelled.code());
    ensure!(events[0].payload["builders"] == json!(["b"]));

    // The single-row paths too: build_add and build_finish, and a master's expiry.
    let (_, more) = buildset(s, &[b], t(9)).await?;
    s.request_claim(&more, m, t(9)).await?;
    let lone = start(s, more[0], m).await?;
    let before = s.outbox_read(0, 100).await?.len();
    s.build_finish(&finish(lone.id, m, ResultCode::Success, t(10)))
        .await?;
    let (_, last) = buildset(s, &[b], t(11)).await?;
    s.request_claim(&last, m, t(11)).await?;
    let orphan = start(s, last[0], m).await?;
    s.master_expire_stale(&ExpireMasters {
        by: master(s, "other").await?,
        silent_since: t(1_000),
        now: t(1_000),
    })
    .await?;
    let after = s.outbox_read(0, 100).await?;
    let tail: Vec<(ReportKind, Option<BuildId>, Option<ResultCode>)> = after[before..]
        .iter()
        .map(|e| (e.kind, e.build_id, e.results))
        .collect();
    ensure!(
        tail == [
            (BuildFinished, Some(lone.id), Some(ResultCode::Success)),
            (BuildsetSubmitted, None, None),
            (BuildStarted, Some(orphan.id), None),
            (BuildFinished, Some(orphan.id), Some(ResultCode::Retry)),
        ],
        "{tail:?}"
    );
    Ok(())
}

pub async fn a_new_reporter_starts_at_the_end_of_the_outbox_and_a_known_one_keeps_its_place(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let first = s.reporter_register("first").await?;
    ensure!(first.cursor == 0 && first.delivered == 0 && first.owner.is_none());
    buildset(s, &[], t(1)).await?;
    let events = s.outbox_read(0, 10).await?;
    ensure!(events.len() == 2);
    let second = s.reporter_register("second").await?;
    ensure!(
        second.cursor == events[1].seq,
        "a new reporter hears only new events"
    );
    let again = s.reporter_register("first").await?;
    ensure!(again.cursor == 0, "registering again keeps the place");
    ensure!(s.reporter_list().await?.len() == 2);
    s.reporter_remove("second").await?;
    ensure!(matches!(
        s.reporter_get("second").await,
        Err(StorageError::NotFound { .. })
    ));
    ensure!(matches!(
        s.reporter_remove("second").await,
        Err(StorageError::NotFound { .. })
    ));
    ensure!(matches!(
        s.reporter_register(" ").await,
        Err(StorageError::Invalid(_))
    ));
    Ok(())
}

pub async fn only_one_master_holds_a_reporters_lease_until_it_runs_out(h: &Harness) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("r").await?;
    let (a, b) = (master(s, "a").await?, master(s, "b").await?);
    ensure!(
        s.reporter_lease("r", a, t(0), t(30))
            .await?
            .is_some_and(|r| r.owner == Some(a))
    );
    ensure!(s.reporter_lease("r", b, t(10), t(40)).await?.is_none());
    ensure!(
        s.reporter_lease("r", a, t(20), t(50)).await?.is_some(),
        "the holder renews"
    );
    ensure!(s.reporter_lease("r", b, t(49), t(80)).await?.is_none());
    let taken = s.reporter_lease("r", b, t(51), t(80)).await?;
    ensure!(
        taken.is_some_and(|r| r.owner == Some(b)),
        "an expired lease is taken over"
    );
    // A master that shuts down gives its leases up at once.
    s.master_deactivate(b).await?;
    let state = s.reporter_get("r").await?;
    ensure!(
        state.owner.is_none() && state.lease_until.is_none(),
        "{state:?}"
    );
    ensure!(s.reporter_lease("r", a, t(52), t(90)).await?.is_some());
    ensure!(matches!(
        s.reporter_lease("nope", a, t(0), t(1)).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

fn progress(name: &str, master: MasterId, cursor: i64, now: Timestamp) -> ReporterProgress {
    ReporterProgress {
        name: name.into(),
        master,
        cursor,
        delivered: 1,
        dropped: vec![],
        attempts: 0,
        last_error: None,
        lease_until: now + TimeDelta::seconds(30),
        now,
    }
}

pub async fn delivery_progress_is_refused_without_the_lease(h: &Harness) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("r").await?;
    let (a, b) = (master(s, "a").await?, master(s, "b").await?);
    s.reporter_lease("r", a, t(0), t(30)).await?;
    s.reporter_progress(&progress("r", a, 5, t(1))).await?;
    ensure!(matches!(
        s.reporter_progress(&progress("r", b, 9, t(2))).await,
        Err(StorageError::LeaseLost { .. })
    ));
    s.reporter_progress(&ReporterProgress {
        dropped: vec![(6, 3, "boom".into())],
        delivered: 0,
        attempts: 2,
        last_error: Some("boom".into()),
        ..progress("r", a, 6, t(3))
    })
    .await?;
    let state = s.reporter_get("r").await?;
    ensure!(
        state.cursor == 6 && state.delivered == 1 && state.dropped == 1,
        "{state:?}"
    );
    ensure!(state.attempts == 2 && state.last_error.as_deref() == Some("boom"));
    // A cursor never moves back.
    s.reporter_progress(&progress("r", a, 2, t(4))).await?;
    ensure!(s.reporter_get("r").await?.cursor == 6);
    // After the lease ran out, the old holder's writes are refused too.
    ensure!(matches!(
        s.reporter_progress(&progress("r", a, 7, t(100))).await,
        Err(StorageError::LeaseLost { .. })
    ));
    Ok(())
}

pub async fn pruning_the_outbox_keeps_what_any_reporter_still_needs(h: &Harness) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("slow").await?;
    s.reporter_register("fast").await?;
    let m = master(s, "m").await?;
    for i in 0..3 {
        buildset(s, &[], t(i)).await?;
    }
    let all = s.outbox_read(0, 100).await?;
    ensure!(all.len() == 6);
    s.reporter_lease("fast", m, t(0), t(30)).await?;
    s.reporter_progress(&progress("fast", m, all[5].seq, t(1)))
        .await?;
    s.reporter_lease("slow", m, t(0), t(30)).await?;
    s.reporter_progress(&progress("slow", m, all[1].seq, t(1)))
        .await?;
    ensure!(s.outbox_prune().await? == 2);
    let left = s.outbox_read(0, 100).await?;
    ensure!(left.len() == 4 && left[0].seq == all[2].seq);
    Ok(())
}

// ---- collection queries ----

fn filter(field: &str, op: Op, values: Vec<FilterValue>) -> Filter {
    Filter {
        field: field.into(),
        op,
        values,
    }
}

pub async fn collection_queries_filter_order_and_page_in_the_database(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let ids = builders(s, &["alpha", "beta"]).await?;
    let m = master(s, "m").await?;
    // Five buildsets submitted at t(0)..t(4); the first three complete with SUCCESS,
    // FAILURE, SUCCESS; the fourth has an external id.
    let mut sets = Vec::new();
    for i in 0..5 {
        let (bs, reqs) = buildset_with(
            s,
            NewBuildset {
                builder_ids: vec![ids[i % 2]],
                external_idstring: (i == 3).then(|| "ext-3".to_owned()),
                submitted_at: t(i as i64),
                ..NewBuildset::default()
            },
        )
        .await?;
        sets.push((bs, reqs[0]));
    }
    for (i, results) in [
        ResultCode::Success,
        ResultCode::Failure,
        ResultCode::Success,
    ]
    .into_iter()
    .enumerate()
    {
        let req = sets[i].1;
        s.request_claim(&[req], m, t(10)).await?;
        let b = start(s, req, m).await?;
        s.build_finish(&finish(b.id, m, results, t(20 + i as i64)))
            .await?;
        s.request_complete(&[req], results, t(20 + i as i64))
            .await?;
    }
    let q = |filters: Vec<Filter>| Query {
        filters,
        ..Query::default()
    };
    let bsids = |page: &kiln_storage::Page<kiln_model::Buildset>| -> Vec<i64> {
        page.items.iter().map(|b| b.id.0).collect()
    };
    let all: Vec<i64> = sets.iter().map(|(b, _)| b.0).collect();

    let done = s
        .query_buildsets(&q(vec![filter(
            "complete",
            Op::Eq,
            vec![FilterValue::Bool(true)],
        )]))
        .await?;
    ensure!(bsids(&done) == all[..3] && done.total == 3);
    let failed = s
        .query_buildsets(&q(vec![filter(
            "results",
            Op::Eq,
            vec![FilterValue::Result(ResultCode::Failure)],
        )]))
        .await?;
    ensure!(bsids(&failed) == [all[1]]);
    let not_failed = s
        .query_buildsets(&q(vec![filter(
            "results",
            Op::Ne,
            vec![FilterValue::Result(ResultCode::Failure)],
        )]))
        .await?;
    ensure!(
        bsids(&not_failed) == [all[0], all[2], all[3], all[4]],
        "ne counts a missing value as different"
    );
    let either = s
        .query_buildsets(&q(vec![filter(
            "bsid",
            Op::Eq,
            vec![FilterValue::Int(all[1]), FilterValue::Int(all[4])],
        )]))
        .await?;
    ensure!(
        bsids(&either) == [all[1], all[4]],
        "repeated values mean any of"
    );
    let no_ext = s
        .query_buildsets(&q(vec![filter(
            "external_idstring",
            Op::Eq,
            vec![FilterValue::Null],
        )]))
        .await?;
    ensure!(no_ext.total == 4);
    let ext = s
        .query_buildsets(&q(vec![filter(
            "external_idstring",
            Op::Contains,
            vec![FilterValue::Text("xt-".into())],
        )]))
        .await?;
    ensure!(bsids(&ext) == [all[3]]);
    let window = s
        .query_buildsets(&q(vec![
            filter("submitted_at", Op::Ge, vec![FilterValue::Time(t(1))]),
            filter("submitted_at", Op::Lt, vec![FilterValue::Time(t(4))]),
        ]))
        .await?;
    ensure!(bsids(&window) == all[1..4]);
    let not_in = s
        .query_buildsets(&q(vec![filter(
            "bsid",
            Op::NotIn,
            vec![FilterValue::Int(all[0]), FilterValue::Int(all[1])],
        )]))
        .await?;
    ensure!(bsids(&not_in) == all[2..]);

    // Ordering, paging, and the total before paging.
    let page = s
        .query_buildsets(&Query {
            order: vec![("submitted_at".into(), true)],
            limit: Some(2),
            offset: Some(1),
            ..Query::default()
        })
        .await?;
    ensure!(
        bsids(&page) == [all[3], all[2]] && page.total == 5,
        "{page:?}"
    );

    // The other collections.
    let alpha_builds = s
        .query_builds(&q(vec![filter(
            "builderid",
            Op::Eq,
            vec![FilterValue::Int(ids[0].0)],
        )]))
        .await?;
    ensure!(alpha_builds.total == 2);
    let in_set = s
        .query_builds(&q(vec![filter(
            "buildsetid",
            Op::Eq,
            vec![FilterValue::Int(all[1])],
        )]))
        .await?;
    ensure!(in_set.items.len() == 1 && in_set.items[0].results == Some(ResultCode::Failure));
    let open = s
        .query_requests(&q(vec![filter(
            "complete",
            Op::Eq,
            vec![FilterValue::Bool(false)],
        )]))
        .await?;
    ensure!(open.total == 2);
    let claimed = s
        .query_requests(&q(vec![filter(
            "claimed",
            Op::Eq,
            vec![FilterValue::Bool(true)],
        )]))
        .await?;
    ensure!(
        claimed.total == 3,
        "a completed request keeps the claim it ran under"
    );
    let named = s
        .query_builders(&Query {
            filters: vec![filter(
                "name",
                Op::Contains,
                vec![FilterValue::Text("et".into())],
            )],
            ..Query::default()
        })
        .await?;
    ensure!(named.items.len() == 1 && named.items[0].name == "beta");
    let masters = s.query_masters(&Query::default()).await?;
    ensure!(masters.total == 1);
    ensure!(matches!(
        s.query_builds(&q(vec![filter("nope", Op::Eq, vec![FilterValue::Int(1)])]))
            .await,
        Err(StorageError::Invalid(_))
    ));
    Ok(())
}

pub async fn the_priority_of_an_open_request_can_change(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["b"]).await?[0];
    let (_, reqs) = buildset(s, &[b], t(0)).await?;
    s.request_set_priority(reqs[0], 50).await?;
    ensure!(s.request_get(reqs[0]).await?.priority == 50);
    ensure!(matches!(
        s.request_set_priority(reqs[0], 5_000).await,
        Err(StorageError::Invalid(_))
    ));
    s.request_complete(&reqs, ResultCode::Success, t(1)).await?;
    ensure!(matches!(
        s.request_set_priority(reqs[0], 1).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.request_set_priority(RequestId(999), 1).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn an_expired_master_starts_nothing_until_it_registers_again(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let paused = master(s, "paused").await?;
    let live = master(s, "live").await?;
    s.buildset_add(&NewBuildset {
        reason: "x".into(),
        builder_ids: b.clone(),
        submitted_at: t(1),
        ..Default::default()
    })
    .await?;
    s.master_heartbeat(live, t(50)).await?;
    let expired = s
        .master_expire_stale(&ExpireMasters {
            by: live,
            silent_since: t(10),
            now: t(60),
        })
        .await?;
    ensure!(expired.len() == 1 && expired[0].master_id == paused);
    // What it claimed now would belong to nobody alive: refused, and nothing changes.
    let err = s
        .build_start_available(&start_all(paused, vec![(b[0], vec![0])], t(61)))
        .await
        .err()
        .ok_or_else(|| anyhow!("an expired master started work"))?;
    ensure!(
        matches!(err, StorageError::MasterInactive(m) if m == paused),
        "{err}"
    );
    ensure!(s.request_list(&unclaimed()).await?.len() == 1);
    let again = s.master_register("paused", t(62)).await?;
    let got = s
        .build_start_available(&start_all(again.master_id, vec![(b[0], vec![0])], t(63)))
        .await?;
    ensure!(got.started.len() == 1);
    Ok(())
}

// ---- production shapes ----

pub async fn outbox_seqs_are_never_reused_after_the_prune_empties_the_outbox(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("r").await?;
    let m = master(s, "m").await?;
    buildset(s, &[], t(1)).await?;
    let first = s.outbox_read(0, 100).await?;
    ensure!(first.len() == 2, "{first:?}");
    let last = first[1].seq;
    s.reporter_lease("r", m, t(1), t(30)).await?;
    s.reporter_progress(&progress("r", m, last, t(2))).await?;
    ensure!(s.outbox_prune().await? == 2);
    ensure!(s.outbox_read(0, 100).await?.is_empty());
    // The table is empty now; the next events must still come after the cursor.
    buildset(s, &[], t(3)).await?;
    let next = s.outbox_read(last, 100).await?;
    ensure!(
        next.len() == 2 && next.iter().all(|e| e.seq > last),
        "events after the prune must have seqs past {last}: {next:?}"
    );
    let state = s.reporter_get("r").await?;
    ensure!(state.pending == 2, "{state:?}");
    // A store opened anew (a restart) continues the sequence too.
    let again = h.another().await?;
    again.outbox_prune().await?;
    buildset(&*again, &[], t(4)).await?;
    let all = again.outbox_read(last, 100).await?;
    ensure!(all.len() == 4 && all.windows(2).all(|w| w[0].seq < w[1].seq));
    Ok(())
}

pub async fn a_reporters_pending_count_is_every_event_past_its_cursor(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let fresh = s.reporter_register("r").await?;
    ensure!(fresh.pending == 0, "{fresh:?}");
    let m = master(s, "m").await?;
    for i in 0..5 {
        buildset(s, &[], t(i)).await?;
    }
    ensure!(s.reporter_get("r").await?.pending == 10);
    let events = s.outbox_read(0, 100).await?;
    s.reporter_lease("r", m, t(5), t(30)).await?;
    s.reporter_progress(&progress("r", m, events[3].seq, t(6)))
        .await?;
    let listed = s.reporter_list().await?;
    ensure!(listed.len() == 1 && listed[0].pending == 6, "{listed:?}");
    Ok(())
}

pub async fn claim_capacity_goes_to_builders_with_queued_work_in_buildbots_order(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    // 40 builders, more than any fixed share of the capacity would reach; only some
    // have queued work.
    let names: Vec<String> = (0..40).map(|i| format!("b{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let b = builders(s, &refs).await?;
    let m = master(s, "m").await?;
    let queue = |builder: usize, priority: i32, at: i64| {
        let params = NewBuildset {
            builder_ids: vec![b[builder]],
            priority,
            submitted_at: t(at),
            ..NewBuildset::default()
        };
        async move { buildset_with(s, params).await.map(|(_, r)| r[0]) }
    };
    // b39: priority 9. b05 and b30: priority 5, b30 queued earlier. b20: priority 5 too,
    // same time as b30 but a later name. b01: priority 0, two requests, the second one
    // more urgent.
    let r39 = queue(39, 9, 50).await?;
    let r05 = queue(5, 5, 40).await?;
    let r30 = queue(30, 5, 10).await?;
    let r20 = queue(20, 5, 10).await?;
    let r01a = queue(1, 0, 0).await?;
    let r01b = queue(1, 3, 60).await?;
    let every_builder: Vec<(BuilderId, Vec<i64>)> = b.iter().map(|id| (*id, vec![0, 1])).collect();
    let mut order = Vec::new();
    // One request per round: the limit decides who gets the only room.
    for round in 0..6 {
        let mut params = start_all(m, every_builder.clone(), t(100 + round));
        params.limit = 1;
        let started = s.build_start_available(&params).await?;
        ensure!(
            started.started.len() == 1,
            "round {round}: {:?}",
            started.started
        );
        order.push(started.started[0].request.id);
    }
    ensure!(
        order == [r39, r20, r30, r05, r01b, r01a],
        "claim order {order:?}; want b39, b20 (same age as b30, earlier name), b30, b05, then b01 by priority"
    );
    // Nothing left: a round with room claims nothing.
    let none = s
        .build_start_available(&start_all(m, every_builder.clone(), t(200)))
        .await?;
    ensure!(none.started.is_empty());
    // The limit caps the total; builders without work do not use it up.
    for (i, builder) in b.iter().enumerate().take(30) {
        buildset(s, &[*builder], t(300 + i as i64)).await?;
    }
    let mut params = start_all(m, every_builder, t(400));
    params.limit = 25;
    let got = s.build_start_available(&params).await?;
    ensure!(got.started.len() == 25, "{}", got.started.len());
    Ok(())
}

pub async fn unclaimed_requests_in_collection_queries_exclude_complete_ones(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let (_, queued) = buildset(s, &b, t(1)).await?;
    let (_, cancelled) = buildset(s, &b, t(2)).await?;
    let (_, claimed) = buildset(s, &b, t(3)).await?;
    s.request_cancel(&cancelled, t(4)).await?;
    s.request_claim(&claimed, m, t(5)).await?;
    let query = |value: bool| Query {
        filters: vec![filter("claimed", Op::Eq, vec![FilterValue::Bool(value)])],
        ..Query::default()
    };
    let unclaimed: Vec<RequestId> = s
        .query_requests(&query(false))
        .await?
        .items
        .iter()
        .map(|r| r.id)
        .collect();
    ensure!(unclaimed == queued, "claimed=false: {unclaimed:?}");
    let with_claim: Vec<RequestId> = s
        .query_requests(&query(true))
        .await?
        .items
        .iter()
        .map(|r| r.id)
        .collect();
    ensure!(with_claim == claimed, "claimed=true: {with_claim:?}");
    Ok(())
}
