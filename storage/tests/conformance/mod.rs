//! The storage conformance suite: every rule of the storage seam, written once and run
//! against every backend. A backend's test file provides a `Harness` factory and calls
//! `conformance_tests!(factory)`, which makes one `#[tokio::test]` per rule.

#![allow(dead_code)]

pub mod batches;
pub mod builds;
pub mod buildsets;
pub mod children;
pub mod input;
pub mod locks;
pub mod masters;
pub mod operators;
pub mod outbox;
pub mod output;
pub mod queries;
pub mod requests;
pub mod shapes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{Result, anyhow, ensure};
use chrono::TimeDelta;
use kiln_model::{
    BuildId, BuilderId, BuildsetId, LogLevel, LogQuery, LogRecord, MasterId, ProgressNode,
    ProgressReport, Property, ReportKind, RequestId, ResultCode, SourceStamp, Timestamp,
};
use kiln_storage::{
    BuildField, BuildFilter, BuilderField, BuildsetField, BuildsetFilter, CancelOutcome,
    ClaimFilter, ExpireMasters, FilterValue, FinishedBuild, MasterField, NewBuild, NewBuildset, Op,
    Query, ReporterProgress, RequestField, RequestFilter, RequestOrder, RequestOrderField,
    RetentionSweep, StartAvailable, StorageError, Store,
};
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

/// One `#[tokio::test]` per rule, in every section, against the backend `$open` opens;
/// plus a test that fails when a rule function in any section file is missing here (a
/// rule left off this list would otherwise compile silently and never run).
#[macro_export]
macro_rules! conformance_tests {
    ($open:path) => {
        $crate::conformance_tests!(@sections $open;
            buildsets: [
                builders_are_created_once_and_found_by_name,
                identical_sourcestamps_are_stored_once,
                adding_a_buildset_creates_one_request_per_builder,
                a_buildset_with_an_unknown_builder_writes_nothing,
                a_buildset_without_builders_completes_at_once,
                buildset_properties_keep_their_values_and_sources,
                buildsets_list_newest_first_with_filters,
                stored_sourcestamps_read_by_page_and_by_id,
            ],
            requests: [
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
                cancelling_completes_unclaimed_requests_and_flags_claimed_ones,
                cancelling_the_last_open_request_completes_the_buildset,
                cancels_in_one_transaction_each_get_the_outcome_of_their_own_turn,
                priority_changes_in_one_transaction_each_get_their_own_answer,
            ],
            builds: [
                build_numbers_are_unique_per_builder_under_concurrent_starts,
                a_build_starts_only_on_a_request_its_master_holds,
                builds_are_found_by_id_by_number_and_by_filters,
                finishing_a_build_records_its_outcome_once_and_only_by_its_master,
                state_strings_are_set_and_lock_durations_accumulate,
                the_previous_successful_build_needs_exact_success_and_the_same_stamps,
                the_latest_successful_build_never_counts_skipped,
                deleting_a_build_removes_its_logs_progress_and_properties,
                build_properties_keep_their_values_and_sources,
            ],
            output: [
                the_latest_progress_report_per_group_wins_and_reads_back_as_a_tree,
                logs_read_back_filtered_by_build_level_and_time_window,
                pruning_logs_removes_old_records_below_a_level,
            ],
            masters: [
                masters_register_heartbeat_and_list,
                an_expired_master_loses_its_claims_and_its_builds_end_as_retry,
                a_live_master_is_never_expired,
                registering_a_master_again_takes_back_its_earlier_work,
                deactivating_a_master_releases_its_claims,
            ],
            input: [
                invalid_input_is_refused_with_typed_errors,
                unknown_ids_are_not_found,
            ],
            batches: [
                adding_many_buildsets_is_all_or_nothing_and_keeps_their_order,
                starting_available_work_claims_and_numbers_builds_in_their_slots,
                starting_available_work_completes_cancel_flagged_requests_instead,
                started_builds_and_their_requests_are_returned_as_stored,
                concurrent_starts_from_several_masters_never_start_a_request_twice,
                finishing_and_settling_completes_or_releases_requests_and_refuses_foreign_builds,
            ],
            children: [
                builders_record_their_dependencies,
                the_latest_build_with_given_results_is_found_by_completion_time,
                children_are_found_by_their_parent_request_and_adopted_by_a_new_build,
                cancelling_a_request_cancels_its_waited_for_children_recursively,
            ],
            outbox: [
                nothing_is_written_to_the_outbox_while_no_reporter_is_registered,
                every_lifecycle_change_writes_its_event_in_the_same_transaction,
                a_new_reporter_starts_at_the_end_of_the_outbox_and_a_known_one_keeps_its_place,
                only_one_master_holds_a_reporters_lease_until_it_runs_out,
                delivery_progress_is_refused_without_the_lease,
                pruning_the_outbox_keeps_what_any_reporter_still_needs,
            ],
            queries: [
                collection_queries_filter_order_and_page_in_the_database,
                the_priority_of_an_open_request_can_change,
                an_expired_master_starts_nothing_until_it_registers_again,
            ],
            operators: [
                a_paused_builder_keeps_its_queue_until_resumed_while_other_builders_run,
                a_second_submit_with_the_same_idempotency_key_returns_the_first_buildset,
                concurrent_submits_with_shared_keys_from_several_stores_make_one_buildset_per_key,
                a_delayed_request_waits_for_its_time_while_due_work_runs,
                a_retried_build_keeps_its_result_and_its_request_waits_out_the_backoff,
                deleting_a_buildset_takes_its_builds_and_outputs_and_refuses_unfinished_work,
                retention_keeps_the_newest_and_the_recent_and_deletes_the_rest_in_batches,
                retention_deletes_the_source_stamps_no_buildset_left_names,
                a_buildset_submitted_while_retention_deletes_its_stamp_still_names_it,
                a_collapsing_builder_runs_the_newest_of_identical_requests_and_skips_the_rest,
                a_builder_is_served_while_an_active_master_runs_it,
            ],
            locks: [
                a_build_starts_only_with_its_lock_units_free_and_frees_them_when_it_finishes,
                an_expired_master_frees_the_locks_its_builds_held,
                masters_claiming_at_once_never_hold_more_units_than_a_lock_has,
                lock_definitions_and_uses_are_checked,
            ],
            shapes: [
                outbox_seqs_are_never_reused_after_the_prune_empties_the_outbox,
                a_reporters_pending_count_is_every_event_past_its_cursor,
                claim_capacity_goes_to_builders_with_queued_work_in_buildbots_order,
                unclaimed_requests_in_collection_queries_exclude_complete_ones,
            ],
        );
    };
    (@sections $open:path; $($section:ident: [$($name:ident),* $(,)?]),* $(,)?) => {
        $($(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                let Some(harness) = $crate::conformance::MaybeHarness::harness($open().await?) else {
                    return Ok(());
                };
                $crate::conformance::$section::$name(&harness).await
            }
        )*)*

        #[test]
        fn every_rule_function_of_the_conformance_suite_runs_here() -> anyhow::Result<()> {
            let listed = [$($((stringify!($section), stringify!($name))),*),*];
            $crate::conformance::check_every_rule_is_listed(&listed)
        }
    };
}

/// Fails unless every `pub async fn` rule in the section files under
/// `tests/conformance/` is in `listed` as (section, name), and nothing else is.
pub fn check_every_rule_is_listed(listed: &[(&str, &str)]) -> Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let Some(section) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if section == "mod" || path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            if let Some(rest) = line.strip_prefix("pub async fn ")
                && let Some((name, _)) = rest.split_once('(')
            {
                found.insert((section.to_owned(), name.to_owned()));
            }
        }
    }
    let listed: BTreeSet<(String, String)> = listed
        .iter()
        .map(|(s, n)| ((*s).to_owned(), (*n).to_owned()))
        .collect();
    let missing: Vec<_> = found.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&found).collect();
    ensure!(
        missing.is_empty() && stale.is_empty(),
        "rules not in conformance_tests! (they never run): {missing:?}; listed but not found: {stale:?}"
    );
    Ok(())
}

// ---- helpers ----

fn at(seconds: i64) -> Timestamp {
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
    Ok(store.master_register(name, at(0)).await?.master_id)
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
            started_at: at(10),
        })
        .await?)
}

/// The end of a build with a result and nothing else.
fn finish(build: &kiln_model::Build, results: ResultCode, at: Timestamp) -> FinishedBuild {
    FinishedBuild {
        build_id: build.id,
        request_id: build.request_id,
        results,
        return_value: None,
        error: None,
        traceback: None,
        state_string: None,
        artifacts: Vec::new(),
        complete_at: at,
        retry_at: None,
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
        .build_finish(master, &finish(&build, results, at))
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
        collapse: Vec::new(),
        lock_builders: Vec::new(),
    }
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
