//! `oboe dev`: a complete local setup in one process, like `vault server -dev`.
//! Everything binds loopback only and says loudly that it is for development.

pub mod echo;
pub mod idp;

use std::net::SocketAddr;

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

/// Starts the dev IdP, the echo upstream and the proxy on loopback, prints how
/// to call them, and runs until `shutdown` completes.
pub async fn run(
    listen: SocketAddr,
    upstream: Option<String>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
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
    // A fresh random secret, in a file only this user can read, removed on exit.
    let secret = crate::exchange::credential::random_id();
    idp.register_client(idp::Client::secret(DEV_OBOE_CLIENT_ID, secret.clone()));
    let secret_file = SecretFile::write(&secret).map_err(|source| RunError::Bind {
        addr: loopback,
        source,
    })?;

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
    let yaml = dev_config_yaml(&setup, &secret_file.0);
    let config: Config = match config::load_str(&yaml, figment::providers::Env::raw().only(&[])) {
        Ok(c) => c,
        Err(e) => {
            // The dev route file is ours; failing to load it is a bug.
            tracing::error!(error = %e, "load dev configuration");
            return Ok(());
        }
    };
    let token = idp.mint(&idp::Mint::user(format!("api://{DEV_OBOE_CLIENT_ID}")));
    print_banner(&setup, &token);
    crate::run(config, Listeners { proxy, admin }, shutdown).await
}

/// The dev client secret on disk, deleted when dropped.
struct SecretFile(std::path::PathBuf);

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
        Ok(Self(path))
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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
