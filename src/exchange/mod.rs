//! Getting a downstream token: Entra On-Behalf-Of, RFC 8693 token exchange or
//! client credentials, through the token cache.
//!
//! [`Exchanger::token`] is the one entry point: it refuses an app-only caller
//! on an OBO route before anything else, computes the cache key (hashed; never
//! a raw token or user id), and on a miss posts the grant with oboe's client
//! credential to the right token endpoint. Nothing here knows hyper's server side.
//! With `cache.shared` configured, an in-memory miss is looked up in Redis
//! first ([`shared`]), so replicas exchange each token once between them.

pub mod cache;
pub mod credential;
pub mod grant;
pub mod idp;
pub mod shared;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use aws_lc_rs::digest;
use http::StatusCode;

use crate::auth::{Authenticator, Caller};
use crate::clock::SharedClock;
use crate::config::{CacheKeyMode, CallerKind, Config, Grant, Identity, Provider, Route};
use crate::http_client::IdpClient;
use crate::telemetry::{ExchangeLabels, Metrics, OutcomeLabel};
use cache::{Entry, TokenCache};
use credential::{ClientAuth, CredentialError, Secret};
use grant::{GrantRequest, IdpError};
use idp::TokenClient;

/// Why no downstream token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    /// An app-only token cannot be exchanged On-Behalf-Of (Entra: AADSTS90083).
    #[error(
        "this route exchanges the caller's token On-Behalf-Of, which needs a user (delegated) token; the caller sent an app-only token"
    )]
    AppOnlyCaller,
    /// The IdP wants more claims (MFA, Conditional Access): the caller must re-authenticate.
    #[error("the identity provider requires the user to satisfy a claims challenge: {}", .0.summary())]
    ClaimsChallenge(Box<IdpError>),
    /// The user or an admin has not consented to the downstream scopes.
    #[error("the user or an administrator has not consented to the downstream API's permissions: {}", .0.summary())]
    ConsentRequired(Box<IdpError>),
    /// The IdP refused the caller's token as an assertion.
    #[error("the identity provider rejected the caller's token for the exchange: {}", .0.summary())]
    AssertionRejected(Box<IdpError>),
    /// The IdP refused oboe's own client credential.
    #[error("the identity provider rejected oboe's client credential ({credential}): {}", .idp.summary())]
    CredentialRejected {
        /// Which credential (source, never value).
        credential: String,
        /// The IdP's answer.
        idp: Box<IdpError>,
    },
    /// oboe's credential could not be read or used.
    #[error("oboe's client credential is unusable: {0}")]
    Credential(#[from] CredentialError),
    /// Any other refusal by the IdP (bad scope, unsupported grant, ...).
    #[error("the identity provider refused the exchange ({status}): {}", .idp.summary())]
    Refused {
        /// The IdP's answer.
        idp: Box<IdpError>,
        /// Its status.
        status: StatusCode,
    },
    /// The IdP throttles; try again after this many seconds.
    #[error("the identity provider is throttling token requests")]
    Throttled {
        /// Seconds.
        retry_after: u64,
    },
    /// The IdP could not be reached or failed (after one retry).
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    /// No answer within the timeout.
    #[error("the identity provider did not answer in time")]
    Timeout,
    /// The answer could not be used.
    #[error("the identity provider's answer is unusable: {0}")]
    BadAnswer(String),
    /// The caller's tenant is needed for the token endpoint but unknown.
    #[error("the caller's token has no tenant id, needed for a multi-tenant exchange")]
    NoTenant,
}

impl ExchangeError {
    /// Classifies an RFC 6749 error answer.
    pub fn from_idp(e: IdpError, status: StatusCode) -> Self {
        if e.is_claims_challenge() {
            ExchangeError::ClaimsChallenge(Box::new(e))
        } else if e.is_consent_required() {
            ExchangeError::ConsentRequired(Box::new(e))
        } else if e.is_invalid_client() {
            ExchangeError::CredentialRejected {
                credential: String::new(),
                idp: Box::new(e),
            }
        } else if e.is_assertion_rejected() {
            ExchangeError::AssertionRejected(Box::new(e))
        } else {
            ExchangeError::Refused {
                idp: Box::new(e),
                status,
            }
        }
    }

    /// Failures that would come back identical if asked again at once, and need
    /// no user interaction to clear: remembered for a few seconds.
    pub fn is_cacheable_failure(&self) -> bool {
        matches!(
            self,
            ExchangeError::CredentialRejected { .. }
                | ExchangeError::Credential(_)
                | ExchangeError::Refused { .. }
        )
    }

    /// The IdP's own answer, when there is one.
    pub fn idp_error(&self) -> Option<&IdpError> {
        match self {
            ExchangeError::ClaimsChallenge(e)
            | ExchangeError::ConsentRequired(e)
            | ExchangeError::AssertionRejected(e)
            | ExchangeError::Refused { idp: e, .. }
            | ExchangeError::CredentialRejected { idp: e, .. } => Some(e),
            _ => None,
        }
    }

    /// Label value for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ExchangeError::AppOnlyCaller => "app_only_caller",
            ExchangeError::ClaimsChallenge(_) => "claims_challenge",
            ExchangeError::ConsentRequired(_) => "consent_required",
            ExchangeError::AssertionRejected(_) => "assertion_rejected",
            ExchangeError::CredentialRejected { .. } => "credential_rejected",
            ExchangeError::Credential(_) => "credential_unusable",
            ExchangeError::Refused { .. } => "refused",
            ExchangeError::Throttled { .. } => "throttled",
            ExchangeError::Unavailable(_) => "unavailable",
            ExchangeError::Timeout => "timeout",
            ExchangeError::BadAnswer(_) => "bad_answer",
            ExchangeError::NoTenant => "no_tenant",
        }
    }
}

/// A route's exchange target, prepared once per configuration.
struct Target {
    grant: GrantRequest,
    /// Digest of the target (grant, sorted scopes, audience, resource, type).
    digest: [u8; 32],
}

/// Exchanges callers' tokens for downstream tokens.
pub struct Exchanger {
    identity: Identity,
    client_auth: Arc<ClientAuth>,
    tokens: Arc<TokenClient>,
    cache: Arc<TokenCache>,
    shared: Option<Arc<shared::SharedCache>>,
    key_mode: CacheKeyMode,
    targets: HashMap<String, Target>,
    auth: Option<Arc<Authenticator>>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Exchanger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchanger")
            .field("credential", &self.client_auth.describe())
            .finish_non_exhaustive()
    }
}

/// Why the exchanger could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeSetupError {
    /// The credential cannot be loaded.
    #[error("load client credential: {0}")]
    Credential(#[from] CredentialError),
    /// The shared cache's keys or credentials cannot be loaded.
    #[error("set up the shared token cache: {0}")]
    SharedCache(#[from] shared::SharedSetupError),
}

impl Exchanger {
    /// The exchanger of `config`, or `None` when no route exchanges tokens.
    pub fn new(
        config: &Config,
        client: IdpClient,
        auth: Option<Arc<Authenticator>>,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Self>, ExchangeSetupError> {
        let targets: HashMap<String, Target> = config
            .routes
            .iter()
            .filter_map(|r| target(r).map(|t| (r.name.clone(), t)))
            .collect();
        let (Some(identity), false) = (&config.identity, targets.is_empty()) else {
            return Ok(None);
        };
        // The config refuses exchange routes without a credential.
        let Some(credential) = &identity.credential else {
            return Ok(None);
        };
        let client_auth = ClientAuth::load(credential)?;
        tracing::info!(credential = %client_auth.describe(), "client credential loaded");
        let shared = match &config.cache.shared {
            Some(settings) => {
                // oboe's own identity: deployments of different apps sharing
                // a Redis never read each other's tokens.
                let namespace = format!(
                    "{}\n{}\n{}",
                    identity.client_id,
                    identity
                        .instance
                        .as_deref()
                        .or(identity.issuer.as_deref())
                        .unwrap_or_default(),
                    identity.tenant_id.as_deref().unwrap_or_default(),
                );
                let shared = Arc::new(shared::SharedCache::new(
                    settings,
                    &namespace,
                    clock.clone(),
                    metrics.clone(),
                )?);
                shared.warm_up();
                Some(shared)
            }
            None => None,
        };
        Ok(Some(Self {
            identity: identity.clone(),
            client_auth: Arc::new(client_auth),
            tokens: Arc::new(TokenClient::new(client, clock.clone())),
            cache: Arc::new(TokenCache::new(
                config.cache.max_entries,
                config.cache.refresh_before_expiry,
                clock.clone(),
            )),
            shared,
            key_mode: config.cache.key,
            targets,
            auth,
            clock,
            metrics,
        }))
    }

    /// After a reload: keeps the previous exchanger's cached tokens and
    /// throttling state when the cache settings did not change, so a new route
    /// file does not make every user exchange again. Keys include the route
    /// target, so entries of changed routes are simply never hit again. The
    /// shared cache (its connection and breaker) is kept when `cache.shared`
    /// is unchanged, and otherwise replaced by the one built from the new file
    /// (new encryption keys, say), whose keys and credentials were just read.
    pub fn keep_cache_of(
        &mut self,
        previous: &Exchanger,
        old: &crate::config::Cache,
        new: &crate::config::Cache,
    ) {
        let same = old.max_entries == new.max_entries
            && old.refresh_before_expiry == new.refresh_before_expiry
            && old.key == new.key;
        if same {
            self.cache = previous.cache.clone();
        }
        // The same Redis settings: keep its connection and breaker state.
        if old.shared.is_some() && old.shared == new.shared {
            self.shared = previous.shared.clone();
        }
        if self.client_auth.describe() == previous.client_auth.describe() {
            self.tokens = previous.tokens.clone();
        }
    }

    /// The downstream token for `route`, on behalf of `caller` (whose raw
    /// token is `caller_token`) for delegated grants.
    pub async fn token(
        &self,
        route: &Route,
        caller: Option<&Caller>,
        caller_token: Option<&str>,
    ) -> Result<Arc<Entry>, ExchangeError> {
        let target = self
            .targets
            .get(&route.name)
            .ok_or_else(|| ExchangeError::BadAnswer("route has no exchange target".into()))?;
        // Entra refuses OBO for app-only tokens (AADSTS90083): say so before asking.
        if matches!(target.grant, GrantRequest::OnBehalfOf { .. })
            && caller.is_some_and(|c| c.kind == CallerKind::App)
        {
            return Err(ExchangeError::AppOnlyCaller);
        }
        let key = self.key(target, caller, caller_token);
        if let Some(entry) = self.cache.get_fresh(&key).await {
            self.count_lookup(cache::Lookup::Hit);
            return Ok(entry);
        }
        let subject = if target.grant.is_delegated() {
            Some(Secret::new(caller_token.unwrap_or_default().to_owned()))
        } else {
            None
        };
        let tenant = caller.and_then(|c| c.claim("tid")).map(str::to_owned);

        let fetch = {
            let url = self.token_url(tenant.as_deref())?;
            let grant = target.grant.clone();
            let client_auth = self.client_auth.clone();
            let tokens = self.tokens.clone();
            let client_id = self.identity.client_id.clone();
            let clock = self.clock.clone();
            let metrics = self.metrics.clone();
            move || {
                let (url, grant, client_auth, tokens, client_id, clock, metrics, subject) = (
                    url.clone(),
                    grant.clone(),
                    client_auth.clone(),
                    tokens.clone(),
                    client_id.clone(),
                    clock.clone(),
                    metrics.clone(),
                    subject.clone(),
                );
                async move {
                    let started = Instant::now();
                    let result = exchange(
                        &url,
                        &grant,
                        &client_auth,
                        &tokens,
                        &client_id,
                        subject.as_ref(),
                        clock.now_ms() / 1000,
                    )
                    .await;
                    let outcome = match &result {
                        Ok(_) => "ok",
                        Err(e) => e.as_str(),
                    };
                    metrics
                        .exchanges
                        .get_or_create(&ExchangeLabels {
                            grant: grant.name(),
                            outcome,
                        })
                        .inc();
                    metrics
                        .exchange_duration
                        .observe(started.elapsed().as_secs_f64());
                    result
                }
            }
        };
        let (result, lookup) = self.cache.get(key, fetch, self.shared.as_ref()).await;
        self.count_lookup(lookup);
        result
    }

    fn count_lookup(&self, lookup: cache::Lookup) {
        self.metrics
            .token_cache
            .get_or_create(&OutcomeLabel {
                outcome: lookup.as_str(),
            })
            .inc();
    }

    /// The token endpoint: Entra's for the caller's tenant when multi-tenant
    /// (`common`/`organizations` are invalid for OBO), else the configured
    /// tenant's; the discovered one for generic OIDC.
    fn token_url(&self, caller_tenant: Option<&str>) -> Result<String, ExchangeError> {
        match self.identity.provider {
            Provider::Entra => {
                let instance = self.identity.instance.as_deref().unwrap_or_default();
                let tenant = if self.identity.is_multi_tenant() {
                    caller_tenant.ok_or(ExchangeError::NoTenant)?
                } else {
                    self.identity.tenant_id.as_deref().unwrap_or_default()
                };
                Ok(format!("{instance}/{tenant}/oauth2/v2.0/token"))
            }
            Provider::Oidc => self
                .auth
                .as_ref()
                .and_then(|a| a.token_endpoint())
                .ok_or_else(|| {
                    ExchangeError::Unavailable("the token endpoint is not discovered yet".into())
                }),
        }
    }

    /// The cache key. `user` mode: issuer, tenant, user (`oid`, else `sub`),
    /// caller app (`azp`/`appid`), the claims that change what the IdP issues
    /// (`xms_cc`, `acrs`) and the target; `token` mode: the caller token's hash
    /// and the target. Client credentials: the tenant and the target.
    fn key(
        &self,
        target: &Target,
        caller: Option<&Caller>,
        caller_token: Option<&str>,
    ) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut part = |bytes: &[u8]| {
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        };
        part(b"oboe-token-cache-v1");
        part(&target.digest);
        // String claims are hashed as they are (no allocation on the hot
        // path); anything else by its JSON text.
        let claim = |name: &str| -> std::borrow::Cow<'_, str> {
            match caller.and_then(|c| c.claims.get(name)) {
                Some(serde_json::Value::String(v)) => std::borrow::Cow::Borrowed(v.as_str()),
                Some(other) => std::borrow::Cow::Owned(other.to_string()),
                None => std::borrow::Cow::Borrowed(""),
            }
        };
        let first_of = |a: &str, b: &str| match claim(a) {
            v if !v.is_empty() => v,
            _ => claim(b),
        };
        match (&target.grant, self.key_mode) {
            (GrantRequest::ClientCredentials { .. }, _) => {
                part(b"app");
                part(claim("tid").as_bytes());
            }
            (_, CacheKeyMode::Token) => {
                part(b"token");
                part(&crate::auth::token_hash(caller_token.unwrap_or_default()));
            }
            (_, CacheKeyMode::User) => {
                part(b"user");
                part(claim("iss").as_bytes());
                part(claim("tid").as_bytes());
                part(first_of("oid", "sub").as_bytes());
                part(first_of("azp", "appid").as_bytes());
                part(claim("xms_cc").as_bytes());
                part(claim("acrs").as_bytes());
            }
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// One grant request with the client credential.
async fn exchange(
    url: &str,
    grant: &GrantRequest,
    client_auth: &ClientAuth,
    tokens: &TokenClient,
    client_id: &str,
    subject: Option<&Secret>,
    now: u64,
) -> Result<grant::Issued, ExchangeError> {
    let mut form = vec![("client_id", Secret::new(client_id.to_owned()))];
    form.extend(grant.form(subject.map(Secret::expose)));
    let presented = client_auth.present(client_id, url, now)?;
    form.extend(presented.fields);
    tokens
        .request(url, &form, presented.basic.as_ref())
        .await
        .map_err(|e| match e {
            ExchangeError::CredentialRejected { idp, .. } => ExchangeError::CredentialRejected {
                credential: client_auth.describe(),
                idp,
            },
            other => other,
        })
}

fn target(route: &Route) -> Option<Target> {
    let t = &route.token;
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v.dedup();
        v
    };
    let grant = match t.grant {
        Grant::OnBehalfOf => GrantRequest::OnBehalfOf {
            scopes: t.scopes.clone(),
        },
        Grant::TokenExchange => GrantRequest::TokenExchange {
            scopes: t.scopes.clone(),
            audience: t.audience.clone(),
            resource: t.resource.clone(),
            requested_token_type: t.requested_token_type.clone(),
        },
        Grant::ClientCredentials => GrantRequest::ClientCredentials {
            scopes: t.scopes.clone(),
        },
        Grant::Forward | Grant::None => return None,
    };
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut part = |s: &str| {
        ctx.update(&(s.len() as u64).to_be_bytes());
        ctx.update(s.as_bytes());
    };
    part(grant.name());
    for (name, list) in [
        ("scopes", sorted(&t.scopes)),
        ("audience", sorted(&t.audience)),
        ("resource", sorted(&t.resource)),
    ] {
        part(name);
        for item in list {
            part(&item);
        }
    }
    part(t.requested_token_type.as_deref().unwrap_or_default());
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ctx.finish().as_ref());
    Some(Target { grant, digest })
}
