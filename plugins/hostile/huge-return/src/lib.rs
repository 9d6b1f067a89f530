//! Hostile: returns a value far larger than any sane return value (kwargs.mib, default 8).

use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::json;

struct HugeReturn;

impl Guest for HugeReturn {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let mib = ctx.kwarg("mib").and_then(|v| v.as_u64()).unwrap_or(8).min(32) as usize;
        Ok(Outcome::success_json(json!({"blob": "x".repeat(mib << 20)})))
    }
}

kiln_guest::export_job!(HugeReturn);
