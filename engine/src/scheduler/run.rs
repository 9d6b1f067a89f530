//! Running one claimed request: start a build, execute it, record the outcome, complete
//! or requeue the request.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{RegisteredBuilder, RunningBuild, Shared};
use crate::events::Event;
use crate::executor::{BuildContext, ContextInner, Outcome, StopReason};
use crate::model::{Build, BuildRequest, Properties, ResultCode};
use crate::storage::{FinishBuild, NewBuild, StorageError};

/// Runs a claimed request to the end and frees its slot, whatever happens.
pub(super) async fn run_request(
    shared: Arc<Shared>,
    builder: Arc<RegisteredBuilder>,
    request: BuildRequest,
    slot: u32,
) {
    if let Err(e) = run(&shared, &builder, &request, slot).await {
        error!(request = %request.id, builder = %builder.config.name, error = %e, "running a build request failed");
        // Give the request back so that it is not stuck until this master expires.
        if let Err(e) = shared
            .store
            .request_unclaim(&[request.id], shared.master)
            .await
        {
            warn!(request = %request.id, error = %e, "could not release the claim; master expiry will");
        }
    }
    builder.release_slot(slot);
    shared.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    shared.wake.notify_one();
}

async fn run(
    shared: &Arc<Shared>,
    builder: &RegisteredBuilder,
    request: &BuildRequest,
    slot: u32,
) -> crate::storage::Result<()> {
    let store = &shared.store;
    if request.cancel_requested {
        // Cancelled while claimed elsewhere, then released: complete it without a build.
        let completed = store
            .request_complete(&[request.id], ResultCode::Cancelled, crate::model::now())
            .await?;
        shared.emit(Event::RequestCompleted {
            request_id: request.id,
            results: ResultCode::Cancelled,
        });
        emit_completed(shared, completed);
        return Ok(());
    }
    let build = store
        .build_add(&NewBuild {
            request_id: request.id,
            master_id: shared.master,
            worker_slot: Some(i64::from(slot)),
            state_string: "starting".into(),
            started_at: crate::model::now(),
        })
        .await?;
    let (stop_tx, stop_rx) = watch::channel(None);
    shared.running().insert(
        build.id,
        RunningBuild {
            request_id: request.id,
            stop: stop_tx,
        },
    );
    let result = execute_and_record(shared, builder, request, &build, stop_rx).await;
    shared.running().remove(&build.id);
    result
}

async fn execute_and_record(
    shared: &Arc<Shared>,
    builder: &RegisteredBuilder,
    request: &BuildRequest,
    build: &Build,
    stop: watch::Receiver<Option<StopReason>>,
) -> crate::storage::Result<()> {
    let store = &shared.store;
    shared.emit(Event::BuildStarted {
        build_id: build.id,
        number: build.number,
        builder: builder.config.name.clone(),
        request_id: request.id,
        buildset_id: request.buildset_id,
    });
    debug!(build = %build.id, builder = %builder.config.name, number = build.number, "build started");

    let outcome = match context(shared, builder, request, build, stop.clone()).await {
        Ok(ctx) => execute(shared, builder, ctx, stop.clone()).await,
        Err(e) => Outcome::exception(format!("could not prepare the build: {e}"), None),
    };
    let stopped = *stop.borrow();
    let outcome = match stopped {
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
    let finished = store
        .build_finish(&FinishBuild {
            build_id: build.id,
            master_id: shared.master,
            results: outcome.results,
            return_value: outcome.return_value.clone(),
            error: outcome.error.clone(),
            traceback: outcome.traceback.clone(),
            state_string: Some(final_state(&outcome)),
            complete_at: crate::model::now(),
        })
        .await;
    match finished {
        Ok(()) => {}
        Err(StorageError::NotOwner { .. }) => {
            // The master was expired meanwhile and the build was finished as RETRY by
            // another master: this late result must not be merged.
            warn!(build = %build.id, "build finished after this master lost it; result discarded");
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    info!(build = %build.id, builder = %builder.config.name, number = build.number, results = %outcome.results, "build finished");
    let completed = if outcome.results == ResultCode::Retry {
        store.request_unclaim(&[request.id], shared.master).await?;
        Vec::new()
    } else {
        match store
            .request_complete(&[request.id], outcome.results, crate::model::now())
            .await
        {
            Ok(completed) => completed,
            Err(StorageError::NotClaimed(_)) => {
                warn!(request = %request.id, "request was completed by someone else meanwhile");
                Vec::new()
            }
            Err(e) => return Err(e),
        }
    };
    shared.emit(Event::BuildFinished {
        build_id: build.id,
        number: build.number,
        builder: builder.config.name.clone(),
        request_id: request.id,
        buildset_id: request.buildset_id,
        results: outcome.results,
    });
    emit_completed(shared, completed);
    Ok(())
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

pub(super) fn emit_completed(shared: &Shared, completed: Vec<crate::storage::CompletedBuildset>) {
    for bs in completed {
        shared.emit(Event::BuildsetComplete {
            buildset_id: bs.buildset_id,
            results: bs.results,
        });
    }
}

async fn context(
    shared: &Shared,
    builder: &RegisteredBuilder,
    request: &BuildRequest,
    build: &Build,
    stop: watch::Receiver<Option<StopReason>>,
) -> crate::storage::Result<BuildContext> {
    let store = &shared.store;
    let buildset = store.buildset_get(request.buildset_id).await?;
    Ok(BuildContext::new(ContextInner {
        build: build.clone(),
        builder: builder.config.name.clone(),
        buildset_id: request.buildset_id,
        reason: buildset.reason,
        args: builder.config.args.clone(),
        kwargs: builder.config.kwargs.clone(),
        buildset_properties: store.buildset_properties(request.buildset_id).await?,
        build_properties: Mutex::new(Properties::new()),
        sourcestamps: store.buildset_sourcestamps(request.buildset_id).await?,
        store: store.clone(),
        stop,
    }))
}

/// Runs the executor in its own task so that a panic becomes EXCEPTION, and aborts it if
/// it ignores a stop request for longer than the cancel grace period.
async fn execute(
    shared: &Shared,
    builder: &RegisteredBuilder,
    ctx: BuildContext,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> Outcome {
    let executor = builder.executor.clone();
    let mut task = tokio::spawn(async move { executor.execute(ctx).await });
    let grace = shared.config.cancel_grace;
    let stopped_and_ignored = async {
        // A closed channel cannot happen while this build is in the running map; if it
        // did, waiting forever just leaves the job to finish on its own.
        if stop.wait_for(|s| s.is_some()).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        joined = &mut task => match joined {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => Outcome::exception(format!("the job panicked: {}", panic_message(e.into_panic())), None),
            Err(e) => Outcome::exception(format!("the job's task failed: {e}"), None),
        },
        () = stopped_and_ignored => {
            task.abort();
            Outcome::with_results(ResultCode::Cancelled, None)
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}
