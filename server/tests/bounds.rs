//! Everything a client controls is bounded, and every refusal is a JSON answer: page
//! sizes, request bodies, URIs, headers, connections, idle and half-sent requests, the
//! size of a buildset tree, and text the database cannot store.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use kiln_engine::model::Properties;
use kiln_engine::wasm::{WasmHost, WasmHostConfig};
use kiln_engine::{BuilderConfig, Engine, EngineConfig, FnExecutor, Outcome, Submission};
use kiln_server::{AppState, ConnectionLimits, ServerConfig, router};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const TOKEN: &str = "sesame";
const GUARD: Duration = Duration::from_secs(60);

async fn guard<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(GUARD, fut)
        .await
        .map_err(|_| anyhow!("timed out waiting for {what}"))
}

struct Rig {
    engine: Arc<Engine>,
    state: AppState,
    _dir: tempfile::TempDir,
}

async fn rig(config: ServerConfig) -> Result<Rig> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let engine = Engine::open(EngineConfig::new(url).master_name("bounds")).await?;
    engine
        .register_builder(
            BuilderConfig::new("ok"),
            FnExecutor::new(|_| async { Ok(Outcome::success(json!(null))) }),
        )
        .await?;
    // A parent that starts as many children as its kwargs say, one trigger each.
    engine
        .register_builder(
            BuilderConfig::new("fan"),
            FnExecutor::new(|ctx| async move {
                let n = ctx.kwargs()["children"].as_u64().unwrap_or(0);
                let names: Vec<&str> = (0..n).map(|_| "ok").collect();
                ctx.trigger(&names, Properties::new(), true, "")
                    .await
                    .map_err(|e| kiln_engine::JobError::new(e.to_string()))?;
                Ok(Outcome::success(json!(n)))
            }),
        )
        .await?;
    let engine = Arc::new(engine);
    let host = Arc::new(WasmHost::new(WasmHostConfig {
        cache_dir: None,
        max_instances: 8,
    }));
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins)?;
    let state = AppState::new(
        engine.clone(),
        host,
        ServerConfig {
            token: Some(TOKEN.into()),
            plugins_dir: Some(plugins),
            ..config
        },
    );
    Ok(Rig {
        engine,
        state,
        _dir: dir,
    })
}

struct Reply {
    status: StatusCode,
    json: Value,
    content_type: String,
}

async fn call(app: &Router, request: Request<Body>) -> Result<Reply> {
    let response = app.clone().oneshot(request).await?;
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes = response.into_body().collect().await?.to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(Reply {
        status,
        json,
        content_type,
    })
}

fn get(path: &str) -> Result<Request<Body>> {
    Ok(Request::get(path).body(Body::empty())?)
}

fn post(path: &str, body: impl Into<Body>) -> Result<Request<Body>> {
    Ok(Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(body.into())?)
}

/// A refusal: the status, and a JSON body whose error says `what`.
fn refused(reply: &Reply, status: StatusCode, what: &str) -> Result<()> {
    ensure!(
        reply.status == status,
        "{} instead of {status}",
        reply.status
    );
    ensure!(
        reply.content_type.starts_with("application/json"),
        "{status} came as {:?}",
        reply.content_type
    );
    let error = reply.json["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains(what),
        "{status}: {error:?} does not say {what:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_sizes_are_bounded_with_a_default_and_a_maximum() -> Result<()> {
    let r = rig(ServerConfig {
        default_page: 3,
        max_page: 5,
        ..ServerConfig::default()
    })
    .await?;
    let app = router(r.state.clone());
    for i in 0..7 {
        r.engine.submit(&Submission::new(format!("{i}"))).await?;
    }
    let page = call(&app, get("/api/v2/buildsets")?).await?;
    ensure!(page.json["buildsets"].as_array().map(Vec::len) == Some(3));
    ensure!(page.json["meta"]["total"] == 7);
    let five = call(&app, get("/api/v2/buildsets?limit=5&offset=5")?).await?;
    ensure!(five.json["buildsets"].as_array().map(Vec::len) == Some(2));
    let huge = call(&app, get("/api/v2/builds?limit=4294967295")?).await?;
    refused(&huge, StatusCode::BAD_REQUEST, "at most 5")?;
    let logs = call(&app, get("/api/v2/builds/1/logs?limit=100000")?).await?;
    ensure!(logs.status == StatusCode::BAD_REQUEST || logs.status == StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_in_json() -> Result<()> {
    let r = rig(ServerConfig::default()).await?;
    let app = router(r.state.clone());
    // A JSON body over the limit: 413, in JSON.
    let big = json!({ "builders": ["ok"], "reason": "x".repeat(3 << 20) }).to_string();
    let reply = call(&app, post("/api/v2/buildsets", big)?).await?;
    refused(&reply, StatusCode::PAYLOAD_TOO_LARGE, "too large")?;
    // A plugin upload of 18 MB (a Python component's size) gets past the body limit to
    // the check of what it is; one past the upload limit is 413.
    let python_sized = vec![0u8; 18 << 20];
    let reply = call(&app, post("/api/v2/plugins?name=big", python_sized)?).await?;
    ensure!(reply.status == StatusCode::BAD_REQUEST, "{}", reply.status);
    ensure!(reply.json["error"].as_str().is_some());
    let too_big = vec![0u8; (64 << 20) + 1];
    let reply = call(&app, post("/api/v2/plugins?name=big", too_big)?).await?;
    refused(&reply, StatusCode::PAYLOAD_TOO_LARGE, "too large")?;
    // A long URI: 414. Many or large headers: 431. A method a route does not take: 405.
    let long = format!("/api/v2/buildsets?reason={}", "a".repeat(10 << 10));
    refused(
        &call(&app, get(&long)?).await?,
        StatusCode::URI_TOO_LONG,
        "URI",
    )?;
    let mut many = Request::get("/api/v2/buildsets");
    for i in 0..150 {
        many = many.header(format!("x-h{i}"), "v");
    }
    let reply = call(&app, many.body(Body::empty())?).await?;
    refused(
        &reply,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers",
    )?;
    let fat = Request::get("/api/v2/buildsets")
        .header("x-fat", "f".repeat(40 << 10))
        .body(Body::empty())?;
    let reply = call(&app, fat).await?;
    refused(&reply, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "bytes")?;
    let reply = call(
        &app,
        Request::delete("/api/v2/buildsets").body(Body::empty())?,
    )
    .await?;
    refused(&reply, StatusCode::METHOD_NOT_ALLOWED, "method")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_a_database_cannot_store_is_a_400_naming_the_field() -> Result<()> {
    let r = rig(ServerConfig::default()).await?;
    let app = router(r.state.clone());
    let cases = [
        ("reason", json!({ "builders": ["ok"], "reason": "a\u{0}b" })),
        (
            "external_idstring",
            json!({ "builders": ["ok"], "external_idstring": "a\u{0}b" }),
        ),
        (
            "properties",
            json!({ "builders": ["ok"], "properties": { "a\u{0}b": 1 } }),
        ),
        (
            "properties.p.source",
            json!({ "builders": ["ok"], "properties": { "p": [1, "a\u{0}b"] } }),
        ),
        (
            "sourcestamps.branch",
            json!({ "builders": ["ok"], "sourcestamps": [{ "repository": "r", "branch": "a\u{0}b" }] }),
        ),
        ("builders", json!({ "builders": ["a\u{0}b"] })),
    ];
    for (field, body) in cases {
        let reply = call(&app, post("/api/v2/buildsets", body.to_string())?).await?;
        refused(&reply, StatusCode::BAD_REQUEST, field)?;
        ensure!(
            reply.json["error"]
                .as_str()
                .unwrap_or_default()
                .contains("NUL"),
            "{field}: {}",
            reply.json
        );
    }
    // A lone surrogate is not text at all.
    let reply = call(
        &app,
        post(
            "/api/v2/buildsets",
            r#"{"builders": ["ok"], "reason": "\ud800"}"#,
        )?,
    )
    .await?;
    refused(&reply, StatusCode::BAD_REQUEST, "body")?;
    for path in [
        "/api/v2/buildsets?reason=a%00b",
        "/api/v2/builds?state_string__contains=%00",
        "/api/v2/builders?name=%ED%A0%80",
    ] {
        let reply = call(&app, get(path)?).await?;
        ensure!(
            reply.status == StatusCode::BAD_REQUEST,
            "{path}: {}",
            reply.status
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_requests_are_the_queued_ones() -> Result<()> {
    let r = rig(ServerConfig::default()).await?;
    let app = router(r.state.clone());
    let done = r
        .engine
        .submit(&Submission::new("done").builder("ok"))
        .await?;
    guard("the buildset", r.engine.wait_buildset(done.buildset_id)).await??;
    let reply = call(&app, get("/api/v2/buildrequests?claimed=false")?).await?;
    ensure!(reply.json["buildrequests"] == json!([]), "{}", reply.json);
    let reply = call(&app, get("/api/v2/buildrequests?claimed=true")?).await?;
    ensure!(reply.json["meta"]["total"] == 1, "{}", reply.json);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_buildset_tree_is_cut_and_says_so() -> Result<()> {
    let r = rig(ServerConfig {
        max_tree_nodes: 50,
        ..ServerConfig::default()
    })
    .await?;
    let app = router(r.state.clone());
    r.engine
        .register_builder(
            BuilderConfig::new("wide").kwargs(json!({ "children": 200 })),
            FnExecutor::new(|ctx| async move {
                let names: Vec<&str> = (0..200).map(|_| "ok").collect();
                ctx.trigger(&names, Properties::new(), true, "")
                    .await
                    .map_err(|e| kiln_engine::JobError::new(e.to_string()))?;
                Ok(Outcome::success(json!(null)))
            }),
        )
        .await?;
    let wide = r
        .engine
        .submit(&Submission::new("wide").builder("wide"))
        .await?;
    guard("the wide tree", r.engine.wait_buildset(wide.buildset_id)).await??;
    let reply = call(
        &app,
        get(&format!("/api/v2/buildsets/{}/tree", wide.buildset_id))?,
    )
    .await?;
    ensure!(reply.status == StatusCode::OK, "{}", reply.json);
    ensure!(reply.json["truncated"] == true);
    let children = reply.json["tree"]["builds"][0]["children"]
        .as_array()
        .map(Vec::len)
        .unwrap_or_default();
    ensure!(children > 0 && children < 200, "{children} children shown");
    // A small tree is whole.
    let small = r
        .engine
        .submit(&Submission::new("small").builder("fan"))
        .await?;
    guard("the small tree", r.engine.wait_buildset(small.buildset_id)).await??;
    let reply = call(
        &app,
        get(&format!("/api/v2/buildsets/{}/tree", small.buildset_id))?,
    )
    .await?;
    ensure!(reply.json["truncated"] == false, "{}", reply.json);
    Ok(())
}

/// Serves the rig on a socket with `limits`; returns the address.
async fn listen(limits: ConnectionLimits) -> Result<(std::net::SocketAddr, Rig)> {
    let r = rig(ServerConfig {
        connections: limits,
        ..ServerConfig::default()
    })
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(kiln_server::serve(
        listener,
        r.state.clone(),
        std::future::pending(),
    ));
    Ok((address, r))
}

/// Reads what the server sends until it closes the connection.
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> Result<String> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await?;
    Ok(String::from_utf8_lossy(&all).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_after_the_header_timeout() -> Result<()> {
    let (address, _rig) = listen(ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    })
    .await?;
    // Connected, nothing sent.
    let mut idle = tokio::net::TcpStream::connect(address).await?;
    // Half a request head.
    let mut half = tokio::net::TcpStream::connect(address).await?;
    half.write_all(b"GET /api/v2/buildsets HTTP/1.1\r\nHost: x\r\n")
        .await?;
    // A whole request, then the connection left open (keep-alive).
    let mut kept = tokio::net::TcpStream::connect(address).await?;
    kept.write_all(b"GET /api/v2/masters HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    guard("the idle connection to close", read_to_close(&mut idle)).await??;
    guard("the half-sent request to close", read_to_close(&mut half)).await??;
    let answered = guard(
        "the kept-alive connection to close",
        read_to_close(&mut kept),
    )
    .await??;
    ensure!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_answered_503_and_the_api_stays_reachable() -> Result<()> {
    let (address, _rig) = listen(ConnectionLimits {
        max_connections: 4,
        ..ConnectionLimits::default()
    })
    .await?;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(address).await?;
        // A request makes sure the server has taken the connection in.
        s.write_all(b"GET /api/v2/masters HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut first = [0u8; 12];
        s.read_exact(&mut first).await?;
        held.push(s);
    }
    let mut over = tokio::net::TcpStream::connect(address).await?;
    let answer = guard("the refusal", read_to_close(&mut over)).await??;
    ensure!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    ensure!(
        answer.contains(r#"{"error":"too many connections"#),
        "{answer}"
    );
    // Freeing a connection makes room at once.
    drop(held.pop());
    guard("a connection to be accepted again", async {
        loop {
            let mut s = tokio::net::TcpStream::connect(address).await?;
            s.write_all(b"GET /api/v2/masters HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let answer = read_to_close(&mut s).await?;
            if answer.starts_with("HTTP/1.1 200") {
                return anyhow::Ok(());
            }
            tokio::task::yield_now().await;
        }
    })
    .await?
}
