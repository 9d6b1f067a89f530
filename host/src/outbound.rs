//! Outbound HTTP (wasi:http) for jobs and reporters: only to the hosts a grant lists,
//! refused before any connection otherwise, and within a per-sandbox budget of
//! requests and body bytes (sent and received together).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

/// Hosts a sandbox may reach over HTTP: `host` (any port) or `host:port`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpGrant {
    /// The allowed hosts.
    pub hosts: Vec<String>,
}

impl HttpGrant {
    fn allows(&self, host: &str, port: u16) -> bool {
        self.hosts.iter().any(|h| match h.rsplit_once(':') {
            Some((name, p)) if p.parse::<u16>().is_ok() => {
                name.eq_ignore_ascii_case(host) && p.parse::<u16>().ok() == Some(port)
            }
            _ => h.eq_ignore_ascii_case(host),
        })
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        match self
            .hosts
            .iter()
            .find(|h| h.trim().is_empty() || h.contains('/') || h.contains("://"))
        {
            Some(bad) => Err(format!(
                "http grant {bad:?} must be a host name or host:port, not a URL"
            )),
            None => Ok(()),
        }
    }

    fn describe(&self) -> String {
        if self.hosts.is_empty() {
            "which is empty".to_owned()
        } else {
            self.hosts.join(", ")
        }
    }
}

/// What the requests of one sandbox did, shared with their bodies.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    bytes: AtomicU64,
    refused: Mutex<Vec<String>>,
    exceeded: Mutex<Option<String>>,
}

impl Traffic {
    fn exceed(&self, reason: String) {
        self.exceeded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(reason);
    }
}

/// The wasi:http hooks of one sandbox: the grant, the budget, and what happened.
pub(crate) struct Outbound {
    grant: HttpGrant,
    /// Who the grant belongs to, for messages ("builder", "reporter").
    owner: &'static str,
    max_requests: u32,
    max_bytes: u64,
    made: u32,
    traffic: Arc<Traffic>,
}

impl Outbound {
    pub(crate) fn new(
        grant: HttpGrant,
        owner: &'static str,
        max_requests: u32,
        max_bytes: u64,
    ) -> Outbound {
        Outbound {
            grant,
            owner,
            max_requests,
            max_bytes,
            made: 0,
            traffic: Arc::default(),
        }
    }

    /// What the sandbox did against its grant or budget, as a reason: a request to a
    /// host outside the grant, or past a limit. `None` when it kept to both.
    pub(crate) fn violation(&self) -> Option<String> {
        let refused = self
            .traffic
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(host) = refused.first() {
            return Some(format!(
                "outbound HTTP to {host} was refused: it is not in the {}'s http grant ({})",
                self.owner,
                self.grant.describe()
            ));
        }
        self.traffic
            .exceeded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

type ResponseFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> ResponseFuture {
        drop(fut);
        let uri = request.uri();
        let host = uri.host().unwrap_or_default().to_owned();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if !self.grant.allows(&host, port) {
            self.traffic
                .refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(format!("{host}:{port}"));
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        if self.made >= self.max_requests {
            self.traffic.exceed(format!(
                "http request limit exceeded: more than {} requests",
                self.max_requests
            ));
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        self.made += 1;
        let (traffic, max) = (self.traffic.clone(), self.max_bytes);
        let request = request.map(|body| {
            Counted {
                inner: body,
                traffic: traffic.clone(),
                max,
                response: false,
            }
            .boxed_unsync()
        });
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            let response = response.map(|body| {
                Counted {
                    inner: body.boxed_unsync(),
                    traffic,
                    max,
                    response: true,
                }
                .boxed_unsync()
            });
            Ok((response, Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

/// A body whose data counts against the sandbox's byte budget; past it, the body ends
/// in an error and the sandbox's traffic says why.
struct Counted {
    inner: WasiBody,
    traffic: Arc<Traffic>,
    max: u64,
    response: bool,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            let total = this.traffic.bytes.fetch_add(n, Ordering::Relaxed) + n;
            if total > this.max {
                this.traffic.exceed(format!(
                    "http byte limit exceeded: more than {} bytes of bodies sent and received",
                    this.max
                ));
                let limit = Some(this.max);
                return Poll::Ready(Some(Err(if this.response {
                    wasmtime_wasi_http::Error::HttpResponseBodySize(limit)
                } else {
                    wasmtime_wasi_http::Error::HttpRequestBodySize(limit)
                })));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_matches_a_host_on_any_port_or_a_host_and_port() {
        let grant = HttpGrant {
            hosts: vec!["pypi.org".into(), "git.example:8443".into()],
        };
        assert!(grant.allows("PyPI.org", 443));
        assert!(grant.allows("pypi.org", 80));
        assert!(grant.allows("git.example", 8443));
        assert!(!grant.allows("git.example", 443));
        assert!(!grant.allows("evil.example", 443));
        assert!(HttpGrant::default().validate().is_ok());
        assert!(
            HttpGrant {
                hosts: vec!["https://x".into()]
            }
            .validate()
            .is_err()
        );
    }
}
