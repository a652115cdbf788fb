//! The IdP's HTTP side: routing, discovery documents and key sets. The token
//! endpoint's protocol logic is in `token.rs`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::token::{self, Endpoint, TokenError};
use super::{Inner, lock, read};

/// Tenants that are not a directory but a sign-in audience.
pub(super) const MULTI_TENANT: [&str; 2] = ["organizations", "common"];

/// Accepts connections until the task is aborted.
pub(super) async fn serve(listener: TcpListener, idp: Arc<Inner>) {
    let builder = crate::server::http_builder(64 * 1024);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                tracing::debug!(error = %e, "development IdP: accept connection");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let idp = Arc::clone(&idp);
        let service = service_fn(move |request| {
            let idp = Arc::clone(&idp);
            async move { Ok::<_, Infallible>(handle(&idp, request).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(conn);
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    EntraV2Discovery(String),
    EntraV1Discovery(String),
    EntraKeys(String),
    EntraToken(String),
    /// The v1 token endpoint and the authorize endpoints: known, not served.
    EntraUnsupported(String, &'static str),
    OidcDiscovery,
    OidcKeys,
    OidcToken,
    K8sDiscovery,
    K8sKeys,
    /// What the IdP has received so far (for the load benchmark, which runs
    /// the IdP in another process and cannot call [`super::DevIdp::counters`]).
    Counters,
    NotFound,
}

impl Route {
    fn of(path: &str) -> Self {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let tenant = |t: &str| t.to_owned();
        match segments.as_slice() {
            ["oidc", ".well-known", "openid-configuration"]
            | [".well-known", "oauth-authorization-server", "oidc"] => Self::OidcDiscovery,
            ["oidc", "keys"] => Self::OidcKeys,
            ["oidc", "token"] => Self::OidcToken,
            ["k8s", ".well-known", "openid-configuration"] => Self::K8sDiscovery,
            ["k8s", "openid", "v1", "jwks"] => Self::K8sKeys,
            [".dev", "counters"] => Self::Counters,
            [t, "v2.0", ".well-known", "openid-configuration"] => Self::EntraV2Discovery(tenant(t)),
            [t, ".well-known", "openid-configuration"] => Self::EntraV1Discovery(tenant(t)),
            [t, "discovery", "v2.0", "keys"] | [t, "discovery", "keys"] => {
                Self::EntraKeys(tenant(t))
            }
            [t, "oauth2", "v2.0", "token"] => Self::EntraToken(tenant(t)),
            [t, "oauth2", "token"] => Self::EntraUnsupported(
                tenant(t),
                "the development IdP serves only the v2 token endpoint, /oauth2/v2.0/token",
            ),
            [t, "oauth2", "v2.0", "authorize"] | [t, "oauth2", "authorize"] => {
                Self::EntraUnsupported(
                    tenant(t),
                    "the development IdP has no interactive sign-in; mint tokens with DevIdp::mint",
                )
            }
            _ => Self::NotFound,
        }
    }

    fn method(&self) -> Method {
        match self {
            Self::EntraToken(_) | Self::OidcToken => Method::POST,
            _ => Method::GET,
        }
    }

    fn tenant(&self) -> Option<&str> {
        match self {
            Self::EntraV2Discovery(t)
            | Self::EntraV1Discovery(t)
            | Self::EntraKeys(t)
            | Self::EntraToken(t)
            | Self::EntraUnsupported(t, _) => Some(t),
            _ => None,
        }
    }
}

/// Answers one request.
async fn handle(idp: &Inner, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let route = Route::of(request.uri().path());
    tracing::debug!(method = %request.method(), path = request.uri().path(), "development IdP request");
    if route == Route::NotFound {
        return json_response(StatusCode::NOT_FOUND, &json!({ "error": "not_found" }));
    }
    match &route {
        Route::EntraV2Discovery(_)
        | Route::EntraV1Discovery(_)
        | Route::OidcDiscovery
        | Route::K8sDiscovery => idp.discovery_count.fetch_add(1, Ordering::SeqCst),
        Route::EntraKeys(_) | Route::OidcKeys | Route::K8sKeys => {
            idp.keys_count.fetch_add(1, Ordering::SeqCst)
        }
        Route::EntraToken(_) | Route::OidcToken => idp.token_count.fetch_add(1, Ordering::SeqCst),
        Route::EntraUnsupported(..) | Route::Counters | Route::NotFound => 0,
    };
    let endpoint = match route.tenant() {
        Some(tenant) => Endpoint::Entra(tenant.to_owned()),
        None => Endpoint::Oidc,
    };
    if let Some(tenant) = route.tenant()
        && !idp.is_tenant(tenant)
        && !MULTI_TENANT.contains(&tenant)
    {
        let error = TokenError::bad_request(
            "invalid_tenant",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
        return token::error_response(idp, &endpoint, &error);
    }
    if request.method() != route.method() {
        if matches!(route, Route::EntraToken(_)) {
            let error = TokenError::bad_request(
                "invalid_request",
                900561,
                format!(
                    "The endpoint only accepts POST requests. Received a {} request.",
                    request.method()
                ),
            );
            return token::error_response(idp, &endpoint, &error);
        }
        let mut response = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "error": "method_not_allowed" }),
        );
        response.headers_mut().insert(
            ALLOW,
            HeaderValue::from_static(if route.method() == Method::POST {
                "POST"
            } else {
                "GET"
            }),
        );
        return response;
    }
    match route {
        Route::EntraToken(_) | Route::OidcToken => token::handle(idp, endpoint, request).await,
        Route::EntraUnsupported(_, why) => token::error_response(
            idp,
            &endpoint,
            &TokenError::bad_request("invalid_request", 90056, why.to_owned()),
        ),
        Route::EntraKeys(_) | Route::OidcKeys | Route::K8sKeys => {
            let (delay, down) = {
                let b = lock(&idp.behaviour);
                (b.keys_delay, b.keys_down)
            };
            tokio::time::sleep(delay).await;
            if down {
                return unavailable();
            }
            // Entra names, in each key, the issuer (template) it signs for.
            let template = format!("{}/{{tenantid}}/v2.0", idp.base);
            let issuer = matches!(route, Route::EntraKeys(_)).then_some(template.as_str());
            let jwks = read(&idp.keys).jwks(issuer);
            cached(json_response(StatusCode::OK, &jwks))
        }
        Route::EntraV2Discovery(ref tenant) | Route::EntraV1Discovery(ref tenant) => {
            if lock(&idp.behaviour).discovery_down {
                return unavailable();
            }
            let doc = if matches!(route, Route::EntraV2Discovery(_)) {
                entra_v2_discovery(idp, tenant)
            } else {
                entra_v1_discovery(idp, tenant)
            };
            cached(json_response(StatusCode::OK, &doc))
        }
        Route::OidcDiscovery | Route::K8sDiscovery => {
            if lock(&idp.behaviour).discovery_down {
                return unavailable();
            }
            let doc = if route == Route::OidcDiscovery {
                oidc_discovery(idp)
            } else {
                k8s_discovery(idp)
            };
            cached(json_response(StatusCode::OK, &doc))
        }
        Route::Counters => {
            let super::Counters {
                discovery,
                keys,
                token,
            } = idp.counters();
            json_response(
                StatusCode::OK,
                &json!({ "discovery": discovery, "keys": keys, "token": token }),
            )
        }
        Route::NotFound => json_response(StatusCode::NOT_FOUND, &json!({ "error": "not_found" })),
    }
}

/// The issuer a discovery document names: the tenant's own, or for a
/// multi-tenant audience the `{tenantid}` template, as Entra does.
fn issuer_tenant(tenant: &str) -> &str {
    if MULTI_TENANT.contains(&tenant) {
        "{tenantid}"
    } else {
        tenant
    }
}

fn entra_v2_discovery(idp: &Inner, tenant: &str) -> Value {
    let base = &idp.base;
    json!({
        "token_endpoint": idp.entra_token_url(tenant),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{base}/{tenant}/discovery/v2.0/keys"),
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256", "PS256", "ES256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": format!("{base}/{}/v2.0", issuer_tenant(tenant)),
        "request_uri_parameter_supported": false,
        "authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/authorize"),
        "grant_types_supported": ["client_credentials", super::JWT_BEARER_GRANT],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "oid", "tid", "azp", "scp", "roles", "ver", "idtyp"],
        "tenant_region_scope": "WW",
        "cloud_instance_name": "dev.local",
    })
}

fn entra_v1_discovery(idp: &Inner, tenant: &str) -> Value {
    let base = &idp.base;
    json!({
        "token_endpoint": format!("{base}/{tenant}/oauth2/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{base}/{tenant}/discovery/keys"),
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
        "scopes_supported": ["openid"],
        "issuer": format!("{base}/{}/", issuer_tenant(tenant)),
        "authorization_endpoint": format!("{base}/{tenant}/oauth2/authorize"),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "oid", "tid", "appid", "scp", "roles", "ver"],
        "tenant_region_scope": "WW",
        "cloud_instance_name": "dev.local",
    })
}

/// OIDC Discovery 1.0 §3 / RFC 8414 §2 metadata of the generic issuer.
fn oidc_discovery(idp: &Inner) -> Value {
    let issuer = idp.oidc_issuer();
    json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": idp.oidc_token_url(),
        "jwks_uri": format!("{issuer}/keys"),
        "grant_types_supported": ["client_credentials", super::TOKEN_EXCHANGE_GRANT],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "PS256", "ES256"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "PS256", "ES256"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
    })
}

/// What a Kubernetes API server publishes for its service-account issuer.
fn k8s_discovery(idp: &Inner) -> Value {
    let issuer = idp.k8s_issuer();
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })
}

/// A JSON answer.
pub(super) fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Discovery documents and key sets are cacheable for a day, as on Entra.
fn cached(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("max-age=86400, private"),
    );
    response
}

fn unavailable() -> Response<Full<Bytes>> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({ "error": "temporarily_unavailable", "error_description": "the development IdP was told to be down" }),
    )
}
