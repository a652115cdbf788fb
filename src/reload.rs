//! Hot reload of the route file: a changed file (including the symlink swap
//! Kubernetes does when a ConfigMap changes) or SIGHUP loads it again.
//!
//! A valid file replaces routes, policies, grants and header edits atomically:
//! requests already in flight finish on the configuration they started with
//! (each holds its own `Arc<Proxy>`), open connections stay open, and the
//! downstream token cache is kept. An invalid file is refused, the old
//! configuration stays in force, and the problems are logged with their key
//! paths. Settings that cannot change live are reported, not half-applied: a
//! new `identity` or `inbound` refuses the whole reload; new listener addresses,
//! limits, upstream client settings or `shutdown_grace` are reported as needing
//! a restart while the rest of the file applies.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::digest;
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::clock;
use crate::config::{self, Config};
use crate::exchange::Exchanger;
use crate::http_client::IdpClient;
use crate::proxy::Proxy;
use crate::telemetry::{Metrics, OutcomeLabel};

/// How often the route file is compared with the one in force.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What a request needs of the configuration in force, swapped as one.
pub struct Live {
    /// The request path.
    pub proxy: ArcSwap<Proxy>,
    config: ArcSwap<Config>,
    auth: Option<Arc<Authenticator>>,
    idp_client: IdpClient,
    clock: clock::SharedClock,
    metrics: Arc<Metrics>,
}

/// The outcome of one reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new file is in force.
    Applied {
        /// Changed settings that need a restart (the rest applied).
        needs_restart: Vec<&'static str>,
    },
    /// The file is the same as the one in force.
    Unchanged,
    /// The file is invalid; the old configuration stays.
    Invalid(String),
    /// The file changes settings that cannot change live; nothing applied.
    RestartRequired(Vec<&'static str>),
}

impl Live {
    /// The running configuration's live state.
    pub fn new(
        proxy: Proxy,
        config: Config,
        auth: Option<Arc<Authenticator>>,
        idp_client: IdpClient,
        clock: clock::SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            proxy: ArcSwap::from_pointee(proxy),
            config: ArcSwap::from_pointee(config),
            auth,
            idp_client,
            clock,
            metrics,
        }
    }

    /// Applies `new` if it can be applied live.
    pub fn apply(&self, mut new: Config) -> Outcome {
        let old = self.config.load_full();
        let same = |a: &dyn erased::Compare, b: &dyn erased::Compare| a.json() == b.json();
        let mut refused = Vec::new();
        if !same(&old.identity, &new.identity) {
            refused.push("identity");
        }
        if !same(&old.inbound, &new.inbound) {
            refused.push("inbound");
        }
        if !refused.is_empty() {
            return Outcome::RestartRequired(refused);
        }
        let mut needs_restart = Vec::new();
        if old.listen != new.listen {
            needs_restart.push("listen");
        }
        if old.admin.listen != new.admin.listen {
            needs_restart.push("admin.listen");
        }
        if !same(&old.limits, &new.limits) {
            needs_restart.push("limits");
        }
        if !same(&old.upstream, &new.upstream) {
            needs_restart.push("upstream");
        }
        if old.shutdown_grace != new.shutdown_grace {
            needs_restart.push("shutdown_grace");
        }
        // Keep what cannot change live, so nothing is half-applied.
        new.listen = old.listen;
        new.admin = old.admin.clone();
        new.limits = old.limits.clone();
        new.upstream = old.upstream.clone();
        new.shutdown_grace = old.shutdown_grace;
        if same(&*old, &new) {
            return Outcome::Unchanged;
        }

        let current = self.proxy.load_full();
        let exchange = match Exchanger::new(
            &new,
            self.idp_client.clone(),
            self.auth.clone(),
            self.clock.clone(),
            self.metrics.clone(),
        ) {
            Ok(Some(mut exchange)) => {
                if let Some(previous) = current.exchanger() {
                    exchange.keep_cache_of(previous, &old.cache, &new.cache);
                }
                Some(Arc::new(exchange))
            }
            Ok(None) => None,
            Err(e) => return Outcome::Invalid(e.to_string()),
        };
        let proxy = match Proxy::new(&new, self.auth.clone(), exchange, self.metrics.clone()) {
            Ok(p) => p,
            Err(e) => return Outcome::Invalid(e.to_string()),
        };
        self.proxy.store(Arc::new(proxy));
        self.config.store(Arc::new(new));
        Outcome::Applied { needs_restart }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .config_reloads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Loads `path` and applies it, logging and counting the outcome.
    pub fn reload_from(&self, path: &std::path::Path) -> Outcome {
        let outcome = match config::load(path) {
            Ok(new) => self.apply(new),
            Err(e) => Outcome::Invalid(e.to_string()),
        };
        match &outcome {
            Outcome::Applied { needs_restart } => {
                self.count("ok");
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_default();
                self.metrics.config_last_reload.set(now);
                let routes = self.config.load().routes.len();
                tracing::info!(file = %path.display(), routes, "route file reloaded");
                if !needs_restart.is_empty() {
                    tracing::warn!(
                        settings = ?needs_restart,
                        "these settings changed but only take effect after a restart; the old values stay in force"
                    );
                }
            }
            Outcome::Unchanged => {}
            Outcome::Invalid(problems) => {
                self.count("invalid");
                tracing::error!(file = %path.display(), "route file refused; the old configuration stays in force: {problems}");
            }
            Outcome::RestartRequired(settings) => {
                self.count("restart_required");
                tracing::error!(
                    file = %path.display(),
                    settings = ?settings,
                    "route file refused: these settings cannot change without a restart; the old configuration stays in force"
                );
            }
        }
        outcome
    }
}

/// Watches `path` (polling its content, which follows symlink swaps) and
/// SIGHUP until `stop` turns true.
pub async fn watch(path: PathBuf, live: Arc<Live>, mut stop: watch::Receiver<bool>) {
    let mut last = fingerprint(&path);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = crate::server::stopped(&mut stop) => return,
            _ = tick.tick() => false,
            _ = hangup => true,
        };
        let now = fingerprint(&path);
        if forced || (now.is_some() && now != last) {
            if forced {
                tracing::info!("SIGHUP: reloading the route file");
            }
            live.reload_from(&path);
            last = now;
        }
    }
}

/// SHA-256 of the file's content, or `None` when it cannot be read (a
/// ConfigMap update in progress); the next poll tries again.
fn fingerprint(path: &std::path::Path) -> Option<[u8; 32]> {
    let bytes = std::fs::read(path).ok()?;
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, &bytes).as_ref());
    Some(out)
}

/// Comparison of config parts through their serialized form (every config type
/// is `Serialize`, which `check` uses too).
mod erased {
    pub trait Compare {
        fn json(&self) -> serde_json::Value;
    }

    impl<T: serde::Serialize> Compare for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_default()
        }
    }
}
