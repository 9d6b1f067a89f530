//! Parent/child buildsets as a parent sees them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{BuildId, BuilderId, BuildsetId, RequestId, ResultCode};

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
