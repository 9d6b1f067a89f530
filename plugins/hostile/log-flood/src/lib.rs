//! Hostile: logs without end.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};

struct LogFlood;

impl Guest for LogFlood {
    fn run(_ctx: BuildContext) -> Result<Outcome, JobError> {
        let mut n = 0u64;
        loop {
            n += 1;
            kiln_guest::info(&format!("flood line {n}: the quick brown fox jumps over the lazy dog"));
        }
    }
}

kiln_guest::export_job!(LogFlood);
