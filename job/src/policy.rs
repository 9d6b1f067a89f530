//! Relationships between a parent build and its children: what a trigger hands back,
//! and the [`Policy`] that decides, each time children complete, whether the parent
//! keeps waiting, goes on with a result, or cancels the rest and goes on.

use async_trait::async_trait;
use kiln_model::{BuildId, ChildBuildset, ResultCode};
use kiln_policy_logic as logic;
use serde::{Deserialize, Serialize};

/// The parent build a policy decides for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParentInfo {
    /// The parent build.
    pub build_id: BuildId,
    /// Its builder.
    pub builder: String,
    /// Its number.
    pub number: i64,
    /// The relationship's name.
    pub relationship: String,
}

/// What a policy decides when a child completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "decision", content = "results")]
pub enum Decision {
    /// Keep waiting for more children.
    Wait,
    /// Let the parent go on with this result; children still running keep running.
    Finish(ResultCode),
    /// Cancel the children still running, then let the parent go on with this result.
    CancelRest(ResultCode),
}

/// A policy that could not decide (a plugin that trapped, for instance).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the {policy} policy failed: {reason}")]
pub struct PolicyError {
    /// The policy's name.
    pub policy: String,
    /// Why.
    pub reason: String,
}

/// Decides what a parent's children mean for it. Called when the parent starts waiting
/// and each time children complete, always with the state of every child it waits for.
#[async_trait]
pub trait Policy: Send + Sync + 'static {
    /// The policy's decision.
    async fn decide(
        &self,
        parent: &ParentInfo,
        children: &[ChildBuildset],
    ) -> Result<Decision, PolicyError>;
}

/// One of the bundled policies, run natively: `worst-of`, `fail-fast`, `best-effort`
/// or `any-success`. The bundled plugins of the same names make the same decisions (they
/// share `kiln-policy-logic`). An engine uses `worst-of` for relationships it has no
/// policy for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundledPolicy {
    name: &'static str,
}

impl BundledPolicy {
    /// The bundled policy of this name, if there is one.
    pub fn named(name: &str) -> Option<BundledPolicy> {
        logic::NAMES
            .iter()
            .find(|n| **n == name)
            .map(|name| BundledPolicy { name })
    }

    /// Buildbot's trigger step: wait for every child, take the worst result.
    pub fn worst_of() -> BundledPolicy {
        BundledPolicy { name: "worst-of" }
    }

    /// The names of the bundled policies.
    pub fn names() -> &'static [&'static str] {
        &logic::NAMES
    }
}

fn to_logic(code: ResultCode) -> logic::Code {
    match code {
        ResultCode::Success => logic::Code::Success,
        ResultCode::Warnings => logic::Code::Warnings,
        ResultCode::Failure => logic::Code::Failure,
        ResultCode::Skipped => logic::Code::Skipped,
        ResultCode::Exception => logic::Code::Exception,
        ResultCode::Retry => logic::Code::Retry,
        ResultCode::Cancelled => logic::Code::Cancelled,
    }
}

fn from_logic(code: logic::Code) -> ResultCode {
    match code {
        logic::Code::Success => ResultCode::Success,
        logic::Code::Warnings => ResultCode::Warnings,
        logic::Code::Failure => ResultCode::Failure,
        logic::Code::Skipped => ResultCode::Skipped,
        logic::Code::Exception => ResultCode::Exception,
        logic::Code::Retry => ResultCode::Retry,
        logic::Code::Cancelled => ResultCode::Cancelled,
    }
}

#[async_trait]
impl Policy for BundledPolicy {
    async fn decide(
        &self,
        _parent: &ParentInfo,
        children: &[ChildBuildset],
    ) -> Result<Decision, PolicyError> {
        let children: Vec<logic::Child> = children
            .iter()
            .map(|c| logic::Child {
                complete: c.complete,
                result: c.results.map(to_logic),
            })
            .collect();
        let decision = logic::decide(self.name, &children).ok_or_else(|| PolicyError {
            policy: self.name.into(),
            reason: "unknown bundled policy".into(),
        })?;
        Ok(match decision {
            logic::Decision::Wait => Decision::Wait,
            logic::Decision::Finish(c) => Decision::Finish(from_logic(c)),
            logic::Decision::CancelRest(c) => Decision::CancelRest(from_logic(c)),
        })
    }
}

/// The relationship a trigger names, with "" meaning [`TRIGGERS`](kiln_model::TRIGGERS).
pub fn relationship_name(relationship: &str) -> &str {
    if relationship.trim().is_empty() {
        kiln_model::TRIGGERS
    } else {
        relationship
    }
}

/// What `trigger` hands back to the job.
#[derive(Clone, Debug, PartialEq)]
pub struct Triggered {
    /// The policy's result for the parent (SUCCESS when not waiting). The parent build
    /// ends with the worse of this and its job's own result.
    pub verdict: ResultCode,
    /// Every child, in the order asked for.
    pub children: Vec<ChildBuildset>,
}

/// Why a trigger failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// Bad input: an unknown builder or relationship, nothing to trigger.
    #[error("{0}")]
    Invalid(String),
    /// The parent build was asked to stop while it waited.
    #[error("the build was stopped while it waited for its children")]
    Stopped,
    /// The policy failed; the remaining children were cancelled.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The database failed.
    #[error("{0}")]
    Storage(String),
    /// The trigger would take the build past its children or depth limit; the build
    /// ends as EXCEPTION with this reason.
    #[error("{0}")]
    LimitExceeded(String),
}
