//! An issuer's signing keys: fetched at start, refreshed in the background, and
//! refetched when a token names an unknown `kid`, coalesced and rate-limited so
//! forged `kid`s cannot make oboe hammer the IdP.
//!
//! Readers never wait: the key set is an `ArcSwap` snapshot. Only fetchers are
//! serialised (one fetch at a time per issuer), which is what coalescing means.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use crate::clock::SharedClock;
use crate::http_client::{FetchError, IdpClient};

/// One verification key, bound to the algorithms it may verify.
pub struct VerifyingKey {
    /// Key id.
    pub kid: String,
    /// Algorithms this key verifies (its JWK `alg`, or its family within the allow-list).
    pub algorithms: Vec<Algorithm>,
    /// The key.
    pub key: DecodingKey,
    /// Entra's per-key `issuer` (may be a `{tenantid}` template).
    pub issuer: Option<String>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// A fetched key set.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: HashMap<String, Arc<VerifyingKey>>,
    /// Keys skipped, with why (logged once per fetch).
    pub skipped: Vec<String>,
}

impl KeySet {
    /// Parses a JWKS document, keeping only signature keys usable with `allowed`.
    pub fn parse(doc: &Value, allowed: &[Algorithm]) -> Result<Self, String> {
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("`keys` is missing or not an array")?;
        let mut set = KeySet::default();
        for jwk in keys {
            match parse_jwk(jwk, allowed) {
                Ok(key) => {
                    set.keys.insert(key.kid.clone(), Arc::new(key));
                }
                Err(why) => set.skipped.push(why),
            }
        }
        Ok(set)
    }

    /// The key with this id.
    pub fn get(&self, kid: &str) -> Option<&Arc<VerifyingKey>> {
        self.keys.get(kid)
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is usable.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn str_member<'a>(jwk: &'a Value, name: &str) -> Option<&'a str> {
    jwk.get(name).and_then(Value::as_str)
}

/// The algorithm family a key type can verify.
fn family(kty: &str, crv: Option<&str>) -> &'static [Algorithm] {
    use Algorithm::*;
    match (kty, crv) {
        ("RSA", _) => &[RS256, RS384, RS512, PS256, PS384, PS512],
        ("EC", Some("P-256")) => &[ES256],
        ("EC", Some("P-384")) => &[ES384],
        ("OKP", Some("Ed25519")) => &[EdDSA],
        _ => &[],
    }
}

fn parse_jwk(jwk: &Value, allowed: &[Algorithm]) -> Result<VerifyingKey, String> {
    let kid = str_member(jwk, "kid").ok_or("a key without `kid`")?;
    let kty = str_member(jwk, "kty").ok_or_else(|| format!("key {kid}: no `kty`"))?;
    if let Some(use_) = str_member(jwk, "use")
        && use_ != "sig"
    {
        return Err(format!("key {kid}: `use` is {use_:?}, not sig"));
    }
    let crv = str_member(jwk, "crv");
    let family = family(kty, crv);
    let algorithms: Vec<Algorithm> = match str_member(jwk, "alg") {
        Some(alg) => {
            let alg: Algorithm = alg
                .parse()
                .map_err(|_| format!("key {kid}: unknown `alg` {alg:?}"))?;
            if !family.contains(&alg) {
                return Err(format!(
                    "key {kid}: `alg` {alg:?} does not fit key type {kty}"
                ));
            }
            vec![alg]
        }
        None => family.to_vec(),
    }
    .into_iter()
    .filter(|a| allowed.contains(a))
    .collect();
    if algorithms.is_empty() {
        return Err(format!(
            "key {kid}: no allowed algorithm fits key type {kty}"
        ));
    }
    let need = |name: &str| str_member(jwk, name).ok_or_else(|| format!("key {kid}: no `{name}`"));
    let key = match kty {
        "RSA" => DecodingKey::from_rsa_components(need("n")?, need("e")?),
        "EC" => DecodingKey::from_ec_components(need("x")?, need("y")?),
        "OKP" => DecodingKey::from_ed_components(need("x")?),
        _ => return Err(format!("key {kid}: key type {kty} is not accepted")),
    }
    .map_err(|e| format!("key {kid}: {e}"))?;
    // Reject RSA keys shorter than 2048 bits: the IdP would never publish them.
    if kty == "RSA" {
        let n = URL_SAFE_NO_PAD
            .decode(need("n")?)
            .map_err(|_| format!("key {kid}: `n` is not base64url"))?;
        let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
        if bits < 2048 {
            return Err(format!("key {kid}: RSA key of {bits} bits is too short"));
        }
    }
    Ok(VerifyingKey {
        kid: kid.to_owned(),
        algorithms,
        key,
        issuer: str_member(jwk, "issuer").map(str::to_owned),
    })
}

/// Outcome of a key fetch, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// New keys stored.
    Ok,
    /// The fetch failed; the last good keys stay in use.
    Failed,
}

/// Why a key could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLookupError {
    /// The key set has never been loaded.
    NotLoaded,
    /// No key with this id, even after a refetch (or the refetch was rate-limited).
    Unknown,
}

/// Settings for a key set.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// Least time between two refetches triggered by unknown `kid`s.
    pub min_refetch_interval: Duration,
    /// Background refresh interval when the IdP gives no cache lifetime.
    pub default_refresh: Duration,
    /// Bounds on the refresh interval taken from `Cache-Control: max-age`.
    pub min_refresh: Duration,
    /// Upper bound.
    pub max_refresh: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        Self {
            min_refetch_interval: Duration::from_secs(30),
            default_refresh: Duration::from_secs(12 * 3600),
            min_refresh: Duration::from_secs(5 * 60),
            max_refresh: Duration::from_secs(24 * 3600),
        }
    }
}

/// Called after every fetch, for metrics.
pub type FetchObserver = Arc<dyn Fn(FetchOutcome) + Send + Sync>;

/// An issuer's key set with its refresh machinery.
pub struct Jwks {
    uri: String,
    client: IdpClient,
    allowed: Vec<Algorithm>,
    settings: JwksSettings,
    clock: SharedClock,
    keys: ArcSwapOption<KeySet>,
    /// Serialises fetchers only; readers use `keys`.
    fetch: tokio::sync::Mutex<()>,
    /// Bumped after every successful fetch.
    generation: AtomicU64,
    /// Clock time (ms) of the last refetch an unknown `kid` triggered.
    last_refetch_ms: AtomicU64,
    /// Clock time (ms) of the last successful fetch.
    last_success_ms: AtomicU64,
    /// Refresh interval suggested by the last answer's cache headers.
    next_refresh: std::sync::Mutex<Duration>,
    observer: FetchObserver,
}

impl Jwks {
    /// A key set at `uri`, not yet fetched.
    pub fn new(
        uri: String,
        client: IdpClient,
        allowed: Vec<Algorithm>,
        settings: JwksSettings,
        clock: SharedClock,
        observer: FetchObserver,
    ) -> Self {
        let default_refresh = settings.default_refresh;
        Self {
            uri,
            client,
            allowed,
            settings,
            clock,
            keys: ArcSwapOption::empty(),
            fetch: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            last_refetch_ms: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(0),
            next_refresh: std::sync::Mutex::new(default_refresh),
            observer,
        }
    }

    /// True once keys have been loaded.
    pub fn is_loaded(&self) -> bool {
        self.keys.load().is_some()
    }

    /// Seconds since the last successful fetch, if any.
    pub fn age_secs(&self) -> Option<f64> {
        let last = self.last_success_ms.load(Ordering::SeqCst);
        (last > 0).then(|| self.clock.now_ms().saturating_sub(last) as f64 / 1000.0)
    }

    /// How many fetches succeeded so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The key for `kid`, refetching the set (coalesced, rate-limited) when it is unknown.
    pub async fn key(&self, kid: &str) -> Result<Arc<VerifyingKey>, KeyLookupError> {
        if let Some(key) = self.lookup(kid)? {
            return Ok(key);
        }
        let seen = self.generation();
        let _fetching = self.fetch.lock().await;
        // Someone else fetched while we waited: their keys are the freshest there are.
        if self.generation() == seen && self.may_refetch() {
            self.last_refetch_ms
                .store(self.clock.now_ms().max(1), Ordering::SeqCst);
            // A failed refetch keeps the old keys; the lookup below then says "unknown".
            let _ = self.fetch_locked().await;
        }
        self.lookup(kid)?.ok_or(KeyLookupError::Unknown)
    }

    fn lookup(&self, kid: &str) -> Result<Option<Arc<VerifyingKey>>, KeyLookupError> {
        let keys = self.keys.load();
        let keys = keys.as_ref().ok_or(KeyLookupError::NotLoaded)?;
        Ok(keys.get(kid).cloned())
    }

    fn may_refetch(&self) -> bool {
        let last = self.last_refetch_ms.load(Ordering::SeqCst);
        let min = self.settings.min_refetch_interval.as_millis() as u64;
        last == 0 || self.clock.now_ms().saturating_sub(last) >= min
    }

    /// Fetches now (waiting for any fetch in progress first). Used at start and by
    /// the background refresher.
    pub async fn refresh(&self) -> Result<(), FetchError> {
        let _fetching = self.fetch.lock().await;
        self.fetch_locked().await
    }

    async fn fetch_locked(&self) -> Result<(), FetchError> {
        let result = self
            .client
            .get_json(&self.uri)
            .await
            .and_then(|(doc, headers)| {
                let set =
                    KeySet::parse(&doc, &self.allowed).map_err(|detail| FetchError::BadJson {
                        url: self.uri.clone(),
                        detail,
                    })?;
                Ok((set, max_age(&headers)))
            });
        match result {
            Ok((set, max_age)) => {
                for why in &set.skipped {
                    tracing::debug!(jwks = %self.uri, "skip signing key: {why}");
                }
                tracing::info!(jwks = %self.uri, keys = set.len(), "signing keys loaded");
                self.keys.store(Some(Arc::new(set)));
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.last_success_ms
                    .store(self.clock.now_ms(), Ordering::SeqCst);
                let refresh = max_age
                    .unwrap_or(self.settings.default_refresh)
                    .clamp(self.settings.min_refresh, self.settings.max_refresh);
                if let Ok(mut next) = self.next_refresh.lock() {
                    *next = refresh;
                }
                (self.observer)(FetchOutcome::Ok);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "fetch signing keys; the last good keys stay in use");
                (self.observer)(FetchOutcome::Failed);
                Err(e)
            }
        }
    }

    /// Loads the keys for the first time, retrying with backoff, then refreshes
    /// them forever. Run it in a task.
    pub async fn maintain(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(250);
        while self.refresh().await.is_err() {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        loop {
            let wait = self
                .next_refresh
                .lock()
                .map(|d| *d)
                .unwrap_or(self.settings.default_refresh);
            tokio::time::sleep(wait).await;
            if self.refresh().await.is_err() {
                // Keep the old keys; try again soon rather than after a whole interval.
                if let Ok(mut next) = self.next_refresh.lock() {
                    *next = self.settings.min_refresh;
                }
            }
        }
    }
}

/// `Cache-Control: max-age=N` of a key-set answer.
fn max_age(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|directive| {
            let (name, value) = directive.trim().split_once('=')?;
            name.eq_ignore_ascii_case("max-age")
                .then(|| value.trim().parse::<u64>().ok())
                .flatten()
        })
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bound_to_type_and_algorithm() {
        let n = URL_SAFE_NO_PAD.encode([0xC5u8; 256]);
        let short_n = URL_SAFE_NO_PAD.encode([0xC5u8; 128]);
        let doc = serde_json::json!({"keys": [
            {"kid": "rsa", "kty": "RSA", "use": "sig", "n": n, "e": "AQAB"},
            {"kid": "rsa-ps", "kty": "RSA", "alg": "PS256", "n": n, "e": "AQAB"},
            {"kid": "rsa-enc", "kty": "RSA", "use": "enc", "n": n, "e": "AQAB"},
            {"kid": "rsa-short", "kty": "RSA", "n": short_n, "e": "AQAB"},
            {"kid": "rsa-as-es", "kty": "RSA", "alg": "ES256", "n": n, "e": "AQAB"},
            {"kid": "hmac", "kty": "oct", "k": "c2VjcmV0"},
            {"kty": "RSA", "n": n, "e": "AQAB"},
        ]});
        let set = KeySet::parse(&doc, &[Algorithm::RS256]).expect("parse");
        assert_eq!(
            set.get("rsa").map(|k| k.algorithms.clone()),
            Some(vec![Algorithm::RS256])
        );
        // PS256 key with only RS256 allowed: unusable.
        assert!(set.get("rsa-ps").is_none());
        for kid in ["rsa-enc", "rsa-short", "rsa-as-es", "hmac"] {
            assert!(set.get(kid).is_none(), "{kid}");
        }
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn max_age_is_read_from_cache_control() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("public, max-age=3600"),
        );
        assert_eq!(max_age(&h), Some(Duration::from_secs(3600)));
        assert_eq!(max_age(&http::HeaderMap::new()), None);
    }
}
