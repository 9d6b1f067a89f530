//! `kiln serve`: the HTTP API and the dashboard over a database, running a pipeline
//! file's builders, policies and reporters. Stops cleanly on Ctrl-C or SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_engine::storage;
use kiln_engine::wasm::{WasmHost, WasmHostConfig};
use kiln_engine::{Engine, EngineConfig};
use kiln_server::{AppState, ConnectionLimits, ServerConfig};
use tracing::info;

use crate::cli::ServeArgs;

pub async fn serve(args: &ServeArgs, db: &str) -> Result<ExitCode> {
    // What the flags say is checked before anything opens.
    if args.token.as_deref().is_some_and(str::is_empty) {
        anyhow::bail!("--token is empty");
    }
    if args.private_reads && args.token.is_none() {
        anyhow::bail!(
            "--private-reads needs --token (or KILN_TOKEN): without a token no client could read anything"
        );
    }
    let tune = |mut config: EngineConfig| {
        if let Some(name) = &args.master {
            config.master_name = name.clone();
        }
        if let Some(interval) = args.heartbeat_interval {
            config.heartbeat_interval = interval;
        }
        if let Some(expiry) = args.master_expiry {
            config.master_expiry = expiry;
        }
        if let Some(poll) = args.poll_interval {
            config.poll_interval = poll;
        }
        config
    };
    let (engine, host, submissions) = match &args.config {
        Some(path) => {
            let started = super::run::start(path, db, args.submit, tune).await?;
            for schedule in started.schedules {
                let name = schedule.name.clone();
                let row = started
                    .engine
                    .register_schedule(schedule)
                    .await
                    .with_context(|| format!("registering schedule {name:?}"))?;
                info!(schedule = %name, next_fire = ?row.next_fire, "schedule registered");
            }
            (started.engine, started.host, started.submissions)
        }
        None => {
            let engine = Engine::open(tune(EngineConfig::new(storage::database_url(db))))
                .await
                .with_context(|| format!("opening {}", storage::display_url(db)))?;
            let host = Arc::new(WasmHost::new(WasmHostConfig::default()));
            (engine, host, Vec::new())
        }
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let engine = Arc::new(engine);
    if args.submit {
        let submitted = engine.submit_many(&submissions).await?;
        info!(
            buildsets = submitted.len(),
            "submitted the config's buildsets"
        );
    }
    let state = AppState::new(
        engine.clone(),
        host,
        ServerConfig {
            token: args.token.clone(),
            private_reads: args.private_reads,
            plugins_dir: args.plugins_dir.clone(),
            connections: ConnectionLimits {
                max_connections: args.max_connections,
                header_read_timeout: args.header_timeout,
                ..ConnectionLimits::default()
            },
            ..ServerConfig::default()
        },
    );
    println!(
        "kiln serve: dashboard at http://{address}/, API at http://{address}/api/v2 ({})",
        if args.token.is_some() {
            "writes need the token"
        } else {
            "read-only: no --token"
        }
    );
    kiln_server::serve(listener, state, stop_signal())
        .await
        .context("the server failed")?;
    engine.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
