//! oboe: a sidecar that validates a caller's token, obtains a downstream token
//! on the caller's behalf, and forwards the request with it.
//!
//! The binary is a thin CLI over [`run`], which takes already-bound listeners
//! and a shutdown future so tests run the real server on port 0.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod clock;
pub mod config;
pub mod dev;
pub mod error;
pub mod exchange;
pub mod http_client;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use admin::Health;
use config::Config;
use proxy::Proxy;
use telemetry::Metrics;

/// The listeners oboe serves, bound by the caller.
pub struct Listeners {
    /// Where the app sends downstream calls.
    pub proxy: TcpListener,
    /// Probes and metrics.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both addresses of `config`.
    pub async fn bind(config: &Config) -> Result<Self, RunError> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })
        };
        Ok(Self {
            proxy: bind(config.listen).await?,
            admin: bind(config.admin.listen).await?,
        })
    }
}

/// Why oboe could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The request path could not be built.
    #[error("set up proxy: {0}")]
    Setup(#[from] proxy::SetupError),
    /// The token exchange could not be set up (credential unusable).
    #[error("set up token exchange: {0}")]
    Exchange(#[from] exchange::ExchangeSetupError),
}

/// The caller-token validator of `config`'s identity, if it has one.
fn authenticator(
    config: &Config,
    client: http_client::IdpClient,
    clock: clock::SharedClock,
    metrics: Arc<Metrics>,
) -> Option<Arc<auth::Authenticator>> {
    let identity = config.identity.as_ref()?;
    Some(auth::Authenticator::new(
        identity,
        &config.inbound,
        client,
        clock,
        auth::jwks::JwksSettings::default(),
        metrics,
    ))
}

/// Connect timeout towards the IdP when no identity is configured.
pub const IDP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Total timeout of one IdP call.
pub const IDP_TOTAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Installs aws-lc-rs as the process's rustls provider (once; later calls are no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Runs oboe until `shutdown` completes, then drains: readiness goes false,
/// the proxy listener closes, and in-flight requests get `shutdown_grace` to finish.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    serve(config, None, listeners, shutdown, clock::system()).await
}

/// Like [`run`], with the clock that token lifetimes and cache windows are
/// judged by (tests move a [`clock::ManualClock`] instead of sleeping).
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    clock: clock::SharedClock,
) -> Result<(), RunError> {
    serve(config, None, listeners, shutdown, clock).await
}

/// Like [`run`], and reloads the route file at `path` (from which `config`
/// was loaded) when it changes or on SIGHUP; see [`reload`].
pub async fn run_watching(
    config: Config,
    path: std::path::PathBuf,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    serve(config, Some(path), listeners, shutdown, clock::system()).await
}

async fn serve(
    config: Config,
    watch_path: Option<std::path::PathBuf>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    clock: clock::SharedClock,
) -> Result<(), RunError> {
    install_crypto_provider();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (connect, total) = config
        .identity
        .as_ref()
        .map(|i| (i.connect_timeout, i.timeout))
        .unwrap_or((IDP_CONNECT_TIMEOUT, IDP_TOTAL_TIMEOUT));
    let idp_client =
        http_client::IdpClient::new(config.upstream.ca_file.as_deref(), connect, total)?;
    let auth = authenticator(&config, idp_client.clone(), clock.clone(), metrics.clone());
    if let Some(auth) = &auth {
        auth.start();
        let auth = auth.clone();
        health.set_gate(Some(Arc::new(move || auth.is_ready())));
    }
    let exchange = exchange::Exchanger::new(
        &config,
        idp_client.clone(),
        auth.clone(),
        clock.clone(),
        metrics.clone(),
    )?
    .map(Arc::new);
    let proxy = Proxy::new(&config, auth.clone(), exchange, metrics.clone())?;
    let live = Arc::new(reload::Live::new(
        proxy,
        config.clone(),
        auth,
        idp_client,
        clock,
        metrics.clone(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);

    let admin_task = {
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(server::serve_simple(
            listeners.admin,
            move |req, _peer| admin::handle(req, health.clone(), metrics.clone()),
            admin_stop_rx,
        ))
    };

    let graceful = Arc::new(GracefulShutdown::new());
    let watcher =
        watch_path.map(|path| tokio::spawn(reload::watch(path, live.clone(), stop_rx.clone())));
    let proxy_task = tokio::spawn(server::serve_proxy(
        listeners.proxy,
        live,
        config.limits.clone(),
        metrics.clone(),
        graceful.clone(),
        stop_rx.clone(),
    ));
    health.set_serving();
    tracing::info!(
        listen = %config.listen,
        admin = %config.admin.listen,
        routes = config.routes.len(),
        "oboe ready"
    );

    shutdown.await;
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining in-flight requests");
    health.set_draining();
    // Stop accepting: the accept loop returns and drops the listener.
    let _ = stop_tx.send(true);
    let _ = proxy_task.await;
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    // The accept loop has ended, so this is the last reference.
    if let Ok(graceful) = Arc::try_unwrap(graceful) {
        match tokio::time::timeout(config.shutdown_grace, graceful.shutdown()).await {
            Ok(()) => tracing::info!("all requests finished"),
            Err(_) => tracing::warn!("shutdown grace elapsed with requests still in flight"),
        }
    }
    let _ = admin_stop_tx.send(true);
    let _ = admin_task.await;
    Ok(())
}
