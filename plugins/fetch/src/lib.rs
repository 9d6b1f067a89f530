//! Sends kwargs.method (default GET) to kwargs.url, kwargs.times times (default 1), with
//! kwargs.body as the body; returns the last status, the bytes read in all and the start
//! of the last body. A status other than 2xx is a job error. The host must be in the
//! builder's `http` grant; Kiln refuses any other and ends the build as EXCEPTION.

use kiln_guest::{BuildContext, Guest, JobError, Outcome};
use serde_json::json;

/// The most requests one build of it sends (Kiln's own limit is usually lower).
const MAX_TIMES: u64 = 10_000;
/// The longest response body it reads.
const MAX_BODY: usize = 16 << 20;
/// How much of the last body it returns.
const SHOWN: usize = 1024;

struct Fetch;

impl Guest for Fetch {
    fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
        let url = ctx
            .kwarg("url")
            .and_then(|v| v.as_str().map(str::to_owned))
            .ok_or_else(|| JobError::new("kwargs.url is required"))?;
        let method = ctx
            .kwarg("method")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "GET".into());
        let body = ctx
            .kwarg("body")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let times = ctx.kwarg("times").and_then(|v| v.as_u64()).unwrap_or(1);
        if !(1..=MAX_TIMES).contains(&times) {
            return Err(JobError::new(format!("times must be within 1..={MAX_TIMES}")));
        }
        let mut total = 0usize;
        let mut last = None;
        for _ in 0..times {
            let response = kiln_guest::http::request(&method, &url, &[], body.as_bytes(), MAX_BODY)
                .map_err(JobError::new)?;
            if !(200..300).contains(&response.status) {
                return Err(JobError::new(format!(
                    "{method} {url} answered HTTP {}",
                    response.status
                )));
            }
            total += response.body.len();
            last = Some(response);
        }
        let last = last.ok_or_else(|| JobError::new("no request was sent"))?;
        let shown = String::from_utf8_lossy(&last.body[..last.body.len().min(SHOWN)]).into_owned();
        kiln_guest::info(&format!("{method} {url}: HTTP {}, {total} bytes", last.status));
        Ok(Outcome::success_json(json!({
            "status": last.status,
            "bytes": total,
            "text": shown,
        })))
    }
}

kiln_guest::export_job!(Fetch);
