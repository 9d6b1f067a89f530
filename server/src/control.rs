//! The write endpoints: submitting buildsets, JSON-RPC control actions, plugin upload.
//! Every one needs the server's bearer token.
//!
//! Control actions are JSON-RPC 2.0 POSTs to the entity, answered with
//! `{"jsonrpc": "2.0", "result": ..., "id": ...}`; a refused action keeps its HTTP status
//! (400, 401, 404, 409) and answers with a JSON-RPC error object carrying the call's id,
//! `{"jsonrpc": "2.0", "error": {"code": ..., "message": "..."}, "id": ...}`:
//!
//! | entity | methods |
//! | --- | --- |
//! | `/buildrequests/{id}` | `cancel`, `set_priority {priority}` |
//! | `/buildsets/{id}` | `cancel`, `resubmit {all}`, `delete` |
//! | `/builds/{id}` | `stop`, `rebuild`, `delete` |
//! | `/builders/{builder}` | `pause`, `resume` |
//! | `/schedules/{name}` | `force` |

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use kiln_engine::Submission;
use kiln_engine::model::{BuildId, BuildsetId, Property, RequestId, SourceStamp};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ApiResult, RpcError};
use crate::json::id;
use crate::query::pairs;

/// Checks the bearer token.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(expected) = &state.config.token else {
        return Err(ApiError::Unauthorized(
            "this server takes no writes: it was started without a token (kiln serve --token)"
                .into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in full, without an early exit on the first differing byte.
    let matches = given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if matches {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(
            "a bearer token is needed: Authorization: Bearer <token>".into(),
        ))
    }
}

/// A property in a submission: a bare JSON value, or `[value, source]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum PropertyBody {
    WithSource(Value, String),
    Bare(Value),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    reason: Option<String>,
    builders: Vec<String>,
    #[serde(default)]
    properties: BTreeMap<String, PropertyBody>,
    #[serde(default)]
    sourcestamps: Vec<SourceStamp>,
    #[serde(default)]
    priority: i32,
    external_idstring: Option<String>,
    idempotency_key: Option<String>,
    /// A delayed run: not before this time (seconds since the epoch) ...
    not_before: Option<f64>,
    /// ... or this many seconds from now.
    delay: Option<f64>,
}

/// The header that makes a submit idempotent, as Stripe and the IETF draft spell it; the
/// body's `idempotency_key` says the same.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// A time given as seconds since the Unix epoch, as the API writes times.
fn epoch_seconds(field: &str, seconds: f64) -> ApiResult<kiln_engine::model::Timestamp> {
    let micros = seconds * 1e6;
    if !micros.is_finite() || micros.abs() > i64::MAX as f64 {
        return Err(ApiError::BadRequest(format!(
            "{field}: {seconds} is not a time in seconds since the epoch"
        )));
    }
    chrono::DateTime::from_timestamp_micros(micros as i64)
        .ok_or_else(|| ApiError::BadRequest(format!("{field}: {seconds} is out of range")))
}

fn body<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::BadRequest(format!("the request body is not what it should be: {e}"))
    })
}

/// `POST /buildsets`: submits a buildset; answers 201 with its id and requests.
pub async fn submit(
    State(s): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    authorize(&s, &headers)?;
    let b: SubmitBody = body(&bytes)?;
    if b.builders.is_empty() {
        return Err(ApiError::BadRequest(
            "builders: name at least one builder".into(),
        ));
    }
    let mut submission = Submission::new(
        b.reason
            .unwrap_or_else(|| "submitted through the API".into()),
    )
    .priority(b.priority);
    submission.builders = b.builders;
    submission.sourcestamps = b.sourcestamps;
    submission.external_idstring = b.external_idstring;
    submission.not_before = match (b.not_before, b.delay) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give not_before or delay, not both".into(),
            ));
        }
        (Some(at), None) => Some(epoch_seconds("not_before", at)?),
        (None, Some(delay)) => {
            if !delay.is_finite() || delay < 0.0 {
                return Err(ApiError::BadRequest(format!(
                    "delay: {delay} is not a number of seconds ≥ 0"
                )));
            }
            // Bounded by the engine's check of not_before; a huge delay saturates here.
            let micros = (delay * 1e6).min(i64::MAX as f64) as i64;
            Some(kiln_engine::model::now() + chrono::TimeDelta::microseconds(micros))
        }
        (None, None) => None,
    };
    let header_key = headers
        .get(IDEMPOTENCY_HEADER)
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::BadRequest("Idempotency-Key: not visible ASCII".into()))
        })
        .transpose()?;
    submission.idempotency_key = match (header_key, b.idempotency_key) {
        (Some(h), Some(k)) if h != k => {
            return Err(ApiError::BadRequest(
                "the Idempotency-Key header and the body's idempotency_key differ".into(),
            ));
        }
        (h, k) => h.or(k),
    };
    for (name, p) in b.properties {
        let property = match p {
            PropertyBody::WithSource(value, source) => Property::new(value, source),
            PropertyBody::Bare(value) => Property::new(value, "api"),
        };
        submission.properties.insert(name, property);
    }
    let submitted = s.engine.submit(&submission).await?;
    // 201 for a new buildset; 200 with `existing` for the one that holds the key.
    let status = if submitted.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(crate::json::submitted(&submitted))))
}

#[derive(Deserialize)]
struct Rpc {
    jsonrpc: Option<String>,
    method: String,
    #[serde(default)]
    params: Value,
    #[serde(default)]
    id: Value,
}

/// Reads a JSON-RPC call and checks the token and the query string; a refusal carries
/// the call's id when the body could be read that far.
fn call(
    state: &AppState,
    headers: &HeaderMap,
    raw: Option<&str>,
    bytes: &Bytes,
) -> Result<Rpc, RpcError> {
    let id = serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(Value::Null);
    let refuse = |error: ApiError| RpcError {
        id: id.clone(),
        error,
    };
    authorize(state, headers).map_err(refuse)?;
    no_query(raw).map_err(refuse)?;
    let call: Rpc = serde_json::from_slice(bytes).map_err(|e| {
        refuse(ApiError::BadRequest(format!(
            "the request body is not a JSON-RPC 2.0 call ({{\"jsonrpc\": \"2.0\", \"method\": ..., \"id\": ...}}): {e}"
        )))
    })?;
    if call.jsonrpc.as_deref().is_some_and(|v| v != "2.0") {
        return Err(refuse(ApiError::BadRequest(
            "jsonrpc must be \"2.0\"".into(),
        )));
    }
    Ok(call)
}

/// The answer to a call: its result, or its refusal as a JSON-RPC error.
fn answer(call: &Rpc, result: ApiResult<Value>) -> Result<Json<Value>, RpcError> {
    match result {
        Ok(result) => Ok(Json(
            json!({ "jsonrpc": "2.0", "result": result, "id": call.id }),
        )),
        Err(error) => Err(RpcError {
            id: call.id.clone(),
            error,
        }),
    }
}

fn unknown_method(call: &Rpc, known: &str) -> ApiError {
    ApiError::NoSuchMethod(format!(
        "unknown method {:?} (methods here: {known})",
        call.method
    ))
}

fn no_query(raw: Option<&str>) -> ApiResult<()> {
    match pairs(raw)?.first() {
        Some((k, _)) => Err(ApiError::BadRequest(format!(
            "{k:?}: control actions take no query parameters"
        ))),
        None => Ok(()),
    }
}

fn cancel_result(outcome: &kiln_engine::storage::CancelOutcome) -> Value {
    json!({
        "completed": outcome.completed.iter().map(|r| r.0).collect::<Vec<_>>(),
        "stopping": outcome.flagged.iter().map(|r| r.0).collect::<Vec<_>>(),
    })
}

/// `POST /buildrequests/{id}`: `cancel`, `set_priority {priority}`.
pub async fn request_rpc(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(rid): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Json<Value>, RpcError> {
    let call = call(&s, &headers, raw.as_deref(), &bytes)?;
    answer(&call, request_action(&s, &rid, &call).await)
}

async fn request_action(s: &AppState, rid: &str, call: &Rpc) -> ApiResult<Value> {
    let rid = RequestId(id("build request", rid)?);
    match call.method.as_str() {
        "cancel" => {
            let request = s.engine.client().request(rid).await?;
            if request.complete {
                return Err(ApiError::Conflict(format!(
                    "build request {rid} is already complete"
                )));
            }
            let outcome = s.engine.cancel_request(rid).await?;
            Ok(cancel_result(&outcome))
        }
        "set_priority" => {
            let priority = call
                .params
                .get("priority")
                .and_then(Value::as_i64)
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "set_priority needs params.priority, a whole number".into(),
                    )
                })?;
            s.engine.client().set_priority(rid, priority).await?;
            Ok(json!({ "priority": priority }))
        }
        _ => Err(unknown_method(call, "cancel, set_priority")),
    }
}

/// `POST /buildsets/{id}`: `cancel`, `resubmit {all}`, `delete` (a complete one, with
/// its builds and their result directories; 400 while incomplete).
pub async fn buildset_rpc(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bsid): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Json<Value>, RpcError> {
    let call = call(&s, &headers, raw.as_deref(), &bytes)?;
    answer(&call, buildset_action(&s, &bsid, &call).await)
}

async fn buildset_action(s: &AppState, bsid: &str, call: &Rpc) -> ApiResult<Value> {
    let bsid = BuildsetId(id("buildset", bsid)?);
    match call.method.as_str() {
        "cancel" => {
            let outcome = s.engine.cancel_buildset(bsid).await?;
            Ok(cancel_result(&outcome))
        }
        "resubmit" => {
            let all = call
                .params
                .get("all")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let submitted = s.engine.resubmit(bsid, all).await?;
            let brids: BTreeMap<&String, i64> =
                submitted.requests.iter().map(|(k, v)| (k, v.0)).collect();
            Ok(json!({ "bsid": submitted.buildset_id.0, "brids": brids }))
        }
        "delete" => {
            let gone = s.engine.delete_buildset(bsid).await?;
            Ok(json!({ "deleted_builds": gone.iter().map(|b| b.id.0).collect::<Vec<_>>() }))
        }
        _ => Err(unknown_method(call, "cancel, resubmit, delete")),
    }
}

/// `POST /builders/{builder}` (by id or name): `pause`, `resume`.
pub async fn builder_rpc(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Json<Value>, RpcError> {
    let call = call(&s, &headers, raw.as_deref(), &bytes)?;
    answer(&call, builder_action(&s, &key, &call).await)
}

async fn builder_action(s: &AppState, key: &str, call: &Rpc) -> ApiResult<Value> {
    let paused = match call.method.as_str() {
        "pause" => true,
        "resume" => false,
        _ => return Err(unknown_method(call, "pause, resume")),
    };
    let name = crate::api::find_builder(s, key).await?.name;
    let builder = s.engine.set_builder_paused(&name, paused).await?;
    Ok(json!({ "builderid": builder.id.0, "name": builder.name, "paused": builder.paused }))
}

/// `POST /schedules/{name}`: `force` (fire now).
pub async fn schedule_rpc(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Json<Value>, RpcError> {
    let call = call(&s, &headers, raw.as_deref(), &bytes)?;
    let result = match call.method.as_str() {
        "force" => s
            .engine
            .force_schedule(&name)
            .await
            .map_err(ApiError::from)
            .map(|submitted| {
                let brids: BTreeMap<&String, i64> =
                    submitted.requests.iter().map(|(k, v)| (k, v.0)).collect();
                json!({ "bsid": submitted.buildset_id.0, "brids": brids })
            }),
        _ => Err(unknown_method(&call, "force")),
    };
    answer(&call, result)
}

/// `POST /builds/{id}`: `stop`, `rebuild`, `delete` (a finished one).
pub async fn build_rpc(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bid): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Json<Value>, RpcError> {
    let call = call(&s, &headers, raw.as_deref(), &bytes)?;
    answer(&call, build_action(&s, &bid, &call).await)
}

async fn build_action(s: &AppState, bid: &str, call: &Rpc) -> ApiResult<Value> {
    let bid = BuildId(id("build", bid)?);
    match call.method.as_str() {
        "stop" => {
            let build = s.engine.client().build(bid).await?;
            if build.complete_at.is_some() {
                return Err(ApiError::Conflict(format!(
                    "build {bid} has already finished"
                )));
            }
            let outcome = s.engine.cancel_request(build.request_id).await?;
            Ok(cancel_result(&outcome))
        }
        "rebuild" => {
            let submitted = s.engine.rebuild(bid).await?;
            let brids: BTreeMap<&String, i64> =
                submitted.requests.iter().map(|(k, v)| (k, v.0)).collect();
            Ok(json!({ "bsid": submitted.buildset_id.0, "brids": brids }))
        }
        "delete" => {
            let gone = s.engine.delete_build(bid).await?;
            Ok(json!({ "deleted_builds": [gone.id.0] }))
        }
        _ => Err(unknown_method(call, "stop, rebuild, delete")),
    }
}

/// `POST /plugins?name=NAME` with the component as the body: checked against Kiln's
/// worlds, and kept in the plugins directory only if it fits one.
pub async fn upload_plugin(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    authorize(&s, &headers)?;
    let mut name = None;
    for (key, value) in pairs(raw.as_deref())? {
        match key.as_str() {
            "name" => name = Some(value),
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown parameter {key:?}: uploads take name"
                )));
            }
        }
    }
    let name = name.ok_or_else(|| ApiError::BadRequest("name the plugin: ?name=NAME".into()))?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ApiError::BadRequest(format!(
            "plugin name {name:?}: use 1 to 64 letters, digits, - and _"
        )));
    }
    let Some(dir) = s.config.plugins_dir.clone() else {
        return Err(ApiError::Conflict(
            "this server keeps no plugins: start it with --plugins-dir".into(),
        ));
    };
    if bytes.len() > s.config.max_plugin_bytes {
        return Err(ApiError::TooLarge(format!(
            "the plugin is {} bytes; at most {} are accepted",
            bytes.len(),
            s.config.max_plugin_bytes
        )));
    }
    let host = s.host.clone();
    let wasm = bytes.to_vec();
    let report = tokio::task::spawn_blocking(move || host.check(&wasm))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let Some(world) = report.world else {
        return Err(ApiError::BadRequest(format!(
            "not a Kiln plugin: {}",
            report.problems.join("; ")
        )));
    };
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
    let path = dir.join(format!("{name}.wasm"));
    tokio::fs::write(&path, &bytes)
        .await
        .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "name": name,
            "world": world,
            "package_versions": report.package_versions,
            "size": bytes.len(),
        })),
    ))
}
