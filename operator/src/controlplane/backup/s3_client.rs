//! The HTTP transport of the S3 backup store: an `object_store` [`HttpConnector`] over the
//! hyper-util client and hyper-rustls on ring, the stack kube's client already uses.
//!
//! Why not `object_store`'s own reqwest transport: its `aws` feature builds aws-lc-rs (a
//! cmake C build), and reqwest with `rustls-no-provider` makes every other reqwest client
//! of the binary panic unless a process-wide rustls provider is installed first (see the
//! root `Cargo.toml`). This connector names its provider (ring) itself and touches no
//! process-wide state.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector as PlainConnector;
use hyper_util::rt::TokioExecutor;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse, HttpResponseBody,
    HttpService,
};
use object_store::{ClientConfigKey, ClientOptions};

/// How long establishing a connection (TCP and TLS) may take: `object_store`'s default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may wait for the response's head: `object_store`'s default request
/// timeout.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading a response body may wait for its next bytes ([`S3Options::read_timeout`]
/// by default): an idle bound rather than a deadline for the whole body, since a body's
/// size (a page, a segment) varies and a slow but moving transfer is fine, while a stalled
/// one would hang the backup or restore task for good. A stalled read fails as a timeout,
/// which `object_store` retries for a GET (resuming from the bytes it has).
///
/// [`S3Options::read_timeout`]: super::S3Options::read_timeout
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections are closed after this (S3 closes them after about 20 s anyway).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Builds the HTTP clients of an S3 store: HTTPS with the system's root certificates (on
/// ring), plain HTTP only when the store's options allow it (`allow_http`, and
/// `object_store`'s own metadata-endpoint client).
#[derive(Debug, Clone, Copy)]
pub struct HyperConnector {
    read_timeout: Duration,
}

impl Default for HyperConnector {
    fn default() -> Self {
        HyperConnector { read_timeout: READ_TIMEOUT }
    }
}

impl HyperConnector {
    /// Waiting longer than `read_timeout` for a response body's next bytes fails the read.
    pub fn with_read_timeout(read_timeout: Duration) -> Self {
        HyperConnector { read_timeout }
    }
}

impl HttpConnector for HyperConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let allow_http = options.get_config_value(&ClientConfigKey::AllowHttp).as_deref() == Some("true");
        let mut plain = PlainConnector::new();
        // The TLS layer above takes `https` URLs; this one must let them through.
        plain.enforce_http(false);
        plain.set_connect_timeout(Some(CONNECT_TIMEOUT));
        plain.set_nodelay(true);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: format!("failed to load the system's root certificates for HTTPS: {e}").into(),
            })?;
        let tls = if allow_http { tls.https_or_http() } else { tls.https_only() };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(tls.enable_http1().wrap_connector(plain));
        Ok(HttpClient::new(HyperService { client, read_timeout: self.read_timeout }))
    }
}

/// One connection pool; `object_store` retries what [`HttpErrorKind`] says it may.
#[derive(Debug)]
struct HyperService {
    client: Client<HttpsConnector<PlainConnector>, HttpRequestBody>,
    read_timeout: Duration,
}

#[async_trait]
impl HttpService for HyperService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| {
                let timed_out = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no response within {} s", RESPONSE_TIMEOUT.as_secs()),
                );
                HttpError::new(HttpErrorKind::Timeout, timed_out)
            })?
            .map_err(|e| {
                let kind = if e.is_connect() { HttpErrorKind::Connect } else { kind_of(&e, HttpErrorKind::Request) };
                HttpError::new(kind, e)
            })?;
        let (parts, body) = response.into_parts();
        let body = body.map_err(|e| {
            let kind = kind_of(&e, HttpErrorKind::Interrupted);
            HttpError::new(kind, e)
        });
        let body = IdleTimeoutBody::new(body, self.read_timeout);
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// A response body whose every read fails once it waited `idle` for the server's next
/// frame. Only the time spent waiting on the server counts: the clock starts when a read
/// finds nothing ready, so a reader slow to come back (an import applying the last page)
/// is never taken for a stalled server.
struct IdleTimeoutBody<B> {
    inner: B,
    idle: Duration,
    /// Armed while a read waits for the server; `None` between reads.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleTimeoutBody<B> {
    fn new(inner: B, idle: Duration) -> Self {
        IdleTimeoutBody { inner, idle, timer: None }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes, Error = HttpError> + Unpin,
{
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.timer = None;
            return Poll::Ready(frame);
        }
        let idle = this.idle;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.timer = None;
                let stalled = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "failed to read the response body: no data from the S3 server for {:.1} s",
                        idle.as_secs_f64()
                    ),
                );
                Poll::Ready(Some(Err(HttpError::new(HttpErrorKind::Timeout, stalled))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What kind of failure `error` is, from its chain of causes (as `object_store` classifies
/// reqwest's): timeouts and broken connections are retried, anything unrecognised is
/// `otherwise`.
fn kind_of(error: &(dyn StdError + 'static), otherwise: HttpErrorKind) -> HttpErrorKind {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_timeout() {
                return HttpErrorKind::Timeout;
            }
            if e.is_closed() || e.is_incomplete_message() || e.is_body_write_aborted() || e.is_canceled() {
                return HttpErrorKind::Request;
            }
        }
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            match e.kind() {
                std::io::ErrorKind::TimedOut => return HttpErrorKind::Timeout,
                std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => return HttpErrorKind::Interrupted,
                _ => {}
            }
        }
        cause = e.source();
    }
    otherwise
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_client_failures_are_classified_from_their_causes() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        assert_eq!(kind_of(&reset, HttpErrorKind::Unknown), HttpErrorKind::Interrupted);
        let slow = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        assert_eq!(kind_of(&slow, HttpErrorKind::Unknown), HttpErrorKind::Timeout);
        let other = std::io::Error::other("something else");
        assert_eq!(kind_of(&other, HttpErrorKind::Decode), HttpErrorKind::Decode);
    }
}
