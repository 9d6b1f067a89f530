//! Hostile: spins forever. The deadline (or a cancel) must stop it.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};

struct LoopForever;

#[inline(never)]
fn spin() -> u64 {
    let mut n = 0u64;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

impl Guest for LoopForever {
    fn run(_ctx: BuildContext) -> Result<Outcome, JobError> {
        let n = spin();
        Err(JobError::new(format!("unreachable: {n}")))
    }
}

kiln_guest::export_job!(LoopForever);
