//! Writes files into its result directory (/results); they become the build's artifacts.

use std::fs;

use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::json;

struct WriteArtifacts;

impl Guest for WriteArtifacts {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let count = ctx.kwarg("count").and_then(|v| v.as_u64()).unwrap_or(3).min(100);
        let fail = |e: std::io::Error| JobError::new(format!("cannot write to /results: {e}"));
        fs::create_dir_all("/results/reports").map_err(fail)?;
        let mut written = Vec::new();
        for i in 0..count {
            let path = format!("/results/reports/report-{i}.txt");
            fs::write(&path, format!("report {i} of build {} #{}\n", ctx.builder, ctx.number)).map_err(fail)?;
            written.push(path);
        }
        let summary = json!({"build": ctx.number, "reports": count});
        fs::write("/results/summary.json", summary.to_string()).map_err(fail)?;
        written.push("/results/summary.json".to_owned());
        kiln_guest::info(&format!("wrote {} files", written.len()));
        Ok(Outcome::success_json(json!({"written": written})))
    }
}

kiln_guest::export_job!(WriteArtifacts);
