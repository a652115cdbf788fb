//! The route file exactly as written: serde structs with lenient leaf types
//! (durations, addresses and URLs are strings here) so that `validate` can
//! report every problem at once, each with its key path, instead of stopping
//! at the first one serde meets.
//!
//! These structs are also the source of the JSON Schema printed by
//! `oboe schema`, so their doc comments are what editors show.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

/// The whole route file.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawConfig {
    /// Where the app sends its downstream calls. Defaults to `127.0.0.1:7070`.
    pub listen: Option<String>,
    /// The admin listener for kubelet probes and Prometheus.
    pub admin: Option<RawAdmin>,
    /// How long in-flight requests may take to finish after SIGTERM. Defaults to `25s`.
    pub shutdown_grace: Option<String>,
    /// Connection and request limits of the proxy listener.
    pub limits: Option<RawLimits>,
    /// How oboe connects to upstreams.
    pub upstream: Option<RawUpstream>,
    /// oboe's own app registration (the middle-tier API).
    pub identity: Option<RawIdentity>,
    /// How callers' tokens are validated. Defaults are derived from `identity`.
    pub inbound: Option<RawInbound>,
    /// The downstream token cache.
    pub cache: Option<RawCache>,
    /// Tracing export. Off unless `telemetry.otlp` is set (needs the `otlp` build feature).
    pub telemetry: Option<RawTelemetry>,
    /// The routes, matched by longest `path_prefix`.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

/// Tracing export.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawTelemetry {
    /// Export spans over OTLP/gRPC to this collector, e.g. `http://otel-collector:4317`.
    pub otlp: Option<RawOtlp>,
}

/// OTLP span export.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawOtlp {
    /// The collector's OTLP/gRPC endpoint (`http://` or `https://`).
    pub endpoint: Option<String>,
    /// `service.name` of the exported spans. Defaults to `oboe`.
    pub service_name: Option<String>,
    /// Fraction of requests traced when the caller sent no sampled `traceparent`, 0.0–1.0. Defaults to `1.0`.
    pub sample_ratio: Option<f64>,
}

/// The admin listener.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawAdmin {
    /// Defaults to `0.0.0.0:9901` (kubelet probes come from outside the pod's loopback).
    pub listen: Option<String>,
}

/// Limits that keep a misbehaving client from exhausting the sidecar.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawLimits {
    /// Open connections on the proxy listener; more are answered 503 and closed. Defaults to `1024`.
    pub max_connections: Option<u64>,
    /// Requests in flight at once; more are answered 503. Defaults to `1024`.
    pub max_requests: Option<u64>,
    /// Largest request head (request line and headers) in bytes. Defaults to `16384`.
    pub max_header_bytes: Option<u64>,
}

/// The shared upstream client.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawUpstream {
    /// TCP + TLS connect timeout. Defaults to `2s`.
    pub connect_timeout: Option<String>,
    /// How long an idle pooled connection is kept. Defaults to `4s`, below the 5 s
    /// keep-alive of Node.js and most other servers, so oboe closes first.
    pub idle_timeout: Option<String>,
    /// Idle connections kept per upstream host. Defaults to
    /// `limits.max_requests`, so the pool never closes a connection that a
    /// request in flight will want again.
    pub max_idle_per_host: Option<u64>,
    /// A PEM bundle of extra CA certificates trusted besides the web PKI roots.
    pub ca_file: Option<String>,
}

/// Where a secret comes from. Secrets are never written inline in the route file.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawSecretSource {
    /// Name of an environment variable holding the secret.
    pub env: Option<String>,
    /// Path of a file holding the secret (trailing newline ignored).
    pub file: Option<String>,
}

/// oboe's own app registration.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawIdentity {
    /// `entra` or `oidc`. Defaults to `entra`.
    pub provider: Option<String>,
    /// Entra: the cloud instance (or the dev IdP). Defaults to `https://login.microsoftonline.com`.
    pub instance: Option<String>,
    /// Entra: the tenant GUID, or `organizations` / `common` for multi-tenant.
    pub tenant_id: Option<String>,
    /// OIDC: the issuer; discovery is read from `{issuer}/.well-known/openid-configuration`.
    pub issuer: Option<String>,
    /// The client (application) id of oboe's app registration.
    pub client_id: Option<String>,
    /// The confidential-client credential: exactly one kind.
    pub credential: Option<RawCredential>,
    /// TCP + TLS connect timeout towards the IdP. Defaults to `2s`.
    pub connect_timeout: Option<String>,
    /// Total time allowed for one IdP call (discovery, keys, token). Defaults to `10s`.
    pub timeout: Option<String>,
}

/// Exactly one of these is set.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawCredential {
    /// A client secret.
    pub client_secret: Option<RawSecretSource>,
    /// How a client secret is sent: `post` (in the body, default) or `basic`.
    pub auth_method: Option<String>,
    /// A certificate whose key signs client assertions.
    pub certificate: Option<RawCertificate>,
    /// A projected service-account token file used as the client assertion (workload
    /// identity), re-read before it expires.
    pub federated_token_file: Option<String>,
    /// A private key that signs client assertions (generic IdPs).
    pub private_key_jwt: Option<RawPrivateKeyJwt>,
}

/// Certificate credential.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawCertificate {
    /// PEM certificate.
    pub cert_file: Option<String>,
    /// PEM private key.
    pub key_file: Option<String>,
    /// Send the certificate chain in the assertion's `x5c` header. Defaults to `false`.
    pub send_x5c: Option<bool>,
    /// `PS256` (default) or `RS256`.
    pub algorithm: Option<String>,
}

/// private_key_jwt credential.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawPrivateKeyJwt {
    /// PEM private key.
    pub key_file: Option<String>,
    /// The `kid` the IdP knows the key by.
    pub kid: Option<String>,
    /// Signing algorithm. Defaults to `RS256`.
    pub algorithm: Option<String>,
}

/// Validation of callers' tokens.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawInbound {
    /// Accepted `aud` values. Defaults to the client id and `api://{client id}`.
    pub audiences: Option<Vec<String>>,
    /// Accepted signature algorithms (asymmetric only). Defaults to `[RS256]`.
    pub algorithms: Option<Vec<String>>,
    /// Clock skew allowed on `exp` and `nbf`. Defaults to `60s`.
    pub leeway: Option<String>,
}

/// The downstream token cache.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawCache {
    /// Bound on cached downstream tokens. Defaults to `100000`.
    pub max_entries: Option<u64>,
    /// Refresh a token this long before it expires. Defaults to `5m`.
    pub refresh_before_expiry: Option<String>,
    /// `user` (default: by user and target) or `token` (by the caller token's hash, as MSAL does).
    pub key: Option<String>,
    /// An optional shared L2 cache (Redis).
    pub shared: Option<RawSharedCache>,
}

/// The shared L2 token cache (Redis), behind the in-memory one: replicas of
/// one API exchange each user's token once between them. Values are encrypted
/// (AES-256-GCM) and keys are hashes, so Redis never sees a token or a user id.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawSharedCache {
    /// How the Redis deployment is laid out: `standalone` (one server or a
    /// single endpoint in front of several), `sentinel` (a master found
    /// through Redis Sentinel) or `cluster` (Redis Cluster). Defaults to
    /// `standalone`.
    pub mode: Option<String>,
    /// `redis://host:port[/db]` or `rediss://host:port[/db]` (TLS), without
    /// credentials (those go in `username` and `password`); inline, or
    /// `{ env: VARIABLE }` / `{ file: /path }` when it comes from a Secret.
    /// The server (`standalone`), a sentinel (`sentinel`) or a seed node
    /// (`cluster`, e.g. ElastiCache's configuration endpoint). Set this or `urls`.
    pub url: Option<RawRedisUrl>,
    /// `sentinel` and `cluster` only, instead of `url`: several sentinels or
    /// seed nodes, tried in turn, so that one being down does not matter.
    /// All use the same scheme; no database number.
    pub urls: Option<Vec<String>>,
    /// `sentinel` mode: the name the sentinels monitor the master under, and
    /// the sentinels' own credentials.
    pub sentinel: Option<RawSentinel>,
    /// Redis ACL user name (Redis 6+), from an environment variable or a file.
    /// Used on the data nodes (the server, the master, the cluster's nodes).
    pub username: Option<RawSecretSource>,
    /// Redis password (or access key), from an environment variable or a file.
    /// Used on the data nodes (the server, the master, the cluster's nodes).
    pub password: Option<RawSecretSource>,
    /// Prefix of every key oboe writes. Defaults to `oboe:`.
    pub key_prefix: Option<String>,
    /// TCP (+ TLS) connect timeout. Defaults to `200ms`.
    pub connect_timeout: Option<String>,
    /// Time allowed for one Redis command; a slower Redis is skipped, never
    /// waited for. Defaults to `50ms`.
    pub timeout: Option<String>,
    /// `rediss://` only: a PEM bundle of the CA certificates that Redis's
    /// certificate is checked against, instead of the web PKI roots (for
    /// every node: sentinels, master, cluster nodes).
    pub ca_file: Option<String>,
    /// AES-256 keys (32 bytes, base64); the first encrypts, all decrypt. Add a
    /// new key first and keep the old one after it while entries it wrote live.
    pub encryption_keys: Option<Vec<RawEncryptionKey>>,
}

/// Redis Sentinel: which master, and how to talk to the sentinels.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawSentinel {
    /// The name the sentinels monitor the master under (`sentinel monitor <name> ...`). Required.
    pub master_name: Option<String>,
    /// ACL user name of the sentinels, when they require one, from an
    /// environment variable or a file.
    pub username: Option<RawSecretSource>,
    /// Password of the sentinels (their `requirepass`), when they require
    /// one, from an environment variable or a file. The master's is `password`.
    pub password: Option<RawSecretSource>,
}

/// The Redis URL: written inline or read from an environment variable or a file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawRedisUrl {
    /// The URL itself.
    Inline(String),
    /// Where the URL is read from at startup.
    From(RawSecretSource),
}

/// One AES-256 key of the shared cache.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawEncryptionKey {
    /// Key id stored (in clear) with every value it encrypts: letters, digits,
    /// `-`, `_`, `.`; at most 32 characters.
    pub id: Option<String>,
    /// The base64 key (32 bytes), from an environment variable or a file.
    pub key: Option<RawSecretSource>,
}

/// One route.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique name, used in metrics, logs and `/.oboe/v1/token/{name}`.
    pub name: Option<String>,
    /// Requests whose path starts with this are sent to `upstream`; the prefix is replaced
    /// by the upstream URL's path.
    pub path_prefix: Option<String>,
    /// `http://` or `https://` base URL of the upstream.
    pub upstream: Option<String>,
    /// What the caller's token must be.
    pub caller: Option<RawCaller>,
    /// What goes upstream in `Authorization`.
    pub token: Option<RawToken>,
    /// Time allowed until the upstream's response headers. Defaults to `30s`.
    pub timeout: Option<String>,
    /// Header edits applied to the upstream request.
    pub headers: Option<RawHeaders>,
}

/// Caller requirements.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawCaller {
    /// A valid caller token is required. Defaults to `true`.
    pub required: Option<bool>,
    /// Any of these delegated scopes (`scp`).
    pub scopes: Option<Vec<String>>,
    /// Any of these app roles (`roles`).
    pub roles: Option<Vec<String>>,
    /// `user` and/or `app`. Defaults to both.
    pub kinds: Option<Vec<String>>,
}

/// The token sent upstream.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawToken {
    /// `on_behalf_of`, `token_exchange`, `client_credentials`, `forward` or `none`.
    pub grant: Option<String>,
    /// Scopes requested downstream.
    pub scopes: Option<Vec<String>>,
    /// RFC 8693 `audience` values.
    pub audience: Option<Vec<String>>,
    /// RFC 8693 `resource` values.
    pub resource: Option<Vec<String>>,
    /// RFC 8693 `requested_token_type`.
    pub requested_token_type: Option<String>,
}

/// Header edits.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawHeaders {
    /// Headers set (replacing any the caller sent).
    pub set: Option<BTreeMap<String, String>>,
    /// Headers removed.
    pub remove: Option<Vec<String>>,
}
