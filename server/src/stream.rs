//! `GET /api/v2/events`: the engine's events as server-sent events in the API's
//! vocabulary (`crate::wire::StreamEvent`: `{"event": "build_finished", "buildid": 7,
//! "results": 0, ...}`), named by kind so that a browser's `EventSource` can listen to
//! the ones it wants, and numbered (`id:`) so that a client resumes after the last one it
//! saw (`Last-Event-ID`). Lifecycle events, log and progress updates of the builds this
//! server runs, reporter progress, master expiry. A client that falls behind, or
//! resumes after what the server still keeps, gets a `lagged` event and should re-read
//! what it shows.

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
    // Browsers' EventSource sends Last-Event-ID by itself when it reconnects; a client
    // that cannot set headers may say last_event_id in the query.
    let mut last: Option<u64> = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("Last-Event-ID must be an event's number".into())
                })?,
        ),
        None => None,
    };
    for (key, value) in pairs(raw.as_deref())? {
        match key.as_str() {
            // EventSource cannot send headers: private reads take the token here.
            "access_token" => {
                let bearer = format!("Bearer {value}");
                if let Ok(v) = bearer.parse() {
                    headers.insert(axum::http::header::AUTHORIZATION, v);
                }
            }
            "last_event_id" => {
                last = Some(value.parse().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "last_event_id={value:?}: expected an event's number"
                    ))
                })?);
            }
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown parameter {key:?}: the event stream takes access_token and last_event_id"
                )));
            }
        }
    }
    if s.config.private_reads {
        authorize(&s, &headers)?;
    }
    let resume = s.journal.resume(last);
    let mut seen = last.unwrap_or(0);
    if let Some(n) = resume.replay.last() {
        seen = n.id;
    }
    let gap = resume
        .gap
        .map(|missed| lagged(i64::try_from(missed).unwrap_or(i64::MAX)));
    let replay = resume.replay.into_iter().map(numbered);
    let head: Vec<SseEvent> = gap.into_iter().chain(replay).collect();
    let stopped = s.stopped();
    let live = futures_util::StreamExt::take_until(BroadcastStream::new(resume.live), stopped)
        .filter_map(move |item| match item {
            // Sent live and already replayed: skip.
            Ok(n) if n.id <= seen => None,
            Ok(n) => Some(numbered(n)),
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                Some(lagged(i64::try_from(n).unwrap_or(i64::MAX)))
            }
        });
    let stream = tokio_stream::iter(head).chain(live).map(Ok);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

fn numbered(n: crate::journal::Numbered) -> SseEvent {
    SseEvent::default()
        .id(n.id.to_string())
        .event(n.kind)
        .data(n.data)
}

fn lagged(missed: i64) -> SseEvent {
    let data = crate::json::value(crate::wire::StreamEvent::Lagged { missed });
    SseEvent::default().event("lagged").data(data.to_string())
}
