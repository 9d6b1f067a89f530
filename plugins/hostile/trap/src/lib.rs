//! Hostile: traps (wasm `unreachable`) a few calls deep, for backtraces.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};

struct Trap;

#[inline(never)]
fn inner_step(x: u64) -> u64 {
    if std::hint::black_box(x) < u64::MAX {
        core::arch::wasm32::unreachable()
    }
    x
}

#[inline(never)]
fn outer_step(x: u64) -> u64 {
    inner_step(std::hint::black_box(x + 1)) + 1
}

impl Guest for Trap {
    fn run(_ctx: BuildContext) -> Result<Outcome, JobError> {
        kiln_guest::info("about to trap");
        let n = outer_step(1);
        Err(JobError::new(format!("unreachable: {n}")))
    }
}

kiln_guest::export_job!(Trap);
