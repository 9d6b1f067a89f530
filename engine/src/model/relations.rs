//! Parent/child relationships, builder status and the reporters' outbox: plain types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{BuildId, BuilderId, BuildsetId, RequestId, ResultCode, Timestamp};

/// The relationship `trigger` uses when the job names none.
pub const TRIGGERS: &str = "triggers";
/// The relationship of a dependency built first as a child buildset.
pub const DEPENDENCY: &str = "dependency";

/// A child buildset of a parent request, with the state of its one request and latest
/// build: what a parent and its relationship's policy see.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildBuildset {
    /// The child buildset.
    pub buildset_id: BuildsetId,
    /// Which trigger of the parent made it (stable across re-runs of the parent).
    pub trigger_key: Option<String>,
    /// The relationship to the parent.
    pub relationship: Option<String>,
    /// Whether the parent waits for it.
    pub waited_for: bool,
    /// The build it currently hangs from.
    pub parent_buildid: Option<BuildId>,
    /// Its request.
    pub request_id: RequestId,
    /// The request's builder.
    pub builder_id: BuilderId,
    /// The builder's name.
    pub builder: String,
    /// Whether the request is complete.
    pub complete: bool,
    /// Its result, once complete.
    pub results: Option<ResultCode>,
    /// Its latest build, if one started.
    pub build_id: Option<BuildId>,
    /// What that build returned.
    pub return_value: Option<Value>,
}

/// A builder's status, as jobcontrol shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuilderStatus {
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
            BuilderStatus::NotBuilt => "not built",
            BuilderStatus::Failed => "failed",
            BuilderStatus::Success => "success",
            BuilderStatus::Outdated => "outdated",
        })
    }
}

/// Which lifecycle change an outbox event describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A buildset was submitted.
    BuildsetSubmitted,
    /// A build started.
    BuildStarted,
    /// A build finished.
    BuildFinished,
    /// A buildset completed.
    BuildsetComplete,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 4] = [
        EventKind::BuildsetSubmitted,
        EventKind::BuildStarted,
        EventKind::BuildFinished,
        EventKind::BuildsetComplete,
    ];

    /// The name stored and shown ("build_finished").
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BuildsetSubmitted => "buildset_submitted",
            EventKind::BuildStarted => "build_started",
            EventKind::BuildFinished => "build_finished",
            EventKind::BuildsetComplete => "buildset_complete",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event kind name that is not one of [`EventKind::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown event kind {0:?} (known: buildset_submitted, build_started, build_finished, buildset_complete)"
)]
pub struct UnknownEventKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownEventKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownEventKind(s.to_owned()))
    }
}

/// One event in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// Its position: increasing, never reused.
    pub seq: i64,
    /// What it describes.
    pub kind: EventKind,
    /// The buildset concerned.
    pub buildset_id: BuildsetId,
    /// The build, for build events.
    pub build_id: Option<BuildId>,
    /// The builder's name, for build events.
    pub builder: Option<String>,
    /// The result, for finished builds and complete buildsets.
    pub results: Option<ResultCode>,
    /// When the change happened.
    pub at: Timestamp,
    /// The event as one JSON object.
    pub payload: Value,
}

/// A reporter's delivery state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReporterState {
    /// Its configured name.
    pub name: String,
    /// The last event seq it has dealt with (delivered, filtered out or dropped).
    pub cursor: i64,
    /// The master delivering its events, while it holds the lease.
    pub owner: Option<super::MasterId>,
    /// Until when that master's lease runs.
    pub lease_until: Option<Timestamp>,
    /// Failed attempts at the event after the cursor.
    pub attempts: u32,
    /// The last delivery error.
    pub last_error: Option<String>,
    /// Events delivered so far.
    pub delivered: u64,
    /// Events given up on after the last attempt.
    pub dropped: u64,
    /// Events in the outbox past its cursor: not dealt with yet (some of them may be
    /// ones it does not want, which it passes over without a delivery).
    pub pending: u64,
}
