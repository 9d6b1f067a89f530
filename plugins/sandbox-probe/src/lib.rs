//! Reports what the sandbox lets it see: environment variables, the contents of a file
//! (kwargs.read), whether a write succeeds (kwargs.write), and the root directory.
use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::{Map, Value, json};

struct SandboxProbe;

fn attempt<T: Into<Value>>(result: std::io::Result<T>) -> Value {
    match result {
        Ok(v) => json!({"ok": v.into()}),
        Err(e) => json!({"error": e.to_string()}),
    }
}

impl Guest for SandboxProbe {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let env: Map<String, Value> = std::env::vars().map(|(k, v)| (k, Value::String(v))).collect();
        let read = ctx.kwarg("read").and_then(|v| v.as_str().map(str::to_owned));
        let write = ctx.kwarg("write").and_then(|v| v.as_str().map(str::to_owned));
        let mut report = json!({"env": env});
        if let Some(path) = read {
            report["read"] = attempt(std::fs::read_to_string(&path));
        }
        if let Some(path) = write {
            report["write"] = attempt(std::fs::write(&path, b"probe").map(|()| true));
        }
        report["root"] = attempt(std::fs::read_dir("/").map(|d| d.count() as u64));
        Ok(Outcome::success_json(report))
    }
}

kiln_guest::export_job!(SandboxProbe);
