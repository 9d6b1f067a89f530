//! Parent/child relationships and dependencies between builders.
//!
//! - A build may start child buildsets ([`BuildContext::trigger`](crate::BuildContext::trigger));
//!   each child hangs from the parent under a named relationship, and that
//!   relationship's [`Policy`] decides, whenever a child completes, whether the parent
//!   keeps waiting, goes on with a result, or cancels the rest and goes on.
//! - A builder may depend on other builders ([`Dependency`]): its args and kwargs may
//!   reference a dependency's return value as `{"$retval": "<builder>"}`, resolved when
//!   each build starts; a missing dependency fails the build or is built first as a
//!   child buildset (relationship `dependency`), as [`MissingDependency`] says.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use kiln_policy_logic as logic;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{BuildId, ChildBuildset, ResultCode};

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

/// The relationship a trigger names, with "" meaning [`TRIGGERS`](crate::model::TRIGGERS).
pub fn relationship_name(relationship: &str) -> &str {
    if relationship.trim().is_empty() {
        crate::model::TRIGGERS
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

/// A dependency's return value, as resolved when a build started.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResolvedDependency {
    /// The dependency's builder.
    pub builder: String,
    /// The build whose return value is used.
    pub build_id: BuildId,
    /// Its return value (`null` when it returned nothing).
    pub return_value: Value,
}

/// A builder this one depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    /// The builder's name.
    pub builder: String,
    /// A pinned build number: its return value is used instead of the latest successful
    /// build's.
    #[serde(default)]
    pub build: Option<i64>,
}

impl Dependency {
    /// The latest successful build of `builder`.
    pub fn latest(builder: impl Into<String>) -> Dependency {
        Dependency {
            builder: builder.into(),
            build: None,
        }
    }
}

/// What a build does when a dependency has no successful build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingDependency {
    /// Fail with a "missing dependency" error.
    #[default]
    Fail,
    /// Build the dependency first, as a waited-for child buildset (relationship
    /// `dependency`), then go on if it succeeded.
    Build,
}

/// The key that marks a reference to a dependency's return value.
pub const RETVAL_KEY: &str = "$retval";

/// The builder names referenced by `{"$retval": ...}` anywhere in `value`, with any
/// malformed reference reported.
pub fn retval_references(value: &Value) -> Result<BTreeSet<String>, String> {
    let mut found = BTreeSet::new();
    collect_references(value, &mut found)?;
    Ok(found)
}

fn collect_references(value: &Value, found: &mut BTreeSet<String>) -> Result<(), String> {
    match value {
        Value::Object(map) => {
            if let Some(target) = map.get(RETVAL_KEY) {
                let name = target.as_str().ok_or_else(|| {
                    format!("{RETVAL_KEY} must name a builder as a string, not {target}")
                })?;
                if let Some(other) = map.keys().find(|k| *k != RETVAL_KEY && *k != "pointer") {
                    return Err(format!(
                        "a {RETVAL_KEY} reference takes only \"pointer\" besides the builder, not {other:?}"
                    ));
                }
                if let Some(p) = map.get("pointer")
                    && !p
                        .as_str()
                        .is_some_and(|p| p.is_empty() || p.starts_with('/'))
                {
                    return Err(format!(
                        "{RETVAL_KEY} {name:?}: \"pointer\" must be a JSON pointer such as \"/files/0\""
                    ));
                }
                found.insert(name.to_owned());
                return Ok(());
            }
            map.values().try_for_each(|v| collect_references(v, found))
        }
        Value::Array(items) => items.iter().try_for_each(|v| collect_references(v, found)),
        _ => Ok(()),
    }
}

/// `value` with every `{"$retval": "<builder>"}` replaced by that builder's return value
/// from `values` (or the part a `"pointer"` selects; `null` where it selects nothing).
pub fn substitute_retvals(value: &Value, values: &BTreeMap<String, Value>) -> Value {
    match value {
        Value::Object(map) => match map.get(RETVAL_KEY).and_then(Value::as_str) {
            Some(name) => {
                let whole = values.get(name).cloned().unwrap_or(Value::Null);
                match map.get("pointer").and_then(Value::as_str) {
                    Some(p) => whole.pointer(p).cloned().unwrap_or(Value::Null),
                    None => whole,
                }
            }
            None => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), substitute_retvals(v, values)))
                    .collect(),
            ),
        },
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| substitute_retvals(v, values))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Finds a dependency cycle in a graph of builder → builders it depends on; returns the
/// cycle as a path that starts and ends with the same builder.
pub fn find_cycle(graph: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, Vec<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let start = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Visiting);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = visit(node, graph, &mut marks, &mut path) {
            return Some(cycle);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn retval_references_are_found_anywhere_and_substituted() {
        let args =
            json!(["x", {"src": {"$retval": "fetch", "pointer": "/path"}}, {"$retval": "prep"}]);
        let refs = retval_references(&args).unwrap();
        assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["fetch", "prep"]);
        let values = BTreeMap::from([
            ("fetch".to_owned(), json!({"path": "/tmp/src"})),
            ("prep".to_owned(), json!(7)),
        ]);
        assert_eq!(
            substitute_retvals(&args, &values),
            json!(["x", {"src": "/tmp/src"}, 7])
        );
    }

    #[test]
    fn malformed_retval_references_are_refused() {
        assert!(retval_references(&json!({"$retval": 3})).is_err());
        assert!(retval_references(&json!({"$retval": "a", "extra": 1})).is_err());
        assert!(retval_references(&json!({"$retval": "a", "pointer": "no-slash"})).is_err());
    }

    #[test]
    fn a_cycle_is_reported_as_a_path() {
        let graph = BTreeMap::from([
            ("a".to_owned(), vec!["b".to_owned()]),
            ("b".to_owned(), vec!["c".to_owned()]),
            ("c".to_owned(), vec!["a".to_owned()]),
            ("d".to_owned(), vec![]),
        ]);
        assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
        let dag = BTreeMap::from([
            ("a".to_owned(), vec!["b".to_owned(), "c".to_owned()]),
            ("b".to_owned(), vec!["c".to_owned()]),
        ]);
        assert_eq!(find_cycle(&dag), None);
    }
}
