//! Returns its builder's args unchanged.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};

struct Echo;

impl Guest for Echo {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        kiln_guest::info(&format!("echoing the args of {} #{}", ctx.builder, ctx.number));
        Ok(Outcome::success_json(ctx.args_value()))
    }
}

kiln_guest::export_job!(Echo);
