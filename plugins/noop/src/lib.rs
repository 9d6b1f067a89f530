//! Does nothing and succeeds: the benchmark's job.

use kiln_guest::{BuildContext, Guest, JobError, JobResult, Outcome};

struct Noop;

impl Guest for Noop {
    fn run(_ctx: BuildContext) -> Result<Outcome, JobError> {
        Ok(Outcome { code: JobResult::Success, return_value: "null".into() })
    }
}

kiln_guest::export_job!(Noop);
