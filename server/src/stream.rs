//! `GET /api/v2/events`: the engine's events as server-sent events, one JSON object per
//! event (`{"event": "build_finished", ...}`), named by kind so that a browser's
//! `EventSource` can listen to the ones it wants. Lifecycle events, log and progress
//! updates of the builds this server runs, reporter progress, master expiry. A client
//! that falls behind gets a `lagged` event and should re-read what it shows.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::AppState;
use crate::control::authorize;
use crate::error::{ApiError, ApiResult};
use crate::query::pairs;

/// How often an idle stream sends a comment, so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub async fn events(
    State(s): State<AppState>,
    mut headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult<Sse<impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>>>> {
    for (key, value) in pairs(raw.as_deref())? {
        match key.as_str() {
            // EventSource cannot send headers: private reads take the token here.
            "access_token" => {
                let bearer = format!("Bearer {value}");
                if let Ok(v) = bearer.parse() {
                    headers.insert(axum::http::header::AUTHORIZATION, v);
                }
            }
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown parameter {key:?}: the event stream takes only access_token"
                )));
            }
        }
    }
    if s.config.private_reads {
        authorize(&s, &headers)?;
    }
    let stopped = s.stopped();
    let events =
        futures_util::StreamExt::take_until(BroadcastStream::new(s.engine.subscribe()), stopped);
    let stream = events.map(|item| {
        Ok(match item {
            Ok(event) => {
                let value = serde_json::to_value(&event).unwrap_or_default();
                let kind = value
                    .get("event")
                    .and_then(|k| k.as_str())
                    .unwrap_or("event")
                    .to_owned();
                SseEvent::default().event(kind).data(value.to_string())
            }
            Err(BroadcastStreamRecvError::Lagged(n)) => SseEvent::default()
                .event("lagged")
                .data(format!("{{\"missed\":{n}}}")),
        })
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
