//! Stage two: turn a [`RawConfig`] into a [`Config`], collecting every problem
//! with its key path rather than stopping at the first.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::raw::*;
use super::types::*;
use super::{ConfigError, Problem};

const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9901";
const DEFAULT_INSTANCE: &str = "https://login.microsoftonline.com";
/// The prefix under which oboe serves its own endpoints on the proxy listener.
pub const RESERVED_PREFIX: &str = "/.oboe/";

/// Asymmetric JWS algorithms a caller's token may be signed with.
const ASYMMETRIC_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// Collects problems while validating.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, raw: Option<&str>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(text) => match humantime::parse_duration(text) {
                Ok(d) => d,
                Err(e) => {
                    self.push(path, format!("not a duration like `30s` or `5m`: {e}"));
                    default
                }
            },
        }
    }

    fn addr(&mut self, path: &str, raw: Option<&str>, default: &str) -> SocketAddr {
        let text = raw.unwrap_or(default);
        text.parse().unwrap_or_else(|_| {
            self.push(
                path,
                format!("not a socket address like `127.0.0.1:7070`: {text:?}"),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn positive(&mut self, path: &str, raw: Option<u64>, default: u64) -> u64 {
        match raw {
            Some(0) => {
                self.push(path, "must be greater than 0");
                default
            }
            Some(n) => n,
            None => default,
        }
    }
}

/// Validates a raw route file.
pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut p = Problems::default();

    let listen = p.addr("listen", raw.listen.as_deref(), DEFAULT_LISTEN);
    let admin_raw = raw.admin.unwrap_or_default();
    let admin = Admin {
        listen: p.addr(
            "admin.listen",
            admin_raw.listen.as_deref(),
            DEFAULT_ADMIN_LISTEN,
        ),
    };
    if admin.listen == listen && listen.port() != 0 {
        p.push("admin.listen", "must differ from `listen`");
    }
    let shutdown_grace = p.duration(
        "shutdown_grace",
        raw.shutdown_grace.as_deref(),
        Duration::from_secs(25),
    );
    let limits = limits(&mut p, raw.limits.unwrap_or_default());
    let upstream = upstream_client(&mut p, raw.upstream.unwrap_or_default(), &limits);

    // Each valid route keeps its index in the file, so later problems name it
    // where the operator wrote it even when an earlier route was invalid.
    let indexed: Vec<(usize, Route)> = raw
        .routes
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| route(&mut p, &format!("routes[{i}]"), r).map(|r| (i, r)))
        .collect();
    check_route_set(&mut p, &indexed);

    let needs_identity = indexed
        .iter()
        .any(|(_, r)| r.caller.required || r.token.grant.exchanges());
    let needs_credential = indexed.iter().any(|(_, r)| r.token.grant.exchanges());
    let identity = match raw.identity {
        Some(raw_identity) => identity(&mut p, raw_identity),
        None => {
            if needs_identity {
                p.push(
                    "identity",
                    "required: a route validates callers' tokens or exchanges them",
                );
            }
            None
        }
    };
    if needs_credential && identity.as_ref().is_some_and(|i| i.credential.is_none()) {
        p.push(
            "identity.credential",
            "required: a route exchanges tokens, which needs a client credential",
        );
    }
    if let Some(identity) = &identity {
        check_grants_against_provider(&mut p, &indexed, identity);
    }

    let inbound = inbound(&mut p, raw.inbound.unwrap_or_default(), identity.as_ref());
    let cache = cache(&mut p, raw.cache.unwrap_or_default());
    let telemetry = telemetry(&mut p, raw.telemetry.unwrap_or_default());
    let routes = indexed.into_iter().map(|(_, r)| r).collect();

    if p.0.is_empty() {
        Ok(Config {
            listen,
            admin,
            shutdown_grace,
            limits,
            upstream,
            identity,
            inbound,
            cache,
            telemetry,
            routes,
        })
    } else {
        Err(ConfigError { problems: p.0 })
    }
}

fn limits(p: &mut Problems, raw: RawLimits) -> Limits {
    let max_header_bytes = p.positive("limits.max_header_bytes", raw.max_header_bytes, 16 * 1024);
    // hyper's HTTP/1 parser needs at least 8 KiB of buffer.
    if !(8192..=1024 * 1024).contains(&max_header_bytes) {
        p.push(
            "limits.max_header_bytes",
            "must be between 8192 and 1048576",
        );
    }
    Limits {
        max_connections: p.positive("limits.max_connections", raw.max_connections, 1024) as usize,
        max_requests: p.positive("limits.max_requests", raw.max_requests, 1024) as usize,
        max_header_bytes: max_header_bytes as usize,
    }
}

fn upstream_client(p: &mut Problems, raw: RawUpstream, limits: &Limits) -> UpstreamClient {
    UpstreamClient {
        connect_timeout: p.duration(
            "upstream.connect_timeout",
            raw.connect_timeout.as_deref(),
            Duration::from_secs(2),
        ),
        idle_timeout: p.duration(
            "upstream.idle_timeout",
            raw.idle_timeout.as_deref(),
            Duration::from_secs(4),
        ),
        // As many as there can be requests in flight: a smaller pool closes
        // connections a moment after opening them whenever more requests than
        // that finish together (measured: ~800 new upstream connections a
        // second at 256 busy client connections with a pool of 64).
        max_idle_per_host: p.positive(
            "upstream.max_idle_per_host",
            raw.max_idle_per_host,
            limits.max_requests as u64,
        ) as usize,
        ca_file: raw.ca_file.map(PathBuf::from),
    }
}

/// `http://` is accepted for an IdP only on loopback (the dev IdP); anything
/// else must be `https://`.
fn idp_url(p: &mut Problems, path: &str, url: &str) -> Option<String> {
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            p.push(path, format!("not a URL: {e}"));
            return None;
        }
    };
    let host = uri.host().unwrap_or_default();
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if is_loopback_host(host) => {}
        Some("http") => {
            p.push(
                path,
                "must be https:// (plain http is accepted only on loopback)",
            );
            return None;
        }
        _ => {
            p.push(path, "must be an absolute https:// URL");
            return None;
        }
    }
    if uri.query().is_some() {
        p.push(path, "must not have a query");
        return None;
    }
    Some(url.trim_end_matches('/').to_owned())
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// True for an 8-4-4-4-12 hex GUID.
pub fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn identity(p: &mut Problems, raw: RawIdentity) -> Option<Identity> {
    let provider = match raw.provider.as_deref().unwrap_or("entra") {
        "entra" => Provider::Entra,
        "oidc" => Provider::Oidc,
        other => {
            p.push(
                "identity.provider",
                format!("must be `entra` or `oidc`, not {other:?}"),
            );
            return None;
        }
    };
    let client_id = match raw.client_id {
        Some(id) if !id.trim().is_empty() => id,
        _ => {
            p.push("identity.client_id", "required");
            String::new()
        }
    };
    let (mut instance, mut tenant_id, mut issuer) = (None, None, None);
    match provider {
        Provider::Entra => {
            instance = idp_url(
                p,
                "identity.instance",
                raw.instance.as_deref().unwrap_or(DEFAULT_INSTANCE),
            );
            match raw.tenant_id {
                Some(t) if is_guid(&t) || t == "organizations" || t == "common" => {
                    tenant_id = Some(t.to_ascii_lowercase())
                }
                Some(t) if t == "consumers" => p.push(
                    "identity.tenant_id",
                    "`consumers` cannot be used: personal accounts cannot do On-Behalf-Of for a middle-tier API",
                ),
                Some(t) => p.push(
                    "identity.tenant_id",
                    format!("must be a tenant GUID, `organizations` or `common`, not {t:?}"),
                ),
                None => p.push("identity.tenant_id", "required for provider `entra`"),
            }
            if !client_id.is_empty() && !is_guid(&client_id) {
                p.push(
                    "identity.client_id",
                    "must be the application (client) id GUID for provider `entra`",
                );
            }
            if raw.issuer.is_some() {
                p.push(
                    "identity.issuer",
                    "not used with provider `entra` (issuers come from `instance` and `tenant_id`)",
                );
            }
        }
        Provider::Oidc => {
            match raw.issuer {
                Some(url) => issuer = idp_url(p, "identity.issuer", &url),
                None => p.push("identity.issuer", "required for provider `oidc`"),
            }
            if raw.instance.is_some() {
                p.push("identity.instance", "only used with provider `entra`");
            }
            if raw.tenant_id.is_some() {
                p.push("identity.tenant_id", "only used with provider `entra`");
            }
        }
    }
    let credential = raw.credential.and_then(|c| credential(p, c, provider));
    let connect_timeout = p.duration(
        "identity.connect_timeout",
        raw.connect_timeout.as_deref(),
        Duration::from_secs(2),
    );
    let timeout = p.duration(
        "identity.timeout",
        raw.timeout.as_deref(),
        Duration::from_secs(10),
    );
    Some(Identity {
        provider,
        instance,
        tenant_id,
        issuer,
        client_id,
        credential,
        connect_timeout,
        timeout,
    })
}

fn secret_source(p: &mut Problems, path: &str, raw: RawSecretSource) -> Option<SecretSource> {
    match (raw.env, raw.file) {
        (Some(env), None) if !env.is_empty() => Some(SecretSource::Env(env)),
        (None, Some(file)) if !file.is_empty() => Some(SecretSource::File(file.into())),
        (Some(_), Some(_)) => {
            p.push(path, "set exactly one of `env` or `file`, not both");
            None
        }
        _ => {
            p.push(path, "set one of `env` (variable name) or `file` (path)");
            None
        }
    }
}

fn algorithm(
    p: &mut Problems,
    path: &str,
    raw: Option<&str>,
    default: AssertionAlgorithm,
) -> AssertionAlgorithm {
    match raw {
        None => default,
        Some("PS256") => AssertionAlgorithm::PS256,
        Some("RS256") => AssertionAlgorithm::RS256,
        Some("ES256") => AssertionAlgorithm::ES256,
        Some(other) => {
            p.push(
                path,
                format!("must be PS256, RS256 or ES256, not {other:?}"),
            );
            default
        }
    }
}

fn required_path(p: &mut Problems, path: &str, raw: Option<String>) -> PathBuf {
    match raw {
        Some(s) if !s.is_empty() => PathBuf::from(s),
        _ => {
            p.push(path, "required");
            PathBuf::new()
        }
    }
}

fn credential(p: &mut Problems, raw: RawCredential, provider: Provider) -> Option<Credential> {
    const PATH: &str = "identity.credential";
    let set = [
        raw.client_secret.is_some(),
        raw.certificate.is_some(),
        raw.federated_token_file.is_some(),
        raw.private_key_jwt.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        p.push(
            PATH,
            format!(
                "set exactly one of `client_secret`, `certificate`, `federated_token_file`, `private_key_jwt` ({set} set)"
            ),
        );
        return None;
    }
    if raw.auth_method.is_some() && raw.client_secret.is_none() {
        p.push(
            format!("{PATH}.auth_method"),
            "only applies to `client_secret`",
        );
    }
    if let Some(secret) = raw.client_secret {
        let auth_method = match raw.auth_method.as_deref() {
            None | Some("post") => SecretAuthMethod::Post,
            Some("basic") if provider == Provider::Entra => {
                p.push(
                    format!("{PATH}.auth_method"),
                    "`basic` is for generic IdPs; Entra takes the secret in the body",
                );
                SecretAuthMethod::Post
            }
            Some("basic") => SecretAuthMethod::Basic,
            Some(other) => {
                p.push(
                    format!("{PATH}.auth_method"),
                    format!("must be `post` or `basic`, not {other:?}"),
                );
                SecretAuthMethod::Post
            }
        };
        return secret_source(p, &format!("{PATH}.client_secret"), secret).map(|source| {
            Credential::ClientSecret {
                source,
                auth_method,
            }
        });
    }
    if let Some(cert) = raw.certificate {
        let path = format!("{PATH}.certificate");
        return Some(Credential::Certificate {
            cert_file: required_path(p, &format!("{path}.cert_file"), cert.cert_file),
            key_file: required_path(p, &format!("{path}.key_file"), cert.key_file),
            send_x5c: cert.send_x5c.unwrap_or(false),
            algorithm: algorithm(
                p,
                &format!("{path}.algorithm"),
                cert.algorithm.as_deref(),
                AssertionAlgorithm::PS256,
            ),
        });
    }
    if let Some(file) = raw.federated_token_file {
        let path = required_path(p, &format!("{PATH}.federated_token_file"), Some(file));
        return Some(Credential::FederatedTokenFile { path });
    }
    let key = raw.private_key_jwt?;
    let path = format!("{PATH}.private_key_jwt");
    Some(Credential::PrivateKeyJwt {
        key_file: required_path(p, &format!("{path}.key_file"), key.key_file),
        kid: key.kid,
        algorithm: algorithm(
            p,
            &format!("{path}.algorithm"),
            key.algorithm.as_deref(),
            AssertionAlgorithm::RS256,
        ),
    })
}

fn inbound(p: &mut Problems, raw: RawInbound, identity: Option<&Identity>) -> Inbound {
    let audiences = match raw.audiences {
        Some(list) if list.is_empty() => {
            p.push("inbound.audiences", "must not be empty");
            list
        }
        Some(list) => list,
        None => identity
            .filter(|i| !i.client_id.is_empty())
            .map(|i| vec![i.client_id.clone(), format!("api://{}", i.client_id)])
            .unwrap_or_default(),
    };
    let algorithms = raw.algorithms.unwrap_or_else(|| vec!["RS256".to_owned()]);
    if algorithms.is_empty() {
        p.push("inbound.algorithms", "must not be empty");
    }
    for (i, alg) in algorithms.iter().enumerate() {
        if !ASYMMETRIC_ALGORITHMS.contains(&alg.as_str()) {
            let why = if alg.starts_with("HS") || alg.eq_ignore_ascii_case("none") {
                "symmetric and unsigned algorithms are never accepted"
            } else {
                "unknown algorithm"
            };
            p.push(
                format!("inbound.algorithms[{i}]"),
                format!(
                    "{alg:?}: {why}; use one of {}",
                    ASYMMETRIC_ALGORITHMS.join(", ")
                ),
            );
        }
    }
    Inbound {
        audiences,
        algorithms,
        leeway: p.duration(
            "inbound.leeway",
            raw.leeway.as_deref(),
            Duration::from_secs(60),
        ),
    }
}

fn cache(p: &mut Problems, raw: RawCache) -> Cache {
    let key = match raw.key.as_deref() {
        None | Some("user") => CacheKeyMode::User,
        Some("token") => CacheKeyMode::Token,
        Some(other) => {
            p.push(
                "cache.key",
                format!("must be `user` or `token`, not {other:?}"),
            );
            CacheKeyMode::User
        }
    };
    let shared = raw.shared.and_then(|s| shared_cache(p, s));
    Cache {
        max_entries: p.positive("cache.max_entries", raw.max_entries, 100_000),
        refresh_before_expiry: p.duration(
            "cache.refresh_before_expiry",
            raw.refresh_before_expiry.as_deref(),
            Duration::from_secs(300),
        ),
        key,
        shared,
    }
}

/// Longest Redis key prefix and encryption key id (both are stored with
/// every entry).
const MAX_PREFIX_LEN: usize = 64;
const MAX_KEY_ID_LEN: usize = 32;

fn shared_cache(p: &mut Problems, raw: RawSharedCache) -> Option<SharedCache> {
    const PATH: &str = "cache.shared";
    let before = p.0.len();
    let mode = redis_mode(p, raw.mode.as_deref(), raw.sentinel);
    let urls = redis_urls(p, &mode, raw.url, raw.urls);
    // A URL read at startup is checked then, `ca_file` included.
    let tls = urls.iter().all(|url| match url {
        RedisUrl::Inline(url) => url.starts_with("rediss://"),
        RedisUrl::From(_) => true,
    });
    let (username, password) = redis_credentials(p, PATH, raw.username, raw.password);
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "oboe:".to_owned());
    if key_prefix.len() > MAX_PREFIX_LEN
        || key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        p.push(
            format!("{PATH}.key_prefix"),
            format!("at most {MAX_PREFIX_LEN} characters, no spaces or control characters"),
        );
    }
    if mode == RedisMode::Cluster && key_prefix.contains(['{', '}']) {
        // Redis Cluster hashes only what is inside the first `{...}` of a key.
        p.push(
            format!("{PATH}.key_prefix"),
            "must not contain `{` or `}` with `mode: cluster`: oboe ends each key with a hash tag of its own, so that a key and its lock share a slot",
        );
    }
    let mut timeout = |field: &str, raw: Option<String>, default_ms: u64| {
        let path = format!("{PATH}.{field}");
        let d = p.duration(&path, raw.as_deref(), Duration::from_millis(default_ms));
        if d.is_zero() || d > Duration::from_secs(5) {
            p.push(
                path,
                "must be more than 0 and at most 5s: a request never waits long for Redis",
            );
        }
        d
    };
    let connect_timeout = timeout("connect_timeout", raw.connect_timeout, 200);
    let op_timeout = timeout("timeout", raw.timeout, 50);
    let ca_file = raw.ca_file.map(PathBuf::from);
    if ca_file.is_some() && !tls {
        p.push(format!("{PATH}.ca_file"), "only used with a rediss:// url");
    }
    let mut encryption_keys = Vec::new();
    match raw.encryption_keys {
        None => p.push(
            format!("{PATH}.encryption_keys"),
            "required: at least one AES-256 key ({ id, key: { env | file } }); values in Redis are always encrypted",
        ),
        Some(list) if list.is_empty() => {
            p.push(format!("{PATH}.encryption_keys"), "must not be empty")
        }
        Some(list) => {
            let mut ids = HashSet::new();
            for (i, raw_key) in list.into_iter().enumerate() {
                let at = format!("{PATH}.encryption_keys[{i}]");
                let id = match raw_key.id {
                    Some(id)
                        if !id.is_empty()
                            && id.len() <= MAX_KEY_ID_LEN
                            && id
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
                    {
                        if !ids.insert(id.clone()) {
                            p.push(
                                format!("{at}.id"),
                                format!("{id:?} is used by an earlier key"),
                            );
                        }
                        id
                    }
                    Some(id) => {
                        p.push(
                            format!("{at}.id"),
                            format!(
                                "{id:?}: use 1 to {MAX_KEY_ID_LEN} letters, digits, `-`, `_` and `.`"
                            ),
                        );
                        continue;
                    }
                    None => {
                        p.push(format!("{at}.id"), "required");
                        continue;
                    }
                };
                match raw_key.key {
                    Some(source) => {
                        if let Some(key) = secret_source(p, &format!("{at}.key"), source) {
                            encryption_keys.push(EncryptionKey { id, key });
                        }
                    }
                    None => p.push(
                        format!("{at}.key"),
                        "required: { env: VARIABLE } or { file: /path } holding 32 bytes in base64",
                    ),
                }
            }
        }
    }
    (p.0.len() == before).then_some(SharedCache {
        mode,
        urls,
        username,
        password,
        key_prefix,
        connect_timeout,
        timeout: op_timeout,
        ca_file,
        encryption_keys,
    })
}

/// `{path}.username` and `{path}.password`: a Redis ACL user needs both.
fn redis_credentials(
    p: &mut Problems,
    path: &str,
    username: Option<RawSecretSource>,
    password: Option<RawSecretSource>,
) -> (Option<SecretSource>, Option<SecretSource>) {
    let username = username.and_then(|s| secret_source(p, &format!("{path}.username"), s));
    let password = password.and_then(|s| secret_source(p, &format!("{path}.password"), s));
    if username.is_some() && password.is_none() {
        p.push(
            format!("{path}.username"),
            "needs `password` as well (Redis ACL users authenticate with both)",
        );
    }
    (username, password)
}

/// `cache.shared.mode`, with the `sentinel` block that only `sentinel` takes.
fn redis_mode(p: &mut Problems, raw: Option<&str>, sentinel: Option<RawSentinel>) -> RedisMode {
    let mode = match raw {
        None | Some("standalone") => RedisMode::Standalone,
        Some("cluster") => RedisMode::Cluster,
        Some("sentinel") => {
            return RedisMode::Sentinel(sentinel_settings(p, sentinel.unwrap_or_default()));
        }
        Some(other) => {
            p.push(
                "cache.shared.mode",
                format!("must be `standalone`, `sentinel` or `cluster`, not {other:?}"),
            );
            return RedisMode::Standalone;
        }
    };
    if sentinel.is_some() {
        p.push("cache.shared.sentinel", "only used with `mode: sentinel`");
    }
    mode
}

/// `cache.shared.sentinel` in `sentinel` mode.
fn sentinel_settings(p: &mut Problems, raw: RawSentinel) -> Sentinel {
    const PATH: &str = "cache.shared.sentinel";
    let master_name = match raw.master_name {
        Some(name)
            if !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            name
        }
        Some(name) => {
            p.push(
                format!("{PATH}.master_name"),
                format!("{name:?}: a name without spaces, as in `sentinel monitor <name> ...`"),
            );
            name
        }
        None => {
            p.push(
                format!("{PATH}.master_name"),
                "required with `mode: sentinel`: the name the sentinels monitor the master under",
            );
            String::new()
        }
    };
    let (username, password) = redis_credentials(p, PATH, raw.username, raw.password);
    Sentinel {
        master_name,
        username,
        password,
    }
}

/// `cache.shared.url` or `cache.shared.urls`: exactly one of them, `urls`
/// only where several nodes make sense, and one scheme for all.
fn redis_urls(
    p: &mut Problems,
    mode: &RedisMode,
    url: Option<RawRedisUrl>,
    urls: Option<Vec<String>>,
) -> Vec<RedisUrl> {
    const PATH: &str = "cache.shared";
    let listed = match (url, urls) {
        (Some(_), Some(_)) => {
            p.push(format!("{PATH}.urls"), "set `url` or `urls`, not both");
            return Vec::new();
        }
        (None, None) => {
            p.push(format!("{PATH}.url"), "required");
            return Vec::new();
        }
        (Some(url), None) => vec![(format!("{PATH}.url"), url)],
        (None, Some(urls)) => {
            if *mode == RedisMode::Standalone {
                p.push(
                    format!("{PATH}.urls"),
                    "only with `mode: sentinel` or `mode: cluster`; a standalone Redis has one `url`",
                );
            } else if urls.is_empty() {
                p.push(format!("{PATH}.urls"), "must not be empty");
            }
            urls.into_iter()
                .enumerate()
                .map(|(i, url)| (format!("{PATH}.urls[{i}]"), RawRedisUrl::Inline(url)))
                .collect()
        }
    };
    let mut scheme = None;
    let mut out = Vec::with_capacity(listed.len());
    for (path, raw) in listed {
        match raw {
            RawRedisUrl::Inline(url) => {
                if let Err(why) = check_node_url(&url, mode) {
                    p.push(path, why);
                } else if *scheme.get_or_insert(url.starts_with("rediss://"))
                    != url.starts_with("rediss://")
                {
                    p.push(
                        path,
                        "mixes redis:// and rediss://: every node is reached the same way",
                    );
                }
                out.push(RedisUrl::Inline(url));
            }
            RawRedisUrl::From(source) => {
                out.extend(secret_source(p, &path, source).map(RedisUrl::From));
            }
        }
    }
    out
}

/// [`check_redis_url`], and no database number where there is none to
/// choose: Redis Cluster has database 0 only, and a sentinel has none (the
/// master's database is 0).
pub fn check_node_url(url: &str, mode: &RedisMode) -> Result<(), String> {
    check_redis_url(url)?;
    let has_db = url
        .parse::<http::Uri>()
        .is_ok_and(|uri| !uri.path().trim_start_matches('/').is_empty());
    match mode {
        RedisMode::Standalone => Ok(()),
        _ if !has_db => Ok(()),
        RedisMode::Cluster => {
            Err("no database number with `mode: cluster` (Redis Cluster has database 0 only)".to_owned())
        }
        RedisMode::Sentinel(_) => Err(
            "no database number with `mode: sentinel` (the URL names a sentinel; the master's database is 0)"
                .to_owned(),
        ),
    }
}

/// `redis://` or `rediss://`, a host, an optional port and database number,
/// and nothing else: credentials come from `username`/`password` sources.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("redis" | "rediss") => {}
        _ => return Err("must start with redis:// or rediss:// (TLS)".to_owned()),
    }
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err(
            "must not contain credentials: set `username`/`password` as { env } or { file }"
                .to_owned(),
        );
    }
    if authority.host().is_empty() {
        return Err("has no host".to_owned());
    }
    if uri.query().is_some() {
        return Err("must not have a query".to_owned());
    }
    let db = uri.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err(format!(
            "the path must be a database number like /0, not {:?}",
            uri.path()
        ));
    }
    Ok(())
}

fn route(p: &mut Problems, path: &str, raw: RawRoute) -> Option<Route> {
    let before = p.0.len();
    let name = match raw.name {
        Some(n)
            if !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
        {
            n
        }
        Some(n) => {
            p.push(
                format!("{path}.name"),
                format!("{n:?}: use letters, digits, `-`, `_` and `.` only"),
            );
            String::new()
        }
        None => {
            p.push(format!("{path}.name"), "required");
            String::new()
        }
    };
    let path_prefix = match raw.path_prefix {
        Some(prefix) => {
            if let Err(why) = check_prefix(&prefix) {
                p.push(format!("{path}.path_prefix"), why);
            }
            prefix
        }
        None => {
            p.push(format!("{path}.path_prefix"), "required");
            String::new()
        }
    };
    let upstream = match raw.upstream.as_deref().map(UpstreamTarget::parse) {
        Some(Ok(u)) => Some(u),
        Some(Err(why)) => {
            p.push(format!("{path}.upstream"), why);
            None
        }
        None => {
            p.push(format!("{path}.upstream"), "required");
            None
        }
    };
    let caller = caller(p, path, raw.caller.unwrap_or_default());
    let token = token(p, path, raw.token, &caller);
    let timeout = p.duration(
        &format!("{path}.timeout"),
        raw.timeout.as_deref(),
        Duration::from_secs(30),
    );
    if timeout.is_zero() {
        p.push(format!("{path}.timeout"), "must be greater than 0");
    }
    let headers = header_edits(p, path, raw.headers.unwrap_or_default());
    if p.0.len() != before {
        return None;
    }
    Some(Route {
        name,
        path_prefix,
        upstream: upstream?,
        caller,
        token: token?,
        timeout,
        headers,
    })
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err("must start with `/`".to_owned());
    }
    if prefix.starts_with(RESERVED_PREFIX) || prefix == "/.oboe" {
        return Err(format!(
            "{RESERVED_PREFIX} is reserved for oboe's own endpoints"
        ));
    }
    if crate::proxy::route::check_path(prefix).is_err() {
        return Err("must not contain dot-segments or percent-encoded `/`, `\\` or `.`".to_owned());
    }
    if prefix.contains(['?', '#']) {
        return Err("must be a path only, without `?` or `#`".to_owned());
    }
    Ok(())
}

fn caller(p: &mut Problems, path: &str, raw: RawCaller) -> CallerPolicy {
    let kinds = match raw.kinds {
        None => vec![CallerKind::User, CallerKind::App],
        Some(list) => {
            if list.is_empty() {
                p.push(format!("{path}.caller.kinds"), "must not be empty");
            }
            list.iter()
                .enumerate()
                .filter_map(|(i, k)| match k.as_str() {
                    "user" => Some(CallerKind::User),
                    "app" => Some(CallerKind::App),
                    other => {
                        p.push(
                            format!("{path}.caller.kinds[{i}]"),
                            format!("must be `user` or `app`, not {other:?}"),
                        );
                        None
                    }
                })
                .collect()
        }
    };
    let policy = CallerPolicy {
        required: raw.required.unwrap_or(true),
        scopes: raw.scopes.unwrap_or_default(),
        roles: raw.roles.unwrap_or_default(),
        kinds,
    };
    if !policy.required && (!policy.scopes.is_empty() || !policy.roles.is_empty()) {
        p.push(
            format!("{path}.caller"),
            "`scopes` and `roles` need `required: true`: an unvalidated caller has none",
        );
    }
    policy
}

fn token(
    p: &mut Problems,
    path: &str,
    raw: Option<RawToken>,
    caller: &CallerPolicy,
) -> Option<TokenPolicy> {
    let Some(raw) = raw else {
        p.push(
            format!("{path}.token"),
            "required: say what goes upstream with `grant` (on_behalf_of, token_exchange, client_credentials, forward or none)",
        );
        return None;
    };
    let grant = match raw.grant.as_deref() {
        Some("on_behalf_of") => Grant::OnBehalfOf,
        Some("token_exchange") => Grant::TokenExchange,
        Some("client_credentials") => Grant::ClientCredentials,
        Some("forward") => Grant::Forward,
        Some("none") => Grant::None,
        Some(other) => {
            p.push(
                format!("{path}.token.grant"),
                format!(
                    "must be on_behalf_of, token_exchange, client_credentials, forward or none, not {other:?}"
                ),
            );
            return None;
        }
        None => {
            p.push(format!("{path}.token.grant"), "required");
            return None;
        }
    };
    let policy = TokenPolicy {
        grant,
        scopes: raw.scopes.unwrap_or_default(),
        audience: raw.audience.unwrap_or_default(),
        resource: raw.resource.unwrap_or_default(),
        requested_token_type: raw.requested_token_type,
    };
    let at = |field: &str| format!("{path}.token.{field}");
    match grant {
        Grant::OnBehalfOf | Grant::TokenExchange if !caller.required => p.push(
            format!("{path}.caller.required"),
            format!(
                "`{}` exchanges the caller's token, so it must be required and validated",
                grant.as_str()
            ),
        ),
        _ => {}
    }
    match grant {
        Grant::OnBehalfOf | Grant::ClientCredentials if policy.scopes.is_empty() => {
            p.push(at("scopes"), format!("required for `{}`", grant.as_str()))
        }
        Grant::TokenExchange
            if policy.scopes.is_empty()
                && policy.audience.is_empty()
                && policy.resource.is_empty() =>
        {
            p.push(
                at("scopes"),
                "`token_exchange` needs at least one of `scopes`, `audience` or `resource`",
            )
        }
        Grant::Forward | Grant::None => {
            for (field, set) in [
                ("scopes", !policy.scopes.is_empty()),
                ("audience", !policy.audience.is_empty()),
                ("resource", !policy.resource.is_empty()),
                (
                    "requested_token_type",
                    policy.requested_token_type.is_some(),
                ),
            ] {
                if set {
                    p.push(at(field), format!("not used by grant `{}`", grant.as_str()));
                }
            }
        }
        _ => {}
    }
    if grant != Grant::TokenExchange {
        for (field, set) in [
            ("audience", !policy.audience.is_empty()),
            ("resource", !policy.resource.is_empty()),
            (
                "requested_token_type",
                policy.requested_token_type.is_some(),
            ),
        ] {
            if set && grant.exchanges() {
                p.push(at(field), "only used by grant `token_exchange`");
            }
        }
    }
    Some(policy)
}

fn header_edits(p: &mut Problems, path: &str, raw: RawHeaders) -> HeaderEdits {
    let mut edits = HeaderEdits::default();
    for (name, value) in raw.set.unwrap_or_default() {
        let at = format!("{path}.headers.set.{name}");
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            (Ok(n), Ok(v)) => {
                if crate::proxy::headers::is_managed(&n) {
                    p.push(at, "oboe manages this header; it cannot be set");
                } else {
                    edits.set.push((n, v));
                }
            }
            (Err(_), _) => p.push(at, "not a valid header name"),
            (_, Err(_)) => p.push(at, "not a valid header value"),
        }
    }
    for (i, name) in raw.remove.unwrap_or_default().iter().enumerate() {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => edits.remove.push(n),
            Err(_) => p.push(
                format!("{path}.headers.remove[{i}]"),
                format!("{name:?} is not a valid header name"),
            ),
        }
    }
    edits
}

fn check_route_set(p: &mut Problems, routes: &[(usize, Route)]) {
    let mut names = HashSet::new();
    let mut prefixes = HashSet::new();
    for (i, r) in routes {
        if !names.insert(r.name.as_str()) {
            p.push(
                format!("routes[{i}].name"),
                format!("{:?} is used by an earlier route", r.name),
            );
        }
        if !prefixes.insert(r.path_prefix.as_str()) {
            p.push(
                format!("routes[{i}].path_prefix"),
                format!("{:?} is used by an earlier route", r.path_prefix),
            );
        }
    }
}

fn check_grants_against_provider(p: &mut Problems, routes: &[(usize, Route)], identity: &Identity) {
    for (i, r) in routes {
        let at = format!("routes[{i}].token.grant");
        match (r.token.grant, identity.provider) {
            (Grant::OnBehalfOf, Provider::Oidc) => p.push(
                at,
                "`on_behalf_of` is Entra's grant; use `token_exchange` (RFC 8693) with provider `oidc`",
            ),
            (Grant::TokenExchange, Provider::Entra) => p.push(
                at,
                "Entra rejects RFC 8693 token exchange; use `on_behalf_of` with provider `entra`",
            ),
            (Grant::ClientCredentials, Provider::Entra) => {
                for (j, scope) in r.token.scopes.iter().enumerate() {
                    if !scope.ends_with("/.default") {
                        p.push(
                            format!("routes[{i}].token.scopes[{j}]"),
                            "client credentials on Entra take `<resource>/.default`",
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

fn telemetry(p: &mut Problems, raw: RawTelemetry) -> Telemetry {
    let Some(otlp) = raw.otlp else {
        return Telemetry::default();
    };
    let endpoint = match otlp.endpoint {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => url,
        Some(url) => {
            p.push(
                "telemetry.otlp.endpoint",
                format!("{url:?} is not an http:// or https:// URL"),
            );
            url
        }
        None => {
            p.push("telemetry.otlp.endpoint", "required");
            String::new()
        }
    };
    let sample_ratio = otlp.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        p.push("telemetry.otlp.sample_ratio", "must be between 0.0 and 1.0");
    }
    if !cfg!(feature = "otlp") {
        p.push(
            "telemetry.otlp",
            "this build of oboe has no OTLP export; build it with `--features otlp` or remove the section",
        );
    }
    Telemetry {
        otlp: Some(Otlp {
            endpoint,
            service_name: otlp.service_name.unwrap_or_else(|| "oboe".to_owned()),
            sample_ratio,
        }),
    }
}
