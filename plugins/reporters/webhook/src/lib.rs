//! POSTs every event it hears as JSON to a configured URL, over wasi:http.
//!
//! Config (the reporter's kwargs): `url` (`http://host:port/path` or `https://...`) and
//! optional `headers` (a table of strings). The host must be in the reporter's
//! `http` grant; any other host is refused by Kiln. A response other than 2xx is a
//! failed delivery, retried later.

use kiln_guest::reporter::{Event, Guest};

/// The longest answer it reads from the receiver (it only looks at the status).
const MAX_ANSWER: usize = 1 << 20;

struct Webhook;

impl Guest for Webhook {
    fn report(config: String, event: Event) -> Result<(), String> {
        let config: serde_json::Value =
            serde_json::from_str(&config).map_err(|e| format!("config is not JSON: {e}"))?;
        let url = config
            .get("url")
            .and_then(|u| u.as_str())
            .ok_or("config needs a `url` to post to")?;
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        if let Some(extra) = config.get("headers").and_then(|h| h.as_object()) {
            for (name, value) in extra {
                let value = value.as_str().ok_or(format!("header {name} must be a string"))?;
                headers.push((name.to_lowercase(), value.to_owned()));
            }
        }
        // A declared length spares small receivers chunked transfer encoding.
        headers.push(("content-length".to_owned(), event.payload.len().to_string()));
        let status =
            kiln_guest::http::request("POST", url, &headers, event.payload.as_bytes(), MAX_ANSWER)?
                .status;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("{url} answered HTTP {status}"))
        }
    }
}

kiln_guest::export_reporter!(Webhook);
