//! The one pooled upstream client of the process: hyper-util's legacy client
//! over rustls (aws-lc-rs), HTTP/1.1 and HTTP/2 by ALPN, with a timer so idle
//! pooled connections are really closed.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::config::UpstreamClient;
use crate::error::{Error, UpstreamFailure};

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The extra CA bundle could not be read or parsed.
    #[error("read upstream CA bundle {path}: {detail}")]
    CaBundle {
        /// File path.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("configure TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The request body type oboe forwards.
pub type UpstreamBody = Incoming;

/// The pooled upstream client.
#[derive(Clone)]
pub struct Upstreams {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
}

/// The rustls client configuration shared by upstream and IdP clients: webpki
/// roots plus an optional extra CA bundle, ALPN set by the connector.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, SetupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let err = |detail: String| SetupError::CaBundle {
            path: path.display().to_string(),
            detail,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificates found".to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An HTTPS-or-HTTP connector with TCP settings for low latency.
pub fn connector(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http)
}

impl Upstreams {
    /// Builds the client from the `upstream` section.
    pub fn new(config: &UpstreamClient) -> Result<Self, SetupError> {
        let tls = tls_config(config.ca_file.as_deref())?;
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(config.max_idle_per_host)
            .build(connector(tls, config.connect_timeout));
        Ok(Self { client })
    }

    /// Sends a request and waits for the response headers within `timeout`.
    /// The body then streams with no overall deadline, so long downloads work.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, Error> {
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => Err(Error::UpstreamTimeout(timeout)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(Error::Upstream {
                kind: classify(&e),
                source: Box::new(e),
            }),
        }
    }
}

fn classify(error: &hyper_util::client::legacy::Error) -> UpstreamFailure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return UpstreamFailure::Timeout;
        }
        source = e.source();
    }
    if error.is_connect() {
        UpstreamFailure::Connect
    } else {
        UpstreamFailure::Protocol
    }
}
