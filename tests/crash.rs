//! `kiln serve` on SQLite, SIGKILLed several times while clients submit through the REST
//! API and builds run: every submission the server acknowledged (201) must exist and
//! complete exactly once (RETRY re-runs aside), and the reporter must hear every
//! buildset complete and every build finish.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use kiln_engine::model::{BuildsetId, ResultCode};
use kiln_storage::{self as storage, BuildFilter, RequestFilter};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Clients submitting at once.
const CLIENTS: usize = 8;
/// Acknowledged submissions each client makes.
const SUBMITS: usize = 40;
/// Times the server is killed, each after [`KILL_EVERY`] more acknowledgements.
const KILLS: usize = 3;
const KILL_EVERY: usize = 60;
/// Turns a hang into a failure; never a pacing device.
const GUARD: Duration = Duration::from_secs(120);
const TOKEN: &str = "crash-token";

const PIPELINE: &str = r#"
[[builder]]
name = "quick"
plugin = "bundled:noop"

[[builder]]
name = "slow"
plugin = "bundled:sleep"
kwargs = { seconds = 0.2 }
max_concurrent = 8

[[reporter]]
name = "log"
plugin = "bundled:jsonl"
kwargs = { path = "/out/events.jsonl" }
[reporter.grants]
dirs = [{ host = "out", guest = "/out", writable = true, create = true }]

[[submit]]
builders = ["quick"]
"#;

/// A `kiln serve` process, killed if the test ends early.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &std::path::Path, port: u16) -> Result<Server> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir)
        .env("RUST_LOG", "error")
        .env("KILN_TOKEN", TOKEN)
        .args([
            "--db",
            "kiln.db",
            "serve",
            "pipeline.toml",
            "--listen",
            &format!("127.0.0.1:{port}"),
            // The same name every time: a restart takes back what the killed one left.
            "--master",
            "crashy",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting kiln serve")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let server = Server(child);
    match lines.next() {
        Some(Ok(line)) if line.starts_with("kiln serve:") => {}
        other => bail!("kiln serve did not start: {other:?}"),
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok(server)
}

/// Posts one buildset; `Some(bsid)` when the server acknowledged it.
async fn submit(port: u16, i: usize) -> Option<BuildsetId> {
    let body = format!(
        r#"{{"builders": ["quick", "slow"], "reason": "crash {i}", "priority": {}}}"#,
        i % 7
    );
    let request = format!(
        "POST /api/v2/buildsets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        Some(String::from_utf8_lossy(&answer).into_owned())
    })
    .await
    .ok()
    .flatten()?;
    if !answer.starts_with("HTTP/1.1 201") {
        return None;
    }
    let json: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1)?).ok()?;
    json["bsid"].as_i64().map(BuildsetId)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_under_submit_load_loses_nothing_it_acknowledged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("pipeline.toml"), PIPELINE)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let acked: Arc<Mutex<Vec<BuildsetId>>> = Arc::default();
    // How many are acknowledged so far, for the killer to wait on.
    let (count, mut counted) = tokio::sync::watch::channel(0usize);
    let count = Arc::new(count);
    let mut server = serve(dir.path(), port)?;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (acked, count) = (acked.clone(), count.clone());
            tokio::spawn(async move {
                let mut done = 0;
                let mut attempt = 0;
                while done < SUBMITS {
                    attempt += 1;
                    // A refused or cut-off submission is not acknowledged (it may still
                    // exist); like a real client, this one backs off and submits anew.
                    match submit(port, c * 10_000 + attempt).await {
                        Some(bsid) => {
                            acked
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(bsid);
                            count.send_modify(|n| *n += 1);
                            done += 1;
                        }
                        None => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();
    for kill in 1..=KILLS {
        tokio::time::timeout(GUARD, counted.wait_for(|n| *n >= kill * KILL_EVERY))
            .await
            .map_err(|_| anyhow!("timed out waiting for acknowledgements before kill {kill}"))??;
        server.0.kill()?;
        server.0.wait()?;
        eprintln!(
            "killed the server after {} acknowledged submissions",
            *counted.borrow()
        );
        server = serve(dir.path(), port)?;
    }
    for client in clients {
        tokio::time::timeout(GUARD, client).await??;
    }
    let acked: BTreeSet<BuildsetId> = acked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .copied()
        .collect();
    ensure!(
        acked.len() >= KILLS * KILL_EVERY,
        "{} acknowledged",
        acked.len()
    );

    // The last server finishes everything. It is another process: its database is
    // looked at until it is done.
    let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let store = storage::open(&url).await?;
    let events = dir.path().join("out").join("events.jsonl");
    tokio::time::timeout(GUARD, async {
        loop {
            let open = store
                .buildset_list(&storage::BuildsetFilter {
                    complete: Some(false),
                    limit: Some(1),
                    ..Default::default()
                })
                .await?;
            // Delivery is at least once: count the acknowledged buildsets reported
            // complete, not the reports (a repeat must not stand in for a missing one).
            let heard = std::fs::read_to_string(&events).unwrap_or_default();
            let complete: BTreeSet<i64> = heard
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .filter(|e| e["event"] == "buildset_complete")
                .filter_map(|e| e["buildset_id"].as_i64())
                .collect();
            if open.is_empty() && acked.iter().all(|b| complete.contains(&b.0)) {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| anyhow!("timed out waiting for every buildset to complete and be reported"))??;
    drop(server);

    // Every acknowledged submission exists and completed exactly once.
    let requests = store
        .request_list(&RequestFilter {
            limit: Some(100_000),
            ..RequestFilter::default()
        })
        .await?;
    let builds = store
        .build_list(&BuildFilter {
            limit: Some(100_000),
            ..BuildFilter::default()
        })
        .await?;
    let mut builds_of: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for b in &builds {
        builds_of.entry(b.request_id).or_default().push(b);
    }
    for bsid in &acked {
        let bs = store.buildset_get(*bsid).await?;
        ensure!(bs.complete, "acknowledged buildset {bsid} is not complete");
        let mine: Vec<_> = requests.iter().filter(|r| r.buildset_id == *bsid).collect();
        ensure!(
            mine.len() == 2,
            "buildset {bsid} has {} requests",
            mine.len()
        );
        for r in mine {
            ensure!(
                r.results == Some(ResultCode::Success),
                "request {} ended {:?}",
                r.id,
                r.results
            );
            let ran = builds_of.get(&r.id).cloned().unwrap_or_default();
            let succeeded = ran
                .iter()
                .filter(|b| b.results == Some(ResultCode::Success))
                .count();
            ensure!(
                succeeded == 1
                    && ran.iter().all(|b| matches!(
                        b.results,
                        Some(ResultCode::Success | ResultCode::Retry)
                    )),
                "request {}: builds {:?}",
                r.id,
                ran.iter().map(|b| b.results).collect::<Vec<_>>()
            );
        }
    }
    // The reporter heard every buildset complete and every build finish, at least once.
    let heard = std::fs::read_to_string(&events)?;
    let mut complete = BTreeSet::new();
    let mut finished = BTreeSet::new();
    for line in heard.lines() {
        let event: Value = serde_json::from_str(line)
            .with_context(|| format!("a reporter line is not JSON: {line:?}"))?;
        match event["event"].as_str() {
            Some("buildset_complete") => {
                complete.insert(event["buildset_id"].as_i64().unwrap_or_default());
            }
            Some("build_finished") => {
                finished.insert(event["build_id"].as_i64().unwrap_or_default());
            }
            _ => {}
        }
    }
    for bsid in &acked {
        ensure!(
            complete.contains(&bsid.0),
            "no buildset_complete for {bsid}"
        );
    }
    for b in &builds {
        ensure!(
            finished.contains(&b.id.0),
            "no build_finished for build {}",
            b.id
        );
    }
    let retried = builds
        .iter()
        .filter(|b| b.results == Some(ResultCode::Retry))
        .count();
    eprintln!(
        "{} acknowledged submissions over {KILLS} kills; {} builds, {retried} of them RETRY after a kill",
        acked.len(),
        builds.len()
    );
    Ok(())
}
