//! The WASM plugin host: every bundled plugin, every hostile plugin, the sandbox's
//! grants and refusals, cancellation and plugin loading. Builds run through a real
//! engine on SQLite; tests wait on engine events (timeouts only guard against hangs).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use kiln_engine::model::{Build, LogLevel, LogQuery, ResultCode};
use kiln_engine::wasm::{DirGrant, Grants, Limits, WasmError, WasmHost, WasmHostConfig};
use kiln_engine::{BuilderConfig, Engine, EngineConfig, Event, Submission};
use kiln_storage::BuildFilter;
use serde_json::{Value, json};
use tokio::sync::broadcast;

const GUARD: Duration = Duration::from_secs(60);
/// Pooling slots per test host: the tests run in parallel, each with its own engine.
const SLOTS: u32 = 64;

async fn guard<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(GUARD, fut)
        .await
        .map_err(|_| anyhow!("timed out waiting for {what}"))
}

fn plugin(name: &str) -> Result<&'static [u8]> {
    kiln_bundled::get(name).ok_or_else(|| anyhow!("no bundled plugin {name}"))
}

struct Rig {
    engine: Engine,
    host: WasmHost,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn new() -> Result<Rig> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
        let engine = Engine::open(
            EngineConfig::new(url)
                .master_name("wasm-test")
                .results_dir(dir.path().join("results")),
        )
        .await?;
        let host = WasmHost::new(WasmHostConfig {
            cache_dir: Some(dir.path().join("cache")),
            max_instances: SLOTS,
        });
        Ok(Rig { engine, host, dir })
    }

    async fn builder(
        &self,
        name: &str,
        plugin_name: &str,
        config: BuilderConfig,
        limits: Limits,
        grants: Grants,
    ) -> Result<()> {
        let executor = self
            .host
            .job_executor(plugin_name, plugin(plugin_name)?, limits, grants)
            .await?;
        self.engine
            .register_builder(
                BuilderConfig {
                    name: name.into(),
                    ..config
                },
                executor,
            )
            .await?;
        Ok(())
    }

    async fn simple(&self, plugin_name: &str) -> Result<()> {
        self.builder(
            plugin_name,
            plugin_name,
            BuilderConfig::new(plugin_name),
            Limits::default(),
            Grants::default(),
        )
        .await
    }

    /// Runs one buildset on `builder` and returns its one build.
    async fn run(&self, builder: &str) -> Result<Build> {
        let s = self
            .engine
            .submit(&Submission::new("test").builder(builder))
            .await?;
        guard("the buildset", self.engine.wait_buildset(s.buildset_id)).await??;
        let builds = self
            .engine
            .client()
            .builds(&BuildFilter {
                buildset_id: Some(s.buildset_id),
                ..Default::default()
            })
            .await?;
        builds
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no build ran"))
    }

    async fn logs(&self, build: &Build) -> Result<Vec<String>> {
        let entries = self
            .engine
            .client()
            .logs(&LogQuery {
                build_id: Some(build.id),
                ..Default::default()
            })
            .await?;
        Ok(entries.into_iter().map(|e| e.record.message).collect())
    }
}

fn exception_containing(build: &Build, text: &str) -> Result<()> {
    ensure!(
        build.results == Some(ResultCode::Exception),
        "expected EXCEPTION, got {:?}: {:?}",
        build.results,
        build.error
    );
    let error = build.error.as_deref().unwrap_or("");
    ensure!(
        error.contains(text),
        "expected {text:?} in the error: {error}"
    );
    Ok(())
}

fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    f(&mut l);
    l
}

// ---- the useful plugins ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_its_builders_args() -> Result<()> {
    let rig = Rig::new().await?;
    rig.builder(
        "echo",
        "echo",
        BuilderConfig::new("echo").args(json!(["a", 1, {"b": null}])),
        Limits::default(),
        Grants::default(),
    )
    .await?;
    let build = rig.run("echo").await?;
    ensure!(build.results == Some(ResultCode::Success), "{build:?}");
    ensure!(build.return_value == Some(json!(["a", 1, {"b": null}])));
    ensure!(rig.logs(&build).await? == ["echoing the args of echo #1"]);
    ensure!(build.state_string == "build successful");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_succeeds_and_returns_nothing() -> Result<()> {
    let rig = Rig::new().await?;
    rig.simple("noop").await?;
    let build = rig.run("noop").await?;
    ensure!(
        build.results == Some(ResultCode::Success) && build.return_value.is_none(),
        "{build:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_ends_as_failure_with_its_message_and_details() -> Result<()> {
    let rig = Rig::new().await?;
    let config = BuilderConfig::new("fail")
        .kwargs(json!({"message": "tests failed: 2 of 9", "details": "test_a\ntest_b"}));
    rig.builder("fail", "fail", config, Limits::default(), Grants::default())
        .await?;
    let build = rig.run("fail").await?;
    ensure!(build.results == Some(ResultCode::Failure), "{build:?}");
    ensure!(
        build.error.as_deref() == Some("tests failed: 2 of 9")
            && build.traceback.as_deref() == Some("test_a\ntest_b")
    );
    ensure!(build.state_string == "failed: tests failed: 2 of 9");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fib_does_cpu_work_and_returns_the_answer() -> Result<()> {
    let rig = Rig::new().await?;
    rig.builder(
        "fib",
        "fib",
        BuilderConfig::new("fib").args(json!([27])),
        Limits::default(),
        Grants::default(),
    )
    .await?;
    let build = rig.run("fib").await?;
    ensure!(
        build.return_value == Some(json!({"n": 27, "fib": 196_418})),
        "{build:?}"
    );
    ensure!(rig.logs(&build).await? == ["fib(27) = 196418"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_demo_reports_nested_groups_that_sum_up_the_tree() -> Result<()> {
    let rig = Rig::new().await?;
    rig.builder(
        "progress",
        "progress-demo",
        BuilderConfig::new("progress").kwargs(json!({"steps": 3})),
        Limits::default(),
        Grants::default(),
    )
    .await?;
    let build = rig.run("progress").await?;
    ensure!(build.results == Some(ResultCode::Success), "{build:?}");
    let tree = rig.engine.client().progress(build.id).await?;
    let names: Vec<&str> = tree.children.iter().map(|c| c.name.as_str()).collect();
    ensure!(names == ["fetch", "compile", "test"], "{names:?}");
    // 2 + 3 + 2 parts of 3 steps each, all done.
    ensure!((tree.current, tree.total) == (21, 21), "{tree:?}");
    let compile = &tree.children[1];
    ensure!(
        !compile.reported
            && compile.children.len() == 3
            && compile.children[2].status.as_deref() == Some("part-2 3/3")
    );
    ensure!(rig.logs(&build).await? == ["fetch done", "compile done", "test done"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_to_the_result_directory_become_artifacts() -> Result<()> {
    let rig = Rig::new().await?;
    rig.builder(
        "artifacts",
        "write-artifacts",
        BuilderConfig::new("artifacts").kwargs(json!({"count": 2})),
        Limits::default(),
        Grants::default(),
    )
    .await?;
    let build = rig.run("artifacts").await?;
    ensure!(build.results == Some(ResultCode::Success), "{build:?}");
    let artifacts = rig.engine.client().build_artifacts(build.id).await?;
    let paths: Vec<&str> = artifacts.iter().map(|a| a.path.as_str()).collect();
    ensure!(
        paths
            == [
                "reports/report-0.txt",
                "reports/report-1.txt",
                "summary.json"
            ],
        "{paths:?}"
    );
    let summary = artifacts
        .iter()
        .find(|a| a.path == "summary.json")
        .ok_or_else(|| anyhow!("no summary"))?;
    let on_disk = std::fs::read_to_string(&summary.location)?;
    ensure!(serde_json::from_str::<Value>(&on_disk)? == json!({"build": 1, "reports": 2}));
    ensure!(summary.size == on_disk.len() as u64);
    ensure!(
        summary.location.starts_with(
            &rig.dir
                .path()
                .join("results")
                .join("artifacts")
                .join("1")
                .display()
                .to_string()
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_a_guest_leaves_in_its_result_directory_are_removed_when_it_ends() -> Result<()> {
    let rig = Rig::new().await?;
    rig.simple("symlink-escape").await?;
    let build = rig.run("symlink-escape").await?;
    ensure!(build.results == Some(ResultCode::Success), "{build:?}");
    // The sandbox refuses an absolute target but lets a relative one climb out; the
    // test means something only if some link was made.
    let made = build.return_value.as_ref().map(|v| v["links"].clone());
    ensure!(
        made.as_ref()
            .and_then(Value::as_array)
            .is_some_and(|l| !l.is_empty()),
        "the guest made no link: {made:?}"
    );
    let artifacts = rig.engine.client().build_artifacts(build.id).await?;
    let paths: Vec<&str> = artifacts.iter().map(|a| a.path.as_str()).collect();
    ensure!(
        paths == ["real.txt"],
        "only the real file is an artifact: {paths:?}"
    );
    // Whatever links the sandbox let it make are gone from the disk, not just unlisted.
    let dir = rig
        .dir
        .path()
        .join("results")
        .join("symlink-escape")
        .join("1");
    let mut left = Vec::new();
    let mut todo = vec![dir];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                todo.push(path);
            } else {
                left.push((path.display().to_string(), meta.file_type().is_symlink()));
            }
        }
    }
    ensure!(
        left.iter().all(|(_, link)| !link) && left.len() == 1,
        "left in the result directory: {left:?} (the guest made {:?})",
        build.return_value
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_triggering_guest_stops_at_the_trigger_depth_limit() -> Result<()> {
    let rig = Rig::new().await?;
    let mut config = BuilderConfig::new("self").kwargs(json!({"builders": ["self"]}));
    config.limits.trigger_depth = 3;
    rig.builder(
        "self",
        "fan-out",
        config,
        Limits::default(),
        Grants::default(),
    )
    .await?;
    let first = rig.run("self").await?;
    ensure!(first.results == Some(ResultCode::Exception), "{first:?}");
    let chain = rig.engine.client().builds(&BuildFilter::default()).await?;
    ensure!(
        chain.len() == 4,
        "the submission and three levels: {} builds",
        chain.len()
    );
    let deepest = chain
        .iter()
        .max_by_key(|b| b.number)
        .ok_or_else(|| anyhow!("no builds"))?;
    exception_containing(deepest, "trigger depth limit exceeded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_waits_in_the_host_and_many_sleep_at_once() -> Result<()> {
    let rig = Rig::new().await?;
    rig.builder(
        "sleep",
        "sleep",
        BuilderConfig::new("sleep").kwargs(json!({"seconds": 0.3})),
        Limits::default(),
        Grants::default(),
    )
    .await?;
    // More sleepers than the runtime has threads: they wait on timers, not threads.
    let batch: Vec<Submission> = (0..50)
        .map(|i| Submission::new(format!("nap {i}")).builder("sleep"))
        .collect();
    let started = std::time::Instant::now();
    let submitted = rig.engine.submit_many(&batch).await?;
    for s in &submitted {
        guard("a sleeper", rig.engine.wait_buildset(s.buildset_id)).await??;
    }
    let elapsed = started.elapsed();
    let builds = rig.engine.client().builds(&BuildFilter::default()).await?;
    ensure!(
        builds.len() == 50
            && builds
                .iter()
                .all(|b| b.results == Some(ResultCode::Success))
    );
    let slept = builds[0]
        .return_value
        .as_ref()
        .and_then(|v| v["slept_ms"].as_u64())
        .unwrap_or(0);
    ensure!(slept >= 300, "each build slept its 300 ms: {slept}");
    // Serial sleeping would take 15 s; this shows they overlapped.
    ensure!(
        elapsed < Duration::from_secs(10),
        "50 sleeps of 0.3 s overlapped: took {elapsed:?}"
    );
    Ok(())
}

// ---- the sandbox ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_grants_nothing_by_default() -> Result<()> {
    let rig = Rig::new().await?;
    let secret = rig.dir.path().join("secret.txt");
    std::fs::write(&secret, "host secret")?;
    // SAFETY: set before the builds run; the tests in this file read no variables.
    unsafe { std::env::set_var("KILN_TEST_HOST_SECRET", "leaked") };
    let kwargs = json!({"read": secret.display().to_string(), "write": "/tmp/kiln-probe"});
    rig.builder(
        "probe",
        "sandbox-probe",
        BuilderConfig::new("probe").kwargs(kwargs),
        Limits::default(),
        Grants::default(),
    )
    .await?;
    let build = rig.run("probe").await?;
    let report = build.return_value.ok_or_else(|| anyhow!("no report"))?;
    ensure!(report["env"] == json!({}), "no environment: {report}");
    ensure!(
        report["read"]["error"].is_string(),
        "host files are invisible: {report}"
    );
    ensure!(
        report["write"]["error"].is_string(),
        "nothing is writable: {report}"
    );
    ensure!(!std::path::Path::new("/tmp/kiln-probe").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_environment_and_directories_are_visible_with_their_permissions() -> Result<()> {
    let rig = Rig::new().await?;
    let data = rig.dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("input.txt"), "granted input")?;
    let scratch = rig.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let grants = Grants {
        env: vec![("MODE".into(), "ci".into())],
        dirs: vec![
            DirGrant {
                host: data.clone(),
                guest: "/data".into(),
                writable: false,
            },
            DirGrant {
                host: scratch.clone(),
                guest: "/scratch".into(),
                writable: true,
            },
        ],
        ..Grants::default()
    };
    let read_only = BuilderConfig::new("ro")
        .kwargs(json!({"read": "/data/input.txt", "write": "/data/out.txt"}));
    rig.builder(
        "ro",
        "sandbox-probe",
        read_only,
        Limits::default(),
        grants.clone(),
    )
    .await?;
    let writable = BuilderConfig::new("rw").kwargs(json!({"write": "/scratch/out.txt"}));
    rig.builder("rw", "sandbox-probe", writable, Limits::default(), grants)
        .await?;

    let ro = rig
        .run("ro")
        .await?
        .return_value
        .ok_or_else(|| anyhow!("no report"))?;
    ensure!(ro["env"] == json!({"MODE": "ci"}), "{ro}");
    ensure!(ro["read"]["ok"] == "granted input", "{ro}");
    ensure!(
        ro["write"]["error"].is_string() && !data.join("out.txt").exists(),
        "read-only stays read-only: {ro}"
    );
    let rw = rig
        .run("rw")
        .await?
        .return_value
        .ok_or_else(|| anyhow!("no report"))?;
    ensure!(
        rw["write"]["ok"] == true && std::fs::read_to_string(scratch.join("out.txt"))? == "probe",
        "{rw}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grants_and_limits_are_refused() -> Result<()> {
    let rig = Rig::new().await?;
    let missing = Grants {
        dirs: vec![DirGrant {
            host: "/no/such/dir".into(),
            guest: "/d".into(),
            writable: false,
        }],
        ..Default::default()
    };
    let err = rig
        .host
        .job_executor("echo", plugin("echo")?, Limits::default(), missing)
        .await
        .err();
    ensure!(
        matches!(err, Some(WasmError::Invalid(ref m)) if m.contains("/no/such/dir")),
        "{err:?}"
    );
    let tiny_stack = limits(|l| l.wasm_stack_bytes = 1024);
    let err = rig
        .host
        .job_executor("echo", plugin("echo")?, tiny_stack, Grants::default())
        .await
        .err();
    ensure!(
        matches!(err, Some(WasmError::Invalid(ref m)) if m.contains("stack")),
        "{err:?}"
    );
    Ok(())
}

// ---- hostile plugins: each ends its own build with the right reason ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_stopped_at_its_deadline() -> Result<()> {
    let rig = Rig::new().await?;
    let l = limits(|l| l.deadline = Duration::from_millis(300));
    rig.builder(
        "loop",
        "loop-forever",
        BuilderConfig::new("loop"),
        l,
        Grants::default(),
    )
    .await?;
    let build = rig.run("loop").await?;
    exception_containing(&build, "deadline exceeded")?;
    ensure!(
        build
            .traceback
            .as_deref()
            .is_some_and(|t| t.contains("spin")),
        "backtrace names the function: {:?}",
        build.traceback
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_hits_the_memory_limit() -> Result<()> {
    let rig = Rig::new().await?;
    let l = limits(|l| l.memory_bytes = 32 << 20);
    rig.builder(
        "bomb",
        "memory-bomb",
        BuilderConfig::new("bomb"),
        l,
        Grants::default(),
    )
    .await?;
    let build = rig.run("bomb").await?;
    exception_containing(&build, "memory limit exceeded")?;
    exception_containing(&build, "the limit is 32 MiB")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_recursion_overflows_the_wasm_stack() -> Result<()> {
    let rig = Rig::new().await?;
    rig.simple("recursion").await?;
    let build = rig.run("recursion").await?;
    exception_containing(&build, "wasm stack overflow")?;
    ensure!(
        build
            .traceback
            .as_deref()
            .is_some_and(|t| t.contains("descend")),
        "{:?}",
        build.traceback
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_hits_the_log_volume_limit_and_keeps_what_fit() -> Result<()> {
    let rig = Rig::new().await?;
    let l = limits(|l| l.log_bytes = 64 << 10);
    rig.builder(
        "flood",
        "log-flood",
        BuilderConfig::new("flood"),
        l,
        Grants::default(),
    )
    .await?;
    let build = rig.run("flood").await?;
    exception_containing(&build, "log volume limit exceeded")?;
    let logs = rig.logs(&build).await?;
    ensure!(
        logs.len() > 500 && logs[0].starts_with("flood line 1:"),
        "the log up to the limit is kept: {}",
        logs.len()
    );
    let bytes: usize = logs.iter().map(String::len).sum();
    ensure!(bytes <= 64 << 10, "no more than the limit: {bytes}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_flood_hits_the_captured_output_limit() -> Result<()> {
    let rig = Rig::new().await?;
    let l = limits(|l| l.output_bytes = 8 << 10);
    rig.builder(
        "out",
        "output-flood",
        BuilderConfig::new("out"),
        l,
        Grants::default(),
    )
    .await?;
    let build = rig.run("out").await?;
    exception_containing(&build, "captured output limit exceeded")?;
    let entries = rig
        .engine
        .client()
        .logs(&LogQuery {
            build_id: Some(build.id),
            ..Default::default()
        })
        .await?;
    ensure!(
        entries
            .iter()
            .any(|e| e.record.message == "stdout line 1" && e.record.fields["stream"] == "stdout")
    );
    ensure!(
        entries
            .iter()
            .any(|e| e.record.message == "stderr line 1" && e.record.level == LogLevel::Warning)
    );
    ensure!(
        entries
            .iter()
            .any(|e| e.record.message.contains("was cut at 8192 bytes"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_return_value_is_refused() -> Result<()> {
    let rig = Rig::new().await?;
    let l = limits(|l| l.return_bytes = 1 << 20);
    rig.builder(
        "huge",
        "huge-return",
        BuilderConfig::new("huge").kwargs(json!({"mib": 4})),
        l,
        Grants::default(),
    )
    .await?;
    let build = rig.run("huge").await?;
    exception_containing(&build, "return value too large")?;
    ensure!(build.return_value.is_none(), "nothing of it is stored");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_an_exception_with_a_wasm_backtrace() -> Result<()> {
    let rig = Rig::new().await?;
    rig.simple("trap").await?;
    let build = rig.run("trap").await?;
    exception_containing(&build, "wasm `unreachable` was executed")?;
    let traceback = build.traceback.clone().unwrap_or_default();
    ensure!(
        traceback.contains("inner_step") && traceback.contains("outer_step"),
        "function names: {traceback}"
    );
    ensure!(
        rig.logs(&build)
            .await?
            .contains(&"about to trap".to_owned()),
        "logs before the trap are kept"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_builds_end_alone_while_other_builds_keep_running() -> Result<()> {
    let rig = Rig::new().await?;
    let tight = limits(|l| {
        l.deadline = Duration::from_millis(500);
        l.memory_bytes = 16 << 20;
        l.log_bytes = 16 << 10;
        l.output_bytes = 4 << 10;
    });
    let hostile = [
        "loop-forever",
        "memory-bomb",
        "recursion",
        "log-flood",
        "output-flood",
        "huge-return",
        "trap",
    ];
    for name in hostile {
        rig.builder(
            name,
            name,
            BuilderConfig::new(name),
            tight,
            Grants::default(),
        )
        .await?;
    }
    rig.builder(
        "fib",
        "fib",
        BuilderConfig::new("fib").args(json!([20])),
        Limits::default(),
        Grants::default(),
    )
    .await?;
    let mut submission = Submission::new("everything at once");
    for name in hostile {
        submission = submission.builder(name);
    }
    let s = rig.engine.submit(&submission).await?;
    let good = rig
        .engine
        .submit(&Submission::new("meanwhile").builder("fib"))
        .await?;
    let good = guard("the good build", rig.engine.wait_buildset(good.buildset_id)).await??;
    ensure!(
        good.results == Some(ResultCode::Success),
        "a good build succeeds among hostile ones"
    );
    let bad = guard(
        "the hostile buildset",
        rig.engine.wait_buildset(s.buildset_id),
    )
    .await??;
    ensure!(bad.results == Some(ResultCode::Exception), "{bad:?}");
    let builds = rig
        .engine
        .client()
        .builds(&BuildFilter {
            buildset_id: Some(s.buildset_id),
            ..Default::default()
        })
        .await?;
    ensure!(
        builds.len() == hostile.len()
            && builds
                .iter()
                .all(|b| b.results == Some(ResultCode::Exception))
    );
    // The engine is still fine afterwards.
    let after = rig.run("fib").await?;
    ensure!(after.results == Some(ResultCode::Success));
    Ok(())
}

// ---- cancellation ----

async fn started(events: &mut broadcast::Receiver<Event>) -> Result<()> {
    guard("the build to start", async {
        loop {
            if let Event::BuildStarted { .. } = events.recv().await? {
                return Ok(());
            }
        }
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_spinning_job_interrupts_it_as_cancelled() -> Result<()> {
    let rig = Rig::new().await?;
    rig.simple("loop-forever").await?;
    let mut events = rig.engine.subscribe();
    let s = rig
        .engine
        .submit(&Submission::new("spin").builder("loop-forever"))
        .await?;
    started(&mut events).await?;
    rig.engine.cancel_buildset(s.buildset_id).await?;
    let done = guard(
        "the cancelled buildset",
        rig.engine.wait_buildset(s.buildset_id),
    )
    .await??;
    ensure!(done.results == Some(ResultCode::Cancelled), "{done:?}");
    let build = &rig.engine.client().builds(&BuildFilter::default()).await?[0];
    ensure!(
        build.results == Some(ResultCode::Cancelled) && build.state_string == "cancelled",
        "{build:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_job_blocked_in_a_host_call_stops_it_at_once() -> Result<()> {
    let rig = Rig::new().await?;
    rig.builder(
        "sleep",
        "sleep",
        BuilderConfig::new("sleep").kwargs(json!({"seconds": 3600})),
        Limits::default(),
        Grants::default(),
    )
    .await?;
    let mut events = rig.engine.subscribe();
    let s = rig
        .engine
        .submit(&Submission::new("nap").builder("sleep"))
        .await?;
    started(&mut events).await?;
    rig.engine.cancel_buildset(s.buildset_id).await?;
    let done = guard(
        "the cancelled buildset",
        rig.engine.wait_buildset(s.buildset_id),
    )
    .await??;
    ensure!(done.results == Some(ResultCode::Cancelled), "{done:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_sleeping_job_wrote_before_it_slept_is_visible_while_it_sleeps() -> Result<()> {
    let rig = Rig::new().await?;
    rig.builder(
        "sleep",
        "sleep",
        BuilderConfig::new("sleep").kwargs(json!({"seconds": 3600})),
        Limits::default(),
        Grants::default(),
    )
    .await?;
    let mut events = rig.engine.subscribe();
    let s = rig
        .engine
        .submit(&Submission::new("nap").builder("sleep"))
        .await?;
    // The job sets its state string, then blocks in the host for an hour: the state
    // must reach the database while it sleeps (within the engine's flush interval),
    // not at its next host call.
    let state = guard("the sleeping job's state string", async {
        loop {
            if let Event::BuildProgress { build_id } = events.recv().await? {
                let build = rig.engine.client().build(build_id).await?;
                if build.complete_at.is_none() {
                    return anyhow::Ok(build.state_string);
                }
            }
        }
    })
    .await??;
    ensure!(state == "sleeping 3600s", "{state:?}");
    rig.engine.cancel_buildset(s.buildset_id).await?;
    guard(
        "the cancelled buildset",
        rig.engine.wait_buildset(s.buildset_id),
    )
    .await??;
    Ok(())
}

// ---- loading ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_that_are_not_jobs_are_refused_with_the_reason() -> Result<()> {
    let host = WasmHost::new(WasmHostConfig {
        cache_dir: None,
        max_instances: SLOTS,
    });
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("text", b"hello, not wasm".to_vec(), "not WebAssembly"),
        (
            "core",
            b"\0asm\x01\0\0\0".to_vec(),
            "core WebAssembly module, not a component",
        ),
        (
            "broken",
            b"\0asm\x0d\0\x01\0\xff\xff\xff".to_vec(),
            "not a valid component",
        ),
        (
            "command",
            plugin("not-a-job")?.to_vec(),
            "does not export `run",
        ),
    ];
    for (name, bytes, expected) in cases {
        let err = host
            .load_job(name, Arc::from(bytes.as_slice()), &Limits::default())
            .await
            .err();
        ensure!(
            matches!(err, Some(WasmError::Plugin { ref problems, .. }) if problems.iter().any(|p| p.contains(expected))),
            "{name}: {err:?}"
        );
        let report = host.check(&bytes)?;
        ensure!(
            report.world.is_none() && report.problems.iter().any(|p| p.contains(expected)),
            "{name}: {report:?}"
        );
    }
    let report = host.check(plugin("echo")?)?;
    ensure!(
        report.world == Some("job")
            && report.package_versions == ["0.1.0"]
            && report.problems.is_empty(),
        "{report:?}"
    );
    ensure!(
        report.exports == ["run"] && report.imports.iter().any(|i| i == "kiln:plugin/host@0.1.0"),
        "{report:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_components_are_cached_on_disk_and_a_broken_entry_is_recompiled() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let host = WasmHost::new(WasmHostConfig {
        cache_dir: Some(cache.clone()),
        max_instances: SLOTS,
    });
    host.load_job("echo", Arc::from(plugin("echo")?), &Limits::default())
        .await?;
    let entries: Vec<_> = std::fs::read_dir(&cache)?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(
        entries.len() == 1 && entries[0].extension().is_some_and(|e| e == "cwasm"),
        "{entries:?}"
    );
    // A second host (a second start) loads the cached entry.
    let again = WasmHost::new(WasmHostConfig {
        cache_dir: Some(cache.clone()),
        max_instances: SLOTS,
    });
    again
        .load_job("echo", Arc::from(plugin("echo")?), &Limits::default())
        .await?;
    // A damaged entry costs a recompile, not a failure.
    std::fs::write(&entries[0], b"garbage")?;
    let third = WasmHost::new(WasmHostConfig {
        cache_dir: Some(cache),
        max_instances: SLOTS,
    });
    third
        .load_job("echo", Arc::from(plugin("echo")?), &Limits::default())
        .await?;
    ensure!(
        std::fs::read(&entries[0])?.len() > 1_000,
        "the entry was rewritten"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_builds_than_sandbox_slots_wait_for_a_slot_instead_of_failing() -> Result<()> {
    const SLOTS_HERE: u32 = 4;
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let mut config = EngineConfig::new(url).master_name("slots");
    config.max_running_builds = SLOTS_HERE;
    let engine = Engine::open(config).await?;
    let host = WasmHost::new(WasmHostConfig {
        cache_dir: None,
        max_instances: SLOTS_HERE,
    });
    let executor = host
        .job_executor(
            "sleep",
            plugin("sleep")?,
            Limits::default(),
            Grants::default(),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("sleep").kwargs(json!({"seconds": 0.1})),
            executor,
        )
        .await?;
    let batch: Vec<Submission> = (0..12)
        .map(|i| Submission::new(format!("nap {i}")).builder("sleep"))
        .collect();
    let submitted = engine.submit_many(&batch).await?;
    for s in &submitted {
        let done = guard("a nap", engine.wait_buildset(s.buildset_id)).await??;
        ensure!(
            done.results == Some(ResultCode::Success),
            "a build waited for a slot rather than failing: {done:?}"
        );
    }
    engine.shutdown().await;
    Ok(())
}
