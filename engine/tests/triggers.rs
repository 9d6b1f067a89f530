//! Parent/child buildsets, relationship policies (native and WASM) and dependencies,
//! end to end on SQLite. Tests wait on engine events; timeouts only turn hangs into
//! failures.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use kiln_engine::model::{BuilderStatus, DEPENDENCY, Properties, ResultCode};
use kiln_engine::wasm::{Grants, Limits, WasmHost, WasmHostConfig, WasmPolicy};
use kiln_engine::{
    BuilderConfig, Engine, EngineConfig, Event, FnExecutor, JobError, Outcome, Submission,
};
use kiln_storage::{BuildFilter, BuildsetFilter, FinishedBuild, NewBuild, NewBuildset};
use serde_json::json;

mod support;
use support::{Db, db, guard};

async fn engine(db: &Db) -> Result<Engine> {
    Ok(Engine::open(EngineConfig::new(&db.url).master_name("test")).await?)
}

fn host() -> WasmHost {
    WasmHost::new(WasmHostConfig {
        cache_dir: None,
        max_instances: 64,
    })
}

async fn policy(host: &WasmHost, name: &str) -> Result<WasmPolicy> {
    let bytes = kiln_bundled::get(name).ok_or_else(|| anyhow!("no bundled {name}"))?;
    let plugin = host.load_policy(name, Arc::from(bytes)).await?;
    Ok(WasmPolicy::new(plugin, Limits::policy())?)
}

/// A job that ends with a fixed result.
fn ends(results: ResultCode) -> FnExecutor {
    FnExecutor::new(move |ctx| async move {
        Ok(Outcome::with_results(
            results,
            Some(json!({"builder": ctx.builder()})),
        ))
    })
}

/// A job that triggers `children` under `relationship`, waits, and returns what it saw.
fn parent_of(children: &'static [&'static str], relationship: &'static str) -> FnExecutor {
    FnExecutor::new(move |ctx| async move {
        let triggered = ctx
            .trigger(children, Properties::new(), true, relationship)
            .await
            .map_err(|e| JobError::new(e.to_string()))?;
        let seen: Vec<_> = triggered
            .children
            .iter()
            .map(|c| json!({"builder": c.builder, "results": c.results}))
            .collect();
        Ok(Outcome::success(
            json!({"verdict": triggered.verdict, "children": seen}),
        ))
    })
}

async fn wait_all(engine: &Engine, id: kiln_engine::model::BuildsetId) -> Result<ResultCode> {
    let bs = guard("the buildset", engine.wait_buildset(id)).await??;
    if bs.results != Some(ResultCode::Success) {
        // Say why in the test's output.
        for b in engine.client().builds(&BuildFilter::default()).await? {
            if let Some(error) = b.error {
                eprintln!("build {} ({:?}): {error}", b.id, b.results);
            }
        }
    }
    bs.results.ok_or_else(|| anyhow!("no results"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_level_trigger_tree_completes_with_each_levels_policy_result() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    let host = host();
    // top (a WASM fan-out job) -> 2 x mid under "soft" (best-effort plugin)
    // mid (a Rust job)         -> leaf-ok + leaf-bad under "triggers" (worst-of)
    engine.set_policy("soft", policy(&host, "best-effort").await?);
    let fan_out = host
        .job_executor(
            "fan-out",
            kiln_bundled::get("fan-out").ok_or_else(|| anyhow!("no fan-out"))?,
            Limits::default(),
            Grants::default(),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("top")
                .kwargs(json!({"builders": ["mid", "mid"], "relationship": "soft"})),
            fan_out,
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("mid"),
            parent_of(&["leaf-ok", "leaf-bad"], ""),
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("leaf-ok"), ends(ResultCode::Success))
        .await?;
    engine
        .register_builder(BuilderConfig::new("leaf-bad"), ends(ResultCode::Failure))
        .await?;
    let submitted = engine
        .submit(&Submission::new("tree").builder("top"))
        .await?;
    // best-effort turns the mids' failures into WARNINGS for top.
    ensure!(wait_all(&engine, submitted.buildset_id).await? == ResultCode::Warnings);

    let client = engine.client();
    let top = &client
        .builds(&BuildFilter {
            buildset_id: Some(submitted.buildset_id),
            ..Default::default()
        })
        .await?[0];
    ensure!(top.results == Some(ResultCode::Warnings), "top: {top:?}");
    let rv = top.return_value.clone().unwrap_or_default();
    ensure!(rv["verdict"] == "WARNINGS", "top returned {rv}");
    ensure!(rv["children"].as_array().map(Vec::len) == Some(2));
    ensure!(rv["children"][0]["results"] == "FAILURE");

    // Level two: each mid hangs from top under "soft" and ended FAILURE (worst-of).
    let mids = client
        .buildsets(&BuildsetFilter {
            parent_buildid: Some(top.id),
            ..Default::default()
        })
        .await?;
    ensure!(mids.len() == 2);
    for mid_set in &mids {
        ensure!(mid_set.parent_relationship.as_deref() == Some("soft"));
        ensure!(mid_set.results == Some(ResultCode::Failure));
        let mid = &client
            .builds(&BuildFilter {
                buildset_id: Some(mid_set.id),
                ..Default::default()
            })
            .await?[0];
        ensure!(mid.results == Some(ResultCode::Failure));
        ensure!(
            mid.error
                .as_deref()
                .is_some_and(|e| e.contains("triggers policy")),
            "mid error: {:?}",
            mid.error
        );
        // Level three: the leaves, under "triggers".
        let leaves = client
            .buildsets(&BuildsetFilter {
                parent_buildid: Some(mid.id),
                ..Default::default()
            })
            .await?;
        let mut results: Vec<_> = leaves.iter().filter_map(|l| l.results).collect();
        results.sort_by_key(|r| r.code());
        ensure!(results == [ResultCode::Success, ResultCode::Failure]);
        ensure!(
            leaves
                .iter()
                .all(|l| l.parent_relationship.as_deref() == Some("triggers"))
        );
    }
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_fast_cancels_the_running_siblings_of_the_first_failure() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    let host = host();
    engine.set_policy("ff", policy(&host, "fail-fast").await?);
    let slow_running = Arc::new(tokio::sync::Semaphore::new(0));
    let started = slow_running.clone();
    engine
        .register_builder(
            BuilderConfig::new("slow"),
            FnExecutor::new(move |ctx| {
                let started = started.clone();
                async move {
                    started.add_permits(1);
                    ctx.stopped().await;
                    Ok(Outcome::success(json!("stopped")))
                }
            }),
        )
        .await?;
    // The failing child waits until both slow siblings run, so that the cancel has
    // running builds to stop.
    let gate = slow_running.clone();
    engine
        .register_builder(
            BuilderConfig::new("fails"),
            FnExecutor::new(move |_ctx| {
                let gate = gate.clone();
                async move {
                    let _both = gate.acquire_many(2).await;
                    Err(JobError::new("broken"))
                }
            }),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("parent"),
            parent_of(&["slow", "fails", "slow"], "ff"),
        )
        .await?;
    let submitted = engine
        .submit(&Submission::new("ff").builder("parent"))
        .await?;
    ensure!(wait_all(&engine, submitted.buildset_id).await? == ResultCode::Failure);
    let client = engine.client();
    let parent = &client
        .builds(&BuildFilter {
            buildset_id: Some(submitted.buildset_id),
            ..Default::default()
        })
        .await?[0];
    let children = client
        .buildsets(&BuildsetFilter {
            parent_buildid: Some(parent.id),
            ..Default::default()
        })
        .await?;
    ensure!(children.len() == 3);
    // The parent goes on once the cancel is asked for; its stopped siblings finish on
    // their own, a moment later.
    let mut results = Vec::new();
    for child in &children {
        let done = guard("a cancelled sibling", engine.wait_buildset(child.id)).await??;
        results.extend(done.results);
    }
    results.sort_by_key(|r| r.code());
    ensure!(
        results
            == [
                ResultCode::Failure,
                ResultCode::Cancelled,
                ResultCode::Cancelled
            ],
        "children ended {results:?}"
    );
    // The slow siblings had started and were stopped, not cancelled before running.
    let slow = client.builder_named("slow").await?;
    let slow_builds = client
        .builds(&BuildFilter {
            builder_id: Some(slow.id),
            ..Default::default()
        })
        .await?;
    ensure!(
        slow_builds.len() == 2
            && slow_builds
                .iter()
                .all(|b| b.results == Some(ResultCode::Cancelled))
    );
    engine.shutdown().await;
    Ok(())
}

fn os_threads() -> Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| anyhow!("no thread count in /proc/self/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waited_for_children_complete_without_a_thread_each() -> Result<()> {
    const CHILDREN: usize = 1_000;
    let db = db()?;
    let engine = engine(&db).await?;
    let mut events = engine.subscribe();
    let (release, gate) = tokio::sync::watch::channel(false);
    engine
        .register_builder(
            BuilderConfig::new("child"),
            FnExecutor::new(move |ctx| {
                let mut gate = gate.clone();
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(Outcome::success(json!(ctx.number())))
                }
            }),
        )
        .await?;
    static NAMES: [&str; CHILDREN] = ["child"; CHILDREN];
    engine
        .register_builder(BuilderConfig::new("parent"), parent_of(&NAMES, ""))
        .await?;
    let baseline = os_threads()?;
    let submitted = engine
        .submit(&Submission::new("wide").builder("parent"))
        .await?;
    // Wait until every child runs at once, the parent waiting on all of them.
    let mut running = 0;
    guard("all children to start", async {
        while running < CHILDREN {
            if let Event::BuildStarted { builder, .. } = events.recv().await? {
                running += usize::from(builder == "child");
            }
        }
        anyhow::Ok(())
    })
    .await??;
    let during = os_threads()?;
    ensure!(
        during < baseline + 32,
        "{CHILDREN} waiting builds took {during} OS threads (from {baseline})"
    );
    release.send_replace(true);
    ensure!(wait_all(&engine, submitted.buildset_id).await? == ResultCode::Success);
    let parent = &engine
        .client()
        .builds(&BuildFilter {
            buildset_id: Some(submitted.buildset_id),
            ..Default::default()
        })
        .await?[0];
    let rv = parent.return_value.clone().unwrap_or_default();
    ensure!(rv["children"].as_array().map(Vec::len) == Some(CHILDREN));
    ensure!(
        rv["children"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["results"] == "SUCCESS"))
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_parent_cancels_its_waited_for_children_recursively() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    let mut events = engine.subscribe();
    engine
        .register_builder(
            BuilderConfig::new("leaf"),
            FnExecutor::new(|ctx| async move {
                ctx.stopped().await;
                Ok(Outcome::success(json!(null)))
            }),
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("mid"), parent_of(&["leaf", "leaf"], ""))
        .await?;
    engine
        .register_builder(BuilderConfig::new("top"), parent_of(&["mid"], ""))
        .await?;
    let submitted = engine
        .submit(&Submission::new("deep").builder("top"))
        .await?;
    let mut leaves = 0;
    guard("both leaves to start", async {
        while leaves < 2 {
            if let Event::BuildStarted { builder, .. } = events.recv().await? {
                leaves += usize::from(builder == "leaf");
            }
        }
        anyhow::Ok(())
    })
    .await??;
    engine.cancel_request(submitted.requests["top"]).await?;
    ensure!(wait_all(&engine, submitted.buildset_id).await? == ResultCode::Cancelled);
    // Every buildset of the tree ends cancelled: nothing is left running.
    let all = guard("the tree to settle", async {
        loop {
            let all = engine
                .client()
                .buildsets(&BuildsetFilter::default())
                .await?;
            if all.iter().all(|b| b.complete) {
                return anyhow::Ok(all);
            }
            let _ = events.recv().await;
        }
    })
    .await??;
    ensure!(all.len() == 4, "{} buildsets", all.len());
    ensure!(
        all.iter().all(|b| b.results == Some(ResultCode::Cancelled)),
        "{all:?}"
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_parent_adopts_the_children_its_dead_master_started() -> Result<()> {
    let db = db()?;
    let (parent_request, parent_set, done_child);
    {
        // A master that ran the parent, which triggered two children: the first has
        // finished, the second is queued. Then the master died.
        let store = kiln_storage::open(&db.url).await?;
        let ago = kiln_engine::model::now() - chrono::TimeDelta::hours(1);
        let ghost = store.master_register("ghost", ago).await?.master_id;
        let parent_b = store.builder_ensure("parent", None).await?;
        let child_b = store.builder_ensure("child", None).await?;
        let added = store
            .buildset_add(&NewBuildset {
                reason: "adopt".into(),
                builder_ids: vec![parent_b],
                submitted_at: ago,
                ..Default::default()
            })
            .await?;
        parent_set = added.buildset_id;
        parent_request = added.requests[&parent_b];
        store.request_claim(&[parent_request], ghost, ago).await?;
        let old_parent = store
            .build_add(&NewBuild {
                request_id: parent_request,
                master_id: ghost,
                worker_slot: None,
                state_string: String::new(),
                started_at: ago,
            })
            .await?;
        let mut children = Vec::new();
        for i in 0..2 {
            let child = store
                .buildset_add(&NewBuildset {
                    reason: "child".into(),
                    builder_ids: vec![child_b],
                    waited_for: true,
                    parent_buildid: Some(old_parent.id),
                    parent_relationship: Some("triggers".into()),
                    parent_request_id: Some(parent_request),
                    trigger_key: Some(format!("t0.{i}")),
                    submitted_at: ago,
                    ..Default::default()
                })
                .await?;
            children.push(child);
        }
        let first = children[0].requests[&child_b];
        store.request_claim(&[first], ghost, ago).await?;
        let b = store
            .build_add(&NewBuild {
                request_id: first,
                master_id: ghost,
                worker_slot: None,
                state_string: String::new(),
                started_at: ago,
            })
            .await?;
        store
            .build_finish(
                ghost,
                &FinishedBuild {
                    build_id: b.id,
                    request_id: first,
                    results: ResultCode::Success,
                    return_value: Some(json!("first")),
                    error: None,
                    traceback: None,
                    state_string: None,
                    artifacts: Vec::new(),
                    complete_at: ago,
                    retry_at: None,
                },
            )
            .await?;
        store
            .request_complete(&[first], ResultCode::Success, ago)
            .await?;
        done_child = b.id;
    }
    let mut cfg = EngineConfig::new(&db.url).master_name("alive");
    cfg.heartbeat_interval = Duration::from_millis(20);
    cfg.master_expiry = Duration::from_secs(5);
    let engine = Engine::open(cfg).await?;
    engine
        .register_builder(
            BuilderConfig::new("child"),
            FnExecutor::new(|_| async { Ok(Outcome::success(json!("second"))) }),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("parent"),
            parent_of(&["child", "child"], ""),
        )
        .await?;
    ensure!(wait_all(&engine, parent_set).await? == ResultCode::Success);
    let client = engine.client();
    let children = client.children(parent_request).await?;
    ensure!(
        children.len() == 2,
        "the re-run started {} children",
        children.len()
    );
    let child = client.builder_named("child").await?;
    let child_builds = client
        .builds(&BuildFilter {
            builder_id: Some(child.id),
            ..Default::default()
        })
        .await?;
    ensure!(
        child_builds.len() == 2 && child_builds[0].id == done_child,
        "the finished child ran again: {child_builds:?}"
    );
    let parent_builds = client
        .builds(&BuildFilter {
            buildset_id: Some(parent_set),
            ..Default::default()
        })
        .await?;
    let rerun = parent_builds.last().ok_or_else(|| anyhow!("no rerun"))?;
    ensure!(
        children.iter().all(|c| c.parent_buildid == Some(rerun.id)),
        "children were not adopted by the re-run"
    );
    let rv = rerun.return_value.clone().unwrap_or_default();
    ensure!(rv["children"].as_array().map(Vec::len) == Some(2), "{rv}");
    engine.shutdown().await;
    Ok(())
}

fn returns(value: serde_json::Value) -> FnExecutor {
    FnExecutor::new(move |_| {
        let value = value.clone();
        async move { Ok(Outcome::success(value)) }
    })
}

/// Echoes the (resolved) args and the dependencies the build saw.
fn show_args() -> FnExecutor {
    FnExecutor::new(|ctx| async move {
        let deps: Vec<_> = ctx
            .dependencies()
            .iter()
            .map(|d| json!({"builder": d.builder, "value": d.return_value}))
            .collect();
        Ok(Outcome::success(json!({"args": ctx.args(), "deps": deps})))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependencys_return_value_reaches_its_dependent() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(
            BuilderConfig::new("fetch"),
            returns(json!({"path": "/src/v2"})),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("compile")
                .depends_on("fetch")
                .args(json!(["-o", {"$retval": "fetch", "pointer": "/path"}]))
                .kwargs(json!({"all": {"$retval": "fetch"}})),
            show_args(),
        )
        .await?;
    // No successful fetch yet: the default fails with a clear message.
    let early = engine
        .submit(&Submission::new("early").builder("compile"))
        .await?;
    ensure!(wait_all(&engine, early.buildset_id).await? == ResultCode::Failure);
    let failed = &engine
        .client()
        .builds(&BuildFilter {
            buildset_id: Some(early.buildset_id),
            ..Default::default()
        })
        .await?[0];
    ensure!(
        failed.error.as_deref() == Some("missing dependency: \"fetch\" has no successful build"),
        "{:?}",
        failed.error
    );

    let fetched = engine
        .submit(&Submission::new("fetch").builder("fetch"))
        .await?;
    wait_all(&engine, fetched.buildset_id).await?;
    let built = engine
        .submit(&Submission::new("go").builder("compile"))
        .await?;
    ensure!(wait_all(&engine, built.buildset_id).await? == ResultCode::Success);
    let build = &engine
        .client()
        .builds(&BuildFilter {
            buildset_id: Some(built.buildset_id),
            ..Default::default()
        })
        .await?[0];
    let rv = build.return_value.clone().unwrap_or_default();
    ensure!(rv["args"] == json!(["-o", "/src/v2"]), "{rv}");
    ensure!(rv["deps"][0]["builder"] == "fetch" && rv["deps"][0]["value"]["path"] == "/src/v2");
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dependency_is_built_first_when_the_builder_says_so() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(BuilderConfig::new("fetch"), returns(json!("sources")))
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("compile")
                .depends_on("fetch")
                .build_missing_dependencies()
                .args(json!([{"$retval": "fetch"}])),
            show_args(),
        )
        .await?;
    let submitted = engine
        .submit(&Submission::new("go").builder("compile"))
        .await?;
    ensure!(wait_all(&engine, submitted.buildset_id).await? == ResultCode::Success);
    let client = engine.client();
    let build = &client
        .builds(&BuildFilter {
            buildset_id: Some(submitted.buildset_id),
            ..Default::default()
        })
        .await?[0];
    ensure!(build.return_value.as_ref().map(|v| &v["args"]) == Some(&json!(["sources"])));
    let children = client
        .buildsets(&BuildsetFilter {
            parent_buildid: Some(build.id),
            ..Default::default()
        })
        .await?;
    ensure!(children.len() == 1 && children[0].parent_relationship.as_deref() == Some(DEPENDENCY));
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_cycles_and_undeclared_retval_references_are_refused() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(BuilderConfig::new("a").depends_on("b"), returns(json!(1)))
        .await?;
    let cycle = engine
        .register_builder(BuilderConfig::new("b").depends_on("a"), returns(json!(2)))
        .await
        .err()
        .ok_or_else(|| anyhow!("a cycle was accepted"))?;
    ensure!(cycle.to_string().contains("cycle: a -> b -> a"), "{cycle}");
    let undeclared = engine
        .register_builder(
            BuilderConfig::new("c").args(json!({"x": {"$retval": "a"}})),
            returns(json!(3)),
        )
        .await
        .err()
        .ok_or_else(|| anyhow!("an undeclared reference was accepted"))?;
    ensure!(
        undeclared.to_string().contains("not in its depends_on"),
        "{undeclared}"
    );
    let itself = engine
        .register_builder(BuilderConfig::new("d").depends_on("d"), returns(json!(4)))
        .await
        .err()
        .ok_or_else(|| anyhow!("a self-dependency was accepted"))?;
    ensure!(itself.to_string().contains("depends on itself"));
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_status_goes_from_not_built_to_success_outdated_and_failed() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    let fail_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = fail_next.clone();
    let skip_dep = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let skip = skip_dep.clone();
    engine
        .register_builder(
            BuilderConfig::new("dep"),
            FnExecutor::new(move |_| {
                let results = if skip.load(std::sync::atomic::Ordering::SeqCst) {
                    ResultCode::Skipped
                } else {
                    ResultCode::Success
                };
                async move { Ok(Outcome::with_results(results, None)) }
            }),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("skipper"),
            FnExecutor::new(|_| async { Ok(Outcome::with_results(ResultCode::Skipped, None)) }),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("app").depends_on("dep"),
            FnExecutor::new(move |_| {
                let fail = flag.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if fail {
                        Err(JobError::new("broke"))
                    } else {
                        Ok(Outcome::success(json!(null)))
                    }
                }
            }),
        )
        .await?;
    let client = engine.client().clone();
    let status = |name: &'static str| {
        let client = client.clone();
        async move {
            let builder = client.builder_named(name).await?;
            anyhow::Ok(client.builder_status(&builder).await?)
        }
    };
    let engine_ref = &engine;
    let run = |name: &'static str| async move {
        let s = engine_ref
            .submit(&Submission::new("s").builder(name))
            .await?;
        wait_all(engine_ref, s.buildset_id).await
    };
    ensure!(status("app").await? == BuilderStatus::NotBuilt);
    run("dep").await?;
    run("app").await?;
    ensure!(status("app").await? == BuilderStatus::Success);
    run("skipper").await?;
    ensure!(
        status("skipper").await? == BuilderStatus::NotBuilt,
        "SKIPPED counts as built"
    );
    // A newer SKIPPED build of the dependency never makes anything outdated...
    skip_dep.store(true, std::sync::atomic::Ordering::SeqCst);
    run("dep").await?;
    ensure!(status("app").await? == BuilderStatus::Success);
    // ...a newer success does.
    skip_dep.store(false, std::sync::atomic::Ordering::SeqCst);
    run("dep").await?;
    ensure!(status("app").await? == BuilderStatus::Outdated);
    fail_next.store(true, std::sync::atomic::Ordering::SeqCst);
    run("app").await?;
    ensure!(status("app").await? == BuilderStatus::Failed);
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmit_runs_only_what_failed_or_was_cancelled_unless_asked_for_all() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(BuilderConfig::new("good"), ends(ResultCode::Success))
        .await?;
    engine
        .register_builder(BuilderConfig::new("bad"), ends(ResultCode::Failure))
        .await?;
    let first = engine
        .submit(
            &Submission::new("nightly")
                .builder("good")
                .builder("bad")
                .property("flavour", json!("full"), "user"),
        )
        .await?;
    ensure!(wait_all(&engine, first.buildset_id).await? == ResultCode::Failure);
    let again = engine.resubmit(first.buildset_id, false).await?;
    ensure!(again.requests.keys().collect::<Vec<_>>() == ["bad"]);
    let resubmitted = engine.client().buildset(again.buildset_id).await?;
    ensure!(resubmitted.reason.contains("nightly"));
    let props = engine
        .client()
        .buildset_properties(again.buildset_id)
        .await?;
    ensure!(props["flavour"].value == json!("full"));
    ensure!(props["resubmitted_from"].value == json!(first.buildset_id.0));
    wait_all(&engine, again.buildset_id).await?;
    let everything = engine.resubmit(first.buildset_id, true).await?;
    ensure!(everything.requests.len() == 2);
    wait_all(&engine, everything.buildset_id).await?;

    let good_only = engine
        .submit(&Submission::new("ok").builder("good"))
        .await?;
    wait_all(&engine, good_only.buildset_id).await?;
    let nothing = engine.resubmit(good_only.buildset_id, false).await;
    ensure!(
        nothing.is_err_and(|e| e.to_string().contains("nothing in buildset")),
        "resubmitting a successful buildset was accepted"
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_policy_plugins_decide_as_the_native_policies_do() -> Result<()> {
    use kiln_engine::BundledPolicy;
    use kiln_engine::Policy;
    use support::child;
    let host = host();
    let cases = [
        vec![child(true, Some(ResultCode::Success)), child(false, None)],
        vec![child(true, Some(ResultCode::Failure)), child(false, None)],
        vec![
            child(true, Some(ResultCode::Failure)),
            child(true, Some(ResultCode::Success)),
        ],
        vec![
            child(true, Some(ResultCode::Warnings)),
            child(true, Some(ResultCode::Skipped)),
        ],
        vec![
            child(true, Some(ResultCode::Cancelled)),
            child(true, Some(ResultCode::Exception)),
        ],
        vec![],
    ];
    let parent = support::parent("r");
    for name in BundledPolicy::names() {
        let native = BundledPolicy::named(name).ok_or_else(|| anyhow!("{name}"))?;
        let plugin = policy(&host, name).await?;
        for case in &cases {
            let a = native.decide(&parent, case).await?;
            let b = plugin.decide(&parent, case).await?;
            ensure!(
                a == b,
                "{name} disagrees on {case:?}: native {a:?}, plugin {b:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_relationship_or_builder_fails_the_trigger_with_a_message() -> Result<()> {
    let db = db()?;
    let engine = engine(&db).await?;
    engine
        .register_builder(BuilderConfig::new("p1"), parent_of(&["x"], "nope"))
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("p2"),
            parent_of(&["no-such-builder"], ""),
        )
        .await?;
    let s = engine
        .submit(&Submission::new("bad").builder("p1").builder("p2"))
        .await?;
    ensure!(wait_all(&engine, s.buildset_id).await? == ResultCode::Failure);
    let builds = engine
        .client()
        .builds(&BuildFilter {
            buildset_id: Some(s.buildset_id),
            ..Default::default()
        })
        .await?;
    let errors: Vec<String> = builds.iter().filter_map(|b| b.error.clone()).collect();
    ensure!(
        errors
            .iter()
            .any(|e| e.contains("no policy for relationship \"nope\"")),
        "{errors:?}"
    );
    ensure!(
        errors
            .iter()
            .any(|e| e.contains("unknown builder \"no-such-builder\""))
    );
    engine.shutdown().await;
    Ok(())
}
