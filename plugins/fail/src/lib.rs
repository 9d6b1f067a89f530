//! Fails on purpose with a job error (kwargs.message, kwargs.details).

use kiln_guest::{BuildContext, Guest, JobError, Outcome};

struct Fail;

impl Guest for Fail {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let message = ctx.kwarg("message").and_then(|v| v.as_str().map(str::to_owned));
        let message = message.unwrap_or_else(|| "failed on purpose".to_owned());
        kiln_guest::error(&message);
        let mut error = JobError::new(message);
        if let Some(details) = ctx.kwarg("details").and_then(|v| v.as_str().map(str::to_owned)) {
            error = error.with_details(details);
        }
        Err(error)
    }
}

kiln_guest::export_job!(Fail);
