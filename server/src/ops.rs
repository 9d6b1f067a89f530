//! What operators' tooling scrapes and probes, outside the API prefix: `GET /metrics`
//! (OpenMetrics text, which Prometheus reads), `GET /healthz` (the process answers) and
//! `GET /readyz` (the database answers and this master is registered and active).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_engine::EngineError;
use kiln_engine::metrics::gauge;
use serde_json::json;

use crate::AppState;
use crate::api::authorize_read;
use crate::error::{ApiError, ApiResult};

/// The content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /healthz`: 200 while the process serves requests at all.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 when the database answers and this master is active, else 503
/// with the reason.
pub async fn readyz(State(s): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    match s.engine.ready().await {
        Ok(()) => Ok(Json(json!({
            "status": "ready",
            "masterid": s.engine.master_id().0,
        }))),
        Err(e @ EngineError::NotReady(_)) => Err(ApiError::Unavailable(e.to_string())),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            Err(ApiError::Unavailable(
                "not ready: the database did not answer".into(),
            ))
        }
    }
}

/// `GET /metrics`: the engine's metrics, the database's queue depths, masters and
/// outbox lag as read now, and the WASM host's sandboxes. Private when reads are.
pub async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    authorize_read(&s, &headers)?;
    let mut registry = s.engine.metrics().await?;
    let (live, max) = s.host.sandboxes();
    registry.register(
        "kiln_sandboxes_in_use",
        "WASM sandboxes alive now (jobs running or suspended, policies, reporters)",
        gauge(live as u64),
    );
    registry.register(
        "kiln_sandboxes_max",
        "WASM sandboxes the host's pool holds at most",
        gauge(u64::from(max)),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| ApiError::Internal(format!("encoding metrics: {e}")))?;
    let mut response = (StatusCode::OK, text).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
    Ok(response)
}
