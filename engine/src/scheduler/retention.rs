//! The retention task: applies the builders' retention policies in bounded batches and
//! prunes old log records, every `retention_interval`, until the engine stops.

use std::sync::Arc;

use kiln_storage::RetentionSweep;
use tracing::{info, warn};

use super::{SchedulerState, artifacts};
use crate::retention::{MAX_RETENTION_BATCHES, RoundOutcome};

pub(crate) async fn retention_loop(shared: Arc<SchedulerState>) {
    let mut stopping = shared.stopping_signal();
    loop {
        tokio::select! {
            () = tokio::time::sleep(shared.config.retention_interval) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        if let Err(e) = round(&shared).await {
            warn!(error = %e, "retention failed; trying again at the next round");
        }
    }
}

/// One round: every builder with a policy, then the logs. Public to the crate so that
/// an engine can be asked to apply retention now.
pub(crate) async fn round(shared: &SchedulerState) -> kiln_storage::Result<RoundOutcome> {
    let mut outcome = RoundOutcome::default();
    let builders: Vec<_> = shared
        .builders
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .values()
        .filter_map(|b| b.config.retention.map(|p| (b.id, b.config.name.clone(), p)))
        .collect();
    let batch = shared.config.retention_batch;
    for (id, name, policy) in builders {
        let cutoff = kiln_model::now()
            - chrono::TimeDelta::from_std(policy.keep_for).unwrap_or(chrono::TimeDelta::MAX);
        for _ in 0..MAX_RETENTION_BATCHES {
            let swept = shared
                .store
                .retention_sweep(&RetentionSweep {
                    builder_id: id,
                    cutoff,
                    keep_last: policy.keep_last,
                    batch,
                })
                .await?;
            if swept.busy {
                // Another master is sweeping: it finishes the job.
                return Ok(outcome);
            }
            let full =
                swept.builds.len() as u64 >= u64::from(batch) || swept.requests >= u64::from(batch);
            outcome.builds += swept.builds.len() as u64;
            outcome.requests += swept.requests;
            outcome.buildsets += swept.buildsets;
            outcome.sourcestamps += swept.sourcestamps;
            if let Some(root) = &shared.config.results_dir {
                let dirs = swept
                    .builds
                    .iter()
                    .map(|b| (name.clone(), b.number))
                    .collect();
                artifacts::remove(root, dirs).await;
            }
            if !full {
                break;
            }
        }
    }
    if let Some(logs) = shared.config.log_retention {
        let cutoff = kiln_model::now()
            - chrono::TimeDelta::from_std(logs.keep_for).unwrap_or(chrono::TimeDelta::MAX);
        outcome.log_records = shared.store.log_prune(cutoff, logs.below).await?;
    }
    if outcome != RoundOutcome::default() {
        info!(
            builds = outcome.builds,
            requests = outcome.requests,
            buildsets = outcome.buildsets,
            sourcestamps = outcome.sourcestamps,
            log_records = outcome.log_records,
            "retention deleted old work"
        );
    }
    Ok(outcome)
}
