//! Sleeps for kwargs.seconds (default 1) without holding an OS thread.

use std::time::{Duration, Instant};

use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::json;

struct Sleep;

impl Guest for Sleep {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let seconds = ctx.kwarg("seconds").and_then(|v| v.as_f64()).unwrap_or(1.0);
        if !(0.0..=86_400.0).contains(&seconds) {
            return Err(JobError::new(format!("seconds must be within 0..=86400, got {seconds}")));
        }
        kiln_guest::host::set_state(&format!("sleeping {seconds}s"));
        let start = Instant::now();
        // wasi:clocks sleeps in the host, which awaits a timer: no thread is held.
        std::thread::sleep(Duration::from_secs_f64(seconds));
        Ok(Outcome::success_json(json!({"slept_ms": start.elapsed().as_millis() as u64})))
    }
}

kiln_guest::export_job!(Sleep);
