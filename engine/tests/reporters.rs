//! Reporters and the durable outbox: delivery, retries, the WASM webhook and jsonl
//! reporters, the HTTP grant, and survival of a kill -9. Tests wait on events (engine
//! events, HTTP requests arriving, a child process's output); timeouts only turn hangs
//! into failures.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use async_trait::async_trait;
use kiln_engine::model::{Report, ReportKind, ResultCode};
use kiln_engine::wasm::{
    DirGrant, Grants, HttpGrant, Limits, WasmHost, WasmHostConfig, WasmReporter,
};
use kiln_engine::{
    BuilderConfig, Client, Engine, EngineConfig, Event, FnExecutor, Outcome, Reporter,
    ReporterConfig, Submission,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

mod support;
use support::guard;

fn echo() -> FnExecutor {
    FnExecutor::new(|ctx| async move { Ok(Outcome::success(json!({"n": ctx.number()}))) })
}

/// A reporter that hands every event to a channel, failing the first `fail_first` calls.
struct Collect {
    tx: mpsc::UnboundedSender<Report>,
    fail_first: usize,
    calls: AtomicUsize,
}

#[async_trait]
impl Reporter for Collect {
    async fn report(&self, event: &Report) -> Result<(), String> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
            return Err("the receiver is down".into());
        }
        self.tx
            .send(event.clone())
            .map_err(|_| "test is gone".to_owned())
    }
}

async fn open(dir: &tempfile::TempDir) -> Result<Engine> {
    let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
    Ok(Engine::open(EngineConfig::new(url).master_name("reporting")).await?)
}

async fn progress_until(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    mut done: impl FnMut(&Event) -> bool,
) -> Result<()> {
    guard(what, async {
        loop {
            if done(&events.recv().await?) {
                return anyhow::Ok(());
            }
        }
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reporter_hears_each_lifecycle_event_in_order_with_its_details() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open(&dir).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine
        .register_reporter(
            ReporterConfig::new("collect"),
            Collect {
                tx,
                fail_first: 0,
                calls: AtomicUsize::new(0),
            },
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    let submitted = engine
        .submit(&Submission::new("hello").builder("b"))
        .await?;
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(
            guard("an event", rx.recv())
                .await?
                .ok_or_else(|| anyhow!("closed"))?,
        );
    }
    let kinds: Vec<ReportKind> = got.iter().map(|e| e.kind).collect();
    ensure!(
        kinds
            == [
                ReportKind::BuildsetSubmitted,
                ReportKind::BuildStarted,
                ReportKind::BuildFinished,
                ReportKind::BuildsetComplete
            ],
        "{kinds:?}"
    );
    ensure!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    ensure!(got.iter().all(|e| e.buildset_id == submitted.buildset_id));
    let submitted_payload = &got[0].payload;
    ensure!(
        submitted_payload["reason"] == "hello" && submitted_payload["builders"] == json!(["b"])
    );
    let finished = &got[2];
    ensure!(finished.results == Some(ResultCode::Success));
    ensure!(finished.builder.as_deref() == Some("b"));
    let p = &finished.payload;
    ensure!(
        p["event"] == "build_finished" && p["results"] == 0 && p["number"] == 1,
        "{p}"
    );
    ensure!(p["return_value"] == json!({"n": 1}) && p["state_string"] == "build successful");
    ensure!(p["duration_s"].as_f64().is_some_and(|d| d >= 0.0));
    ensure!(got[3].payload["results"] == 0);
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reporter_is_retried_and_never_changes_a_builds_result() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open(&dir).await?;
    let mut events = engine.subscribe();
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine
        .register_reporter(
            ReporterConfig::new("flaky")
                .events([ReportKind::BuildFinished])
                .retries(10, Duration::from_millis(5), Duration::from_millis(20)),
            Collect {
                tx,
                fail_first: 3,
                calls: AtomicUsize::new(0),
            },
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    let submitted = engine.submit(&Submission::new("x").builder("b")).await?;
    let bs = guard("the buildset", engine.wait_buildset(submitted.buildset_id)).await??;
    ensure!(bs.results == Some(ResultCode::Success));
    let mut failures = 0;
    progress_until(&mut events, "the delivery", |e| {
        if let Event::ReporterProgress {
            last_error: Some(_),
            delivered: 0,
            ..
        } = e
        {
            failures += 1;
        }
        matches!(e, Event::ReporterProgress { delivered: 1, .. })
    })
    .await?;
    ensure!(failures == 3, "{failures} failed attempts were recorded");
    let delivered = rx.try_recv()?;
    ensure!(delivered.kind == ReportKind::BuildFinished);
    let state = engine.client().reporter("flaky").await?;
    ensure!(
        state.delivered == 1 && state.attempts == 0 && state.dropped == 0,
        "{state:?}"
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_dropped_after_the_last_attempt_and_delivery_goes_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open(&dir).await?;
    let mut events = engine.subscribe();
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine
        .register_reporter(
            ReporterConfig::new("give-up")
                .events([ReportKind::BuildFinished, ReportKind::BuildsetComplete])
                .retries(2, Duration::from_millis(5), Duration::from_millis(5)),
            Collect {
                tx,
                fail_first: 2,
                calls: AtomicUsize::new(0),
            },
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    engine.submit(&Submission::new("x").builder("b")).await?;
    progress_until(&mut events, "the drop and the next delivery", |e| {
        matches!(e, Event::ReporterProgress { delivered: 1, .. })
    })
    .await?;
    let state = engine.client().reporter("give-up").await?;
    ensure!(state.dropped == 1 && state.delivered == 1, "{state:?}");
    ensure!(state.last_error.as_deref() == Some("the receiver is down"));
    ensure!(rx.try_recv()?.kind == ReportKind::BuildsetComplete);
    engine.shutdown().await;
    Ok(())
}

/// A local HTTP server that records the bodies it accepts. `status` is what it answers;
/// bodies answered with anything but 2xx are not recorded.
struct Server {
    port: u16,
    status: Arc<AtomicU16>,
    bodies: mpsc::UnboundedReceiver<Value>,
    seen: Arc<AtomicUsize>,
}

async fn server(status: u16) -> Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let status = Arc::new(AtomicU16::new(status));
    let seen = Arc::new(AtomicUsize::new(0));
    let (tx, bodies) = mpsc::unbounded_channel();
    let (answer, count) = (status.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (answer, count, tx) = (answer.clone(), count.clone(), tx.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut reader = BufReader::new(read);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).await.is_err() {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let code = answer.load(Ordering::SeqCst);
                if (200..300).contains(&code)
                    && let Ok(value) = serde_json::from_slice::<Value>(&body)
                {
                    let _ = tx.send(value);
                }
                let reply =
                    format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = write.write_all(reply.as_bytes()).await;
                let _ = write.shutdown().await;
            });
        }
    });
    Ok(Server {
        port,
        status,
        bodies,
        seen,
    })
}

fn host() -> WasmHost {
    WasmHost::new(WasmHostConfig {
        cache_dir: None,
        max_instances: 64,
    })
}

async fn webhook(host: &WasmHost, url: String, http: &[&str]) -> Result<WasmReporter> {
    let bytes = kiln_bundled::get("webhook").ok_or_else(|| anyhow!("no webhook"))?;
    let plugin = host.load_reporter("webhook", Arc::from(bytes)).await?;
    Ok(WasmReporter::new(
        plugin,
        json!({"url": url}),
        Limits::reporter(),
        Grants {
            http: HttpGrant {
                hosts: http.iter().map(|h| (*h).to_owned()).collect(),
            },
            ..Grants::default()
        },
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_reporter_posts_each_event_as_json_to_a_granted_host() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open(&dir).await?;
    let mut server = server(200).await?;
    let host = host();
    let reporter = webhook(
        &host,
        format!("http://127.0.0.1:{}/hook", server.port),
        &["127.0.0.1"],
    )
    .await?;
    engine
        .register_reporter(ReporterConfig::new("hook").builders(["b"]), reporter)
        .await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    engine
        .register_builder(BuilderConfig::new("other"), echo())
        .await?;
    let mine = engine.submit(&Submission::new("mine").builder("b")).await?;
    engine
        .submit(&Submission::new("not mine").builder("other"))
        .await?;
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(
            guard("a POST", server.bodies.recv())
                .await?
                .ok_or_else(|| anyhow!("closed"))?,
        );
    }
    let kinds: Vec<&str> = got.iter().filter_map(|b| b["event"].as_str()).collect();
    ensure!(
        kinds
            == [
                "buildset_submitted",
                "build_started",
                "build_finished",
                "buildset_complete"
            ],
        "{kinds:?}"
    );
    ensure!(got.iter().all(|b| b["buildset_id"] == mine.buildset_id.0));
    engine.shutdown().await;
    ensure!(
        server.bodies.try_recv().is_err(),
        "events of another builder were posted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reporter_trying_a_host_it_was_not_granted_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open(&dir).await?;
    let mut events = engine.subscribe();
    let server = server(200).await?;
    let host = host();
    // The URL is reachable, but the grant names another host.
    let reporter = webhook(
        &host,
        format!("http://127.0.0.1:{}/hook", server.port),
        &["hooks.example.invalid"],
    )
    .await?;
    engine
        .register_reporter(
            ReporterConfig::new("sneaky")
                .events([ReportKind::BuildsetSubmitted])
                .retries(1, Duration::from_millis(5), Duration::from_millis(5)),
            reporter,
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    engine.submit(&Submission::new("x").builder("b")).await?;
    let mut error = None;
    progress_until(&mut events, "the refusal", |e| match e {
        Event::ReporterProgress {
            dropped: 1,
            last_error,
            ..
        } => {
            error = last_error.clone();
            true
        }
        _ => false,
    })
    .await?;
    let error = error.unwrap_or_default();
    ensure!(
        error.contains(&format!("127.0.0.1:{}", server.port))
            && error.contains("not in the reporter's http grant (hooks.example.invalid)"),
        "{error}"
    );
    ensure!(
        server.seen.load(Ordering::SeqCst) == 0,
        "the request reached the server"
    );
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jsonl_reporter_appends_every_event_to_a_granted_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let engine = open(&dir).await?;
    let mut events = engine.subscribe();
    let host = host();
    let bytes = kiln_bundled::get("jsonl").ok_or_else(|| anyhow!("no jsonl"))?;
    let plugin = host.load_reporter("jsonl", Arc::from(bytes)).await?;
    let reporter = WasmReporter::new(
        plugin,
        json!({"path": "/out/events.jsonl"}),
        Limits::reporter(),
        Grants {
            env: Vec::new(),
            dirs: vec![DirGrant {
                host: out.path().to_path_buf(),
                guest: "/out".into(),
                writable: true,
            }],
            ..Grants::default()
        },
    )?;
    engine
        .register_reporter(ReporterConfig::new("file"), reporter)
        .await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    engine.submit(&Submission::new("one").builder("b")).await?;
    let mut delivered = 0;
    progress_until(&mut events, "four events in the file", |e| {
        if let Event::ReporterProgress { delivered: n, .. } = e {
            delivered += n;
        }
        delivered >= 4
    })
    .await?;
    let text = std::fs::read_to_string(out.path().join("events.jsonl"))?;
    let lines: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(lines.len() == 4, "{text}");
    ensure!(lines[3]["event"] == "buildset_complete");
    engine.shutdown().await;
    Ok(())
}

const CHILD_ENV: &str = "KILN_TEST_CHILD_DB";
const READY: &str = "KILN-CHILD-READY";
/// Buildsets the first child process submits.
const CHILD_BUILDSETS: usize = 5;

/// Not a test of its own: the engine process that
/// `pending_deliveries_survive_a_kill_9_and_are_delivered_after_restart_exactly_as_recorded`
/// starts and kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by the kill -9 test"]
async fn child_engine_process() -> Result<()> {
    let Ok(db) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let url = std::env::var("KILN_TEST_CHILD_HOOK")?;
    let submit = std::env::var("KILN_TEST_CHILD_SUBMIT").is_ok();
    let engine =
        Engine::open(EngineConfig::new(format!("sqlite://{db}")).master_name("child")).await?;
    let host = host();
    let reporter = webhook(&host, url, &["127.0.0.1"]).await?;
    engine
        .register_reporter(
            ReporterConfig::new("hook").retries(
                1_000,
                Duration::from_millis(20),
                Duration::from_millis(100),
            ),
            reporter,
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("b"), echo())
        .await?;
    if submit {
        let batch: Vec<Submission> = (0..CHILD_BUILDSETS)
            .map(|i| Submission::new(format!("before the crash {i}")).builder("b"))
            .collect();
        for s in engine.submit_many(&batch).await? {
            engine.wait_buildset(s.buildset_id).await?;
        }
    }
    println!("{READY}");
    std::future::pending::<()>().await;
    Ok(())
}

/// Starts the child engine process and waits until it says it is ready.
async fn spawn_child(db: &str, hook: &str, submit: bool) -> Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args([
        "child_engine_process",
        "--exact",
        "--ignored",
        "--nocapture",
    ])
    .env(CHILD_ENV, db)
    .env("KILN_TEST_CHILD_HOOK", hook)
    .env("RUST_BACKTRACE", "0")
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    if submit {
        cmd.env("KILN_TEST_CHILD_SUBMIT", "1");
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    guard("the child engine to be ready", async {
        while let Some(line) = lines.next_line().await? {
            if line.trim() == READY {
                return anyhow::Ok(());
            }
        }
        Err(anyhow!("the child engine exited before it was ready"))
    })
    .await??;
    Ok(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_survive_a_kill_9_and_are_delivered_after_restart_exactly_as_recorded()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("kiln.db").display().to_string();
    // The receiver is down: every delivery fails and stays pending.
    let mut server = server(503).await?;
    let hook = format!("http://127.0.0.1:{}/hook", server.port);
    let mut first = spawn_child(&db, &hook, true).await?;
    first.start_kill()?; // SIGKILL: no shutdown, nothing flushed.
    first.wait().await?;

    let client = Client::open(&format!("sqlite://{db}")).await?;
    let state = client.reporter("hook").await?;
    let pending = client.outbox(state.cursor, 10_000).await?;
    ensure!(
        pending.len() == 4 * CHILD_BUILDSETS,
        "{} events pending after the kill, expected {}",
        pending.len(),
        4 * CHILD_BUILDSETS
    );
    ensure!(state.delivered == 0);
    drop(client);

    // The receiver is back; a new process delivers what was recorded.
    server.status.store(200, Ordering::SeqCst);
    let mut second = spawn_child(&db, &hook, false).await?;
    let mut received = Vec::new();
    while received.len() < pending.len() {
        received.push(
            guard("the pending events", server.bodies.recv())
                .await?
                .ok_or_else(|| anyhow!("closed"))?,
        );
    }
    second.start_kill()?;
    second.wait().await?;
    let recorded: Vec<&Value> = pending.iter().map(|e| &e.payload).collect();
    ensure!(
        received.iter().collect::<Vec<_>>() == recorded,
        "delivered events differ from the recorded ones"
    );
    Ok(())
}
