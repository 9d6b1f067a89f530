//! The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven by
//! playwright-core (`server/tests/browser/`). The test starts a server on a free port
//! with a slow WASM build to watch, then runs `dashboard.mjs`, which submits work
//! through the page, watches progress and the log move live, stops the build and saves
//! screenshots (into the target directory's `screenshots/`).
//!
//! Without node, the npm packages or Chromium the test says how to get them and passes,
//! so that `cargo test` works on a machine with only Rust; `.ci/run` installs them and
//! sets `KILN_BROWSER_TESTS=1`, which makes anything missing a failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail, ensure};
use kiln_engine::wasm::{Grants, Limits, WasmHost, WasmHostConfig};
use kiln_engine::{BuilderConfig, Engine, EngineConfig};
use kiln_server::{AppState, ServerConfig};
use serde_json::json;

/// Turns a hang of the whole browser run into a failure.
const GUARD: Duration = Duration::from_secs(180);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Node, the npm packages and Chromium, or why not.
fn tools() -> Result<(PathBuf, PathBuf), String> {
    let chromium = std::env::var_os("KILN_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut missing = Vec::new();
    if !node_ok {
        missing.push("node (apt-get install nodejs)".to_owned());
    }
    if !browser_dir().join("node_modules/playwright-core").is_dir() {
        missing.push("playwright-core (cd server/tests/browser && npm ci)".to_owned());
    }
    if !chromium.exists() {
        missing.push(format!(
            "Chromium at {} (apt-get install chromium, or set KILN_CHROMIUM)",
            chromium.display()
        ));
    }
    if missing.is_empty() {
        Ok((PathBuf::from("node"), chromium))
    } else {
        Err(missing.join(", "))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_work_live_and_stops_a_build_in_a_real_browser() -> Result<()> {
    let (node, chromium) = match tools() {
        Ok(t) => t,
        Err(missing) => {
            if std::env::var("KILN_BROWSER_TESTS").is_ok_and(|v| v == "1") {
                bail!("KILN_BROWSER_TESTS=1 but these are missing: {missing}");
            }
            eprintln!("skipping the browser test; to run it install: {missing}");
            return Ok(());
        }
    };
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let engine = Engine::open(EngineConfig::new(url).master_name("browser")).await?;
    let host = Arc::new(WasmHost::new(WasmHostConfig {
        cache_dir: None,
        max_instances: 16,
    }));
    engine.define_lock("deploy", 2).await?;
    let bytes = kiln_bundled::get("progress-demo").ok_or_else(|| anyhow!("no progress-demo"))?;
    let slow = host
        .job_executor("progress-demo", bytes, Limits::default(), Grants::default())
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("slow-progress")
                .description("nested progress, slowly")
                .lock(kiln_engine::LockUse::one("deploy"))
                .kwargs(json!({"steps": 40, "step_ms": 60})),
            slow,
        )
        .await?;
    let echo = host
        .job_executor(
            "echo",
            kiln_bundled::get("echo").ok_or_else(|| anyhow!("no echo"))?,
            Limits::default(),
            Grants::default(),
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("echo").args(json!(["hi"])), echo)
        .await?;
    let engine = Arc::new(engine);
    engine
        .submit(&kiln_engine::Submission::new("a finished build to show").builder("echo"))
        .await?;
    engine
        .register_schedule(kiln_engine::ScheduleConfig::cron(
            "nightly",
            "0 2 * * *",
            "Europe/Rome",
            kiln_engine::Submission::new("nightly echo").builder("echo"),
        ))
        .await?;
    // A delayed run, shown as scheduled until its time (an hour away).
    let scheduled = engine
        .submit(
            &kiln_engine::Submission::new("a delayed run to show")
                .builder("echo")
                .delay(std::time::Duration::from_secs(3600)),
        )
        .await?;
    let token = "browser-token";
    let state = AppState::new(
        engine.clone(),
        host,
        ServerConfig {
            token: Some(token.into()),
            private_reads: false,
            plugins_dir: None,
            ..ServerConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(kiln_server::serve(listener, state, std::future::pending()));

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    let run = tokio::process::Command::new(node)
        .arg("dashboard.mjs")
        .current_dir(browser_dir())
        .env("KILN_URL", format!("http://{address}"))
        .env("KILN_TOKEN", token)
        .env("KILN_SCHEDULED", scheduled.buildset_id.to_string())
        .env("KILN_SHOTS", &shots)
        .env("KILN_CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(GUARD, run)
        .await
        .map_err(|_| anyhow!("the browser run hung"))??;
    server.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "the browser run failed:\n{stdout}\n{stderr}"
    );
    for page in [
        "buildsets",
        "buildset",
        "build",
        "builders",
        "schedules",
        "locks",
        "dark",
        "phone",
        "builder",
    ] {
        let shot = shots.join(format!("{page}.png"));
        ensure!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1_000),
            "no screenshot of the {page} page"
        );
    }
    println!("{stdout}screenshots in {}", shots.display());
    Ok(())
}
