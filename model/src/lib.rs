//! Kiln's plain data: ids, result codes, the entities the engine keeps (buildsets,
//! build requests, builds, builders, masters), log records, progress trees, the
//! children a parent sees and the reports reporters hear.
//!
//! Layout: [`results`](ResultCode) holds result codes and their "worst of" ranking;
//! `log` log records and levels; `progress` reports and the progress tree; `children`
//! child buildsets as a parent sees them; `reports` the outbox's reports and the
//! reporters' progress; this file the ids and entities.
//!
//! Architecture invariant: no I/O, no async, no database, wasm or HTTP types. Every
//! other crate of Kiln depends on this one and this one on none of them.

mod children;
mod log;
mod progress;
mod reports;
mod results;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use children::{ChildBuildset, DEPENDENCY, TRIGGERS};
pub use log::{LogEntry, LogLevel, LogQuery, LogRecord, UnknownLevel};
pub use progress::{ProgressNode, ProgressRecord, ProgressReport};
pub use reports::{Report, ReportKind, ReporterState, UnknownReportKind};
pub use results::{ResultCode, UnknownResult};

/// A point in time. Stored with microsecond precision.
pub type Timestamp = chrono::DateTime<chrono::Utc>;

/// The current time, truncated to the microseconds the database keeps, so that a value
/// read back compares equal to the one written.
pub fn now() -> Timestamp {
    let now = chrono::Utc::now();
    chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// Identifies a buildset.
    BuildsetId
);
id_type!(
    /// Identifies a build request.
    RequestId
);
id_type!(
    /// Identifies a build.
    BuildId
);
id_type!(
    /// Identifies a builder.
    BuilderId
);
id_type!(
    /// Identifies a master (one engine process).
    MasterId
);
id_type!(
    /// Identifies a stored sourcestamp.
    SourceStampId
);

/// The lowest priority a request may have.
pub const MIN_PRIORITY: i32 = -1_000;
/// The highest priority a request may have. The range is bounded so that derived
/// priorities (a child inherits its parent's) never overflow.
pub const MAX_PRIORITY: i32 = 1_000;

/// A property value with where it came from, as Buildbot keeps them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Property {
    /// Any JSON value.
    pub value: serde_json::Value,
    /// Who set it ("submit", "builder", the job's own name, ...).
    pub source: String,
}

impl Property {
    /// A property with the given value and source.
    pub fn new(value: serde_json::Value, source: impl Into<String>) -> Self {
        Property {
            value,
            source: source.into(),
        }
    }
}

/// Properties by name.
pub type Properties = BTreeMap<String, Property>;

/// What a build was made from. Identical stamps are stored once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceStamp {
    /// Which codebase of a multi-repository project this stamp belongs to.
    #[serde(default)]
    pub codebase: String,
    /// The repository URL or path.
    #[serde(default)]
    pub repository: String,
    /// The branch, if any.
    #[serde(default)]
    pub branch: Option<String>,
    /// The revision (a git hash), if pinned.
    #[serde(default)]
    pub revision: Option<String>,
    /// The project name.
    #[serde(default)]
    pub project: String,
}

/// A named kind of work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Builder {
    /// Its id.
    pub id: BuilderId,
    /// Its unique name.
    pub name: String,
    /// A human description.
    pub description: Option<String>,
    /// The builders it depends on (jobcontrol's dependencies), by name.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Whether it is paused: no master claims its requests until it is resumed; builds
    /// already running finish.
    #[serde(default)]
    pub paused: bool,
    /// Whether an active master runs it: work for a builder nobody serves waits until
    /// a master that has it starts.
    #[serde(default)]
    pub served: bool,
}

/// A schedule as stored: what it makes and when it last and next fires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Its unique name.
    pub name: String,
    /// Its timing, the submission it makes and its options, as its engine wrote them.
    pub definition: serde_json::Value,
    /// The latest tick fired or passed over (or its registration time).
    pub last_fire: Timestamp,
    /// When it fires next, as its master computed it.
    pub next_fire: Option<Timestamp>,
    /// The buildset its latest fire made.
    pub last_buildset_id: Option<BuildsetId>,
    /// How many buildsets it has made.
    pub fires: i64,
}

/// A lock (Buildbot's master lock) and what holds and waits for it now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lock {
    /// Its unique name.
    pub name: String,
    /// How many units it has (1: exclusive).
    pub capacity: i64,
    /// The builders that take it, with how many units each build of them takes.
    pub users: Vec<LockUser>,
    /// The running builds that hold it.
    pub holders: Vec<LockHold>,
    /// Queued requests of its users that found it busy when they were next in line
    /// (counted up to [`Lock::WAITING_COUNTED`]).
    pub waiting: i64,
}

impl Lock {
    /// The most waiting requests a lock listing counts: a bound on the work of one read
    /// however long the queue.
    pub const WAITING_COUNTED: i64 = 10_000;

    /// Units held now.
    pub fn held(&self) -> i64 {
        self.holders.iter().map(|h| h.units).sum()
    }
}

/// A builder that takes a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockUser {
    /// The builder.
    pub builder_id: BuilderId,
    /// Its name.
    pub builder: String,
    /// The units each of its builds takes.
    pub units: i64,
}

/// A running build's hold on a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHold {
    /// The build.
    pub build_id: BuildId,
    /// The master running it.
    pub master_id: MasterId,
    /// The units it holds.
    pub units: i64,
    /// When it took them.
    pub acquired_at: Timestamp,
}

/// One running (or once-running) engine process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Master {
    /// Its id.
    pub id: MasterId,
    /// Its unique name.
    pub name: String,
    /// False once it shut down or was expired by another master.
    pub active: bool,
    /// Its last heartbeat.
    pub last_active: Timestamp,
}

/// One submission of work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buildset {
    /// Its id.
    pub id: BuildsetId,
    /// Why it was submitted.
    pub reason: String,
    /// An identifier chosen by whoever submitted it.
    pub external_idstring: Option<String>,
    /// When it was submitted.
    pub submitted_at: Timestamp,
    /// Whether every request in it is complete.
    pub complete: bool,
    /// When it completed.
    pub complete_at: Option<Timestamp>,
    /// The worst of its requests' results, once complete.
    pub results: Option<ResultCode>,
    /// The build that started it, for child buildsets.
    pub parent_buildid: Option<BuildId>,
    /// The relationship to that parent build ("trigger", "dependency", ...).
    pub parent_relationship: Option<String>,
    /// The build it rebuilds, for rebuilds.
    pub rebuilt_buildid: Option<BuildId>,
    /// The buildset this one resubmits.
    #[serde(default)]
    pub resubmitted_from: Option<BuildsetId>,
}

/// A unit of queued work for one builder inside a buildset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildRequest {
    /// Its id.
    pub id: RequestId,
    /// The buildset it belongs to.
    pub buildset_id: BuildsetId,
    /// The builder that runs it.
    pub builder_id: BuilderId,
    /// Higher runs first.
    pub priority: i32,
    /// When it was submitted.
    pub submitted_at: Timestamp,
    /// Whether a parent build waits for it.
    pub waited_for: bool,
    /// Whether it is complete.
    pub complete: bool,
    /// When it completed.
    pub complete_at: Option<Timestamp>,
    /// Its result, once complete.
    pub results: Option<ResultCode>,
    /// The master holding the claim, if claimed (the claim stays after completion).
    pub claimed_by: Option<MasterId>,
    /// When it was claimed.
    pub claimed_at: Option<Timestamp>,
    /// Whether somebody asked to cancel it while it was claimed.
    pub cancel_requested: bool,
    /// Not claimable before this time (a delayed run, or a retry's backoff).
    #[serde(default)]
    pub not_before: Option<Timestamp>,
    /// The newer request that superseded it, when it was collapsed (SKIPPED).
    #[serde(default)]
    pub superseded_by: Option<RequestId>,
}

/// One execution of a build request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Build {
    /// Its id.
    pub id: BuildId,
    /// Its number, unique per builder.
    pub number: i64,
    /// The builder it ran on.
    pub builder_id: BuilderId,
    /// The request it executes.
    pub request_id: RequestId,
    /// The master that runs it.
    pub master_id: MasterId,
    /// The worker slot on that master.
    pub worker_slot: Option<i64>,
    /// When it started.
    pub started_at: Timestamp,
    /// When it finished.
    pub complete_at: Option<Timestamp>,
    /// What it is doing now, in a few words.
    pub state_string: String,
    /// Seconds it spent waiting for locks, summed.
    pub locks_duration_s: f64,
    /// Its result, once finished.
    pub results: Option<ResultCode>,
    /// The JSON value the job returned.
    pub return_value: Option<serde_json::Value>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Where it failed, if known.
    pub traceback: Option<String>,
}

impl Build {
    /// Whether it has finished.
    pub fn is_complete(&self) -> bool {
        self.complete_at.is_some()
    }
}

/// A file a build left in its result directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Its path inside the result directory, '/'-separated.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where it lies on the machine that ran the build.
    pub location: String,
}

/// A builder's status, as jobcontrol shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuilderStatus {
    /// A build of it is running now (whatever its earlier builds did).
    Building,
    /// No build of it has finished (RETRY and SKIPPED builds do not count).
    NotBuilt,
    /// Its latest finished build failed (FAILURE, EXCEPTION or CANCELLED).
    Failed,
    /// Its latest finished build succeeded and nothing it depends on is newer.
    Success,
    /// It succeeded, but a direct dependency has succeeded more recently since.
    Outdated,
}

impl fmt::Display for BuilderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BuilderStatus::Building => "building",
            BuilderStatus::NotBuilt => "not built",
            BuilderStatus::Failed => "failed",
            BuilderStatus::Success => "success",
            BuilderStatus::Outdated => "outdated",
        })
    }
}
