//! Serving the router on a socket, with bounds on what a client controls: how many
//! connections are open, how long a request's head may take to arrive (which is also
//! how long an idle keep-alive connection stays open), and how large a request's URI,
//! headers and body may be. Every refusal is an answer with a JSON body.
//!
//! `axum::serve` has no timeouts and no connection cap: thousands of idle or half-sent
//! connections stayed open and held memory and file descriptors until the API was
//! unreachable. This loop owns the hyper connections instead, and stops them gracefully
//! when `shutdown` resolves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

use crate::AppState;
use crate::error::ApiError;

/// Connections open at once; past it a new connection is answered 503 and closed. A
/// dashboard opens a handful; a file descriptor limit of 1,024 leaves room for the
/// database and the plugins.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// How long a request's head (request line and headers) may take to arrive, counted
/// from the connection's start or the previous response: a half-sent request or an idle
/// keep-alive connection is closed after it.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request URI (path and query) accepted: 414 past it.
pub const DEFAULT_MAX_URI_BYTES: usize = 8 << 10;
/// The most header bytes (names and values) accepted: 431 past it.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 << 10;
/// The most headers accepted: 431 past it.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// The largest request body of a JSON write (a submit, a control action): 413 past it.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 << 20;
/// How long a graceful stop waits for open requests before it drops the connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// hyper's own hard limits sit above the server's, so that what the server refuses is
/// answered in JSON: the read buffer (beyond [`DEFAULT_MAX_HEADER_BYTES`]) and the
/// number of headers hyper parses (beyond [`DEFAULT_MAX_HEADERS`]). A request past
/// these hyper answers itself, with 431 and no body.
const HYPER_MAX_BUF_BYTES: usize = 1 << 20;
const HYPER_MAX_HEADERS: usize = 1_000;

/// The connection and request bounds of a server; each defaults to its constant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`DEFAULT_MAX_URI_BYTES`].
    pub max_uri_bytes: usize,
    /// See [`DEFAULT_MAX_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// See [`DEFAULT_MAX_HEADERS`].
    pub max_headers: usize,
    /// See [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_uri_bytes: DEFAULT_MAX_URI_BYTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// Serves Kiln's [`router`](crate::router) over `state` on `listener`, within the
/// state's [`ConnectionLimits`], until `shutdown` resolves; then ends the event streams,
/// lets open requests finish (at most [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let limits = state.config().connections.clone();
    let router = crate::router(state.clone());
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopped) = watch::channel(false);
    let (done, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many connections; refusing one");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stopped = stopped.clone();
        let done = done.clone();
        let timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(HYPER_MAX_BUF_BYTES)
                .max_headers(HYPER_MAX_HEADERS);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
            drop(done);
        });
    }
    // Open event streams would keep the graceful stop waiting for them forever.
    state.stop_streams();
    stop.send_replace(true);
    drop(done);
    // Every connection task holds a sender; recv() returns None when all have ended.
    if tokio::time::timeout(SHUTDOWN_GRACE, all_done.recv())
        .await
        .is_err()
    {
        warn!("open requests did not finish within the shutdown grace; dropping them");
    }
    Ok(())
}

/// Answers a connection over the cap with 503 and closes it, without reading it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let body = r#"{"error":"too many connections; try again shortly"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Refuses a request whose URI or headers are too large, before any handler runs.
pub(crate) async fn check_request(
    limits: axum::extract::State<Arc<ConnectionLimits>>,
    request: Request,
    next: Next,
) -> Response {
    let uri = request.uri();
    let uri_len = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    if uri_len > limits.max_uri_bytes {
        return ApiError::UriTooLong(format!(
            "the request URI has {uri_len} bytes, more than the {} allowed",
            limits.max_uri_bytes
        ))
        .into_response();
    }
    let headers = request.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > limits.max_headers || header_bytes > limits.max_header_bytes {
        return ApiError::HeadersTooLarge(format!(
            "the request has {} headers of {header_bytes} bytes, more than the {} headers or {} bytes allowed",
            headers.len(),
            limits.max_headers,
            limits.max_header_bytes
        ))
        .into_response();
    }
    next.run(request).await
}

/// Gives every error answer a JSON body: answers that the framework makes itself (a
/// body over the limit, a method the route does not take) come as plain text.
/// Logs every request at debug: method, path (without the query, which may carry a
/// token), status and time taken. `RUST_LOG=kiln_server=debug` shows them.
pub(crate) async fn log_requests(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    debug!(
        %method,
        path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    response
}

pub(crate) async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!("{reason}: {text}"),
        _ if text.is_empty() => reason,
        _ => text,
    };
    let body = serde_json::json!({ "error": message }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
