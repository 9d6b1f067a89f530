//! The API's wire types: what every handler serialises, and, through `utoipa`'s
//! `ToSchema`, what the OpenAPI document says it serialises — one definition, so the two
//! cannot drift. Buildbot's spelling throughout (`bsid`, `buildrequestid`, `builderid`,
//! ...); times are seconds since the Unix epoch (with microseconds); results are
//! Buildbot's numbers.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// A buildset: one submission, with a request per builder.
#[derive(Debug, Serialize, ToSchema)]
pub struct Buildset {
    /// Its id.
    pub bsid: i64,
    /// Why it was submitted.
    pub reason: String,
    /// The submitter's own id for it.
    pub external_idstring: Option<String>,
    /// When it was submitted (seconds since the epoch).
    pub submitted_at: f64,
    /// Whether every request of it completed.
    pub complete: bool,
    /// When it completed.
    pub complete_at: Option<f64>,
    /// The worst result of its requests: SUCCESS 0, WARNINGS 1, FAILURE 2, SKIPPED 3,
    /// EXCEPTION 4, RETRY 5, CANCELLED 6.
    pub results: Option<i64>,
    /// The build that triggered it.
    pub parent_buildid: Option<i64>,
    /// Under which relationship its parent waits for it.
    pub parent_relationship: Option<String>,
    /// The build it rebuilds.
    pub rebuilt_buildid: Option<i64>,
    /// The buildset it resubmits.
    pub resubmitted_from: Option<i64>,
    /// `complete`, `running` (a master holds one of its requests) or `queued`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<BuildsetState>,
    /// Its sourcestamps (one buildset only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sourcestamps: Option<Vec<SourceStamp>>,
    /// Its properties (one buildset only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<Properties>,
}

/// Where a buildset is.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildsetState {
    /// Every request completed.
    Complete,
    /// A master holds one of its requests.
    Running,
    /// Nothing of it runs yet: waiting for a master, a delay or a paused builder.
    Queued,
}

/// Properties: name → [value, source].
#[derive(Debug, Default, Serialize, ToSchema)]
#[schema(value_type = BTreeMap<String, Vec<Value>>)]
pub struct Properties(pub BTreeMap<String, (Value, String)>);

/// A sourcestamp: what a build builds.
#[derive(Debug, Serialize, ToSchema)]
pub struct SourceStamp {
    /// Its id, where it is read by id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssid: Option<i64>,
    /// The codebase of a multi-repository project.
    pub codebase: String,
    /// The repository.
    pub repository: String,
    /// The branch.
    pub branch: Option<String>,
    /// The revision.
    pub revision: Option<String>,
    /// The project.
    pub project: String,
    /// Buildbot's patch (Kiln stores none), where it is read by id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<Value>,
}

/// A build request: one builder's part of a buildset.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildRequest {
    /// Its id.
    pub buildrequestid: i64,
    /// Its buildset.
    pub buildsetid: i64,
    /// Its builder.
    pub builderid: i64,
    /// Higher runs first (-1000..=1000).
    pub priority: i64,
    /// When it was submitted.
    pub submitted_at: f64,
    /// Whether a parent waits for it.
    pub waited_for: bool,
    /// Whether it completed.
    pub complete: bool,
    /// When it completed.
    pub complete_at: Option<f64>,
    /// Its result (Buildbot's number).
    pub results: Option<i64>,
    /// Whether a master holds it.
    pub claimed: bool,
    /// The master holding it.
    pub claimed_by_masterid: Option<i64>,
    /// When it was claimed.
    pub claimed_at: Option<f64>,
    /// Whether somebody asked to cancel it.
    pub cancel_requested: bool,
    /// Not claimable before this time (a delayed run or a retry's backoff).
    pub not_before: Option<f64>,
    /// The newer request that superseded it (collapsing builders).
    pub superseded_by: Option<i64>,
}

/// A build: one run of a request.
#[derive(Debug, Serialize, ToSchema)]
pub struct Build {
    /// Its id.
    pub buildid: i64,
    /// Its number on its builder.
    pub number: i64,
    /// Its builder.
    pub builderid: i64,
    /// Its request.
    pub buildrequestid: i64,
    /// The master that ran it.
    pub masterid: i64,
    /// The worker slot it ran in.
    pub workerslot: Option<i64>,
    /// When it started.
    pub started_at: f64,
    /// Whether it finished.
    pub complete: bool,
    /// When it finished.
    pub complete_at: Option<f64>,
    /// What it says it does.
    pub state_string: String,
    /// How long its request waited for its locks.
    pub locks_duration_s: f64,
    /// Its result (Buildbot's number).
    pub results: Option<i64>,
    /// What the job returned (any JSON).
    pub return_value: Option<Value>,
    /// Why it failed.
    pub error: Option<String>,
    /// Where it failed.
    pub traceback: Option<String>,
    /// Its properties (one build only, or with `property=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<Properties>,
}

/// A builder's status, as jobcontrol shows it.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuilderStatus {
    /// A build of it runs now.
    Building,
    /// No build of it has finished.
    NotBuilt,
    /// Its latest finished build failed.
    Failed,
    /// Its latest finished build succeeded.
    Success,
    /// It succeeded, but a dependency succeeded more recently.
    Outdated,
}

/// A builder.
#[derive(Debug, Serialize, ToSchema)]
pub struct Builder {
    /// Its id.
    pub builderid: i64,
    /// Its name.
    pub name: String,
    /// What it does.
    pub description: Option<String>,
    /// The builders it depends on.
    pub depends_on: Vec<String>,
    /// Whether it is paused.
    pub paused: bool,
    /// Whether an active master runs it.
    pub served: bool,
    /// Its status.
    pub status: BuilderStatus,
    /// Its latest successful build.
    pub latest_successful_buildid: Option<i64>,
}

/// A master: one engine process.
#[derive(Debug, Serialize, ToSchema)]
pub struct Master {
    /// Its id.
    pub masterid: i64,
    /// Its name.
    pub name: String,
    /// False once it shut down or was expired.
    pub active: bool,
    /// Its last heartbeat.
    pub last_active: f64,
}

/// A schedule with its last and next fire.
#[derive(Debug, Serialize, ToSchema)]
pub struct Schedule {
    /// Its name.
    pub name: String,
    /// `{"every": {"seconds": N}}` or `{"cron": {"pattern", "timezone"}}`.
    pub timing: Value,
    /// The builders each fire submits.
    pub builders: Vec<String>,
    /// What missed ticks do: one, none or all.
    pub catch_up: Value,
    /// Whether a tick fires only when something changed.
    pub only_if_changed: Value,
    /// The whole definition its engine stored.
    pub definition: Value,
    /// The latest tick fired or passed over.
    pub last_fire: f64,
    /// When it fires next.
    pub next_fire: Option<f64>,
    /// The buildset its latest fire made.
    pub last_bsid: Option<i64>,
    /// How many buildsets it made.
    pub fires: i64,
}

/// A lock with what holds and waits for it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Lock {
    /// Its name.
    pub name: String,
    /// Its units (1: exclusive).
    pub count: i64,
    /// Units held now.
    pub held: i64,
    /// The running builds that hold it.
    pub holders: Vec<LockHolder>,
    /// The builders that take it.
    pub users: Vec<LockUser>,
    /// Queued requests waiting for it (counted up to 10,000).
    pub waiting: i64,
}

/// A running build's hold on a lock.
#[derive(Debug, Serialize, ToSchema)]
pub struct LockHolder {
    /// The build.
    pub buildid: i64,
    /// Its master.
    pub masterid: i64,
    /// The units it holds.
    pub units: i64,
    /// Since when.
    pub acquired_at: f64,
}

/// A builder that takes a lock.
#[derive(Debug, Serialize, ToSchema)]
pub struct LockUser {
    /// The builder.
    pub builderid: i64,
    /// Its name.
    pub name: String,
    /// The units each of its builds takes.
    pub units: i64,
}

/// One log record of a build.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogRecord {
    /// Its id: read on after it with `after`.
    pub id: i64,
    /// When it was written.
    pub at: f64,
    /// debug, info, warning, error or critical.
    pub level: String,
    /// The message.
    pub message: String,
    /// Structured fields (any JSON object).
    pub fields: Value,
}

/// An error: what was wrong, in words.
#[derive(Debug, Serialize, ToSchema)]
pub struct Error {
    /// What was wrong.
    pub error: String,
}

/// What a submit made.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubmitReply {
    /// The buildset.
    pub bsid: i64,
    /// Its requests by builder name.
    pub brids: BTreeMap<String, i64>,
    /// Whether the buildset held the idempotency key already (nothing was added).
    pub existing: bool,
    /// Builders no active master runs: their requests wait until one starts.
    pub unserved: Vec<String>,
}

/// A JSON-RPC 2.0 answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct RpcReply {
    /// Always "2.0".
    pub jsonrpc: String,
    /// What the method did.
    pub result: Value,
    /// The request's id.
    pub id: Value,
}

/// Collection and entity answers: `{"<plural>": [...], "meta": {"total": N}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Meta {
    /// Every match before paging (1 for one entity).
    pub total: i64,
}

/// A file a build left in its result directory.
#[derive(Debug, Serialize, ToSchema)]
pub struct Artifact {
    /// Its path under the result directory.
    pub path: String,
    /// Its size in bytes.
    pub size: i64,
    /// Where to download it.
    pub url: String,
}

/// A refused JSON-RPC call.
#[derive(Debug, Serialize, ToSchema)]
pub struct RpcError {
    /// Always "2.0".
    pub jsonrpc: String,
    /// What was wrong.
    pub error: RpcErrorDetail,
    /// The request's id.
    pub id: Value,
}

/// JSON-RPC's error object.
#[derive(Debug, Serialize, ToSchema)]
pub struct RpcErrorDetail {
    /// -32600 bad request, -32601 unknown method, -32602 bad params, -32001 no token,
    /// -32004 not found, -32009 conflict, -32003 unavailable.
    pub code: i64,
    /// What was wrong, in words.
    pub message: String,
}

/// One event of `/api/v2/events`, in the API's vocabulary: the SSE event's name is
/// `event`, its `id:` a number to resume after (`Last-Event-ID`), its data this object.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StreamEvent {
    /// A buildset was submitted through this server's engine.
    BuildsetSubmitted {
        /// The buildset.
        bsid: i64,
        /// Its reason.
        reason: String,
        /// Its requests by builder name.
        brids: BTreeMap<String, i64>,
    },
    /// A build started.
    BuildStarted {
        /// The build.
        buildid: i64,
        /// Its number on its builder.
        number: i64,
        /// The builder's name.
        builder: String,
        /// Its request.
        buildrequestid: i64,
        /// Its buildset.
        bsid: i64,
    },
    /// A build finished.
    BuildFinished {
        /// The build.
        buildid: i64,
        /// Its number on its builder.
        number: i64,
        /// The builder's name.
        builder: String,
        /// Its request.
        buildrequestid: i64,
        /// Its buildset.
        bsid: i64,
        /// Its result (Buildbot's number).
        results: i64,
    },
    /// A request completed without a build.
    RequestCompleted {
        /// The request.
        buildrequestid: i64,
        /// Its result.
        results: i64,
    },
    /// A buildset completed.
    BuildsetComplete {
        /// The buildset.
        bsid: i64,
        /// The worst result of its requests.
        results: i64,
    },
    /// A running build wrote log records.
    BuildLog {
        /// The build.
        buildid: i64,
        /// How many.
        records: i64,
    },
    /// A running build reported progress or changed its state string.
    BuildProgress {
        /// The build.
        buildid: i64,
    },
    /// A reporter's delivery moved on.
    ReporterProgress {
        /// The reporter.
        reporter: String,
        /// The last outbox seq it dealt with.
        cursor: i64,
        /// Events delivered since the last progress event.
        delivered: i64,
        /// Events given up on since then.
        dropped: i64,
        /// The latest delivery error.
        last_error: Option<String>,
    },
    /// Events every reporter had dealt with were deleted from the outbox.
    OutboxPruned {
        /// How many.
        events: i64,
    },
    /// A silent master was expired; its requests went back to the queue.
    MasterExpired {
        /// The master.
        masterid: i64,
        /// Its name.
        name: String,
        /// The requests released.
        brids: Vec<i64>,
    },
    /// The client missed events (it fell behind, or resumed after what the server still
    /// holds): re-read what it shows.
    Lagged {
        /// How many it missed, where known.
        missed: i64,
    },
}

impl StreamEvent {
    /// Its name on the wire: the SSE event's name and the `event` field of its data.
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::BuildsetSubmitted { .. } => "buildset_submitted",
            StreamEvent::BuildStarted { .. } => "build_started",
            StreamEvent::BuildFinished { .. } => "build_finished",
            StreamEvent::RequestCompleted { .. } => "request_completed",
            StreamEvent::BuildsetComplete { .. } => "buildset_complete",
            StreamEvent::BuildLog { .. } => "build_log",
            StreamEvent::BuildProgress { .. } => "build_progress",
            StreamEvent::ReporterProgress { .. } => "reporter_progress",
            StreamEvent::OutboxPruned { .. } => "outbox_pruned",
            StreamEvent::MasterExpired { .. } => "master_expired",
            StreamEvent::Lagged { .. } => "lagged",
        }
    }
}

/// A reporter's delivery, as `kiln list reporters` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reporter {
    /// Its configured name.
    pub name: String,
    /// The last outbox seq it dealt with.
    pub cursor: i64,
    /// The master delivering its events, while it holds the lease.
    pub masterid: Option<i64>,
    /// Until when that lease runs.
    pub lease_until: Option<f64>,
    /// Failed attempts at the event after the cursor.
    pub attempts: i64,
    /// The last delivery error.
    pub last_error: Option<String>,
    /// Events delivered so far.
    pub delivered: i64,
    /// Events given up on after the last attempt.
    pub dropped: i64,
    /// Events past its cursor, not dealt with yet.
    pub pending: i64,
}
