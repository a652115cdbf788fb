//! The shared L2 token cache: Redis behind the in-memory (moka) cache, so the
//! replicas of one API exchange each user's token once between them instead
//! of once each (N replicas would otherwise mean N times the IdP traffic, and
//! Entra throttles).
//!
//! What Redis holds, and so what anyone who can read it sees:
//!
//! - keys: `{key_prefix}{hex}`, where `hex` is SHA-256 over oboe's own identity
//!   and the in-memory cache key (itself a SHA-256 digest), so never a token, a
//!   user id or a scope, and two deployments with different app registrations
//!   never read each other's entries even when they share a Redis and a prefix.
//!   On a Redis Cluster `hex` is a hash tag (`{key_prefix}{<hex>}` with literal
//!   braces), so a key and its lock share a slot and go in one pipeline;
//! - values: `1 | len(key id) | key id | 96-bit random nonce | AES-256-GCM
//!   ciphertext and tag` of the token and its three lifetimes (absolute Unix
//!   ms). The associated data is the Redis key and that header, so a value
//!   moved to another key, or given another key id, fails to decrypt;
//! - locks: `{key_prefix}lock:{hex}` holding a random value, for a few seconds.
//!
//! A value that does not decrypt or parse is a miss (counted, logged at debug,
//! never served); the next write overwrites it. Redis never fails a request:
//! every command has a short timeout, failures open a circuit breaker that
//! skips Redis for a while, and then one request probes it again.
//!
//! Cross-replica single flight: after a miss, a replica takes the lock
//! (`SET NX PX`) and re-reads in the same round trip; the winner exchanges and
//! writes, the others poll briefly for its value and exchange on their own if
//! it does not come in time. The lock is released only by its owner (compared
//! by value in a Lua script).
//!
//! How Redis is reached (one server, Sentinel, Cluster) is [`connection`]'s
//! business; every command here runs the same way on all three.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use self::connection::Connection;
use super::ExchangeError;
use super::cache::{Entry, Key};
use super::credential::{CredentialError, Secret, read_secret};
use crate::clock::SharedClock;
use crate::config::{self, SecretSource};
use crate::telemetry::{Metrics, OutcomeLabel, ReasonLabel};

mod connection;

/// How long a lock holder may take before the lock expires on its own (a
/// replica that dies while exchanging does not block the key for longer).
const LOCK_TTL: Duration = Duration::from_secs(5);
/// How long a replica that lost the lock waits for the winner's value before
/// exchanging on its own.
const LOCK_WAIT: Duration = Duration::from_millis(1500);
/// Interval between reads while waiting for the winner's value.
const POLL_INTERVAL: Duration = Duration::from_millis(15);
/// Consecutive failed Redis commands that open the breaker.
const BREAKER_FAILURES: u32 = 3;
/// How long the breaker stays open before one request probes Redis again.
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(2);
/// Format version of a stored value.
const VALUE_VERSION: u8 = 1;
/// Plaintext: three u64 lifetimes, then the token.
const LIFETIMES_LEN: usize = 24;

/// Deletes the lock only while it still holds our value, so a holder whose
/// lock expired cannot release the next holder's.
const RELEASE_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Why the shared cache could not be set up. Names key paths and sources,
/// never secret values.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {detail}")]
pub struct SharedSetupError {
    /// Key path in the route file.
    pub path: String,
    /// What is wrong.
    pub detail: String,
}

impl SharedSetupError {
    fn new(path: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            detail: detail.into(),
        }
    }
}

/// The AES-256-GCM keys: the first encrypts, all decrypt.
struct Keys {
    current: String,
    by_id: HashMap<String, LessSafeKey>,
}

impl Keys {
    fn load(settings: &[config::EncryptionKey]) -> Result<Self, SharedSetupError> {
        let mut by_id = HashMap::new();
        for (i, k) in settings.iter().enumerate() {
            let path = format!("cache.shared.encryption_keys[{i}].key");
            let secret = read_source(&path, &k.key)?;
            let bytes = STANDARD
                .decode(secret.expose().trim())
                .map_err(|_| SharedSetupError::new(&path, "not base64"))?;
            if bytes.len() != 32 {
                return Err(SharedSetupError::new(
                    &path,
                    format!(
                        "an AES-256 key is 32 bytes, this one is {} (make one with `openssl rand -base64 32`)",
                        bytes.len()
                    ),
                ));
            }
            let key = UnboundKey::new(&AES_256_GCM, &bytes)
                .map_err(|_| SharedSetupError::new(&path, "not a usable AES-256 key"))?;
            by_id.insert(k.id.clone(), LessSafeKey::new(key));
        }
        let current = settings
            .first()
            .map(|k| k.id.clone())
            .ok_or_else(|| SharedSetupError::new("cache.shared.encryption_keys", "empty"))?;
        Ok(Self { current, by_id })
    }

    /// The stored form of `entry`; `None` only if encryption fails.
    fn seal(&self, redis_key: &str, entry: &Entry) -> Option<Vec<u8>> {
        let key = self.by_id.get(&self.current)?;
        let id = self.current.as_bytes();
        let mut out =
            Vec::with_capacity(2 + id.len() + NONCE_LEN + LIFETIMES_LEN + entry.token().len() + 16);
        out.push(VALUE_VERSION);
        out.push(u8::try_from(id.len()).ok()?);
        out.extend_from_slice(id);
        let header_len = out.len();
        let aad = associated_data(redis_key, &out);

        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut sealed = Vec::with_capacity(LIFETIMES_LEN + entry.token().len() + 16);
        sealed.extend_from_slice(&entry.expires_at_ms.to_be_bytes());
        sealed.extend_from_slice(&entry.refresh_at_ms.to_be_bytes());
        sealed.extend_from_slice(&entry.serve_until_ms.to_be_bytes());
        sealed.extend_from_slice(entry.token().as_bytes());
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_slice()),
            &mut sealed,
        )
        .ok()?;
        debug_assert_eq!(out.len(), header_len);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn open(&self, redis_key: &str, value: &[u8]) -> Result<Entry, &'static str> {
        let (&version, rest) = value.split_first().ok_or("undecryptable")?;
        let (&id_len, rest) = rest.split_first().ok_or("undecryptable")?;
        if version != VALUE_VERSION || rest.len() < usize::from(id_len) + NONCE_LEN {
            return Err("undecryptable");
        }
        let (id, rest) = rest.split_at(usize::from(id_len));
        let key = std::str::from_utf8(id)
            .ok()
            .and_then(|id| self.by_id.get(id))
            .ok_or("unknown_key")?;
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "undecryptable")?;
        let aad = associated_data(redis_key, &value[..2 + usize::from(id_len)]);
        let mut buf = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(aad.as_slice()), &mut buf)
            .map_err(|_| "undecryptable")?;
        if plain.len() <= LIFETIMES_LEN {
            return Err("undecryptable");
        }
        let (lifetimes, token) = plain.split_at(LIFETIMES_LEN);
        let at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&lifetimes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        let token = std::str::from_utf8(token).map_err(|_| "undecryptable")?;
        Entry::from_stored(Secret::new(token.to_owned()), at(0), at(1), at(2))
            .map_err(|_| "undecryptable")
    }
}

/// Reads a secret for the shared cache, naming the key path on failure.
fn read_source(path: &str, source: &SecretSource) -> Result<Secret, SharedSetupError> {
    read_secret(source).map_err(|e| {
        let detail = match (e, source) {
            (CredentialError::Env(_), SecretSource::Env(name)) => {
                format!("environment variable {name} is unset or empty")
            }
            (CredentialError::File { path, detail, .. }, _)
            | (CredentialError::Invalid { path, detail, .. }, _) => {
                format!("{}: {detail}", path.display())
            }
            (other, _) => other.to_string(),
        };
        SharedSetupError::new(path, detail)
    })
}

/// What a read of the shared cache must find to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Anything still served (an in-memory miss).
    Servable,
    /// An entry not yet in its refresh window (a background refresh: another
    /// replica may have refreshed already).
    Fresh,
}

/// The outcome of one read.
enum Read {
    Hit(Entry),
    Miss,
    /// Redis failed; go on without it.
    Failed,
}

/// State of the circuit breaker.
#[derive(Debug, Clone, Copy)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// Skips Redis after [`BREAKER_FAILURES`] consecutive failures, for
/// [`BREAKER_OPEN_FOR`]; then lets one lookup probe it. Real time, not the
/// injectable clock: it is about Redis's availability, not token lifetimes.
struct Breaker {
    state: Mutex<BreakerState>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Breaker {
    fn new(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.set(0);
        Self {
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            gauge,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BreakerState) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut state);
        self.gauge.set(match *state {
            BreakerState::Closed { .. } => 0,
            BreakerState::Open { .. } => 1,
            BreakerState::HalfOpen { .. } => 2,
        });
        out
    }

    /// May this lookup use Redis? While open: no, until the pause is over,
    /// when the first caller becomes the probe. A probe that never reports
    /// (its request was cancelled) is replaced after the pause.
    fn allow(&self) -> bool {
        let now = Instant::now();
        self.with(|state| match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                *state = BreakerState::HalfOpen { since: now };
                true
            }
            BreakerState::HalfOpen { since } if now >= since + BREAKER_OPEN_FOR => {
                *state = BreakerState::HalfOpen { since: now };
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => false,
        })
    }

    fn success(&self) {
        let closed = self.with(|state| {
            let was_closed = matches!(state, BreakerState::Closed { .. });
            *state = BreakerState::Closed { failures: 0 };
            !was_closed
        });
        if closed {
            tracing::info!("shared token cache: Redis answers again; using it");
        }
    }

    fn failure(&self) {
        let opened = self.with(|state| match *state {
            BreakerState::Closed { failures } if failures + 1 < BREAKER_FAILURES => {
                *state = BreakerState::Closed {
                    failures: failures + 1,
                };
                false
            }
            BreakerState::Closed { .. } | BreakerState::HalfOpen { .. } => {
                *state = BreakerState::Open {
                    until: Instant::now() + BREAKER_OPEN_FOR,
                };
                true
            }
            BreakerState::Open { .. } => false,
        });
        if opened {
            tracing::warn!(
                retry_in = ?BREAKER_OPEN_FOR,
                "shared token cache: Redis is failing; going on without it (in-memory cache and IdP)"
            );
        }
    }
}

/// The shared (Redis) token cache of one exchanger.
pub struct SharedCache {
    settings: config::SharedCache,
    conn: Connection,
    /// Whether the digest in a key is a Redis Cluster hash tag.
    hash_tag: bool,
    keys: Keys,
    /// Digest of oboe's identity, mixed into every Redis key.
    namespace: [u8; 32],
    breaker: Breaker,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("mode", &self.settings.mode)
            .field("urls", &self.settings.urls)
            .field("encrypting_with", &self.keys.current)
            .finish_non_exhaustive()
    }
}

impl SharedCache {
    /// Loads the keys and credentials and creates the (lazy) connection; must
    /// run inside the Tokio runtime. `namespace` names oboe's identity (client
    /// id and authority), so deployments of different apps never share entries.
    pub fn new(
        settings: &config::SharedCache,
        namespace: &str,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SharedSetupError> {
        let keys = Keys::load(&settings.encryption_keys)?;
        let (conn, url) = connection::connect(settings)?;
        let mut ns = [0u8; 32];
        ns.copy_from_slice(
            digest::digest(
                &digest::SHA256,
                format!("oboe-shared-cache-v1\n{namespace}").as_bytes(),
            )
            .as_ref(),
        );
        let cache = Self {
            settings: settings.clone(),
            conn,
            hash_tag: settings.mode == config::RedisMode::Cluster,
            keys,
            namespace: ns,
            breaker: Breaker::new(metrics.shared_cache_breaker.clone()),
            clock,
            metrics,
        };
        tracing::info!(
            mode = cache.mode_name(),
            url = %url,
            encrypting_with = %cache.keys.current,
            decrypting_with = cache.keys.by_id.len(),
            "shared token cache: Redis"
        );
        Ok(cache)
    }

    /// The settings it was made from (a reload keeps it when they are equal).
    pub fn settings(&self) -> &config::SharedCache {
        &self.settings
    }

    /// Connects in the background, so the first request does not pay for it.
    pub fn warm_up(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.command::<String>(&redis::cmd("PING")).await;
        });
    }

    /// The entry for `key` after an in-memory miss: from Redis when another
    /// replica (or this one, before a restart) has it; else from `fetch`,
    /// with at most one replica fetching at a time, and written to Redis.
    pub async fn load_or_fetch<F, Fut>(&self, key: &Key, fetch: F) -> Result<Entry, ExchangeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, ExchangeError>>,
    {
        self.lookup(key, Want::Servable, fetch).await
    }

    /// A background refresh: takes another replica's refreshed entry when
    /// there is one, else refreshes (once across replicas) and writes it.
    pub async fn refresh<F, Fut>(&self, key: &Key, fetch: F) -> Result<Entry, ExchangeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, ExchangeError>>,
    {
        self.lookup(key, Want::Fresh, fetch).await
    }

    async fn lookup<F, Fut>(&self, key: &Key, want: Want, fetch: F) -> Result<Entry, ExchangeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, ExchangeError>>,
    {
        if !self.breaker.allow() {
            self.count("skipped");
            return fetch().await;
        }
        let redis_key = self.redis_key(key);
        match self.read(&redis_key, want).await {
            Read::Hit(entry) => {
                self.count("hit");
                return Ok(entry);
            }
            Read::Failed => return fetch().await,
            Read::Miss => self.count("miss"),
        }
        self.single_flight(&redis_key, want, fetch).await
    }

    /// After a miss: take the lock and fetch, or wait for the holder's value.
    async fn single_flight<F, Fut>(
        &self,
        redis_key: &str,
        want: Want,
        fetch: F,
    ) -> Result<Entry, ExchangeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, ExchangeError>>,
    {
        let lock_key = self.lock_key(redis_key);
        let owner = random_hex::<16>();
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            // Take the lock and read again in one round trip: the previous
            // holder may have written between our read and now.
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&lock_key)
                .arg(&owner)
                .arg("NX")
                .arg("PX")
                .arg(LOCK_TTL.as_millis() as u64)
                .cmd("GET")
                .arg(redis_key);
            let Some((won, value)) = self
                .command::<(Option<String>, Option<Vec<u8>>)>(&pipe)
                .await
            else {
                return self.fetch_and_store(redis_key, None, fetch).await;
            };
            let won = won.is_some();
            if let Some(entry) = value.and_then(|v| self.decode(redis_key, &v, want)) {
                if won {
                    self.release(&lock_key, &owner).await;
                }
                self.count("waited");
                return Ok(entry);
            }
            if won {
                return self
                    .fetch_and_store(redis_key, Some((&lock_key, &owner)), fetch)
                    .await;
            }
            // Another replica is fetching: wait for its value.
            loop {
                if Instant::now() >= deadline {
                    self.count("wait_timeout");
                    return self.fetch_and_store(redis_key, None, fetch).await;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(redis_key).cmd("EXISTS").arg(&lock_key);
                let Some((value, locked)) = self.command::<(Option<Vec<u8>>, bool)>(&pipe).await
                else {
                    return self.fetch_and_store(redis_key, None, fetch).await;
                };
                if let Some(entry) = value.and_then(|v| self.decode(redis_key, &v, want)) {
                    self.count("waited");
                    return Ok(entry);
                }
                if !locked {
                    // The holder gave up (its exchange failed) or its lock
                    // expired: compete for the lock again.
                    break;
                }
            }
        }
    }

    async fn fetch_and_store<F, Fut>(
        &self,
        redis_key: &str,
        lock: Option<(&str, &str)>,
        fetch: F,
    ) -> Result<Entry, ExchangeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, ExchangeError>>,
    {
        let result = fetch().await;
        if let Ok(entry) = &result {
            self.write(redis_key, entry).await;
        }
        if let Some((lock_key, owner)) = lock {
            self.release(lock_key, owner).await;
        }
        result
    }

    async fn read(&self, redis_key: &str, want: Want) -> Read {
        match self
            .command::<Option<Vec<u8>>>(redis::cmd("GET").arg(redis_key))
            .await
        {
            None => Read::Failed,
            Some(None) => Read::Miss,
            Some(Some(value)) => match self.decode(redis_key, &value, want) {
                Some(entry) => Read::Hit(entry),
                None => Read::Miss,
            },
        }
    }

    /// Writes `entry` with a TTL of its remaining life, unless the breaker is open.
    async fn write(&self, redis_key: &str, entry: &Entry) {
        let ttl_ms = entry.serve_until_ms.saturating_sub(self.clock.now_ms());
        if ttl_ms == 0 || !self.breaker.allow() {
            return;
        }
        let Some(value) = self.keys.seal(redis_key, entry) else {
            return;
        };
        let _ = self
            .command::<()>(
                redis::cmd("SET")
                    .arg(redis_key)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms),
            )
            .await;
    }

    async fn release(&self, lock_key: &str, owner: &str) {
        let _ = self
            .command::<i64>(
                redis::cmd("EVAL")
                    .arg(RELEASE_SCRIPT)
                    .arg(1)
                    .arg(lock_key)
                    .arg(owner),
            )
            .await;
    }

    /// Runs one command or pipeline within the timeout; `None` when Redis
    /// failed (counted, logged at debug, reported to the breaker).
    async fn command<T: redis::FromRedisValue>(&self, cmd: &(impl Runnable + ?Sized)) -> Option<T> {
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let result = tokio::time::timeout(self.settings.timeout, cmd.run::<T>(&mut conn)).await;
        self.metrics
            .shared_cache_duration
            .observe(started.elapsed().as_secs_f64());
        let reason = match result {
            Ok(Ok(value)) => {
                self.breaker.success();
                return Some(value);
            }
            Err(_) => "timeout",
            Ok(Err(e)) if e.is_timeout() => "timeout",
            Ok(Err(e)) if connection::is_unreachable(&e) => {
                tracing::debug!(error = %e, "shared token cache: Redis unreachable");
                "connection"
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "shared token cache: Redis refused a command");
                "server"
            }
        };
        self.error(reason);
        self.breaker.failure();
        None
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .shared_cache
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    fn error(&self, reason: &'static str) {
        self.metrics
            .shared_cache_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// `{prefix}{hex(SHA-256(namespace, in-memory key))}`; on a cluster the
    /// hex digest is wrapped in braces, a hash tag: Redis Cluster then places
    /// the key by the digest alone, and its lock (the same digest) lands in
    /// the same slot, so both go in one pipeline (no CROSSSLOT error).
    pub fn redis_key(&self, key: &Key) -> String {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&self.namespace);
        ctx.update(key);
        let mut out = String::with_capacity(self.settings.key_prefix.len() + 66);
        out.push_str(&self.settings.key_prefix);
        if self.hash_tag {
            out.push('{');
        }
        push_hex(&mut out, ctx.finish().as_ref());
        if self.hash_tag {
            out.push('}');
        }
        out
    }

    /// The configured `mode`, for the log.
    fn mode_name(&self) -> &'static str {
        match self.settings.mode {
            config::RedisMode::Standalone => "standalone",
            config::RedisMode::Sentinel(_) => "sentinel",
            config::RedisMode::Cluster => "cluster",
        }
    }

    /// `{prefix}lock:{digest}`, with the digest (hash tag included) of `redis_key`.
    fn lock_key(&self, redis_key: &str) -> String {
        let digest = &redis_key[self.settings.key_prefix.len()..];
        format!("{}lock:{digest}", self.settings.key_prefix)
    }

    /// The entry in a stored value, if it decrypts, parses and is what `want`
    /// asks for; anything else is a miss.
    fn decode(&self, redis_key: &str, value: &[u8], want: Want) -> Option<Entry> {
        let entry = match self.keys.open(redis_key, value) {
            Ok(entry) => entry,
            Err(reason) => {
                tracing::debug!(
                    reason,
                    "shared token cache: a stored value is unusable; treated as a miss"
                );
                self.error(reason);
                return None;
            }
        };
        let now = self.clock.now_ms();
        let usable = match want {
            Want::Servable => now < entry.serve_until_ms,
            Want::Fresh => now < entry.refresh_at_ms,
        };
        usable.then_some(entry)
    }
}

/// The Redis key, then the value's header: a value only opens under the key
/// it was written to, with the key id it names.
fn associated_data(redis_key: &str, header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(redis_key.len() + 1 + header.len());
    aad.extend_from_slice(redis_key.as_bytes());
    aad.push(0);
    aad.extend_from_slice(header);
    aad
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    // A failed RNG leaves zeros: the lock value is then shared by such
    // replicas, which at worst releases another's lock early (one more fetch).
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    let mut out = String::with_capacity(2 * N);
    push_hex(&mut out, &bytes);
    out
}

/// A command or a pipeline.
trait Runnable: Sync {
    fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut Connection,
    ) -> impl Future<Output = redis::RedisResult<T>> + Send;
}

impl Runnable for redis::Cmd {
    fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut Connection,
    ) -> impl Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

impl Runnable for redis::Pipeline {
    fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut Connection,
    ) -> impl Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ids: &[(&str, u8)]) -> Keys {
        let by_id = ids
            .iter()
            .map(|(id, byte)| {
                let key = UnboundKey::new(&AES_256_GCM, &[*byte; 32]).expect("32-byte key");
                ((*id).to_owned(), LessSafeKey::new(key))
            })
            .collect();
        Keys {
            current: ids[0].0.to_owned(),
            by_id,
        }
    }

    fn entry(token: &str) -> Entry {
        Entry::from_stored(Secret::new(token.to_owned()), 3_000, 2_000, 2_500).expect("entry")
    }

    const KEY: &str = "oboe:00ff";

    #[test]
    fn a_sealed_entry_opens_with_its_lifetimes_and_shows_nothing_in_clear() {
        let keys = keys(&[("k1", 1)]);
        let value = keys
            .seal(KEY, &entry("eyJhbGciOi.secret-token"))
            .expect("seal");
        assert_eq!(&value[..4], b"\x01\x02k1", "version, key id length, key id");
        assert!(!value.windows(3).any(|w| w == b"eyJ"));
        let back = keys.open(KEY, &value).expect("open");
        assert_eq!(back.token(), "eyJhbGciOi.secret-token");
        assert_eq!(
            (back.expires_at_ms, back.refresh_at_ms, back.serve_until_ms),
            (3_000, 2_000, 2_500)
        );
        assert_ne!(
            keys.seal(KEY, &entry("t")),
            keys.seal(KEY, &entry("t")),
            "a fresh nonce for every value"
        );
    }

    #[test]
    fn a_value_opens_only_under_its_own_key_and_unaltered() {
        let keys = keys(&[("k1", 1)]);
        let value = keys.seal(KEY, &entry("token")).expect("seal");
        assert_eq!(keys.open("oboe:00fe", &value).err(), Some("undecryptable"));
        for i in 0..value.len() {
            let mut tampered = value.clone();
            tampered[i] ^= 0x01;
            assert!(keys.open(KEY, &tampered).is_err(), "byte {i} flipped");
        }
        assert!(keys.open(KEY, &value[..value.len() - 1]).is_err());
        assert!(keys.open(KEY, b"").is_err());
    }

    #[test]
    fn rotation_reads_old_values_and_writes_with_the_first_key() {
        let old = keys(&[("k1", 1)]);
        let rotated = keys(&[("k2", 2), ("k1", 1)]);
        let written_before = old.seal(KEY, &entry("before")).expect("seal");
        assert_eq!(
            rotated
                .open(KEY, &written_before)
                .expect("old value")
                .token(),
            "before"
        );
        let written_after = rotated.seal(KEY, &entry("after")).expect("seal");
        assert_eq!(&written_after[..4], b"\x01\x02k2");
        assert_eq!(old.open(KEY, &written_after).err(), Some("unknown_key"));
        // A value relabelled with another key id does not open either.
        let mut relabelled = written_after.clone();
        relabelled[3] = b'1';
        assert_eq!(rotated.open(KEY, &relabelled).err(), Some("undecryptable"));
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_probes_once() {
        let breaker = Breaker::new(Default::default());
        assert!(breaker.allow());
        breaker.failure();
        breaker.failure();
        breaker.success();
        breaker.failure();
        breaker.failure();
        assert!(breaker.allow(), "two failures in a row keep it closed");
        breaker.failure();
        assert!(!breaker.allow(), "the third opens it");
        assert_eq!(breaker.gauge.get(), 1);
        // Pretend the pause is over.
        breaker.with(|s| {
            *s = BreakerState::Open {
                until: Instant::now(),
            }
        });
        assert!(breaker.allow(), "one probe");
        assert!(!breaker.allow(), "only one probe at a time");
        assert_eq!(breaker.gauge.get(), 2);
        breaker.failure();
        assert!(!breaker.allow(), "a failed probe opens it again");
        breaker.with(|s| {
            *s = BreakerState::Open {
                until: Instant::now(),
            }
        });
        assert!(breaker.allow());
        breaker.success();
        assert!(breaker.allow() && breaker.allow());
        assert_eq!(breaker.gauge.get(), 0);
    }
}
