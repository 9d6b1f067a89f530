//! Appends every event it hears to a file, one JSON object per line.
//!
//! Config (the reporter's kwargs): `path`, a file inside a directory the reporter is
//! granted, e.g. `{ path = "/out/events.jsonl" }` with `dirs = [{ host = "out",
//! guest = "/out", writable = true }]`.

use std::io::Write;

use kiln_guest::reporter::{Event, Guest};

struct Jsonl;

impl Guest for Jsonl {
    fn report(config: String, event: Event) -> Result<(), String> {
        let config: serde_json::Value =
            serde_json::from_str(&config).map_err(|e| format!("config is not JSON: {e}"))?;
        let path = config
            .get("path")
            .and_then(|p| p.as_str())
            .ok_or("config needs a `path` to append to")?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        // One write per line keeps a line whole even if the engine stops mid-event.
        let mut line = event.payload.into_bytes();
        line.push(b'\n');
        file.write_all(&line)
            .map_err(|e| format!("cannot append to {path}: {e}"))
    }
}

kiln_guest::export_reporter!(Jsonl);
