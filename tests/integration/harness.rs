#![allow(dead_code)] // shared helpers; not every test module uses every one
//! What every integration test needs: the real oboe on loopback port 0 (in this
//! process, or the real binary), upstreams written here with hyper or raw
//! sockets, and clients that report what a user would see.
//!
//! Nothing here stands in for oboe's own code. Waiting is always for a state
//! (readiness, a request having arrived), never for a fixed time.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Errors carried by test bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every request a test sends and every response an upstream answers.
pub type TestBody = BoxBody<Bytes, BoxError>;

/// Upper bound on any single wait in a test: a hang fails the test instead of
/// stalling the suite.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Awaits `future`, failing the test if it takes longer than [`PATIENCE`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A loopback listener on a port the OS picks.
pub async fn bind_loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback listener on port 0")
}

/// The YAML of a route that needs no caller token and sends none upstream.
/// `extra` is appended under the route (indent it by four spaces).
pub fn open_route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    path_prefix: {prefix}\n    upstream: {upstream}\n    caller: {{ required: false }}\n    token: {{ grant: none }}\n{extra}"
    )
}

// ---------------------------------------------------------------------------
// oboe in this process
// ---------------------------------------------------------------------------

/// The real oboe, run in this test's runtime with listeners on port 0.
pub struct Oboe {
    /// Proxy listener address.
    pub proxy: SocketAddr,
    /// Admin listener address.
    pub admin: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), oboe::RunError>>>,
}

impl Oboe {
    /// Starts oboe with `yaml` and waits until `/readyz` answers 200.
    ///
    /// `$PROXY_ADDR` and `$ADMIN_ADDR` in the YAML are replaced with the bound
    /// addresses; when the file has no top-level `listen:`, both listener keys
    /// are added.
    pub async fn start(yaml: &str) -> Self {
        Self::start_with_clock(yaml, oboe::clock::system()).await
    }

    /// Like [`Oboe::start`], judging time by `clock`.
    pub async fn start_with_clock(yaml: &str, clock: oboe::clock::SharedClock) -> Self {
        let proxy_listener = bind_loopback().await;
        let admin_listener = bind_loopback().await;
        let proxy = proxy_listener.local_addr().expect("proxy address");
        let admin = admin_listener.local_addr().expect("admin address");
        let mut yaml = yaml
            .replace("$PROXY_ADDR", &proxy.to_string())
            .replace("$ADMIN_ADDR", &admin.to_string());
        if !yaml.lines().any(|l| l.starts_with("listen:")) {
            yaml = format!("listen: {proxy}\nadmin: {{ listen: {admin} }}\n{yaml}");
        }
        let config = oboe::config::load_str(&yaml, figment::providers::Env::raw().only(&[]))
            .unwrap_or_else(|e| panic!("test route file is invalid: {e}\n{yaml}"));
        let (tx, rx) = oneshot::channel::<()>();
        let listeners = oboe::Listeners {
            proxy: proxy_listener,
            admin: admin_listener,
        };
        let task = tokio::spawn(oboe::run_with_clock(
            config,
            listeners,
            async move {
                let _ = rx.await;
            },
            clock,
        ));
        let oboe = Self {
            proxy,
            admin,
            shutdown: Some(tx),
            task: Some(task),
        };
        wait_ready(admin).await;
        oboe
    }

    /// `http://<proxy>` followed by `path`.
    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// `http://<admin>` followed by `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Starts draining (as SIGTERM does) and returns the running server, so a
    /// test can watch the drain before awaiting its end with [`Drain::finished`].
    pub fn begin_shutdown(mut self) -> Drain {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        Drain {
            task: self.task.take().expect("oboe is running"),
        }
    }

    /// Shuts down and returns what `oboe::run` returned.
    pub async fn shutdown(self) -> Result<(), oboe::RunError> {
        self.begin_shutdown().finished().await
    }

    /// The current `/metrics` text.
    pub async fn metrics(&self) -> String {
        Client::http1()
            .get(&self.admin_url("/metrics"))
            .await
            .text()
    }
}

impl Drop for Oboe {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// An oboe that has been told to shut down.
pub struct Drain {
    task: JoinHandle<Result<(), oboe::RunError>>,
}

impl Drain {
    /// Waits for `oboe::run` to return.
    pub async fn finished(self) -> Result<(), oboe::RunError> {
        within("oboe to finish draining", self.task)
            .await
            .expect("oboe::run panicked")
    }
}

/// Polls `/readyz` until it answers 200.
pub async fn wait_ready(admin: SocketAddr) {
    let client = Client::http1();
    let url = format!("http://{admin}/readyz");
    within("/readyz to answer 200", async {
        loop {
            if let Ok(reply) = client.try_send(get_request(&url)).await
                && reply.status == StatusCode::OK
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Polls until `condition` holds (a state the test cannot be notified of).
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// The value of one sample line in Prometheus text, e.g.
/// `oboe_requests_total{route="echo",method="GET",status="2xx"}`; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().expect("a numeric sample"))
        })
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// oboe as a separate process (the real binary)
// ---------------------------------------------------------------------------

/// The `oboe` binary with the test's environment cleared of `OBOE_*`
/// variables, so only what a test sets applies.
pub fn oboe_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_oboe"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OBOE_") {
            command.env_remove(key);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// A running `oboe run` process, its stderr captured in a file.
pub struct OboeProcess {
    /// The process.
    pub child: Child,
    /// Proxy listener address.
    pub proxy: SocketAddr,
    /// Admin listener address.
    pub admin: SocketAddr,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl OboeProcess {
    /// Writes `routes_yaml` (no `listen`/`admin` keys; `shutdown_grace`
    /// defaults to 10s) to a file and runs `oboe run --config` on it with JSON
    /// logs, then waits for readiness.
    ///
    /// The binary binds the addresses its route file names, so free ports are
    /// taken from the OS just before; if another process grabs one in between,
    /// the start is retried with new ports.
    pub async fn start(routes_yaml: &str) -> Self {
        Self::start_with_log(routes_yaml, "info").await
    }

    /// Like [`OboeProcess::start`], with `OBOE_LOG` set to `level`.
    pub async fn start_with_log(routes_yaml: &str, level: &str) -> Self {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (proxy, admin) = (free_port().await, free_port().await);
            let config_path = dir.path().join("oboe.yaml");
            let grace = if routes_yaml.contains("shutdown_grace:") {
                ""
            } else {
                "shutdown_grace: 10s\n"
            };
            let yaml =
                format!("listen: {proxy}\nadmin: {{ listen: {admin} }}\n{grace}{routes_yaml}");
            std::fs::write(&config_path, yaml).expect("write route file");
            let stderr_path = dir.path().join("stderr.log");
            let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
            let child = oboe_command()
                .args(["run", "--config"])
                .arg(&config_path)
                .env("OBOE_LOG_FORMAT", "json")
                .env("OBOE_LOG", level)
                .stdout(Stdio::null())
                .stderr(Stdio::from(stderr))
                .spawn()
                .expect("spawn the oboe binary");
            let mut process = Self {
                child,
                proxy,
                admin,
                stderr_path,
                _dir: dir,
            };
            if process.wait_ready().await {
                return process;
            }
            let log = process.stderr();
            assert!(
                log.contains("bind"),
                "oboe exited before becoming ready:\n{log}"
            );
        }
        panic!("could not start oboe on free ports after 5 attempts");
    }

    /// True once `/readyz` answers 200; false if the process exited first.
    async fn wait_ready(&mut self) -> bool {
        let client = Client::http1();
        let url = format!("http://{}/readyz", self.admin);
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if self.child.try_wait().expect("poll child").is_some() {
                return false;
            }
            if let Ok(reply) = client.try_send(get_request(&url)).await
                && reply.status == StatusCode::OK
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("oboe did not become ready:\n{}", self.stderr());
    }

    /// `http://<proxy>` followed by `path`.
    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// `http://<admin>` followed by `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "oboe did not exit:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for OboeProcess {
    fn drop(&mut self) {
        // Only our own child, by its handle.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback address whose port was free a moment ago.
pub async fn free_port() -> SocketAddr {
    bind_loopback().await.local_addr().expect("address")
}

/// A loopback address where nothing listens (connections are refused).
pub async fn closed_port() -> SocketAddr {
    free_port().await
}

// ---------------------------------------------------------------------------
// clients
// ---------------------------------------------------------------------------

/// What a client saw: status, version, headers and the whole body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("ASCII"))
    }

    /// Asserts an RFC 9457 problem answer oboe made itself, and returns its body.
    pub fn assert_problem(&self, status: u16, code: &str) -> serde_json::Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "status; body: {}",
            self.text()
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "content type"
        );
        let body = self.json();
        assert_eq!(body["error"], code, "error code in {body}");
        assert_eq!(body["status"], status, "status member in {body}");
        body
    }
}

/// An HTTP client towards oboe or an upstream: HTTP/1.1, or h2c with prior knowledge.
#[derive(Clone)]
pub struct Client {
    inner: LegacyClient<HttpConnector, TestBody>,
}

impl Client {
    /// HTTP/1.1 with keep-alive.
    pub fn http1() -> Self {
        Self {
            inner: LegacyClient::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .build_http(),
        }
    }

    /// HTTP/2 over cleartext with prior knowledge (h2c).
    pub fn h2c() -> Self {
        Self {
            inner: LegacyClient::builder(TokioExecutor::new())
                .http2_only(true)
                .timer(TokioTimer::new())
                .build_http(),
        }
    }

    /// Sends `request` and returns the response head with its body still streaming.
    pub async fn stream(&self, request: Request<TestBody>) -> Response<Incoming> {
        within("response headers", self.inner.request(request))
            .await
            .expect("send request")
    }

    /// Sends `request` and reads the whole answer.
    pub async fn send(&self, request: Request<TestBody>) -> Reply {
        self.try_send(request).await.expect("send request")
    }

    /// Like [`Client::send`], but a failure to connect or read is returned.
    pub async fn try_send(&self, request: Request<TestBody>) -> Result<Reply, BoxError> {
        within("a complete response", async {
            let response = self.inner.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok(Reply {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        })
        .await
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Reply {
        self.send(get_request(url)).await
    }
}

/// A `GET` with no body.
pub fn get_request(url: &str) -> Request<TestBody> {
    Request::get(url).body(empty()).expect("request")
}

/// An empty body.
pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Reads a streaming body to its end, returning how many bytes came and the
/// error that ended it early, if one did.
pub async fn drain_body(mut body: Incoming) -> (u64, Option<hyper::Error>) {
    let mut total = 0;
    while let Some(frame) = within("the next body frame", body.frame()).await {
        match frame {
            Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => return (total, Some(e)),
        }
    }
    (total, None)
}

/// Sends `request` as raw bytes and reads until the server closes. For what
/// clients would rewrite (dot-segments) or refuse to send. Add `Connection: close`.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawReply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut out = Vec::new();
    within("the server to close", stream.read_to_end(&mut out))
        .await
        .expect("read response");
    RawReply::parse(&out)
}

/// An HTTP/1.1 response as bytes on the wire.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    fn parse(bytes: &[u8]) -> Self {
        let split = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)));
        let head = std::str::from_utf8(&bytes[..split]).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Self {
            status,
            headers,
            body: bytes[split + 4..].to_vec(),
        }
    }

    /// A header's first value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (bodies with a `Content-Length`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

// ---------------------------------------------------------------------------
// upstreams
// ---------------------------------------------------------------------------

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

/// An upstream server started by the test, and what it has received.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests (or, for raw upstreams, connections) it has received.
    pub requests: Arc<AtomicUsize>,
    /// The last request head it received (hyper upstreams only).
    pub last: Arc<Mutex<Option<http::request::Parts>>>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// `http://<addr>` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How many requests it has received.
    pub fn received(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The last request head it received.
    pub fn last_request(&self) -> http::request::Parts {
        self.last
            .lock()
            .expect("lock")
            .clone()
            .expect("the upstream received a request")
    }

    /// A hyper server (HTTP/1.1 and h2c) answering with `handler`, counting requests.
    pub async fn serve<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        Self::serve_on(bind_loopback().await, handler, None).await
    }

    async fn serve_on(
        listener: TcpListener,
        handler: Handler,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let addr = listener.local_addr().expect("address");
        let requests = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(None));
        let (count, record) = (requests.clone(), last.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (handler, count, record, tls) =
                    (handler.clone(), count.clone(), record.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        count.fetch_add(1, Ordering::SeqCst);
                        let (parts, body) = req.into_parts();
                        *record.lock().expect("lock") = Some(parts.clone());
                        let answer = handler(Request::from_parts(parts, body));
                        async move { Ok::<_, Infallible>(answer.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            requests,
            last,
            task,
        }
    }

    /// oboe's own echo upstream (`oboe::dev::echo`): answers with the method,
    /// path, query, version, headers and body size it received, as JSON.
    pub async fn echo() -> Self {
        Self::serve(|req| async move {
            let response = oboe::dev::echo::echo(req).await.expect("infallible");
            response.map(|b| b.map_err(|never| match never {}).boxed())
        })
        .await
    }

    /// The echo upstream over TLS, with a certificate for `127.0.0.1` issued by
    /// a CA made for the test, offering `alpn` protocols.
    pub async fn tls_echo(ca: &TestCa, alpn: &[&[u8]]) -> Self {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![ca.leaf_der.clone()], ca.leaf_key())
        .expect("server certificate");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let handler: Handler = Arc::new(|req| {
            Box::pin(async move {
                let response = oboe::dev::echo::echo(req).await.expect("infallible");
                response.map(|b| b.map_err(|never| match never {}).boxed())
            })
        });
        Self::serve_on(bind_loopback().await, handler, Some(acceptor)).await
    }

    /// Answers every request with a fixed status, headers and body.
    pub async fn fixed(status: u16, headers: &[(&str, &str)], body: &'static str) -> Self {
        let headers: Vec<(HeaderName, String)> = headers
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    v.to_string(),
                )
            })
            .collect();
        Self::serve(move |_req| {
            let mut response = Response::new(full(body));
            *response.status_mut() = StatusCode::from_u16(status).expect("status");
            for (name, value) in &headers {
                response
                    .headers_mut()
                    .append(name.clone(), value.parse().expect("value"));
            }
            async move { response }
        })
        .await
    }

    /// Answers with a body of `len` bytes generated while it is sent, with a
    /// `Content-Length`. Nothing of that size is ever held in memory here.
    pub async fn download(len: u64) -> Self {
        Self::serve(move |_req| async move {
            let mut response = Response::new(GeneratedBody::new(len, None).boxed());
            response
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, len.into());
            response
        })
        .await
    }

    /// Holds each request until the test releases it; see [`Held`].
    pub async fn held() -> (Self, Held) {
        let arrived = Arc::new(Notify::new());
        let (release_tx, release_rx) = mpsc::unbounded_channel::<Response<TestBody>>();
        let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
        let signal = arrived.clone();
        let upstream = Self::serve(move |_req| {
            let (signal, release_rx) = (signal.clone(), release_rx.clone());
            async move {
                signal.notify_one();
                release_rx
                    .lock()
                    .await
                    .recv()
                    .await
                    .unwrap_or_else(|| Response::new(empty()))
            }
        })
        .await;
        (
            upstream,
            Held {
                arrived,
                release: release_tx,
            },
        )
    }

    /// Answers with a chunked body whose chunks the test sends one by one.
    pub async fn drip() -> (Self, mpsc::Sender<Bytes>) {
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let rx = Arc::new(Mutex::new(Some(rx)));
        let upstream = Self::serve(move |_req| {
            let rx = rx.lock().expect("lock").take();
            async move {
                let Some(rx) = rx else {
                    return Response::new(full("only one drip per test"));
                };
                let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|chunk| (Ok::<_, BoxError>(Frame::data(chunk)), rx))
                });
                Response::new(StreamBody::new(frames).boxed())
            }
        })
        .await;
        (upstream, tx)
    }

    /// Reports each request body's fate on the returned channel: its size if it
    /// arrived whole, the error if it was cut; answers 200 either way.
    pub async fn body_sink() -> (Self, mpsc::UnboundedReceiver<Result<u64, String>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let upstream = Self::serve(move |req| {
            let tx = tx.clone();
            async move {
                let (total, error) = drain_body(req.into_body()).await;
                let _ = tx.send(match error {
                    None => Ok(total),
                    Some(e) => Err(e.to_string()),
                });
                Response::new(empty())
            }
        })
        .await;
        (upstream, rx)
    }

    /// A socket-level upstream: for each connection, reads the request head,
    /// writes `response` verbatim and closes. For answers hyper would not send
    /// (hop-by-hop response headers, a body cut short).
    pub async fn raw(response: &'static [u8]) -> Self {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("address");
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if read_head(&mut stream).await {
                        let _ = stream.write_all(response).await;
                        let _ = stream.flush().await;
                    }
                    // Dropping the stream closes the connection.
                });
            }
        });
        Self {
            addr,
            requests,
            last: Arc::new(Mutex::new(None)),
            task,
        }
    }

    /// Accepts connections and reads requests but never answers.
    pub async fn silent() -> Self {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("address");
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    // Keep the connection open, and read so nothing backs up.
                    let mut sink = [0u8; 4096];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                });
            }
        });
        Self {
            addr,
            requests,
            last: Arc::new(Mutex::new(None)),
            task,
        }
    }
}

/// Reads up to the end of a request head; false if the peer closed first.
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    loop {
        match stream.read(&mut byte).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&byte[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return true;
        }
    }
}

/// The test's side of [`Upstream::held`].
pub struct Held {
    arrived: Arc<Notify>,
    release: mpsc::UnboundedSender<Response<TestBody>>,
}

impl Held {
    /// Waits until a request has reached the upstream.
    pub async fn arrived(&self) {
        within("a request to reach the upstream", self.arrived.notified()).await;
    }

    /// Lets one held request be answered with 200 and `body`.
    pub fn release(&self, body: &'static str) {
        self.release
            .send(Response::new(full(body)))
            .expect("the upstream is running");
    }
}

/// A body of `len` bytes made in 64 KiB chunks as it is polled, optionally
/// sampling this process's resident memory as it goes.
pub struct GeneratedBody {
    remaining: u64,
    chunk: Bytes,
    polls: u64,
    rss: Option<Arc<RssPeak>>,
}

impl GeneratedBody {
    const CHUNK: usize = 64 * 1024;

    /// A body of `len` bytes; `rss` is sampled every 16 chunks when given.
    pub fn new(len: u64, rss: Option<Arc<RssPeak>>) -> Self {
        Self {
            remaining: len,
            chunk: Bytes::from(vec![b'x'; Self::CHUNK]),
            polls: 0,
            rss,
        }
    }

    /// Boxed, for requests and responses.
    pub fn boxed(self) -> TestBody {
        BoxBody::new(self)
    }
}

impl Body for GeneratedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        self.polls += 1;
        if self.polls.is_multiple_of(16)
            && let Some(rss) = &self.rss
        {
            rss.sample();
        }
        let n = self.remaining.min(Self::CHUNK as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// This process's resident memory (`VmRSS`) in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc/self/status")
}

/// The highest resident memory seen since creation, above the level at creation.
pub struct RssPeak {
    baseline: u64,
    peak: AtomicUsize,
}

impl RssPeak {
    /// Records the current level as the baseline.
    pub fn start() -> Arc<Self> {
        let baseline = rss_bytes();
        Arc::new(Self {
            baseline,
            peak: AtomicUsize::new(baseline as usize),
        })
    }

    /// Takes one sample.
    pub fn sample(&self) {
        self.peak.fetch_max(rss_bytes() as usize, Ordering::SeqCst);
    }

    /// Peak growth over the baseline, in bytes.
    pub fn growth(&self) -> u64 {
        (self.peak.load(Ordering::SeqCst) as u64).saturating_sub(self.baseline)
    }
}

// ---------------------------------------------------------------------------
// TLS material
// ---------------------------------------------------------------------------

/// A CA made for one test, a server certificate for `127.0.0.1` it issued, and
/// the CA's PEM written to a file for `upstream.ca_file`.
pub struct TestCa {
    /// The CA certificate as PEM, on disk.
    pub ca_file: PathBuf,
    /// The server certificate (for 127.0.0.1) as PEM, on disk, for servers
    /// that read files (`redis-server --tls-cert-file`).
    pub cert_file: PathBuf,
    /// Its private key as PEM, on disk.
    pub key_file: PathBuf,
    leaf_der: rustls_pki_types::CertificateDer<'static>,
    leaf_key_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestCa {
    /// Makes the CA and the server certificate.
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "oboe integration-test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().expect("server key");
        let mut leaf_params = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("server certificate params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "upstream.test");
        let leaf = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("issue server certificate");

        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write CA file");
        let cert_file = dir.path().join("server.pem");
        std::fs::write(&cert_file, leaf.pem()).expect("write server certificate");
        let key_file = dir.path().join("server-key.pem");
        std::fs::write(&key_file, leaf_key.serialize_pem()).expect("write server key");
        Self {
            ca_file,
            cert_file,
            key_file,
            leaf_der: leaf.der().clone(),
            leaf_key_der: leaf_key.serialize_der(),
            _dir: dir,
        }
    }

    fn leaf_key(&self) -> rustls_pki_types::PrivateKeyDer<'static> {
        rustls_pki_types::PrivateKeyDer::Pkcs8(self.leaf_key_der.clone().into())
    }

    /// A TLS front on loopback for a plain-TCP `target` (HTTP/1.1 only), with
    /// this CA's server certificate: bytes are copied both ways.
    pub async fn tls_tunnel(&self, target: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![self.leaf_der.clone()], self.leaf_key())
        .expect("server certificate");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let (Ok(mut tls), Ok(mut plain)) = (
                        acceptor.accept(stream).await,
                        tokio::net::TcpStream::connect(target).await,
                    ) else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        (addr, task)
    }

    /// The CA file path as it goes in YAML.
    pub fn ca_path(&self) -> &Path {
        &self.ca_file
    }
}
