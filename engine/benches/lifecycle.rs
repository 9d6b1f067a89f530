//! Lifecycle benchmark: submit -> claim -> run a no-op job -> finish the build ->
//! complete the request -> complete the buildset, on SQLite, through the public API.
//!
//! `cargo bench -p kiln-engine --bench lifecycle [-- JOBS] [concurrent]` prints (with
//! `concurrent`, only the 16 concurrent submitters running their builds):
//! - drain throughput: JOBS buildsets submitted up front, then drained by the engine;
//! - end-to-end throughput: submits and execution overlapping, one buildset per submit
//!   call and 100 per `submit_many` call;
//! - 16 tasks each submitting one buildset per call, with and without group commit,
//!   and one serial caller;
//! - submit-to-start latency on an idle engine (median and p99 over 1,000 submits), with
//!   WAL checkpoints in the background and on the writer's turn.
//!
//! It measures and prints; it asserts nothing about speed.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use kiln_engine::model::ResultCode;
use kiln_engine::{BuilderConfig, Engine, EngineConfig, Event, FnExecutor, Outcome, Submission};
use kiln_storage::{BuildsetFilter, NewBuildset};
use tokio::sync::broadcast;

fn noop() -> FnExecutor {
    FnExecutor::new(|_| async { Ok(Outcome::with_results(ResultCode::Success, None)) })
}

async fn open(dir: &tempfile::TempDir, name: &str) -> Result<Engine> {
    Ok(open_with_store(dir, name).await?.0)
}

/// An engine, and the store under it (the drain fills the queue through the store, so
/// that only the engine's side is timed).
async fn open_with_store(
    dir: &tempfile::TempDir,
    name: &str,
) -> Result<(Engine, std::sync::Arc<dyn kiln_storage::Store>)> {
    let url = format!(
        "sqlite://{}",
        dir.path().join(format!("{name}.db")).display()
    );
    let mut config = EngineConfig::new(url).master_name(name);
    config.event_capacity = 1 << 20;
    if let Some(batch) = std::env::var("KILN_BENCH_CLAIM_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.claim_batch = batch;
    }
    let store = kiln_storage::open_with(&config.database_url, &config.store).await?;
    Ok((Engine::open_on(store.clone(), config).await?, store))
}

async fn wait_completions(events: &mut broadcast::Receiver<Event>, n: usize) -> Result<()> {
    let mut done = 0;
    while done < n {
        match events.recv().await {
            Ok(Event::BuildsetComplete { .. }) => done += 1,
            Ok(_) => {}
            Err(e) => return Err(anyhow!("event stream: {e}")),
        }
    }
    Ok(())
}

async fn drain(jobs: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let (engine, store) = open_with_store(&dir, "drain").await?;
    let builder = store.builder_ensure("noop", None).await?;
    let one = NewBuildset {
        reason: "bench".into(),
        builder_ids: vec![builder],
        submitted_at: kiln_engine::model::now(),
        ..NewBuildset::default()
    };
    for chunk in vec![one; jobs].chunks(1_000) {
        store.buildset_add_many(chunk).await?;
    }
    let mut events = engine.subscribe();
    let start = Instant::now();
    engine
        .register_builder(BuilderConfig::new("noop"), noop())
        .await?;
    wait_completions(&mut events, jobs).await?;
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    let incomplete = store
        .buildset_list(&BuildsetFilter {
            complete: Some(false),
            ..Default::default()
        })
        .await?;
    engine.shutdown().await;
    if !incomplete.is_empty() {
        return Err(anyhow!("{} buildsets did not complete", incomplete.len()));
    }
    Ok(rate)
}

/// Submits and execution overlap; submissions go `per_submit` buildsets at a time.
async fn end_to_end(jobs: usize, per_submit: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let engine = open(&dir, "e2e").await?;
    engine
        .register_builder(BuilderConfig::new("noop"), noop())
        .await?;
    let mut events = engine.subscribe();
    let start = Instant::now();
    let batch = vec![Submission::new("bench").builder("noop"); per_submit];
    let mut submitted = 0;
    while submitted < jobs {
        let n = per_submit.min(jobs - submitted);
        engine.submit_many(&batch[..n]).await?;
        submitted += n;
    }
    wait_completions(&mut events, jobs).await?;
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    engine.shutdown().await;
    Ok(rate)
}

/// `clients` tasks each submitting one buildset per call, as REST clients and
/// embedders with many tasks do; returns submissions/s and the p50 and p99 of one
/// submit call. The engine runs the builds meanwhile. `group` is the engine's
/// `max_group_commit` (0: every submit commits alone).
async fn concurrent_submits(
    jobs: usize,
    clients: usize,
    group: usize,
    run: bool,
) -> Result<(f64, Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("concurrent.db").display());
    let mut config = EngineConfig::new(url).master_name("concurrent");
    config.event_capacity = 1 << 20;
    config.max_group_commit = group;
    let store = kiln_storage::open_with(&config.database_url, &config.store).await?;
    let engine = std::sync::Arc::new(Engine::open_on(store.clone(), config).await?);
    if run {
        engine
            .register_builder(BuilderConfig::new("noop"), noop())
            .await?;
    } else {
        // Known to the database, run by nobody: the submit path alone.
        store.builder_ensure("noop", None).await?;
    }
    let mut events = engine.subscribe();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let engine = engine.clone();
        let mine = jobs / clients + usize::from(c < jobs % clients);
        tasks.push(tokio::spawn(async move {
            let submission = Submission::new("bench").builder("noop");
            let mut took = Vec::with_capacity(mine);
            for _ in 0..mine {
                let one = Instant::now();
                engine.submit(&submission).await?;
                took.push(one.elapsed());
            }
            anyhow::Ok(took)
        }));
    }
    let mut took = Vec::with_capacity(jobs);
    for task in tasks {
        took.extend(task.await??);
    }
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    if run {
        wait_completions(&mut events, jobs).await?;
    }
    engine.shutdown().await;
    took.sort();
    Ok((rate, took[took.len() / 2], took[took.len() * 99 / 100]))
}

/// Submit-to-start on an idle engine; `checkpoints` is the store's background WAL
/// checkpoint interval (zero: the writer checkpoints on its own turn, SQLite's default).
async fn latency(samples: usize, checkpoints: Duration) -> Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("latency.db").display());
    let mut config = EngineConfig::new(url).master_name("latency");
    config.store.checkpoint_interval = checkpoints;
    let engine = Engine::open(config).await?;
    engine
        .register_builder(BuilderConfig::new("noop"), noop())
        .await?;
    let mut events = engine.subscribe();
    let mut took = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        engine
            .submit(&Submission::new("bench").builder("noop"))
            .await?;
        loop {
            match events.recv().await? {
                Event::BuildStarted { .. } => break,
                _ => continue,
            }
        }
        took.push(start.elapsed());
        wait_completions(&mut events, 1).await?;
    }
    engine.shutdown().await;
    took.sort();
    Ok((took[samples / 2], took[samples * 99 / 100]))
}

/// The cost of single store calls, one at a time: the floor under every lifecycle step.
async fn primitives(n: usize) -> Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("prim.db").display());
    let store = kiln_storage::open(&url).await?;
    let builder = store.builder_ensure("b", None).await?;
    let master = store
        .master_register("m", kiln_engine::model::now())
        .await?
        .master_id;
    let added = store
        .buildset_add(&NewBuildset {
            reason: "x".into(),
            builder_ids: vec![builder],
            ..NewBuildset::default()
        })
        .await?;
    let request = added.requests[&builder];
    store
        .request_claim(&[request], master, kiln_engine::model::now())
        .await?;
    let build = store
        .build_add(&kiln_storage::NewBuild {
            request_id: request,
            master_id: master,
            worker_slot: None,
            state_string: String::new(),
            started_at: kiln_engine::model::now(),
        })
        .await?;
    let start = Instant::now();
    for i in 0..n {
        store
            .build_set_state(build.id, if i % 2 == 0 { "a" } else { "b" })
            .await?;
    }
    let write = start.elapsed() / n as u32;
    let start = Instant::now();
    for _ in 0..n {
        store.build_get(build.id).await?;
    }
    let read = start.elapsed() / n as u32;
    Ok((write, read))
}

#[tokio::main]
async fn main() -> Result<()> {
    // Benchmarks must not pay for backtrace capture on every error value.
    // SAFETY: set before any other thread reads the environment.
    unsafe { std::env::set_var("RUST_BACKTRACE", "0") };
    let jobs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5_000);
    println!("kiln lifecycle benchmark, SQLite (WAL, synchronous=NORMAL), {jobs} no-op jobs");
    // `-- concurrent`: only the concurrent submitters, running their builds (to profile).
    if std::env::args().any(|a| a == "concurrent") {
        let group = kiln_engine::config::DEFAULT_MAX_GROUP_COMMIT;
        let (rate, p50, p99) = concurrent_submits(jobs, 16, group, true).await?;
        println!(
            "  16 tasks submitting 1 each, group commit, running them: {rate:.0} submits/s, p50 {p50:?}, p99 {p99:?}"
        );
        return Ok(());
    }
    println!(
        "  drain (queued up front):     {:>8.0} jobs/s",
        drain(jobs).await?
    );
    println!(
        "  end to end, 1 per submit:    {:>8.0} jobs/s",
        end_to_end(jobs, 1).await?
    );
    println!(
        "  end to end, 100 per submit:  {:>8.0} jobs/s",
        end_to_end(jobs, 100).await?
    );
    let group = kiln_engine::config::DEFAULT_MAX_GROUP_COMMIT;
    for (what, group, run) in [
        ("group commit, running them", group, true),
        ("one commit each, running them", 0, true),
        ("group commit, nobody runs them", group, false),
        ("one commit each, nobody runs them", 0, false),
    ] {
        let (rate, p50, p99) = concurrent_submits(jobs, 16, group, run).await?;
        println!(
            "  16 tasks submitting 1 each, {what:<34} {rate:>6.0} submits/s, p50 {p50:?}, p99 {p99:?}"
        );
    }
    let (rate, p50, p99) = concurrent_submits(jobs, 1, group, false).await?;
    println!(
        "  1 caller submitting 1 at a time, nobody runs them:  {rate:>6.0} submits/s, p50 {p50:?}, p99 {p99:?}"
    );
    let (write, read) = primitives(5_000).await?;
    println!("  one UPDATE (autocommit):     {write:?}; one SELECT by id: {read:?}");
    for (what, checkpoints) in [
        (
            "checkpoints in the background",
            kiln_storage::DEFAULT_CHECKPOINT_INTERVAL,
        ),
        ("checkpoints by the writer", Duration::ZERO),
    ] {
        let (median, p99) = latency(1_000, checkpoints).await?;
        println!("  submit-to-start, idle, {what:<30} median {median:?}, p99 {p99:?}");
    }
    Ok(())
}
