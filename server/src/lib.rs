//! Kiln's HTTP edge: the data API under `/api/v2` in Buildbot's shape, a live event
//! stream, the OpenAPI document, and the dashboard at `/`.
//!
//! [`router`] builds the whole service over a running [`Engine`]; `kiln serve` binds it
//! to a socket and tests drive it in process. This crate is the only place that knows
//! the HTTP wire formats.
//!
//! Layout: [`query`] reads Buildbot query strings into storage queries; `json` renders
//! entities; `api` holds the read endpoints, `control` the writes (submit and JSON-RPC
//! actions, plugin upload), `stream` the server-sent events, `openapi` the document,
//! `ops` the operators' `/metrics`, `/healthz` and `/readyz`, and `dashboard` the static
//! page.

mod api;
mod control;
mod dashboard;
mod error;
mod journal;
pub mod json;
mod openapi;
mod ops;
pub mod query;
mod serve;
mod stream;
pub mod wire;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use kiln_engine::Engine;
use kiln_engine::wasm::WasmHost;

pub use error::ApiError;
pub use serve::{
    ConnectionLimits, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS, DEFAULT_MAX_URI_BYTES, SHUTDOWN_GRACE, serve,
};

/// The API's version prefix.
pub const PREFIX: &str = "/api/v2";
/// The items one collection request returns when it asks for no `limit` (Buildbot's
/// dashboards ask for pages of a few hundred).
pub const DEFAULT_PAGE: u32 = 200;
/// The most items one collection request may ask for (`limit`): past it, 400. Larger
/// collections are read page by page with `offset`.
pub const MAX_PAGE: u32 = 1_000;
/// The most nodes (buildsets and builds) `/buildsets/{id}/tree` returns; a larger tree
/// is cut there and says so (`"truncated": true`).
pub const MAX_TREE_NODES: usize = 5_000;
/// How many of the latest events the event stream keeps for clients that resume
/// (`Last-Event-ID`): a browser that lost its connection for a few seconds on a busy
/// server finds what it missed; one gone longer is told to re-read (`lagged`).
pub const REPLAY_EVENTS: usize = 4_096;
/// The most bytes one raw log download (`/builds/{id}/log.txt`) carries: a sandboxed
/// build writes at most 4 MiB of log by default, a Rust job may write more; past this
/// the text ends with a line saying it was cut.
pub const MAX_RAW_LOG_BYTES: usize = 64 << 20;
/// The most log records one `/builds/{id}/logs` request returns (`limit`): past it,
/// 400; a live tail reads on with `after`.
pub const MAX_LOG_RECORDS: u32 = 10_000;
/// The largest plugin upload accepted.
pub const MAX_PLUGIN_BYTES: usize = 64 << 20;

/// How the server treats its clients. Every bound defaults to its constant.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The bearer token writes need. Without one, writes are refused.
    pub token: Option<String>,
    /// Whether reads need the token too.
    pub private_reads: bool,
    /// Where uploaded plugins are kept (`<dir>/<name>.wasm`). Without one, uploads are
    /// refused.
    pub plugins_dir: Option<PathBuf>,
    /// See [`DEFAULT_PAGE`].
    pub default_page: u32,
    /// See [`MAX_PAGE`].
    pub max_page: u32,
    /// See [`MAX_TREE_NODES`].
    pub max_tree_nodes: usize,
    /// See [`MAX_LOG_RECORDS`].
    pub max_log_records: u32,
    /// See [`MAX_PLUGIN_BYTES`].
    pub max_plugin_bytes: usize,
    /// See [`MAX_RAW_LOG_BYTES`].
    pub max_raw_log_bytes: usize,
    /// See [`REPLAY_EVENTS`].
    pub replay_events: usize,
    /// Connections, timeouts and request sizes.
    pub connections: ConnectionLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            token: None,
            private_reads: false,
            plugins_dir: None,
            default_page: DEFAULT_PAGE,
            max_page: MAX_PAGE,
            max_tree_nodes: MAX_TREE_NODES,
            max_log_records: MAX_LOG_RECORDS,
            max_plugin_bytes: MAX_PLUGIN_BYTES,
            max_raw_log_bytes: MAX_RAW_LOG_BYTES,
            replay_events: REPLAY_EVENTS,
            connections: ConnectionLimits::default(),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) engine: Arc<Engine>,
    pub(crate) host: Arc<WasmHost>,
    pub(crate) config: Arc<ServerConfig>,
    /// Set when the server stops: event streams end, so that a graceful shutdown does
    /// not wait for browsers that would otherwise listen forever.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// The event stream's numbered events, for clients that resume.
    pub(crate) journal: Arc<journal::Journal>,
}

impl AppState {
    /// State over a running engine and the WASM host that checks uploaded plugins.
    pub fn new(engine: Arc<Engine>, host: Arc<WasmHost>, config: ServerConfig) -> Self {
        let journal = journal::Journal::start(&engine, config.replay_events);
        AppState {
            engine,
            host,
            config: Arc::new(config),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
            journal,
        }
    }

    /// How the server treats its clients.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// How collections are paged.
    pub(crate) fn paging(&self) -> query::Paging {
        query::Paging {
            default: self.config.default_page,
            max: self.config.max_page,
        }
    }

    /// Ends every open event stream; call it when a graceful shutdown begins.
    pub fn stop_streams(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves when [`AppState::stop_streams`] is called.
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

/// The whole service: the API under [`PREFIX`], the event stream, the OpenAPI document
/// and the dashboard.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/buildsets", get(api::buildsets).post(control::submit))
        .route(
            "/buildsets/{id}",
            get(api::buildset).post(control::buildset_rpc),
        )
        .route("/buildsets/{id}/properties", get(api::buildset_properties))
        .route(
            "/buildsets/{id}/sourcestamps",
            get(api::buildset_sourcestamps),
        )
        .route("/buildsets/{id}/buildrequests", get(api::buildset_requests))
        .route("/buildsets/{id}/builds", get(api::buildset_builds))
        .route("/buildsets/{id}/tree", get(api::buildset_tree))
        .route("/sourcestamps", get(api::sourcestamps))
        .route("/sourcestamps/{id}", get(api::sourcestamp))
        .route("/buildrequests", get(api::requests))
        .route(
            "/buildrequests/{id}",
            get(api::request).post(control::request_rpc),
        )
        .route("/buildrequests/{id}/builds", get(api::request_builds))
        .route("/builds", get(api::builds))
        .route("/builds/{id}", get(api::build).post(control::build_rpc))
        .route("/builds/{id}/properties", get(api::build_properties))
        .route("/builds/{id}/logs", get(api::build_logs))
        .route("/builds/{id}/log.txt", get(api::build_log_text))
        .route("/builds/{id}/progress", get(api::build_progress))
        .route("/builds/{id}/artifacts", get(api::build_artifacts))
        .route(
            "/builds/{id}/artifacts/{*path}",
            get(api::build_artifact_file),
        )
        .route("/builds/{id}/triggered", get(api::build_triggered))
        .route(
            "/builds/{id}/previous_successful_build",
            get(api::build_previous_successful),
        )
        .route("/builders", get(api::builders))
        .route(
            "/builders/{builder}",
            get(api::builder).post(control::builder_rpc),
        )
        .route("/builders/{builder}/builds", get(api::builder_builds))
        .route(
            "/builders/{builder}/buildrequests",
            get(api::builder_requests),
        )
        .route(
            "/builders/{builder}/builds/{number}",
            get(api::builder_build),
        )
        .route("/schedules", get(api::schedules))
        .route("/locks", get(api::locks))
        .route("/reporters", get(api::reporters))
        .route(
            "/schedules/{name}",
            get(api::schedule).post(control::schedule_rpc),
        )
        .route("/masters", get(api::masters))
        .route("/masters/{id}", get(api::master))
        .route(
            "/plugins",
            post(control::upload_plugin)
                .layer(DefaultBodyLimit::max(state.config.max_plugin_bytes)),
        )
        .route("/events", get(stream::events))
        .route("/openapi.json", get(openapi::document))
        .fallback(api::not_found);
    let limits = Arc::new(state.config.connections.clone());
    Router::new()
        .nest(PREFIX, api)
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/", get(dashboard::index))
        .route("/app.js", get(dashboard::script))
        .route("/app.css", get(dashboard::style))
        .with_state(state)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn(serve::json_errors))
        .layer(axum::middleware::from_fn(serve::log_requests))
        .layer(axum::middleware::from_fn_with_state(
            limits,
            serve::check_request,
        ))
}
