//! Dependencies between builders (jobcontrol): a builder may depend on others and use
//! their return values in its args and kwargs as `{"$retval": "<builder>"}`, resolved
//! when each build starts; a missing dependency fails the build or is built first as a
//! child buildset (relationship `dependency`), as [`MissingDependency`] says.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
