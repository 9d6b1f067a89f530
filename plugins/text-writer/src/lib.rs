//! Writes `kwargs.text` through every host call that takes text: a log message at each
//! level, a progress group name and status line, the state string, a property's name,
//! value and source. Then returns `{"text": text}`, or fails with the text as error and
//! details when `kwargs.fail` is true. The tests use it to send odd bytes (NUL, control
//! characters, huge strings) through the whole path from a guest to the database.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::json;

struct TextWriter;

impl Guest for TextWriter {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let text = ctx
            .kwarg("text")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        kiln_guest::debug(&text);
        kiln_guest::info(&text);
        kiln_guest::warning(&text);
        kiln_guest::error(&text);
        let group = format!("group {text}");
        kiln_guest::progress(&[group.as_str()], 1, 2, &text);
        kiln_guest::host::set_state(&text);
        let name = format!("p{text}");
        kiln_guest::set_property(&name, &json!(text), &text).map_err(JobError::new)?;
        if ctx.kwarg("fail").and_then(|v| v.as_bool()).unwrap_or(false) {
            return Err(JobError::new(text.clone()).with_details(text));
        }
        Ok(Outcome::success_json(json!({ "text": text })))
    }
}

kiln_guest::export_job!(TextWriter);
