//! The token endpoint: client authentication (RFC 6749 §2.3, RFC 7523 §2.2,
//! workload identity federation) and the grants oboe uses: Entra's OBO
//! (jwt-bearer), RFC 8693 token exchange, and client credentials. Entra
//! endpoints answer errors in Entra's shape (`AADSTSnnnnn`, `error_codes`,
//! trace and correlation ids); the OIDC endpoint in RFC 6749 §5.2's.
//!
//! A request is handled in steps: record it, apply any misbehaviour, parse the
//! form, check the grant type is served here, authenticate the client, then
//! run the grant.

use std::time::{Duration, UNIX_EPOCH};

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue, PRAGMA, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};

use super::jose::{Jws, PublicKey, b64url};
use super::server::{MULTI_TENANT, json_response};
use super::{
    ACCESS_TOKEN_TYPE, CLIENT_ASSERTION_TYPE, ClaimsChallenge, Client, ClientAuth,
    FEDERATED_TOKEN_AUDIENCE, Inner, JWT_BEARER_GRANT, Malformed, TOKEN_EXCHANGE_GRANT,
    TokenRequest, b64_id, guid, lock, read, secs,
};

/// Largest form body read; real token requests are a few KiB.
const MAX_FORM_BYTES: usize = 64 * 1024;
/// RFC 8693 §3: a JWT issued as such.
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Where Entra sends scopes that name no resource.
const GRAPH: &str = "https://graph.microsoft.com";
/// OpenID Connect scopes: they name no resource.
const OIDC_SCOPES: [&str; 4] = ["openid", "profile", "email", "offline_access"];
/// Longest client assertion lifetime accepted (Entra: 10 minutes).
const MAX_ASSERTION_LIFETIME: i64 = 600;

/// Which token endpoint was called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// `/{tenant}/oauth2/v2.0/token` (and the other Entra-shaped paths).
    Entra(String),
    /// `/oidc/token`.
    Oidc,
}

impl Endpoint {
    fn token_url(&self, idp: &Inner) -> String {
        match self {
            Self::Entra(tenant) => idp.entra_token_url(tenant),
            Self::Oidc => idp.oidc_token_url(),
        }
    }
}

/// An OAuth error answer (RFC 6749 §5.2), with Entra's extras.
#[derive(Debug, Clone)]
pub(super) struct TokenError {
    status: StatusCode,
    error: &'static str,
    /// The AADSTS number (Entra endpoints only).
    code: u32,
    description: String,
    claims: Option<String>,
    suberror: Option<&'static str>,
    retry_after: Option<u64>,
    /// RFC 6749 §5.2: a client that tried HTTP Basic gets a Basic challenge.
    basic_challenge: bool,
}

impl TokenError {
    fn new(status: StatusCode, error: &'static str, code: u32, description: String) -> Self {
        Self {
            status,
            error,
            code,
            description,
            claims: None,
            suberror: None,
            retry_after: None,
            basic_challenge: false,
        }
    }

    /// A 400 answer.
    pub(super) fn bad_request(error: &'static str, code: u32, description: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, code, description)
    }

    fn invalid_request(code: u32, description: impl Into<String>) -> Self {
        Self::bad_request("invalid_request", code, description.into())
    }

    fn invalid_grant(code: u32, description: impl Into<String>) -> Self {
        Self::bad_request("invalid_grant", code, description.into())
    }

    fn invalid_scope(code: u32, description: impl Into<String>) -> Self {
        Self::bad_request("invalid_scope", code, description.into())
    }

    fn invalid_client(code: u32, description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            code,
            description.into(),
        )
    }

    fn missing(name: &str) -> Self {
        Self::invalid_request(
            900144,
            format!("The request body must contain the following parameter: '{name}'."),
        )
    }

    fn internal(description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            50000,
            description.into(),
        )
    }

    fn with_basic_challenge(mut self, basic: bool) -> Self {
        self.basic_challenge = basic;
        self
    }
}

/// The misbehaviour that applies to one token request, taken atomically.
struct Snapshot {
    delay: Duration,
    forced: Option<TokenError>,
    malformed: Option<Malformed>,
    lifetime: Duration,
    claims_challenge: Option<ClaimsChallenge>,
    consent_missing: Option<String>,
}

impl Snapshot {
    fn take(idp: &Inner) -> Self {
        let mut b = lock(&idp.behaviour);
        let forced = if let Some(wait) = b.throttle {
            let mut e = TokenError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                90055,
                "There are too many incoming requests. Please try again later.".to_owned(),
            );
            e.retry_after = Some(wait.as_secs().max(1));
            Some(e)
        } else if let Some(fail) = b.fail_next.filter(|f| f.remaining > 0) {
            b.fail_next = (fail.remaining > 1).then_some(super::FailNext {
                remaining: fail.remaining - 1,
                ..fail
            });
            Some(if fail.status == StatusCode::INTERNAL_SERVER_ERROR {
                TokenError::internal("TokenIssuanceError: the development IdP was told to fail.")
            } else {
                TokenError::new(
                    fail.status,
                    "temporarily_unavailable",
                    90006,
                    "The service is temporarily unavailable (the development IdP was told to fail)."
                        .to_owned(),
                )
            })
        } else {
            None
        };
        Self {
            delay: b.token_delay,
            forced,
            malformed: b.malformed,
            lifetime: b.token_lifetime,
            claims_challenge: b.claims_challenge.clone(),
            consent_missing: b.consent_missing.clone(),
        }
    }
}

/// Answers one token request.
pub(super) async fn handle(
    idp: &Inner,
    endpoint: Endpoint,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let authorization = parts
        .headers
        .get(AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let is_form = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    let body = match Limited::new(body, MAX_FORM_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let e = TokenError::invalid_request(90004, "The request body is too large or broken.");
            return error_response(idp, &endpoint, &e);
        }
    };
    // 1. Record what was sent, so tests can assert on it.
    let form: Vec<(String, String)> = if is_form {
        form_urlencoded::parse(&body).into_owned().collect()
    } else {
        Vec::new()
    };
    lock(&idp.requests).push(TokenRequest {
        path: parts.uri.path().to_owned(),
        form: form.clone(),
        authorization: authorization.clone(),
    });
    // 2. Misbehave when told to.
    let behaviour = Snapshot::take(idp);
    tokio::time::sleep(behaviour.delay).await;
    if let Some(e) = &behaviour.forced {
        return error_response(idp, &endpoint, e);
    }
    if let Some(malformed) = behaviour.malformed {
        return malformed_response(malformed);
    }
    // 3. Behave.
    if !is_form {
        let e = TokenError::invalid_request(
            90004,
            "The request isn't properly formatted: the body must be application/x-www-form-urlencoded.",
        );
        return error_response(idp, &endpoint, &e);
    }
    match process(idp, &endpoint, &form, authorization.as_deref(), &behaviour) {
        Ok(answer) => no_store(json_response(StatusCode::OK, &answer)),
        Err(e) => error_response(idp, &endpoint, &e),
    }
}

/// The grants, by endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    OnBehalfOf,
    TokenExchange,
    ClientCredentials,
}

impl Grant {
    /// Entra serves jwt-bearer (OBO) and refuses RFC 8693; the OIDC endpoint
    /// the other way round.
    fn of(grant_type: &str, endpoint: &Endpoint) -> Result<Self, TokenError> {
        match (grant_type, endpoint) {
            ("client_credentials", _) => Ok(Self::ClientCredentials),
            (JWT_BEARER_GRANT, Endpoint::Entra(_)) => Ok(Self::OnBehalfOf),
            (TOKEN_EXCHANGE_GRANT, Endpoint::Oidc) => Ok(Self::TokenExchange),
            _ => Err(TokenError::bad_request(
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{grant_type}'."),
            )),
        }
    }
}

fn process(
    idp: &Inner,
    endpoint: &Endpoint,
    pairs: &[(String, String)],
    authorization: Option<&str>,
    behaviour: &Snapshot,
) -> Result<Value, TokenError> {
    let form = Form::new(pairs)?;
    let grant = Grant::of(form.required("grant_type")?, endpoint)?;
    let client = authenticate(idp, endpoint, &form, authorization)?;
    match (grant, endpoint) {
        (Grant::OnBehalfOf, Endpoint::Entra(tenant)) => {
            on_behalf_of(idp, tenant, &client, &form, behaviour)
        }
        (Grant::ClientCredentials, Endpoint::Entra(tenant)) => {
            entra_client_credentials(idp, tenant, &client, &form, behaviour)
        }
        (Grant::ClientCredentials, Endpoint::Oidc) => {
            oidc_client_credentials(idp, &client, &form, behaviour)
        }
        (Grant::TokenExchange, Endpoint::Oidc) => token_exchange(idp, &client, &form, behaviour),
        (Grant::OnBehalfOf | Grant::TokenExchange, _) => Err(TokenError::bad_request(
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.".to_owned(),
        )),
    }
}

/// The decoded form, with RFC 6749 §3.2's rule that parameters appear at
/// most once (RFC 8693 §2.1 allows `audience` and `resource` to repeat).
struct Form<'a> {
    pairs: &'a [(String, String)],
}

impl<'a> Form<'a> {
    fn new(pairs: &'a [(String, String)]) -> Result<Self, TokenError> {
        let mut seen = std::collections::HashSet::new();
        for (name, _) in pairs {
            let repeatable = name == "audience" || name == "resource";
            if !seen.insert(name.as_str()) && !repeatable {
                return Err(TokenError::invalid_request(
                    9002313,
                    format!("Invalid request. The parameter '{name}' is included more than once."),
                ));
            }
        }
        Ok(Self { pairs })
    }

    /// A parameter; empty values count as absent (RFC 6749 §3.1).
    fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&'a str> {
        self.pairs
            .iter()
            .filter(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn required(&self, name: &str) -> Result<&'a str, TokenError> {
        self.get(name).ok_or_else(|| TokenError::missing(name))
    }
}

/// A client that proved who it is.
struct Authenticated {
    client: Client,
    /// Entra's `azpacr`: 1 = secret, 2 = certificate or assertion.
    acr: &'static str,
}

/// How the client tried to authenticate.
enum Presented<'a> {
    Secret { secret: String, basic: bool },
    Assertion(&'a str),
}

/// Client authentication: one method per request (RFC 6749 §2.3), the
/// credential checked against the registration.
fn authenticate(
    idp: &Inner,
    endpoint: &Endpoint,
    form: &Form<'_>,
    authorization: Option<&str>,
) -> Result<Authenticated, TokenError> {
    let basic = authorization.map(parse_basic).transpose()?;
    let body_secret = form.get("client_secret");
    let assertion_type = form.get("client_assertion_type");
    let assertion = form.get("client_assertion");
    let methods = [
        basic.is_some(),
        body_secret.is_some(),
        assertion.is_some() || assertion_type.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        return Err(TokenError::invalid_request(
            9002313,
            "Invalid request. The client used more than one authentication method.",
        ));
    }
    let presented = match (basic.as_ref(), body_secret, assertion) {
        (Some((_, secret)), _, _) => Some(Presented::Secret {
            secret: secret.clone(),
            basic: true,
        }),
        (None, Some(secret), _) => Some(Presented::Secret {
            secret: secret.to_owned(),
            basic: false,
        }),
        (None, None, Some(assertion)) => {
            if assertion_type != Some(CLIENT_ASSERTION_TYPE) {
                return Err(TokenError::invalid_request(
                    9002313,
                    format!(
                        "Invalid request. 'client_assertion_type' must be '{CLIENT_ASSERTION_TYPE}'."
                    ),
                ));
            }
            Some(Presented::Assertion(assertion))
        }
        (None, None, None) if assertion_type.is_some() => {
            return Err(TokenError::missing("client_assertion"));
        }
        (None, None, None) => None,
    };
    let basic_used = basic.is_some();
    let client_id = match (form.get("client_id"), basic.as_ref()) {
        (Some(body), Some((header, _))) if body != header => {
            return Err(TokenError::invalid_request(
                9002313,
                "Invalid request. 'client_id' differs from the HTTP Basic user name.",
            ));
        }
        (Some(body), _) => body.to_owned(),
        (None, Some((header, _))) => header.clone(),
        // RFC 7521 §4.2: with an assertion the client id may be left out.
        (None, None) => match &presented {
            Some(Presented::Assertion(a)) => Jws::parse(a)
                .ok()
                .and_then(|jws| jws.claim_str("sub").map(str::to_owned))
                .ok_or_else(|| TokenError::missing("client_id"))?,
            _ => return Err(TokenError::missing("client_id")),
        },
    };
    let Some(client) = idp.client(&client_id) else {
        let tenant = match endpoint {
            Endpoint::Entra(t) => t.as_str(),
            Endpoint::Oidc => "oidc",
        };
        return Err(TokenError::invalid_client(
            700016,
            format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."),
        )
        .with_basic_challenge(basic_used));
    };
    let acr = match (presented, &client.auth) {
        (None, _) => {
            return Err(TokenError::invalid_client(
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            ));
        }
        (Some(Presented::Secret { secret, basic }), ClientAuth::Secret(expected)) => {
            if aws_lc_rs::constant_time::verify_slices_are_equal(
                secret.as_bytes(),
                expected.as_bytes(),
            )
            .is_err()
            {
                return Err(invalid_secret(&client_id).with_basic_challenge(basic));
            }
            "1"
        }
        (Some(Presented::Secret { basic, .. }), _) => {
            return Err(invalid_secret(&client_id).with_basic_challenge(basic));
        }
        (Some(Presented::Assertion(token)), ClientAuth::Certificate { cert_der }) => {
            certificate_assertion(idp, endpoint, &client_id, cert_der, token)?;
            "2"
        }
        (Some(Presented::Assertion(token)), ClientAuth::PrivateKeyJwt { public_key_jwk }) => {
            private_key_assertion(idp, endpoint, &client_id, public_key_jwk, token)?;
            "2"
        }
        (Some(Presented::Assertion(token)), ClientAuth::Federated { subject }) => {
            federated_assertion(idp, subject, token)?;
            "2"
        }
        (Some(Presented::Assertion(_)), ClientAuth::Secret(_)) => {
            return Err(TokenError::invalid_client(
                700027,
                "Client assertion failed signature validation. [Reason - The key was not found.]",
            ));
        }
    };
    Ok(Authenticated { client, acr })
}

fn invalid_secret(client_id: &str) -> TokenError {
    TokenError::invalid_client(
        7000215,
        format!(
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
        ),
    )
}

/// `Authorization: Basic` per RFC 6749 §2.3.1: base64 of
/// `urlencode(client_id) ":" urlencode(client_secret)`.
fn parse_basic(header: &str) -> Result<(String, String), TokenError> {
    let bad = |why: &str| {
        TokenError::invalid_client(7000215, format!("Invalid client credentials: {why}."))
            .with_basic_challenge(true)
    };
    let (scheme, encoded) = header
        .split_once(' ')
        .ok_or_else(|| bad("malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad("only the Basic authentication scheme is supported"));
    }
    let decoded = STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| bad("the Basic credentials are not base64 of UTF-8"))?;
    let (id, secret) = decoded
        .split_once(':')
        .ok_or_else(|| bad("no ':' in the Basic credentials"))?;
    match (form_decode(id), form_decode(secret)) {
        (Some(id), Some(secret)) => Ok((id, secret)),
        _ => Err(bad("the Basic credentials are not form-urlencoded")),
    }
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space).
fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Problems with a token's time claims.
enum Timing {
    Missing(&'static str),
    Outside { exp: i64 },
    TooLong,
}

/// RFC 7519 §4.1.4/§4.1.5 with no leeway: valid from `nbf` until before
/// `exp`. Returns `exp`.
fn check_times(jws: &Jws, now: i64, max_lifetime: Option<i64>) -> Result<i64, Timing> {
    let exp = jws.claim_time("exp").ok_or(Timing::Missing("exp"))?;
    let nbf = jws.claim_time("nbf");
    if now >= exp || nbf.is_some_and(|nbf| now < nbf) {
        return Err(Timing::Outside { exp });
    }
    if let Some(max) = max_lifetime {
        let start = nbf
            .or_else(|| jws.claim_time("iat"))
            .ok_or(Timing::Missing("nbf"))?;
        if exp.saturating_sub(start) > max {
            return Err(Timing::TooLong);
        }
    }
    Ok(exp)
}

fn parse_assertion(token: &str) -> Result<Jws, TokenError> {
    Jws::parse(token).map_err(|e| {
        TokenError::invalid_client(50027, format!("JWT token is invalid or malformed: {e}."))
    })
}

fn bad_signature(reason: &str) -> TokenError {
    TokenError::invalid_client(
        700027,
        format!("Client assertion failed signature validation. [Reason - {reason}]"),
    )
}

/// A certificate credential: PS256/RS256, `x5t#S256` naming the registered
/// certificate, signed by its key; then the RFC 7523 claims.
fn certificate_assertion(
    idp: &Inner,
    endpoint: &Endpoint,
    client_id: &str,
    cert_der: &[u8],
    token: &str,
) -> Result<(), TokenError> {
    let jws = parse_assertion(token)?;
    if !matches!(jws.alg, Algorithm::PS256 | Algorithm::RS256) {
        return Err(bad_signature(
            "The algorithm of the client assertion must be PS256 or RS256.",
        ));
    }
    let thumbprint = b64url(digest::digest(&digest::SHA256, cert_der));
    match jws.header_str("x5t#S256") {
        Some(x5t) if x5t == thumbprint => {}
        Some(_) => {
            return Err(bad_signature(
                "The certificate with identifier used to sign the client assertion is not registered on application.",
            ));
        }
        None => {
            return Err(bad_signature(
                "The client assertion header has no 'x5t#S256' naming the certificate.",
            ));
        }
    }
    let key = match PublicKey::from_certificate(cert_der) {
        Some(key @ PublicKey::Rsa { .. }) => key,
        _ => {
            return Err(bad_signature(
                "The registered certificate has no RSA public key.",
            ));
        }
    };
    if !jws.verify(&key) {
        return Err(bad_signature(
            "The provided signature value did not match the expected signature value.",
        ));
    }
    assertion_claims(idp, endpoint, client_id, &jws)
}

/// `private_key_jwt` (OIDC Core §9): signed by the registered JWK; then the
/// RFC 7523 claims.
fn private_key_assertion(
    idp: &Inner,
    endpoint: &Endpoint,
    client_id: &str,
    jwk: &Value,
    token: &str,
) -> Result<(), TokenError> {
    let jws = parse_assertion(token)?;
    let Some(key) = PublicKey::from_jwk(jwk) else {
        return Err(bad_signature(
            "The registered key is not a usable RSA or P-256 JWK.",
        ));
    };
    let registered = |name: &str| jwk.get(name).and_then(Value::as_str);
    if let Some(alg) = registered("alg")
        && json!(jws.alg).as_str() != Some(alg)
    {
        return Err(bad_signature("The algorithm is not the registered key's."));
    }
    if let (Some(kid), Some(header_kid)) = (registered("kid"), jws.header_str("kid"))
        && kid != header_kid
    {
        return Err(bad_signature("The key id is not the registered key's."));
    }
    if !jws.verify(&key) {
        return Err(bad_signature(
            "The provided signature value did not match the expected signature value.",
        ));
    }
    assertion_claims(idp, endpoint, client_id, &jws)
}

/// RFC 7523 §3 as Entra applies it to client assertions: `iss` = `sub` =
/// client id, `aud` = the token endpoint called, `exp` at most 10 minutes
/// after `nbf` (or `iat`), a `jti` never seen before.
fn assertion_claims(
    idp: &Inner,
    endpoint: &Endpoint,
    client_id: &str,
    jws: &Jws,
) -> Result<(), TokenError> {
    let (iss, sub) = (jws.claim_str("iss"), jws.claim_str("sub"));
    if iss != sub {
        return Err(TokenError::invalid_client(
            50048,
            "Subject mismatches Issuer claim in the client assertion.",
        ));
    }
    if iss != Some(client_id) {
        return Err(TokenError::invalid_client(
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ));
    }
    let token_url = endpoint.token_url(idp);
    let aud_ok = jws.audience_contains(&token_url)
        || (*endpoint == Endpoint::Oidc && jws.audience_contains(&idp.oidc_issuer()));
    if !aud_ok {
        return Err(TokenError::invalid_client(
            50027,
            format!(
                "Invalid JWT token. The client assertion audience must be the token endpoint '{token_url}'."
            ),
        ));
    }
    let now = idp.now();
    let exp = check_times(jws, now, Some(MAX_ASSERTION_LIFETIME)).map_err(|t| match t {
        Timing::Missing(claim) => TokenError::invalid_client(
            90014,
            format!("The required field '{claim}' is missing from the credential."),
        ),
        Timing::Outside { exp } => TokenError::invalid_client(
            700024,
            format!("Client assertion is not within its valid time range. Current time: {}, assertion valid until: {}.", timestamp(now), timestamp(exp)),
        ),
        Timing::TooLong => TokenError::invalid_client(
            700024,
            "Client assertion is not within its valid time range: its lifetime exceeds 10 minutes.",
        ),
    })?;
    let Some(jti) = jws.claim_str("jti") else {
        return Err(TokenError::invalid_client(
            90014,
            "The required field 'jti' is missing from the credential.",
        ));
    };
    if !idp.accept_jti(jti, exp) {
        return Err(TokenError::invalid_client(
            50027,
            "Invalid JWT token. The client assertion 'jti' has already been used (replay).",
        ));
    }
    Ok(())
}

/// Workload identity federation: a token from the IdP's Kubernetes issuer
/// whose `sub` is the registered subject, for Entra's federation audience.
fn federated_assertion(idp: &Inner, subject: &str, token: &str) -> Result<(), TokenError> {
    let jws = parse_assertion(token)?;
    let iss = jws.claim_str("iss").unwrap_or_default();
    if iss != idp.k8s_issuer() {
        return Err(TokenError::invalid_client(
            700211,
            format!(
                "No matching federated identity record found for presented assertion issuer '{iss}'."
            ),
        ));
    }
    if !read(&idp.keys).verify(&jws) {
        return Err(bad_signature(
            "The federated token is not signed by a key of its issuer.",
        ));
    }
    let sub = jws.claim_str("sub").unwrap_or_default();
    if sub != subject {
        return Err(TokenError::invalid_client(
            700213,
            format!(
                "No matching federated identity record found for presented assertion subject '{sub}'."
            ),
        ));
    }
    if !jws.audience_contains(FEDERATED_TOKEN_AUDIENCE) {
        return Err(TokenError::invalid_client(
            700212,
            "No matching federated identity record found for presented assertion audience.",
        ));
    }
    let now = idp.now();
    check_times(&jws, now, None).map_err(|t| match t {
        Timing::Missing(claim) => TokenError::invalid_client(
            90014,
            format!("The required field '{claim}' is missing from the credential."),
        ),
        Timing::Outside { exp } => TokenError::invalid_client(
            700024,
            format!("Client assertion is not within its valid time range. Current time: {}, assertion valid until: {}.", timestamp(now), timestamp(exp)),
        ),
        Timing::TooLong => TokenError::invalid_client(700024, "Client assertion is too long-lived."),
    })?;
    Ok(())
}

/// OBO and client credentials need a directory: `common` and
/// `organizations` name none.
fn directory(tenant: &str) -> Result<(), TokenError> {
    match tenant {
        "common" => Err(TokenError::invalid_request(
            9001023,
            "The grant type isn't supported over the /common or /consumers endpoints. Use a tenant-specific endpoint.",
        )),
        t if MULTI_TENANT.contains(&t) => Err(TokenError::invalid_request(
            50059,
            "No tenant-identifying information found in either the request or implied by any provided credentials. Use a tenant-specific endpoint.",
        )),
        _ => Ok(()),
    }
}

/// Entra's On-Behalf-Of grant.
fn on_behalf_of(
    idp: &Inner,
    tenant: &str,
    auth: &Authenticated,
    form: &Form<'_>,
    behaviour: &Snapshot,
) -> Result<Value, TokenError> {
    directory(tenant)?;
    let use_ = form.required("requested_token_use")?;
    if use_ != "on_behalf_of" {
        return Err(TokenError::invalid_request(
            90100,
            format!(
                "The 'requested_token_use' parameter is not valid: '{use_}'. Use 'on_behalf_of'."
            ),
        ));
    }
    let assertion = form.required("assertion")?;
    let scope = form.required("scope")?;
    let user = user_assertion(idp, tenant, &auth.client.client_id, assertion)?;
    let target = EntraScopes::parse(scope)?;
    let oid = user.claim_str("oid").unwrap_or_default();
    if let Some(challenge) = &behaviour.claims_challenge
        && challenge.oid == oid
    {
        let mut e = TokenError::bad_request(
            "interaction_required",
            50076,
            "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access the resource.".to_owned(),
        );
        e.claims = Some(challenge.claims.clone());
        return Err(e);
    }
    if let Some(missing) = &behaviour.consent_missing
        && target.requested.iter().any(|s| s == missing)
    {
        let mut e = TokenError::invalid_grant(
            65001,
            format!(
                "The user or administrator has not consented to use the application with ID '{}'. Send an interactive authorization request for this user and resource.",
                auth.client.client_id
            ),
        );
        e.suberror = Some("consent_required");
        return Err(e);
    }
    let permissions = target.permissions(idp)?;
    let now = idp.now();
    let lifetime = secs(behaviour.lifetime);
    let mut claims = Map::new();
    claims.insert("aud".into(), json!(target.resource));
    claims.insert("iss".into(), json!(idp.entra_issuer(tenant)));
    claims.insert("iat".into(), json!(now));
    claims.insert("nbf".into(), json!(now));
    claims.insert("exp".into(), json!(now.saturating_add(lifetime)));
    claims.insert("azp".into(), json!(auth.client.client_id));
    claims.insert("azpacr".into(), json!(auth.acr));
    claims.insert("idtyp".into(), json!("user"));
    for copied in ["oid", "sub", "name", "preferred_username", "upn"] {
        if let Some(value) = user.claims.get(copied) {
            claims.insert(copied.into(), value.clone());
        }
    }
    claims.insert("scp".into(), json!(permissions.join(" ")));
    claims.insert("tid".into(), json!(tenant));
    claims.insert("uti".into(), json!(b64_id()));
    claims.insert("ver".into(), json!("2.0"));
    let access_token = sign(idp, jwt_header(), &claims)?;
    let mut granted: Vec<String> = permissions
        .iter()
        .map(|p| format!("{}/{p}", target.resource))
        .collect();
    granted.extend(target.oidc.iter().cloned());
    let mut answer = json!({
        "token_type": "Bearer",
        "scope": granted.join(" "),
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": access_token,
    });
    if target.oidc.iter().any(|s| s == "offline_access")
        && let Some(map) = answer.as_object_mut()
    {
        map.insert(
            "refresh_token".into(),
            json!(b64url(super::random_bytes::<32>())),
        );
    }
    Ok(answer)
}

/// The caller's token an OBO request carries: issued by this IdP for the
/// tenant of the request, current, for this client, and a user's.
fn user_assertion(
    idp: &Inner,
    tenant: &str,
    client_id: &str,
    assertion: &str,
) -> Result<Jws, TokenError> {
    let jws = Jws::parse(assertion).map_err(|e| {
        TokenError::invalid_grant(50027, format!("JWT token is invalid or malformed: {e}."))
    })?;
    if !read(&idp.keys).verify(&jws) {
        return Err(TokenError::invalid_grant(
            50013,
            "Assertion failed signature validation. [Reason - The key was not found.]",
        ));
    }
    let tid = jws.claim_str("tid").unwrap_or_default();
    let iss = jws.claim_str("iss").unwrap_or_default();
    if tid != tenant || (iss != idp.entra_issuer(tid) && iss != idp.entra_v1_issuer(tid)) {
        return Err(TokenError::invalid_grant(
            50013,
            format!(
                "Assertion is invalid: its issuer '{iss}' is not the tenant '{tenant}' of the request."
            ),
        ));
    }
    let now = idp.now();
    check_times(&jws, now, None).map_err(|t| match t {
        Timing::Outside { exp } => TokenError::invalid_grant(
            500133,
            format!("Assertion is not within its valid time range. Ensure that the access token is not expired before using it for user assertion, or request a new token. Current time: {}, expiry time of assertion {}.", timestamp(now), timestamp(exp)),
        ),
        Timing::Missing(_) | Timing::TooLong => {
            TokenError::invalid_grant(50027, "JWT token is invalid or malformed: no 'exp'.")
        }
    })?;
    if !jws.audience_contains(client_id) && !jws.audience_contains(&format!("api://{client_id}")) {
        return Err(TokenError::invalid_grant(
            500131,
            "Assertion audience does not match the Client application identifier.",
        ));
    }
    let app_only = jws.claim_str("idtyp") == Some("app") || !jws.claims.contains_key("scp");
    if app_only {
        return Err(TokenError::bad_request(
            "unauthorized_client",
            7000114,
            format!(
                "Application '{client_id}' is not allowed to make application on-behalf-of calls."
            ),
        ));
    }
    Ok(jws)
}

/// An Entra `scope` parameter: permissions of exactly one resource, plus
/// OpenID Connect scopes.
struct EntraScopes {
    resource: String,
    /// Permission names, e.g. `User.Read` or `.default`.
    names: Vec<String>,
    /// The resource scopes as requested.
    requested: Vec<String>,
    oidc: Vec<String>,
}

impl EntraScopes {
    fn parse(scope: &str) -> Result<Self, TokenError> {
        let mut resource: Option<String> = None;
        let (mut names, mut requested, mut oidc) = (Vec::new(), Vec::new(), Vec::new());
        for item in scope.split_whitespace() {
            if OIDC_SCOPES.contains(&item) {
                oidc.push(item.to_owned());
                continue;
            }
            let Some((res, name)) = split_scope(item) else {
                return Err(TokenError::invalid_scope(
                    70011,
                    format!(
                        "The provided value for the input parameter 'scope' is not valid. The scope {item} is not valid."
                    ),
                ));
            };
            match &resource {
                Some(r) if *r != res => {
                    return Err(TokenError::invalid_scope(
                        700022,
                        "The provided value for the input parameter scope is not valid because it contains more than one resource.",
                    ));
                }
                _ => resource = Some(res),
            }
            names.push(name);
            requested.push(item.to_owned());
        }
        let Some(resource) = resource else {
            return Err(TokenError::invalid_scope(
                70011,
                "The provided value for the input parameter 'scope' is not valid: it names no resource.",
            ));
        };
        if names.iter().any(|n| n == ".default") && names.len() > 1 {
            return Err(TokenError::invalid_scope(
                70011,
                "The provided value for the input parameter 'scope' is not valid: '.default' can't be combined with other scopes of the resource.",
            ));
        }
        Ok(Self {
            resource,
            names,
            requested,
            oidc,
        })
    }

    /// What the token grants: the names, with `.default` expanded.
    fn permissions(&self, idp: &Inner) -> Result<Vec<String>, TokenError> {
        if self.names.iter().any(|n| n == ".default") {
            return Ok(idp
                .consented_scopes(&self.resource)
                .unwrap_or_else(|| vec!["default".to_owned()]));
        }
        Ok(self.names.clone())
    }
}

/// `https://graph.microsoft.com/User.Read` → (`https://graph.microsoft.com`,
/// `User.Read`); `api://x/.default` → (`api://x`, `.default`); a bare
/// `User.Read` is Microsoft Graph's, as on Entra.
fn split_scope(item: &str) -> Option<(String, String)> {
    if let Some(scheme_end) = item.find("://") {
        let host_start = scheme_end + 3;
        let slash = host_start + item.get(host_start..)?.rfind('/')?;
        let (resource, name) = (item.get(..slash)?, item.get(slash + 1..)?);
        // Entra accepts `https://host//.default`; the resource has no trailing slash.
        let resource = resource.trim_end_matches('/');
        (resource.len() > host_start && !name.is_empty())
            .then(|| (resource.to_owned(), name.to_owned()))
    } else if let Some((resource, name)) = item.rsplit_once('/') {
        (!resource.is_empty() && !name.is_empty()).then(|| (resource.to_owned(), name.to_owned()))
    } else {
        Some((GRAPH.to_owned(), item.to_owned()))
    }
}

/// Entra's client credentials: one `{resource}/.default` scope.
fn entra_client_credentials(
    idp: &Inner,
    tenant: &str,
    auth: &Authenticated,
    form: &Form<'_>,
    behaviour: &Snapshot,
) -> Result<Value, TokenError> {
    directory(tenant)?;
    let scope = form.required("scope")?;
    let items: Vec<&str> = scope.split_whitespace().collect();
    let [item] = items.as_slice() else {
        return Err(TokenError::invalid_scope(
            70011,
            "The provided value for the input parameter 'scope' is not valid. Client credential flows must have exactly one scope value, '{resource}/.default'.",
        ));
    };
    let resource = item
        .strip_suffix("/.default")
        .map(|r| r.trim_end_matches('/'))
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            TokenError::invalid_scope(
                1002012,
                format!("The provided value for scope {item} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
            )
        })?;
    let now = idp.now();
    let lifetime = secs(behaviour.lifetime);
    let client = &auth.client;
    let sp = service_principal_oid(&client.client_id);
    let mut claims = Map::new();
    claims.insert("aud".into(), json!(resource));
    claims.insert("iss".into(), json!(idp.entra_issuer(tenant)));
    claims.insert("iat".into(), json!(now));
    claims.insert("nbf".into(), json!(now));
    claims.insert("exp".into(), json!(now.saturating_add(lifetime)));
    claims.insert("azp".into(), json!(client.client_id));
    claims.insert("azpacr".into(), json!(auth.acr));
    claims.insert("idtyp".into(), json!("app"));
    claims.insert("oid".into(), json!(sp));
    if !client.roles.is_empty() {
        claims.insert("roles".into(), json!(client.roles));
    }
    claims.insert("sub".into(), json!(sp));
    claims.insert("tid".into(), json!(tenant));
    claims.insert("uti".into(), json!(b64_id()));
    claims.insert("ver".into(), json!("2.0"));
    let access_token = sign(idp, jwt_header(), &claims)?;
    Ok(json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": access_token,
    }))
}

/// Client credentials at the OIDC endpoint: `aud` from `audience`, else
/// `resource`, else the client itself; RFC 9068 claims.
fn oidc_client_credentials(
    idp: &Inner,
    auth: &Authenticated,
    form: &Form<'_>,
    behaviour: &Snapshot,
) -> Result<Value, TokenError> {
    let client = &auth.client;
    let audiences = oidc_audiences(form, &client.client_id)?;
    let scope = form.get("scope");
    let mut claims = oidc_claims(
        idp,
        &client.client_id,
        &client.client_id,
        &audiences,
        scope,
        behaviour,
    );
    if !client.roles.is_empty() {
        claims.insert("roles".into(), json!(client.roles));
    }
    let access_token = sign(idp, at_jwt_header(), &claims)?;
    let mut answer = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": secs(behaviour.lifetime),
    });
    if let (Some(scope), Some(map)) = (scope, answer.as_object_mut()) {
        map.insert("scope".into(), json!(scope));
    }
    Ok(answer)
}

/// RFC 8693 token exchange (impersonation semantics: no `act`).
fn token_exchange(
    idp: &Inner,
    auth: &Authenticated,
    form: &Form<'_>,
    behaviour: &Snapshot,
) -> Result<Value, TokenError> {
    let client_id = &auth.client.client_id;
    let subject_token = form.required("subject_token")?;
    let subject_type = form.required("subject_token_type")?;
    if subject_type != ACCESS_TOKEN_TYPE {
        return Err(TokenError::invalid_request(
            0,
            format!("unsupported subject_token_type '{subject_type}': only '{ACCESS_TOKEN_TYPE}'"),
        ));
    }
    if form.get("actor_token").is_some() {
        return Err(TokenError::invalid_request(
            0,
            "actor_token (delegation) is not supported by the development IdP",
        ));
    }
    if let Some(requested) = form.get("requested_token_type")
        && requested != ACCESS_TOKEN_TYPE
        && requested != JWT_TOKEN_TYPE
    {
        return Err(TokenError::invalid_request(
            0,
            format!("unsupported requested_token_type '{requested}'"),
        ));
    }
    let subject = Jws::parse(subject_token)
        .map_err(|e| TokenError::invalid_grant(0, format!("subject_token: {e}")))?;
    if !read(&idp.keys).verify(&subject) {
        return Err(TokenError::invalid_grant(
            0,
            "subject_token signature is invalid",
        ));
    }
    if subject.claim_str("iss") != Some(idp.oidc_issuer().as_str()) {
        return Err(TokenError::invalid_grant(
            0,
            "subject_token was not issued by this issuer",
        ));
    }
    check_times(&subject, idp.now(), None)
        .map_err(|_| TokenError::invalid_grant(0, "subject_token is expired or not yet valid"))?;
    if !subject.audience_contains(client_id) {
        return Err(TokenError::invalid_grant(
            0,
            "subject_token audience does not include the requesting client",
        ));
    }
    let audiences = oidc_audiences(form, client_id)?;
    let scope = form.get("scope");
    let sub = subject.claim_str("sub").unwrap_or_default();
    let claims = oidc_claims(idp, sub, client_id, &audiences, scope, behaviour);
    let access_token = sign(idp, at_jwt_header(), &claims)?;
    let mut answer = json!({
        "access_token": access_token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": secs(behaviour.lifetime),
    });
    if let (Some(scope), Some(map)) = (scope, answer.as_object_mut()) {
        map.insert("scope".into(), json!(scope));
    }
    Ok(answer)
}

/// Audiences of an OIDC-issued token (RFC 8693 §2.1: `resource` must be an
/// absolute URI, else `invalid_target`).
fn oidc_audiences(form: &Form<'_>, client_id: &str) -> Result<Vec<String>, TokenError> {
    let resources = form.all("resource");
    if let Some(bad) = resources.iter().find(|r| !r.contains("://")) {
        return Err(TokenError::bad_request(
            "invalid_target",
            0,
            format!("resource '{bad}' is not an absolute URI"),
        ));
    }
    let audiences = form.all("audience");
    let chosen = if !audiences.is_empty() {
        audiences
    } else if !resources.is_empty() {
        resources
    } else {
        vec![client_id]
    };
    Ok(chosen.into_iter().map(str::to_owned).collect())
}

/// RFC 9068 §2.2 claims.
fn oidc_claims(
    idp: &Inner,
    sub: &str,
    client_id: &str,
    audiences: &[String],
    scope: Option<&str>,
    behaviour: &Snapshot,
) -> Map<String, Value> {
    let now = idp.now();
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(idp.oidc_issuer()));
    claims.insert("sub".into(), json!(sub));
    claims.insert(
        "aud".into(),
        match audiences {
            [one] => json!(one),
            many => json!(many),
        },
    );
    claims.insert("client_id".into(), json!(client_id));
    claims.insert("iat".into(), json!(now));
    claims.insert("nbf".into(), json!(now));
    claims.insert(
        "exp".into(),
        json!(now.saturating_add(secs(behaviour.lifetime))),
    );
    claims.insert("jti".into(), json!(guid()));
    if let Some(scope) = scope {
        claims.insert("scope".into(), json!(scope));
    }
    claims
}

fn jwt_header() -> Map<String, Value> {
    let mut header = Map::new();
    header.insert("typ".into(), json!("JWT"));
    header
}

fn at_jwt_header() -> Map<String, Value> {
    let mut header = Map::new();
    header.insert("typ".into(), json!("at+jwt"));
    header
}

/// Issued tokens are RS256, as Entra's.
fn sign(
    idp: &Inner,
    header: Map<String, Value>,
    claims: &Map<String, Value>,
) -> Result<String, TokenError> {
    idp.sign(Algorithm::RS256, header, claims).map_err(|e| {
        tracing::error!(error = %e, "development IdP: sign issued token");
        TokenError::internal("TokenIssuanceError: could not sign the token.")
    })
}

/// A stable object id for a client's service principal.
fn service_principal_oid(client_id: &str) -> String {
    let d = digest::digest(
        &digest::SHA256,
        format!("service-principal:{client_id}").as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    crate::exchange::credential::guid_text(&b)
}

/// Entra's timestamp format: `2016-01-09 02:02:12Z`.
fn timestamp(secs: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or_default());
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .replacen('T', " ", 1)
}

/// RFC 6749 §5.1: token answers are not cached.
fn no_store(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// The error answer of `endpoint`.
pub(super) fn error_response(
    idp: &Inner,
    endpoint: &Endpoint,
    e: &TokenError,
) -> Response<Full<Bytes>> {
    let body = match endpoint {
        Endpoint::Entra(_) => {
            let (trace_id, correlation_id) = (guid(), guid());
            let timestamp = timestamp(idp.now());
            let mut body = json!({
                "error": e.error,
                "error_description": format!(
                    "AADSTS{}: {}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}",
                    e.code, e.description
                ),
                "error_codes": [e.code],
                "timestamp": timestamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": format!("{}/error?code={}", idp.base, e.code),
            });
            if let Some(map) = body.as_object_mut() {
                if let Some(claims) = &e.claims {
                    map.insert("claims".into(), json!(claims));
                }
                if let Some(suberror) = e.suberror {
                    map.insert("suberror".into(), json!(suberror));
                }
            }
            body
        }
        Endpoint::Oidc => json!({ "error": e.error, "error_description": e.description }),
    };
    let mut response = no_store(json_response(e.status, &body));
    let headers = response.headers_mut();
    if let Some(seconds) = e.retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    if e.basic_challenge {
        headers.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"oboe-dev-idp\""),
        );
    }
    response
}

fn malformed_response(malformed: Malformed) -> Response<Full<Bytes>> {
    match malformed {
        Malformed::NotJson => {
            let mut response = Response::new(Full::new(Bytes::from_static(
                b"<html><body>Sign in to your account</body></html>",
            )));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        Malformed::NoAccessToken => no_store(json_response(
            StatusCode::OK,
            &json!({ "token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600 }),
        )),
    }
}
