//! The shared token cache on Redis Cluster and Redis Sentinel: real
//! topologies made of Debian's `redis-server` (three cluster masters; a
//! master, its replica and a sentinel) on free loopback ports, two oboes, and
//! the dev IdP counting the token requests that reach it. Also what
//! `oboe check` says about topology settings that do not fit together.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use oboe::dev::idp::DevIdp;

use crate::fixtures::*;
use crate::harness::*;
use crate::shared_cache::{
    PREFIX, Redis, Secrets, key_id, me, oid, shared_route_file, upstream_authorization, user,
};

const MASTER_NAME: &str = "mymaster";

// ---------------------------------------------------------------------------
// topologies
// ---------------------------------------------------------------------------

/// Runs a Redis command on `redis` and returns its answer.
async fn query<T: redis::FromRedisValue>(redis: &Redis, cmd: &redis::Cmd) -> T {
    cmd.query_async(&mut redis.conn().await)
        .await
        .unwrap_or_else(|e| panic!("{cmd:?} on port {}: {e}", redis.port))
}

/// `INFO <section>` as text.
async fn info(redis: &Redis, section: &str) -> String {
    query(redis, redis::cmd("INFO").arg(section)).await
}

/// A port nothing listens on at the moment.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("address").port()
}

/// Three cluster masters, no replicas, every slot assigned.
struct RedisCluster {
    nodes: Vec<Redis>,
    /// With TLS: each node's TLS port (its plain port stays open for the test).
    tls_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// With `tls`, each node also listens on a TLS port with `tls`'s server
    /// certificate, and the nodes talk to each other over TLS.
    async fn start_with(tls: Option<&TestCa>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut nodes, mut tls_ports) = (Vec::new(), Vec::new());
        for i in 0..3 {
            let conf = dir.path().join(format!("nodes-{i}.conf"));
            let mut args: Vec<String> = vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                conf.to_string_lossy().into_owned(),
                "--cluster-node-timeout".into(),
                "2000".into(),
            ];
            if let Some(ca) = tls {
                let port = free_port();
                tls_ports.push(port);
                let path = |p: &Path| p.to_string_lossy().into_owned();
                args.extend([
                    "--tls-port".into(),
                    port.to_string(),
                    "--tls-cert-file".into(),
                    path(&ca.cert_file),
                    "--tls-key-file".into(),
                    path(&ca.key_file),
                    "--tls-ca-cert-file".into(),
                    path(&ca.ca_file),
                    "--tls-auth-clients".into(),
                    "no".into(),
                    "--tls-cluster".into(),
                    "yes".into(),
                ]);
            }
            nodes.push(Redis::start_with(args).await);
        }
        let cluster = Self {
            nodes,
            tls_ports,
            _dir: dir,
        };
        cluster.create().await;
        cluster
    }

    /// Splits the slots over the nodes and introduces them to each other,
    /// then waits until every node sees the whole cluster serving.
    async fn create(&self) {
        let addresses = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port));
        let out = within(
            "redis-cli --cluster create",
            tokio::process::Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(addresses)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .expect("run redis-cli (Debian's redis-tools, a dependency of redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eventually("every cluster node to report cluster_state:ok", || async {
            for node in &self.nodes {
                let state: String = query(node, &redis::cmd("CLUSTER").arg("INFO").clone()).await;
                if !state.contains("cluster_state:ok") {
                    return false;
                }
            }
            true
        })
        .await;
    }

    fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Node `i`'s TLS URL (a cluster started with TLS).
    fn tls_url(&self, i: usize) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_ports[i])
    }

    /// oboe's value keys on each node (locks excluded).
    async fn entries_per_node(&self) -> Vec<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for node in &self.nodes {
            out.push(node.entries().await);
        }
        out
    }
}

/// A master, its replica, and one sentinel watching them (quorum 1) that
/// declares the master down after half a second of silence.
struct SentinelSetup {
    master: Redis,
    replica: Redis,
    sentinel: Redis,
    _dir: tempfile::TempDir,
}

impl SentinelSetup {
    async fn start() -> Self {
        let master = Redis::start().await;
        let replica = Redis::start_with(vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port.to_string(),
            // The initial sync straight into memory: no RDB file in the
            // temporary directory the other servers share.
            "--repl-diskless-load".into(),
            "on-empty-db".into(),
        ])
        .await;
        eventually("the replica to sync with the master", || async {
            info(&replica, "replication")
                .await
                .contains("master_link_status:up")
        })
        .await;
        // The sentinel rewrites its file; it lives in a directory of its own.
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {MASTER_NAME} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 500\n\
                 sentinel failover-timeout {MASTER_NAME} 5000\n",
                master.port
            ),
        )
        .expect("write sentinel.conf");
        let sentinel = Redis::start_with(vec![
            conf.to_string_lossy().into_owned(),
            "--sentinel".into(),
        ])
        .await;
        let setup = Self {
            master,
            replica,
            sentinel,
            _dir: dir,
        };
        eventually("the sentinel to know the replica", || async {
            let replicas: Vec<HashMap<String, String>> = query(
                &setup.sentinel,
                redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME),
            )
            .await;
            replicas.iter().any(|r| {
                r.get("flags").is_some_and(|f| f == "slave")
                    && r.get("master-link-status").is_some_and(|s| s == "ok")
            })
        })
        .await;
        setup
    }

    /// The port of the master the sentinel names now.
    async fn master_port(&self) -> u16 {
        let (_, port): (String, u16) = query(
            &self.sentinel,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME),
        )
        .await;
        port
    }
}

// ---------------------------------------------------------------------------
// oboe
// ---------------------------------------------------------------------------

/// The dev IdP, the secrets and an echo upstream the replicas share.
struct Deployment {
    idp: DevIdp,
    secrets: Secrets,
    echo: Upstream,
}

impl Deployment {
    async fn new() -> Self {
        Self {
            idp: idp().await,
            secrets: Secrets::new(),
            echo: Upstream::echo().await,
        }
    }

    /// A route file whose `cache.shared` has `where_lines`.
    fn yaml(&self, where_lines: &str) -> String {
        shared_route_file(
            &self.idp,
            &self.secrets,
            where_lines,
            &[("k1", 1)],
            &self.echo,
        )
    }

    /// A caller token of user `i`.
    fn user(&self, i: usize) -> String {
        self.idp.mint(&user(&oid(i)))
    }

    fn idp_calls(&self) -> u64 {
        self.idp.counters().token
    }
}

/// Every value oboe stores names the first key and shows nothing in clear.
fn assert_encrypted(entries: &[(String, Vec<u8>)]) {
    for (key, value) in entries {
        assert_eq!(key_id(value), "k1", "{key}");
        for word in ["eyJ", "Bearer", "User.Read", CLIENT_ID] {
            assert!(
                !value.windows(word.len()).any(|w| w == word.as_bytes()),
                "{word:?} readable in the value of {key}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------

#[tokio::test]
async fn two_replicas_on_a_redis_cluster_exchange_each_user_once_and_spread_keys_over_the_nodes() {
    const USERS: usize = 24;
    let cluster = RedisCluster::start().await;
    let d = Deployment::new().await;
    // One replica lists every seed node; the other knows one node and
    // learns the rest of the cluster from it.
    let a = Oboe::start(&d.yaml(&format!(
        "    mode: cluster\n    urls: [{}, {}, {}]\n",
        cluster.url(0),
        cluster.url(1),
        cluster.url(2)
    )))
    .await;
    let b =
        Oboe::start(&d.yaml(&format!("    mode: cluster\n    url: {}\n", cluster.url(1)))).await;

    // Each user asks both replicas at once: they compete for the user's lock.
    let mut requests = Vec::new();
    for i in 0..USERS {
        for url in [a.proxy_url("/graph/me"), b.proxy_url("/graph/me")] {
            let caller = d.user(i);
            requests.push(tokio::spawn(async move { (i, call(&url, &caller).await) }));
        }
    }
    let mut tokens: HashMap<usize, HashSet<String>> = HashMap::new();
    for joined in futures_util::future::join_all(requests).await {
        let (i, reply) = joined.expect("task");
        tokens
            .entry(i)
            .or_default()
            .insert(upstream_authorization(&reply));
    }

    assert_eq!(
        d.idp_calls(),
        USERS as u64,
        "one IdP call per user, not two"
    );
    assert!(
        tokens.values().all(|t| t.len() == 1),
        "both replicas sent each user's one token"
    );
    let per_node = cluster.entries_per_node().await;
    let counts: Vec<usize> = per_node.iter().map(Vec::len).collect();
    assert_eq!(counts.iter().sum::<usize>(), USERS, "one entry per user");
    assert!(
        counts.iter().filter(|&&n| n > 0).count() >= 2,
        "keys spread over the nodes: {counts:?}"
    );
    for (key, _) in per_node.iter().flatten() {
        let tag = key
            .strip_prefix(PREFIX)
            .and_then(|k| k.strip_prefix('{'))
            .and_then(|k| k.strip_suffix('}'))
            .unwrap_or_else(|| panic!("{key}: not the prefix and a {{hash tag}}"));
        assert!(
            tag.len() == 64 && tag.bytes().all(|b| b.is_ascii_hexdigit()),
            "{key}"
        );
    }
    assert_encrypted(&per_node.concat());
    for replica in [&a, &b] {
        let metrics = replica.metrics().await;
        assert_eq!(
            metric(
                &metrics,
                "oboe_shared_cache_errors_total{reason=\"server\"}"
            ),
            0.0,
            "no command was refused (a CROSSSLOT pipeline would be)\n{metrics}"
        );
    }
}

#[tokio::test]
async fn a_redis_cluster_over_tls_with_a_private_ca_checks_every_nodes_certificate() {
    const USERS: usize = 12;
    let ca = TestCa::new();
    let cluster = RedisCluster::start_with(Some(&ca)).await;
    let d = Deployment::new().await;
    // One seed; the other nodes are reached at the TLS addresses the cluster
    // announces, each certificate checked against the private CA.
    let yaml = d.yaml(&format!(
        "    mode: cluster\n    url: {}\n    ca_file: {}\n",
        cluster.tls_url(0),
        ca.ca_path().display()
    ));
    let (a, b) = (Oboe::start(&yaml).await, Oboe::start(&yaml).await);
    for i in 0..USERS {
        let token = me(&a, &d.user(i)).await;
        assert_eq!(me(&b, &d.user(i)).await, token);
    }
    assert_eq!(d.idp_calls(), USERS as u64, "B read every token from Redis");
    let counts: Vec<usize> = cluster
        .entries_per_node()
        .await
        .iter()
        .map(Vec::len)
        .collect();
    assert!(
        counts.iter().filter(|&&n| n > 0).count() >= 2,
        "entries on nodes other than the seed: {counts:?}"
    );
    for replica in [&a, &b] {
        let metrics = replica.metrics().await;
        assert_eq!(
            metric(
                &metrics,
                "oboe_shared_cache_errors_total{reason=\"connection\"}"
            ),
            0.0,
            "{metrics}"
        );
    }
}

// ---------------------------------------------------------------------------
// Redis Sentinel
// ---------------------------------------------------------------------------

#[tokio::test]
async fn with_sentinel_replicas_share_the_master_and_follow_it_through_a_failover() {
    let mut s = SentinelSetup::start().await;
    let d = Deployment::new().await;
    let yaml = d.yaml(&format!(
        "    mode: sentinel\n    urls: [{}]\n    sentinel: {{ master_name: {MASTER_NAME} }}\n",
        s.sentinel.url()
    ));
    let (a, b) = (Oboe::start(&yaml).await, Oboe::start(&yaml).await);

    // Before: B is served what A fetched, through the master.
    let first = me(&a, &d.user(1)).await;
    assert_eq!(me(&b, &d.user(1)).await, first);
    assert_eq!(d.idp_calls(), 1, "B read user 1's token from Redis");
    assert_eq!(s.master.entries().await.len(), 1);
    assert_encrypted(&s.master.entries().await);
    let synced: i64 = query(&s.master, redis::cmd("WAIT").arg(1).arg(5000)).await;
    assert_eq!(synced, 1, "the entry reached the replica");

    // The master crashes. Requests go on while the sentinel notices and
    // promotes the replica (each `me` asserts a 200 with a token).
    let old_port = s.master.port;
    s.master.stop();
    let mut next = 100;
    let mut during = 0;
    within("the sentinel to promote the replica", async {
        while s.master_port().await == old_port {
            next += 1;
            me(&a, &d.user(next)).await;
            during += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(s.master_port().await, s.replica.port);
    eprintln!("served {during} new users while the master was down");

    // After: both replicas use the new master. A fetches a new user; once
    // B is served that user without an IdP call, both have followed.
    eventually(
        "B to be served, from the new master, a token A fetched",
        || {
            next += 1;
            let (a, b, d, n) = (&a, &b, &d, next);
            async move {
                let token = me(a, &d.user(n)).await;
                let calls = d.idp_calls();
                me(b, &d.user(n)).await == token && d.idp_calls() == calls
            }
        },
    )
    .await;
    assert!(
        !s.replica.entries().await.is_empty(),
        "the new master holds entries"
    );
    // What was written before the crash survived the failover.
    let calls = d.idp_calls();
    let later = Oboe::start(&yaml).await;
    assert_eq!(me(&later, &d.user(1)).await, first);
    assert_eq!(d.idp_calls(), calls, "user 1 came from the new master");
}

// ---------------------------------------------------------------------------
// unreachable topologies
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_unreachable_redis_of_any_topology_delays_neither_readiness_nor_requests() {
    let d = Deployment::new().await;
    // Ports nothing listens on.
    let closed = || async { bind_loopback().await.local_addr().expect("addr") };
    for where_lines in [
        format!("    url: redis://{}\n", closed().await),
        format!("    mode: cluster\n    url: redis://{}\n", closed().await),
        format!(
            "    mode: sentinel\n    urls: [redis://{}, redis://{}]\n    sentinel: {{ master_name: {MASTER_NAME} }}\n",
            closed().await,
            closed().await
        ),
    ] {
        let started = std::time::Instant::now();
        let a = Oboe::start(&d.yaml(&where_lines)).await;
        let caller = d.idp.mint(&user_mint());
        let first = me(&a, &caller).await;
        assert_eq!(me(&a, &caller).await, first);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{where_lines}: {:?}",
            started.elapsed()
        );
        let metrics = a.metrics().await;
        assert!(
            metric(
                &metrics,
                "oboe_shared_cache_errors_total{reason=\"connection\"}"
            ) >= 1.0,
            "{where_lines}\n{metrics}"
        );
    }
}

// ---------------------------------------------------------------------------
// oboe check
// ---------------------------------------------------------------------------

/// `oboe check` on a route file with `shared` under `cache:`; its exit code
/// and stderr.
fn check_shared(shared: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("oboe.yaml");
    std::fs::write(
        &path,
        format!(
            "cache:\n  shared:\n{shared}    encryption_keys: [{{ id: k1, key: {{ env: OBOE_TEST_KEY }} }}]\nroutes: []\n"
        ),
    )
    .expect("write route file");
    let out = oboe_command()
        .args(["check", "--config"])
        .arg(Path::new(&path))
        .output()
        .expect("run oboe check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_sentinel_and_cluster_settings() {
    for shared in [
        "    mode: sentinel\n    urls: [rediss://sentinel-0:26379, rediss://sentinel-1:26379]\n    ca_file: /etc/oboe/redis-ca.pem\n    password: { env: REDIS_PASSWORD }\n    sentinel:\n      master_name: tokens\n      password: { file: /var/run/secrets/sentinel-password }\n",
        "    mode: cluster\n    url: rediss://clustercfg.tokens.abc123.use1.cache.amazonaws.com:6379\n    password: { env: REDIS_AUTH_TOKEN }\n",
        "    mode: cluster\n    urls: [redis://10.0.0.1:6379, redis://10.0.0.2:6379]\n",
        "    mode: sentinel\n    url: { env: REDIS_SENTINEL_URL }\n    sentinel: { master_name: tokens }\n",
    ] {
        let (code, stderr) = check_shared(shared);
        assert_eq!(code, Some(0), "{shared}\n{stderr}");
    }
}

#[test]
fn check_names_each_topology_problem_by_its_key_path() {
    let cases: &[(&str, &[&str])] = &[
        (
            "    mode: sentinel\n    urls: [redis://sentinel:26379]\n",
            &["cache.shared.sentinel.master_name: required with `mode: sentinel`"],
        ),
        (
            "    mode: sentinel\n    urls: [redis://sentinel-0:26379/2, redis://sentinel-1:26379, rediss://sentinel-2:26379]\n    sentinel: { master_name: \"my master\", username: { env: U }, passwrd: { env: P } }\n",
            &[
                "cache.shared.urls[0]: no database number with `mode: sentinel`",
                "cache.shared.urls[2]: mixes redis:// and rediss://",
                "cache.shared.sentinel.master_name: \"my master\"",
                "cache.shared.sentinel.username: needs `password`",
                "cache.shared.sentinel.passwrd: unknown key",
            ],
        ),
        (
            "    mode: cluster\n    url: redis://node:6379/1\n    ca_file: /ca.pem\n    key_prefix: \"oboe:{app}:\"\n    sentinel: { master_name: m }\n",
            &[
                "cache.shared.url: no database number with `mode: cluster`",
                "cache.shared.ca_file: only used with a rediss:// url",
                "cache.shared.key_prefix: must not contain `{` or `}` with `mode: cluster`",
                "cache.shared.sentinel: only used with `mode: sentinel`",
            ],
        ),
        (
            "    mode: cluster\n    url: redis://node-0:6379\n    urls: [redis://node-1:6379]\n",
            &["cache.shared.urls: set `url` or `urls`, not both"],
        ),
        (
            "    mode: cluster\n    urls: []\n",
            &["cache.shared.urls: must not be empty"],
        ),
        (
            "    urls: [redis://a:6379, redis://b:6379]\n",
            &["cache.shared.urls: only with `mode: sentinel` or `mode: cluster`"],
        ),
        (
            "    mode: ring\n    url: redis://a:6379\n",
            &["cache.shared.mode: must be `standalone`, `sentinel` or `cluster`"],
        ),
    ];
    for (shared, expected) in cases {
        let (code, stderr) = check_shared(shared);
        assert_eq!(code, Some(1), "{shared}\n{stderr}");
        for problem in *expected {
            assert!(
                stderr
                    .lines()
                    .any(|l| l.trim_start_matches("  - ").starts_with(problem)),
                "`{problem}` is not named for\n{shared}\n{stderr}"
            );
        }
    }
}
