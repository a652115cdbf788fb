//! Accept loops for the proxy and admin listeners: connection limits, the
//! HTTP/1.1 + h2c server, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::config::Limits;
use crate::error::Error;
use crate::proxy::headers::ClientInfo;
use crate::telemetry::Metrics;

/// Slow clients get this long to send a request head (slowloris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP server builder shared by both listeners: HTTP/1.1 and h2c (prior
/// knowledge), with the request-head size limit.
pub fn http_builder(max_header_bytes: usize) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    builder
}

/// Accepts proxy connections until `stop` turns true, then drops the listener
/// so new connections are refused; in-flight ones are tracked by `graceful`.
pub async fn serve_proxy(
    listener: TcpListener,
    live: Arc<crate::reload::Live>,
    limits: Limits,
    metrics: Arc<Metrics>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = Arc::new(http_builder(limits.max_header_bytes));
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept proxy connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        match connections.clone().try_acquire_owned() {
            Ok(permit) => {
                let live = live.clone();
                let client = ClientInfo {
                    ip: peer.ip(),
                    proto: "http",
                };
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    // Each request holds the configuration it started with, so
                    // a reload never changes a request halfway.
                    let proxy = live.proxy.load_full();
                    // Boxed once here, so hyper moves a pointer, not the whole
                    // request state machine.
                    Box::pin(async move { Ok::<_, Infallible>(proxy.handle(req, client).await) })
                });
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                let metrics = metrics.clone();
                metrics.connections.inc();
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "proxy connection ended with an error");
                    }
                    metrics.connections.dec();
                    drop(permit);
                });
            }
            Err(_) => {
                metrics.connections_refused.inc();
                tokio::spawn(refuse_connection(stream, limits.max_connections));
            }
        }
    }
    tracing::info!("proxy listener closed");
}

/// Answers one request on an over-limit connection with 503 and closes it, so
/// a saturated sidecar says so instead of hanging.
async fn refuse_connection(stream: TcpStream, limit: usize) {
    let service = service_fn(move |_req: hyper::Request<Incoming>| async move {
        let mut response = Error::Overloaded { limit }.into_response(None);
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        Ok::<_, Infallible>(response)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

/// Serves a simple handler on `listener` until `stop` turns true.
pub async fn serve_simple<F, Fut>(
    listener: TcpListener,
    handler: F,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(hyper::Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<http_body_util::Full<bytes::Bytes>>> + Send + 'static,
{
    let builder = Arc::new(http_builder(16 * 1024));
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let builder = builder.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req, peer).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped(&mut stop) => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
