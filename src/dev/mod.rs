//! `oboe dev`: a complete local setup in one process, like `vault server -dev`.
//! Everything binds loopback only and says loudly that it is for development.

pub mod echo;
pub mod idp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::{Listeners, RunError};

/// oboe's client id in the dev setup.
pub const DEV_OBOE_CLIENT_ID: &str = "0b0e0b0e-0000-4000-8000-00000000de70";

/// Addresses of a running dev setup.
#[derive(Debug, Clone)]
pub struct DevSetup {
    /// The proxy listener.
    pub proxy: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The upstream every dev route goes to (`http://host:port`, no trailing
    /// slash): the built-in echo server unless another was given.
    pub upstream: String,
    /// The development IdP's base URL.
    pub idp: String,
}

/// The route file `oboe dev` runs: an open echo route, a validated `forward`
/// route, an On-Behalf-Of route and a client-credentials route, all to the
/// echo upstream, with the dev IdP as the Entra instance.
pub fn dev_config_yaml(setup: &DevSetup, secret_file: &std::path::Path) -> String {
    let DevSetup {
        proxy,
        admin,
        upstream,
        idp,
    } = setup;
    let tenant = idp::DEV_TENANT;
    format!(
        r#"# oboe dev: development only, everything on loopback.
listen: {proxy}
admin: {{ listen: {admin} }}
shutdown_grace: 2s
identity:
  provider: entra
  instance: {idp}
  tenant_id: {tenant}
  client_id: {DEV_OBOE_CLIENT_ID}
  credential:
    client_secret: {{ file: {secret} }}
inbound:
  algorithms: [RS256, PS256, ES256]
routes:
  - name: echo
    path_prefix: /echo/
    upstream: {upstream}/
    caller: {{ required: false }}
    token: {{ grant: none }}
  - name: api
    path_prefix: /api/
    upstream: {upstream}/api/
    caller: {{ required: true, scopes: [access_as_user] }}
    token: {{ grant: forward }}
  - name: graph
    path_prefix: /graph/
    upstream: {upstream}/v1.0/
    caller: {{ required: true, kinds: [user] }}
    token: {{ grant: on_behalf_of, scopes: [https://graph.microsoft.com/User.Read] }}
  - name: jobs
    path_prefix: /jobs/
    upstream: {upstream}/jobs/
    caller: {{ required: false }}
    token: {{ grant: client_credentials, scopes: [api://jobs/.default] }}
"#,
        secret = secret_file.display(),
    )
}

/// What `oboe dev` is asked to do besides its defaults.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The proxy listener address.
    pub listen: SocketAddr,
    /// Send the dev routes here (`http://host:port`) instead of the built-in
    /// echo server.
    pub upstream: Option<String>,
    /// Mint this many user tokens (distinct `oid`/`sub`, ES256) before the
    /// banner, one per line into the file: the load benchmark's "new user
    /// every request".
    pub mint_users: Option<(u64, PathBuf)>,
    /// Read oboe's client secret from this file instead of generating one,
    /// so that another oboe (`oboe run`) can use the dev IdP with it.
    pub client_secret_file: Option<PathBuf>,
}

impl DevOptions {
    /// Defaults: everything built in, nothing minted.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            upstream: None,
            mint_users: None,
            client_secret_file: None,
        }
    }
}

/// Starts the dev IdP, the echo upstream and the proxy on loopback, prints how
/// to call them, and runs until `shutdown` completes.
pub async fn run(
    options: DevOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let DevOptions {
        listen,
        upstream,
        mint_users,
        client_secret_file,
    } = options;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { addr, source })
    };
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let echo_listener = bind(loopback).await?;
    let echo_addr = local(&echo_listener, loopback);
    tokio::spawn(echo::serve(echo_listener));

    let idp = idp::DevIdp::start()
        .await
        .map_err(|source| RunError::Bind {
            addr: loopback,
            source,
        })?;
    // RunError has no variant for dev-only files; their errors name the file.
    let io_error = |source| RunError::Bind {
        addr: loopback,
        source,
    };
    let secret_file = match client_secret_file {
        Some(path) => SecretFile::given(path).map_err(io_error)?,
        // A fresh random secret, in a file only this user can read, removed on exit.
        None => SecretFile::write(&crate::exchange::credential::random_id()).map_err(io_error)?,
    };
    idp.register_client(idp::Client::secret(
        DEV_OBOE_CLIENT_ID,
        secret_file.secret.clone(),
    ));

    let proxy = bind(listen).await?;
    let admin = bind(loopback).await?;
    let setup = DevSetup {
        proxy: local(&proxy, listen),
        admin: local(&admin, loopback),
        upstream: upstream
            .map(|u| u.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| format!("http://{echo_addr}")),
        idp: idp.base_url(),
    };
    let yaml = dev_config_yaml(&setup, &secret_file.path);
    let config: Config = match config::load_str(&yaml, figment::providers::Env::raw().only(&[])) {
        Ok(c) => c,
        Err(e) => {
            // The dev route file is ours; failing to load it is a bug.
            tracing::error!(error = %e, "load dev configuration");
            return Ok(());
        }
    };
    if let Some((count, path)) = mint_users {
        let minter = idp.clone();
        let started = std::time::Instant::now();
        let written = tokio::task::spawn_blocking(move || write_user_tokens(&minter, count, &path))
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
            .map_err(io_error)?;
        tracing::info!(
            users = count,
            file = %written.display(),
            elapsed_ms = started.elapsed().as_millis(),
            "minted user tokens (ES256, one distinct oid per line)"
        );
    }
    let token = idp.mint(&idp::Mint::user(format!("api://{DEV_OBOE_CLIENT_ID}")));
    print_banner(&setup, &token);
    crate::run(config, Listeners { proxy, admin }, shutdown).await
}

/// Writes `count` user tokens for oboe's audience, one per line, each for
/// its own user (`oid`, `sub`), signed ES256: far cheaper to mint than an RSA
/// signature (about 30 µs a token on the 2-core bench machine), and the dev
/// route file accepts it. Returns the path.
fn write_user_tokens(idp: &idp::DevIdp, count: u64, path: &Path) -> std::io::Result<PathBuf> {
    use std::io::Write;
    let error = |e| in_file("write user tokens", path, e);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(error)?);
    let base =
        idp::Mint::user(format!("api://{DEV_OBOE_CLIENT_ID}")).alg(jsonwebtoken::Algorithm::ES256);
    for n in 0..count {
        let spec = idp::Mint {
            // A version-4-shaped GUID per user; the tail is the user's number.
            oid: format!("b0e5e000-0000-4000-8000-{n:012x}"),
            sub: format!("bench-user-{n}"),
            ..base.clone()
        };
        writeln!(out, "{}", idp.mint(&spec)).map_err(error)?;
    }
    out.flush().map_err(error)?;
    Ok(path.to_owned())
}

/// An I/O error that says what was done to which file.
fn in_file(verb: &str, path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{verb} {}: {e}", path.display()))
}

/// The dev client secret on disk; a generated one is deleted when dropped.
struct SecretFile {
    path: PathBuf,
    secret: String,
    remove: bool,
}

impl SecretFile {
    fn write(secret: &str) -> std::io::Result<Self> {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!(
            "oboe-dev-secret-{}",
            crate::exchange::credential::random_id()
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&path)?.write_all(secret.as_bytes())?;
        Ok(Self {
            path,
            secret: secret.to_owned(),
            remove: true,
        })
    }

    /// A secret someone else wrote (and keeps): read, never removed.
    fn given(path: PathBuf) -> std::io::Result<Self> {
        let secret = std::fs::read_to_string(&path)
            .map_err(|e| in_file("read client secret", &path, e))?
            .trim()
            .to_owned();
        if secret.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("read client secret: {} is empty", path.display()),
            ));
        }
        Ok(Self {
            path,
            secret,
            remove: false,
        })
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn local(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

fn print_banner(setup: &DevSetup, token: &str) {
    println!(
        r#"
  oboe dev: DEVELOPMENT ONLY. Nothing here is secure; everything listens on loopback.

  proxy      http://{proxy}
  admin      http://{admin}/metrics  /readyz  /healthz
  idp        {idp}  (development identity provider, Entra-shaped)
  upstream   {upstream}  (the echo server answers with what it received)

  A user token from the dev IdP (valid for an hour):

    export TOKEN={token}

  Try it:

    # no token needed; Authorization is stripped
    curl -s http://{proxy}/echo/hello?greeting=hi
    # validated and forwarded unchanged (an ingress guard)
    curl -s http://{proxy}/api/orders -H "Authorization: Bearer $TOKEN"
    # exchanged On-Behalf-Of: the upstream sees a Graph token, never yours
    curl -s http://{proxy}/graph/me -H "Authorization: Bearer $TOKEN"
    # app-only token by client credentials, no caller token needed
    curl -s http://{proxy}/jobs/run
    # your validated claims, and the downstream token for a route
    curl -s http://{proxy}/.oboe/v1/validate -H "Authorization: Bearer $TOKEN"
    curl -s http://{proxy}/.oboe/v1/token/graph -H "Authorization: Bearer $TOKEN"
    # refused: 401 invalid_token with a problem+json body
    curl -si http://{proxy}/api/orders -H "Authorization: Bearer nope"

"#,
        proxy = setup.proxy,
        admin = setup.admin,
        upstream = setup.upstream,
        idp = setup.idp,
    );
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn part(token: &str, n: usize) -> serde_json::Value {
        use base64::Engine as _;
        let raw = token.split('.').nth(n).expect("three parts");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .expect("base64url");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[tokio::test]
    async fn minted_users_are_one_es256_token_per_line_each_for_another_user() {
        let idp = idp::DevIdp::start().await.expect("start dev IdP");
        let path = std::env::temp_dir().join(format!(
            "oboe-dev-users-{}",
            crate::exchange::credential::random_id()
        ));
        write_user_tokens(&idp, 3, &path).expect("write tokens");
        let text = std::fs::read_to_string(&path).expect("read tokens");
        let _ = std::fs::remove_file(&path);
        let tokens: Vec<&str> = text.lines().collect();
        assert_eq!(tokens.len(), 3);
        let mut users = HashSet::new();
        for token in tokens {
            assert_eq!(part(token, 0)["alg"], "ES256");
            let claims = part(token, 1);
            assert_eq!(claims["aud"], format!("api://{DEV_OBOE_CLIENT_ID}"));
            assert_eq!(claims["scp"], "access_as_user");
            users.insert((claims["oid"].to_string(), claims["sub"].to_string()));
        }
        assert_eq!(users.len(), 3, "every token is another user");
    }

    #[test]
    fn a_given_client_secret_file_is_read_trimmed_and_kept() {
        let path = std::env::temp_dir().join(format!(
            "oboe-dev-secret-test-{}",
            crate::exchange::credential::random_id()
        ));
        std::fs::write(&path, "bench-secret\n").expect("write secret");
        let file = SecretFile::given(path.clone()).expect("read secret");
        assert_eq!(file.secret, "bench-secret");
        drop(file);
        assert!(path.exists(), "a secret someone else wrote is not removed");
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, " \n").expect("write secret");
        assert!(SecretFile::given(path.clone()).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
