//! WASM benchmarks. `cargo bench -p kiln-engine --bench wasm [-- WHICH]`, WHICH one of
//! `memory`, `sandbox`, `lifecycle`, `latency` (default: all, in that order, memory
//! first so that its peak RSS is not inflated by the others).
//!
//! - memory: peak RSS with 2,000 builds sleeping concurrently in WASM;
//! - sandbox: cost per job of a fresh store + instantiate + call + drop of a no-op job
//!   (pooling allocator, precompiled component);
//! - lifecycle: 20,000 buildsets, each one request running the no-op WASM job, submitted
//!   at once to an engine on a SQLite file (WAL); jobs/s from the submit to the last
//!   buildset complete, with synchronous=NORMAL and with FULL;
//! - latency: submit-to-start on an idle engine, p50 and p99 over 1,000 submissions;
//! - postgres: the lifecycle run on PostgreSQL (the database `KILN_POSTGRES_URL` names,
//!   in a schema of its own) with 1, 2 and 4 masters sharing it: jobs/s, and the count
//!   of requests that were started more than once (double claims, which must be 0).
//!   Not part of the default set; name it.
//!
//! It measures and prints; it asserts nothing about speed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use kiln_engine::model::Report;
use kiln_engine::wasm::{Grants, Limits, WasmHost, WasmHostConfig};
use kiln_engine::{
    BuilderConfig, Engine, EngineConfig, Event, Reporter, ReporterConfig, Submission,
};
use kiln_storage::{Durability, StoreOptions};
use serde_json::json;
use tokio::sync::broadcast;

fn bundled(name: &str) -> Result<&'static [u8]> {
    kiln_bundled::get(name).ok_or_else(|| anyhow!("no bundled plugin {name}"))
}

fn host(dir: &tempfile::TempDir) -> WasmHost {
    WasmHost::new(WasmHostConfig {
        cache_dir: Some(dir.path().join("cache")),
        ..WasmHostConfig::default()
    })
}

async fn engine(dir: &tempfile::TempDir, name: &str, durability: Durability) -> Result<Engine> {
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
    config.store = StoreOptions {
        durability,
        ..StoreOptions::default()
    };
    Ok(Engine::open(config).await?)
}

/// An engine with one builder, "noop", running the no-op WASM job.
async fn noop_engine(
    dir: &tempfile::TempDir,
    name: &str,
    durability: Durability,
) -> Result<Engine> {
    let engine = engine(dir, name, durability).await?;
    let executor = host(dir)
        .job_executor(
            "noop",
            bundled("noop")?,
            Limits::default(),
            Grants::default(),
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("noop"), executor)
        .await?;
    Ok(engine)
}

async fn count(
    events: &mut broadcast::Receiver<Event>,
    n: usize,
    pick: impl Fn(&Event) -> bool,
) -> Result<()> {
    let mut seen = 0;
    while seen < n {
        let event = events
            .recv()
            .await
            .map_err(|e| anyhow!("event stream: {e}"))?;
        if pick(&event) {
            seen += 1;
        }
    }
    Ok(())
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn memory() -> Result<()> {
    const SLEEPERS: usize = 2_000;
    let dir = tempfile::tempdir()?;
    let engine = engine(&dir, "memory", Durability::Normal).await?;
    let host = host(&dir);
    let executor = host
        .job_executor(
            "sleep",
            bundled("sleep")?,
            Limits::default(),
            Grants::default(),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("sleep").kwargs(json!({"seconds": 600})),
            executor,
        )
        .await?;
    let before = status_kib("VmRSS:").unwrap_or(0);
    let threads_before = status_kib("Threads:").unwrap_or(0);
    let mut events = engine.subscribe();
    let batch = vec![Submission::new("sleep").builder("sleep"); SLEEPERS];
    let start = Instant::now();
    let submitted = engine.submit_many(&batch).await?;
    count(&mut events, SLEEPERS, |e| {
        matches!(e, Event::BuildStarted { .. })
    })
    .await?;
    let all_started = start.elapsed();
    let peak = status_kib("VmHWM:").unwrap_or(0);
    let rss = status_kib("VmRSS:").unwrap_or(0);
    let threads = status_kib("Threads:").unwrap_or(0);
    println!(
        "memory: {SLEEPERS} builds sleeping in WASM at once (all started after {all_started:.2?})"
    );
    println!(
        "  RSS before {} MiB, now {} MiB, peak {} MiB",
        before / 1024,
        rss / 1024,
        peak / 1024
    );
    println!(
        "  {:.1} KiB per sleeping build; OS threads {threads_before} -> {threads}",
        (rss.saturating_sub(before)) as f64 / SLEEPERS as f64
    );
    for s in &submitted {
        engine.cancel_buildset(s.buildset_id).await?;
    }
    engine.shutdown().await;
    Ok(())
}

async fn sandbox() -> Result<()> {
    const RUNS: usize = 20_000;
    let dir = tempfile::tempdir()?;
    let host = host(&dir);
    let limits = Limits::default();
    let plugin = host
        .load_job("noop", Arc::from(bundled("noop")?), &limits)
        .await?;
    for _ in 0..1_000 {
        plugin.run_once(&limits).await?;
    }
    let mut took = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        plugin.run_once(&limits).await?;
        took.push(start.elapsed());
    }
    took.sort();
    let mean = took.iter().sum::<Duration>() / RUNS as u32;
    println!(
        "sandbox: fresh store + instantiate + call + drop of a no-op job, {RUNS} runs: median {:?}, p99 {:?}, mean {mean:?}",
        percentile(&took, 0.5),
        percentile(&took, 0.99)
    );
    Ok(())
}

/// Per-job cost, component size, compile time and cache load time of the same small job
/// (one log call, then a job error) in each language. The non-Rust components are the
/// ones `cargo test -p kiln-engine --test languages` builds into target/tmp/languages.
async fn languages() -> Result<()> {
    const RUNS: usize = 2_000;
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp/languages");
    let mut guests: Vec<(&str, Vec<u8>)> = vec![("rust", bundled("fail")?.to_vec())];
    for (language, dir) in [("c", "c"), ("javascript", "js"), ("python", "python")] {
        match std::fs::read(built.join(dir).join("fails.wasm")) {
            Ok(bytes) => guests.push((language, bytes)),
            Err(_) => println!(
                "languages: no {language} build in {}; run `cargo test -p kiln-engine --test languages` first",
                built.display()
            ),
        }
    }
    println!("languages: the same failing job (a log call, then a job error), {RUNS} runs each");
    let limits = Limits::default();
    for (language, wasm) in guests {
        let dir = tempfile::tempdir()?;
        let wasm: Arc<[u8]> = Arc::from(wasm);
        let start = Instant::now();
        host(&dir).load_job(language, wasm.clone(), &limits).await?;
        let compiled = start.elapsed();
        let second = host(&dir);
        let start = Instant::now();
        let plugin = second.load_job(language, wasm.clone(), &limits).await?;
        let cached = start.elapsed();
        for _ in 0..RUNS / 10 {
            plugin.run_once(&limits).await?;
        }
        let mut took = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let start = Instant::now();
            plugin.run_once(&limits).await?;
            took.push(start.elapsed());
        }
        took.sort();
        println!(
            "  {language:<10} {:>6} KB  compile {compiled:>9.2?}  from cache {cached:>9.2?}  per job: median {:?}, p99 {:?}",
            wasm.len() >> 10,
            percentile(&took, 0.5),
            percentile(&took, 0.99)
        );
    }
    Ok(())
}

/// A reporter that counts what it is handed and signals when it has seen `want` events.
struct Counting {
    seen: std::sync::atomic::AtomicUsize,
    want: usize,
    done: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Reporter for Counting {
    async fn report(&self, _event: &Report) -> Result<(), String> {
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n == self.want {
            self.done.notify_one();
        }
        Ok(())
    }
}

async fn lifecycle(durability: Durability, with_reporter: bool) -> Result<f64> {
    const JOBS: usize = 20_000;
    let dir = tempfile::tempdir()?;
    let engine = noop_engine(&dir, "lifecycle", durability).await?;
    let counting = Arc::new(Counting {
        seen: Default::default(),
        want: 4 * JOBS,
        done: tokio::sync::Notify::new(),
    });
    if with_reporter {
        engine
            .register_reporter_arc(ReporterConfig::new("count"), counting.clone())
            .await?;
    }
    let mut events = engine.subscribe();
    let batch = vec![Submission::new("bench").builder("noop"); JOBS];
    let start = Instant::now();
    engine.submit_many(&batch).await?;
    let submitted = start.elapsed();
    count(&mut events, JOBS, |e| {
        matches!(e, Event::BuildsetComplete { .. })
    })
    .await?;
    let rate = JOBS as f64 / start.elapsed().as_secs_f64();
    println!("  ({durability:?}: the submit of all {JOBS} took {submitted:.0?})");
    if with_reporter {
        counting.done.notified().await;
        println!(
            "  (the reporter had all {} events {:.2?} after the submit)",
            4 * JOBS,
            start.elapsed()
        );
    }
    let builds = engine.client().builds(&Default::default()).await?;
    let failed = builds
        .iter()
        .filter(|b| b.results != Some(kiln_engine::model::ResultCode::Success))
        .count();
    if failed > 0 {
        let example = builds
            .iter()
            .find_map(|b| b.error.clone())
            .unwrap_or_default();
        println!(
            "  !! {failed} of {} builds did not succeed, e.g.: {example}",
            builds.len()
        );
    }
    engine.shutdown().await;
    Ok(rate)
}

async fn latency() -> Result<()> {
    const SAMPLES: usize = 1_000;
    let dir = tempfile::tempdir()?;
    let engine = noop_engine(&dir, "latency", Durability::Normal).await?;
    let mut events = engine.subscribe();
    let mut took = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        engine
            .submit(&Submission::new("bench").builder("noop"))
            .await?;
        count(&mut events, 1, |e| matches!(e, Event::BuildStarted { .. })).await?;
        took.push(start.elapsed());
        count(&mut events, 1, |e| {
            matches!(e, Event::BuildsetComplete { .. })
        })
        .await?;
    }
    took.sort();
    println!(
        "latency: submit-to-start on an idle engine, {SAMPLES} submissions: p50 {:?}, p99 {:?}",
        percentile(&took, 0.5),
        percentile(&took, 0.99)
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    // Benchmarks must not pay for backtrace capture on every error value.
    // SAFETY: set before any other thread reads the environment.
    unsafe { std::env::set_var("RUST_BACKTRACE", "0") };
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if wants("memory") {
        memory().await?;
    }
    if wants("sandbox") {
        sandbox().await?;
    }
    if wants("lifecycle") {
        println!("lifecycle: 20,000 no-op WASM jobs submitted at once, SQLite WAL");
        println!(
            "  synchronous=NORMAL: {:>8.0} jobs/s",
            lifecycle(Durability::Normal, false).await?
        );
        println!(
            "  synchronous=FULL:   {:>8.0} jobs/s",
            lifecycle(Durability::Full, false).await?
        );
        println!(
            "  NORMAL, a reporter hearing all 4 events per job (outbox on): {:>8.0} jobs/s",
            lifecycle(Durability::Normal, true).await?
        );
    }
    if wants("latency") {
        latency().await?;
    }
    if wants("languages") {
        languages().await?;
    }
    if which.iter().any(|w| w == "postgres") {
        let Ok(base) = std::env::var("KILN_POSTGRES_URL") else {
            return Err(anyhow!(
                "set KILN_POSTGRES_URL=postgres://... for the postgres benchmark"
            ));
        };
        println!(
            "postgres: {PG_JOBS} no-op WASM jobs submitted at once, masters in one process sharing one database"
        );
        for masters in [1, 2, 4] {
            let (rate, doubles, shares) = postgres_lifecycle(&base, masters).await?;
            println!(
                "  {masters} master{}: {rate:>8.0} jobs/s, double claims: {doubles}, builds per master: {shares:?}",
                if masters == 1 { " " } else { "s" }
            );
        }
    }
    Ok(())
}

const PG_JOBS: usize = 20_000;

/// The lifecycle run with `masters` engines, each with its own connection pool and
/// master row, on one PostgreSQL schema. Returns jobs/s from the submit to the last
/// build finished, the number of requests with more than one build, and how many
/// builds each master ran.
async fn postgres_lifecycle(base: &str, masters: usize) -> Result<(f64, usize, Vec<usize>)> {
    use kiln_storage::postgres;
    let schema = format!("kiln_bench_{}_{masters}", std::process::id());
    postgres::drop_schema(base, &schema).await?;
    let url = postgres::create_schema(base, &schema).await?;
    let dir = tempfile::tempdir()?;
    let host = host(&dir);
    let mut engines = Vec::new();
    let mut events = Vec::new();
    for i in 0..masters {
        let mut config = EngineConfig::new(url.clone()).master_name(format!("bench-{i}"));
        config.event_capacity = 1 << 20;
        config.store.max_connections = 8;
        let engine = Engine::open(config).await?;
        let executor = host
            .job_executor(
                "noop",
                bundled("noop")?,
                Limits::default(),
                Grants::default(),
            )
            .await?;
        engine
            .register_builder(BuilderConfig::new("noop"), executor)
            .await?;
        events.push(engine.subscribe());
        engines.push(engine);
    }
    let batch = vec![Submission::new("bench").builder("noop"); PG_JOBS];
    let start = Instant::now();
    engines[0].submit_many(&batch).await?;
    // Every engine reports the builds it finished itself; together they are all.
    let (done, mut waits) = (Arc::new(std::sync::atomic::AtomicUsize::new(0)), Vec::new());
    let all = Arc::new(tokio::sync::Notify::new());
    for mut rx in events {
        let (done, all) = (done.clone(), all.clone());
        waits.push(tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(Event::BuildFinished { .. }) => {
                        if done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == PG_JOBS {
                            all.notify_one();
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    all.notified().await;
    let rate = PG_JOBS as f64 / start.elapsed().as_secs_f64();
    let builds = engines[0].client().builds(&Default::default()).await?;
    let mut per_request: std::collections::HashMap<_, usize> = Default::default();
    let mut shares = vec![0; masters];
    let masters_listed = engines[0].client().masters().await?;
    for b in &builds {
        *per_request.entry(b.request_id).or_default() += 1;
        if let Some(i) = masters_listed.iter().position(|m| m.id == b.master_id) {
            shares[i] += 1;
        }
    }
    let doubles = per_request.values().filter(|n| **n > 1).count();
    for w in waits {
        w.abort();
    }
    for engine in engines {
        engine.shutdown().await;
    }
    postgres::drop_schema(base, &schema).await?;
    Ok((rate, doubles, shares))
}
