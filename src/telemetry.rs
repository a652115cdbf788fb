//! Logging setup and the Prometheus metrics registry. Metric labels never carry
//! a token, a secret or a user id: only route names, methods, status classes and
//! failure kinds, all of them bounded sets.

use std::io::IsTerminal;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber: human-readable on a terminal, JSON
/// when `OBOE_LOG_FORMAT=json` (or when stdout is not a terminal and the variable
/// is unset, as in a container). Level from `OBOE_LOG` (default `info`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_env("OBOE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("OBOE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok(_) => false,
        Err(_) => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    // A second init (tests, `dev` inside another process) keeps the first.
    drop(result);
}

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name, or `none` when no route matched.
    pub route: String,
    /// Request method, `other` for non-standard ones.
    pub method: &'static str,
    /// `2xx`, `4xx`, ...
    pub status: &'static str,
}

/// A route label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Route name.
    pub route: String,
}

/// Labels of an upstream failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    /// Route name.
    pub route: String,
    /// `connect`, `protocol` or `timeout`.
    pub kind: &'static str,
}

/// A reason label (bounded set of static strings).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// An outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok`, `failed`, `hit`, `miss`, ...
    pub outcome: &'static str,
}

/// An issuer label: the configured identity (instance and tenant, or OIDC
/// issuer URL), never anything from a token.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabel {
    /// The issuer.
    pub issuer: String,
}

/// Labels of a token exchange.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    /// `on_behalf_of`, `token_exchange` or `client_credentials`.
    pub grant: &'static str,
    /// `ok` or the failure kind.
    pub outcome: &'static str,
}

/// A gauge that holds seconds as a float.
pub type SecondsGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Called right before `/metrics` is rendered, to refresh gauges computed on demand.
pub type ScrapeHook = Box<dyn Fn() + Send + Sync>;

/// Every metric oboe exports.
pub struct Metrics {
    registry: Registry,
    /// Requests finished, by route, method and status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Request duration from arrival to the end of the response body.
    pub request_duration: Family<RouteLabel, Histogram>,
    /// Upstream failures by kind.
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    /// Requests in flight.
    pub in_flight: Gauge,
    /// Open proxy connections.
    pub connections: Gauge,
    /// Connections refused because `limits.max_connections` was reached.
    pub connections_refused: Counter,
    /// Caller tokens refused, by reason.
    pub auth_rejections: Family<ReasonLabel, Counter>,
    /// Signing-key set fetches, by outcome.
    pub jwks_refreshes: Family<OutcomeLabel, Counter>,
    /// Verified-token cache lookups, by outcome (hit, miss).
    pub verified_cache: Family<OutcomeLabel, Counter>,
    /// Seconds since the last successful key-set fetch, per issuer.
    pub jwks_age: Family<IssuerLabel, SecondsGauge>,
    /// Token requests to the IdP, by grant and outcome.
    pub exchanges: Family<ExchangeLabels, Counter>,
    /// Duration of token requests to the IdP (retry included).
    pub exchange_duration: Histogram,
    /// Downstream token cache lookups, by outcome (hit, refresh, miss, negative).
    pub token_cache: Family<OutcomeLabel, Counter>,
    /// Route file reloads, by outcome (ok, invalid, restart_required).
    pub config_reloads: Family<OutcomeLabel, Counter>,
    /// Unix time of the last successful reload.
    pub config_last_reload: SecondsGauge,
    scrape_hooks: std::sync::Mutex<Vec<(&'static str, ScrapeHook)>>,
}

fn duration_histogram() -> Histogram {
    // 250 µs to ~16 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

impl Metrics {
    /// Creates the registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("oboe");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route, method and status class",
            requests.clone(),
        );
        let request_duration = Family::<RouteLabel, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request arrival to the end of the response body",
            request_duration.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream calls that failed, by kind (connect, protocol, timeout)",
            upstream_errors.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests in flight",
            in_flight.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections_open",
            "Open connections on the proxy listener",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections answered 503 because limits.max_connections was reached",
            connections_refused.clone(),
        );
        let auth_rejections = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "auth_rejections",
            "Requests refused because of the caller's token, by reason",
            auth_rejections.clone(),
        );
        let jwks_refreshes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "jwks_refreshes",
            "Signing-key set fetches, by outcome (ok, failed)",
            jwks_refreshes.clone(),
        );
        let verified_cache = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "verified_token_cache",
            "Verified-token cache lookups, by outcome (hit, miss)",
            verified_cache.clone(),
        );
        let jwks_age = Family::<IssuerLabel, SecondsGauge>::default();
        registry.register(
            "jwks_age_seconds",
            "Seconds since the issuer's signing keys were last fetched successfully",
            jwks_age.clone(),
        );
        let exchanges = Family::<ExchangeLabels, Counter>::default();
        registry.register(
            "exchanges",
            "Token requests to the identity provider, by grant and outcome",
            exchanges.clone(),
        );
        let exchange_duration = duration_histogram();
        registry.register(
            "exchange_duration_seconds",
            "Duration of token requests to the identity provider, retry included",
            exchange_duration.clone(),
        );
        let token_cache = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "token_cache",
            "Downstream token cache lookups, by outcome (hit, refresh, miss, negative)",
            token_cache.clone(),
        );
        let config_reloads = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Route file reloads, by outcome (ok, invalid, restart_required)",
            config_reloads.clone(),
        );
        let config_last_reload = SecondsGauge::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful route file reload",
            config_last_reload.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            registry,
            requests,
            request_duration,
            upstream_errors,
            in_flight,
            connections,
            connections_refused,
            auth_rejections,
            jwks_refreshes,
            verified_cache,
            jwks_age,
            exchanges,
            exchange_duration,
            token_cache,
            config_reloads,
            config_last_reload,
            scrape_hooks: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Registers (or replaces, by name) a hook run before every scrape.
    pub fn on_scrape(&self, name: &'static str, hook: ScrapeHook) {
        if let Ok(mut hooks) = self.scrape_hooks.lock() {
            hooks.retain(|(n, _)| *n != name);
            hooks.push((name, hook));
        }
    }

    /// The registry, for modules that register their own metrics.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        if let Ok(hooks) = self.scrape_hooks.lock() {
            for (_, hook) in hooks.iter() {
                hook();
            }
        }
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A bounded label for a method.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `2xx`, `3xx`, ... for a status.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
