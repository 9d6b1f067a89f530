//! Outbound HTTP over wasi:http, for jobs and reporters: one request, its whole
//! response body read up to a bound. Kiln lets a request reach only the hosts the
//! builder's (or reporter's) `http` grant lists, and counts requests and bytes against
//! the build's limits.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

/// The most bytes one stream write or read moves (wasi:io's blocking write limit).
const CHUNK: usize = 4096;

/// A response: its status and body.
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body, whole.
    pub body: Vec<u8>,
}

/// Splits `scheme://authority/path?query`.
fn split(url: &str) -> Result<(Scheme, &str, &str), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or(format!("{url:?} is not an absolute URL"))?;
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

fn method(name: &str) -> Method {
    match name.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_owned()),
    }
}

/// Sends one request and reads the response body, refusing one longer than
/// `max_body` bytes. Header names are sent in lower case.
pub fn request(
    method_name: &str,
    url: &str,
    headers: &[(String, String)],
    body: &[u8],
    max_body: usize,
) -> Result<Response, String> {
    let (scheme, authority, path) = split(url)?;
    let fields = Fields::new();
    for (name, value) in headers {
        fields
            .append(&name.to_lowercase(), value.as_bytes())
            .map_err(|e| format!("header {name}: {e:?}"))?;
    }
    let request = OutgoingRequest::new(fields);
    request
        .set_method(&method(method_name))
        .map_err(|()| format!("bad method {method_name:?}"))?;
    request.set_scheme(Some(&scheme)).map_err(|()| "bad scheme")?;
    request
        .set_authority(Some(authority))
        .map_err(|()| format!("bad host {authority:?}"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| format!("bad path {path:?}"))?;
    let outgoing = request.body().map_err(|()| "request body unavailable")?;
    let response = outgoing_handler::handle(request, None)
        .map_err(|e| format!("{method_name} {url} was refused: {e}"))?;
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
        .map_err(|e| format!("{method_name} {url} failed: {e}"))?;
    let status = response.status();
    let incoming = response.consume().map_err(|()| "response body unavailable")?;
    let mut read = Vec::new();
    {
        let stream = incoming.stream().map_err(|()| "response stream unavailable")?;
        loop {
            match stream.blocking_read(CHUNK as u64) {
                Ok(bytes) => {
                    if read.len() + bytes.len() > max_body {
                        return Err(format!(
                            "{method_name} {url}: the response is longer than {max_body} bytes"
                        ));
                    }
                    read.extend_from_slice(&bytes);
                }
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(format!(
                        "{method_name} {url}: reading the response failed: {}",
                        e.to_debug_string()
                    ));
                }
            }
        }
    }
    Ok(Response { status, body: read })
}
