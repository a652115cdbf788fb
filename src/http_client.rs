//! A small client for talking to identity providers (discovery, keys, token
//! endpoint): pooled, rustls, connect and total timeouts, never follows
//! redirects, and caps how much of an answer it reads.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::proxy::upstream::{SetupError, connector, tls_config};

/// Largest IdP answer read (discovery documents and key sets are a few KiB).
pub const MAX_IDP_BODY: usize = 256 * 1024;

/// Why a call to the IdP failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL could not be used.
    #[error("build request for {url}: {detail}")]
    BadUrl {
        /// URL.
        url: String,
        /// Detail.
        detail: String,
    },
    /// The IdP could not be reached or the connection broke.
    #[error("call {url}: {source}")]
    Unreachable {
        /// URL.
        url: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No complete answer within the total timeout.
    #[error("call {url}: no answer within {timeout:?}")]
    Timeout {
        /// URL.
        url: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The answer was larger than the cap.
    #[error("read answer of {url}: larger than {MAX_IDP_BODY} bytes")]
    TooLarge {
        /// URL.
        url: String,
    },
    /// The answer's status was not what was expected.
    #[error("call {url}: unexpected status {status}")]
    Status {
        /// URL.
        url: String,
        /// Status.
        status: StatusCode,
    },
    /// The answer was not the JSON expected.
    #[error("parse answer of {url}: {detail}")]
    BadJson {
        /// URL.
        url: String,
        /// Detail.
        detail: String,
    },
}

/// An answer read whole (within the cap).
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// The IdP client.
#[derive(Clone)]
pub struct IdpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    total_timeout: Duration,
}

impl IdpClient {
    /// Builds a client; `ca_file` adds trusted CAs beside the web PKI roots.
    pub fn new(
        ca_file: Option<&std::path::Path>,
        connect_timeout: Duration,
        total_timeout: Duration,
    ) -> Result<Self, SetupError> {
        let tls = tls_config(ca_file)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector(tls, connect_timeout));
        Ok(Self {
            client,
            total_timeout,
        })
    }

    /// Sends a request and reads the whole answer within the total timeout.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Answer, FetchError> {
        let mut request = Request::builder()
            .method(method)
            .uri(url)
            .body(Full::new(body))
            .map_err(|e| FetchError::BadUrl {
                url: url.to_owned(),
                detail: e.to_string(),
            })?;
        request.headers_mut().extend(headers);
        let call = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|e| FetchError::Unreachable {
                        url: url.to_owned(),
                        source: Box::new(e),
                    })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_IDP_BODY)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        FetchError::TooLarge {
                            url: url.to_owned(),
                        }
                    } else {
                        FetchError::Unreachable {
                            url: url.to_owned(),
                            source: e,
                        }
                    }
                })?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.total_timeout, call)
            .await
            .map_err(|_| FetchError::Timeout {
                url: url.to_owned(),
                timeout: self.total_timeout,
            })?
    }

    /// GETs a JSON document; anything but 200 with a JSON object is an error.
    pub async fn get_json(&self, url: &str) -> Result<(serde_json::Value, HeaderMap), FetchError> {
        let answer = self
            .send(Method::GET, url, HeaderMap::new(), Bytes::new())
            .await?;
        if answer.status != StatusCode::OK {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: answer.status,
            });
        }
        let value: serde_json::Value =
            serde_json::from_slice(&answer.body).map_err(|e| FetchError::BadJson {
                url: url.to_owned(),
                detail: e.to_string(),
            })?;
        if !value.is_object() {
            return Err(FetchError::BadJson {
                url: url.to_owned(),
                detail: "not a JSON object".to_owned(),
            });
        }
        Ok((value, answer.headers))
    }
}
