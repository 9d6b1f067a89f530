//! WASM benchmarks of the sandbox alone. `cargo bench -p kiln-engine --bench wasm [--
//! WHICH]`, WHICH one of `sandbox`, `languages` (default: both).
//!
//! - sandbox: cost per job of a fresh store + instantiate + call + drop of a no-op job
//!   (pooling allocator, precompiled component);
//! - languages: the same small job's size, compile time, cache load and per-job cost
//!   in each guest language.
//!
//! The lifecycle on SQLite and PostgreSQL, REST submits, latency and the memory of
//! suspended builds are measured against their floors by `cargo bench --bench kiln`
//! (benches/kiln.rs at the root). It measures and prints; it asserts nothing about speed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use kiln_engine::wasm::{Limits, WasmHost, WasmHostConfig};

fn bundled(name: &str) -> Result<&'static [u8]> {
    kiln_bundled::get(name).ok_or_else(|| anyhow!("no bundled plugin {name}"))
}

fn host(dir: &tempfile::TempDir) -> WasmHost {
    WasmHost::new(WasmHostConfig {
        cache_dir: Some(dir.path().join("cache")),
        ..WasmHostConfig::default()
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
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
    if wants("sandbox") {
        sandbox().await?;
    }
    if wants("languages") {
        languages().await?;
    }
    Ok(())
}
