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
    drop(init(&crate::config::Telemetry::default()));
}

/// Keeps the span exporter running; dropping it flushes what is buffered.
#[must_use = "dropping the guard stops span export"]
#[derive(Default)]
pub struct TracingGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Like [`init_logging`], and exports spans over OTLP when `telemetry.otlp` is
/// set (builds with the `otlp` feature only; the config refuses it otherwise).
pub fn init(telemetry: &crate::config::Telemetry) -> TracingGuard {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::try_from_env("OBOE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("OBOE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok(_) => false,
        Err(_) => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal()).boxed()
    };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    let guard = TracingGuard::default();
    #[cfg(feature = "otlp")]
    if let Some(otlp) = &telemetry.otlp {
        match otel::layer(otlp) {
            Ok((layer, provider)) => {
                // A second init (tests) keeps the first.
                let _ = registry.with(layer).try_init();
                return TracingGuard {
                    provider: Some(provider),
                };
            }
            Err(e) => eprintln!("OTLP export disabled: {e}"),
        }
    }
    let _ = telemetry;
    // A second init (tests, `dev` inside another process) keeps the first.
    let _ = registry.try_init();
    guard
}

/// W3C trace context between `http::HeaderMap`s and OpenTelemetry, and the
/// OTLP pipeline. Only in builds with the `otlp` feature.
#[cfg(feature = "otlp")]
pub mod otel {
    use http::HeaderMap;
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use crate::config::Otlp;

    /// The exporter layer and its provider (kept alive by the caller).
    pub fn layer<S>(
        otlp: &Otlp,
    ) -> Result<
        (
            impl tracing_subscriber::Layer<S> + 'static,
            SdkTracerProvider,
        ),
        String,
    >
    where
        S: tracing::Subscriber + Send + Sync + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(otlp.endpoint.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                otlp.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(otlp.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("oboe");
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let filter =
            tracing_subscriber::filter::Targets::new().with_target("oboe", tracing::Level::DEBUG);
        use tracing_subscriber::Layer;
        Ok((
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(filter),
            provider,
        ))
    }

    struct Headers<'a>(&'a HeaderMap);

    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }

    struct HeadersMut<'a>(&'a mut HeaderMap);

    impl Injector for HeadersMut<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(name), Ok(value)) = (
                http::header::HeaderName::from_bytes(key.as_bytes()),
                http::HeaderValue::from_str(&value),
            ) {
                self.0.insert(name, value);
            }
        }
    }

    /// Makes the caller's `traceparent` the parent of `span`.
    pub fn adopt_parent(span: &tracing::Span, headers: &HeaderMap) {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let _ = span.set_parent(parent);
    }

    /// Writes `span`'s context as `traceparent`/`tracestate` for the upstream,
    /// so the upstream's spans are children of oboe's.
    pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
        let context = span.context();
        TraceContextPropagator::new().inject_context(&context, &mut HeadersMut(headers));
    }
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
    /// Shared (Redis) cache lookups after an in-memory miss, by outcome.
    pub shared_cache: Family<OutcomeLabel, Counter>,
    /// Shared cache failures (Redis errors and timeouts, undecryptable values), by reason.
    pub shared_cache_errors: Family<ReasonLabel, Counter>,
    /// Duration of each Redis round trip.
    pub shared_cache_duration: Histogram,
    /// The Redis circuit breaker: 0 closed, 1 open (Redis skipped), 2 half-open (probing).
    pub shared_cache_breaker: Gauge,
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
        let shared_cache = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "shared_cache",
            "Shared (Redis) token cache lookups after an in-memory miss, by outcome (hit, miss, waited, wait_timeout, skipped)",
            shared_cache.clone(),
        );
        let shared_cache_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "shared_cache_errors",
            "Shared token cache failures, by reason (timeout, connection, server, undecryptable, unknown_key); requests go on without it",
            shared_cache_errors.clone(),
        );
        // 50 µs to ~0.8 s: a Redis round trip is well under a millisecond.
        let shared_cache_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 15));
        registry.register(
            "shared_cache_duration_seconds",
            "Duration of each Redis round trip of the shared token cache",
            shared_cache_duration.clone(),
        );
        let shared_cache_breaker = Gauge::default();
        registry.register(
            "shared_cache_breaker_state",
            "Redis circuit breaker: 0 closed, 1 open (Redis skipped), 2 half-open (probing)",
            shared_cache_breaker.clone(),
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
            shared_cache,
            shared_cache_errors,
            shared_cache_duration,
            shared_cache_breaker,
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
