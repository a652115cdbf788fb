//! `oboe dev`: a complete local setup in one process, like `vault server -dev`.
//! Everything binds loopback only and says loudly that it is for development.

pub mod echo;
pub mod idp;

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::{Listeners, RunError};

/// Addresses of a running dev setup.
#[derive(Debug, Clone)]
pub struct DevSetup {
    /// The proxy listener.
    pub proxy: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The echo upstream.
    pub echo: SocketAddr,
}

/// The route file `oboe dev` runs, for a given echo upstream address.
pub fn dev_config_yaml(listen: SocketAddr, admin: SocketAddr, echo: SocketAddr) -> String {
    format!(
        r#"# oboe dev: development only, everything on loopback.
listen: {listen}
admin: {{ listen: {admin} }}
shutdown_grace: 2s
routes:
  - name: echo
    path_prefix: /echo/
    upstream: http://{echo}/
    caller: {{ required: false }}
    token: {{ grant: none }}
"#
    )
}

/// Starts the echo upstream and the proxy on loopback, prints how to call them,
/// and runs until `shutdown` completes.
pub async fn run(
    listen: SocketAddr,
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

    let proxy = bind(listen).await?;
    let admin = bind(loopback).await?;
    let setup = DevSetup {
        proxy: local(&proxy, listen),
        admin: local(&admin, loopback),
        echo: echo_addr,
    };
    let yaml = dev_config_yaml(setup.proxy, setup.admin, setup.echo);
    let config: Config = match config::load_str(&yaml, figment::providers::Env::raw().only(&[])) {
        Ok(c) => c,
        Err(e) => {
            // The dev route file is ours; failing to load it is a bug.
            tracing::error!(error = %e, "load dev configuration");
            return Ok(());
        }
    };
    print_banner(&setup);
    crate::run(config, Listeners { proxy, admin }, shutdown).await
}

fn local(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

fn print_banner(setup: &DevSetup) {
    println!(
        r#"
  oboe dev: DEVELOPMENT ONLY. Nothing here is secure; everything listens on loopback.

  proxy      http://{proxy}
  admin      http://{admin}/metrics  /readyz  /healthz
  upstream   http://{echo}  (echo: answers with what it received)

  Try it:

    curl -s http://{proxy}/echo/hello?greeting=hi -H 'x-demo: 1'

"#,
        proxy = setup.proxy,
        admin = setup.admin,
        echo = setup.echo,
    );
}
