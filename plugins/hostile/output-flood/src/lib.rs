//! Hostile: prints to stdout and stderr without end.

use std::io::Write;

use kiln_guest::{BuildContext, Guest, JobError, Outcome};

struct OutputFlood;

impl Guest for OutputFlood {
    fn run(_ctx: BuildContext) -> Result<Outcome, JobError> {
        let mut n = 0u64;
        loop {
            n += 1;
            // Errors are ignored on purpose: a hostile job does not stop when told.
            let _ = writeln!(std::io::stdout(), "stdout line {n}");
            let _ = writeln!(std::io::stderr(), "stderr line {n}");
        }
    }
}

kiln_guest::export_job!(OutputFlood);
