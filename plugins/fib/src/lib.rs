//! CPU work: computes fib(n) the slow way, n from args[0] or kwargs.n (default 25).

use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::json;

struct Fib;

fn fib(n: u64) -> u64 {
    if n < 2 { n } else { fib(n - 1).wrapping_add(fib(n - 2)) }
}

impl Guest for Fib {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let n = ctx.args_value().get(0).and_then(|v| v.as_u64()).or_else(|| ctx.kwarg("n").and_then(|v| v.as_u64()));
        let n = n.unwrap_or(25);
        if n > 60 {
            return Err(JobError::new(format!("n = {n} would run for ages; use 60 or less")));
        }
        kiln_guest::host::set_state(&format!("computing fib({n})"));
        let value = fib(n);
        kiln_guest::info(&format!("fib({n}) = {value}"));
        Ok(Outcome::success_json(json!({"n": n, "fib": value})))
    }
}

kiln_guest::export_job!(Fib);
