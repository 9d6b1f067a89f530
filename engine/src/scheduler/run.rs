//! Running started builds, and recording their ends in batches.
//!
//! Each started build runs in its own task ([`run_build`]), which ends by handing a
//! [`Finished`] to the finisher. The finisher ([`finisher_loop`]) takes everything that
//! has finished meanwhile and records it in one transaction
//! ([`Store::build_finish_and_settle`](crate::storage::Store::build_finish_and_settle)):
//! under load many builds share a commit, when idle a build is recorded at once.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, error, warn};

use super::relations::{self, Parent};
use super::{RegisteredBuilder, Shared, artifacts};
use crate::events::Event;
use crate::executor::{BuildContext, ContextInner, Outcome, StopReason};
use crate::model::{Build, BuildRequest, Properties, ResultCode};
use crate::storage::{BuildEnd, CompletedBuildset, StartedBuild};

/// The most finished builds recorded in one transaction.
pub(super) const FINISH_BATCH: usize = 512;
/// How often recording a batch is tried before its builds are left for master expiry.
const FINISH_ATTEMPTS: u32 = 8;
/// The first pause between attempts; it doubles up to [`FINISH_RETRY_MAX`].
const FINISH_RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between attempts.
const FINISH_RETRY_MAX: Duration = Duration::from_secs(5);

/// A build that has run, waiting to be recorded.
pub(super) struct Finished {
    builder: Arc<RegisteredBuilder>,
    slot: i64,
    build: Build,
    request: BuildRequest,
    end: BuildEnd,
}

/// Runs one started build and hands its end to the finisher.
pub(super) async fn run_build(
    shared: Arc<Shared>,
    builder: Arc<RegisteredBuilder>,
    started: StartedBuild,
    slot: i64,
    stop: watch::Receiver<Option<StopReason>>,
) {
    let StartedBuild {
        request,
        build,
        context,
    } = started;
    debug!(build = %build.id, builder = %builder.config.name, number = build.number, "build started");
    let result_dir = match &shared.config.results_dir {
        Some(root) => artifacts::prepare(root, &builder.config.name, build.number).await,
        None => None,
    };
    let parent = Parent {
        build: build.clone(),
        builder: builder.config.name.clone(),
        priority: request.priority,
        sourcestamps: context.sourcestamps,
        stop: stop.clone(),
    };
    let outcome = match relations::resolve_dependencies(&shared, &builder, &parent).await {
        Ok(resolved) => {
            let ctx = BuildContext::new(ContextInner {
                build: build.clone(),
                builder: builder.config.name.clone(),
                buildset_id: request.buildset_id,
                reason: context.reason,
                args: resolved.args,
                kwargs: resolved.kwargs,
                dependencies: resolved.dependencies,
                buildset_properties: context.properties,
                build_properties: Mutex::new(Properties::new()),
                store: shared.store.clone(),
                result_dir: result_dir.clone(),
                shared: shared.clone(),
                parent,
                triggers: AtomicU32::new(0),
                verdict: Mutex::new(None),
            });
            let outcome = execute(&shared, &builder, ctx.clone(), stop.clone()).await;
            with_verdict(outcome, ctx.verdict())
        }
        Err(outcome) => outcome,
    };
    let outcome = match *stop.borrow() {
        Some(StopReason::Cancelled) => Outcome {
            results: ResultCode::Cancelled,
            ..outcome
        },
        Some(StopReason::Shutdown) => Outcome {
            results: ResultCode::Retry,
            error: Some("the engine shut down while the build ran; it will run again".into()),
            ..outcome
        },
        Some(StopReason::MasterLost) | None => outcome,
    };
    let artifacts = match result_dir {
        Some(dir) => artifacts::collect(dir).await,
        None => Vec::new(),
    };
    let end = BuildEnd {
        build_id: build.id,
        request_id: request.id,
        results: outcome.results,
        state_string: Some(final_state(&outcome)),
        return_value: outcome.return_value,
        error: outcome.error,
        traceback: outcome.traceback,
        artifacts,
        complete_at: crate::model::now(),
    };
    let finished = Finished {
        builder,
        slot,
        build,
        request,
        end,
    };
    if let Err(mpsc::error::SendError(lost)) = shared.finished.send(finished) {
        // Only possible while the engine is being torn down: the build stays running in
        // the database and is taken back when this master restarts or is expired.
        warn!(build = %lost.end.build_id, "engine stopped before the build's end could be recorded");
    }
}

/// Records finished builds in batches until the engine stops.
pub(super) async fn finisher_loop(
    shared: Arc<Shared>,
    mut finished: mpsc::UnboundedReceiver<Finished>,
) {
    let mut batch = Vec::new();
    while finished.recv_many(&mut batch, FINISH_BATCH).await > 0 {
        settle(&shared, std::mem::take(&mut batch)).await;
    }
}

async fn settle(shared: &Shared, batch: Vec<Finished>) {
    let ends: Vec<BuildEnd> = batch.iter().map(|f| f.end.clone()).collect();
    let mut pause = FINISH_RETRY_FIRST;
    let mut attempt = 1;
    let settled = loop {
        match shared
            .store
            .build_finish_and_settle(shared.master, &ends)
            .await
        {
            Ok(settled) => break Some(settled),
            Err(e) if attempt < FINISH_ATTEMPTS => {
                warn!(error = %e, builds = ends.len(), attempt, "recording finished builds failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(FINISH_RETRY_MAX);
                attempt += 1;
            }
            Err(e) => {
                error!(
                    error = %e, builds = ends.len(),
                    "could not record finished builds; they stay running until this master restarts or is expired"
                );
                break None;
            }
        }
    };
    if let Some(settled) = settled {
        for f in &batch {
            if settled.refused.contains(&f.end.build_id) {
                // The master was expired meanwhile and another finished the build as
                // RETRY: this late result must not be merged.
                warn!(build = %f.end.build_id, "build finished after this master lost it; result discarded");
                continue;
            }
            debug!(build = %f.end.build_id, builder = %f.builder.config.name, results = %f.end.results, "build finished");
            shared.emit(Event::BuildFinished {
                build_id: f.end.build_id,
                number: f.build.number,
                builder: f.builder.config.name.clone(),
                request_id: f.request.id,
                buildset_id: f.request.buildset_id,
                results: f.end.results,
            });
        }
        emit_completed(shared, settled.buildsets_completed);
    }
    let mut running = shared.running();
    for f in &batch {
        running.remove(&f.end.build_id);
        f.builder.release_slot(f.slot);
    }
    drop(running);
    shared
        .in_flight
        .send_modify(|n| *n = n.saturating_sub(batch.len()));
    shared.wake.notify_one();
}

/// A job's outcome combined with the verdicts of the policies it waited on: the worse
/// result wins, as a Buildbot build takes the worst of its steps.
fn with_verdict(outcome: Outcome, verdict: Option<(ResultCode, String)>) -> Outcome {
    let Some((verdict, relationship)) = verdict else {
        return outcome;
    };
    let results = outcome.results.worst(verdict);
    if results == outcome.results {
        return outcome;
    }
    Outcome {
        results,
        error: outcome.error.or_else(|| {
            Some(format!(
                "its children ended {verdict} under the {relationship} policy"
            ))
        }),
        ..outcome
    }
}

/// The state string a finished build shows, as Buildbot's "build successful".
fn final_state(outcome: &Outcome) -> String {
    let first_line = outcome
        .error
        .as_deref()
        .and_then(|e| e.lines().next())
        .unwrap_or("");
    let with_error = |what: &str| {
        if first_line.is_empty() {
            what.to_owned()
        } else {
            format!("{what}: {first_line}")
        }
    };
    match outcome.results {
        ResultCode::Success => "build successful".into(),
        ResultCode::Warnings => "build finished with warnings".into(),
        ResultCode::Failure => with_error("failed"),
        ResultCode::Skipped => "skipped".into(),
        ResultCode::Exception => with_error("exception"),
        ResultCode::Retry => with_error("will retry"),
        ResultCode::Cancelled => "cancelled".into(),
    }
}

pub(super) fn emit_completed(shared: &Shared, completed: Vec<CompletedBuildset>) {
    for bs in completed {
        shared.emit(Event::BuildsetComplete {
            buildset_id: bs.buildset_id,
            results: bs.results,
        });
    }
}

/// Runs the executor so that a panic becomes EXCEPTION, and drops it if it ignores a
/// stop request for longer than the cancel grace period.
async fn execute(
    shared: &Shared,
    builder: &RegisteredBuilder,
    ctx: BuildContext,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> Outcome {
    let executor = builder.executor.clone();
    // Polled in place under catch_unwind: a task of its own per build cost a spawn and
    // a wake-up per job for nothing but panic isolation.
    let job = CatchUnwind(executor.execute(ctx));
    let grace = shared.config.cancel_grace;
    let stopped_and_ignored = async {
        // The sender lives in the running map until this build is recorded; if it were
        // dropped, waiting forever just leaves the job to finish on its own.
        if stop.wait_for(|s| s.is_some()).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        finished = job => match finished {
            Ok(outcome) => outcome,
            Err(panic) => Outcome::exception(format!("the job panicked: {}", panic_message(panic)), None),
        },
        () = stopped_and_ignored => Outcome::with_results(ResultCode::Cancelled, None),
    }
}

/// A future that turns a panic while polling into an error value.
pub(super) struct CatchUnwind<F>(pub(super) F);

impl<F: std::future::Future + Unpin> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::pin::Pin::new(inner).poll(cx)
        })) {
            Ok(std::task::Poll::Ready(value)) => std::task::Poll::Ready(Ok(value)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

pub(super) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}
