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
    let reload_host = host.clone();
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
    // Listening for SIGHUP starts before the line that says the server is up: a SIGHUP
    // sent the moment that line appears must find the handler, not kill the process.
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let hangups = None::<()>;
    println!(
        "kiln serve: dashboard at http://{address}/, API at http://{address}/api/v2 ({})",
        if args.token.is_some() {
            "writes need the token"
        } else {
            "read-only: no --token"
        }
    );
    let events = tokio::spawn(log_lifecycle(engine.clone()));
    let reloads = tokio::spawn(reload_on_hangup(
        hangups,
        args.config.clone(),
        engine.clone(),
        reload_host,
    ));
    kiln_server::serve(listener, state, stop_signal())
        .await
        .context("the server failed")?;
    events.abort();
    reloads.abort();
    engine.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Logs the engine's lifecycle events: what went wrong at info, the rest at debug.
///
/// A line per build that went well was four lines per job at info: at the thousands of
/// jobs a second a server runs, megabytes of log a second and, measured with 16 REST
/// clients, a fifth of the server's CPU per submit. What an operator must see stays at
/// info: builds and buildsets that end worse than WARNINGS (FAILURE, EXCEPTION, RETRY,
/// CANCELLED), expired masters, and a log that fell behind. `RUST_LOG=kiln=debug`
/// shows every line; `RUST_LOG=kiln=warn` silences the rest.
async fn log_lifecycle(engine: Arc<Engine>) {
    use kiln_engine::Event;
    use kiln_engine::model::ResultCode;
    use tracing::debug;
    let bad = |results: ResultCode| results.severity() > ResultCode::Warnings.severity();
    let mut events = engine.subscribe();
    loop {
        match events.recv().await {
            Ok(Event::BuildsetSubmitted {
                buildset_id,
                reason,
                ..
            }) => debug!(buildset = %buildset_id, reason, "buildset submitted"),
            Ok(Event::BuildStarted {
                build_id,
                builder,
                number,
                ..
            }) => debug!(build = %build_id, builder, number, "build started"),
            Ok(Event::BuildFinished {
                build_id, results, ..
            }) if bad(results) => {
                info!(build = %build_id, results = %results.name(), "build finished")
            }
            Ok(Event::BuildFinished {
                build_id, results, ..
            }) => debug!(build = %build_id, results = %results.name(), "build finished"),
            Ok(Event::BuildsetComplete {
                buildset_id,
                results,
            }) if bad(results) => {
                info!(buildset = %buildset_id, results = %results.name(), "buildset complete")
            }
            Ok(Event::BuildsetComplete {
                buildset_id,
                results,
            }) => debug!(buildset = %buildset_id, results = %results.name(), "buildset complete"),
            Ok(Event::MasterExpired { master_id, .. }) => {
                info!(master = %master_id, "expired a silent master; its work runs again")
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                info!(missed = n, "lifecycle log fell behind")
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// SIGHUP reloads the pipeline file: new builders start, locks and schedules take their
/// new definitions, relationships their policies. A builder whose settings changed and
/// the reporters keep what they had until a restart (said in the log). Never fatal: a
/// file that does not load leaves everything as it was.
async fn reload_on_hangup(
    #[cfg(unix)] hangups: Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] hangups: Option<()>,
    config: Option<std::path::PathBuf>,
    engine: Arc<Engine>,
    host: Arc<WasmHost>,
) {
    #[cfg(unix)]
    {
        let Some(mut hangups) = hangups else {
            tracing::warn!("cannot listen for SIGHUP; reload by restarting");
            return;
        };
        while hangups.recv().await.is_some() {
            let Some(path) = &config else {
                info!("SIGHUP: no pipeline file to reload");
                continue;
            };
            match reload(path, &engine, &host).await {
                Ok(summary) => info!(file = %path.display(), "SIGHUP: reloaded: {summary}"),
                Err(e) => tracing::warn!(
                    file = %path.display(),
                    "SIGHUP: the file does not load, nothing changed: {e:#}"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (hangups, config, engine, host);
    }
}

async fn reload(path: &std::path::Path, engine: &Engine, host: &WasmHost) -> Result<String> {
    let (base, file) = crate::pipeline::read(path)?;
    let pipeline = crate::pipeline::load(base, file, host, false).await?;
    let known: std::collections::BTreeMap<String, kiln_engine::BuilderConfig> = engine
        .builder_configs()
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    for (name, count) in &pipeline.locks {
        engine.define_lock(name, *count).await?;
    }
    for (relationship, policy) in pipeline.policies {
        engine.set_policy(relationship, policy);
    }
    let (mut added, mut changed) = (Vec::new(), Vec::new());
    for (config, executor) in pipeline.builders {
        match known.get(&config.name) {
            None => {
                added.push(config.name.clone());
                engine.register_builder(config, executor).await?;
            }
            Some(old) if *old != config => changed.push(config.name),
            Some(_) => {}
        }
    }
    let schedules = pipeline.schedules.len();
    for schedule in pipeline.schedules {
        engine.register_schedule(schedule).await?;
    }
    if !changed.is_empty() {
        tracing::warn!(
            builders = %changed.join(", "),
            "SIGHUP: these builders' settings changed; they apply after a restart"
        );
    }
    Ok(format!(
        "{} new builder(s){}, {} lock(s), {schedules} schedule(s); reporters and changed builders apply after a restart",
        added.len(),
        if added.is_empty() {
            String::new()
        } else {
            format!(" ({})", added.join(", "))
        },
        pipeline.locks.len()
    ))
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
