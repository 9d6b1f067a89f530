//! Embedding Kiln in a host program.
//!
//! Opens an engine on a SQLite file (`kiln.db` in the current directory, or the path
//! given as the first argument), registers four builders whose jobs are Rust async
//! functions, submits one buildset that fans out over all of them, prints lifecycle
//! events as they happen, then a summary, and shuts the engine down cleanly. The exit
//! code is non-zero if the buildset did not succeed.
//!
//! ```text
//! cargo run --release --example embedded
//! cargo run --release -- list builds        # the CLI reads the same database
//! ```

use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_engine::model::{LogLevel, ResultCode, SourceStamp};
use kiln_engine::storage::BuildFilter;
use kiln_engine::{
    BuilderConfig, Engine, EngineConfig, Event, FnExecutor, JobError, Outcome, Submission,
};
use serde_json::json;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Counts primes below `n` the slow, honest way: real CPU work for the demo jobs.
fn count_primes(below: u64) -> u64 {
    (2..below)
        .filter(|n| (2..).take_while(|d| d * d <= *n).all(|d| n % d != 0))
        .count() as u64
}

async fn run() -> Result<ExitCode> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "kiln.db".to_owned());
    let engine = Engine::open(EngineConfig::new(format!("sqlite://{path}")))
        .await
        .with_context(|| format!("opening the engine on {path}"))?;

    engine
        .register_builder(
            BuilderConfig::new("fetch").description("fetches the sources"),
            FnExecutor::new(|ctx| async move {
                let repo = ctx
                    .sourcestamps()
                    .first()
                    .map(|s| s.repository.clone())
                    .unwrap_or_default();
                ctx.log(LogLevel::Info, format!("fetching {repo}")).await?;
                for step in 1..=3 {
                    ctx.progress(&["fetch"], step, 3, format!("object pack {step}/3"))
                        .await?;
                }
                ctx.set_property("commit", json!("4f1c2e9"), "fetch")
                    .await?;
                Ok(Outcome::success(json!({"repository": repo, "files": 42})))
            }),
        )
        .await?;

    engine
        .register_builder(
            BuilderConfig::new("compile")
                .description("compiles three crates")
                .kwargs(json!({"opt_level": 3})),
            FnExecutor::new(|ctx| async move {
                let crates = ["kiln-core", "kiln-cli", "kiln-web"];
                let mut sizes = serde_json::Map::new();
                for (i, name) in crates.iter().enumerate() {
                    ctx.set_state(&format!("compiling {name}")).await?;
                    let mut found = 0;
                    for unit in 1..=4u64 {
                        // Each unit is a real bit of CPU work, run off the async threads.
                        found += tokio::task::spawn_blocking(move || {
                            count_primes(20_000 * unit + 5_000 * i as u64)
                        })
                        .await
                        .map_err(|e| JobError::new(e.to_string()))?;
                        ctx.progress(&["compile", name], unit, 4, format!("unit {unit}/4"))
                            .await?;
                    }
                    ctx.log(LogLevel::Info, format!("{name}: {found} symbols"))
                        .await?;
                    sizes.insert((*name).into(), json!(found));
                    ctx.progress(
                        &["link"],
                        i as u64 + 1,
                        crates.len() as u64,
                        format!("linked {name}"),
                    )
                    .await?;
                }
                Ok(Outcome::success(
                    json!({"symbols": sizes, "kwargs": ctx.kwargs()}),
                ))
            }),
        )
        .await?;

    engine
        .register_builder(
            BuilderConfig::new("test")
                .description("runs the test suite")
                .max_concurrent(1),
            FnExecutor::new(|ctx| async move {
                let total = 20;
                let mut slow = 0;
                for case in 1..=total {
                    // A "test" checks a known fact; test 13 is slow and reported as a warning.
                    let primes = count_primes(100 + case);
                    if primes == 0 {
                        return Err(JobError::new(format!("test {case} found no primes")));
                    }
                    if case == 13 {
                        slow += 1;
                        ctx.log(LogLevel::Warning, "test 13 is slow").await?;
                    }
                    ctx.progress(&["tests"], case, total, format!("{case}/{total} passed"))
                        .await?;
                }
                let results = if slow > 0 {
                    ResultCode::Warnings
                } else {
                    ResultCode::Success
                };
                Ok(Outcome::with_results(
                    results,
                    Some(json!({"passed": total, "slow": slow})),
                ))
            }),
        )
        .await?;

    engine
        .register_builder(
            BuilderConfig::new("docs").description("builds the documentation"),
            FnExecutor::new(|ctx| async move {
                let wanted = ctx
                    .get_property("docs")
                    .map(|p| p.value)
                    .unwrap_or(json!(true));
                if wanted == json!(false) {
                    return Ok(Outcome::with_results(ResultCode::Skipped, None));
                }
                ctx.progress(&[], 1, 1, "rendered").await?;
                Ok(Outcome::success(json!({"pages": 17})))
            }),
        )
        .await?;

    let mut events = engine.subscribe();
    let submission = Submission::new("example pipeline")
        .builder("fetch")
        .builder("compile")
        .builder("test")
        .builder("docs")
        .property("docs", json!(true), "example")
        .sourcestamp(SourceStamp {
            repository: "https://example.invalid/kiln.git".into(),
            branch: Some("main".into()),
            revision: Some("4f1c2e9".into()),
            project: "kiln".into(),
            ..SourceStamp::default()
        });
    let submitted = engine.submit(&submission).await?;
    println!("submitted buildset {} to {path}", submitted.buildset_id);

    // Print events for our buildset until it completes.
    loop {
        match events.recv().await {
            Ok(Event::BuildStarted {
                builder, number, ..
            }) => println!("  started  {builder} #{number}"),
            Ok(Event::BuildFinished {
                builder,
                number,
                results,
                ..
            }) => {
                println!("  finished {builder} #{number}: {results}")
            }
            Ok(Event::BuildsetComplete { buildset_id, .. })
                if buildset_id == submitted.buildset_id =>
            {
                break;
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    let buildset = engine.wait_buildset(submitted.buildset_id).await?;

    println!(
        "\nbuildset {}: {}",
        buildset.id,
        buildset.results.map_or("-", |r| r.name())
    );
    let builds = engine
        .client()
        .builds(&BuildFilter {
            buildset_id: Some(buildset.id),
            ..BuildFilter::default()
        })
        .await?;
    for build in &builds {
        let request = engine.client().request(build.request_id).await?;
        let builder = engine.client().builder(request.builder_id).await?;
        let millis = build
            .complete_at
            .map(|end| (end - build.started_at).num_milliseconds())
            .unwrap_or_default();
        println!(
            "  {:<8} #{:<3} {:<9} {:>5} ms  {}",
            builder.name,
            build.number,
            build.results.map_or("-", |r| r.name()),
            millis,
            build
                .return_value
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_default()
        );
    }
    println!(
        "\ninspect it with: cargo run --release -- show buildset {}",
        buildset.id
    );
    engine.shutdown().await;
    let ok = matches!(
        buildset.results,
        Some(ResultCode::Success | ResultCode::Warnings)
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
