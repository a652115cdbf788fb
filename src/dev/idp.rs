//! The embedded development identity provider behind `oboe dev` and the tests.
//!
//! It exists so the whole flow runs on a laptop or in CI with no cloud tenant:
//! it serves Entra-shaped endpoints (so oboe's real `provider: entra` code path
//! runs against it with `identity.instance` pointed at [`DevIdp::base_url`]) and
//! generic OIDC / RFC 8414 endpoints (for `provider: oidc`), mints tokens with
//! Entra v2 (or v1, or RFC 9068) claims, answers OBO, RFC 8693 and
//! client-credentials requests after checking client credentials the way a
//! real IdP does, rotates its keys on demand, misbehaves when told to, and
//! records what it received so tests can assert on what oboe sent.
//!
//! Routes (`{tenant}` is a known tenant GUID, `organizations` or `common`):
//!
//! | Path | What |
//! |---|---|
//! | `GET /{tenant}/v2.0/.well-known/openid-configuration` | Entra v2 discovery |
//! | `GET /{tenant}/.well-known/openid-configuration` | Entra v1 discovery |
//! | `GET /{tenant}/discovery/v2.0/keys`, `/{tenant}/discovery/keys` | JWKS, Entra style |
//! | `POST /{tenant}/oauth2/v2.0/token` | OBO (jwt-bearer), client credentials |
//! | `GET /oidc/.well-known/openid-configuration`, `/.well-known/oauth-authorization-server/oidc` | OIDC / RFC 8414 metadata |
//! | `GET /oidc/keys` | JWKS |
//! | `POST /oidc/token` | RFC 8693 token exchange, client credentials |
//! | `GET /k8s/.well-known/openid-configuration`, `/k8s/openid/v1/jwks` | the issuer of [`DevIdp::mint_federated`] tokens |
//! | `GET /.dev/counters` | [`DevIdp::counters`] as JSON, for a caller in another process (the load benchmark) |
//!
//! It binds loopback only, logs loudly that it is for development, and has no
//! clock-skew leeway: it shares one machine (and clock) with whatever calls it.
//! It never logs a token or a secret.

mod jose;
mod keys;
mod server;
mod token;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use keys::KeySet;

/// The default tenant: every `Mint` starts in it.
pub const DEV_TENANT: &str = "4f9c1d2e-7a3b-4c5d-8e6f-0a1b2c3d4e5f";
/// A second tenant, for multi-tenant tests (`organizations` / `common`).
pub const SECOND_TENANT: &str = "9b8a7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d";
/// The object id (`oid`) of the default user of [`Mint::user`].
pub const DEV_USER_OID: &str = "2d4e6f80-1a3c-4e5f-8a7b-9c0d1e2f3a4b";
/// The pairwise subject (`sub`) of the default user of [`Mint::user`].
pub const DEV_USER_SUB: &str = "dGhlLWRldi11c2VyLXN1YmplY3QtZm9yLW9ib2U";
/// The application the caller signed in with (`azp`/`appid` of [`Mint`]).
pub const DEV_CLIENT_APP: &str = "5c6d7e8f-9a0b-4c1d-8e2f-3a4b5c6d7e8f";
/// The service principal object id (`oid` = `sub`) of [`Mint::app`] tokens.
pub const DEV_APP_OID: &str = "7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d";
/// The audience of workload identity federation tokens (Entra's fixed value).
pub const FEDERATED_TOKEN_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The `claims` a claims challenge carries unless told otherwise: a
/// Conditional Access policy the caller's token does not satisfy.
pub const DEFAULT_CHALLENGE_CLAIMS: &str = r#"{"access_token":{"capolids":{"essential":true,"values":["1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e"]}}}"#;
/// `grant_type` of the Entra OBO request (RFC 7523 §2.1).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// `grant_type` of RFC 8693 token exchange.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 §3 token type of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A running development IdP. Cheap to clone; the server stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct DevIdp {
    inner: Arc<Inner>,
    _server: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for DevIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIdp")
            .field("base_url", &self.inner.base)
            .finish_non_exhaustive()
    }
}

/// What a token carries and how it is signed; see [`DevIdp::mint`].
///
/// Start from [`Mint::user`] or [`Mint::app`] and change the public fields.
#[derive(Debug, Clone)]
pub struct Mint {
    /// `tid`, and the tenant of the issuer. Defaults to [`DEV_TENANT`].
    pub tenant: String,
    /// `oid`: the user (or service principal) object id.
    pub oid: String,
    /// `sub`.
    pub sub: String,
    /// The application that obtained the token: `azp` (v2), `appid` (v1),
    /// `client_id` (OIDC). Defaults to [`DEV_CLIENT_APP`].
    pub client_app: String,
    /// `aud`.
    pub audience: String,
    /// Delegated (user) or application permissions.
    pub kind: Kind,
    /// Claim set and issuer. Defaults to [`Version::V2`].
    pub version: Version,
    /// Signing algorithm: RS256, PS256 (the RSA key) or ES256 (the P-256 key).
    /// Defaults to RS256, as Entra signs.
    pub alg: Algorithm,
    /// `exp - iat`. Defaults to one hour.
    pub lifetime: Duration,
    /// `nbf - iat` in seconds (negative: valid since before it was issued).
    /// Defaults to 0.
    pub not_before_offset: i64,
    /// Claims merged last: they override anything above.
    pub extra: Map<String, Value>,
}

/// Delegated or application permissions of a minted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A user's token: `scp` (space-separated) and `idtyp: "user"`.
    User {
        /// Delegated permissions, e.g. `access_as_user`.
        scopes: Vec<String>,
    },
    /// An app-only token: `roles` (array, omitted when empty) and `idtyp: "app"`.
    App {
        /// Application permissions (app roles).
        roles: Vec<String>,
    },
}

/// Which claim set a minted token follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Entra v2: `iss` = [`DevIdp::entra_issuer`], `azp`, `ver: "2.0"`.
    V2,
    /// Entra v1: `iss` = [`DevIdp::entra_v1_issuer`], `appid`, `ver: "1.0"`.
    V1,
    /// A generic OIDC provider, RFC 9068: `iss` = [`DevIdp::oidc_issuer`],
    /// header `typ: at+jwt`, `client_id`, `scope` (space-separated) or
    /// `roles`, `jti`; no `tid`/`oid`.
    Oidc,
}

impl Mint {
    /// A user token for `audience` with scope `access_as_user`, for
    /// [`DEV_USER_OID`] in [`DEV_TENANT`].
    pub fn user(audience: impl Into<String>) -> Self {
        Self {
            tenant: DEV_TENANT.to_owned(),
            oid: DEV_USER_OID.to_owned(),
            sub: DEV_USER_SUB.to_owned(),
            client_app: DEV_CLIENT_APP.to_owned(),
            audience: audience.into(),
            kind: Kind::User {
                scopes: vec!["access_as_user".to_owned()],
            },
            version: Version::V2,
            alg: Algorithm::RS256,
            lifetime: Duration::from_secs(3600),
            not_before_offset: 0,
            extra: Map::new(),
        }
    }

    /// An app-only token for `audience` with no roles, for the service
    /// principal [`DEV_APP_OID`] of [`DEV_CLIENT_APP`].
    pub fn app(audience: impl Into<String>) -> Self {
        Self {
            oid: DEV_APP_OID.to_owned(),
            sub: DEV_APP_OID.to_owned(),
            kind: Kind::App { roles: Vec::new() },
            ..Self::user(audience)
        }
    }

    /// Replaces the delegated scopes (making this a user token).
    pub fn scopes<S: Into<String>>(mut self, scopes: impl IntoIterator<Item = S>) -> Self {
        self.kind = Kind::User {
            scopes: scopes.into_iter().map(Into::into).collect(),
        };
        self
    }

    /// Replaces the app roles (making this an app-only token).
    pub fn roles<S: Into<String>>(mut self, roles: impl IntoIterator<Item = S>) -> Self {
        self.kind = Kind::App {
            roles: roles.into_iter().map(Into::into).collect(),
        };
        self
    }

    /// Sets the tenant.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// Sets the claim-set version.
    pub fn version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }

    /// Sets the signing algorithm.
    pub fn alg(mut self, alg: Algorithm) -> Self {
        self.alg = alg;
        self
    }

    /// Sets the lifetime.
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Adds (or overrides) one claim.
    pub fn claim(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extra.insert(name.into(), value.into());
        self
    }
}

/// A confidential client the token endpoint accepts.
#[derive(Debug, Clone)]
pub struct Client {
    /// `client_id`.
    pub client_id: String,
    /// How it authenticates.
    pub auth: ClientAuth,
    /// App roles granted to it: the `roles` of the client-credentials tokens
    /// it obtains. Defaults to none (Entra then omits `roles`).
    pub roles: Vec<String>,
}

impl Client {
    /// A client authenticating with `client_secret` (body or HTTP Basic).
    pub fn secret(client_id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self::new(client_id, ClientAuth::Secret(secret.into()))
    }

    /// A client authenticating with a certificate-signed JWT assertion.
    pub fn certificate(client_id: impl Into<String>, cert_der: impl Into<Vec<u8>>) -> Self {
        Self::new(
            client_id,
            ClientAuth::Certificate {
                cert_der: cert_der.into(),
            },
        )
    }

    /// A client authenticating with a [`DevIdp::mint_federated`] token.
    pub fn federated(client_id: impl Into<String>, subject: impl Into<String>) -> Self {
        Self::new(
            client_id,
            ClientAuth::Federated {
                subject: subject.into(),
            },
        )
    }

    /// A client authenticating with `private_key_jwt`, checked with a public JWK.
    pub fn private_key_jwt(client_id: impl Into<String>, public_key_jwk: Value) -> Self {
        Self::new(client_id, ClientAuth::PrivateKeyJwt { public_key_jwk })
    }

    /// A client with the given authentication and no roles.
    pub fn new(client_id: impl Into<String>, auth: ClientAuth) -> Self {
        Self {
            client_id: client_id.into(),
            auth,
            roles: Vec::new(),
        }
    }

    /// Grants app roles.
    pub fn with_roles<S: Into<String>>(mut self, roles: impl IntoIterator<Item = S>) -> Self {
        self.roles = roles.into_iter().map(Into::into).collect();
        self
    }
}

/// How a registered client proves who it is.
#[derive(Clone)]
pub enum ClientAuth {
    /// `client_secret` in the body (`client_secret_post`) or HTTP Basic
    /// (`client_secret_basic`, RFC 6749 §2.3.1).
    Secret(String),
    /// A JWT assertion (RFC 7523 §2.2 as Entra profiles it) signed PS256 or
    /// RS256 with the key of this X.509 certificate (DER; RSA only, as Entra),
    /// naming it in `x5t#S256`.
    Certificate {
        /// The certificate, DER.
        cert_der: Vec<u8>,
    },
    /// Workload identity federation: a [`DevIdp::mint_federated`] token whose
    /// `sub` is `subject`.
    Federated {
        /// The expected `sub`, e.g. `system:serviceaccount:ns:name`.
        subject: String,
    },
    /// `private_key_jwt` (OIDC Core §9): a JWT assertion checked with this
    /// public JWK (RSA for RS*/PS*, or EC P-256 for ES256; its `alg` and
    /// `kid`, when present, must match the assertion's header).
    PrivateKeyJwt {
        /// The public key, as a JWK.
        public_key_jwk: Value,
    },
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret([redacted])"),
            Self::Certificate { cert_der } => f
                .debug_struct("Certificate")
                .field("cert_der_len", &cert_der.len())
                .finish(),
            Self::Federated { subject } => f
                .debug_struct("Federated")
                .field("subject", subject)
                .finish(),
            Self::PrivateKeyJwt { public_key_jwk } => f
                .debug_struct("PrivateKeyJwt")
                .field("public_key_jwk", public_key_jwk)
                .finish(),
        }
    }
}

/// How many requests of each kind the IdP received (failed ones included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Discovery documents (all of them).
    pub discovery: u64,
    /// Key sets.
    pub keys: u64,
    /// Token endpoint requests.
    pub token: u64,
}

/// One request the token endpoint received, as received.
#[derive(Clone)]
pub struct TokenRequest {
    /// The request path, e.g. `/{tenant}/oauth2/v2.0/token`.
    pub path: String,
    /// The decoded form body, in order.
    pub form: Vec<(String, String)>,
    /// The `Authorization` header, when one was sent.
    pub authorization: Option<String>,
}

impl TokenRequest {
    /// The first value of a form field.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Field values hold tokens and secrets: show names only.
        let names: Vec<&str> = self.form.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TokenRequest")
            .field("path", &self.path)
            .field("fields", &names)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// How the IdP misbehaves. Every switch is off by default; change them at any
/// time with [`DevIdp::set_behaviour`] or [`DevIdp::update_behaviour`].
///
/// For a token request the first that applies wins: `throttle`,
/// `fail_next`, `malformed`; then the request is processed normally, where
/// `claims_challenge` and `consent_missing` apply to OBO requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behaviour {
    /// OBO requests for this user get a Conditional Access claims challenge
    /// (400 `interaction_required`, AADSTS50076, with `claims`).
    pub claims_challenge: Option<ClaimsChallenge>,
    /// OBO requests asking for this scope (exactly as requested, e.g.
    /// `https://graph.microsoft.com/Mail.Read`) get 400 `invalid_grant`
    /// AADSTS65001 (consent missing).
    pub consent_missing: Option<String>,
    /// Every token request gets 429 with `Retry-After` of this many seconds.
    pub throttle: Option<Duration>,
    /// The next token requests get this 5xx answer, then normal ones.
    pub fail_next: Option<FailNext>,
    /// Wait this long before answering a token request.
    pub token_delay: Duration,
    /// Wait this long before answering a key set request.
    pub keys_delay: Duration,
    /// Token requests get a broken 200 answer.
    pub malformed: Option<Malformed>,
    /// Key sets answer 503.
    pub keys_down: bool,
    /// Discovery documents answer 503.
    pub discovery_down: bool,
    /// Lifetime (`expires_in`, `exp - iat`) of the tokens the token endpoint
    /// issues. Defaults to one hour.
    pub token_lifetime: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            claims_challenge: None,
            consent_missing: None,
            throttle: None,
            fail_next: None,
            token_delay: Duration::ZERO,
            keys_delay: Duration::ZERO,
            malformed: None,
            keys_down: false,
            discovery_down: false,
            token_lifetime: Duration::from_secs(3600),
        }
    }
}

/// A claims challenge for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimsChallenge {
    /// The user (`oid` of the OBO assertion) to challenge.
    pub oid: String,
    /// The `claims` JSON string the error carries.
    pub claims: String,
}

impl ClaimsChallenge {
    /// Challenges `oid` with [`DEFAULT_CHALLENGE_CLAIMS`].
    pub fn for_user(oid: impl Into<String>) -> Self {
        Self {
            oid: oid.into(),
            claims: DEFAULT_CHALLENGE_CLAIMS.to_owned(),
        }
    }
}

/// Server errors for the next `remaining` token requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailNext {
    /// The status, e.g. 500 or 503.
    pub status: StatusCode,
    /// How many more requests fail.
    pub remaining: u32,
}

/// A broken success answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// 200 with an HTML body.
    NotJson,
    /// 200 with JSON that has no `access_token`.
    NoAccessToken,
}

impl DevIdp {
    /// Binds `127.0.0.1:0` and serves in a spawned tokio task. Logs a loud
    /// warning that it is for development only.
    pub async fn start() -> std::io::Result<DevIdp> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Self::start_on(listener)
    }

    /// Serves on an already bound listener, which must be on loopback.
    /// Call it from within a Tokio runtime: the server is a spawned task.
    pub fn start_on(listener: TcpListener) -> std::io::Result<DevIdp> {
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("start development IdP: {addr} is not a loopback address"),
            ));
        }
        let keys = KeySet::generate().map_err(std::io::Error::other)?;
        let inner = Arc::new(Inner {
            addr,
            base: format!("http://{addr}"),
            keys: RwLock::new(keys),
            clients: RwLock::new(HashMap::new()),
            tenants: RwLock::new(HashSet::from([
                DEV_TENANT.to_owned(),
                SECOND_TENANT.to_owned(),
            ])),
            consented: RwLock::new(HashMap::new()),
            behaviour: Mutex::new(Behaviour::default()),
            used_jti: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            discovery_count: AtomicU64::new(0),
            keys_count: AtomicU64::new(0),
            token_count: AtomicU64::new(0),
            skew_secs: AtomicI64::new(0),
        });
        tracing::warn!(
            url = %inner.base,
            "development identity provider started: DEVELOPMENT ONLY, its keys and tokens are not secret and must never be trusted outside a test"
        );
        let task = tokio::spawn(server::serve(listener, Arc::clone(&inner)));
        Ok(DevIdp {
            inner,
            _server: Arc::new(AbortOnDrop(task)),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT`: the `identity.instance` of `provider: entra`.
    pub fn base_url(&self) -> String {
        self.inner.base.clone()
    }

    /// The v2 issuer of `tenant`: `{base}/{tenant}/v2.0`.
    pub fn entra_issuer(&self, tenant: &str) -> String {
        self.inner.entra_issuer(tenant)
    }

    /// The v1 issuer of `tenant`: `{base}/{tenant}/` (the analog of
    /// `https://sts.windows.net/{tid}/`).
    pub fn entra_v1_issuer(&self, tenant: &str) -> String {
        self.inner.entra_v1_issuer(tenant)
    }

    /// The generic OIDC issuer: `{base}/oidc`.
    pub fn oidc_issuer(&self) -> String {
        self.inner.oidc_issuer()
    }

    /// The issuer of [`DevIdp::mint_federated`] tokens: `{base}/k8s`.
    pub fn k8s_issuer(&self) -> String {
        self.inner.k8s_issuer()
    }

    /// The v2 token endpoint of `tenant`: `{base}/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self, tenant: &str) -> String {
        self.inner.entra_token_url(tenant)
    }

    /// The OIDC token endpoint: `{base}/oidc/token`.
    pub fn oidc_token_url(&self) -> String {
        self.inner.oidc_token_url()
    }

    /// The v2 key set of `tenant`: `{base}/{tenant}/discovery/v2.0/keys`.
    pub fn jwks_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/discovery/v2.0/keys", self.inner.base)
    }

    /// Makes another tenant GUID known (besides [`DEV_TENANT`] and
    /// [`SECOND_TENANT`]); unknown tenants get AADSTS90002 as on Entra.
    pub fn add_tenant(&self, tenant: &str) {
        write(&self.inner.tenants).insert(tenant.to_owned());
    }

    /// Registers (or replaces) a confidential client the token endpoint accepts.
    pub fn register_client(&self, client: Client) {
        write(&self.inner.clients).insert(client.client_id.clone(), client);
    }

    /// What `{resource}/.default` grants in OBO tokens (Entra: the statically
    /// consented permissions). Without this, `.default` grants `default`.
    pub fn set_consented_scopes<S: Into<String>>(
        &self,
        resource: &str,
        scopes: impl IntoIterator<Item = S>,
    ) {
        write(&self.inner.consented).insert(
            resource.to_owned(),
            scopes.into_iter().map(Into::into).collect(),
        );
    }

    /// Mints an access token signed with the current key for `spec.alg`.
    pub fn mint(&self, spec: &Mint) -> String {
        let (header, claims) = self.inner.mint_claims(spec);
        self.inner
            .sign(spec.alg, header, &claims)
            .expect("sign with the IdP's own freshly generated key")
    }

    /// Signs arbitrary header and claims JSON (objects) with the current key
    /// for `alg`, for hostile-token tests: sets `alg`, and `kid` unless the
    /// header has one. HS256/384/512 are keyed with the RSA key's public
    /// `RSAPublicKey` DER (the algorithm-confusion attack); algorithms the
    /// IdP has no key for get random signature bytes. Non-object JSON is
    /// treated as an empty object.
    pub fn sign_raw(&self, alg: Algorithm, header: Value, claims: Value) -> String {
        let object = |v: Value| match v {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        self.inner
            .sign(alg, object(header), &object(claims))
            .expect("sign with the IdP's own freshly generated key")
    }

    /// A Kubernetes-style projected service-account token (`iss` =
    /// [`DevIdp::k8s_issuer`], `aud` = [`FEDERATED_TOKEN_AUDIENCE`], `sub` =
    /// `subject`, `exp` = now + `lifetime`), RS256, that the token endpoint
    /// accepts as a client assertion for clients registered with
    /// [`ClientAuth::Federated`] and that subject.
    pub fn mint_federated(&self, subject: &str, lifetime: std::time::Duration) -> String {
        let now = self.inner.now();
        let claims = json!({
            "aud": [FEDERATED_TOKEN_AUDIENCE],
            "exp": now.saturating_add(secs(lifetime)),
            "iat": now,
            "nbf": now,
            "iss": self.inner.k8s_issuer(),
            "jti": guid(),
            "sub": subject,
            "kubernetes.io": { "namespace": "default", "serviceaccount": { "name": subject.rsplit(':').next().unwrap_or(subject), "uid": guid() } },
        });
        self.sign_raw(Algorithm::RS256, json!({ "typ": "JWT" }), claims)
    }

    /// New signing keys (new `kid`s) for every algorithm. The old ones leave
    /// the key sets unless `keep_old` (Entra publishes both for a while).
    pub fn rotate_keys(&self, keep_old: bool) {
        if let Err(e) = write(&self.inner.keys).rotate(keep_old) {
            tracing::error!(error = %e, "rotate development IdP keys");
        }
    }

    /// The `kid` the current key for `alg` signs with.
    pub fn current_kid(&self, alg: Algorithm) -> Option<String> {
        read(&self.inner.keys).current_kid(alg).map(str::to_owned)
    }

    /// Replaces every misbehaviour switch at once.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.inner.behaviour) = behaviour;
    }

    /// Changes some switches, keeping the others.
    pub fn update_behaviour(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut lock(&self.inner.behaviour));
    }

    /// The current switches.
    pub fn behaviour(&self) -> Behaviour {
        lock(&self.inner.behaviour).clone()
    }

    /// The next `count` token requests answer `status` (e.g. 500, 503).
    pub fn fail_next(&self, status: StatusCode, count: u32) {
        self.update_behaviour(|b| {
            b.fail_next = Some(FailNext {
                status,
                remaining: count,
            });
        });
    }

    /// Moves the IdP's clock forward (or back, with a negative value): what
    /// it mints and how it judges expiry, without sleeping.
    pub fn advance_clock(&self, seconds: i64) {
        self.inner.skew_secs.fetch_add(seconds, Ordering::SeqCst);
    }

    /// How many requests of each kind were received.
    pub fn counters(&self) -> Counters {
        self.inner.counters()
    }

    /// The decoded form bodies of every token request received, in order,
    /// plus a pseudo-field `authorization` holding the `Authorization`
    /// header when one was sent.
    pub fn token_requests(&self) -> Vec<Vec<(String, String)>> {
        lock(&self.inner.requests)
            .iter()
            .map(|r| {
                let mut form = r.form.clone();
                if let Some(auth) = &r.authorization {
                    form.push(("authorization".to_owned(), auth.clone()));
                }
                form
            })
            .collect()
    }

    /// Every token request received, with its path.
    pub fn token_request_log(&self) -> Vec<TokenRequest> {
        lock(&self.inner.requests).clone()
    }
}

/// Shared state of one IdP.
struct Inner {
    addr: SocketAddr,
    base: String,
    keys: RwLock<KeySet>,
    clients: RwLock<HashMap<String, Client>>,
    tenants: RwLock<HashSet<String>>,
    consented: RwLock<HashMap<String, Vec<String>>>,
    behaviour: Mutex<Behaviour>,
    /// Client assertion `jti`s already accepted, with their `exp`.
    used_jti: Mutex<HashMap<String, i64>>,
    requests: Mutex<Vec<TokenRequest>>,
    discovery_count: AtomicU64,
    keys_count: AtomicU64,
    token_count: AtomicU64,
    skew_secs: AtomicI64,
}

impl Inner {
    /// Now, in seconds since the Unix epoch, on the IdP's (movable) clock.
    fn now(&self) -> i64 {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or_default();
        system.saturating_add(self.skew_secs.load(Ordering::SeqCst))
    }

    fn entra_issuer(&self, tenant: &str) -> String {
        format!("{}/{tenant}/v2.0", self.base)
    }

    fn entra_v1_issuer(&self, tenant: &str) -> String {
        format!("{}/{tenant}/", self.base)
    }

    fn oidc_issuer(&self) -> String {
        format!("{}/oidc", self.base)
    }

    fn k8s_issuer(&self) -> String {
        format!("{}/k8s", self.base)
    }

    fn entra_token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.base)
    }

    fn oidc_token_url(&self) -> String {
        format!("{}/oidc/token", self.base)
    }

    fn counters(&self) -> Counters {
        Counters {
            discovery: self.discovery_count.load(Ordering::SeqCst),
            keys: self.keys_count.load(Ordering::SeqCst),
            token: self.token_count.load(Ordering::SeqCst),
        }
    }

    fn is_tenant(&self, tenant: &str) -> bool {
        read(&self.tenants).contains(tenant)
    }

    fn client(&self, client_id: &str) -> Option<Client> {
        read(&self.clients).get(client_id).cloned()
    }

    fn consented_scopes(&self, resource: &str) -> Option<Vec<String>> {
        read(&self.consented).get(resource).cloned()
    }

    fn sign(
        &self,
        alg: Algorithm,
        header: Map<String, Value>,
        claims: &Map<String, Value>,
    ) -> Result<String, keys::KeyError> {
        read(&self.keys).sign(alg, header, claims)
    }

    /// Header and claims of a minted token.
    fn mint_claims(&self, spec: &Mint) -> (Map<String, Value>, Map<String, Value>) {
        let now = self.now();
        let mut claims = Map::new();
        let mut put = |name: &str, value: Value| {
            claims.insert(name.to_owned(), value);
        };
        put("aud", json!(spec.audience));
        put("iat", json!(now));
        put("nbf", json!(now.saturating_add(spec.not_before_offset)));
        put("exp", json!(now.saturating_add(secs(spec.lifetime))));
        put("sub", json!(spec.sub));
        let typ = match spec.version {
            Version::V2 | Version::V1 => {
                let v1 = spec.version == Version::V1;
                let iss = if v1 {
                    self.entra_v1_issuer(&spec.tenant)
                } else {
                    self.entra_issuer(&spec.tenant)
                };
                put("iss", json!(iss));
                let (app, acr) = if v1 {
                    ("appid", "appidacr")
                } else {
                    ("azp", "azpacr")
                };
                put(app, json!(spec.client_app));
                put(acr, json!("0"));
                put("oid", json!(spec.oid));
                put("tid", json!(spec.tenant));
                put("uti", json!(b64_id()));
                put("ver", json!(if v1 { "1.0" } else { "2.0" }));
                match &spec.kind {
                    Kind::User { scopes } => {
                        put("scp", json!(scopes.join(" ")));
                        put("idtyp", json!("user"));
                    }
                    Kind::App { roles } => {
                        if !roles.is_empty() {
                            put("roles", json!(roles));
                        }
                        put("idtyp", json!("app"));
                    }
                }
                "JWT"
            }
            Version::Oidc => {
                put("iss", json!(self.oidc_issuer()));
                put("client_id", json!(spec.client_app));
                put("jti", json!(guid()));
                match &spec.kind {
                    Kind::User { scopes } => put("scope", json!(scopes.join(" "))),
                    Kind::App { roles } => {
                        if !roles.is_empty() {
                            put("roles", json!(roles));
                        }
                    }
                }
                // RFC 9068 §2.1.
                "at+jwt"
            }
        };
        claims.extend(spec.extra.clone());
        let mut header = Map::new();
        header.insert("typ".to_owned(), json!(typ));
        (header, claims)
    }

    /// Remembers an accepted client assertion `jti` until its `exp`; false
    /// if it was seen before (RFC 7523 §3 item 7: replay).
    fn accept_jti(&self, jti: &str, exp: i64) -> bool {
        let now = self.now();
        let mut used = lock(&self.used_jti);
        used.retain(|_, until| *until >= now);
        if used.contains_key(jti) {
            return false;
        }
        used.insert(jti.to_owned(), exp);
        true
    }
}

/// Stops the accept loop when the last `DevIdp` clone goes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// A panic while holding one of these locks leaves plain data behind that is
// still consistent (every write is a single insert or assignment), so a
// poisoned lock is used as is rather than failing every later request.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// `N` random bytes from the system generator. Should it ever fail, a
/// time-and-counter digest still gives unique (not secret) identifiers,
/// which is all the IdP uses randomness for besides key generation.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if aws_lc_rs::rand::fill(&mut out).is_err() {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = format!(
            "{:?}-{}",
            SystemTime::now(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, seed.as_bytes());
        for (o, d) in out.iter_mut().zip(digest.as_ref().iter().cycle()) {
            *o = *d;
        }
    }
    out
}

/// A random version-4 GUID, lower case (Entra's trace and correlation ids).
fn guid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    crate::exchange::credential::guid_text(&b)
}

/// A short random base64url identifier (Entra's `uti`).
fn b64_id() -> String {
    jose::b64url(random_bytes::<16>())
}
