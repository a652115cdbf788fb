//! The validated configuration every other module works with. Everything here
//! has already been checked: addresses are addresses, URLs are URLs, header
//! names are header names, and the combinations make sense.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use serde::Serialize;
use serde::Serializer;

/// A validated route file.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Proxy listener address.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin: Admin,
    /// Time allowed for in-flight requests after SIGTERM.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// Proxy listener limits.
    pub limits: Limits,
    /// Upstream client settings.
    pub upstream: UpstreamClient,
    /// oboe's own app registration, when any route needs it.
    pub identity: Option<Identity>,
    /// Caller-token validation settings.
    pub inbound: Inbound,
    /// Downstream token cache settings.
    pub cache: Cache,
    /// Tracing export.
    pub telemetry: Telemetry,
    /// Routes in file order.
    pub routes: Vec<Route>,
}

/// Admin listener.
#[derive(Debug, Clone, Serialize)]
pub struct Admin {
    /// Address to bind.
    pub listen: SocketAddr,
}

/// Limits of the proxy listener.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Open connections at once.
    pub max_connections: usize,
    /// Requests in flight at once.
    pub max_requests: usize,
    /// Largest request head in bytes.
    pub max_header_bytes: usize,
}

/// Upstream client settings.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamClient {
    /// TCP + TLS connect timeout.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Idle pooled connection lifetime.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Idle connections per host.
    pub max_idle_per_host: usize,
    /// Extra CA bundle.
    pub ca_file: Option<PathBuf>,
}

/// Which kind of identity provider oboe talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// Microsoft Entra ID (OBO over jwt-bearer).
    Entra,
    /// Any OIDC provider (RFC 8693 token exchange).
    Oidc,
}

/// oboe's own app registration.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    /// Provider kind.
    pub provider: Provider,
    /// Entra instance (cloud or dev IdP), without trailing slash.
    pub instance: Option<String>,
    /// Entra tenant: a GUID, `organizations` or `common`.
    pub tenant_id: Option<String>,
    /// OIDC issuer.
    pub issuer: Option<String>,
    /// Client id.
    pub client_id: String,
    /// The confidential-client credential, if configured.
    pub credential: Option<Credential>,
    /// Connect timeout towards the IdP.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Total timeout of one IdP call.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

impl Identity {
    /// True when the tenant is `organizations` or `common`: callers from any tenant.
    pub fn is_multi_tenant(&self) -> bool {
        matches!(
            self.tenant_id.as_deref(),
            Some("organizations") | Some("common")
        )
    }
}

/// Where a secret is read from. Holds the *location*, never the secret itself,
/// so it is safe to print.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    /// An environment variable's name.
    Env(String),
    /// A file's path.
    File(PathBuf),
}

/// How a client secret is presented to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretAuthMethod {
    /// `client_secret` in the form body (MSAL's choice, `client_secret_post`).
    Post,
    /// HTTP Basic (`client_secret_basic`).
    Basic,
}

/// Assertion signing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AssertionAlgorithm {
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
}

/// The confidential-client credential.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    /// Client secret.
    ClientSecret {
        /// Where it is read from.
        source: SecretSource,
        /// How it is sent.
        auth_method: SecretAuthMethod,
    },
    /// Certificate-signed client assertion.
    Certificate {
        /// PEM certificate (chain).
        cert_file: PathBuf,
        /// PEM private key.
        key_file: PathBuf,
        /// Send `x5c`.
        send_x5c: bool,
        /// Signing algorithm.
        algorithm: AssertionAlgorithm,
    },
    /// Workload identity federation: the projected token is the assertion.
    FederatedTokenFile {
        /// Token file.
        path: PathBuf,
    },
    /// Private-key JWT for generic IdPs.
    PrivateKeyJwt {
        /// PEM private key.
        key_file: PathBuf,
        /// Key id.
        kid: Option<String>,
        /// Signing algorithm.
        algorithm: AssertionAlgorithm,
    },
}

/// Caller-token validation settings.
#[derive(Debug, Clone, Serialize)]
pub struct Inbound {
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Accepted algorithms (asymmetric only).
    pub algorithms: Vec<String>,
    /// Allowed clock skew.
    #[serde(serialize_with = "ser_duration")]
    pub leeway: Duration,
}

/// How downstream tokens are keyed in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKeyMode {
    /// By issuer, user, caller app and target.
    User,
    /// By the caller token's hash (MSAL style).
    Token,
}

/// Tracing export settings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Telemetry {
    /// OTLP span export, when configured.
    pub otlp: Option<Otlp>,
}

/// OTLP span export.
#[derive(Debug, Clone, Serialize)]
pub struct Otlp {
    /// Collector endpoint.
    pub endpoint: String,
    /// `service.name`.
    pub service_name: String,
    /// Sampling ratio for root spans.
    pub sample_ratio: f64,
}

/// Downstream token cache settings.
#[derive(Debug, Clone, Serialize)]
pub struct Cache {
    /// Bound on entries.
    pub max_entries: u64,
    /// Refresh this long before expiry.
    #[serde(serialize_with = "ser_duration")]
    pub refresh_before_expiry: Duration,
    /// Keying mode.
    pub key: CacheKeyMode,
    /// The shared L2 cache, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedCache>,
}

/// The shared L2 token cache (Redis).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SharedCache {
    /// How the deployment is laid out.
    pub mode: RedisMode,
    /// `redis://` or `rediss://` URLs, without credentials, all with one
    /// scheme: the server (standalone, exactly one), the sentinels, or the
    /// cluster's seed nodes.
    pub urls: Vec<RedisUrl>,
    /// ACL user name source (data nodes).
    pub username: Option<SecretSource>,
    /// Password source (data nodes).
    pub password: Option<SecretSource>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Connect timeout.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Timeout of one command.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// CA bundle for `rediss://`, replacing the web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Encryption keys; the first encrypts.
    pub encryption_keys: Vec<EncryptionKey>,
}

/// How a Redis deployment is laid out, and so how oboe connects to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server, or one endpoint that hides the layout (a proxy).
    Standalone,
    /// A master found, and followed across failovers, through Redis Sentinel.
    Sentinel(Sentinel),
    /// Redis Cluster: keys are spread over the nodes by hash slot.
    Cluster,
}

/// Redis Sentinel settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sentinel {
    /// The name the sentinels monitor the master under.
    pub master_name: String,
    /// The sentinels' ACL user name source.
    pub username: Option<SecretSource>,
    /// The sentinels' password source.
    pub password: Option<SecretSource>,
}

/// The Redis URL, or where it is read from at startup (a Secret, when an
/// operator provisions Redis and writes its address there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RedisUrl {
    /// Written in the route file (already checked).
    Inline(String),
    /// Read, and checked, at startup.
    From(SecretSource),
}

/// One AES-256 key of the shared cache: its id and where it is read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EncryptionKey {
    /// Key id, stored with each value.
    pub id: String,
    /// Where the base64 key is read from.
    pub key: SecretSource,
}

/// One route.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Path prefix matched against request paths; always starts with `/`.
    pub path_prefix: String,
    /// Where matching requests go.
    pub upstream: UpstreamTarget,
    /// Caller requirements.
    pub caller: CallerPolicy,
    /// Upstream token.
    pub token: TokenPolicy,
    /// Time allowed until the upstream's response headers.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Header edits.
    pub headers: HeaderEdits,
}

/// A parsed upstream base URL.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// Base path that replaces the route prefix; always ends with `/` or is empty.
    pub base_path: String,
    /// `Host` header value sent upstream.
    pub host_header: HeaderValue,
}

impl Serialize for UpstreamTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!(
            "{}://{}{}",
            self.scheme, self.authority, self.base_path
        ))
    }
}

impl UpstreamTarget {
    /// Parses an upstream URL: `http` or `https`, a host, no query, no userinfo.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or("must be an absolute http:// or https:// URL")?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(format!("scheme must be http or https, not {scheme}"));
        }
        let authority = uri.authority().cloned().ok_or("has no host")?;
        if authority.as_str().contains('@') {
            return Err("must not contain credentials".to_owned());
        }
        if uri.query().is_some() {
            return Err("must not have a query".to_owned());
        }
        let path = uri.path();
        let base_path = if path == "/" {
            String::new()
        } else {
            path.trim_end_matches('/').to_owned()
        };
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|_| "host is not a valid Host header".to_owned())?;
        Ok(Self {
            scheme,
            authority,
            base_path,
            host_header,
        })
    }
}

/// Whether a caller may be a user, an app, or either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallerKind {
    /// A delegated (user) token.
    User,
    /// An app-only token.
    App,
}

/// What the caller's token must be.
#[derive(Debug, Clone, Serialize)]
pub struct CallerPolicy {
    /// A valid token is required.
    pub required: bool,
    /// Any of these scopes.
    pub scopes: Vec<String>,
    /// Any of these roles.
    pub roles: Vec<String>,
    /// Allowed kinds.
    pub kinds: Vec<CallerKind>,
}

/// How the upstream token is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// Entra On-Behalf-Of.
    OnBehalfOf,
    /// RFC 8693 token exchange.
    TokenExchange,
    /// Client credentials (app-only).
    ClientCredentials,
    /// The validated caller token, unchanged.
    Forward,
    /// No token: `Authorization` is stripped.
    None,
}

impl Grant {
    /// True for grants that ask the IdP for a new token.
    pub fn exchanges(self) -> bool {
        matches!(
            self,
            Grant::OnBehalfOf | Grant::TokenExchange | Grant::ClientCredentials
        )
    }

    /// The name used in the route file and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::OnBehalfOf => "on_behalf_of",
            Grant::TokenExchange => "token_exchange",
            Grant::ClientCredentials => "client_credentials",
            Grant::Forward => "forward",
            Grant::None => "none",
        }
    }
}

/// What goes upstream in `Authorization`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenPolicy {
    /// Grant.
    pub grant: Grant,
    /// Requested scopes.
    pub scopes: Vec<String>,
    /// RFC 8693 audiences.
    pub audience: Vec<String>,
    /// RFC 8693 resources.
    pub resource: Vec<String>,
    /// RFC 8693 requested token type.
    pub requested_token_type: Option<String>,
}

/// Header edits applied to the upstream request.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    /// Set (replace).
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Remove.
    pub remove: Vec<HeaderName>,
}

impl Serialize for HeaderEdits {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let set: std::collections::BTreeMap<&str, &str> = self
            .set
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("<binary>")))
            .collect();
        let remove: Vec<&str> = self.remove.iter().map(HeaderName::as_str).collect();
        let mut st = s.serialize_struct("HeaderEdits", 2)?;
        st.serialize_field("set", &set)?;
        st.serialize_field("remove", &remove)?;
        st.end()
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}
