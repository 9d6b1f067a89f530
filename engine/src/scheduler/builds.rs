//! Running started builds, and recording their ends in batches.
//!
//! Each started build runs in its own task ([`run_build`]), which ends by handing a
//! [`Done`] to the finisher. The finisher ([`finisher_loop`]) takes everything that
//! has finished meanwhile and records it in one transaction
//! (`build_finish_batch`):
//! under load many builds share a commit, when idle a build is recorded at once.

use std::sync::Arc;
use std::time::Duration;

use kiln_job::{BuildContext, BuildSpec, Outcome, StopReason};
use kiln_model::{Build, BuildRequest, ResultCode};
use kiln_storage::{
    BuildField, CompletedBuildset, FinishOutcome, FinishedBuild, Query, StartedBuild,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, warn};

use super::{RegisteredBuilder, Runtime, SchedulerState, artifacts, triggers};
use crate::events::Event;
use crate::retry::Verdict;

/// The most finished builds recorded in one transaction.
pub(super) const FINISH_BATCH: usize = 512;
/// How often recording a batch is tried (a busy database) before it is split in halves
/// to find a build whose end cannot be written.
const BATCH_ATTEMPTS: u32 = 3;
/// The first pause between attempts; it doubles up to [`FINISH_RETRY_MAX`].
const FINISH_RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between attempts.
const FINISH_RETRY_MAX: Duration = Duration::from_secs(5);

/// A build that has run, waiting to be recorded.
pub(super) struct Done {
    builder: Arc<RegisteredBuilder>,
    slot: i64,
    build: Build,
    request: BuildRequest,
    end: FinishedBuild,
}

/// Applies the builder's retry policy to a build's outcome: the outcome to record, and
/// when its request may run again if it is retried. Attempts are the request's builds,
/// counted only when the result may be retried.
async fn retry_verdict(
    shared: &SchedulerState,
    builder: &RegisteredBuilder,
    request: &BuildRequest,
    mut outcome: Outcome,
) -> (Outcome, Option<kiln_model::Timestamp>) {
    let policy = builder.config.retry;
    if !policy.may_retry(outcome.results) {
        return (outcome, None);
    }
    let attempts = Query::new()
        .eq(BuildField::RequestId, request.id.0)
        .counted()
        .limit(1);
    let attempt = match shared.store.build_query(&attempts).await {
        Ok(page) => u32::try_from(page.total.unwrap_or(1)).unwrap_or(u32::MAX),
        Err(e) => {
            // Without the count, a job's RETRY runs again at once (as it did before
            // retry policies) and anything else completes.
            warn!(request = %request.id, error = %e, "could not count the request's attempts; not retrying");
            return (outcome, None);
        }
    };
    match policy.verdict(outcome.results, attempt, fastrand::f64()) {
        Verdict::Complete => (outcome, None),
        // At once: released without a time, as RETRY always was.
        Verdict::Retry(wait) if wait.is_zero() => (outcome, None),
        Verdict::Retry(wait) => {
            let at = kiln_model::now()
                + chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::MAX);
            debug!(request = %request.id, attempt, ?wait, results = %outcome.results, "retrying");
            (outcome, Some(at))
        }
        Verdict::GiveUp(why) => {
            outcome.results = ResultCode::Exception;
            outcome.error = Some(why);
            (outcome, None)
        }
    }
}

/// Runs one started build and hands its end to the finisher.
pub(super) async fn run_build(
    shared: Arc<SchedulerState>,
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
        Some(root) => {
            artifacts::prepare(
                &shared.staging,
                root,
                &builder.config.name,
                shared.master.0,
                slot,
                build.number,
            )
            .await
        }
        None => None,
    };
    let mut spec = BuildSpec {
        build: build.clone(),
        builder: builder.config.name.clone(),
        buildset_id: request.buildset_id,
        reason: context.reason,
        args: builder.config.args.clone(),
        kwargs: builder.config.kwargs.clone(),
        dependencies: Vec::new(),
        properties: context.properties,
        sourcestamps: context.sourcestamps,
        priority: request.priority,
        depth: context.depth,
        limits: builder.config.limits,
        result_dir: result_dir.as_ref().map(|d| d.staging.clone()),
        stop: stop.clone(),
    };
    let outcome = match triggers::resolve_dependencies(&shared, &builder, &spec).await {
        Ok(resolved) => {
            spec.args = resolved.args;
            spec.kwargs = resolved.kwargs;
            spec.dependencies = resolved.dependencies;
            let ctx = BuildContext::new(spec, Arc::new(Runtime(shared.clone())));
            let outcome = execute(&shared, &builder, ctx.clone(), stop.clone()).await;
            let outcome = with_verdict(outcome, ctx.verdict());
            match ctx.breached() {
                // A limit the job went past decides, unless the build was stopped.
                Some(reason) if outcome.results != ResultCode::Cancelled => {
                    Outcome::exception(reason, None)
                }
                _ => outcome,
            }
        }
        Err(outcome) => outcome,
    };
    // What the job wrote is stored before its end, and nothing it writes later is.
    shared.outputs.close(&shared, build.id).await;
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
    // A stopped build is not the job's verdict: a shutdown's RETRY runs again at once.
    let stopped = stop.borrow().is_some();
    let (outcome, retry_at) = if stopped {
        (outcome, None)
    } else {
        retry_verdict(&shared, &builder, &request, outcome).await
    };
    let artifacts = match result_dir {
        Some(dir) => artifacts::collect(&shared.staging, dir).await,
        None => Vec::new(),
    };
    let end = FinishedBuild {
        build_id: build.id,
        request_id: request.id,
        results: outcome.results,
        state_string: Some(final_state(&outcome)),
        return_value: outcome.return_value,
        error: outcome.error,
        traceback: outcome.traceback,
        artifacts,
        complete_at: kiln_model::now(),
        retry_at,
    };
    let finished = Done {
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
    shared: Arc<SchedulerState>,
    mut finished: mpsc::UnboundedReceiver<Done>,
) {
    let mut batch = Vec::new();
    while finished.recv_many(&mut batch, FINISH_BATCH).await > 0 {
        settle(&shared, std::mem::take(&mut batch)).await;
    }
}

async fn settle(shared: &SchedulerState, mut batch: Vec<Done>) {
    let (settled, unrecorded) = record(shared, &mut batch).await;
    for f in &batch {
        if unrecorded.contains(&f.end.build_id) {
            continue;
        }
        if settled.refused.contains(&f.end.build_id) {
            // The master was expired meanwhile and another finished the build as
            // RETRY: this late result must not be merged.
            warn!(build = %f.end.build_id, "build finished after this master lost it; result discarded");
            continue;
        }
        debug!(build = %f.end.build_id, builder = %f.builder.config.name, results = %f.end.results, "build finished");
        shared.metrics.build_finished(
            &f.builder.config.name,
            f.end.results,
            (f.end.complete_at - f.build.started_at).as_seconds_f64(),
        );
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
    let mut running = shared.running();
    for f in &batch {
        running.remove(&f.end.build_id);
        f.builder.release_slot(f.slot);
        shared.outputs.forget(f.end.build_id);
    }
    drop(running);
    shared
        .in_flight
        .send_modify(|n| *n = n.saturating_sub(batch.len()));
    if settled.released.is_empty() {
        shared.room_freed();
    } else {
        // Retried requests are back in the queue.
        shared.wake_claims();
    }
}

/// What recording a batch did, and the builds it could not record because the engine
/// stopped first (their master's shutdown or expiry ends them as RETRY).
type Recorded = (FinishOutcome, Vec<kiln_model::BuildId>);

/// Records a batch of ends. When the batch cannot be written, it is split in halves
/// until the build at fault is alone, so that one bad row never holds back the others;
/// that build is then recorded as EXCEPTION with the reason (see [`record_one`]).
fn record<'a>(
    shared: &'a SchedulerState,
    batch: &'a mut [Done],
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Recorded> + Send + 'a>> {
    Box::pin(async move {
        if batch.len() == 1 {
            return record_one(shared, &mut batch[0]).await;
        }
        let ends: Vec<FinishedBuild> = batch.iter().map(|f| f.end.clone()).collect();
        match attempt(shared, &ends, BATCH_ATTEMPTS).await {
            Ok(settled) => (settled, Vec::new()),
            Err(e) => {
                warn!(error = %e, builds = ends.len(), "recording finished builds failed; recording them in halves");
                let (left, right) = batch.split_at_mut(batch.len() / 2);
                let (mut settled, mut unrecorded) = record(shared, left).await;
                let (more, lost) = record(shared, right).await;
                settled.refused.extend(more.refused);
                settled.completed.extend(more.completed);
                settled.released.extend(more.released);
                settled.buildsets_completed.extend(more.buildsets_completed);
                unrecorded.extend(lost);
                (settled, unrecorded)
            }
        }
    })
}

/// Records one build's end. If it cannot be written but the same build ending as
/// EXCEPTION can, its end was at fault: the build ends as EXCEPTION with the reason and
/// without what it returned. If neither can be written, the database is at fault: both
/// are tried again, with growing pauses, until one is recorded or the engine stops. A
/// build never stays running on a live master that no longer runs it.
async fn record_one(shared: &SchedulerState, f: &mut Done) -> Recorded {
    let master = shared.master;
    let mut pause = FINISH_RETRY_FIRST;
    loop {
        let error = match attempt(shared, std::slice::from_ref(&f.end), BATCH_ATTEMPTS).await {
            Ok(settled) => return (settled, Vec::new()),
            Err(e) => e,
        };
        let fallback = FinishedBuild {
            results: ResultCode::Exception,
            return_value: None,
            error: Some(format!("the build's end could not be recorded: {error}")),
            traceback: None,
            state_string: Some("exception: its end could not be recorded".into()),
            artifacts: Vec::new(),
            ..f.end.clone()
        };
        match shared
            .store
            .build_finish_batch(master, std::slice::from_ref(&fallback))
            .await
        {
            Ok(settled) => {
                error!(build = %f.end.build_id, error = %error, "a finished build could not be recorded; it ends as EXCEPTION");
                f.end = fallback;
                return (settled, Vec::new());
            }
            Err(e) => {
                if shared.is_stopping() {
                    error!(build = %f.end.build_id, error = %e, "the engine stopped before a finished build could be recorded; its request will run again");
                    return (FinishOutcome::default(), vec![f.end.build_id]);
                }
                error!(build = %f.end.build_id, error = %e, ?pause, "cannot record a finished build; the database seems unavailable, trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(FINISH_RETRY_MAX);
            }
        }
    }
}

/// Up to `attempts` tries at one transaction, with a short pause between them (a busy
/// database); the last error if all fail.
async fn attempt(
    shared: &SchedulerState,
    ends: &[FinishedBuild],
    attempts: u32,
) -> kiln_storage::Result<FinishOutcome> {
    let mut pause = FINISH_RETRY_FIRST;
    let mut tried = 1;
    loop {
        match shared.store.build_finish_batch(shared.master, ends).await {
            Ok(settled) => return Ok(settled),
            Err(e) if tried >= attempts => return Err(e),
            Err(e) => {
                debug!(error = %e, builds = ends.len(), attempt = tried, "recording finished builds failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(FINISH_RETRY_MAX);
                tried += 1;
            }
        }
    }
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

pub(super) fn emit_completed(shared: &SchedulerState, completed: Vec<CompletedBuildset>) {
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
    shared: &SchedulerState,
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
