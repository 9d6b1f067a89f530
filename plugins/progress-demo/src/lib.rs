//! Reports nested progress groups while doing small steps of real work.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::json;

struct ProgressDemo;

fn checksum(seed: u64, rounds: u64) -> u64 {
    (0..rounds).fold(seed, |acc, i| acc.rotate_left(5) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

impl Guest for ProgressDemo {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let steps = ctx.kwarg("steps").and_then(|v| v.as_u64()).unwrap_or(4).clamp(1, 1_000);
        // An optional pause per step, so that people can watch the bars move.
        let pause = std::time::Duration::from_millis(ctx.kwarg("step_ms").and_then(|v| v.as_u64()).unwrap_or(0).min(10_000));
        let groups = [("fetch", 2u64), ("compile", 3), ("test", 2)];
        let doing = |group: &str| match group {
            "fetch" => "fetching",
            "compile" => "compiling",
            _ => "testing",
        };
        let mut sum = 0u64;
        for (group, parts) in groups {
            kiln_guest::host::set_state(doing(group));
            for part in 0..parts {
                let name = format!("part-{part}");
                for step in 1..=steps {
                    sum = checksum(sum ^ step, 20_000);
                    if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                    kiln_guest::progress(&[group, &name], step, steps, &format!("{name} {step}/{steps}"));
                }
            }
            kiln_guest::info(&format!("{group} done"));
        }
        Ok(Outcome::success_json(json!({"groups": groups.len(), "steps": steps, "checksum": sum})))
    }
}

kiln_guest::export_job!(ProgressDemo);
