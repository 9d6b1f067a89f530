//! Hostile: allocates and touches memory until something stops it.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};

struct MemoryBomb;

impl Guest for MemoryBomb {
    fn run(_ctx: BuildContext) -> Result<Outcome, JobError> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; 1 << 20];
            chunk[0] = hoard.len() as u8;
            hoard.push(std::hint::black_box(chunk));
        }
    }
}

kiln_guest::export_job!(MemoryBomb);
