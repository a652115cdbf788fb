//! The `oboe` command: parse arguments, load the route file, run. All the work
//! lives in the library.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// On-Behalf-Of exchange sidecar.
#[derive(Parser)]
#[command(name = "oboe", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run {
        /// The route file.
        #[arg(long, env = "OBOE_CONFIG")]
        config: PathBuf,
    },
    /// Load and validate a route file; print every problem, or the effective
    /// configuration with secrets redacted. Binds nothing.
    Check {
        /// The route file.
        #[arg(long, env = "OBOE_CONFIG")]
        config: PathBuf,
    },
    /// Run a complete local setup (development IdP, echo upstream and proxy) on loopback.
    Dev {
        /// Proxy listener address.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Send the dev routes to this upstream (`http://host:port`) instead of
        /// the built-in echo server (the load benchmark uses it).
        #[arg(long)]
        upstream: Option<String>,
        /// Mint this many user tokens (ES256, each for a different user) into
        /// --mint-file, one per line, before printing the banner.
        #[arg(long, value_name = "N", requires = "mint_file")]
        mint_users: Option<u64>,
        /// Where --mint-users writes its tokens (created or truncated).
        #[arg(long, value_name = "PATH", requires = "mint_users")]
        mint_file: Option<PathBuf>,
        /// Use the secret in this file as oboe's client secret at the dev IdP
        /// instead of a random one, so another oboe (`oboe run`) can use the
        /// dev IdP too.
        #[arg(long, value_name = "PATH")]
        client_secret_file: Option<PathBuf>,
    },
    /// Print the JSON Schema of the route file.
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&oboe::config::schema()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Command::Run { config: path } => {
            let config = match oboe::config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    oboe::telemetry::init_logging();
                    tracing::error!("{e}");
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            // The OTLP exporter runs on the runtime; the guard flushes it on exit.
            let telemetry = config.telemetry.clone();
            block_on(async move {
                let _tracing = oboe::telemetry::init(&telemetry);
                let listeners = oboe::Listeners::bind(&config).await?;
                oboe::run_watching(config, path, listeners, shutdown_signal()).await
            })
        }
        Command::Dev {
            listen,
            upstream,
            mint_users,
            mint_file,
            client_secret_file,
        } => {
            if std::env::var_os("OBOE_LOG").is_none() {
                init_dev_logging();
            } else {
                oboe::telemetry::init_logging();
            }
            let options = oboe::dev::DevOptions {
                upstream,
                mint_users: mint_users.zip(mint_file),
                client_secret_file,
                ..oboe::dev::DevOptions::new(listen)
            };
            block_on(oboe::dev::run(options, shutdown_signal()))
        }
    }
}

fn init_dev_logging() {
    let filter = tracing_subscriber::EnvFilter::new("info");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn check(path: &std::path::Path) -> ExitCode {
    match oboe::config::load(path) {
        Ok(config) => {
            match serde_saphyr::to_string(&config) {
                Ok(yaml) => print!("# {}: OK\n{yaml}", path.display()),
                Err(_) => println!(
                    "{}",
                    serde_json::to_string_pretty(&config).unwrap_or_default()
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn block_on(future: impl std::future::Future<Output = Result<(), oboe::RunError>>) -> ExitCode {
    // A sidecar pinned to one CPU (a CPU limit of 1 or less, or taskset) runs
    // best on the single-threaded scheduler: no work stealing, no cross-thread
    // wake-ups. std's available_parallelism honours affinity and cgroup quotas.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("oboe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("oboe: second signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
