//! The hot steps of the request path, each on its own: path check, routing,
//! header rewrite, caller-token validation (fresh and from the verified-token
//! cache), and a downstream-token cache hit with the `Authorization` rewrite.
//!
//! Validation and exchange run against the real development IdP on loopback,
//! so the keys and tokens are the real thing; only the measured step runs in
//! the timed loop.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderValue};
use oboe::auth::Authenticator;
use oboe::auth::jwks::JwksSettings;
use oboe::config::{self, Config};
use oboe::dev::idp::{Client as IdpClient, DEV_TENANT, DevIdp, Mint};
use oboe::exchange::Exchanger;
use oboe::http_client::IdpClient as Http;
use oboe::proxy::headers::{ClientInfo, to_upstream};
use oboe::proxy::route::{Router, check_path};
use oboe::telemetry::Metrics;

const CLIENT: &str = "6a1f0c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";

fn config(idp: &DevIdp, secret_file: &std::path::Path) -> Config {
    let yaml = format!(
        "identity:\n  provider: entra\n  instance: {}\n  tenant_id: {DEV_TENANT}\n  client_id: {CLIENT}\n  credential:\n    client_secret: {{ file: {} }}\nroutes:\n  - name: graph\n    path_prefix: /graph/\n    upstream: https://graph.microsoft.com/v1.0/\n    token: {{ grant: on_behalf_of, scopes: [https://graph.microsoft.com/User.Read] }}\n  - name: api\n    path_prefix: /api/orders/\n    upstream: http://127.0.0.1:8080/orders/\n    token: {{ grant: forward }}\n  - name: catalog\n    path_prefix: /catalog/\n    upstream: http://127.0.0.1:8081/\n    caller: {{ required: false }}\n    token: {{ grant: none }}\n    headers: {{ set: {{ x-client: bench }}, remove: [cookie] }}\n",
        idp.base_url(),
        secret_file.display()
    );
    config::load_str(&yaml, figment::providers::Env::raw().only(&[])).expect("bench config")
}

fn caller_headers(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    headers.insert("accept", HeaderValue::from_static("application/json"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    headers.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    headers
}

fn benches(c: &mut Criterion) {
    oboe::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let idp = runtime.block_on(DevIdp::start()).expect("dev IdP");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "bench-secret").expect("write secret");
    idp.register_client(IdpClient::secret(CLIENT, "bench-secret"));
    let config = config(&idp, &secret_file);
    let metrics = Arc::new(Metrics::new());
    let http = Http::new(None, Duration::from_secs(2), Duration::from_secs(10)).expect("client");
    let identity = config.identity.clone().expect("identity");
    let auth = runtime.block_on(async {
        let auth = Authenticator::new(
            &identity,
            &config.inbound,
            http.clone(),
            oboe::clock::system(),
            JwksSettings::default(),
            metrics.clone(),
        );
        auth.start();
        while !auth.is_ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        auth
    });
    let mint = || {
        idp.mint(
            &Mint::user(format!("api://{CLIENT}"))
                .scopes(["access_as_user"])
                .claim("uti", oboe::exchange::credential::random_id()),
        )
    };

    // 1. Path safety and routing.
    let router = Router::new(config.routes.iter().cloned());
    c.bench_function("check_path", |b| {
        b.iter(|| check_path(std::hint::black_box("/api/orders/4711/lines?expand=all")))
    });
    c.bench_function("route_longest_prefix", |b| {
        b.iter(|| {
            router
                .find(std::hint::black_box("/api/orders/4711/lines"))
                .map(|m| m.rest.len())
        })
    });

    // 2. Header rewrite for the upstream.
    let catalog = router.find("/catalog/x").expect("route").route.clone();
    let template = caller_headers("x");
    c.bench_function("headers_to_upstream", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |headers| {
                to_upstream(
                    headers,
                    &catalog.headers,
                    ClientInfo {
                        ip: [127, 0, 0, 1].into(),
                        proto: "http",
                    },
                    Some(HeaderValue::from_static("127.0.0.1:7070")),
                    &catalog.upstream.host_header,
                )
            },
            BatchSize::SmallInput,
        )
    });

    // 3. Caller-token validation: the bearer token taken from `Authorization`
    //    (checked character by character), then a token never seen
    //    (signature verified) and one in the verified-token cache.
    let sample = caller_headers(&mint());
    c.bench_function("bearer_extract", |b| {
        b.iter(|| oboe::auth::bearer::extract(std::hint::black_box(&sample)).expect("bearer"))
    });
    c.bench_function("validate_fresh_rs256", |b| {
        b.iter_batched(
            || caller_headers(&mint()),
            |headers| {
                runtime
                    .block_on(auth.authenticate(&headers))
                    .expect("valid")
            },
            BatchSize::SmallInput,
        )
    });
    let seen = caller_headers(&mint());
    runtime.block_on(auth.authenticate(&seen)).expect("valid");
    c.bench_function("validate_cached", |b| {
        b.iter(|| runtime.block_on(auth.authenticate(&seen)).expect("valid"))
    });

    // 4. Downstream token from the cache, and the Authorization rewrite.
    let exchanger = Exchanger::new(
        &config,
        http,
        Some(auth.clone()),
        oboe::clock::system(),
        metrics,
    )
    .expect("exchanger")
    .expect("an exchange route");
    let graph = router.find("/graph/me").expect("route").route.clone();
    let token = mint();
    let headers = caller_headers(&token);
    let caller = runtime
        .block_on(auth.authenticate(&headers))
        .expect("valid");
    runtime
        .block_on(exchanger.token(&graph, Some(caller.as_ref()), Some(&token)))
        .expect("first exchange");
    c.bench_function("token_cache_hit_and_rewrite", |b| {
        b.iter_batched_ref(
            || headers.clone(),
            |headers| {
                let entry = runtime
                    .block_on(exchanger.token(&graph, Some(caller.as_ref()), Some(&token)))
                    .expect("cached");
                headers.insert(AUTHORIZATION, entry.authorization.clone());
            },
            BatchSize::SmallInput,
        )
    });
    drop(dir);
}

criterion_group! {
    name = request_path;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(request_path);
