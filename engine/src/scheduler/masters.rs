//! The heartbeat service: keeps this master alive and expires masters that went silent.
//!
//! Every heartbeat interval it records a heartbeat, then expires every other master
//! silent for longer than the expiry interval: their claims go back to the queue and
//! their unfinished builds end as RETRY. If this master finds itself expired (it was
//! paused or cut off for too long), its running builds are no longer its own: they are
//! told to stop, their late results are refused by the store, and it registers again.

use std::sync::Arc;

use chrono::TimeDelta;
use tracing::{error, info, warn};

use super::SchedulerState;
use crate::events::Event;
use kiln_job::StopReason;
use kiln_storage::{ExpireMasters, StorageError};

pub(super) async fn heartbeat_loop(shared: Arc<SchedulerState>) {
    let mut stopping = shared.stopping.subscribe();
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        beat(&shared).await;
        expire_others(&shared).await;
    }
}

async fn beat(shared: &SchedulerState) {
    let now = kiln_model::now();
    match shared.store.master_heartbeat(shared.master, now).await {
        Ok(()) => {}
        Err(StorageError::MasterInactive(_)) => {
            let n = shared.stop_builds(StopReason::MasterLost, |_| true);
            error!(master = %shared.master, builds = n, "this master was expired by another; its builds were re-queued elsewhere, registering again");
            match shared
                .store
                .master_register(&shared.config.master_name, now)
                .await
            {
                Ok(_) => shared.wake_claims(),
                Err(e) => error!(error = %e, "could not register the master again"),
            }
        }
        Err(e) => warn!(error = %e, "heartbeat failed"),
    }
}

async fn expire_others(shared: &SchedulerState) {
    let now = kiln_model::now();
    let expiry = TimeDelta::from_std(shared.config.master_expiry).unwrap_or(TimeDelta::MAX);
    let silent_since = now
        .checked_sub_signed(expiry)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let params = ExpireMasters {
        by: shared.master,
        silent_since,
        now,
    };
    match shared.store.master_expire_stale(&params).await {
        Ok(expired) => {
            for master in expired {
                info!(
                    master = %master.master_id, name = %master.name, released = master.released.len(),
                    retried = master.retried_builds.len(), "expired a silent master; its work is back in the queue"
                );
                shared.emit(Event::MasterExpired {
                    master_id: master.master_id,
                    name: master.name,
                    released: master.released,
                });
                shared.wake_claims();
            }
        }
        Err(e) => warn!(error = %e, "expiring silent masters failed"),
    }
}
