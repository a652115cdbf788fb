//! The floor of oboe's HTTP stack, for `bench/run.sh` (setup `hyper-floor`):
//! the smallest keep-alive reverse proxy built from the same parts as oboe's
//! listener and upstream client, configured the same way (tokio's
//! single-threaded runtime, hyper-util's auto server with timers, hyper-util's
//! pooled client with `TCP_NODELAY`), and none of oboe's own work: no routing,
//! path check, header rewrite, metrics, access log or token handling.
//!
//! What oboe's pass-through route costs above this is oboe's; what this costs
//! above nginx is the stack's.
//!
//! With `--same-task` (setup `hyper-same-task`), an experiment rather than a
//! floor: each client connection (HTTP/1.1) gets one upstream connection of
//! its own, driven by hyper's low-level client inside the client connection's
//! task, the way nginx handles both sides of a request in one event loop. No
//! pool, no task per upstream connection, no channel between them. It measures
//! what replacing hyper-util's pooled client would be worth.
//!
//! ```sh
//! cargo run --release --example bare_proxy -- 127.0.0.1:8080 http://127.0.0.1:9000 [--same-task]
//! ```
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

type Upstream = Client<HttpConnector, Incoming>;
/// The upstream's body, or nothing for the proxy's own 400/502.
type Body = Either<Incoming, Empty<Bytes>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN_ADDR UPSTREAM_URL [--same-task]";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstream: http::Uri = args.next().ok_or(usage)?.parse()?;
    let authority = upstream.authority().ok_or(usage)?.clone();
    let same_task = match args.next().as_deref() {
        None => false,
        Some("--same-task") => true,
        Some(_) => return Err(usage.into()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if same_task {
        runtime.block_on(serve_same_task(listen, authority))
    } else {
        runtime.block_on(serve(listen, authority))
    }
}

async fn serve(
    listen: SocketAddr,
    upstream: http::uri::Authority,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let mut server = auto::Builder::new(TokioExecutor::new());
    server.http1().timer(TokioTimer::new());
    server.http2().timer(TokioTimer::new());
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, upstream, server) = (client.clone(), upstream.clone(), server.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let (client, upstream) = (client.clone(), upstream.clone());
                Box::pin(
                    async move { Ok::<_, Infallible>(forward(&client, upstream, request).await) },
                )
            });
            let _ = server.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// One upstream connection per client connection, both driven by the client
/// connection's task.
async fn serve_same_task(
    listen: SocketAddr,
    upstream: http::uri::Authority,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(upstream_stream) = tokio::net::TcpStream::connect(upstream.as_str()).await
            else {
                return;
            };
            let _ = upstream_stream.set_nodelay(true);
            let Ok((sender, connection)) =
                hyper::client::conn::http1::handshake(TokioIo::new(upstream_stream)).await
            else {
                return;
            };
            // HTTP/1.1 answers requests in order, so the client connection
            // has at most one request in flight: the lock is never contended.
            let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
            let service = service_fn(move |request: Request<Incoming>| {
                let sender = sender.clone();
                async move {
                    let mut sender = sender.lock().await;
                    let response = match sender.ready().await {
                        Ok(()) => sender.send_request(request).await.ok(),
                        Err(_) => None,
                    };
                    Ok::<_, Infallible>(match response {
                        Some(response) => response.map(Either::Left),
                        None => status(StatusCode::BAD_GATEWAY),
                    })
                }
            });
            let server = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            // Both halves in this task; when the client leaves, the service
            // and its sender drop, and the upstream connection closes.
            let _ = tokio::join!(server, connection);
        });
    }
}

/// The request to the upstream, as it came (path and query kept); a failure
/// is a bare 502.
async fn forward(
    client: &Upstream,
    upstream: http::uri::Authority,
    request: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let mut uri = http::uri::Parts::from(parts.uri);
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(upstream);
    let Ok(uri) = http::Uri::from_parts(uri) else {
        return status(StatusCode::BAD_REQUEST);
    };
    parts.uri = uri;
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => response.map(Either::Left),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = code;
    response
}
