//! Network for jobs under grants: the bundled `fetch` job reaches a local HTTP server
//! only when its builder grants the host (and port), is refused before connecting
//! otherwise, and stays within its build's limits on requests and body bytes; every
//! refusal and every limit is an EXCEPTION naming it. Tests wait on builds finishing;
//! timeouts only turn hangs into failures.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, anyhow, ensure};
use kiln_engine::model::ResultCode;
use kiln_engine::wasm::{Grants, HttpGrant, Limits, WasmHost, WasmHostConfig};
use kiln_engine::{BuilderConfig, Engine, EngineConfig, Submission};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

mod support;
use support::guard;

/// A server answering `GET /bytes/N` with N bytes; counts the requests it read.
async fn server() -> Result<(u16, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut reader = BufReader::new(read);
                let mut first = String::new();
                if reader.read_line(&mut first).await.unwrap_or(0) == 0 {
                    return;
                }
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0
                        || line.trim_end().is_empty()
                    {
                        break;
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let n: usize = first
                    .split_whitespace()
                    .nth(1)
                    .and_then(|path| path.strip_prefix("/bytes/"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let head =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n");
                let _ = write.write_all(head.as_bytes()).await;
                let _ = write.write_all(&vec![b'k'; n]).await;
                let _ = write.shutdown().await;
            });
        }
    });
    Ok((port, seen))
}

struct Case {
    builder: &'static str,
    path: &'static str,
    times: u64,
    grant: Vec<String>,
    limits: Limits,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_reach_only_granted_hosts_within_their_request_and_byte_limits() -> Result<()> {
    let (port, seen) = server().await?;
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let engine = Engine::open(EngineConfig::new(url).master_name("net")).await?;
    let host = WasmHost::new(WasmHostConfig {
        cache_dir: None,
        max_instances: 16,
    });
    let bytes = kiln_bundled::get("fetch").ok_or_else(|| anyhow!("no bundled fetch"))?;
    let local = vec!["127.0.0.1".to_owned()];
    let cases = [
        Case {
            builder: "granted",
            path: "/bytes/1000",
            times: 2,
            grant: local.clone(),
            limits: Limits::default(),
        },
        Case {
            builder: "ungranted",
            path: "/bytes/10",
            times: 1,
            grant: Vec::new(),
            limits: Limits::default(),
        },
        Case {
            builder: "other-port",
            path: "/bytes/10",
            times: 1,
            grant: vec!["127.0.0.1:1".to_owned()],
            limits: Limits::default(),
        },
        Case {
            builder: "chatty",
            path: "/bytes/10",
            times: 5,
            grant: local.clone(),
            limits: Limits {
                http_requests: 3,
                ..Limits::default()
            },
        },
        Case {
            builder: "greedy",
            path: "/bytes/300000",
            times: 1,
            grant: local.clone(),
            limits: Limits {
                http_bytes: 100_000,
                ..Limits::default()
            },
        },
    ];
    for case in &cases {
        let executor = host
            .job_executor(
                "fetch",
                bytes,
                case.limits,
                Grants {
                    http: HttpGrant {
                        hosts: case.grant.clone(),
                    },
                    ..Grants::default()
                },
            )
            .await?;
        engine
            .register_builder(
                BuilderConfig::new(case.builder).kwargs(json!({
                    "url": format!("http://127.0.0.1:{port}{}", case.path),
                    "times": case.times,
                })),
                executor,
            )
            .await?;
    }
    let mut outcomes = std::collections::BTreeMap::new();
    for case in &cases {
        let before = seen.load(Ordering::SeqCst);
        let submitted = engine
            .submit(&Submission::new(case.builder).builder(case.builder))
            .await?;
        guard(case.builder, engine.wait_buildset(submitted.buildset_id)).await??;
        let request = submitted.requests[case.builder];
        let builds = engine
            .client()
            .builds(&kiln_engine::storage::BuildFilter {
                request_id: Some(request),
                ..Default::default()
            })
            .await?;
        let build = builds
            .first()
            .ok_or_else(|| anyhow!("{}: no build", case.builder))?;
        outcomes.insert(
            case.builder,
            (
                build.results,
                build.error.clone().unwrap_or_default(),
                build.return_value.clone(),
                seen.load(Ordering::SeqCst) - before,
            ),
        );
    }
    let (results, _, value, served) = &outcomes["granted"];
    ensure!(
        *results == Some(ResultCode::Success) && *served == 2,
        "{outcomes:?}"
    );
    ensure!(
        value
            .as_ref()
            .is_some_and(|v| v["bytes"] == 2000 && v["status"] == 200),
        "{value:?}"
    );
    for (builder, why) in [
        ("ungranted", "(which is empty)"),
        ("other-port", "(127.0.0.1:1)"),
    ] {
        let (results, error, _, served) = &outcomes[builder];
        ensure!(
            *results == Some(ResultCode::Exception)
                && error.contains(&format!("outbound HTTP to 127.0.0.1:{port} was refused"))
                && error.contains("builder's http grant")
                && error.contains(why),
            "{builder}: {results:?} {error}"
        );
        ensure!(
            *served == 0,
            "{builder}: refused before connecting, yet {served} served"
        );
    }
    let (results, error, _, served) = &outcomes["chatty"];
    ensure!(
        *results == Some(ResultCode::Exception)
            && error.contains("http request limit exceeded: more than 3 requests")
            && *served == 3,
        "chatty: {results:?} {error} ({served} served)"
    );
    let (results, error, _, _) = &outcomes["greedy"];
    ensure!(
        *results == Some(ResultCode::Exception)
            && error.contains("http byte limit exceeded: more than 100000 bytes"),
        "greedy: {results:?} {error}"
    );
    engine.shutdown().await;
    Ok(())
}
