//! Triggers one child buildset per builder in `kwargs.builders` (repeats allowed) under
//! `kwargs.relationship` (default "triggers"), waits for them unless `kwargs.wait` is
//! false, and returns each child's builder, result and return value.
//!
//! `kwargs.nested`, if given, is passed to the children as the property `nested`: a
//! fan-out child reads its own kwargs from that property when it has one, so fan-outs
//! can build trees.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::{Value, json};

struct FanOut;

fn setting(ctx: &BuildContext, name: &str) -> Option<Value> {
    // A child of a nested fan-out takes its settings from the `nested` property.
    ctx.property("nested")
        .and_then(|n| n.get(name).cloned())
        .or_else(|| ctx.kwarg(name))
}

impl Guest for FanOut {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let builders: Vec<String> = setting(&ctx, "builders")
            .and_then(|b| serde_json::from_value(b).ok())
            .ok_or_else(|| JobError::new("kwargs.builders must be a list of builder names"))?;
        let wait = setting(&ctx, "wait").and_then(|w| w.as_bool()).unwrap_or(true);
        let relationship = setting(&ctx, "relationship")
            .and_then(|r| r.as_str().map(str::to_owned))
            .unwrap_or_default();
        let nested = setting(&ctx, "nested");
        let properties: Vec<(&str, Value)> = nested.into_iter().map(|n| ("nested", n)).collect();
        let names: Vec<&str> = builders.iter().map(String::as_str).collect();
        kiln_guest::info(&format!("triggering {} children: {}", names.len(), names.join(", ")));
        kiln_guest::progress(&[], 0, names.len() as u64, "waiting for children");
        let triggered = kiln_guest::trigger_as(&relationship, &names, &properties, wait)
            .map_err(|e| JobError::new(format!("trigger failed: {e}")))?;
        let done = triggered.children.iter().filter(|c| c.complete).count() as u64;
        kiln_guest::progress(&[], done, names.len() as u64, "children done");
        let children: Vec<Value> = triggered
            .children
            .iter()
            .map(|c| {
                json!({
                    "builder": c.builder,
                    "buildset_id": c.buildset_id,
                    "results": c.results.map(|r| r.name()),
                    "return_value": serde_json::from_str::<Value>(&c.return_value).unwrap_or(Value::Null),
                })
            })
            .collect();
        kiln_guest::info(&format!("the policy's verdict: {}", triggered.verdict.name()));
        Ok(Outcome::success_json(json!({
            "verdict": triggered.verdict.name(),
            "children": children,
        })))
    }
}

kiln_guest::export_job!(FanOut);
