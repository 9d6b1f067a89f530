//! The reporters' outbox: one report per lifecycle change, and each reporter's progress
//! through them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{BuildId, BuildsetId, ResultCode, Timestamp};

/// Which lifecycle change an outbox event describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportKind {
    /// A buildset was submitted.
    BuildsetSubmitted,
    /// A build started.
    BuildStarted,
    /// A build finished.
    BuildFinished,
    /// A buildset completed.
    BuildsetComplete,
}

impl ReportKind {
    /// Every kind.
    pub const ALL: [ReportKind; 4] = [
        ReportKind::BuildsetSubmitted,
        ReportKind::BuildStarted,
        ReportKind::BuildFinished,
        ReportKind::BuildsetComplete,
    ];

    /// The name stored and shown ("build_finished").
    pub fn as_str(self) -> &'static str {
        match self {
            ReportKind::BuildsetSubmitted => "buildset_submitted",
            ReportKind::BuildStarted => "build_started",
            ReportKind::BuildFinished => "build_finished",
            ReportKind::BuildsetComplete => "buildset_complete",
        }
    }
}

impl fmt::Display for ReportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event kind name that is not one of [`ReportKind::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown event kind {0:?} (known: buildset_submitted, build_started, build_finished, buildset_complete)"
)]
pub struct UnknownReportKind(pub String);

impl FromStr for ReportKind {
    type Err = UnknownReportKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReportKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownReportKind(s.to_owned()))
    }
}

/// One event in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Its position: increasing, never reused.
    pub seq: i64,
    /// What it describes.
    pub kind: ReportKind,
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
