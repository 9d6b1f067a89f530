//! POSTs every event it hears as JSON to a configured URL, over wasi:http.
//!
//! Config (the reporter's kwargs): `url` (`http://host:port/path` or `https://...`) and
//! optional `headers` (a table of strings). The host must be in the reporter's
//! `http` grant; any other host is refused by Kiln. A response other than 2xx is a
//! failed delivery, retried later.

use kiln_guest::reporter::{Event, Guest};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

/// The most bytes one stream write may carry (wasi:io's blocking write limit).
const CHUNK: usize = 4096;

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
        let status = post(url, &headers, event.payload.as_bytes())?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("{url} answered HTTP {status}"))
        }
    }
}

/// Splits `scheme://authority/path?query`.
fn split(url: &str) -> Result<(Scheme, &str, &str), String> {
    let (scheme, rest) = url.split_once("://").ok_or(format!("{url:?} is not an absolute URL"))?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => return Err(format!("unsupported scheme {other:?}")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((scheme, authority, path))
}

fn post(url: &str, headers: &[(String, String)], body: &[u8]) -> Result<u16, String> {
    let (scheme, authority, path) = split(url)?;
    let fields = Fields::new();
    for (name, value) in headers {
        fields
            .append(name, value.as_bytes())
            .map_err(|e| format!("header {name}: {e:?}"))?;
    }
    let request = OutgoingRequest::new(fields);
    request.set_method(&Method::Post).map_err(|()| "bad method")?;
    request.set_scheme(Some(&scheme)).map_err(|()| "bad scheme")?;
    request.set_authority(Some(authority)).map_err(|()| format!("bad host {authority:?}"))?;
    request.set_path_with_query(Some(path)).map_err(|()| format!("bad path {path:?}"))?;
    let outgoing = request.body().map_err(|()| "request body unavailable")?;
    let response = outgoing_handler::handle(request, None)
        .map_err(|e| format!("POST {url} was refused: {e}"))?;
    {
        let stream = outgoing.write().map_err(|()| "body stream unavailable")?;
        for chunk in body.chunks(CHUNK) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| format!("writing the body failed: {e:?}"))?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| format!("finishing the body failed: {e}"))?;
    response.subscribe().block();
    let response = response
        .get()
        .ok_or("no response")?
        .map_err(|()| "response already taken")?
        .map_err(|e| format!("POST {url} failed: {e}"))?;
    Ok(response.status())
}

kiln_guest::export_reporter!(Webhook);
