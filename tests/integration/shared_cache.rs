//! The shared (Redis) token cache: two or more real oboes against one real
//! `redis-server` (Debian's, started here on a free port and killed on drop)
//! and the dev IdP, which counts the token requests that reach it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use oboe::dev::idp::{DEV_TENANT, DEV_USER_OID, DevIdp, Mint};

use crate::fixtures::*;
use crate::harness::*;

const GRAPH: &str = "https://graph.microsoft.com/User.Read";
/// `key_prefix` of every route file here.
pub const PREFIX: &str = "test:";

// ---------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------

/// Installs Debian's `redis-server` (and with it `redis-cli`, package
/// `redis-tools`) when either is not on PATH, once per test process, so
/// `cargo test` passes on a fresh machine.
pub fn ensure_redis_server() {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    if *installed {
        return;
    }
    let present = || {
        ["redis-server", "redis-cli"].iter().all(|program| {
            Command::new(program)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    };
    if !present() {
        for args in [
            &["update", "-qq"][..],
            &["install", "-y", "-qq", "redis-server", "redis-tools"],
        ] {
            let status = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .status()
                .expect("run apt-get to install redis-server (scripts/test-deps.sh does too)");
            assert!(status.success(), "apt-get {args:?} failed: {status}");
        }
        assert!(present(), "redis-server or redis-cli is still not on PATH");
    }
    *installed = true;
}

/// A `redis-server` on a loopback port, with no persistence.
pub struct Redis {
    /// The port it listens on.
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    pub async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    /// Starts one with `args` before the port and persistence options (a
    /// configuration file, `--sentinel`, cluster options).
    pub async fn start_with(args: Vec<String>) -> Self {
        ensure_redis_server();
        for _ in 0..5 {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
                l.local_addr().expect("address").port()
            };
            let mut redis = Self {
                port,
                args: args.clone(),
                child: None,
            };
            if redis.spawn().await {
                return redis;
            }
        }
        panic!("could not start redis-server on a free port after 5 attempts");
    }

    /// Starts the server on `self.port`; false if it exited (port taken).
    async fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(&self.args)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if child.try_wait().expect("poll redis-server").is_some() {
                return false;
            }
            if let Ok(mut conn) = self.try_conn().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not answer PING on port {}", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    async fn try_conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.try_conn().await.expect("connect to redis-server")
    }

    /// Kills the server (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    async fn restart(&mut self) {
        assert!(self.spawn().await, "port {} was taken meanwhile", self.port);
    }

    /// Every value key oboe wrote (locks excluded), with its value.
    pub async fn entries(&self) -> Vec<(String, Vec<u8>)> {
        let mut conn = self.conn().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            if key.starts_with(&format!("{PREFIX}lock:")) {
                continue;
            }
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("GET");
            if let Some(value) = value {
                out.push((key, value));
            }
        }
        out
    }

    async fn pttl(&self, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut self.conn().await)
            .await
            .expect("PTTL")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The key id in a stored value's clear header (`1 | len | id | ...`).
pub fn key_id(value: &[u8]) -> String {
    assert_eq!(value[0], 1, "format version");
    let len = usize::from(value[1]);
    String::from_utf8(value[2..2 + len].to_vec()).expect("UTF-8 key id")
}

// ---------------------------------------------------------------------------
// oboe with a shared cache
// ---------------------------------------------------------------------------

/// Encryption key files (base64 of 32 bytes) and the client secret.
pub struct Secrets {
    dir: tempfile::TempDir,
    client_secret: String,
}

impl Secrets {
    pub fn new() -> Self {
        let (dir, client_secret) = secret_file();
        Self { dir, client_secret }
    }

    /// Writes key `id` (32 bytes of `byte`) and returns its path.
    fn key(&self, id: &str, byte: u8) -> String {
        let path = self.dir.path().join(format!("key-{id}"));
        std::fs::write(&path, format!("{}\n", STANDARD.encode([byte; 32]))).expect("write key");
        path.to_str().expect("UTF-8 path").to_owned()
    }
}

/// An OBO route file with `cache.shared` on `url`, the keys `(id, byte)`
/// (the first encrypts), and `extra` lines under `shared:`.
fn route_file(
    idp: &DevIdp,
    secrets: &Secrets,
    url: &str,
    keys: &[(&str, u8)],
    extra: &str,
    upstream: &Upstream,
) -> String {
    shared_route_file(
        idp,
        secrets,
        &format!("    url: {url}\n{extra}"),
        keys,
        upstream,
    )
}

/// An OBO route file whose `cache.shared` holds `where_lines` (where Redis
/// is: `url`/`urls`, `mode`, ..., indented by four spaces), the keys
/// `(id, byte)` (the first encrypts) and short timeouts.
pub fn shared_route_file(
    idp: &DevIdp,
    secrets: &Secrets,
    where_lines: &str,
    keys: &[(&str, u8)],
    upstream: &Upstream,
) -> String {
    let keys: String = keys
        .iter()
        .map(|(id, byte)| {
            format!(
                "      - {{ id: {id}, key: {{ file: {} }} }}\n",
                secrets.key(id, *byte)
            )
        })
        .collect();
    format!(
        "{}cache:\n  shared:\n{where_lines}    key_prefix: \"{PREFIX}\"\n    timeout: 250ms\n    connect_timeout: 1s\n    encryption_keys:\n{keys}routes:\n{}",
        entra_identity(
            idp,
            DEV_TENANT,
            &format!("client_secret: {{ file: {} }}", secrets.client_secret)
        ),
        route(
            "graph",
            "/graph/",
            &upstream.url("/"),
            "{ required: true }",
            &format!("{{ grant: on_behalf_of, scopes: [{GRAPH}] }}")
        ),
    )
}

/// The dev IdP, a Redis, an echo upstream and the route file the replicas share.
struct Cluster {
    idp: DevIdp,
    redis: Redis,
    secrets: Secrets,
    echo: Upstream,
    yaml: String,
}

impl Cluster {
    async fn new() -> Self {
        Self::with_keys(&[("k1", 1)]).await
    }

    async fn with_keys(keys: &[(&str, u8)]) -> Self {
        let idp = idp().await;
        let redis = Redis::start().await;
        let secrets = Secrets::new();
        let echo = Upstream::echo().await;
        let yaml = route_file(&idp, &secrets, &redis.url(), keys, "", &echo);
        Self {
            idp,
            redis,
            secrets,
            echo,
            yaml,
        }
    }

    async fn replica(&self) -> Oboe {
        Oboe::start(&self.yaml).await
    }

    /// The same route file with other keys.
    fn yaml_with_keys(&self, keys: &[(&str, u8)]) -> String {
        route_file(
            &self.idp,
            &self.secrets,
            &self.redis.url(),
            keys,
            "",
            &self.echo,
        )
    }

    fn user(&self, i: usize) -> String {
        self.idp.mint(&user(&oid(i)))
    }

    fn idp_calls(&self) -> u64 {
        self.idp.counters().token
    }
}

pub fn oid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

pub fn user(oid: &str) -> Mint {
    let mut mint = user_mint();
    mint.oid = oid.to_owned();
    mint
}

pub fn upstream_authorization(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["headers"]["authorization"][0]
        .as_str()
        .expect("the upstream got Authorization")
        .to_owned()
}

/// `GET /graph/me` through `oboe` as the caller, returning what went upstream.
pub async fn me(oboe: &Oboe, caller: &str) -> String {
    upstream_authorization(&call(&oboe.proxy_url("/graph/me"), caller).await)
}

// ---------------------------------------------------------------------------
// the tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn two_replicas_make_one_idp_call_for_200_concurrent_requests_of_one_user() {
    let c = Cluster::new().await;
    let (a, b) = (c.replica().await, c.replica().await);
    let caller = c.user(1);
    let urls = [a.proxy_url("/graph/me"), b.proxy_url("/graph/me")];
    let requests = (0..200).map(|i| {
        let (url, caller) = (urls[i % 2].clone(), caller.clone());
        tokio::spawn(async move { call(&url, &caller).await })
    });
    let mut tokens = std::collections::HashSet::new();
    for reply in futures_util::future::join_all(requests).await {
        tokens.insert(upstream_authorization(&reply.expect("task")));
    }
    assert_eq!(c.idp_calls(), 1, "one IdP request for both replicas");
    assert_eq!(tokens.len(), 1, "every request got the same token");
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    let waited = metric(&ma, "oboe_shared_cache_total{outcome=\"waited\"}")
        + metric(&mb, "oboe_shared_cache_total{outcome=\"waited\"}")
        + metric(&ma, "oboe_shared_cache_total{outcome=\"hit\"}")
        + metric(&mb, "oboe_shared_cache_total{outcome=\"hit\"}");
    assert_eq!(
        waited, 1.0,
        "the other replica took the winner's token\n{ma}\n{mb}"
    );
}

#[tokio::test]
async fn fifty_users_across_two_replicas_cost_fifty_idp_calls_not_a_hundred() {
    let c = Cluster::new().await;
    let (a, b) = (c.replica().await, c.replica().await);
    let mut requests = Vec::new();
    for i in 0..50 {
        let caller = c.user(i);
        for url in [a.proxy_url("/graph/me"), b.proxy_url("/graph/me")] {
            let caller = caller.clone();
            requests.push(tokio::spawn(async move { call(&url, &caller).await }));
        }
    }
    for reply in futures_util::future::join_all(requests).await {
        upstream_authorization(&reply.expect("task"));
    }
    assert_eq!(c.idp_calls(), 50);
    assert_eq!(
        c.redis.entries().await.len(),
        50,
        "one Redis entry per user"
    );
}

#[tokio::test]
async fn a_replica_started_later_is_served_from_redis_without_asking_the_idp() {
    let c = Cluster::new().await;
    let a = c.replica().await;
    let caller = c.user(1);
    let first = me(&a, &caller).await;
    assert_eq!(c.idp_calls(), 1);

    let b = c.replica().await;
    // Warm up B (its Redis connection, the caller-token path) with another user.
    me(&b, &c.user(2)).await;
    let before = b.metrics().await;
    // Each request carries a token B has not validated yet, so the two
    // timings differ only by where the downstream token came from.
    let fresh_token = |uti: &str| c.idp.mint(&user(&oid(1)).claim("uti", uti));
    let started = Instant::now();
    let from_redis = me(&b, &fresh_token("one")).await;
    let l2_hit = started.elapsed();
    let started = Instant::now();
    let from_memory = me(&b, &fresh_token("two")).await;
    let l1_hit = started.elapsed();
    assert_eq!(from_redis, first);
    assert_eq!(from_memory, first);
    assert_eq!(c.idp_calls(), 2, "user 1 was not exchanged again by B");
    let after = b.metrics().await;
    assert_eq!(
        metric(&after, "oboe_shared_cache_total{outcome=\"hit\"}"),
        1.0,
        "{after}"
    );
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    let round_trip = delta("oboe_shared_cache_duration_seconds_sum")
        / delta("oboe_shared_cache_duration_seconds_count");
    eprintln!(
        "timing: request with an L2 (Redis) hit {l2_hit:?}, with an L1 hit {l1_hit:?}; the Redis GET took {:.0} µs (debug build)",
        round_trip * 1e6
    );
}

#[tokio::test]
async fn redis_holds_hashed_keys_and_ciphertext_only() {
    let c = Cluster::new().await;
    let a = c.replica().await;
    for i in 0..3 {
        me(&a, &c.user(i)).await;
    }
    me(&a, &c.idp.mint(&user_mint())).await;
    let entries = c.redis.entries().await;
    assert_eq!(entries.len(), 4);
    let forbidden: Vec<String> = [
        "eyJ".to_owned(),
        "Bearer".to_owned(),
        DEV_USER_OID.to_owned(),
        oid(0),
        oid(1),
        oid(2),
        "User.Read".to_owned(),
        "graph.microsoft.com".to_owned(),
        DEV_TENANT.to_owned(),
        CLIENT_ID.to_owned(),
    ]
    .into_iter()
    .collect();
    for (key, value) in &entries {
        let hex = key.strip_prefix(PREFIX).expect("the prefix");
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{key}"
        );
        for word in &forbidden {
            assert!(
                !value.windows(word.len()).any(|w| w == word.as_bytes()),
                "{word:?} readable in the value of {key}"
            );
            assert!(!key.contains(word.as_str()));
        }
        assert_eq!(key_id(value), "k1");
    }
}

#[tokio::test]
async fn rotating_the_key_keeps_old_entries_readable_and_writes_with_the_new_one() {
    let c = Cluster::with_keys(&[("k1", 1)]).await;
    let old = c.replica().await;
    let first = me(&old, &c.user(1)).await;
    let written_with_k1 = c.redis.entries().await;
    assert_eq!(key_id(&written_with_k1[0].1), "k1");

    // The new key first, the old one still configured to decrypt.
    let rotated = Oboe::start(&c.yaml_with_keys(&[("k2", 2), ("k1", 1)])).await;
    assert_eq!(me(&rotated, &c.user(1)).await, first);
    assert_eq!(c.idp_calls(), 1, "the old entry was read with the old key");

    me(&rotated, &c.user(2)).await;
    assert_eq!(c.idp_calls(), 2);
    let ids: Vec<String> = c
        .redis
        .entries()
        .await
        .iter()
        .filter(|(key, _)| *key != written_with_k1[0].0)
        .map(|(_, value)| key_id(value))
        .collect();
    assert_eq!(ids, ["k2"], "new writes use the new key");
}

#[tokio::test]
async fn a_tampered_value_is_a_miss_and_is_overwritten_never_served() {
    let c = Cluster::new().await;
    let a = c.replica().await;
    let first = me(&a, &c.user(1)).await;
    let (key, mut value) = c.redis.entries().await.remove(0);
    let last = value.len() - 1;
    value[last] ^= 0x01;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&value)
        .arg("KEEPTTL")
        .query_async(&mut c.redis.conn().await)
        .await
        .expect("SET");

    let b = c.replica().await;
    let second = me(&b, &c.user(1)).await;
    assert_ne!(second, first, "the tampered value was not served");
    assert_eq!(
        c.idp_calls(),
        2,
        "a tampered value is a miss: the IdP is asked"
    );
    let metrics = b.metrics().await;
    assert!(
        metric(
            &metrics,
            "oboe_shared_cache_errors_total{reason=\"undecryptable\"}"
        ) >= 1.0,
        "{metrics}"
    );
    let (_, rewritten) = c.redis.entries().await.remove(0);
    assert_ne!(rewritten, value, "overwritten by the new token");

    let later = c.replica().await;
    assert_eq!(me(&later, &c.user(1)).await, second);
    assert_eq!(c.idp_calls(), 2, "the rewritten value is served");
}

#[tokio::test]
async fn the_redis_ttl_is_the_entrys_remaining_life() {
    let c = Cluster::new().await;
    let a = c.replica().await;
    me(&a, &c.user(1)).await;
    let (key, _) = c.redis.entries().await.remove(0);
    // A one-hour token, served until 5 minutes before it expires.
    let pttl = c.redis.pttl(&key).await;
    assert!(
        (54 * 60_000..=55 * 60_000).contains(&pttl),
        "PTTL {pttl} ms, expected about 55 min"
    );
}

#[tokio::test]
async fn requests_succeed_while_redis_is_down_and_redis_is_used_again_when_back() {
    let mut c = Cluster::new().await;
    let a = c.replica().await;
    let known = c.user(0);
    let token = me(&a, &known).await;

    c.redis.stop();
    let mut slowest = Duration::ZERO;
    for i in 1..=10 {
        let started = Instant::now();
        me(&a, &c.user(i)).await;
        slowest = slowest.max(started.elapsed());
    }
    assert_eq!(me(&a, &known).await, token, "memory still serves");
    assert_eq!(
        c.idp_calls(),
        11,
        "each new user was exchanged with the IdP"
    );
    // Every Redis command is bounded by `timeout` (250ms here); refused
    // connections fail at once, and the open breaker skips Redis altogether.
    assert!(
        slowest < Duration::from_millis(1000),
        "a request took {slowest:?} with Redis down"
    );
    let metrics = a.metrics().await;
    assert_eq!(
        metric(&metrics, "oboe_shared_cache_breaker_state"),
        1.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "oboe_shared_cache_total{outcome=\"skipped\"}") >= 1.0);
    eprintln!("timing: slowest request with Redis down {slowest:?}");

    c.redis.restart().await;
    let mut next = 100;
    eventually("oboe to write to Redis again", || {
        next += 1;
        let caller = c.user(next);
        let (a, redis) = (&a, &c.redis);
        async move {
            me(a, &caller).await;
            !redis.entries().await.is_empty()
        }
    })
    .await;
    let metrics = a.metrics().await;
    assert_eq!(
        metric(&metrics, "oboe_shared_cache_breaker_state"),
        0.0,
        "{metrics}"
    );
    // What was written after the restart serves another replica.
    let calls = c.idp_calls();
    let b = c.replica().await;
    me(&b, &c.user(next)).await;
    assert_eq!(c.idp_calls(), calls, "served from Redis");
}

#[tokio::test]
async fn a_background_refresh_updates_redis_and_entries_end_with_their_life() {
    let c = Cluster::new().await;
    let clock = oboe::clock::ManualClock::starting_now();
    let a = Oboe::start_with_clock(&c.yaml, clock.clone()).await;
    let caller = c.user(1);
    let first = me(&a, &caller).await;
    let (key, stored_first) = c.redis.entries().await.remove(0);
    let advance = |minutes: u64| {
        clock.advance(Duration::from_secs(minutes * 60));
        c.idp.advance_clock((minutes * 60) as i64);
    };

    // Into the refresh window (50 to 55 min of a one-hour token).
    advance(51);
    assert_eq!(me(&a, &caller).await, first, "served during the refresh");
    let mut refreshed = first.clone();
    within("the refreshed token to be served", async {
        while refreshed == first {
            tokio::time::sleep(Duration::from_millis(10)).await;
            refreshed = me(&a, &caller).await;
        }
    })
    .await;
    assert_eq!(c.idp_calls(), 2, "one background refresh");
    let (_, stored_refreshed) = c.redis.entries().await.remove(0);
    assert_ne!(
        stored_refreshed, stored_first,
        "the refresh was written to Redis"
    );

    // Another replica on the same clock gets the refreshed token from Redis.
    let b = Oboe::start_with_clock(&c.yaml, clock.clone()).await;
    assert_eq!(me(&b, &caller).await, refreshed);
    assert_eq!(c.idp_calls(), 2);
    let pttl = c.redis.pttl(&key).await;
    assert!(
        (54 * 60_000..=55 * 60_000).contains(&pttl),
        "PTTL {pttl} ms after the refresh"
    );

    // Past the refreshed entry's life (Redis's own TTL has not run out in
    // real time): not served from Redis, exchanged again.
    advance(56);
    let fresh = Oboe::start_with_clock(&c.yaml, clock.clone()).await;
    assert_ne!(me(&fresh, &c.user(1)).await, refreshed);
    assert_eq!(c.idp_calls(), 3);
}

#[tokio::test]
async fn redis_over_tls_with_a_private_ca_and_the_url_from_a_file() {
    let idp = idp().await;
    let redis = Redis::start().await;
    let ca = TestCa::new();
    let (tls, _tunnel) = ca.tls_tunnel(redis.addr()).await;
    let secrets = Secrets::new();
    let echo = Upstream::echo().await;
    // As an operator that provisions Redis writes it into a Secret.
    let url_file = secrets.dir.path().join("redis-url");
    std::fs::write(&url_file, format!("rediss://{tls}\n")).expect("write URL");
    let yaml = route_file(
        &idp,
        &secrets,
        &format!("{{ file: {} }}", url_file.display()),
        &[("k1", 1)],
        &format!("    ca_file: {}\n", ca.ca_path().display()),
        &echo,
    );
    let (a, b) = (Oboe::start(&yaml).await, Oboe::start(&yaml).await);
    let caller = idp.mint(&user_mint());
    let first = me(&a, &caller).await;
    assert_eq!(me(&b, &caller).await, first);
    assert_eq!(
        idp.counters().token,
        1,
        "the second replica read it over TLS"
    );
    assert_eq!(redis.entries().await.len(), 1);
}

#[tokio::test]
async fn cache_shared_problems_are_reported_with_their_key_paths() {
    let load = |shared: &str| {
        let yaml = format!("cache:\n  shared:\n{shared}routes: []\n");
        oboe::config::load_str(&yaml, figment::providers::Env::raw().only(&[]))
    };
    let problems = |shared: &str| -> Vec<String> {
        load(shared)
            .expect_err("invalid")
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    let ok = load(
        "    url: rediss://cache.example.net:6380/2\n    password: { env: REDIS_PASSWORD }\n    encryption_keys: [{ id: \"2026-11\", key: { file: /k } }]\n",
    )
    .expect("valid");
    let shared = ok.cache.shared.expect("shared");
    assert_eq!(shared.key_prefix, "oboe:");
    assert_eq!(shared.timeout, Duration::from_millis(50));
    assert_eq!(shared.connect_timeout, Duration::from_millis(200));
    assert_eq!(shared.mode, oboe::config::RedisMode::Standalone);
    assert_eq!(
        shared.urls,
        [oboe::config::RedisUrl::Inline(
            "rediss://cache.example.net:6380/2".to_owned()
        )]
    );

    let found = problems(
        "    url: redis://user:pw@cache:6379\n    username: { env: U }\n    timeout: 0s\n    ca_file: /ca.pem\n    encryption_keys:\n      - { id: a, key: { env: A, file: /a } }\n      - { id: a, key: { env: B } }\n      - { id: \"has space\", key: { env: C } }\n      - { id: d }\n",
    );
    for expected in [
        "cache.shared.url: must not contain credentials",
        "cache.shared.username: needs `password`",
        "cache.shared.timeout: must be more than 0",
        "cache.shared.ca_file: only used with a rediss:// url",
        "cache.shared.encryption_keys[0].key: set exactly one of `env` or `file`",
        "cache.shared.encryption_keys[1].id: \"a\" is used by an earlier key",
        "cache.shared.encryption_keys[2].id:",
        "cache.shared.encryption_keys[3].key: required",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "{expected:?} not in {found:#?}"
        );
    }
    let found = problems("    url: http://cache:6379\n    password: { value: inline }\n");
    for expected in [
        "cache.shared.url: must start with redis:// or rediss://",
        "cache.shared.password.value: unknown key",
        "cache.shared.encryption_keys: required",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "{expected:?} not in {found:#?}"
        );
    }
}

#[tokio::test]
async fn an_unusable_encryption_key_stops_oboe_from_starting() {
    let idp = idp().await;
    let secrets = Secrets::new();
    let echo = Upstream::echo().await;
    let yaml = route_file(
        &idp,
        &secrets,
        "redis://127.0.0.1:1",
        &[("k1", 1)],
        "",
        &echo,
    );
    let short = secrets.dir.path().join("key-k1");
    std::fs::write(&short, STANDARD.encode([7u8; 16])).expect("write key");
    let yaml = format!("listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\n{yaml}");
    let config = oboe::config::load_str(&yaml, figment::providers::Env::raw().only(&[]))
        .expect("the route file itself is valid");
    let listeners = oboe::Listeners::bind(&config).await.expect("bind");
    let error = within(
        "oboe to refuse to start",
        oboe::run(config, listeners, std::future::pending()),
    )
    .await
    .expect_err("a 16-byte key is refused");
    let message = error.to_string();
    assert!(
        message.contains("cache.shared.encryption_keys[0].key")
            && message.contains("32 bytes, this one is 16"),
        "{message}"
    );
    assert!(!message.contains(&STANDARD.encode([7u8; 16])));
}

#[tokio::test]
async fn a_reload_with_a_new_first_key_writes_with_it_and_keeps_memory() {
    let c = Cluster::with_keys(&[("k1", 1)]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("oboe.yaml");
    let (proxy, admin) = (bind_loopback().await, bind_loopback().await);
    let (proxy_addr, admin_addr) = (
        proxy.local_addr().expect("addr"),
        admin.local_addr().expect("addr"),
    );
    let listen = format!("listen: {proxy_addr}\nadmin: {{ listen: {admin_addr} }}\n");
    std::fs::write(&path, format!("{listen}{}", c.yaml)).expect("write route file");
    let config = oboe::config::load(&path).expect("valid route file");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(oboe::run_watching(
        config,
        path.clone(),
        oboe::Listeners { proxy, admin },
        async move {
            let _ = stopped.await;
        },
    ));
    wait_ready(admin_addr).await;
    let url = format!("http://{proxy_addr}/graph/me");
    let first = upstream_authorization(&call(&url, &c.user(1)).await);

    std::fs::write(
        &path,
        format!("{listen}{}", c.yaml_with_keys(&[("k2", 2), ("k1", 1)])),
    )
    .expect("rewrite route file");
    eventually("the new route file to be applied", || async {
        let text = Client::http1()
            .get(&format!("http://{admin_addr}/metrics"))
            .await
            .text();
        metric(&text, "oboe_config_reloads_total{outcome=\"ok\"}") >= 1.0
    })
    .await;
    assert_eq!(
        upstream_authorization(&call(&url, &c.user(1)).await),
        first,
        "the in-memory cache survived the reload"
    );
    upstream_authorization(&call(&url, &c.user(2)).await);
    assert_eq!(c.idp_calls(), 2);
    let mut ids: Vec<String> = c
        .redis
        .entries()
        .await
        .iter()
        .map(|(_, value)| key_id(value))
        .collect();
    ids.sort();
    assert_eq!(ids, ["k1", "k2"], "written before and after the reload");
    let _ = stop.send(());
    within("oboe to stop", task)
        .await
        .expect("task")
        .expect("clean exit");
}
