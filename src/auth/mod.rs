//! Caller-token validation: who may call a route.
//!
//! [`Authenticator::authenticate`] turns an `Authorization` header into a
//! validated [`Caller`], in this order: extract the bearer token; look it up in
//! the verified-token cache (a hit skips the signature, never the expiry check);
//! parse and apply the header rules; check the claims; find the signing key
//! (refetching unknown `kid`s, coalesced and rate-limited); verify the signature;
//! check the key's own issuer. Nothing here knows about hyper's server side.

pub mod bearer;
pub mod discovery;
pub mod jwks;
pub mod policy;
pub mod validate;

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use aws_lc_rs::digest;
use http::HeaderMap;
use jsonwebtoken::Algorithm;
use moka::Expiry;
use serde_json::{Map, Value};

use crate::clock::SharedClock;
use crate::config::{CallerKind, Identity, Inbound, Provider};
use crate::http_client::IdpClient;
use crate::telemetry::{IssuerLabel, Metrics, OutcomeLabel, ReasonLabel};
use discovery::Discovered;
use jwks::{FetchOutcome, Jwks, JwksSettings, KeyLookupError};
use validate::ClaimRules;

pub use policy::Forbidden;

/// Why a caller's token was refused (401 `invalid_token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No bearer token.
    Missing,
    /// Not a well-formed JWT, or a member has the wrong type.
    Malformed(&'static str),
    /// Larger than [`validate::MAX_TOKEN_BYTES`].
    TooLarge,
    /// A JWE (five parts): oboe accepts signed tokens only.
    Encrypted,
    /// A header member oboe refuses (`crit`, `jku`, `x5u`, `jwk`, `x5c`, ...).
    ForbiddenHeader(&'static str),
    /// `alg` is not in the allow-list (or does not fit the key).
    AlgorithmNotAllowed,
    /// No signing key with this `kid`, even after a refetch.
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// `iss` is not an accepted issuer.
    WrongIssuer,
    /// No accepted audience in `aud`.
    WrongAudience,
    /// Multi-tenant: `tid` is missing or not a GUID.
    WrongTenant,
    /// The signing key belongs to another issuer.
    KeyIssuerMismatch,
    /// `exp` has passed.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iat` is in the future.
    IssuedInFuture,
    /// A date claim is not a number.
    BadDate(&'static str),
}

impl Reason {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Malformed(_) => "malformed",
            Reason::TooLarge => "too_large",
            Reason::Encrypted => "encrypted",
            Reason::ForbiddenHeader(_) => "forbidden_header",
            Reason::AlgorithmNotAllowed => "algorithm",
            Reason::UnknownKey => "unknown_key",
            Reason::BadSignature => "bad_signature",
            Reason::WrongIssuer => "issuer",
            Reason::WrongAudience => "audience",
            Reason::WrongTenant => "tenant",
            Reason::KeyIssuerMismatch => "key_issuer",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::IssuedInFuture => "issued_in_future",
            Reason::BadDate(_) => "malformed",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Missing => f.write_str("no bearer token in Authorization"),
            Reason::Malformed(why) => write!(f, "malformed token: {why}"),
            Reason::TooLarge => write!(
                f,
                "the token is larger than {} bytes",
                validate::MAX_TOKEN_BYTES
            ),
            Reason::Encrypted => f.write_str("encrypted tokens (JWE) are not accepted"),
            Reason::ForbiddenHeader(name) => {
                write!(
                    f,
                    "the token header carries `{name}`, which is not accepted"
                )
            }
            Reason::AlgorithmNotAllowed => {
                f.write_str("the token's signing algorithm is not allowed")
            }
            Reason::UnknownKey => f.write_str("the token is signed with an unknown key"),
            Reason::BadSignature => f.write_str("the token signature is invalid"),
            Reason::WrongIssuer => f.write_str("the token issuer is not accepted"),
            Reason::WrongAudience => f.write_str("the token audience is not accepted"),
            Reason::WrongTenant => f.write_str("the token has no valid tenant id (tid)"),
            Reason::KeyIssuerMismatch => {
                f.write_str("the token is signed with a key of another issuer")
            }
            Reason::Expired => f.write_str("the token is expired"),
            Reason::NotYetValid => f.write_str("the token is not valid yet (nbf)"),
            Reason::IssuedInFuture => f.write_str("the token is issued in the future (iat)"),
            Reason::BadDate(name) => write!(f, "malformed token: `{name}` is not a number"),
        }
    }
}

/// Why authentication or authorization failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The token is not acceptable: 401 `invalid_token`.
    #[error("{0}")]
    Invalid(Reason),
    /// The token is valid but not enough for the route: 403 `insufficient_scope`.
    #[error("{0}")]
    Forbidden(Forbidden),
    /// The issuer's keys have never been loaded: 503.
    #[error("the identity provider's signing keys are not loaded yet")]
    KeysUnavailable,
}

impl From<Reason> for AuthError {
    fn from(r: Reason) -> Self {
        AuthError::Invalid(r)
    }
}

/// A validated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Every claim of the token.
    pub claims: Map<String, Value>,
    /// `exp`, seconds since the epoch.
    pub exp: u64,
    /// User (delegated) or app-only.
    pub kind: CallerKind,
    /// `scp`, split on spaces.
    pub scopes: Vec<String>,
    /// `roles`.
    pub roles: Vec<String>,
}

impl Caller {
    /// Builds a caller from already validated claims.
    pub fn from_claims(claims: Map<String, Value>, exp: u64) -> Self {
        let scopes: Vec<String> = claims
            .get("scp")
            .and_then(Value::as_str)
            .map(|s| {
                s.split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let roles = claims
            .get("roles")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        // `idtyp` when present; else a delegated token has `scp`, or (RFC 9068)
        // a `sub` that is not the client itself.
        let client = claims
            .get("client_id")
            .or_else(|| claims.get("azp"))
            .and_then(Value::as_str);
        let kind = match claims.get("idtyp").and_then(Value::as_str) {
            Some("app") => CallerKind::App,
            Some("user") => CallerKind::User,
            _ if claims.contains_key("scp") => CallerKind::User,
            _ if claims.contains_key("scope")
                && claims
                    .get("sub")
                    .and_then(Value::as_str)
                    .is_some_and(|sub| Some(sub) != client) =>
            {
                CallerKind::User
            }
            _ => CallerKind::App,
        };
        Self {
            claims,
            exp,
            kind,
            scopes,
            roles,
        }
    }

    /// A string claim.
    pub fn claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }
}

/// The verified-token cache evicts an entry when its token expires.
struct UntilExpiry;

impl Expiry<[u8; 32], Arc<Caller>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Caller>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        Some(Duration::from_secs(value.exp.saturating_sub(now).max(1)))
    }
}

/// Entries in the verified-token cache.
const VERIFIED_CACHE_ENTRIES: u64 = 16 * 1024;

/// What discovery found, once it has.
struct IssuerState {
    rules: ClaimRules,
    jwks: Arc<Jwks>,
    discovered: Discovered,
}

/// Validates callers' tokens for one identity.
pub struct Authenticator {
    label: String,
    identity: Identity,
    allowed: Vec<Algorithm>,
    audiences: Vec<String>,
    leeway: u64,
    client: IdpClient,
    clock: SharedClock,
    settings: JwksSettings,
    metrics: Arc<Metrics>,
    state: ArcSwapOption<IssuerState>,
    verified: moka::sync::Cache<[u8; 32], Arc<Caller>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuer", &self.label)
            .finish_non_exhaustive()
    }
}

impl Drop for Authenticator {
    fn drop(&mut self) {
        if let Ok(mut task) = self.task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

impl Authenticator {
    /// An authenticator for `identity`; call [`Authenticator::start`] to load keys.
    pub fn new(
        identity: &Identity,
        inbound: &Inbound,
        client: IdpClient,
        clock: SharedClock,
        settings: JwksSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let label = match identity.provider {
            Provider::Entra => format!(
                "{}/{}",
                identity.instance.as_deref().unwrap_or_default(),
                identity.tenant_id.as_deref().unwrap_or_default()
            ),
            Provider::Oidc => identity.issuer.clone().unwrap_or_default(),
        };
        Arc::new(Self {
            label,
            identity: identity.clone(),
            allowed: validate::algorithms(&inbound.algorithms),
            audiences: inbound.audiences.clone(),
            leeway: inbound.leeway.as_secs(),
            client,
            clock,
            settings,
            metrics,
            state: ArcSwapOption::empty(),
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CACHE_ENTRIES)
                .expire_after(UntilExpiry)
                .build(),
            task: Mutex::new(None),
        })
    }

    /// Starts discovery and key maintenance in the background: discovery is
    /// retried with backoff until it succeeds, then the keys are loaded and
    /// refreshed for as long as the authenticator lives.
    pub fn start(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        let task = tokio::spawn(maintain(this));
        if let Ok(mut slot) = self.task.lock() {
            *slot = Some(task.abort_handle());
        }
        let weak = Arc::downgrade(self);
        let metrics = self.metrics.clone();
        let label = self.label.clone();
        self.metrics.on_scrape(
            "jwks_age",
            Box::new(move || {
                let age = weak
                    .upgrade()
                    .and_then(|a| a.state.load().as_ref().and_then(|s| s.jwks.age_secs()));
                if let Some(age) = age {
                    metrics
                        .jwks_age
                        .get_or_create(&IssuerLabel {
                            issuer: label.clone(),
                        })
                        .set(age);
                }
            }),
        );
    }

    /// True once the issuer's keys have loaded at least once.
    pub fn is_ready(&self) -> bool {
        self.state
            .load()
            .as_ref()
            .is_some_and(|s| s.jwks.is_loaded())
    }

    /// The token endpoint named by discovery, once known.
    pub fn token_endpoint(&self) -> Option<String> {
        self.state
            .load()
            .as_ref()
            .and_then(|s| s.discovered.token_endpoint.clone())
    }

    /// Validates the caller's bearer token in `headers`.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Caller>, AuthError> {
        let result = self.authenticate_inner(headers).await;
        if let Err(AuthError::Invalid(reason)) = &result {
            self.metrics
                .auth_rejections
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc();
        }
        result
    }

    /// Counts a policy refusal.
    pub fn count_forbidden(&self, forbidden: &Forbidden) {
        self.metrics
            .auth_rejections
            .get_or_create(&ReasonLabel {
                reason: forbidden.as_str(),
            })
            .inc();
    }

    async fn authenticate_inner(&self, headers: &HeaderMap) -> Result<Arc<Caller>, AuthError> {
        let token = bearer::extract(headers)?;
        if token.len() > validate::MAX_TOKEN_BYTES {
            return Err(Reason::TooLarge.into());
        }
        let now = self.clock.now_ms() / 1000;
        let hash = token_hash(token);
        if let Some(caller) = self.verified.get(&hash) {
            self.count_cache("hit");
            validate::check_lifetime(&caller.claims, caller.exp, self.leeway, now)?;
            return Ok(caller);
        }
        self.count_cache("miss");

        let state = self.state.load_full().ok_or(AuthError::KeysUnavailable)?;
        let parsed = validate::parse(token, &self.allowed)?;
        // Cheap claim checks first: a token for another issuer or audience, or an
        // expired one, never costs a signature check or a key refetch.
        let lifetime = validate::check_claims(&parsed.claims, &state.rules, now)?;
        let key = state.jwks.key(&parsed.kid).await.map_err(|e| match e {
            KeyLookupError::NotLoaded => AuthError::KeysUnavailable,
            KeyLookupError::Unknown => AuthError::Invalid(Reason::UnknownKey),
        })?;
        validate::verify_signature(&parsed, &key)?;
        validate::check_key_issuer(&parsed.claims, &key, &state.rules)?;

        let caller = Arc::new(Caller::from_claims(parsed.claims, lifetime.exp));
        self.verified.insert(hash, caller.clone());
        Ok(caller)
    }

    fn count_cache(&self, outcome: &'static str) {
        self.metrics
            .verified_cache
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    fn jwks_observer(&self) -> jwks::FetchObserver {
        let metrics = self.metrics.clone();
        Arc::new(move |outcome| {
            let outcome = match outcome {
                FetchOutcome::Ok => "ok",
                FetchOutcome::Failed => "failed",
            };
            metrics
                .jwks_refreshes
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
        })
    }
}

/// SHA-256 of a token: the verified-token cache never holds the token itself.
pub fn token_hash(token: &str) -> [u8; 32] {
    let digest = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Discovery with backoff, then key maintenance. Holds only a weak reference
/// between attempts so a replaced authenticator goes away.
async fn maintain(this: Weak<Authenticator>) {
    let mut backoff = Duration::from_millis(100);
    let jwks = loop {
        let Some(auth) = this.upgrade() else { return };
        match discovery::discover(&auth.identity, &auth.client).await {
            Ok(discovered) => {
                let jwks = Arc::new(Jwks::new(
                    discovered.jwks_uri.clone(),
                    auth.client.clone(),
                    auth.allowed.clone(),
                    auth.settings.clone(),
                    auth.clock.clone(),
                    auth.jwks_observer(),
                ));
                let rules = ClaimRules {
                    issuers: discovered.issuers.clone(),
                    audiences: auth.audiences.iter().cloned().collect(),
                    leeway: auth.leeway,
                    multi_tenant: auth.identity.is_multi_tenant(),
                };
                tracing::info!(issuer = %auth.label, jwks = %discovered.jwks_uri, "discovered identity provider");
                auth.state.store(Some(Arc::new(IssuerState {
                    rules,
                    jwks: jwks.clone(),
                    discovered,
                })));
                break jwks;
            }
            Err(e) => {
                tracing::warn!(issuer = %auth.label, error = %e, retry_in = ?backoff, "discovery failed");
            }
        }
        drop(auth);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    };
    jwks.maintain().await;
}
