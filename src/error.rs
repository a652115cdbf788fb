//! One error taxonomy for everything oboe answers itself, and the single place
//! where an error becomes a response.
//!
//! Every error knows who is to blame (as pingora does it): the caller, the IdP,
//! the upstream, or oboe itself. The status code, the stable `error` code of
//! the RFC 9457 problem body and the RFC 6750 `WWW-Authenticate` challenge all
//! follow from one exhaustive `match` in [`Error::problem`]; there is no other
//! way to build an error response.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::auth::{AuthError, Forbidden};
use crate::exchange::ExchangeError;
use crate::proxy::route::BadPath;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client calling oboe (bad path, bad token, no permission).
    Caller,
    /// The identity provider.
    Idp,
    /// The upstream oboe forwards to.
    Upstream,
    /// oboe itself (overload, bug).
    Internal,
}

impl Blame {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Caller => "caller",
            Blame::Idp => "idp",
            Blame::Upstream => "upstream",
            Blame::Internal => "internal",
        }
    }
}

/// How an upstream call failed, without the underlying error's text (which can
/// carry addresses) in metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// TCP or TLS connection could not be made.
    Connect,
    /// The connection failed after it was made (reset, bad HTTP, closed early).
    Protocol,
    /// No response headers within the route's timeout.
    Timeout,
}

impl UpstreamFailure {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Protocol => "protocol",
            UpstreamFailure::Timeout => "timeout",
        }
    }
}

/// Everything oboe can answer with instead of the upstream's response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request path is unsafe to route.
    #[error("refuse path: {0}")]
    BadPath(#[from] BadPath),
    /// No route's prefix matches.
    #[error("route request: no route matches the path")]
    NoRoute,
    /// The request itself is malformed in a way oboe will not forward.
    #[error("read request: {0}")]
    BadRequest(&'static str),
    /// Too many requests or connections in flight.
    #[error("accept request: too many requests in flight (limit {limit})")]
    Overloaded {
        /// The configured limit.
        limit: usize,
    },
    /// The upstream could not be reached or broke the exchange.
    #[error("call upstream: {kind:?}: {source}")]
    Upstream {
        /// What went wrong.
        kind: UpstreamFailure,
        /// The client error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The upstream sent no response headers in time.
    #[error("call upstream: no response within {0:?}")]
    UpstreamTimeout(Duration),
    /// The caller's token was refused, or is not enough for the route.
    #[error("authenticate caller: {0}")]
    Auth(#[from] AuthError),
    /// No downstream token could be had.
    #[error("exchange token: {0}")]
    Exchange(#[from] ExchangeError),
}

/// Makes text safe inside an RFC 9110 quoted-string, restricted further to the
/// characters RFC 6750 allows in `error_description` and `scope`.
fn quoted(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if (' '..='~').contains(&c) => c,
            _ => '?',
        })
        .collect()
}

/// A synthetic response's parts, before it is rendered.
#[derive(Debug)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, also the `error` member of the body.
    pub code: &'static str,
    /// Human-readable explanation for this occurrence.
    pub detail: String,
    /// RFC 6750 challenge, when authentication failed.
    pub www_authenticate: Option<String>,
    /// Seconds the client should wait, for 503.
    pub retry_after: Option<u64>,
    /// Extension members of the body (the IdP's error code and trace ids).
    pub extensions: Vec<(&'static str, serde_json::Value)>,
}

impl Error {
    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            Error::BadPath(_)
            | Error::NoRoute
            | Error::BadRequest(_)
            | Error::Auth(AuthError::Invalid(_) | AuthError::Forbidden(_)) => Blame::Caller,
            Error::Auth(AuthError::KeysUnavailable) => Blame::Idp,
            Error::Exchange(e) => match e {
                ExchangeError::AppOnlyCaller
                | ExchangeError::ClaimsChallenge(_)
                | ExchangeError::ConsentRequired(_)
                | ExchangeError::AssertionRejected(_) => Blame::Caller,
                ExchangeError::CredentialRejected { .. }
                | ExchangeError::Credential(_)
                | ExchangeError::NoTenant => Blame::Internal,
                ExchangeError::Refused { .. }
                | ExchangeError::Throttled { .. }
                | ExchangeError::Unavailable(_)
                | ExchangeError::Timeout
                | ExchangeError::BadAnswer(_) => Blame::Idp,
            },
            Error::Overloaded { .. } => Blame::Internal,
            Error::Upstream { .. } | Error::UpstreamTimeout(_) => Blame::Upstream,
        }
    }

    /// The upstream failure kind, for metrics.
    pub fn upstream_failure(&self) -> Option<UpstreamFailure> {
        match self {
            Error::Upstream { kind, .. } => Some(*kind),
            Error::UpstreamTimeout(_) => Some(UpstreamFailure::Timeout),
            _ => None,
        }
    }

    /// The one mapping from error to status, code, detail and challenge.
    pub fn problem(&self) -> Problem {
        let (status, code) = match self {
            Error::BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path"),
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            Error::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Error::Upstream {
                kind: UpstreamFailure::Timeout,
                ..
            }
            | Error::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Error::Upstream {
                kind: UpstreamFailure::Connect,
                ..
            } => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            Error::Upstream {
                kind: UpstreamFailure::Protocol,
                ..
            } => (StatusCode::BAD_GATEWAY, "upstream_failed"),
            Error::Auth(AuthError::Invalid(_)) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            Error::Auth(AuthError::Forbidden(_)) => (StatusCode::FORBIDDEN, "insufficient_scope"),
            Error::Auth(AuthError::KeysUnavailable) => {
                (StatusCode::SERVICE_UNAVAILABLE, "idp_unavailable")
            }
            Error::Exchange(e) => match e {
                ExchangeError::AppOnlyCaller => (StatusCode::FORBIDDEN, "user_token_required"),
                ExchangeError::ClaimsChallenge(_) => {
                    (StatusCode::UNAUTHORIZED, "insufficient_claims")
                }
                ExchangeError::ConsentRequired(_) => (StatusCode::FORBIDDEN, "consent_required"),
                ExchangeError::AssertionRejected(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
                ExchangeError::CredentialRejected { .. } => {
                    (StatusCode::BAD_GATEWAY, "credential_rejected")
                }
                ExchangeError::Credential(_) => (StatusCode::BAD_GATEWAY, "credential_unusable"),
                ExchangeError::NoTenant => (StatusCode::BAD_GATEWAY, "exchange_failed"),
                ExchangeError::Refused { .. } => (StatusCode::BAD_GATEWAY, "exchange_refused"),
                ExchangeError::BadAnswer(_) => (StatusCode::BAD_GATEWAY, "idp_bad_answer"),
                ExchangeError::Throttled { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "idp_throttled")
                }
                ExchangeError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "idp_unavailable")
                }
                ExchangeError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "idp_timeout"),
            },
        };
        let retry_after = match self {
            Error::Overloaded { .. } => Some(1),
            Error::Auth(AuthError::KeysUnavailable) => Some(5),
            Error::Exchange(ExchangeError::Throttled { retry_after }) => Some(*retry_after),
            Error::Exchange(ExchangeError::Unavailable(_)) => Some(5),
            _ => None,
        };
        let mut extensions = Vec::new();
        if let Error::Exchange(e) = self
            && let Some(idp) = e.idp_error()
        {
            extensions.push(("idp_error", json!(idp.error)));
            if !idp.error_codes.is_empty() {
                extensions.push(("idp_error_codes", json!(idp.error_codes)));
            }
            if let Some(trace) = &idp.trace_id {
                extensions.push(("trace_id", json!(trace)));
            }
            if let Some(correlation) = &idp.correlation_id {
                extensions.push(("correlation_id", json!(correlation)));
            }
            if let (ExchangeError::ClaimsChallenge(_), Some(claims)) = (e, &idp.claims) {
                extensions.push(("claims", json!(claims)));
            }
        }
        Problem {
            status,
            code,
            // The source chain is logged, not sent: it can name internal hosts.
            detail: self.public_detail(),
            www_authenticate: self.challenge(),
            retry_after,
            extensions,
        }
    }

    /// The RFC 6750 §3 challenge for authentication failures.
    fn challenge(&self) -> Option<String> {
        match self {
            // §3.1: a request without credentials gets a challenge without an error code.
            Error::Auth(AuthError::Invalid(crate::auth::Reason::Missing)) => {
                Some("Bearer".to_owned())
            }
            Error::Auth(AuthError::Invalid(reason)) => Some(format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                quoted(&reason.to_string())
            )),
            Error::Auth(AuthError::Forbidden(forbidden)) => {
                let mut challenge = format!(
                    "Bearer error=\"insufficient_scope\", error_description=\"{}\"",
                    quoted(&forbidden.to_string())
                );
                if let Forbidden::MissingScope(_) = forbidden
                    && let Some(scope) = forbidden.needed()
                {
                    challenge.push_str(&format!(", scope=\"{}\"", quoted(&scope)));
                }
                Some(challenge)
            }
            Error::Exchange(ExchangeError::ClaimsChallenge(idp)) => {
                // The caller's client must get a new token with these claims
                // (Entra's CAE/CA contract): base64 of the claims JSON.
                let claims = base64::engine::general_purpose::STANDARD
                    .encode(idp.claims.as_deref().unwrap_or_default());
                Some(format!(
                    "Bearer error=\"insufficient_claims\", error_description=\"{}\", claims=\"{claims}\"",
                    quoted(
                        "the identity provider requires more claims; get a new token with the claims in this challenge"
                    )
                ))
            }
            Error::Exchange(e @ ExchangeError::AssertionRejected(_)) => Some(format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                quoted(&e.to_string())
            )),
            Error::Exchange(
                e @ (ExchangeError::AppOnlyCaller | ExchangeError::ConsentRequired(_)),
            ) => Some(format!(
                "Bearer error=\"insufficient_scope\", error_description=\"{}\"",
                quoted(&e.to_string())
            )),
            _ => None,
        }
    }

    fn public_detail(&self) -> String {
        match self {
            Error::Upstream { kind, .. } => match kind {
                UpstreamFailure::Connect => "call upstream: could not connect".to_owned(),
                UpstreamFailure::Protocol => {
                    "call upstream: the connection failed before a complete response".to_owned()
                }
                UpstreamFailure::Timeout => "call upstream: connect timed out".to_owned(),
            },
            other => other.to_string(),
        }
    }

    /// The rejection reason, for logs.
    pub fn auth_reason(&self) -> Option<&'static str> {
        match self {
            Error::Auth(AuthError::Invalid(r)) => Some(r.as_str()),
            Error::Auth(AuthError::Forbidden(f)) => Some(f.as_str()),
            _ => None,
        }
    }

    /// Renders the error as an `application/problem+json` response.
    pub fn into_response(self, route: Option<&str>) -> Response<Full<Bytes>> {
        self.problem().into_response(route)
    }
}

impl Problem {
    /// Renders the problem (RFC 9457) with its challenge and `Retry-After`.
    pub fn into_response(self, route: Option<&str>) -> Response<Full<Bytes>> {
        let mut body = json!({
            "type": format!("urn:oboe:error:{}", self.code),
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "error": self.code,
            "detail": self.detail,
        });
        if let Some(map) = body.as_object_mut() {
            for (name, value) in self.extensions {
                map.insert(name.to_owned(), value);
            }
        }
        if let (Some(route), Some(map)) = (route, body.as_object_mut()) {
            map.insert("route".to_owned(), json!(route));
        }
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        if let Some(challenge) = self.www_authenticate
            && let Ok(v) = HeaderValue::from_str(&challenge)
        {
            headers.insert(WWW_AUTHENTICATE, v);
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
