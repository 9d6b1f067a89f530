//! Hostile: recurses without end.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};

struct Recursion;

#[inline(never)]
#[allow(unconditional_recursion)] // the point of this plugin
fn descend(depth: u64) -> u64 {
    let below = descend(std::hint::black_box(depth + 1));
    std::hint::black_box(below.wrapping_add(depth))
}

impl Guest for Recursion {
    fn run(_ctx: BuildContext) -> Result<Outcome, JobError> {
        Err(JobError::new(format!("unreachable: {}", descend(0))))
    }
}

kiln_guest::export_job!(Recursion);
