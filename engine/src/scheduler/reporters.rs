//! Delivering the outbox to reporters: one task per reporter per engine, of which the
//! one holding the reporter's lease delivers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tracing::{debug, error, warn};

use super::SchedulerState;
use super::builds::{CatchUnwind, panic_message};
use crate::events::Event;
use crate::reporting::{OUTBOX_BATCH, ReporterConfig};
use kiln_job::Reporter;
use kiln_model::{ReporterState, Timestamp};
use kiln_storage::ReporterProgress;

fn after(now: Timestamp, d: Duration) -> Timestamp {
    now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Delivers a reporter's events until the engine stops.
pub(crate) async fn deliver_loop(
    shared: Arc<SchedulerState>,
    config: ReporterConfig,
    reporter: Arc<dyn Reporter>,
) {
    let mut events = shared.events.subscribe();
    let mut stopping = shared.stopping.subscribe();
    let mut last_prune = std::time::Instant::now();
    loop {
        if shared.is_stopping() {
            return;
        }
        let now = kiln_model::now();
        let pause = match shared
            .store
            .reporter_lease(&config.name, shared.master, now, after(now, config.lease))
            .await
        {
            Ok(Some(state)) => match deliver(&shared, &config, reporter.as_ref(), state).await {
                Pass::Idle => None,
                Pass::Backoff(d) => Some(d),
            },
            // Another master delivers; look again when its lease may have run out.
            Ok(None) => Some(config.lease / 2),
            Err(e) => {
                warn!(reporter = %config.name, error = %e, "could not lease the reporter");
                Some(shared.config.poll_interval)
            }
        };
        if last_prune.elapsed() >= shared.config.outbox_prune_interval {
            last_prune = std::time::Instant::now();
            match shared.store.outbox_prune().await {
                Ok(n) if n > 0 => {
                    debug!(events = n, "pruned delivered events from the outbox");
                    shared.emit(Event::OutboxPruned { events: n });
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "could not prune the outbox"),
            }
        }
        let wait = pause.unwrap_or(shared.config.poll_interval);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopping.wait_for(|s| *s) => return,
            event = events.recv(), if pause.is_none() => match event {
                // New work may have written events: take everything queued, then read.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    while events.try_recv().is_ok() {}
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

enum Pass {
    /// Everything there was is dealt with.
    Idle,
    /// A delivery failed: try again after this pause.
    Backoff(Duration),
}

/// Delivers what the outbox holds past the reporter's cursor, under the lease.
async fn deliver(
    shared: &SchedulerState,
    config: &ReporterConfig,
    reporter: &dyn Reporter,
    state: ReporterState,
) -> Pass {
    let mut cursor = state.cursor;
    let mut attempts = state.attempts;
    loop {
        let batch = match shared.store.outbox_read(cursor, OUTBOX_BATCH).await {
            Ok(b) => b,
            Err(e) => {
                warn!(reporter = %config.name, error = %e, "could not read the outbox");
                return Pass::Backoff(shared.config.poll_interval);
            }
        };
        if batch.is_empty() {
            return Pass::Idle;
        }
        let mut progress = ReporterProgress {
            name: config.name.clone(),
            master: shared.master,
            cursor,
            delivered: 0,
            dropped: Vec::new(),
            attempts,
            last_error: None,
            lease_until: kiln_model::now(),
            now: kiln_model::now(),
        };
        let mut failed = None;
        for event in &batch {
            if !config.wants(event) {
                progress.cursor = event.seq;
                continue;
            }
            let result = match CatchUnwind(reporter.report(event)).await {
                Ok(r) => r,
                Err(panic) => Err(format!("the reporter panicked: {}", panic_message(panic))),
            };
            match result {
                Ok(()) => {
                    progress.delivered += 1;
                    progress.cursor = event.seq;
                    progress.attempts = 0;
                }
                Err(reason) => {
                    progress.attempts += 1;
                    if progress.attempts >= config.max_attempts {
                        error!(reporter = %config.name, seq = event.seq, attempts = progress.attempts, error = %reason,
                               "giving up on an event after the last attempt");
                        progress
                            .dropped
                            .push((event.seq, progress.attempts, reason));
                        progress.cursor = event.seq;
                        progress.attempts = 0;
                        continue;
                    }
                    warn!(reporter = %config.name, seq = event.seq, attempt = progress.attempts, error = %reason,
                          "delivery failed; retrying later");
                    progress.last_error = Some(reason);
                    failed = Some(config.backoff(progress.attempts));
                    break;
                }
            }
        }
        let now = kiln_model::now();
        progress.now = now;
        progress.lease_until = after(now, config.lease);
        if let Err(e) = shared.store.reporter_progress(&progress).await {
            // Lost the lease (or the database): whoever holds it now starts from the
            // stored cursor, so some events may be delivered twice, never lost.
            warn!(reporter = %config.name, error = %e, "could not record delivery progress");
            return Pass::Backoff(config.lease / 2);
        }
        shared.emit(Event::ReporterProgress {
            reporter: config.name.clone(),
            cursor: progress.cursor,
            delivered: progress.delivered,
            dropped: progress.dropped.len() as u64,
            last_error: progress
                .last_error
                .clone()
                .or_else(|| progress.dropped.last().map(|(_, _, e)| e.clone())),
        });
        cursor = progress.cursor;
        attempts = progress.attempts;
        if let Some(pause) = failed {
            return Pass::Backoff(pause);
        }
    }
}
