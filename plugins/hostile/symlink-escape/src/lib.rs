//! Hostile: leaves symbolic links in its result directory that point at host paths, one
//! absolute and one climbing out with `..`, next to an ordinary file. A host that served
//! them as artifacts would hand out its own files. Returns which links the sandbox let
//! it make.

use std::fs;

use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::json;

struct SymlinkEscape;

impl Guest for SymlinkEscape {
    fn run(_ctx: BuildContext) -> Result<Outcome, JobError> {
        fs::create_dir_all("/results/deep/er").map_err(|e| JobError::new(e.to_string()))?;
        fs::write("/results/real.txt", "a real artifact\n")
            .map_err(|e| JobError::new(e.to_string()))?;
        let mut made = Vec::new();
        for (target, link) in [
            ("/etc/passwd", "/results/absolute"),
            ("../../../../../../../../../../etc/passwd", "/results/deep/er/climbing"),
            ("real.txt", "/results/inside"),
        ] {
            // Deprecated, but the one stable way to make a link on WASI.
            #[allow(deprecated)]
            if fs::soft_link(target, link).is_ok() {
                made.push(link);
            }
        }
        Ok(Outcome::success_json(json!({ "links": made })))
    }
}

kiln_guest::export_job!(SymlinkEscape);
