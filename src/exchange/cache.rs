//! The downstream token cache (moka), as DESIGN.md's Token cache section says:
//!
//! - keys are SHA-256 digests (never a raw token or user id);
//! - an entry lives `L − margin`, where `L = min(expires_in, exp − now)` and
//!   `margin = refresh_before_expiry`, or `L/2` for tokens too short for that;
//! - in the last part of that life (the refresh window, as long as the margin,
//!   at most half the entry's life) the cached token is still served while one
//!   background refresh runs;
//! - concurrent misses for one key make exactly one IdP request (moka's
//!   `try_get_with` coalesces them);
//! - identical non-interactive failures are remembered for a few seconds so a
//!   broken credential cannot make oboe hammer the IdP;
//! - bounded by `max_entries`;
//! - with a shared L2 ([`super::shared`], Redis) configured, a miss reads it
//!   inside the single-flight init (so concurrent local misses make one Redis
//!   read) before asking the IdP, and fresh tokens, background refreshes
//!   included, are written to both.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use moka::Expiry;

use super::ExchangeError;
use super::credential::Secret;
use super::grant::Issued;
use super::shared::SharedCache;
use crate::clock::SharedClock;

/// How long an identical non-interactive failure is answered from memory.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// A cache key: SHA-256 over the parts that decide what the IdP issues.
pub type Key = [u8; 32];

/// A cached downstream token.
pub struct Entry {
    /// `Bearer <token>`, ready to send (marked sensitive). The token is kept
    /// only here, once: it is most of an entry's memory.
    pub authorization: http::HeaderValue,
    /// When the token itself expires (clock ms).
    pub expires_at_ms: u64,
    /// When the background refresh may start (clock ms).
    pub refresh_at_ms: u64,
    /// When the entry stops being served (clock ms).
    pub serve_until_ms: u64,
    refreshing: AtomicBool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// Lifetime rules applied to a fresh token issued at `now_ms`.
    pub fn new(
        issued: Issued,
        now_ms: u64,
        refresh_before: Duration,
    ) -> Result<Self, ExchangeError> {
        let authorization = bearer(&issued.access_token)?;
        let mut lifetime_ms = issued.expires_in.saturating_mul(1000);
        if let Some(exp) = jwt_exp(issued.access_token.expose()) {
            lifetime_ms = lifetime_ms.min(exp.saturating_mul(1000).saturating_sub(now_ms));
        }
        let before_ms = refresh_before.as_millis() as u64;
        let margin_ms = if lifetime_ms > 2 * before_ms {
            before_ms
        } else {
            lifetime_ms / 2
        };
        let serve_ms = lifetime_ms - margin_ms;
        let window_ms = margin_ms.min(serve_ms / 2);
        Ok(Self {
            authorization,
            expires_at_ms: now_ms + lifetime_ms,
            refresh_at_ms: now_ms + serve_ms - window_ms,
            serve_until_ms: now_ms + serve_ms,
            refreshing: AtomicBool::new(false),
        })
    }
}

impl Entry {
    /// The token itself, as the IdP issued it.
    pub fn token(&self) -> &str {
        // `bearer` built the value from a `str` with this prefix.
        std::str::from_utf8(self.authorization.as_bytes())
            .ok()
            .and_then(|v| v.strip_prefix(BEARER))
            .unwrap_or_default()
    }
}

const BEARER: &str = "Bearer ";

/// `Bearer <token>`, marked sensitive.
fn bearer(token: &Secret) -> Result<http::HeaderValue, ExchangeError> {
    let mut authorization = http::HeaderValue::from_str(&format!("{BEARER}{}", token.expose()))
        .map_err(|_| {
            ExchangeError::BadAnswer("the access token has characters a header cannot carry".into())
        })?;
    authorization.set_sensitive(true);
    Ok(authorization)
}

impl Entry {
    /// An entry read back from the shared cache, with the lifetimes (clock
    /// ms) it was given when it was fetched, so every replica serves and
    /// refreshes it on the same schedule.
    pub fn from_stored(
        token: Secret,
        expires_at_ms: u64,
        refresh_at_ms: u64,
        serve_until_ms: u64,
    ) -> Result<Self, ExchangeError> {
        if !(refresh_at_ms <= serve_until_ms && serve_until_ms <= expires_at_ms) {
            return Err(ExchangeError::BadAnswer(
                "stored lifetimes are out of order".into(),
            ));
        }
        Ok(Self {
            authorization: bearer(&token)?,
            expires_at_ms,
            refresh_at_ms,
            serve_until_ms,
            refreshing: AtomicBool::new(false),
        })
    }
}

/// The `exp` of a JWT, read without verification (it is our own IdP's answer,
/// used only to not serve a token past its expiry). `None` for opaque tokens.
fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

struct UntilServed(SharedClock);

impl Expiry<Key, Arc<Entry>> for UntilServed {
    fn expire_after_create(&self, _: &Key, entry: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(Duration::from_millis(
            entry.serve_until_ms.saturating_sub(self.0.now_ms()),
        ))
    }
}

/// What a lookup did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Served from the cache.
    Hit,
    /// Served from the cache; a background refresh was started.
    HitRefreshing,
    /// Fetched (or waited for a concurrent fetch of the same key).
    Miss,
    /// A remembered failure.
    Negative,
}

impl Lookup {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::HitRefreshing => "refresh",
            Lookup::Miss => "miss",
            Lookup::Negative => "negative",
        }
    }
}

/// The token cache.
pub struct TokenCache {
    entries: moka::future::Cache<Key, Arc<Entry>>,
    negative: moka::sync::Cache<Key, ExchangeError>,
    refresh_before: Duration,
    clock: SharedClock,
}

impl TokenCache {
    /// A cache of at most `max_entries` tokens.
    pub fn new(max_entries: u64, refresh_before: Duration, clock: SharedClock) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(UntilServed(clock.clone()))
                .build(),
            negative: moka::sync::Cache::builder()
                .max_capacity(max_entries.clamp(16, 10_000))
                .time_to_live(NEGATIVE_TTL)
                .build(),
            refresh_before,
            clock,
        }
    }

    /// The cached token for `key` when it can be served as it is: present,
    /// not past its life, and not in its refresh window (or already being
    /// refreshed). The hot path: no allocation, no fetch closure to build.
    pub async fn get_fresh(&self, key: &Key) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key).await?;
        let now = self.clock.now_ms();
        let fresh = now < entry.serve_until_ms
            && (now < entry.refresh_at_ms || entry.refreshing.load(Ordering::Acquire));
        fresh.then_some(entry)
    }

    /// The token for `key`: cached, or fetched once however many callers ask
    /// at the same time. Inside the refresh window the cached token is returned
    /// and `fetch` runs once more in the background. With `shared`, a miss is
    /// looked up there before `fetch` runs, and fetched tokens are written there.
    pub async fn get<F, Fut>(
        &self,
        key: Key,
        fetch: F,
        shared: Option<&Arc<SharedCache>>,
    ) -> (Result<Arc<Entry>, ExchangeError>, Lookup)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Issued, ExchangeError>> + Send + 'static,
    {
        if let Some(error) = self.negative.get(&key) {
            return (Err(error), Lookup::Negative);
        }
        let now = self.clock.now_ms();
        if let Some(entry) = self.entries.get(&key).await {
            if now < entry.serve_until_ms {
                if now >= entry.refresh_at_ms && !entry.refreshing.swap(true, Ordering::AcqRel) {
                    self.refresh_in_background(key, entry.clone(), fetch, shared.cloned());
                    return (Ok(entry), Lookup::HitRefreshing);
                }
                return (Ok(entry), Lookup::Hit);
            }
            self.entries.invalidate(&key).await;
        }
        let fetch_entry = fetch_entry(fetch, self.clock.clone(), self.refresh_before);
        let shared = shared.cloned();
        let result = self
            .entries
            .try_get_with(key, async move {
                let entry = match shared {
                    Some(shared) => shared.load_or_fetch(&key, fetch_entry).await?,
                    None => fetch_entry().await?,
                };
                Ok::<_, ExchangeError>(Arc::new(entry))
            })
            .await
            .map_err(|shared: Arc<ExchangeError>| (*shared).clone());
        if let Err(error) = &result
            && error.is_cacheable_failure()
        {
            self.negative.insert(key, error.clone());
        }
        (result, Lookup::Miss)
    }

    fn refresh_in_background<F, Fut>(
        &self,
        key: Key,
        old: Arc<Entry>,
        fetch: F,
        shared: Option<Arc<SharedCache>>,
    ) where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Issued, ExchangeError>> + Send + 'static,
    {
        let entries = self.entries.clone();
        let fetch_entry = fetch_entry(fetch, self.clock.clone(), self.refresh_before);
        tokio::spawn(async move {
            let refreshed = match shared {
                Some(shared) => shared.refresh(&key, fetch_entry).await,
                None => fetch_entry().await,
            };
            match refreshed {
                Ok(fresh) => {
                    entries.insert(key, Arc::new(fresh)).await;
                }
                Err(error) => {
                    // The old token is still served until its entry ends; the
                    // next hit in the window tries again.
                    tracing::warn!(error = %error, "background token refresh failed");
                    old.refreshing.store(false, Ordering::Release);
                }
            }
        });
    }
}

/// `fetch`, with the lifetime rules applied to what it issues.
fn fetch_entry<F, Fut>(
    fetch: F,
    clock: SharedClock,
    before: Duration,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<Entry, ExchangeError>> + Send>>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Issued, ExchangeError>> + Send + 'static,
{
    move || {
        Box::pin(async move {
            let issued = fetch().await?;
            Entry::new(issued, clock.now_ms(), before)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(expires_in: u64) -> Issued {
        Issued {
            access_token: Secret::new("opaque".to_owned()),
            expires_in,
        }
    }

    #[test]
    fn lifetime_rules() {
        let five_min = Duration::from_secs(300);
        let e = Entry::new(issued(3600), 0, five_min).expect("entry");
        assert_eq!(e.serve_until_ms, 3_300_000);
        assert_eq!(e.refresh_at_ms, 3_000_000);
        assert_eq!(e.expires_at_ms, 3_600_000);
        // Short token: half-life.
        let e = Entry::new(issued(400), 0, five_min).expect("entry");
        assert_eq!(e.serve_until_ms, 200_000);
        assert_eq!(e.refresh_at_ms, 100_000);
        // A JWT whose exp is sooner than expires_in wins.
        let claims = URL_SAFE_NO_PAD.encode(br#"{"exp":1000}"#);
        let jwt = Issued {
            access_token: Secret::new(format!("e30.{claims}.sig")),
            expires_in: 3600,
        };
        let e = Entry::new(jwt, 400_000, five_min).expect("entry");
        assert_eq!(e.expires_at_ms, 1_000_000);
        assert_eq!(e.serve_until_ms, 700_000);
    }
}
