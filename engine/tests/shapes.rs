//! The engine under production shapes rather than the example's: many builders, scarce
//! capacity, idle gaps longer than the periodic tasks, on every backend.
//!
//! Tests wait on engine events; the only timeouts are guards that turn a hang into a
//! failure.

use std::time::Duration;

use anyhow::{Result, ensure};
use kiln_engine::model::{BuildsetId, ResultCode};
use kiln_engine::{BuilderConfig, Engine, EngineConfig, Event, FnExecutor, Outcome, Submission};
use kiln_storage::RequestFilter;
use serde_json::json;

mod support;
use support::{backends, guard};

fn noop() -> FnExecutor {
    FnExecutor::new(|_| async { Ok(Outcome::success(json!(null))) })
}

/// Waits until every one of `ids` has completed.
async fn all_complete(engine: &Engine, ids: &[BuildsetId]) -> Result<()> {
    for id in ids {
        guard("a buildset", engine.wait_buildset(*id)).await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_with_a_thousand_builders_runs_one_request_of_each() -> Result<()> {
    for backend in backends("thousand").await? {
        let engine = Engine::open(EngineConfig::new(&backend.url).master_name("many")).await?;
        let names: Vec<String> = (0..1000).map(|i| format!("builder-{i:04}")).collect();
        for name in &names {
            engine
                .register_builder(BuilderConfig::new(name), noop())
                .await?;
        }
        let mut one = Submission::new("all of them");
        one.builders = names.clone();
        let submitted = engine.submit(&one).await?;
        let done = guard(
            "1,000 builders' requests",
            engine.wait_buildset(submitted.buildset_id),
        )
        .await??;
        ensure!(
            done.results == Some(ResultCode::Success),
            "{}: {done:?}",
            backend.name
        );
        let queued = engine
            .client()
            .requests(&RequestFilter {
                complete: Some(false),
                ..RequestFilter::default()
            })
            .await?;
        ensure!(queued.is_empty(), "{}: {} left", backend.name, queued.len());
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_four_builders_sharing_a_small_engine_are_all_served() -> Result<()> {
    // Each builder alone could fill the engine: whoever is offered the room first must
    // not keep it from the others.
    for backend in backends("share").await? {
        let mut config = EngineConfig::new(&backend.url).master_name("small");
        config.max_running_builds = 8;
        config.claim_batch = 8;
        let engine = Engine::open(config).await?;
        let names: Vec<String> = (0..24).map(|i| format!("b{i}")).collect();
        for name in &names {
            engine
                .register_builder(BuilderConfig::new(name), noop())
                .await?;
        }
        let mut ids = Vec::new();
        for round in 0..3 {
            let mut s = Submission::new(format!("round {round}"));
            s.builders = names.clone();
            ids.push(engine.submit(&s).await?.buildset_id);
        }
        all_complete(&engine, &ids).await?;
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_start_in_buildbots_order_across_and_within_builders() -> Result<()> {
    for backend in backends("order").await? {
        let mut config = EngineConfig::new(&backend.url).master_name("one-at-a-time");
        // One build at a time: each claim round decides who runs next.
        config.max_running_builds = 1;
        let engine = Engine::open(config).await?;
        for name in ["alpha", "beta", "gamma", "delta"] {
            engine
                .register_builder(BuilderConfig::new(name), noop())
                .await?;
        }
        // A gate build holds the only room while the others queue.
        let open = support::hold_the_room(&engine).await?;
        let mut events = engine.subscribe();
        let at = |reason: &str, builder: &str, priority: i32| {
            Submission::new(reason).builder(builder).priority(priority)
        };
        // gamma's request is older than beta's: submitted first, alone (submits of one
        // transaction may share a microsecond, and equal times go by name).
        let older = engine.submit(&at("gamma-5-old", "gamma", 5)).await?;
        let rest = engine
            .submit_many(&[
                at("delta-low", "delta", 0),
                at("beta-5", "beta", 5),
                at("alpha-9", "alpha", 9),
                at("delta-high", "delta", 7),
                at("alpha-1", "alpha", 1),
            ])
            .await?;
        let submitted: Vec<_> = [rest[0].clone(), older]
            .into_iter()
            .chain(rest[1..].iter().cloned())
            .collect();
        open.send_replace(true);
        let ids: Vec<BuildsetId> = submitted.iter().map(|s| s.buildset_id).collect();
        let mut started = Vec::new();
        while started.len() < ids.len() {
            let event = guard("a build to start", events.recv()).await??;
            if let Event::BuildStarted { buildset_id, .. } = event {
                let i = ids.iter().position(|id| *id == buildset_id).unwrap_or(99);
                started.push(i);
            }
        }
        // alpha holds the highest priority (9), so its queue goes first, its own most
        // urgent request first; then delta (7); then gamma and beta, both at 5, gamma's
        // request older; alpha's second request (1) outranks delta's last (0).
        ensure!(
            started == [3, 4, 1, 2, 5, 0],
            "{}: start order {started:?}",
            backend.name
        );
        all_complete(&engine, &ids).await?;
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporters_hear_events_written_after_an_idle_prune_emptied_the_outbox() -> Result<()> {
    use kiln_engine::model::Report;
    use kiln_engine::{Reporter, ReporterConfig};
    use tokio::sync::mpsc;

    struct Collect(mpsc::UnboundedSender<Report>);
    #[async_trait::async_trait]
    impl Reporter for Collect {
        async fn report(&self, event: &Report) -> Result<(), String> {
            self.0.send(event.clone()).map_err(|e| e.to_string())
        }
    }

    for backend in backends("prune").await? {
        let mut config = EngineConfig::new(&backend.url).master_name("idle");
        // The prune runs often, so that an idle gap outlasts it many times over.
        config.outbox_prune_interval = Duration::from_millis(20);
        config.poll_interval = Duration::from_millis(20);
        let engine = Engine::open(config).await?;
        engine
            .register_builder(BuilderConfig::new("b"), noop())
            .await?;
        let (tx, mut heard) = mpsc::unbounded_channel();
        engine
            .register_reporter(ReporterConfig::new("collect"), Collect(tx))
            .await?;
        let mut events = engine.subscribe();
        let mut last_seq = 0;
        for round in 0..3 {
            let submitted = engine
                .submit(&Submission::new(format!("round {round}")).builder("b"))
                .await?;
            all_complete(&engine, &[submitted.buildset_id]).await?;
            // submitted, started, finished, complete: all four, after the last seq.
            for _ in 0..4 {
                let event = guard("an event after the prune", heard.recv()).await?;
                let event = event.ok_or_else(|| anyhow::anyhow!("reporter gone"))?;
                ensure!(
                    event.seq > last_seq,
                    "{}: seq {} reused",
                    backend.name,
                    event.seq
                );
                last_seq = event.seq;
            }
            // Idle until a prune has emptied the outbox behind the reporter.
            guard("the outbox to be pruned", async {
                loop {
                    if let Event::OutboxPruned { .. } = events.recv().await? {
                        let left = engine.client().reporters().await?;
                        if left.iter().all(|r| r.pending == 0) {
                            return anyhow::Ok(());
                        }
                    }
                }
            })
            .await??;
        }
        engine.shutdown().await;
    }
    Ok(())
}

/// A row the database refuses: finishing a build whose return value says "poisoned"
/// fails, as a row with bytes a backend cannot store once did.
async fn plant_poison(backend: &support::Backend) -> Result<()> {
    match backend.name {
        "postgres" => {
            backend
                .execute(
                    "CREATE FUNCTION poison() RETURNS trigger AS $$
                     BEGIN
                         IF NEW.return_value LIKE '%poisoned%' THEN RAISE EXCEPTION 'poisoned row'; END IF;
                         RETURN NEW;
                     END $$ LANGUAGE plpgsql;
                     CREATE TRIGGER poison BEFORE UPDATE ON builds FOR EACH ROW EXECUTE FUNCTION poison();",
                )
                .await
        }
        _ => {
            backend
                .execute(
                    "CREATE TRIGGER poison BEFORE UPDATE ON builds
                     WHEN NEW.return_value LIKE '%poisoned%'
                     BEGIN SELECT RAISE(ABORT, 'poisoned row'); END;",
                )
                .await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_whose_end_cannot_be_written_ends_alone_as_exception() -> Result<()> {
    use kiln_storage::BuildFilter;
    use tokio::sync::watch;

    for backend in backends("poison").await? {
        let engine = Engine::open(EngineConfig::new(&backend.url).master_name("poison")).await?;
        plant_poison(&backend).await?;
        // Every build waits for the gate, so that they finish together and their ends
        // share the finisher's batches.
        let (open, gate) = watch::channel(false);
        let job = FnExecutor::new(move |ctx| {
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                let poison = ctx.kwargs()["poison"].as_bool().unwrap_or(false);
                let value = if poison {
                    json!({ "poisoned": true })
                } else {
                    json!({ "fine": true })
                };
                Ok(Outcome::success(value))
            }
        });
        let job = std::sync::Arc::new(job);
        let mut names = Vec::new();
        for i in 0..20 {
            let name = format!("b{i}");
            engine
                .register_builder_arc(
                    BuilderConfig::new(&name).kwargs(json!({ "poison": i == 7 })),
                    job.clone(),
                )
                .await?;
            names.push(name);
        }
        let mut events = engine.subscribe();
        let mut all = Submission::new("poison");
        all.builders = names.clone();
        let submitted = engine.submit(&all).await?;
        let mut started = 0;
        while started < names.len() {
            if let Event::BuildStarted { .. } = guard("builds to start", events.recv()).await?? {
                started += 1;
            }
        }
        open.send_replace(true);
        let done = guard("the buildset", engine.wait_buildset(submitted.buildset_id)).await??;
        ensure!(
            done.results == Some(ResultCode::Exception),
            "{}: {done:?}",
            backend.name
        );
        let builds = engine
            .client()
            .builds(&BuildFilter {
                buildset_id: Some(submitted.buildset_id),
                ..BuildFilter::default()
            })
            .await?;
        ensure!(builds.len() == 20 && builds.iter().all(|b| b.complete_at.is_some()));
        let exceptions: Vec<_> = builds
            .iter()
            .filter(|b| b.results == Some(ResultCode::Exception))
            .collect();
        ensure!(exceptions.len() == 1, "{}: {exceptions:?}", backend.name);
        let error = exceptions[0].error.as_deref().unwrap_or_default();
        ensure!(
            error.contains("could not be recorded") && exceptions[0].return_value.is_none(),
            "{error}"
        );
        ensure!(
            builds
                .iter()
                .filter(|b| b.results == Some(ResultCode::Success))
                .count()
                == 19
        );
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_past_one_of_its_write_limits_ends_as_exception_naming_it() -> Result<()> {
    use kiln_engine::{BuildLimits, JobError, model::Properties};
    use kiln_storage::BuildFilter;

    let backend = &backends("limits").await?[0];
    let engine = Engine::open(EngineConfig::new(&backend.url).master_name("limits")).await?;
    let small = BuildLimits {
        status_bytes: 64,
        progress_groups: 3,
        property_bytes: 1 << 10,
        children: 5,
        trigger_depth: 2,
    };
    let job = |what: &'static str| {
        FnExecutor::new(move |ctx| async move {
            let e = |e: kiln_engine::WriteError| JobError::new(e.to_string());
            match what {
                "state" => ctx.set_state(&"s".repeat(65)).await.map_err(e)?,
                "groups" => {
                    for i in 0..4 {
                        ctx.progress(&[&format!("g{i}")], 1, 1, "")
                            .await
                            .map_err(e)?;
                    }
                }
                "properties" => {
                    for i in 0..20 {
                        // Ignoring the error does not help: the build still ends as
                        // EXCEPTION.
                        let _ = ctx
                            .set_property(&format!("p{i}"), json!("v".repeat(100)), "t")
                            .await;
                    }
                }
                "children" => {
                    for _ in 0..3 {
                        ctx.trigger(&["ok", "ok"], Properties::new(), false, "")
                            .await
                            .map_err(|e| JobError::new(e.to_string()))?;
                    }
                }
                _ => {
                    // Triggers itself: every level one deeper.
                    ctx.trigger(&["deep"], Properties::new(), true, "")
                        .await
                        .map_err(|e| JobError::new(e.to_string()))?;
                }
            }
            Ok(Outcome::success(json!(null)))
        })
    };
    for name in ["state", "groups", "properties", "children", "deep"] {
        let mut config = BuilderConfig::new(name);
        config.limits = small;
        engine.register_builder(config, job(name)).await?;
    }
    engine
        .register_builder(BuilderConfig::new("ok"), noop())
        .await?;
    for (name, reason) in [
        ("state", "status limit exceeded"),
        ("groups", "progress limit exceeded"),
        ("properties", "property limit exceeded"),
        ("children", "children limit exceeded"),
        // The first of the chain ends with its children's verdict; the deepest one
        // with the limit (below).
        ("deep", "its children ended EXCEPTION"),
    ] {
        let s = engine.submit(&Submission::new(name).builder(name)).await?;
        guard(name, engine.wait_buildset(s.buildset_id)).await??;
        let builds = engine
            .client()
            .builds(&BuildFilter {
                buildset_id: Some(s.buildset_id),
                ..BuildFilter::default()
            })
            .await?;
        let build = &builds[0];
        ensure!(
            build.results == Some(ResultCode::Exception)
                && build.error.as_deref().is_some_and(|e| e.contains(reason)),
            "{name}: {:?} {:?}",
            build.results,
            build.error
        );
    }
    // The self-triggering chain stopped at the depth limit: the submission and two
    // levels of children, no more.
    let deep = engine.client().builder_named("deep").await?;
    let chain = engine
        .client()
        .builds(&BuildFilter {
            builder_id: Some(deep.id),
            ..BuildFilter::default()
        })
        .await?;
    ensure!(chain.len() == 3, "{} deep builds", chain.len());
    let deepest = chain
        .iter()
        .max_by_key(|b| b.number)
        .ok_or_else(|| anyhow::anyhow!("none"))?;
    ensure!(
        deepest
            .error
            .as_deref()
            .is_some_and(|e| e.contains("trigger depth limit exceeded")),
        "{:?}",
        deepest.error
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_waiting_on_children_do_not_hold_the_room_their_children_need() -> Result<()> {
    use kiln_engine::model::Properties;
    for backend in backends("room").await? {
        let mut config = EngineConfig::new(&backend.url).master_name("tight");
        // Room for one build: a parent waiting on its child must not keep the child out.
        config.max_running_builds = 1;
        let engine = Engine::open(config).await?;
        engine
            .register_builder(BuilderConfig::new("child"), noop())
            .await?;
        engine
            .register_builder(
                BuilderConfig::new("parent"),
                FnExecutor::new(|ctx| async move {
                    ctx.trigger(&["child", "child"], Properties::new(), true, "")
                        .await
                        .map_err(|e| kiln_engine::JobError::new(e.to_string()))?;
                    Ok(Outcome::success(json!(null)))
                }),
            )
            .await?;
        let mut ids = Vec::new();
        for i in 0..3 {
            let s = engine
                .submit(&Submission::new(format!("parent {i}")).builder("parent"))
                .await?;
            ids.push(s.buildset_id);
        }
        all_complete(&engine, &ids).await?;
        for id in ids {
            let done = engine.client().buildset(id).await?;
            ensure!(
                done.results == Some(ResultCode::Success),
                "{}: {done:?}",
                backend.name
            );
        }
        engine.shutdown().await;
    }
    Ok(())
}
