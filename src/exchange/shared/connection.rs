//! How the shared cache reaches Redis: one server (or one endpoint in front of
//! several), the master that Redis Sentinel names, or a Redis Cluster.
//!
//! All three connect lazily and reconnect on their own, so the cache above
//! only runs commands, each within its timeout, and never waits for Redis at
//! startup. They differ in what "reconnect" means:
//!
//! - standalone: redis-rs's `ConnectionManager` reconnects to the one address;
//! - sentinel: the sentinels are asked for the master again whenever the
//!   connection to it fails, times out, or answers READONLY (the master was
//!   demoted), so a failover is followed without a restart (see
//!   [`SentinelConnection`]);
//! - cluster: redis-rs's cluster connection learns the slot map from the seed
//!   nodes, follows MOVED/ASK redirections and refreshes the map itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, ServerErrorKind, TlsCertificates, TlsMode, Value,
};

use super::{SharedSetupError, read_source};
use crate::config::{self, RedisMode};
use crate::exchange::credential::Secret;

/// Redirections and retries one cluster command may take (a MOVED after a
/// resharding or a failover, then the command again); beyond that the
/// command fails and the breaker decides when Redis is worth trying again.
const CLUSTER_RETRIES: u32 = 2;
/// A Sentinel lookup is up to three connection set-ups in a row (to a
/// sentinel, to the named master to check its role, to the master for use):
/// it may take this many connect timeouts.
const SENTINEL_LOOKUP_CONNECTS: u32 = 3;

/// Every Redis socket sends at once (`TCP_NODELAY`; redis-rs leaves Nagle on
/// by default). With Nagle, a command written while an earlier one is still
/// unacknowledged waits for the ACK, which the peer may delay: the
/// lock-fetch-store-unlock sequence of a miss showed a tail of tens of ms.
fn tcp() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// A connection to the configured Redis, whatever its layout. Cheap to clone:
/// clones share the underlying connections.
#[derive(Clone)]
pub(super) enum Connection {
    /// One server.
    Standalone(ConnectionManager),
    /// The master Redis Sentinel names.
    Sentinel(SentinelConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(conn) => conn.req_packed_command(cmd),
            Self::Sentinel(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(conn) => conn.get_db(),
            Self::Sentinel(_) | Self::Cluster(_) => 0,
        }
    }
}

/// Does `error` say that Redis could not be reached, rather than that it
/// refused a command?
pub(super) fn is_unreachable(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || matches!(
            error.kind(),
            ErrorKind::MasterNameNotFoundBySentinel
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(ServerErrorKind::ClusterDown | ServerErrorKind::MasterDown)
        )
}

/// The connection `settings` describe, and where it goes (for the log; no
/// credentials). Reads the URL and credential sources; connects nothing yet.
pub(super) fn connect(
    settings: &config::SharedCache,
) -> Result<(Connection, String), SharedSetupError> {
    let urls = urls(settings)?;
    let nodes = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            url.as_str()
                .into_connection_info()
                .map_err(|e| SharedSetupError::new(url_path(settings, i), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let auth = Credentials::load(
        "cache.shared",
        settings.username.as_ref(),
        settings.password.as_ref(),
    )?;
    let certs = certificates(settings)?;
    let conn = match &settings.mode {
        RedisMode::Standalone => {
            Connection::Standalone(standalone(settings, nodes.into_iter(), &auth, certs)?)
        }
        RedisMode::Sentinel(sentinel) => {
            let tls = urls.iter().all(|url| url.starts_with("rediss://"));
            Connection::Sentinel(sentinel_master(
                settings, sentinel, nodes, tls, &auth, certs,
            )?)
        }
        RedisMode::Cluster => Connection::Cluster(cluster(settings, nodes, &auth, certs)?),
    };
    Ok((conn, urls.join(", ")))
}

/// Key path of the URLs: `url` when there is one, else `urls`.
fn nodes_path(settings: &config::SharedCache) -> &'static str {
    if settings.urls.len() == 1 {
        "cache.shared.url"
    } else {
        "cache.shared.urls"
    }
}

/// Key path of the `i`th URL.
fn url_path(settings: &config::SharedCache, i: usize) -> String {
    if settings.urls.len() == 1 {
        "cache.shared.url".to_owned()
    } else {
        format!("cache.shared.urls[{i}]")
    }
}

/// The URLs, read from their sources when not inline, and checked (inline
/// ones were checked with the route file).
fn urls(settings: &config::SharedCache) -> Result<Vec<String>, SharedSetupError> {
    let mut out = Vec::with_capacity(settings.urls.len());
    for (i, url) in settings.urls.iter().enumerate() {
        let path = url_path(settings, i);
        let url = match url {
            config::RedisUrl::Inline(url) => url.clone(),
            config::RedisUrl::From(source) => {
                let url = read_source(&path, source)?.expose().trim().to_owned();
                config::check_node_url(&url, &settings.mode)
                    .map_err(|why| SharedSetupError::new(&path, why))?;
                url
            }
        };
        if settings.ca_file.is_some() && !url.starts_with("rediss://") {
            return Err(SharedSetupError::new(
                "cache.shared.ca_file",
                "only used with a rediss:// url",
            ));
        }
        out.push(url);
    }
    if out.is_empty() {
        return Err(SharedSetupError::new("cache.shared.url", "required"));
    }
    Ok(out)
}

/// A user name and password, read from their sources.
struct Credentials {
    username: Option<Secret>,
    password: Option<Secret>,
}

impl Credentials {
    /// Reads `{path}.username` and `{path}.password`.
    fn load(
        path: &str,
        username: Option<&config::SecretSource>,
        password: Option<&config::SecretSource>,
    ) -> Result<Self, SharedSetupError> {
        let read = |field: &str, source: Option<&config::SecretSource>| {
            source
                .map(|s| read_source(&format!("{path}.{field}"), s))
                .transpose()
        };
        Ok(Self {
            username: read("username", username)?,
            password: read("password", password)?,
        })
    }

    fn username(&self) -> Option<&str> {
        self.username.as_ref().map(Secret::expose)
    }

    fn password(&self) -> Option<&str> {
        self.password.as_ref().map(Secret::expose)
    }
}

/// The CA bundle of `ca_file`, for every TLS connection.
fn certificates(
    settings: &config::SharedCache,
) -> Result<Option<TlsCertificates>, SharedSetupError> {
    let Some(ca_file) = &settings.ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(ca_file).map_err(|e| {
        SharedSetupError::new(
            "cache.shared.ca_file",
            format!("read {}: {e}", ca_file.display()),
        )
    })?;
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

fn client_error(path: &str) -> impl Fn(RedisError) -> SharedSetupError + '_ {
    move |e| SharedSetupError::new(path, e.to_string())
}

/// A lazy, reconnecting connection to one server.
fn standalone(
    settings: &config::SharedCache,
    mut nodes: impl Iterator<Item = ConnectionInfo>,
    auth: &Credentials,
    certs: Option<TlsCertificates>,
) -> Result<ConnectionManager, SharedSetupError> {
    let url_error = client_error("cache.shared.url");
    let info = nodes
        .next()
        .ok_or_else(|| SharedSetupError::new("cache.shared.url", "required"))?;
    let mut redis_settings = info.redis_settings().clone();
    if let Some(name) = auth.username() {
        redis_settings = redis_settings.set_username(name);
    }
    if let Some(password) = auth.password() {
        redis_settings = redis_settings.set_password(password);
    }
    let info = info
        .set_redis_settings(redis_settings)
        .set_tcp_settings(tcp());
    let client = match certs {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
    .map_err(&url_error)?;
    // Few, quick reconnection attempts: the breaker, not the client, decides
    // when Redis is worth trying again.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(200));
    ConnectionManager::new_lazy_with_config(client, config).map_err(url_error)
}

/// A lazy cluster connection: the seed nodes are asked for the slot map on
/// first use, in the background.
fn cluster(
    settings: &config::SharedCache,
    nodes: Vec<ConnectionInfo>,
    auth: &Credentials,
    certs: Option<TlsCertificates>,
) -> Result<ClusterConnection, SharedSetupError> {
    let mut builder = ClusterClientBuilder::new(nodes)
        .tcp_settings(tcp())
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(10)
        .max_retry_wait(100);
    if let Some(name) = auth.username() {
        builder = builder.username(name);
    }
    if let Some(password) = auth.password() {
        builder = builder.password(password);
    }
    if let Some(certs) = certs {
        builder = builder.certs(certs);
    }
    let client = builder
        .build()
        .map_err(client_error(nodes_path(settings)))?;
    let config = ClusterConfig::new()
        .set_connection_timeout(settings.connect_timeout)
        .set_response_timeout(settings.timeout);
    Ok(client.get_pending_async_connection_with_config(config))
}

/// A connection to the master the sentinels name, looked up on first use.
fn sentinel_master(
    settings: &config::SharedCache,
    sentinel: &config::Sentinel,
    nodes: Vec<ConnectionInfo>,
    tls: bool,
    auth: &Credentials,
    certs: Option<TlsCertificates>,
) -> Result<SentinelConnection, SharedSetupError> {
    let sentinel_auth = Credentials::load(
        "cache.shared.sentinel",
        sentinel.username.as_ref(),
        sentinel.password.as_ref(),
    )?;
    let addresses = nodes.iter().map(|info| info.addr().clone());
    let mut builder =
        SentinelClientBuilder::new(addresses, &sentinel.master_name, SentinelServerType::Master)
            .map_err(client_error(nodes_path(settings)))?
            .set_client_to_redis_tcp_settings(tcp())
            .set_client_to_sentinel_tcp_settings(tcp());
    // The sentinels name the master by address only: it is reached the way
    // they are, with the same CA bundle.
    if tls {
        builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
    }
    if let Some(certs) = certs {
        builder = builder
            .set_client_to_redis_certificates(certs.clone())
            .set_client_to_sentinel_certificates(certs);
    }
    if let Some(name) = auth.username() {
        builder = builder.set_client_to_redis_username(name);
    }
    if let Some(password) = auth.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(name) = sentinel_auth.username() {
        builder = builder.set_client_to_sentinel_username(name);
    }
    if let Some(password) = sentinel_auth.password() {
        builder = builder.set_client_to_sentinel_password(password);
    }
    let client = builder
        .build()
        .map_err(client_error(nodes_path(settings)))?;
    Ok(SentinelConnection::new(
        client,
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.timeout)),
        settings.connect_timeout * SENTINEL_LOOKUP_CONNECTS,
    ))
}

/// A connection to the master being (or already) looked up.
type Master = Shared<BoxFuture<'static, RedisResult<MultiplexedConnection>>>;

/// The master Redis Sentinel names, followed across failovers.
///
/// redis-rs's `SentinelClient` finds the master but does not follow it, and
/// `ConnectionManager` reconnects to a fixed address. Here a command that
/// finds the master gone (the connection failed or timed out: it crashed or
/// is unreachable) or demoted (READONLY: a failover made it a replica) drops
/// the connection, and the next command asks the sentinels again. Lookups run
/// in a task of their own: one slower than a command's timeout still finishes
/// and serves the commands after it. Concurrent commands share one lookup.
#[derive(Clone)]
pub(super) struct SentinelConnection {
    lookup: Arc<Lookup>,
    /// `None` until the first command, and after the master was lost.
    master: Arc<Mutex<Option<Master>>>,
}

/// What a lookup needs.
struct Lookup {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    config: AsyncConnectionConfig,
    /// Bound on one lookup.
    timeout: Duration,
    /// The master last connected to, so a change is logged once.
    last: Mutex<String>,
}

impl SentinelConnection {
    fn new(sentinels: SentinelClient, config: AsyncConnectionConfig, timeout: Duration) -> Self {
        Self {
            lookup: Arc::new(Lookup {
                sentinels: tokio::sync::Mutex::new(sentinels),
                config,
                timeout,
                last: Mutex::new(String::new()),
            }),
            master: Arc::new(Mutex::new(None)),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Master>> {
        self.master.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection to the master, after the lookup under way or a new one.
    async fn connection(&self) -> RedisResult<(Master, MultiplexedConnection)> {
        let master = self
            .slot()
            .get_or_insert_with(|| self.lookup.start())
            .clone();
        match master.clone().await {
            Ok(conn) => Ok((master, conn)),
            Err(e) => {
                self.forget(&master);
                Err(e)
            }
        }
    }

    /// Drops `master` unless another command already did (and perhaps
    /// started the next lookup).
    fn forget(&self, master: &Master) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|current| current.ptr_eq(master)) {
            *slot = None;
        }
    }

    /// After a command on `master`: drops it if the answer says it is gone.
    fn check<T>(&self, master: &Master, result: &RedisResult<T>) {
        if let Err(e) = result
            && master_lost(e)
        {
            tracing::debug!(error = %e, "shared token cache: the Redis master is lost; asking the sentinels again");
            self.forget(master);
        }
    }
}

/// Does `error` mean that the connection no longer leads to the master?
fn master_lost(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_unrecoverable_error()
        || error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        async move {
            let (master, mut conn) = self.connection().await?;
            let result = conn.req_packed_command(cmd).await;
            self.check(&master, &result);
            result
        }
        .boxed()
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        async move {
            let (master, mut conn) = self.connection().await?;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            self.check(&master, &result);
            result
        }
        .boxed()
    }

    fn get_db(&self) -> i64 {
        0
    }
}

impl Lookup {
    /// Starts a lookup in a task of its own.
    fn start(self: &Arc<Self>) -> Master {
        let this = self.clone();
        let task = tokio::spawn(async move { this.run().await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()).into()))
        }
        .boxed()
        .shared()
    }

    /// Asks the sentinels for the master and connects to it, within the timeout.
    async fn run(&self) -> RedisResult<MultiplexedConnection> {
        let lookup = async {
            let client = self.sentinels.lock().await.async_get_client().await?;
            let conn = client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            Ok::<_, RedisError>((client.get_connection_info().addr().to_string(), conn))
        };
        let (address, conn) =
            tokio::time::timeout(self.timeout, lookup)
                .await
                .map_err(|_| {
                    RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "Sentinel lookup timed out",
                    ))
                })??;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last != address {
            tracing::info!(master = %address, "shared token cache: connected to the Redis master Sentinel names");
            *last = address;
        }
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared-cache settings of a route file with `shared` under `cache.shared`.
    fn settings(shared: &str) -> config::SharedCache {
        let yaml = format!(
            "cache:\n  shared:\n{shared}    encryption_keys: [{{ id: k1, key: {{ env: K }} }}]\nroutes: []\n"
        );
        config::load_str(&yaml, figment::providers::Env::raw().only(&[]))
            .expect("valid route file")
            .cache
            .shared
            .expect("cache.shared")
    }

    /// A CA bundle (one self-signed certificate) in a file.
    fn ca_file() -> tempfile::NamedTempFile {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["redis.test".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed");
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), cert.pem()).expect("write CA");
        file
    }

    #[test]
    fn a_lost_or_demoted_master_means_asking_the_sentinels_again() {
        let io = |kind| RedisError::from(std::io::Error::from(kind));
        let server = |kind, detail| RedisError::from((ErrorKind::Server(kind), detail));
        for (error, lost) in [
            (io(std::io::ErrorKind::ConnectionReset), true),
            (io(std::io::ErrorKind::ConnectionRefused), true),
            (io(std::io::ErrorKind::TimedOut), true),
            (
                server(
                    ServerErrorKind::ReadOnly,
                    "You can't write against a read only replica.",
                ),
                true,
            ),
            (
                server(ServerErrorKind::ResponseError, "wrong number of arguments"),
                false,
            ),
            (
                server(ServerErrorKind::NoScript, "no matching script"),
                false,
            ),
        ] {
            assert_eq!(master_lost(&error), lost, "{error}");
        }
    }

    #[test]
    fn unreachable_covers_sentinel_and_cluster_outages_but_not_refused_commands() {
        assert!(is_unreachable(&RedisError::from((
            ErrorKind::MasterNameNotFoundBySentinel,
            "Master with given name not found in sentinel",
        ))));
        assert!(is_unreachable(&RedisError::from((
            ErrorKind::ClusterConnectionNotFound,
            "No connections found",
        ))));
        assert!(!is_unreachable(&RedisError::from((
            ErrorKind::Server(ServerErrorKind::CrossSlot),
            "Keys in request don't hash to the same slot",
        ))));
    }

    #[test]
    fn sentinels_over_tls_with_a_private_ca_make_a_client() {
        let ca = ca_file();
        let settings = settings(&format!(
            "    mode: sentinel\n    urls: [rediss://sentinel-0:26379, rediss://sentinel-1:26379]\n    ca_file: {}\n    sentinel: {{ master_name: tokens }}\n",
            ca.path().display()
        ));
        let (conn, url) = connect(&settings).expect("a sentinel client");
        assert!(matches!(conn, Connection::Sentinel(_)));
        assert_eq!(url, "rediss://sentinel-0:26379, rediss://sentinel-1:26379");
    }

    #[tokio::test]
    async fn a_cluster_over_tls_with_a_private_ca_makes_a_client() {
        let ca = ca_file();
        let settings = settings(&format!(
            "    mode: cluster\n    url: rediss://clustercfg.tokens.example:6379\n    ca_file: {}\n",
            ca.path().display()
        ));
        let (conn, _) = connect(&settings).expect("a cluster client");
        assert!(matches!(conn, Connection::Cluster(_)));
    }

    #[test]
    fn a_url_read_at_startup_is_checked_for_the_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("url");
        std::fs::write(&file, "redis://node-0:6379/3\n").expect("write URL");
        let settings = settings(&format!(
            "    mode: cluster\n    url: {{ file: {} }}\n",
            file.display()
        ));
        let error = connect(&settings).err().expect("refused");
        assert_eq!(error.path, "cache.shared.url");
        assert!(error.detail.contains("no database number"), "{error}");
    }
}
