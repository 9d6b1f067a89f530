//! The scheduler and the embedding API, end to end on SQLite with Rust executors.
//! Tests wait on engine events; the only timeouts are guards that turn a hang into a
//! failure.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use kiln_engine::StopReason;
use kiln_engine::model::{LogLevel, LogQuery, ResultCode, SourceStamp};
use kiln_engine::{
    BuilderConfig, Client, Engine, EngineConfig, EngineError, Event, FnExecutor, JobError, Outcome,
    Submission,
};
use kiln_storage::{BuildFilter, ClaimFilter, NewBuild, NewBuildset, RequestFilter, StorageError};
use serde_json::json;
use tokio::sync::{Semaphore, broadcast, watch};

/// Turns a hang into a failure; never a pacing device.
mod support;
use support::{Db, backends, db, guard};

fn config(db: &Db, name: &str) -> EngineConfig {
    EngineConfig::new(&db.url).master_name(name)
}

async fn engine(db: &Db) -> Result<Engine> {
    Ok(Engine::open(config(db, "test-master")).await?)
}

fn echo() -> FnExecutor {
    FnExecutor::new(|ctx| async move {
        Ok(Outcome::success(
            json!({"builder": ctx.builder(), "args": ctx.args()}),
        ))
    })
}

async fn next_event(
    rx: &mut broadcast::Receiver<Event>,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Result<Event> {
    guard(what, async {
        loop {
            let event = rx.recv().await?;
            if pred(&event) {
                return Ok(event);
            }
        }
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_buildset_runs_every_builder_and_completes_with_the_worst_result() -> Result<()>
{
    let db = db()?;
    let engine = engine(&db).await?;
    let mut events = engine.subscribe();
    engine
        .register_builder(BuilderConfig::new("ok").args(json!([1, 2])), echo())
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("warn"),
            FnExecutor::new(|_| async {
                Ok(Outcome::with_results(
                    ResultCode::Warnings,
                    Some(json!("careful")),
                ))
            }),
        )
        .await?;
    let submitted = engine
        .submit(&Submission::new("push").builder("ok").builder("warn"))
        .await?;
    let done = guard("the buildset", engine.wait_buildset(submitted.buildset_id)).await??;
    ensure!(
        done.complete && done.results == Some(ResultCode::Warnings),
        "{done:?}"
    );

    let builds = engine
        .client()
        .builds(&BuildFilter {
            buildset_id: Some(done.id),
            ..Default::default()
        })
        .await?;
    ensure!(builds.len() == 2);
    let ok = builds
        .iter()
        .find(|b| b.results == Some(ResultCode::Success))
        .ok_or_else(|| anyhow!("no SUCCESS build"))?;
    ensure!(ok.return_value == Some(json!({"builder": "ok", "args": [1, 2]})) && ok.number == 1);
    for request in submitted.requests.values() {
        ensure!(engine.client().request(*request).await?.complete);
    }

    let mut seen = Vec::new();
    loop {
        let event = guard("events", events.recv()).await??;
        let last = matches!(event, Event::BuildsetComplete { .. });
        seen.push(event);
        if last {
            break;
        }
    }
    ensure!(
        matches!(seen[0], Event::BuildsetSubmitted { ref requests, .. } if requests.len() == 2),
        "{seen:?}"
    );
    ensure!(
        seen.iter()
            .filter(|e| matches!(e, Event::BuildStarted { .. }))
            .count()
            == 2
    );
    ensure!(
        seen.iter()
            .filter(|e| matches!(e, Event::BuildFinished { .. }))
            .count()
            == 2
    );
    ensure!(matches!(
        seen.last(),
        Some(Event::BuildsetComplete {
            results: ResultCode::Warnings,
            ..
        })
    ));
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_starts_at_once_after_a_submit_without_waiting_for_a_poll() -> Result<()> {
    let db = db()?;
    let mut cfg = config(&db, "slow-poll");
    // With an hour-long poll only the submit's wake-up can start the build in time.
    cfg.poll_interval = Duration::from_secs(3600);
    let engine = Engine::open(cfg).await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    let mut events = engine.subscribe();
    let submitted = engine.submit(&Submission::new("now").builder("b")).await?;
    next_event(&mut events, "the build to finish", |e| {
        matches!(e, Event::BuildsetComplete { .. })
    })
    .await?;
    ensure!(
        engine
            .client()
            .buildset(submitted.buildset_id)
            .await?
            .results
            == Some(ResultCode::Success)
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_error_ends_the_build_as_failure_with_its_message() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(
            BuilderConfig::new("f"),
            FnExecutor::new(|_| async {
                Err::<Outcome, _>(JobError {
                    message: "tests failed: 3".into(),
                    details: Some("test_a\ntest_b".into()),
                })
            }),
        )
        .await?;
    let s = engine.submit(&Submission::new("x").builder("f")).await?;
    let done = guard("the buildset", engine.wait_buildset(s.buildset_id)).await??;
    ensure!(done.results == Some(ResultCode::Failure));
    let build = &engine.client().builds(&BuildFilter::default()).await?[0];
    ensure!(
        build.error.as_deref() == Some("tests failed: 3")
            && build.traceback.as_deref() == Some("test_a\ntest_b")
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_ends_as_exception_and_the_engine_keeps_running() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(
            BuilderConfig::new("boom"),
            FnExecutor::new(|_| async { panic!("guest exploded") }),
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("fine"), echo())
        .await?;
    let s = engine.submit(&Submission::new("x").builder("boom")).await?;
    let done = guard("the buildset", engine.wait_buildset(s.buildset_id)).await??;
    ensure!(done.results == Some(ResultCode::Exception));
    let build = &engine.client().builds(&BuildFilter::default()).await?[0];
    ensure!(
        build
            .error
            .as_deref()
            .is_some_and(|e| e.contains("guest exploded")),
        "{:?}",
        build.error
    );
    let next = engine
        .submit(&Submission::new("after").builder("fine"))
        .await?;
    ensure!(
        guard("the next buildset", engine.wait_buildset(next.buildset_id))
            .await??
            .results
            == Some(ResultCode::Success)
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_puts_the_request_back_in_the_queue_and_it_runs_again() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    engine
        .register_builder(
            BuilderConfig::new("flaky"),
            FnExecutor::new(move |_| {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok(if n == 0 {
                        Outcome::with_results(ResultCode::Retry, None)
                    } else {
                        Outcome::success(json!(n))
                    })
                }
            }),
        )
        .await?;
    let s = engine
        .submit(&Submission::new("x").builder("flaky"))
        .await?;
    let done = guard("the buildset", engine.wait_buildset(s.buildset_id)).await??;
    ensure!(done.results == Some(ResultCode::Success));
    let builds = engine.client().builds(&BuildFilter::default()).await?;
    ensure!(builds.len() == 2 && builds[0].request_id == builds[1].request_id);
    ensure!(
        builds[0].results == Some(ResultCode::Retry)
            && builds[1].results == Some(ResultCode::Success)
    );
    ensure!((builds[0].number, builds[1].number) == (1, 2));
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_by_priority_then_submission_time() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    // The builder exists in the database before any engine runs it, so the queue fills
    // up first and the order is the scheduler's alone.
    kiln_storage::open(&db.url)
        .await?
        .builder_ensure("one-at-a-time", None)
        .await?;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut last = None;
    for (reason, priority) in [
        ("low", -5),
        ("first-high", 10),
        ("mid", 0),
        ("second-high", 10),
    ] {
        last = Some(
            engine
                .submit(
                    &Submission::new(reason)
                        .builder("one-at-a-time")
                        .priority(priority),
                )
                .await?,
        );
    }
    let record = order.clone();
    engine
        .register_builder(
            BuilderConfig::new("one-at-a-time").max_concurrent(1),
            FnExecutor::new(move |ctx| {
                record
                    .lock()
                    .map(|mut o| o.push(ctx.reason().to_owned()))
                    .ok();
                async { Ok(Outcome::success(json!(null))) }
            }),
        )
        .await?;
    let last = last.ok_or_else(|| anyhow!("nothing submitted"))?;
    guard("the last buildset", engine.wait_buildset(last.buildset_id)).await??;
    let all = engine.client().buildsets(&Default::default()).await?;
    for bs in &all {
        guard("every buildset", engine.wait_buildset(bs.id)).await??;
    }
    let order = order.lock().map_err(|_| anyhow!("poisoned"))?.clone();
    ensure!(
        order == ["first-high", "second-high", "mid", "low"],
        "{order:?}"
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_never_runs_more_builds_at_once_than_its_limit() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    let gate = Arc::new(Semaphore::new(0));
    let (running_tx, mut running) = watch::channel(0usize);
    let running_tx = Arc::new(running_tx);
    let most = Arc::new(AtomicUsize::new(0));
    let (g, r, m) = (gate.clone(), running_tx.clone(), most.clone());
    engine
        .register_builder(
            BuilderConfig::new("limited").max_concurrent(2),
            FnExecutor::new(move |_| {
                let (g, r, m) = (g.clone(), r.clone(), m.clone());
                async move {
                    r.send_modify(|n| *n += 1);
                    m.fetch_max(*r.borrow(), Ordering::SeqCst);
                    let permit = g
                        .acquire()
                        .await
                        .map_err(|e| JobError::new(e.to_string()))?;
                    permit.forget();
                    r.send_modify(|n| *n -= 1);
                    Ok(Outcome::success(json!(null)))
                }
            }),
        )
        .await?;
    let mut sets = Vec::new();
    for i in 0..6 {
        sets.push(
            engine
                .submit(&Submission::new(format!("job {i}")).builder("limited"))
                .await?
                .buildset_id,
        );
    }
    guard("two running builds", running.wait_for(|n| *n == 2)).await??;
    let claimed = engine
        .client()
        .requests(&RequestFilter {
            claimed: ClaimFilter::ClaimedBy(engine.master_id()),
            complete: Some(false),
            ..Default::default()
        })
        .await?;
    ensure!(
        claimed.len() == 2,
        "only as many requests are claimed as the builder has slots: {}",
        claimed.len()
    );
    gate.add_permits(6);
    for id in sets {
        ensure!(
            guard("a buildset", engine.wait_buildset(id))
                .await??
                .results
                == Some(ResultCode::Success)
        );
    }
    ensure!(
        most.load(Ordering::SeqCst) == 2,
        "at most two ran at once: {}",
        most.load(Ordering::SeqCst)
    );
    let slots: Vec<Option<i64>> = engine
        .client()
        .builds(&BuildFilter::default())
        .await?
        .iter()
        .map(|b| b.worker_slot)
        .collect();
    ensure!(
        slots.iter().all(|s| matches!(s, Some(0) | Some(1))),
        "slots stay within the limit: {slots:?}"
    );
    engine.shutdown().await;
    Ok(())
}

fn waits_for_stop() -> FnExecutor {
    FnExecutor::new(|ctx| async move {
        ctx.set_state("waiting to be stopped").await?;
        let why = ctx.stopped().await;
        Ok(Outcome::success(json!(format!("{why:?}"))))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_build_stops_it_as_cancelled() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(BuilderConfig::new("long"), waits_for_stop())
        .await?;
    let mut events = engine.subscribe();
    let s = engine.submit(&Submission::new("x").builder("long")).await?;
    next_event(&mut events, "the build to start", |e| {
        matches!(e, Event::BuildStarted { .. })
    })
    .await?;
    let outcome = engine.cancel_request(s.requests["long"]).await?;
    ensure!(outcome.flagged == [s.requests["long"]] && outcome.completed.is_empty());
    let done = guard("the buildset", engine.wait_buildset(s.buildset_id)).await??;
    ensure!(done.results == Some(ResultCode::Cancelled));
    let build = &engine.client().builds(&BuildFilter::default()).await?[0];
    ensure!(
        build.results == Some(ResultCode::Cancelled)
            && build.return_value == Some(json!("Cancelled"))
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_ignores_a_cancel_is_aborted_after_the_grace_period() -> Result<()> {
    let db = db()?;
    let mut cfg = config(&db, "m");
    cfg.cancel_grace = Duration::from_millis(50);
    let engine = Engine::open(cfg).await?;
    engine
        .register_builder(
            BuilderConfig::new("stubborn"),
            FnExecutor::new(|_| async {
                std::future::pending::<Result<Outcome, JobError>>().await
            }),
        )
        .await?;
    let mut events = engine.subscribe();
    let s = engine
        .submit(&Submission::new("x").builder("stubborn"))
        .await?;
    next_event(&mut events, "the build to start", |e| {
        matches!(e, Event::BuildStarted { .. })
    })
    .await?;
    engine.cancel_buildset(s.buildset_id).await?;
    ensure!(
        guard("the buildset", engine.wait_buildset(s.buildset_id))
            .await??
            .results
            == Some(ResultCode::Cancelled)
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_unclaimed_request_completes_it_without_a_build() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    // Nobody runs this builder, so its request stays unclaimed.
    kiln_storage::open(&db.url)
        .await?
        .builder_ensure("nobody-runs-me", None)
        .await?;
    let s = engine
        .submit(&Submission::new("x").builder("nobody-runs-me"))
        .await?;
    let outcome = engine.cancel_request(s.requests["nobody-runs-me"]).await?;
    ensure!(outcome.completed.len() == 1 && outcome.buildsets_completed.len() == 1);
    let done = guard("the buildset", engine.wait_buildset(s.buildset_id)).await??;
    ensure!(done.results == Some(ResultCode::Cancelled));
    ensure!(
        engine
            .client()
            .builds(&BuildFilter::default())
            .await?
            .is_empty()
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_from_another_process_stops_the_build_at_the_next_poll() -> Result<()> {
    let db = db()?;
    let mut cfg = config(&db, "m");
    cfg.poll_interval = Duration::from_millis(20);
    let engine = Engine::open(cfg).await?;
    engine
        .register_builder(BuilderConfig::new("long"), waits_for_stop())
        .await?;
    let mut events = engine.subscribe();
    let s = engine.submit(&Submission::new("x").builder("long")).await?;
    next_event(&mut events, "the build to start", |e| {
        matches!(e, Event::BuildStarted { .. })
    })
    .await?;
    let other = Client::open(&db.url).await?;
    ensure!(other.cancel_buildset(s.buildset_id).await?.flagged.len() == 1);
    ensure!(
        guard("the buildset", engine.wait_buildset(s.buildset_id))
            .await??
            .results
            == Some(ResultCode::Cancelled)
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_log_report_progress_set_state_and_read_and_set_properties() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    let store = kiln_storage::open(&db.url).await?;
    engine
        .register_builder(
            BuilderConfig::new("chatty").kwargs(json!({"level": "max"})),
            FnExecutor::new(move |ctx| {
                let store = store.clone();
                async move {
                let input = ctx
                    .get_property("input")
                    .map(|p| p.value)
                    .unwrap_or_default();
                ctx.log(LogLevel::Debug, "details").await?;
                ctx.log(LogLevel::Warning, format!("input is {input}"))
                    .await?;
                ctx.progress(&["fetch"], 1, 1, "fetched").await?;
                ctx.progress(&["build", "a"], 2, 4, "a half").await?;
                ctx.progress(&["build", "b"], 1, 4, "b quarter").await?;
                ctx.set_state("built").await?;
                ctx.flush().await;
                let state = store
                    .build_get(ctx.build_id())
                    .await
                    .map_err(|e| JobError::new(e.to_string()))?
                    .state_string;
                ctx.set_property("version", json!("1.2"), "chatty").await?;
                let version = ctx.get_property("version").map(|p| p.value);
                let stamps = ctx.sourcestamps().len();
                Ok(Outcome::success(
                    json!({"kwargs": ctx.kwargs(), "version": version, "stamps": stamps, "state": state}),
                ))
                }
            }),
        )
        .await?;
    let s = engine
        .submit(
            &Submission::new("x")
                .builder("chatty")
                .property("input", json!(41), "test")
                .sourcestamp(SourceStamp {
                    repository: "r".into(),
                    ..Default::default()
                }),
        )
        .await?;
    guard("the buildset", engine.wait_buildset(s.buildset_id)).await??;
    let client = engine.client();
    let build = &client.builds(&BuildFilter::default()).await?[0];
    ensure!(
        build.return_value
            == Some(
                json!({"kwargs": {"level": "max"}, "version": "1.2", "stamps": 1, "state": "built"})
            )
    );
    ensure!(
        build.state_string == "build successful",
        "the final state replaces the running one"
    );
    let logs = client
        .logs(&LogQuery {
            build_id: Some(build.id),
            min_level: Some(LogLevel::Info),
            ..Default::default()
        })
        .await?;
    ensure!(
        logs.len() == 1
            && logs[0].record.message == "input is 41"
            && logs[0].record.level == LogLevel::Warning
    );
    let tree = client.progress(build.id).await?;
    ensure!((tree.current, tree.total) == (4, 9), "{tree:?}");
    let props = client.build_properties(build.id).await?;
    ensure!(props["version"].value == json!("1.2") && props["version"].source == "chatty");
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_masters_work_is_requeued_and_run_by_a_live_engine() -> Result<()> {
    let db = db()?;
    let dead_build;
    let buildset_id;
    {
        // A master that claimed work, started a build and then vanished an hour ago.
        let store = kiln_storage::open(&db.url).await?;
        let an_hour_ago = kiln_engine::model::now() - chrono::TimeDelta::hours(1);
        let ghost = store.master_register("ghost", an_hour_ago).await?.master_id;
        let builder = store.builder_ensure("b", None).await?;
        let added = store
            .buildset_add(&NewBuildset {
                reason: "lost".into(),
                builder_ids: vec![builder],
                submitted_at: an_hour_ago,
                ..Default::default()
            })
            .await?;
        buildset_id = added.buildset_id;
        let request = added.requests[&builder];
        store.request_claim(&[request], ghost, an_hour_ago).await?;
        dead_build = store
            .build_add(&NewBuild {
                request_id: request,
                master_id: ghost,
                worker_slot: None,
                state_string: "".into(),
                started_at: an_hour_ago,
            })
            .await?;
    }
    let mut cfg = config(&db, "alive");
    cfg.heartbeat_interval = Duration::from_millis(20);
    cfg.master_expiry = Duration::from_secs(5);
    let engine = Engine::open(cfg).await?;
    let mut events = engine.subscribe();
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    let expired = next_event(&mut events, "the ghost to expire", |e| {
        matches!(e, Event::MasterExpired { .. })
    })
    .await?;
    ensure!(
        matches!(expired, Event::MasterExpired { ref name, ref released, .. } if name == "ghost" && released.len() == 1)
    );
    ensure!(
        guard("the buildset", engine.wait_buildset(buildset_id))
            .await??
            .results
            == Some(ResultCode::Success)
    );
    let builds = engine.client().builds(&BuildFilter::default()).await?;
    ensure!(
        builds.len() == 2
            && builds[0].id == dead_build.id
            && builds[0].results == Some(ResultCode::Retry)
    );
    ensure!(
        builds[1].results == Some(ResultCode::Success) && builds[1].master_id == engine.master_id()
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_unfinished_builds_and_a_later_engine_runs_them_again() -> Result<()> {
    let db = db()?;
    let mut cfg = config(&db, "first");
    cfg.shutdown_grace = Duration::from_millis(20);
    let engine = Engine::open(cfg).await?;
    engine
        .register_builder(BuilderConfig::new("long"), waits_for_stop())
        .await?;
    let mut events = engine.subscribe();
    let s = engine.submit(&Submission::new("x").builder("long")).await?;
    next_event(&mut events, "the build to start", |e| {
        matches!(e, Event::BuildStarted { .. })
    })
    .await?;
    let master = engine.master_id();
    engine.shutdown().await;

    let client = Client::open(&db.url).await?;
    let first = &client.builds(&BuildFilter::default()).await?[0];
    ensure!(first.results == Some(ResultCode::Retry), "{first:?}");
    ensure!(first.return_value == Some(json!(format!("{:?}", StopReason::Shutdown))));
    let request = client.request(s.requests["long"]).await?;
    ensure!(
        !request.complete && request.claimed_by.is_none(),
        "the request is back in the queue: {request:?}"
    );
    ensure!(
        client
            .masters()
            .await?
            .iter()
            .all(|m| m.id != master || !m.active),
        "the master is inactive"
    );

    let later = Engine::open(config(&db, "second")).await?;
    later
        .register_builder(BuilderConfig::new("long"), echo())
        .await?;
    ensure!(
        guard("the buildset", later.wait_buildset(s.buildset_id))
            .await??
            .results
            == Some(ResultCode::Success)
    );
    later.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_is_a_new_buildset_with_the_same_stamps_and_properties() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    let stamp = SourceStamp {
        repository: "r".into(),
        branch: Some("main".into()),
        revision: Some("abc".into()),
        ..Default::default()
    };
    let s = engine
        .submit(
            &Submission::new("push")
                .builder("b")
                .property("p", json!([1]), "me")
                .sourcestamp(stamp.clone())
                .priority(7),
        )
        .await?;
    guard("the buildset", engine.wait_buildset(s.buildset_id)).await??;
    let original = engine.client().builds(&BuildFilter::default()).await?[0].clone();
    let again = engine.rebuild(original.id).await?;
    let done = guard("the rebuild", engine.wait_buildset(again.buildset_id)).await??;
    ensure!(done.rebuilt_buildid == Some(original.id) && done.results == Some(ResultCode::Success));
    ensure!(done.reason.contains("rebuild of b #1"), "{}", done.reason);
    let store = engine.client();
    ensure!(store.buildset_sourcestamps(again.buildset_id).await? == vec![stamp]);
    ensure!(
        store.buildset_properties(again.buildset_id).await?
            == store.buildset_properties(s.buildset_id).await?
    );
    ensure!(engine.client().request(again.requests["b"]).await?.priority == 7);
    let rebuilt = engine.client().build_by_number("b", 2).await?;
    ensure!(rebuilt.request_id == again.requests["b"]);
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_and_registrations_get_typed_errors_and_write_nothing() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    let unknown = engine
        .submit(&Submission::new("x").builder("b").builder("ghost"))
        .await;
    ensure!(
        matches!(unknown, Err(EngineError::UnknownBuilder(ref n)) if n == "ghost"),
        "{unknown:?}"
    );
    let priority = engine
        .submit(&Submission::new("x").builder("b").priority(1_000_000))
        .await;
    ensure!(
        matches!(priority, Err(EngineError::Invalid(_))),
        "{priority:?}"
    );
    let twice = engine
        .submit(&Submission::new("x").builder("b").builder("b"))
        .await;
    ensure!(matches!(twice, Err(EngineError::Invalid(_))), "{twice:?}");
    ensure!(
        engine
            .client()
            .buildsets(&Default::default())
            .await?
            .is_empty(),
        "nothing was written"
    );
    let dup = engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await;
    ensure!(matches!(dup, Err(EngineError::DuplicateBuilder(_))));
    let zero = engine
        .register_builder(BuilderConfig::new("z").max_concurrent(0), echo())
        .await;
    ensure!(matches!(zero, Err(EngineError::Invalid(_))));
    ensure!(matches!(
        engine.rebuild(kiln_engine::model::BuildId(404)).await,
        Err(EngineError::Storage(_))
    ));
    engine.shutdown().await;

    let mut bad = config(&db, "bad");
    bad.master_expiry = bad.heartbeat_interval;
    ensure!(matches!(
        Engine::open(bad).await,
        Err(EngineError::Invalid(_))
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buildset_without_builders_is_complete_at_once() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    let s = engine.submit(&Submission::new("nothing to do")).await?;
    let done = guard("the buildset", engine.wait_buildset(s.buildset_id)).await??;
    ensure!(done.complete && done.results == Some(ResultCode::Success));
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_flagged_on_a_dead_masters_request_completes_it_without_a_new_build() -> Result<()>
{
    let db = db()?;
    let buildset_id;
    {
        let store = kiln_storage::open(&db.url).await?;
        let client = Client::from_store(store.clone());
        let an_hour_ago = kiln_engine::model::now() - chrono::TimeDelta::hours(1);
        let ghost = store.master_register("ghost", an_hour_ago).await?.master_id;
        store.builder_ensure("b", None).await?;
        let submitted = client
            .submit(&Submission::new("doomed").builder("b"))
            .await?;
        buildset_id = submitted.buildset_id;
        store
            .request_claim(&[submitted.requests["b"]], ghost, an_hour_ago)
            .await?;
        let outcome = client.cancel_buildset(buildset_id).await?;
        ensure!(
            outcome.flagged.len() == 1,
            "the claimed request is only flagged: {outcome:?}"
        );
    }
    let mut cfg = config(&db, "alive");
    cfg.heartbeat_interval = Duration::from_millis(20);
    let engine = Engine::open(cfg).await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    let done = guard("the buildset", engine.wait_buildset(buildset_id)).await??;
    ensure!(done.results == Some(ResultCode::Cancelled), "{done:?}");
    ensure!(
        engine
            .client()
            .builds(&BuildFilter::default())
            .await?
            .is_empty(),
        "no build ran"
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitting_many_buildsets_at_once_runs_them_all_or_refuses_them_all() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(BuilderConfig::new("a"), echo())
        .await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    let batch: Vec<Submission> = (0..50)
        .map(|i| {
            Submission::new(format!("batch {i}"))
                .builder("a")
                .builder("b")
                .property("i", json!(i), "test")
        })
        .collect();
    let submitted = engine.submit_many(&batch).await?;
    ensure!(
        submitted.len() == 50
            && submitted
                .windows(2)
                .all(|w| w[0].buildset_id < w[1].buildset_id)
    );
    for (i, s) in submitted.iter().enumerate() {
        let done = guard("a buildset", engine.wait_buildset(s.buildset_id)).await??;
        ensure!(done.reason == format!("batch {i}") && done.results == Some(ResultCode::Success));
        ensure!(s.requests.len() == 2);
    }
    ensure!(engine.client().builds(&BuildFilter::default()).await?.len() == 100);

    let mixed = vec![
        Submission::new("fine").builder("a"),
        Submission::new("bad").builder("nobody"),
    ];
    ensure!(matches!(
        engine.submit_many(&mixed).await,
        Err(EngineError::UnknownBuilder(_))
    ));
    ensure!(
        engine.client().buildsets(&Default::default()).await?.len() == 50,
        "nothing of the refused batch was written"
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_engine_stops_claiming_work() -> Result<()> {
    let db = db()?;
    let fast_poll = |name: &str| {
        let mut cfg = config(&db, name);
        cfg.poll_interval = Duration::from_millis(10);
        cfg
    };
    let engine = Engine::open(fast_poll("dropped")).await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    let client = engine.client().clone();
    drop(engine);
    let s = client
        .submit(&Submission::new("after the drop").builder("b"))
        .await?;
    // Another engine with the same poll interval sees two client submissions only
    // through its polls; meanwhile a still-running loop of the dropped engine would
    // have polled as often and claimed the request.
    let other = Engine::open(fast_poll("other")).await?;
    other
        .register_builder(BuilderConfig::new("probe"), echo())
        .await?;
    for round in 0..2 {
        let probe = client
            .submit(&Submission::new(format!("probe {round}")).builder("probe"))
            .await?;
        guard("a probe", other.wait_buildset(probe.buildset_id)).await??;
    }
    let request = client.request(s.requests["b"]).await?;
    ensure!(
        request.claimed_by.is_none() && !request.complete,
        "nobody claimed it: {request:?}"
    );
    other.shutdown().await;
    Ok(())
}

/// Submits from many tasks at once share transactions (group commit); each caller must
/// still get its own buildset, with its own reason and requests, on every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_submits_each_get_their_own_buildset_on_every_backend() -> Result<()> {
    const TASKS: usize = 24;
    const EACH: usize = 12;
    let seed = fastrand::u64(..);
    eprintln!("seed {seed}");
    for backend in backends("concurrent_submits").await? {
        let engine =
            Arc::new(Engine::open(EngineConfig::new(&backend.url).master_name("group")).await?);
        let names = ["a", "b", "c", "d"];
        for name in names {
            engine
                .register_builder(BuilderConfig::new(name), echo())
                .await?;
        }
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let engine = engine.clone();
            let mut rng = fastrand::Rng::with_seed(seed ^ t as u64);
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..EACH {
                    let mut submission =
                        Submission::new(format!("task {t} item {i}")).priority(rng.i32(-5..=5));
                    for name in names {
                        if rng.bool() {
                            submission = submission.builder(name);
                        }
                    }
                    let submitted = engine.submit(&submission).await?;
                    mine.push((submission, submitted));
                }
                anyhow::Ok(mine)
            }));
        }
        let mut seen = std::collections::BTreeSet::new();
        for task in tasks {
            for (submission, submitted) in guard("the submits", task).await??? {
                ensure!(
                    seen.insert(submitted.buildset_id),
                    "buildset {} was answered twice ({})",
                    submitted.buildset_id,
                    backend.name
                );
                let stored = engine.client().buildset(submitted.buildset_id).await?;
                ensure!(
                    stored.reason == submission.reason,
                    "{:?} got the buildset of {:?} ({})",
                    submission.reason,
                    stored.reason,
                    backend.name
                );
                let requested: Vec<&String> = submitted.requests.keys().collect();
                let wanted: Vec<&String> = {
                    let mut w: Vec<&String> = submission.builders.iter().collect();
                    w.sort();
                    w
                };
                ensure!(requested == wanted, "{requested:?} for {wanted:?}");
                for (name, request) in &submitted.requests {
                    let request = engine.client().request(*request).await?;
                    let builder = engine.client().builder(request.builder_id).await?;
                    ensure!(
                        request.buildset_id == submitted.buildset_id
                            && &builder.name == name
                            && request.priority == submission.priority,
                        "request {} does not belong to {:?}",
                        request.id,
                        submission.reason
                    );
                }
            }
        }
        ensure!(seen.len() == TASKS * EACH);
        engine.shutdown().await;
    }
    Ok(())
}

/// Cancels and priority changes from many tasks at once share transactions (group
/// commit); each caller must still get the answer for its own request, on every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cancels_and_priority_changes_each_get_their_own_answer_on_every_backend()
-> Result<()> {
    const TASKS: usize = 16;
    const EACH: usize = 10;
    let seed = fastrand::u64(..);
    eprintln!("seed {seed}");
    for backend in backends("concurrent_cancels").await? {
        let store = kiln_storage::open(&backend.url).await?;
        // Known to the database, served by nobody: the requests stay unclaimed.
        store.builder_ensure("idle", None).await?;
        let client = Client::from_store(store);
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let client = client.clone();
            let mut rng = fastrand::Rng::with_seed(seed ^ t as u64);
            tasks.push(tokio::spawn(async move {
                let mut checked = 0;
                for i in 0..EACH {
                    let submitted = client
                        .submit(&Submission::new(format!("task {t} item {i}")).builder("idle"))
                        .await?;
                    let request = submitted.requests["idle"];
                    let priority = rng.i32(-100..=100);
                    client.set_priority(request, priority).await?;
                    ensure!(
                        client.request(request).await?.priority == priority,
                        "request {request} did not get priority {priority}"
                    );
                    let refused = client.set_priority(request, 1_000_000).await;
                    ensure!(
                        matches!(refused, Err(EngineError::Storage(StorageError::Invalid(_)))),
                        "{refused:?}"
                    );
                    if rng.bool() {
                        let outcome = client.cancel_request(request).await?;
                        ensure!(
                            outcome.completed == [request] && outcome.flagged.is_empty(),
                            "the cancel of {request} answered {outcome:?}"
                        );
                        ensure!(
                            outcome.buildsets_completed.len() == 1
                                && outcome.buildsets_completed[0].buildset_id
                                    == submitted.buildset_id,
                            "{outcome:?}"
                        );
                    } else {
                        let outcome = client.cancel_buildset(submitted.buildset_id).await?;
                        ensure!(outcome.completed == [request], "{outcome:?}");
                    }
                    let again = client.cancel_request(request).await?;
                    ensure!(again == Default::default(), "a second cancel did {again:?}");
                    let late = client.set_priority(request, 1).await;
                    ensure!(
                        matches!(late, Err(EngineError::Storage(StorageError::Invalid(_)))),
                        "{late:?}"
                    );
                    checked += 1;
                }
                anyhow::Ok(checked)
            }));
        }
        let mut checked = 0;
        for task in tasks {
            checked += guard("the cancels", task).await???;
        }
        ensure!(checked == TASKS * EACH);
        let open = client
            .requests(&RequestFilter {
                complete: Some(false),
                ..RequestFilter::default()
            })
            .await?;
        ensure!(open.is_empty(), "{} requests were left open", open.len());
    }
    Ok(())
}
