//! The request path. [`Proxy::handle`] reads top to bottom as the numbered
//! steps every request goes through; each step is a function with one job.

pub mod headers;
mod observe;
pub mod route;
pub mod upstream;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::auth::{AuthError, Authenticator, Caller, bearer, policy};
use crate::config::{Config, Grant, RESERVED_PREFIX, Route};
use crate::error::Error;
use crate::exchange::Exchanger;
use crate::telemetry::{Metrics, UpstreamErrorLabels};
use headers::ClientInfo;
use observe::{Observed, RequestGuard};
use route::Router;
use upstream::Upstreams;

/// The body of every response oboe sends: the upstream's, streamed, or oboe's own.
pub type ProxyBody = Observed<Either<Incoming, Full<Bytes>>>;

/// Everything the request path needs, built once per configuration.
pub struct Proxy {
    router: Router,
    auth: Option<Arc<Authenticator>>,
    exchange: Option<Arc<Exchanger>>,
    upstreams: Upstreams,
    metrics: Arc<Metrics>,
    requests: Arc<Semaphore>,
    max_requests: usize,
}

/// Why the proxy could not be built.
pub type SetupError = upstream::SetupError;

impl Proxy {
    /// Builds the request path for `config`.
    /// `auth` validates callers' tokens and `exchange` gets downstream tokens;
    /// each is required when a route needs it.
    pub fn new(
        config: &Config,
        auth: Option<Arc<Authenticator>>,
        exchange: Option<Arc<Exchanger>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SetupError> {
        Ok(Self {
            router: Router::new(config.routes.iter().cloned()),
            auth,
            exchange,
            upstreams: Upstreams::new(&config.upstream)?,
            metrics,
            requests: Arc::new(Semaphore::new(config.limits.max_requests)),
            max_requests: config.limits.max_requests,
        })
    }

    /// The exchanger, for carrying its cache across a reload.
    pub fn exchanger(&self) -> Option<&Exchanger> {
        self.exchange.as_deref()
    }

    /// Handles one request from the caller. Never fails: every error becomes a
    /// problem response here, and accounting is settled when the body ends.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: ClientInfo,
    ) -> Response<ProxyBody> {
        // 1. Admission: a bounded number of requests in flight, never a queue.
        let permit = self.requests.clone().try_acquire_owned().ok();
        let overloaded = permit.is_none();
        let mut guard = RequestGuard::new(self.metrics.clone(), request.method().clone(), permit);
        if overloaded {
            let error = Error::Overloaded {
                limit: self.max_requests,
            };
            return self.fail(error, guard);
        }
        // oboe's own endpoints live under a prefix no route may use.
        if request.uri().path().starts_with(RESERVED_PREFIX) {
            guard.route = Some(Arc::from("oboe"));
            // Boxed: rare, and its state must not grow every request's future.
            return match Box::pin(self.own_endpoint(request)).await {
                Ok(response) => {
                    guard.status = response.status();
                    response.map(|body| Observed::new(Either::Right(body), guard))
                }
                Err(error) => self.fail(error, guard),
            };
        }
        // The request's span; with OTLP export its parent is the caller's
        // `traceparent`. Disabled (and free) at the default log level.
        let span = tracing::info_span!("request", method = %request.method());
        #[cfg(feature = "otlp")]
        crate::telemetry::otel::adopt_parent(&span, request.headers());
        match self
            .forward(request, client, &mut guard)
            .instrument(span)
            .await
        {
            Ok(response) => {
                guard.status = response.status();
                guard.upstream_status = Some(response.status());
                response.map(|body| Observed::new(Either::Left(body), guard))
            }
            Err(error) => self.fail(error, guard),
        }
    }

    /// `GET /.oboe/v1/validate`: the caller's validated claims.
    async fn own_endpoint(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Error> {
        route::check_path(request.uri().path())?;
        match request.uri().path() {
            "/.oboe/v1/validate" => {
                if request.method() != http::Method::GET {
                    return Err(Error::BadRequest("this endpoint answers GET only"));
                }
                let auth = self.auth.as_ref().ok_or(Error::NoRoute)?;
                let caller = auth.authenticate(request.headers()).await?;
                Ok(private_json(
                    serde_json::to_vec(&caller.claims).unwrap_or_default(),
                ))
            }
            path => {
                let name = path
                    .strip_prefix("/.oboe/v1/token/")
                    .filter(|n| !n.is_empty() && !n.contains('/'))
                    .ok_or(Error::NoRoute)?;
                if request.method() != http::Method::GET {
                    return Err(Error::BadRequest("this endpoint answers GET only"));
                }
                let route = self.router.by_name(name).cloned().ok_or(Error::NoRoute)?;
                if !route.token.grant.exchanges() {
                    return Err(Error::NoRoute);
                }
                let caller = self.authorize(&route, request.headers()).await?;
                let exchange = self.exchange.as_ref().ok_or(Error::NoRoute)?;
                let caller_token = bearer::extract(request.headers()).ok();
                let entry = exchange
                    .token(&route, caller.as_deref(), caller_token)
                    .await?;
                let body = serde_json::json!({
                    "authorization": entry.authorization.to_str().unwrap_or_default(),
                    "expires_on": entry.expires_at_ms / 1000,
                });
                Ok(private_json(body.to_string().into_bytes()))
            }
        }
    }

    /// Step 5: `forward` keeps the caller's token; `none` strips it; the
    /// exchange grants replace it with a downstream token, and the caller's
    /// token is removed from every header it appears in.
    async fn apply_grant(
        &self,
        route: &Route,
        caller: Option<&Caller>,
        headers: &mut http::HeaderMap,
    ) -> Result<(), Error> {
        match route.token.grant {
            Grant::Forward => Ok(()),
            Grant::None => {
                headers.remove(header::AUTHORIZATION);
                Ok(())
            }
            Grant::OnBehalfOf | Grant::TokenExchange | Grant::ClientCredentials => {
                let exchange = self.exchange.as_ref().ok_or_else(|| {
                    Error::Exchange(crate::exchange::ExchangeError::Unavailable(
                        "no exchanger is configured".into(),
                    ))
                })?;
                // A cheap clone (shared bytes): the headers change below.
                let caller_value = bearer::single(headers).ok().cloned();
                let caller_token = caller_value.as_ref().and_then(|v| bearer::token(v).ok());
                // Boxed: the exchange future is large and only a miss needs
                // it for long; keeping it out of the request future keeps
                // every request's state small (moves of it showed in profiles).
                let entry = Box::pin(exchange.token(route, caller, caller_token)).await?;
                headers.remove(header::AUTHORIZATION);
                if let Some(token) = caller_token {
                    remove_token_everywhere(headers, token);
                }
                headers.insert(header::AUTHORIZATION, entry.authorization.clone());
                Ok(())
            }
        }
    }

    /// Step 4: the caller's token must be valid and enough for the route.
    async fn authorize(
        &self,
        route: &Route,
        headers: &http::HeaderMap,
    ) -> Result<Option<Arc<Caller>>, Error> {
        if !route.caller.required {
            return Ok(None);
        }
        // The config refuses routes that require callers without an identity.
        let auth = self.auth.as_ref().ok_or(AuthError::KeysUnavailable)?;
        let caller = Box::pin(auth.authenticate(headers)).await?;
        if let Err(forbidden) = policy::authorize(&route.caller, &caller) {
            auth.count_forbidden(&forbidden);
            return Err(AuthError::Forbidden(forbidden).into());
        }
        Ok(Some(caller))
    }

    /// Steps 2 to 8: route, authorize, rewrite, call the upstream.
    async fn forward(
        &self,
        request: Request<Incoming>,
        client: ClientInfo,
        guard: &mut RequestGuard,
    ) -> Result<Response<Incoming>, Error> {
        // 2. Refuse paths that could be normalised into another route.
        route::check_path(request.uri().path())?;

        // 3. Route by longest prefix.
        let (route, upstream_uri) = {
            let matched = self
                .router
                .find(request.uri().path())
                .ok_or(Error::NoRoute)?;
            let uri = upstream_uri(matched.route, matched.rest, request.uri().query())?;
            (matched.route.clone(), uri)
        };
        guard.route = Some(Arc::from(route.name.as_str()));

        // 4. Authenticate the caller and apply the route's policy. Nothing of a
        //    refused request goes further.
        let (mut parts, body) = request.into_parts();
        let caller = self
            .authorize(&route, &parts.headers)
            .instrument(tracing::debug_span!("validate", route = %route.name))
            .await?;

        // 5. Decide what goes upstream in Authorization.
        self.apply_grant(&route, caller.as_deref(), &mut parts.headers)
            .instrument(tracing::debug_span!(
                "exchange",
                route = %route.name,
                grant = route.token.grant.as_str()
            ))
            .await?;

        // 6. Rewrite the request for the upstream.
        let original_host = original_host(&parts);
        headers::to_upstream(
            &mut parts.headers,
            &route.headers,
            client,
            original_host,
            &route.upstream.host_header,
        );
        #[cfg(feature = "otlp")]
        crate::telemetry::otel::inject(&tracing::Span::current(), &mut parts.headers);
        parts.uri = upstream_uri;
        // The pooled client picks HTTP/2 by ALPN; the request itself is version-neutral.
        parts.version = Version::HTTP_11;

        // 7. Call the upstream; the timeout covers the wait for response headers.
        let response = self
            .upstreams
            .send(Request::from_parts(parts, body), route.timeout)
            .instrument(tracing::debug_span!("upstream", route = %route.name))
            .await
            .inspect_err(|e| self.count_upstream_error(&route, e))?;

        // 8. Drop hop-by-hop headers of the upstream's answer; the rest passes untouched.
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(parts, body))
    }

    fn count_upstream_error(&self, route: &Route, error: &Error) {
        if let Some(kind) = error.upstream_failure() {
            self.metrics
                .upstream_errors
                .get_or_create(&UpstreamErrorLabels {
                    route: route.name.clone(),
                    kind: kind.as_str(),
                })
                .inc();
        }
    }

    fn fail(&self, error: Error, mut guard: RequestGuard) -> Response<ProxyBody> {
        let problem = error.problem();
        match error.blame() {
            crate::error::Blame::Caller => tracing::debug!(
                error = %error,
                reason = error.auth_reason(),
                route = guard.route.as_deref(),
                "request refused"
            ),
            blame => tracing::warn!(
                error = %error,
                source = ?std::error::Error::source(&error).map(ToString::to_string),
                blame = blame.as_str(),
                route = guard.route.as_deref(),
                "request failed"
            ),
        }
        guard.status = problem.status;
        guard.error = Some(problem.code);
        let route = guard.route.clone();
        problem
            .into_response(route.as_deref())
            .map(|body| Observed::new(Either::Right(body), guard))
    }
}

/// A JSON answer that carries a credential or claims: never cached.
fn private_json(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The upstream URI: the route's scheme and authority, its base path in place
/// of the prefix, and the caller's query.
fn upstream_uri(route: &Route, rest: &str, query: Option<&str>) -> Result<Uri, Error> {
    let path = route::upstream_path_and_query(&route.upstream.base_path, rest, query);
    Uri::builder()
        .scheme(route.upstream.scheme.clone())
        .authority(route.upstream.authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|_| Error::BadRequest("the request target cannot be forwarded"))
}

/// The caller's `Host` (HTTP/1.1) or `:authority` (HTTP/2).
fn original_host(parts: &http::request::Parts) -> Option<HeaderValue> {
    parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// Drops every header whose value carries `token` (an app may have copied the
/// caller's token into a custom header): it must not reach an exchange route's
/// upstream in any form.
fn remove_token_everywhere(headers: &mut http::HeaderMap, token: &str) {
    let carriers: Vec<header::HeaderName> = headers
        .iter()
        .filter(|(_, v)| {
            v.as_bytes()
                .windows(token.len())
                .any(|w| w == token.as_bytes())
        })
        .map(|(k, _)| k.clone())
        .collect();
    for name in carriers {
        headers.remove(&name);
    }
}
