//! The HTTP API through the router, in process: every endpoint, the query syntax, the
//! errors, the token, control actions, uploads and the event stream. Tests wait on
//! engine events; timeouts only turn hangs into failures.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use kiln_engine::model::{LogLevel, Properties};
use kiln_engine::wasm::{WasmHost, WasmHostConfig};
use kiln_engine::{BuilderConfig, Engine, EngineConfig, Event, FnExecutor, Outcome};
use kiln_server::{AppState, ServerConfig, router};
use serde_json::{Value, json};
use tower::ServiceExt;

const TOKEN: &str = "sesame";
const GUARD: Duration = Duration::from_secs(60);

struct Server {
    app: Router,
    engine: Arc<Engine>,
    plugins: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

async fn server_with(config: impl FnOnce(&std::path::Path) -> ServerConfig) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let plugins = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let engine = Engine::open(
        EngineConfig::new(url)
            .master_name("api")
            .results_dir(dir.path().join("results")),
    )
    .await?;
    engine
        .register_builder(
            BuilderConfig::new("compile").description("compiles"),
            FnExecutor::new(|ctx| async move {
                ctx.log(LogLevel::Info, "compiling").await?;
                ctx.log(LogLevel::Warning, "a warning").await?;
                ctx.progress(&["compile"], 1, 2, "half").await?;
                ctx.set_property("version", json!("1.2"), "compile").await?;
                if let Some(dir) = ctx.result_dir() {
                    tokio::fs::write(dir.join("out.txt"), "built")
                        .await
                        .map_err(|e| kiln_engine::JobError::new(e.to_string()))?;
                }
                Ok(Outcome::success(json!({"binaries": 3})))
            }),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("wait"),
            FnExecutor::new(|ctx| async move {
                ctx.stopped().await;
                Ok(Outcome::success(json!(null)))
            }),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("parent"),
            FnExecutor::new(|ctx| async move {
                ctx.trigger(&["compile"], Properties::new(), true, "")
                    .await
                    .map_err(|e| kiln_engine::JobError::new(e.to_string()))?;
                Ok(Outcome::success(json!("done")))
            }),
        )
        .await?;
    let engine = Arc::new(engine);
    let host = Arc::new(WasmHost::new(WasmHostConfig {
        cache_dir: None,
        max_instances: 16,
    }));
    let state = AppState::new(engine.clone(), host, config(plugins.path()));
    Ok(Server {
        app: router(state),
        engine,
        plugins,
        _dir: dir,
    })
}

async fn server() -> Result<Server> {
    server_with(|plugins| ServerConfig {
        token: Some(TOKEN.into()),
        private_reads: false,
        plugins_dir: Some(plugins.to_path_buf()),
        ..ServerConfig::default()
    })
    .await
}

struct Reply {
    status: StatusCode,
    json: Value,
    text: String,
}

impl Server {
    async fn call(&self, request: Request<Body>) -> Result<Reply> {
        let response = self.app.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply { status, json, text })
    }

    async fn get(&self, path: &str) -> Result<Reply> {
        self.call(Request::get(path).body(Body::empty())?).await
    }

    async fn ok(&self, path: &str) -> Result<Value> {
        let r = self.get(path).await?;
        ensure!(
            r.status == StatusCode::OK,
            "GET {path}: {} {}",
            r.status,
            r.text
        );
        Ok(r.json)
    }

    async fn post(&self, path: &str, body: Value, token: Option<&str>) -> Result<Reply> {
        let mut request = Request::post(path).header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        self.call(request.body(Body::from(body.to_string()))?).await
    }

    async fn rpc(&self, path: &str, method: &str, params: Value) -> Result<Reply> {
        self.post(
            path,
            json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 7}),
            Some(TOKEN),
        )
        .await
    }

    /// Submits through the API and waits for the buildset to complete.
    async fn run(&self, builders: &[&str]) -> Result<i64> {
        let r = self
            .post(
                "/api/v2/buildsets",
                json!({"builders": builders}),
                Some(TOKEN),
            )
            .await?;
        ensure!(r.status == StatusCode::CREATED, "{}", r.text);
        let bsid = r.json["bsid"].as_i64().ok_or_else(|| anyhow!("no bsid"))?;
        tokio::time::timeout(
            GUARD,
            self.engine
                .wait_buildset(kiln_engine::model::BuildsetId(bsid)),
        )
        .await??;
        Ok(bsid)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_answer_in_buildbots_shape_with_the_total_before_paging() -> Result<()> {
    let s = server().await?;
    for _ in 0..3 {
        s.run(&["compile"]).await?;
    }
    let page = s
        .ok("/api/v2/buildsets?limit=2&offset=1&order=-bsid")
        .await?;
    ensure!(page["meta"]["total"] == 3, "{page}");
    let ids: Vec<i64> = page["buildsets"]
        .as_array()
        .ok_or_else(|| anyhow!("no list"))?
        .iter()
        .filter_map(|b| b["bsid"].as_i64())
        .collect();
    ensure!(ids == [2, 1], "{ids:?}");
    let b = &page["buildsets"][0];
    ensure!(b["complete"] == true && b["results"] == 0 && b["submitted_at"].is_f64());
    for collection in ["buildrequests", "builds", "builders", "masters"] {
        let all = s.ok(&format!("/api/v2/{collection}")).await?;
        ensure!(
            all["meta"]["total"].as_u64().is_some_and(|n| n >= 1),
            "{collection}: {all}"
        );
        ensure!(all[collection].is_array());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_operators_ordering_and_field_selection_run_in_the_query() -> Result<()> {
    let s = server().await?;
    for _ in 0..3 {
        s.run(&["compile"]).await?;
    }
    let some = s
        .ok("/api/v2/builds?number__gt=1&order=-number&field=number&field=results")
        .await?;
    ensure!(
        some["builds"] == json!([{"number": 3, "results": 0}, {"number": 2, "results": 0}]),
        "{some}"
    );
    ensure!(some["meta"]["total"] == 2);
    let any = s
        .ok("/api/v2/builds?number=1&number=3&field=number")
        .await?;
    ensure!(
        any["builds"] == json!([{"number": 1}, {"number": 3}]),
        "repeated values: any of"
    );
    let none = s
        .ok("/api/v2/builds?number__notin=1,2&field=number")
        .await?;
    ensure!(none["builds"] == json!([{"number": 3}]));
    let by_name = s.ok("/api/v2/builds?results=SUCCESS&complete=true").await?;
    ensure!(by_name["meta"]["total"] == 3);
    let contains = s
        .ok("/api/v2/builders?name__contains=omp&field=name")
        .await?;
    ensure!(contains["builders"] == json!([{"name": "compile"}]));
    let ne = s
        .ok("/api/v2/builders?name__ne=compile&order=name&field=name")
        .await?;
    ensure!(
        ne["builders"] == json!([{"name": "parent"}, {"name": "wait"}]),
        "{ne}"
    );
    let since = s
        .ok("/api/v2/buildsets?submitted_at__ge=0&submitted_at__lt=99999999999")
        .await?;
    ensure!(since["meta"]["total"] == 3);
    let reqs = s
        .ok("/api/v2/buildrequests?buildsetid=2&claimed=true")
        .await?;
    ensure!(reqs["meta"]["total"] == 1 && reqs["buildrequests"][0]["claimed_by_masterid"] == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_are_400_with_a_message_that_says_which_part() -> Result<()> {
    let s = server().await?;
    s.run(&["compile"]).await?;
    for (path, says) in [
        ("/api/v2/builds?colour=red", "no field \"colour\""),
        ("/api/v2/builds?number__like=1", "unknown operator \"like\""),
        ("/api/v2/builds?number=one", "not a whole number"),
        ("/api/v2/builds?results=GREAT", "not a result"),
        ("/api/v2/builds?complete=maybe", "is not a boolean"),
        ("/api/v2/builds?started_at__gt=yesterday", "not a time"),
        ("/api/v2/builds?state_string__lt=a", "does not apply"),
        ("/api/v2/builds?number__gt=null", "null can only"),
        (
            "/api/v2/builds?order=-colour",
            "cannot order builds by \"colour\"",
        ),
        ("/api/v2/builds?limit=0", "limit must be at least 1"),
        ("/api/v2/builds?field=colour", "no field \"colour\""),
        (
            "/api/v2/builds/1?number=1",
            "apply to collections, not to a single entity",
        ),
        ("/api/v2/builds/abc", "is not a number"),
        ("/api/v2/builds/1/logs?level=loud", "level=\"loud\""),
        ("/api/v2/builds/1/logs?tail=1", "unknown parameter \"tail\""),
    ] {
        let r = s.get(path).await?;
        ensure!(
            r.status == StatusCode::BAD_REQUEST,
            "{path}: {} {}",
            r.status,
            r.text
        );
        let error = r.json["error"].as_str().unwrap_or_default();
        ensure!(error.contains(says), "{path}: {error}");
    }
    for path in [
        "/api/v2/builds/99",
        "/api/v2/buildsets/99/tree",
        "/api/v2/builders/nope",
        "/api/v2/nothing",
    ] {
        let r = s.get(path).await?;
        ensure!(r.status == StatusCode::NOT_FOUND, "{path}: {}", r.status);
        ensure!(r.json["error"].is_string());
    }
    // Nothing internal reaches a client: no SQL, no paths.
    let r = s.get("/api/v2/builds?number=99999999999999999999").await?;
    ensure!(
        r.status == StatusCode::BAD_REQUEST
            && !r.text.contains("SELECT")
            && !r.text.contains("/tmp")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entity_and_sub_resource_reads_back() -> Result<()> {
    let s = server().await?;
    let r = s
        .post(
            "/api/v2/buildsets",
            json!({
                "reason": "release",
                "builders": ["parent"],
                "properties": {"channel": "stable", "owner": ["ops", "form"]},
                "sourcestamps": [{"codebase": "", "repository": "https://git.example/app", "branch": "main", "revision": "abc", "project": "app"}],
                "priority": 5,
                "external_idstring": "rel-1"
            }),
            Some(TOKEN),
        )
        .await?;
    ensure!(r.status == StatusCode::CREATED, "{}", r.text);
    let bsid = r.json["bsid"].as_i64().ok_or_else(|| anyhow!("no bsid"))?;
    tokio::time::timeout(
        GUARD,
        s.engine.wait_buildset(kiln_engine::model::BuildsetId(bsid)),
    )
    .await??;

    let bs = s.ok(&format!("/api/v2/buildsets/{bsid}")).await?;
    let b = &bs["buildsets"][0];
    ensure!(
        b["reason"] == "release" && b["external_idstring"] == "rel-1",
        "{bs}"
    );
    ensure!(b["properties"]["channel"] == json!(["stable", "api"]));
    ensure!(b["properties"]["owner"] == json!(["ops", "form"]));
    ensure!(b["sourcestamps"][0]["revision"] == "abc");
    let only = s
        .ok(&format!("/api/v2/buildsets/{bsid}?field=reason"))
        .await?;
    ensure!(only["buildsets"][0] == json!({"reason": "release"}));
    ensure!(
        s.ok(&format!("/api/v2/buildsets/{bsid}/properties"))
            .await?["properties"][0]["channel"][0]
            == "stable"
    );
    ensure!(
        s.ok(&format!("/api/v2/buildsets/{bsid}/sourcestamps"))
            .await?["meta"]["total"]
            == 1
    );
    let reqs = s
        .ok(&format!("/api/v2/buildsets/{bsid}/buildrequests"))
        .await?;
    ensure!(reqs["buildrequests"][0]["priority"] == 5);
    let rid = reqs["buildrequests"][0]["buildrequestid"]
        .as_i64()
        .unwrap_or_default();
    ensure!(
        s.ok(&format!("/api/v2/buildrequests/{rid}")).await?["buildrequests"][0]["complete"]
            == true
    );
    let parent_builds = s.ok(&format!("/api/v2/buildrequests/{rid}/builds")).await?;
    let parent_id = parent_builds["builds"][0]["buildid"]
        .as_i64()
        .unwrap_or_default();
    ensure!(s.ok(&format!("/api/v2/buildsets/{bsid}/builds")).await?["meta"]["total"] == 1);

    // The tree: parent -> the compile buildset it triggered.
    let tree = s.ok(&format!("/api/v2/buildsets/{bsid}/tree")).await?;
    let child = &tree["tree"]["builds"][0]["children"][0];
    ensure!(tree["tree"]["builds"][0]["builder"] == "parent", "{tree}");
    ensure!(
        child["parent_relationship"] == "triggers" && child["builds"][0]["builder"] == "compile"
    );
    let triggered = s
        .ok(&format!("/api/v2/builds/{parent_id}/triggered"))
        .await?;
    ensure!(triggered["meta"]["total"] == 1);
    let compile_id = child["builds"][0]["buildid"].as_i64().unwrap_or_default();

    let build = s.ok(&format!("/api/v2/builds/{compile_id}")).await?;
    let b = &build["builds"][0];
    ensure!(
        b["return_value"] == json!({"binaries": 3})
            && b["properties"]["version"] == json!(["1.2", "compile"])
    );
    let by_number = s.ok("/api/v2/builders/compile/builds/1").await?;
    ensure!(by_number["builds"][0]["buildid"] == compile_id);
    ensure!(
        s.ok(&format!("/api/v2/builds/{compile_id}/properties"))
            .await?["properties"][0]["version"][0]
            == "1.2"
    );
    let logs = s.ok(&format!("/api/v2/builds/{compile_id}/logs")).await?;
    ensure!(logs["meta"]["total"] == 2);
    let warnings = s
        .ok(&format!("/api/v2/builds/{compile_id}/logs?level=warning"))
        .await?;
    ensure!(
        warnings["logs"].as_array().map(Vec::len) == Some(1)
            && warnings["logs"][0]["message"] == "a warning"
    );
    let first = logs["logs"][0]["id"].as_i64().unwrap_or_default();
    let after = s
        .ok(&format!("/api/v2/builds/{compile_id}/logs?after={first}"))
        .await?;
    ensure!(
        after["meta"]["total"] == 1,
        "a live tail reads what came after"
    );
    let progress = s
        .ok(&format!("/api/v2/builds/{compile_id}/progress"))
        .await?;
    ensure!(
        progress["progress"][0]["children"][0]["current"] == 1,
        "{progress}"
    );
    let artifacts = s
        .ok(&format!("/api/v2/builds/{compile_id}/artifacts"))
        .await?;
    let url = artifacts["artifacts"][0]["url"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        artifacts["artifacts"][0]["path"] == "out.txt",
        "{artifacts}"
    );
    let file = s.get(&url).await?;
    ensure!(file.status == StatusCode::OK && file.text == "built");
    ensure!(
        s.get(&format!(
            "/api/v2/builds/{compile_id}/artifacts/../../etc/passwd"
        ))
        .await?
        .status
            == StatusCode::NOT_FOUND
    );

    let builder = s.ok("/api/v2/builders/compile").await?;
    ensure!(
        builder["builders"][0]["status"] == "success"
            && builder["builders"][0]["latest_successful_buildid"] == compile_id
    );
    let by_id = s.ok("/api/v2/builders/1").await?;
    ensure!(by_id["builders"][0]["name"] == "compile");
    ensure!(s.ok("/api/v2/builders/compile/builds").await?["meta"]["total"] == 1);
    let master = s.ok("/api/v2/masters/1").await?;
    ensure!(master["masters"][0]["name"] == "api" && master["masters"][0]["active"] == true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_and_reads_may_too() -> Result<()> {
    let s = server().await?;
    let none = s
        .post("/api/v2/buildsets", json!({"builders": ["compile"]}), None)
        .await?;
    ensure!(
        none.status == StatusCode::UNAUTHORIZED
            && none.json["error"]
                .as_str()
                .is_some_and(|e| e.contains("Bearer"))
    );
    let wrong = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["compile"]}),
            Some("guess"),
        )
        .await?;
    ensure!(wrong.status == StatusCode::UNAUTHORIZED);
    ensure!(
        s.get("/api/v2/builds").await?.status == StatusCode::OK,
        "reads are open by default"
    );

    let read_only = server_with(|_| ServerConfig::default()).await?;
    let r = read_only
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["compile"]}),
            Some(TOKEN),
        )
        .await?;
    ensure!(r.status == StatusCode::UNAUTHORIZED && r.text.contains("without a token"));

    let private = server_with(|_| ServerConfig {
        token: Some(TOKEN.into()),
        private_reads: true,
        plugins_dir: None,
        ..ServerConfig::default()
    })
    .await?;
    ensure!(private.get("/api/v2/builds").await?.status == StatusCode::UNAUTHORIZED);
    let authed = private
        .call(
            Request::get("/api/v2/builds")
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::empty())?,
        )
        .await?;
    ensure!(authed.status == StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_and_every_control_action_work_through_json_rpc() -> Result<()> {
    let s = server().await?;
    let mut events = s.engine.subscribe();
    let bad = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["nope"]}),
            Some(TOKEN),
        )
        .await?;
    ensure!(bad.status == StatusCode::BAD_REQUEST && bad.text.contains("unknown builder"));
    let typo = s
        .post(
            "/api/v2/buildsets",
            json!({"builder": ["compile"]}),
            Some(TOKEN),
        )
        .await?;
    ensure!(
        typo.status == StatusCode::BAD_REQUEST && typo.text.contains("unknown field `builder`")
    );

    // A waiting build: stop it through its build.
    let r = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["wait"]}),
            Some(TOKEN),
        )
        .await?;
    let bsid = r.json["bsid"].as_i64().unwrap_or_default();
    let build_id = tokio::time::timeout(GUARD, async {
        loop {
            if let Ok(Event::BuildStarted { build_id, .. }) = events.recv().await {
                return build_id.0;
            }
        }
    })
    .await?;
    let stopped = s
        .rpc(&format!("/api/v2/builds/{build_id}"), "stop", json!({}))
        .await?;
    ensure!(
        stopped.status == StatusCode::OK
            && stopped.json["jsonrpc"] == "2.0"
            && stopped.json["id"] == 7,
        "{}",
        stopped.text
    );
    tokio::time::timeout(
        GUARD,
        s.engine.wait_buildset(kiln_engine::model::BuildsetId(bsid)),
    )
    .await??;
    ensure!(s.ok(&format!("/api/v2/builds/{build_id}")).await?["builds"][0]["results"] == 6);
    let again = s
        .rpc(&format!("/api/v2/builds/{build_id}"), "stop", json!({}))
        .await?;
    ensure!(again.status == StatusCode::CONFLICT);

    // Rebuild it; resubmit its buildset (it was cancelled).
    let rebuilt = s
        .rpc(&format!("/api/v2/builds/{build_id}"), "rebuild", json!({}))
        .await?;
    ensure!(
        rebuilt.json["result"]["brids"]["wait"].is_i64(),
        "{}",
        rebuilt.text
    );
    let resubmitted = s
        .rpc(
            &format!("/api/v2/buildsets/{bsid}"),
            "resubmit",
            json!({"all": false}),
        )
        .await?;
    ensure!(
        resubmitted.json["result"]["brids"]["wait"].is_i64(),
        "{}",
        resubmitted.text
    );
    // The new buildset names the one it resubmits (Buildbot's field).
    let again = resubmitted.json["result"]["bsid"]
        .as_i64()
        .unwrap_or_default();
    let shown = s.ok(&format!("/api/v2/buildsets/{again}")).await?;
    ensure!(shown["buildsets"][0]["resubmitted_from"] == bsid, "{shown}");
    let filtered = s
        .ok(&format!(
            "/api/v2/buildsets?resubmitted_from={bsid}&field=bsid"
        ))
        .await?;
    ensure!(
        filtered["buildsets"] == json!([{"bsid": again}]),
        "{filtered}"
    );

    // Cancel a buildset, and a request.
    let rb = rebuilt.json["result"]["bsid"].as_i64().unwrap_or_default();
    let cancel = s
        .rpc(&format!("/api/v2/buildsets/{rb}"), "cancel", json!({}))
        .await?;
    ensure!(cancel.status == StatusCode::OK, "{}", cancel.text);
    let rid = resubmitted.json["result"]["brids"]["wait"]
        .as_i64()
        .unwrap_or_default();
    let cancelled = s
        .rpc(&format!("/api/v2/buildrequests/{rid}"), "cancel", json!({}))
        .await?;
    ensure!(cancelled.status == StatusCode::OK, "{}", cancelled.text);

    let unknown = s
        .rpc(
            &format!("/api/v2/buildrequests/{rid}"),
            "explode",
            json!({}),
        )
        .await?;
    ensure!(
        unknown.status == StatusCode::BAD_REQUEST && unknown.text.contains("cancel, set_priority")
    );
    // A refusal is a JSON-RPC error object that carries the call's id.
    ensure!(
        unknown.json["jsonrpc"] == "2.0"
            && unknown.json["id"] == 7
            && unknown.json["error"]["code"] == -32601
            && unknown.json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("explode")),
        "{}",
        unknown.text
    );
    let no_params = s
        .rpc(
            &format!("/api/v2/buildrequests/{rid}"),
            "set_priority",
            json!({}),
        )
        .await?;
    ensure!(
        no_params.status == StatusCode::BAD_REQUEST && no_params.json["error"]["code"] == -32602
    );
    let missing = s.rpc("/api/v2/buildsets/999", "cancel", json!({})).await?;
    ensure!(
        missing.status == StatusCode::NOT_FOUND
            && missing.json["id"] == 7
            && missing.json["error"]["code"] == -32004,
        "{}",
        missing.text
    );
    let anonymous = s
        .post(
            &format!("/api/v2/buildrequests/{rid}"),
            json!({"jsonrpc": "2.0", "method": "cancel", "id": "mine"}),
            None,
        )
        .await?;
    ensure!(
        anonymous.status == StatusCode::UNAUTHORIZED
            && anonymous.json["id"] == "mine"
            && anonymous.json["error"]["code"] == -32001,
        "{}",
        anonymous.text
    );
    let garbled = s
        .post(
            &format!("/api/v2/buildrequests/{rid}"),
            json!([1, 2]),
            Some(TOKEN),
        )
        .await?;
    ensure!(
        garbled.status == StatusCode::BAD_REQUEST && garbled.json["id"].is_null(),
        "{}",
        garbled.text
    );

    // set_priority on an open request changes the order.
    let queued = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["wait"]}),
            Some(TOKEN),
        )
        .await?;
    let queued_rid = queued.json["brids"]["wait"].as_i64().unwrap_or_default();
    let set = s
        .rpc(
            &format!("/api/v2/buildrequests/{queued_rid}"),
            "set_priority",
            json!({"priority": 42}),
        )
        .await?;
    ensure!(
        set.status == StatusCode::OK && set.json["result"]["priority"] == 42,
        "{}",
        set.text
    );
    ensure!(
        s.ok(&format!("/api/v2/buildrequests/{queued_rid}")).await?["buildrequests"][0]["priority"]
            == 42
    );
    s.rpc(
        &format!("/api/v2/buildrequests/{queued_rid}"),
        "cancel",
        json!({}),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_plugin_is_checked_against_its_world_before_it_is_kept() -> Result<()> {
    let s = server().await?;
    let upload = |name: &str, bytes: &[u8]| {
        Request::post(format!("/api/v2/plugins?name={name}"))
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::from(bytes.to_vec()))
    };
    let echo = kiln_bundled::get("echo").ok_or_else(|| anyhow!("no echo"))?;
    let ok = s.call(upload("my-echo", echo)?).await?;
    ensure!(
        ok.status == StatusCode::CREATED && ok.json["world"] == "job",
        "{}",
        ok.text
    );
    ensure!(s.plugins.path().join("my-echo.wasm").exists());
    let policy = kiln_bundled::get("fail-fast").ok_or_else(|| anyhow!("no fail-fast"))?;
    ensure!(s.call(upload("ff", policy)?).await?.json["world"] == "policy");
    let bad = s.call(upload("text", b"not wasm at all")?).await?;
    ensure!(
        bad.status == StatusCode::BAD_REQUEST && bad.text.contains("not WebAssembly"),
        "{}",
        bad.text
    );
    let command = kiln_bundled::get("not-a-job").ok_or_else(|| anyhow!("no not-a-job"))?;
    let refused = s.call(upload("cmd", command)?).await?;
    ensure!(refused.status == StatusCode::BAD_REQUEST && refused.text.contains("does not export"));
    ensure!(
        !s.plugins.path().join("text.wasm").exists() && !s.plugins.path().join("cmd.wasm").exists()
    );
    let name = s.call(upload("../evil", echo)?).await?;
    ensure!(name.status == StatusCode::BAD_REQUEST);
    Ok(())
}

/// What an event stream's body carries until `needle` appears (or the stream ends).
async fn read_events_until(body: &mut Body, needle: &str) -> Result<String> {
    let mut seen = String::new();
    tokio::time::timeout(GUARD, async {
        while !seen.contains(needle) {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        seen.push_str(&String::from_utf8_lossy(data));
                    }
                }
                _ => break,
            }
        }
    })
    .await?;
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_carries_lifecycle_log_and_progress_events() -> Result<()> {
    let s = server().await?;
    let response = s
        .app
        .clone()
        .oneshot(Request::get("/api/v2/events").body(Body::empty())?)
        .await?;
    ensure!(response.status() == StatusCode::OK);
    ensure!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()?
            .starts_with("text/event-stream")
    );
    let mut body = response.into_body();
    s.post(
        "/api/v2/buildsets",
        json!({"builders": ["compile"]}),
        Some(TOKEN),
    )
    .await?;
    let seen = read_events_until(&mut body, "event: buildset_complete").await?;
    for kind in [
        "buildset_submitted",
        "build_started",
        "build_log",
        "build_progress",
        "build_finished",
        "buildset_complete",
    ] {
        ensure!(
            seen.contains(&format!("event: {kind}")),
            "no {kind} in:\n{seen}"
        );
    }
    ensure!(seen.contains("\"event\":\"build_finished\""));
    // The API's vocabulary: buildid and bsid, results as numbers; every event numbered.
    ensure!(
        seen.contains("\"buildid\":")
            && seen.contains("\"bsid\":")
            && seen.contains("\"results\":0"),
        "{seen}"
    );
    ensure!(
        !seen.contains("build_id") && !seen.contains("buildset_id"),
        "{seen}"
    );
    let ids: Vec<u64> = seen
        .lines()
        .filter_map(|l| l.strip_prefix("id: ")?.trim().parse().ok())
        .collect();
    ensure!(
        !ids.is_empty() && ids.windows(2).all(|w| w[0] < w[1]),
        "{ids:?}"
    );

    // Resumed after the first event: everything after it comes again, in order, and
    // nothing before it.
    let first = ids[0];
    let resumed = s
        .app
        .clone()
        .oneshot(
            Request::get("/api/v2/events")
                .header("Last-Event-ID", first.to_string())
                .body(Body::empty())?,
        )
        .await?;
    let mut body = resumed.into_body();
    let again = read_events_until(&mut body, "event: buildset_complete").await?;
    let replayed: Vec<u64> = again
        .lines()
        .filter_map(|l| l.strip_prefix("id: ")?.trim().parse().ok())
        .collect();
    ensure!(
        replayed.first() == Some(&(first + 1)) && !replayed.contains(&first),
        "{replayed:?} after {first}"
    );
    let bad = s.get("/api/v2/events?since=1").await?;
    ensure!(bad.status == StatusCode::BAD_REQUEST);
    let bad = s.get("/api/v2/events?last_event_id=x").await?;
    ensure!(bad.status == StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route() -> Result<()> {
    let s = server().await?;
    let doc = s.ok("/api/v2/openapi.json").await?;
    ensure!(doc["openapi"] == "3.1.0");
    let paths = doc["paths"]
        .as_object()
        .ok_or_else(|| anyhow!("no paths"))?;
    for path in [
        "/buildsets",
        "/buildsets/{id}",
        "/buildsets/{id}/tree",
        "/buildrequests/{id}",
        "/builds/{id}/logs",
        "/builds/{id}/artifacts/{path}",
        "/builders/{builder}/builds/{number}",
        "/masters",
        "/plugins",
        "/events",
    ] {
        ensure!(paths.contains_key(path), "{path} is not documented");
    }
    // Every path parameter of every operation is declared (POSTs too).
    for (path, item) in paths {
        let names: Vec<&str> = path
            .split('/')
            .filter_map(|p| p.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (verb, op) in item.as_object().into_iter().flatten() {
            for name in &names {
                ensure!(
                    op["parameters"].as_array().is_some_and(|ps| ps
                        .iter()
                        .any(|p| p["in"] == "path" && p["name"] == *name)),
                    "{verb} {path} does not declare its path parameter {name}"
                );
            }
        }
    }
    ensure!(paths["/builders/{builder}"]["post"].is_object());
    ensure!(
        doc["paths"]["/builds"]["get"]["parameters"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["name"] == "number"))
    );
    let page = s.get("/").await?;
    ensure!(page.status == StatusCode::OK && page.text.contains("<title>Kiln"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_is_paused_and_resumed_through_json_rpc_and_shows_it() -> Result<()> {
    let s = server().await?;
    let paused = s
        .rpc("/api/v2/builders/compile", "pause", json!({}))
        .await?;
    ensure!(paused.status == StatusCode::OK, "{}", paused.text);
    ensure!(paused.json["result"]["paused"] == true && paused.json["id"] == 7);
    let submitted = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["compile"]}),
            Some(TOKEN),
        )
        .await?;
    let bsid = submitted.json["bsid"]
        .as_i64()
        .ok_or_else(|| anyhow!("no bsid"))?;
    ensure!(s.ok("/api/v2/builders/compile").await?["builders"][0]["paused"] == true);
    // Buildbot's boolean spellings select it, in any case.
    for spelling in ["on", "true", "YES", "1"] {
        let page = s
            .ok(&format!("/api/v2/builders?paused={spelling}&field=name"))
            .await?;
        ensure!(
            page["builders"] == json!([{"name": "compile"}]),
            "{spelling}: {page}"
        );
    }
    let off = s
        .ok("/api/v2/builders?paused=off&field=name&order=name")
        .await?;
    ensure!(off["meta"]["total"] == 2, "{off}");
    let bad = s.get("/api/v2/builders?paused=maybe").await?;
    ensure!(bad.status == StatusCode::BAD_REQUEST && bad.text.contains("on/off"));
    // By id as well as by name; an unknown method names the ones there are.
    let id = s.ok("/api/v2/builders/compile").await?["builders"][0]["builderid"].clone();
    let resumed = s
        .rpc(&format!("/api/v2/builders/{id}"), "resume", json!({}))
        .await?;
    ensure!(
        resumed.json["result"]["paused"] == false,
        "{}",
        resumed.text
    );
    tokio::time::timeout(
        GUARD,
        s.engine.wait_buildset(kiln_engine::model::BuildsetId(bsid)),
    )
    .await??;
    let unknown = s.rpc("/api/v2/builders/compile", "stop", json!({})).await?;
    ensure!(unknown.status == StatusCode::BAD_REQUEST && unknown.text.contains("pause, resume"));
    let missing = s.rpc("/api/v2/builders/nobody", "pause", json!({})).await?;
    ensure!(missing.status == StatusCode::NOT_FOUND, "{}", missing.text);
    let anonymous = s
        .post(
            "/api/v2/builders/compile",
            json!({"jsonrpc": "2.0", "method": "pause", "id": 1}),
            None,
        )
        .await?;
    ensure!(anonymous.status == StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_with_an_idempotency_key_is_made_once_and_answered_with_the_same_buildset()
-> Result<()> {
    let s = server().await?;
    let keyed = |key: &str, body: Value| {
        Request::post("/api/v2/buildsets")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header("Idempotency-Key", key)
            .body(Body::from(body.to_string()))
    };
    let first = s.call(keyed("abc", json!({"builders": ["wait"]}))?).await?;
    ensure!(first.status == StatusCode::CREATED && first.json["existing"] == false);
    let second = s
        .call(keyed("abc", json!({"builders": ["compile"]}))?)
        .await?;
    ensure!(second.status == StatusCode::OK, "{}", second.text);
    ensure!(second.json["existing"] == true && second.json["bsid"] == first.json["bsid"]);
    ensure!(
        second.json["brids"] == first.json["brids"],
        "{}",
        second.text
    );
    // The body's key is the same key.
    let body = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["wait"], "idempotency_key": "abc"}),
            Some(TOKEN),
        )
        .await?;
    ensure!(body.status == StatusCode::OK && body.json["bsid"] == first.json["bsid"]);
    let differ = s
        .call(keyed(
            "abc",
            json!({"builders": ["wait"], "idempotency_key": "xyz"}),
        )?)
        .await?;
    ensure!(differ.status == StatusCode::BAD_REQUEST && differ.text.contains("differ"));
    let long = "k".repeat(300);
    let too_long = s.call(keyed(&long, json!({"builders": ["wait"]}))?).await?;
    ensure!(
        too_long.status == StatusCode::BAD_REQUEST,
        "{}",
        too_long.text
    );
    let total = s.ok("/api/v2/buildsets?limit=1").await?;
    ensure!(total["meta"]["total"] == 1, "{total}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer_probes_and_metrics_follow_private_reads() -> Result<()>
{
    let s = server().await?;
    s.run(&["compile"]).await?;
    let health = s.get("/healthz").await?;
    ensure!(health.status == StatusCode::OK && health.json["status"] == "ok");
    let ready = s.get("/readyz").await?;
    ensure!(
        ready.status == StatusCode::OK && ready.json["status"] == "ready",
        "{}",
        ready.text
    );
    let response = s
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty())?)
        .await?;
    ensure!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()?
            .starts_with("application/openmetrics-text")
    );
    let metrics = s.get("/metrics").await?;
    for line in [
        r#"kiln_builds_finished_total{builder="compile",result="SUCCESS"} 1"#,
        "kiln_masters_alive 1",
        "kiln_sandboxes_max 16",
    ] {
        ensure!(
            metrics.text.lines().any(|l| l == line),
            "no {line:?} in {}",
            metrics.text
        );
    }
    // A master that is no longer active is not ready.
    s.engine.shutdown().await;
    let gone = s.get("/readyz").await?;
    ensure!(
        gone.status == StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        gone.text
    );
    ensure!(gone.text.contains("not active"), "{}", gone.text);

    let private = server_with(|plugins| ServerConfig {
        token: Some(TOKEN.into()),
        private_reads: true,
        plugins_dir: Some(plugins.to_path_buf()),
        ..ServerConfig::default()
    })
    .await?;
    ensure!(private.get("/metrics").await?.status == StatusCode::UNAUTHORIZED);
    ensure!(private.get("/healthz").await?.status == StatusCode::OK);
    let scraped = private
        .call(
            Request::get("/metrics")
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::empty())?,
        )
        .await?;
    ensure!(scraped.status == StatusCode::OK && scraped.text.ends_with("# EOF\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_submit_is_scheduled_and_bad_delays_are_refused() -> Result<()> {
    let s = server().await?;
    let r = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["compile"], "delay": 3600}),
            Some(TOKEN),
        )
        .await?;
    ensure!(r.status == StatusCode::CREATED, "{}", r.text);
    let bsid = r.json["bsid"].as_i64().ok_or_else(|| anyhow!("no bsid"))?;
    let requests = s
        .ok(&format!("/api/v2/buildsets/{bsid}/buildrequests"))
        .await?;
    let not_before = requests["buildrequests"][0]["not_before"]
        .as_f64()
        .ok_or_else(|| anyhow!("{requests}"))?;
    let now = chrono::Utc::now().timestamp() as f64;
    ensure!(
        (now + 3500.0..now + 3700.0).contains(&not_before),
        "{not_before}"
    );
    ensure!(requests["buildrequests"][0]["claimed"] == false);
    let scheduled = s
        .ok(&format!(
            "/api/v2/buildrequests?not_before__gt={now}&field=buildrequestid"
        ))
        .await?;
    ensure!(scheduled["meta"]["total"] == 1, "{scheduled}");
    for (body, why) in [
        (json!({"builders": ["compile"], "delay": -1}), "delay"),
        (
            json!({"builders": ["compile"], "delay": 1, "not_before": now}),
            "not both",
        ),
        (
            json!({"builders": ["compile"], "not_before": now + 1e9}),
            "not_before",
        ),
        (
            json!({"builders": ["compile"], "not_before": 1e300}),
            "not_before",
        ),
    ] {
        let refused = s
            .post("/api/v2/buildsets", body.clone(), Some(TOKEN))
            .await?;
        ensure!(
            refused.status == StatusCode::BAD_REQUEST && refused.text.contains(why),
            "{body}: {} {}",
            refused.status,
            refused.text
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_list_with_their_next_fire_and_fire_on_demand() -> Result<()> {
    let s = server().await?;
    s.engine
        .register_schedule(kiln_engine::ScheduleConfig::cron(
            "nightly",
            "0 2 * * *",
            "Europe/Rome",
            kiln_engine::Submission::new("nightly").builder("compile"),
        ))
        .await?;
    let all = s.ok("/api/v2/schedules").await?;
    ensure!(all["meta"]["total"] == 1, "{all}");
    let one = &all["schedules"][0];
    ensure!(
        one["name"] == "nightly" && one["builders"] == json!(["compile"]),
        "{one}"
    );
    ensure!(one["timing"]["cron"]["timezone"] == "Europe/Rome", "{one}");
    ensure!(
        one["next_fire"]
            .as_f64()
            .is_some_and(|t| t > chrono::Utc::now().timestamp() as f64)
    );
    ensure!(
        s.ok("/api/v2/schedules/nightly?field=fires").await?["schedules"][0] == json!({"fires": 0})
    );
    let fired = s
        .rpc("/api/v2/schedules/nightly", "force", json!({}))
        .await?;
    ensure!(fired.status == StatusCode::OK, "{}", fired.text);
    let bsid = fired.json["result"]["bsid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{}", fired.text))?;
    let props = s
        .ok(&format!("/api/v2/buildsets/{bsid}/properties"))
        .await?;
    ensure!(props.to_string().contains("forced"), "{props}");
    ensure!(s.get("/api/v2/schedules/nobody").await?.status == StatusCode::NOT_FOUND);
    ensure!(
        s.rpc("/api/v2/schedules/nobody", "force", json!({}))
            .await?
            .status
            == StatusCode::NOT_FOUND
    );
    let unknown = s
        .rpc("/api/v2/schedules/nightly", "pause", json!({}))
        .await?;
    ensure!(unknown.status == StatusCode::BAD_REQUEST && unknown.text.contains("force"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_work_is_deleted_through_json_rpc_and_running_work_is_refused() -> Result<()> {
    let s = server().await?;
    let bsid = s.run(&["compile"]).await?;
    let builds = s.ok(&format!("/api/v2/buildsets/{bsid}/builds")).await?;
    let bid = builds["builds"][0]["buildid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{builds}"))?;
    let deleted = s
        .rpc(&format!("/api/v2/buildsets/{bsid}"), "delete", json!({}))
        .await?;
    ensure!(deleted.status == StatusCode::OK, "{}", deleted.text);
    ensure!(
        deleted.json["result"]["deleted_builds"] == json!([bid]),
        "{}",
        deleted.text
    );
    ensure!(s.get(&format!("/api/v2/builds/{bid}")).await?.status == StatusCode::NOT_FOUND);
    let again = s
        .rpc(&format!("/api/v2/buildsets/{bsid}"), "delete", json!({}))
        .await?;
    ensure!(again.status == StatusCode::NOT_FOUND, "{}", again.text);
    // A running build and its open buildset are refused.
    let running = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["wait"]}),
            Some(TOKEN),
        )
        .await?;
    let open = running.json["bsid"]
        .as_i64()
        .ok_or_else(|| anyhow!("no bsid"))?;
    let refused = s
        .rpc(&format!("/api/v2/buildsets/{open}"), "delete", json!({}))
        .await?;
    ensure!(
        refused.status == StatusCode::BAD_REQUEST && refused.text.contains("cancel"),
        "{}",
        refused.text
    );
    // A finished build alone.
    let other = s.run(&["compile"]).await?;
    let builds = s.ok(&format!("/api/v2/buildsets/{other}/builds")).await?;
    let one = builds["builds"][0]["buildid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{builds}"))?;
    let gone = s
        .rpc(&format!("/api/v2/builds/{one}"), "delete", json!({}))
        .await?;
    ensure!(
        gone.json["result"]["deleted_builds"] == json!([one]),
        "{}",
        gone.text
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sourcestamps_a_builders_requests_and_the_previous_successful_build_read_as_buildbot_does()
-> Result<()> {
    let s = server().await?;
    let stamp = json!({"codebase": "", "repository": "https://git/x", "branch": "main", "revision": "r1", "project": "p"});
    let mut bsids = Vec::new();
    for _ in 0..2 {
        let r = s
            .post(
                "/api/v2/buildsets",
                json!({"builders": ["compile"], "sourcestamps": [stamp.clone()]}),
                Some(TOKEN),
            )
            .await?;
        let bsid = r.json["bsid"]
            .as_i64()
            .ok_or_else(|| anyhow!("{}", r.text))?;
        tokio::time::timeout(
            GUARD,
            s.engine.wait_buildset(kiln_engine::model::BuildsetId(bsid)),
        )
        .await??;
        bsids.push(bsid);
    }
    // Identical stamps are stored once, with an id.
    let stamps = s.ok("/api/v2/sourcestamps").await?;
    ensure!(stamps["meta"]["total"] == 1, "{stamps}");
    let ssid = stamps["sourcestamps"][0]["ssid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{stamps}"))?;
    let one = s.ok(&format!("/api/v2/sourcestamps/{ssid}")).await?;
    ensure!(one["sourcestamps"][0]["revision"] == "r1", "{one}");
    ensure!(s.get("/api/v2/sourcestamps/999999").await?.status == StatusCode::NOT_FOUND);
    ensure!(s.get("/api/v2/sourcestamps?limit=0").await?.status == StatusCode::BAD_REQUEST);
    ensure!(s.get("/api/v2/sourcestamps?colour=red").await?.status == StatusCode::BAD_REQUEST);
    // A builder's requests, by name or id, filtered like /buildrequests.
    let requests = s
        .ok("/api/v2/builders/compile/buildrequests?complete=true")
        .await?;
    ensure!(requests["meta"]["total"] == 2, "{requests}");
    ensure!(s.get("/api/v2/builders/nobody/buildrequests").await?.status == StatusCode::NOT_FOUND);
    // The second build's previous successful build is the first.
    let builds = s.ok("/api/v2/builders/compile/builds?order=number").await?;
    let first = builds["builds"][0]["buildid"].clone();
    let second = builds["builds"][1]["buildid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{builds}"))?;
    let previous = s
        .ok(&format!(
            "/api/v2/builds/{second}/previous_successful_build"
        ))
        .await?;
    ensure!(previous["builds"][0]["buildid"] == first, "{previous}");
    let none = s
        .ok(&format!("/api/v2/builds/{first}/previous_successful_build"))
        .await?;
    ensure!(none["meta"]["total"] == 0, "{none}");
    // Buildbot's property= selection adds the named properties to each build.
    let with = s
        .ok("/api/v2/builds?property=version&property=nothing&field=buildid&field=properties")
        .await?;
    ensure!(with["meta"]["total"] == 2, "{with}");
    ensure!(
        with["builds"][0]["properties"] == json!({"version": ["1.2", "compile"]}),
        "{with}"
    );
    let all = s.ok("/api/v2/builds?property=*&limit=1").await?;
    ensure!(
        all["builds"][0]["properties"]["version"][0] == "1.2",
        "{all}"
    );
    let plain = s.ok("/api/v2/builds?limit=1").await?;
    ensure!(plain["builds"][0].get("properties").is_none(), "{plain}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_list_with_their_holders_users_and_waiting_requests() -> Result<()> {
    let s = server().await?;
    s.engine.define_lock("deploy", 2).await?;
    let empty = s.ok("/api/v2/locks").await?;
    ensure!(empty["meta"]["total"] == 1, "{empty}");
    let one = &empty["locks"][0];
    ensure!(
        one["name"] == "deploy" && one["count"] == 2 && one["held"] == 0 && one["waiting"] == 0,
        "{one}"
    );
    ensure!(
        one["holders"] == json!([]) && one["users"] == json!([]),
        "{one}"
    );
    ensure!(
        s.ok("/api/v2/locks?field=name&field=count").await?["locks"][0]
            == json!({"name": "deploy", "count": 2})
    );
    ensure!(s.get("/api/v2/locks?field=nope").await?.status == StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildsets_say_whether_they_run_and_a_build_log_downloads_as_text() -> Result<()> {
    let s = server().await?;
    let bsid = s.run(&["compile"]).await?;
    let one = s.ok(&format!("/api/v2/buildsets/{bsid}")).await?;
    ensure!(one["buildsets"][0]["state"] == "complete", "{one}");
    // Delayed an hour: incomplete, yet nothing of it runs.
    let later = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["compile"], "delay": 3600}),
            Some(TOKEN),
        )
        .await?;
    let queued = later.json["bsid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{}", later.text))?;
    let listed = s.ok("/api/v2/buildsets?complete=false").await?;
    let row = listed["buildsets"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["bsid"] == queued).cloned())
        .ok_or_else(|| anyhow!("{listed}"))?;
    ensure!(row["state"] == "queued", "{row}");

    let builds = s.ok(&format!("/api/v2/buildsets/{bsid}/builds")).await?;
    let bid = builds["builds"][0]["buildid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{builds}"))?;
    let logs = s.ok(&format!("/api/v2/builds/{bid}/logs")).await?;
    let raw = s.get(&format!("/api/v2/builds/{bid}/log.txt")).await?;
    ensure!(raw.status == StatusCode::OK, "{}", raw.text);
    let records = logs["logs"].as_array().map(Vec::len).unwrap_or_default();
    ensure!(
        raw.text.lines().count() == records,
        "{} lines for {records} records: {}",
        raw.text.lines().count(),
        raw.text
    );
    ensure!(s.get("/api/v2/builds/999999/log.txt").await?.status == StatusCode::NOT_FOUND);
    Ok(())
}

/// The OpenAPI document is valid for a real validator (openapi-spec-validator), and
/// real answers of every JSON operation match the schemas it declares for them
/// (openapi-schema-validator): the wire types and the document cannot drift. Without
/// Python's validators the test says how to get them and passes; `.ci/run` installs
/// them and sets KILN_OPENAPI_TESTS=1, which makes them required.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_validates_and_real_answers_match_its_schemas() -> Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi/validate.py");
    let have = std::process::Command::new("python3")
        .args([
            "-c",
            "import openapi_spec_validator, openapi_schema_validator",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        if std::env::var("KILN_OPENAPI_TESTS").is_ok_and(|v| v == "1") {
            anyhow::bail!(
                "KILN_OPENAPI_TESTS=1 but the validators are missing: pip install -r server/tests/openapi/requirements.txt"
            );
        }
        eprintln!(
            "skipping the OpenAPI validation; to run it: pip install -r server/tests/openapi/requirements.txt"
        );
        return Ok(());
    }
    let s = server().await?;
    s.engine.define_lock("deploy", 2).await?;
    s.engine
        .register_schedule(kiln_engine::ScheduleConfig::cron(
            "nightly",
            "0 2 * * *",
            "Europe/Rome",
            kiln_engine::Submission::new("nightly").builder("compile"),
        ))
        .await?;
    let submitted = s
        .post(
            "/api/v2/buildsets",
            json!({"builders": ["compile"], "properties": {"version": "1.2"},
                   "sourcestamps": [{"repository": "https://git.example/app", "branch": "main"}]}),
            Some(TOKEN),
        )
        .await?;
    let bsid = submitted.json["bsid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{}", submitted.text))?;
    s.run(&["compile"]).await?;
    tokio::time::timeout(
        GUARD,
        s.engine.wait_buildset(kiln_engine::model::BuildsetId(bsid)),
    )
    .await??;
    let builds = s.ok(&format!("/api/v2/buildsets/{bsid}/builds")).await?;
    let bid = builds["builds"][0]["buildid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{builds}"))?;
    let brid = builds["builds"][0]["buildrequestid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{builds}"))?;
    let number = builds["builds"][0]["number"].clone();
    let masterid = builds["builds"][0]["masterid"].clone();
    let mut answers = vec![json!({
        "template": "/buildsets", "path": "/buildsets", "method": "post", "status": "201",
        "body": submitted.json,
    })];
    let gets = [
        ("/buildsets", "/buildsets".to_owned()),
        ("/buildsets/{id}", format!("/buildsets/{bsid}")),
        (
            "/buildsets/{id}/properties",
            format!("/buildsets/{bsid}/properties"),
        ),
        (
            "/buildsets/{id}/sourcestamps",
            format!("/buildsets/{bsid}/sourcestamps"),
        ),
        (
            "/buildsets/{id}/buildrequests",
            format!("/buildsets/{bsid}/buildrequests"),
        ),
        (
            "/buildsets/{id}/builds",
            format!("/buildsets/{bsid}/builds"),
        ),
        ("/buildsets/{id}/tree", format!("/buildsets/{bsid}/tree")),
        ("/sourcestamps", "/sourcestamps".to_owned()),
        ("/sourcestamps/{id}", "/sourcestamps/1".to_owned()),
        ("/buildrequests", "/buildrequests".to_owned()),
        ("/buildrequests/{id}", format!("/buildrequests/{brid}")),
        (
            "/buildrequests/{id}/builds",
            format!("/buildrequests/{brid}/builds"),
        ),
        ("/builds", "/builds".to_owned()),
        ("/builds/{id}", format!("/builds/{bid}")),
        (
            "/builds/{id}/properties",
            format!("/builds/{bid}/properties"),
        ),
        ("/builds/{id}/logs", format!("/builds/{bid}/logs")),
        ("/builds/{id}/progress", format!("/builds/{bid}/progress")),
        ("/builds/{id}/artifacts", format!("/builds/{bid}/artifacts")),
        ("/builds/{id}/triggered", format!("/builds/{bid}/triggered")),
        (
            "/builds/{id}/previous_successful_build",
            format!("/builds/{bid}/previous_successful_build"),
        ),
        ("/builders", "/builders".to_owned()),
        ("/builders/{builder}", "/builders/compile".to_owned()),
        (
            "/builders/{builder}/builds",
            "/builders/compile/builds".to_owned(),
        ),
        (
            "/builders/{builder}/buildrequests",
            "/builders/compile/buildrequests".to_owned(),
        ),
        (
            "/builders/{builder}/builds/{number}",
            format!("/builders/compile/builds/{number}"),
        ),
        ("/schedules", "/schedules".to_owned()),
        ("/schedules/{name}", "/schedules/nightly".to_owned()),
        ("/locks", "/locks".to_owned()),
        ("/reporters", "/reporters".to_owned()),
        ("/masters", "/masters".to_owned()),
        ("/masters/{id}", format!("/masters/{masterid}")),
    ];
    for (template, path) in &gets {
        let body = s.ok(&format!("/api/v2{path}")).await?;
        answers.push(json!({"template": template, "path": path, "method": "get", "status": "200", "body": body}));
    }
    let missing = s.get("/api/v2/builds/999999").await?;
    ensure!(missing.status == StatusCode::NOT_FOUND);
    answers.push(json!({"template": "/builds/{id}", "path": "/builds/999999", "method": "get", "status": "404", "body": missing.json}));
    let rpc = s
        .rpc(
            &format!("/api/v2/buildrequests/{brid}"),
            "cancel",
            json!({}),
        )
        .await?;
    answers.push(json!({
        "template": "/buildrequests/{id}", "path": format!("/buildrequests/{brid}"),
        "method": "post", "status": rpc.status.as_u16().to_string(), "body": rpc.json,
    }));

    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("openapi.json");
    let answers_file = dir.path().join("answers.json");
    std::fs::write(&spec, s.ok("/api/v2/openapi.json").await?.to_string())?;
    std::fs::write(&answers_file, Value::from(answers).to_string())?;
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&spec)
        .arg(&answers_file)
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{said}");
    ensure!(
        said.contains("the document is valid; 34 answers checked, 0 mismatches"),
        "{said}"
    );
    Ok(())
}
