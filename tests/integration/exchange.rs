//! Token exchange against the development IdP: the wire format of each grant
//! and credential, the token cache, and every IdP failure as the caller sees it.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::{Request, StatusCode};
use oboe::dev::idp::{
    Client as Reg, DEFAULT_CHALLENGE_CLAIMS, DEV_TENANT, DEV_USER_OID, DevIdp, Malformed, Mint,
    SECOND_TENANT, Version,
};
use serde_json::{Value, json};

use crate::fixtures::*;
use crate::harness::*;

const GRAPH: &str = "https://graph.microsoft.com/User.Read";

fn obo_token() -> String {
    format!("{{ grant: on_behalf_of, scopes: [{GRAPH}] }}")
}

/// oboe with one OBO route (and a client-credentials route) in front of an echo
/// upstream, authenticating with the client secret from a file.
struct Setup {
    idp: DevIdp,
    oboe: Oboe,
    echo: Upstream,
    _dir: tempfile::TempDir,
}

async fn setup_with(idp: DevIdp, tenant: &str, credential: Option<String>, extra: &str) -> Setup {
    let (dir, secret) = secret_file();
    let credential = credential.unwrap_or(format!("client_secret: {{ file: {secret} }}"));
    let echo = Upstream::echo().await;
    let yaml = format!(
        "{}{extra}routes:\n{}{}",
        entra_identity(&idp, tenant, &credential),
        route(
            "graph",
            "/graph/",
            &echo.url("/v1.0/"),
            "{ required: true }",
            &obo_token()
        ),
        route(
            "jobs",
            "/jobs/",
            &echo.url("/"),
            "{ required: false }",
            "{ grant: client_credentials, scopes: [api://jobs/.default] }"
        ),
    );
    let oboe = Oboe::start(&yaml).await;
    Setup {
        idp,
        oboe,
        echo,
        _dir: dir,
    }
}

async fn setup() -> Setup {
    setup_with(idp().await, DEV_TENANT, None, "").await
}

fn claims_of(authorization: &str) -> Value {
    let token = authorization.trim_start_matches("Bearer ");
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

fn upstream_authorization(reply: &Reply) -> String {
    reply.json()["headers"]["authorization"][0]
        .as_str()
        .expect("the upstream got Authorization")
        .to_owned()
}

fn user(oid: &str) -> Mint {
    let mut mint = user_mint();
    mint.oid = oid.to_owned();
    mint
}

#[tokio::test]
async fn obo_replaces_the_callers_token_with_a_downstream_token() {
    let s = setup().await;
    let caller = s.idp.mint(&user_mint());
    let request = Request::get(s.oboe.proxy_url("/graph/me?$select=id"))
        .header("authorization", format!("Bearer {caller}"))
        .header("x-original-token", format!("Bearer {caller}"))
        .header("x-keep", "1")
        .body(empty())
        .expect("request");
    let reply = Client::http1().send(request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echoed = reply.json();
    assert_eq!(echoed["path"], "/v1.0/me");
    let authorization = upstream_authorization(&reply);
    assert!(
        !reply.text().contains(&caller),
        "the caller's token reached the upstream"
    );
    assert!(echoed["headers"]["x-original-token"].is_null());
    assert_eq!(echoed["headers"]["x-keep"], json!(["1"]));
    let claims = claims_of(&authorization);
    assert_eq!(claims["aud"], "https://graph.microsoft.com");
    assert_eq!(claims["scp"], "User.Read");
    assert_eq!(claims["oid"], DEV_USER_OID);
    assert_eq!(claims["azp"], CLIENT_ID);

    let log = s.idp.token_request_log();
    assert_eq!(log.len(), 1);
    let sent = &log[0];
    assert_eq!(sent.path, format!("/{DEV_TENANT}/oauth2/v2.0/token"));
    assert_eq!(
        sent.get("grant_type"),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    assert_eq!(sent.get("requested_token_use"), Some("on_behalf_of"));
    assert_eq!(sent.get("assertion"), Some(caller.as_str()));
    assert_eq!(sent.get("scope"), Some(GRAPH));
    assert_eq!(sent.get("client_id"), Some(CLIENT_ID));
    assert_eq!(
        sent.get("client_secret"),
        Some(SECRET),
        "the secret goes in the body"
    );
    assert!(sent.authorization.is_none());
}

#[tokio::test]
async fn the_cache_makes_one_idp_request_per_user_and_scope() {
    let s = setup().await;
    let caller = s.idp.mint(&user_mint());
    let url = s.oboe.proxy_url("/graph/me");
    let concurrent = (0..50).map(|_| {
        let (url, caller) = (url.clone(), caller.clone());
        tokio::spawn(async move { call(&url, &caller).await })
    });
    let mut tokens = std::collections::HashSet::new();
    for reply in futures_util::future::join_all(concurrent).await {
        let reply = reply.expect("task");
        assert_eq!(reply.status, 200, "{}", reply.text());
        tokens.insert(upstream_authorization(&reply));
    }
    assert_eq!(
        s.idp.counters().token,
        1,
        "50 concurrent misses, one IdP request"
    );
    assert_eq!(tokens.len(), 1);

    // Another token of the same user is the same cache entry (key: user).
    let again = s.idp.mint(&user_mint().claim("uti", "another-token"));
    assert_eq!(call(&url, &again).await.status, 200);
    assert_eq!(s.idp.counters().token, 1);

    // Five other users: five requests.
    for i in 0..5 {
        let oid = format!("00000000-0000-4000-8000-00000000000{i}");
        assert_eq!(call(&url, &s.idp.mint(&user(&oid))).await.status, 200);
    }
    assert_eq!(s.idp.counters().token, 6);
    let metrics = s.oboe.metrics().await;
    assert!(
        metric(&metrics, "oboe_token_cache_total{outcome=\"hit\"}") >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "oboe_exchanges_total{grant=\"on_behalf_of\",outcome=\"ok\"}"
        ),
        6.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn an_app_only_caller_is_refused_before_the_idp_is_asked() {
    let s = setup().await;
    let app = s
        .idp
        .mint(&Mint::app(api_audience()).roles(["Orders.Read"]));
    let reply = call(&s.oboe.proxy_url("/graph/me"), &app).await;
    let body = reply.assert_problem(403, "user_token_required");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("app-only"),
        "{body}"
    );
    assert_eq!(s.idp.counters().token, 0);
    assert_eq!(s.echo.received(), 0);
}

#[tokio::test]
async fn a_claims_challenge_reaches_the_caller_and_is_not_cached() {
    let s = setup().await;
    s.idp.update_behaviour(|b| {
        b.claims_challenge = Some(oboe::dev::idp::ClaimsChallenge::for_user(DEV_USER_OID))
    });
    let caller = s.idp.mint(&user_mint());
    let reply = call(&s.oboe.proxy_url("/graph/me"), &caller).await;
    let body = reply.assert_problem(401, "insufficient_claims");
    let challenge = reply.header("www-authenticate").expect("challenge");
    let expected = STANDARD.encode(DEFAULT_CHALLENGE_CLAIMS);
    assert!(
        challenge.starts_with("Bearer error=\"insufficient_claims\""),
        "{challenge}"
    );
    assert!(
        challenge.contains(&format!("claims=\"{expected}\"")),
        "{challenge}"
    );
    assert_eq!(body["idp_error"], "interaction_required");
    assert_eq!(body["idp_error_codes"], json!([50076]));
    assert!(
        body["trace_id"].is_string() && body["correlation_id"].is_string(),
        "{body}"
    );
    assert_eq!(s.echo.received(), 0);

    // The user satisfies the challenge: the next request is exchanged afresh.
    s.idp.update_behaviour(|b| b.claims_challenge = None);
    assert_eq!(
        call(&s.oboe.proxy_url("/graph/me"), &caller).await.status,
        200
    );
    assert_eq!(s.idp.counters().token, 2);
}

#[tokio::test]
async fn missing_consent_is_403_consent_required() {
    let s = setup().await;
    s.idp
        .update_behaviour(|b| b.consent_missing = Some(GRAPH.to_owned()));
    let reply = call(&s.oboe.proxy_url("/graph/me"), &s.idp.mint(&user_mint())).await;
    let body = reply.assert_problem(403, "consent_required");
    assert_eq!(body["idp_error_codes"], json!([65001]));
}

#[tokio::test]
async fn a_rejected_secret_is_502_naming_the_credential_and_remembered_briefly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = dir.path().join("wrong-secret");
    std::fs::write(&wrong, "not-the-secret").expect("write");
    let credential = format!("client_secret: {{ file: {} }}", wrong.display());
    let s = setup_with(idp().await, DEV_TENANT, Some(credential), "").await;
    let caller = s.idp.mint(&user_mint());
    for _ in 0..3 {
        let reply = call(&s.oboe.proxy_url("/graph/me"), &caller).await;
        let body = reply.assert_problem(502, "credential_rejected");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(&wrong.display().to_string()), "{detail}");
        assert!(!reply.text().contains("not-the-secret"));
        assert_eq!(body["idp_error"], "invalid_client");
    }
    assert_eq!(
        s.idp.counters().token,
        1,
        "identical failures are not repeated at once"
    );
}

#[tokio::test]
async fn throttling_fails_fast_with_retry_after() {
    let s = setup().await;
    s.idp
        .update_behaviour(|b| b.throttle = Some(Duration::from_secs(30)));
    let url = s.oboe.proxy_url("/graph/me");
    let reply = call(&url, &s.idp.mint(&user_mint())).await;
    reply.assert_problem(503, "idp_throttled");
    assert_eq!(reply.header("retry-after"), Some("30"));
    // Other users are answered at once without asking the IdP again.
    let other = s.idp.mint(&user("00000000-0000-4000-8000-0000000000aa"));
    let reply = call(&url, &other).await;
    reply.assert_problem(503, "idp_throttled");
    let retry: u64 = reply
        .header("retry-after")
        .unwrap_or("0")
        .parse()
        .expect("seconds");
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(s.idp.counters().token, 1);
}

#[tokio::test]
async fn one_server_error_is_retried_two_are_503() {
    let s = setup().await;
    s.idp.fail_next(StatusCode::INTERNAL_SERVER_ERROR, 1);
    assert_eq!(
        call(&s.oboe.proxy_url("/graph/me"), &s.idp.mint(&user_mint()))
            .await
            .status,
        200
    );
    assert_eq!(s.idp.counters().token, 2);

    s.idp.fail_next(StatusCode::BAD_GATEWAY, 2);
    let other = s.idp.mint(&user("00000000-0000-4000-8000-0000000000bb"));
    let reply = call(&s.oboe.proxy_url("/graph/me"), &other).await;
    reply.assert_problem(503, "idp_unavailable");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(s.idp.counters().token, 4);
    // Not cached: the IdP is back, the next request succeeds.
    assert_eq!(
        call(&s.oboe.proxy_url("/graph/me"), &other).await.status,
        200
    );
}

#[tokio::test]
async fn a_slow_idp_is_504_and_a_broken_answer_502() {
    let s = setup().await;
    s.idp
        .update_behaviour(|b| b.token_delay = Duration::from_secs(3));
    let reply = call(&s.oboe.proxy_url("/graph/me"), &s.idp.mint(&user_mint())).await;
    reply.assert_problem(504, "idp_timeout");
    s.idp.update_behaviour(|b| {
        b.token_delay = Duration::ZERO;
        b.malformed = Some(Malformed::NotJson);
    });
    let other = s.idp.mint(&user("00000000-0000-4000-8000-0000000000cc"));
    call(&s.oboe.proxy_url("/graph/me"), &other)
        .await
        .assert_problem(502, "idp_bad_answer");
    s.idp
        .update_behaviour(|b| b.malformed = Some(Malformed::NoAccessToken));
    let third = s.idp.mint(&user("00000000-0000-4000-8000-0000000000cd"));
    call(&s.oboe.proxy_url("/graph/me"), &third)
        .await
        .assert_problem(502, "idp_bad_answer");
    assert_eq!(s.echo.received(), 0);
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_503() {
    let idp = idp().await;
    // A generic IdP whose discovery names a token endpoint nobody listens on.
    let closed = closed_port().await;
    let jwks = format!("{}/oidc/keys", idp.base_url());
    let issuer = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let own = issuer.clone();
    let discovery = Upstream::serve(move |_req| {
        let doc = json!({
            "issuer": own.get().cloned().unwrap_or_default(),
            "jwks_uri": jwks.clone(),
            "token_endpoint": format!("http://{closed}/token"),
        });
        async move {
            http::Response::builder()
                .header("content-type", "application/json")
                .body(full(doc.to_string()))
                .expect("response")
        }
    })
    .await;
    let issuer_url = format!("http://{}", discovery.addr);
    issuer.set(issuer_url.clone()).expect("set once");
    let (dir, secret) = secret_file();
    let echo = Upstream::echo().await;
    let yaml = format!(
        "identity:\n  provider: oidc\n  issuer: {issuer_url}\n  client_id: {CLIENT_ID}\n  timeout: 2s\n  credential:\n    client_secret: {{ file: {secret} }}\nroutes:\n{}",
        route(
            "jobs",
            "/jobs/",
            &echo.url("/"),
            "{ required: false }",
            "{ grant: client_credentials, scopes: [jobs] }"
        ),
    );
    let oboe = Oboe::start(&yaml).await;
    let reply = Client::http1().get(&oboe.proxy_url("/jobs/run")).await;
    let body = reply.assert_problem(503, "idp_unavailable");
    assert!(reply.header("retry-after").is_some(), "{body}");
    assert_eq!(echo.received(), 0);
    drop(dir);
}

#[tokio::test]
async fn client_credentials_need_no_caller_and_send_an_app_token() {
    let s = setup().await;
    let reply = Client::http1().get(&s.oboe.proxy_url("/jobs/run")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let claims = claims_of(&upstream_authorization(&reply));
    assert_eq!(claims["aud"], "api://jobs");
    assert_eq!(claims["idtyp"], "app");
    let sent = &s.idp.token_request_log()[0];
    assert_eq!(sent.get("grant_type"), Some("client_credentials"));
    assert_eq!(sent.get("scope"), Some("api://jobs/.default"));
    // Cached: a second call does not ask again.
    assert_eq!(
        Client::http1()
            .get(&s.oboe.proxy_url("/jobs/run"))
            .await
            .status,
        200
    );
    assert_eq!(s.idp.counters().token, 1);
}

#[tokio::test]
async fn the_token_endpoint_hands_out_the_downstream_token() {
    let s = setup().await;
    let caller = s.idp.mint(&user_mint());
    let reply = call(&s.oboe.proxy_url("/.oboe/v1/token/graph"), &caller).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    let authorization = body["authorization"].as_str().expect("authorization");
    assert_eq!(
        claims_of(authorization)["aud"],
        "https://graph.microsoft.com"
    );
    assert!(body["expires_on"].as_u64().expect("expires_on") > 1_700_000_000);
    Client::http1()
        .get(&s.oboe.proxy_url("/.oboe/v1/token/graph"))
        .await
        .assert_problem(401, "invalid_token");
    call(&s.oboe.proxy_url("/.oboe/v1/token/nope"), &caller)
        .await
        .assert_problem(404, "no_route");
}

#[tokio::test]
async fn a_certificate_signs_a_fresh_assertion_for_each_request() {
    let idp = idp().await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let cert = rcgen::CertificateParams::new(vec!["oboe.test".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    idp.register_client(Reg::certificate(CLIENT_ID, cert.der().to_vec()));
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).expect("write cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    let credential = format!(
        "certificate: {{ cert_file: {}, key_file: {} }}",
        cert_file.display(),
        key_file.display()
    );
    let s = setup_with(idp, DEV_TENANT, Some(credential), "").await;
    for oid in [
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
    ] {
        let reply = call(&s.oboe.proxy_url("/graph/me"), &s.idp.mint(&user(oid))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let log = s.idp.token_request_log();
    let assertions: Vec<&str> = log
        .iter()
        .filter_map(|r| r.get("client_assertion"))
        .collect();
    assert_eq!(assertions.len(), 2);
    assert_ne!(
        assertions[0], assertions[1],
        "a fresh assertion (new jti) each time"
    );
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(assertions[0].split('.').next().expect("header"))
            .expect("base64url"),
    )
    .expect("json");
    assert_eq!(header["alg"], "PS256");
    assert!(header["x5t#S256"].is_string());
    assert!(log[0].get("client_secret").is_none());
    drop(dir);
}

#[tokio::test]
async fn a_federated_token_file_is_the_assertion_and_is_reread() {
    let idp = idp().await;
    let subject = "system:serviceaccount:orders:orders-api";
    idp.register_client(Reg::federated(CLIENT_ID, subject));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("azure-identity-token");
    std::fs::write(
        &file,
        idp.mint_federated(subject, Duration::from_secs(3600)),
    )
    .expect("write");
    let credential = format!("federated_token_file: {}", file.display());
    let s = setup_with(idp, DEV_TENANT, Some(credential), "").await;
    let reply = call(&s.oboe.proxy_url("/graph/me"), &s.idp.mint(&user_mint())).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // kubelet rotates the file: the next exchange uses the new content.
    let rotated = s.idp.mint_federated(subject, Duration::from_secs(3600));
    std::fs::write(&file, &rotated).expect("rotate");
    let other = s.idp.mint(&user("00000000-0000-4000-8000-0000000000dd"));
    assert_eq!(
        call(&s.oboe.proxy_url("/graph/me"), &other).await.status,
        200
    );
    let log = s.idp.token_request_log();
    assert_eq!(log[1].get("client_assertion"), Some(rotated.as_str()));
    assert_eq!(
        log[1].get("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
}

#[tokio::test]
async fn multi_tenant_obo_goes_to_the_callers_tenant() {
    let s = setup_with(idp().await, "organizations", None, "").await;
    let caller = s.idp.mint(&user_mint().tenant(SECOND_TENANT));
    let reply = call(&s.oboe.proxy_url("/graph/me"), &caller).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        s.idp.token_request_log()[0].path,
        format!("/{SECOND_TENANT}/oauth2/v2.0/token")
    );
}

#[tokio::test]
async fn rfc8693_exchange_with_private_key_jwt_at_a_generic_idp() {
    let idp = idp().await;
    let key = rcgen::KeyPair::generate().expect("P-256 key");
    let point = key.public_key_raw().to_vec();
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..]), "kid": "oboe-1"});
    idp.register_client(Reg::private_key_jwt(CLIENT_ID, jwk));
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    let echo = Upstream::echo().await;
    let yaml = format!(
        "identity:\n  provider: oidc\n  issuer: {}\n  client_id: {CLIENT_ID}\n  credential:\n    private_key_jwt: {{ key_file: {}, kid: oboe-1, algorithm: ES256 }}\ninbound:\n  audiences: [{CLIENT_ID}]\nroutes:\n{}",
        idp.oidc_issuer(),
        key_file.display(),
        route(
            "orders",
            "/orders/",
            &echo.url("/"),
            "{ required: true }",
            "{ grant: token_exchange, audience: [orders-api], resource: [https://orders.example/api], scopes: [orders.read] }"
        ),
    );
    let oboe = Oboe::start(&yaml).await;
    let caller = idp.mint(
        &Mint::user(CLIENT_ID)
            .scopes(["read"])
            .version(Version::Oidc),
    );
    let reply = call(&oboe.proxy_url("/orders/1"), &caller).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(!reply.text().contains(&caller));
    let sent = &idp.token_request_log()[0];
    assert_eq!(sent.path, "/oidc/token");
    assert_eq!(
        sent.get("grant_type"),
        Some("urn:ietf:params:oauth:grant-type:token-exchange")
    );
    assert_eq!(sent.get("subject_token"), Some(caller.as_str()));
    assert_eq!(
        sent.get("subject_token_type"),
        Some("urn:ietf:params:oauth:token-type:access_token")
    );
    assert_eq!(sent.get("audience"), Some("orders-api"));
    assert_eq!(sent.get("resource"), Some("https://orders.example/api"));
    assert_eq!(sent.get("scope"), Some("orders.read"));
    assert!(sent.get("client_assertion").is_some());
    drop(dir);
}

/// oboe with one OBO route to an echo upstream, judging time by `clock`;
/// `extra` is top-level YAML (e.g. a `cache:` section).
async fn clocked_graph(
    idp: &DevIdp,
    extra: &str,
    clock: std::sync::Arc<oboe::clock::ManualClock>,
) -> (Oboe, Upstream, tempfile::TempDir) {
    let (dir, secret) = secret_file();
    let echo = Upstream::echo().await;
    let credential = format!("client_secret: {{ file: {secret} }}");
    let yaml = format!(
        "{}{extra}routes:\n{}",
        entra_identity(idp, DEV_TENANT, &credential),
        route(
            "graph",
            "/graph/",
            &echo.url("/"),
            "{ required: true }",
            &obo_token()
        ),
    );
    (Oboe::start_with_clock(&yaml, clock).await, echo, dir)
}

#[tokio::test]
async fn refresh_window_then_expiry_judged_by_the_clock() {
    let idp = idp().await;
    let clock = oboe::clock::ManualClock::starting_now();
    let (oboe, _echo, dir) =
        clocked_graph(&idp, "cache:\n  refresh_before_expiry: 5m\n", clock.clone()).await;
    let caller = idp.mint(&user_mint());
    let url = oboe.proxy_url("/graph/me");
    let first = upstream_authorization(&call(&url, &caller).await);

    // One-hour token: served until 55 min, refreshed in the background from 50 min.
    let advance = |minutes: u64| {
        clock.advance(Duration::from_secs(minutes * 60));
        // The IdP's clock moves in step, so what it mints agrees with oboe's.
        idp.advance_clock((minutes * 60) as i64);
    };
    advance(49);
    assert_eq!(upstream_authorization(&call(&url, &caller).await), first);
    assert_eq!(idp.counters().token, 1, "no refresh before the window");
    advance(2);
    let during = upstream_authorization(&call(&url, &caller).await);
    assert_eq!(
        during, first,
        "the cached token is served during the refresh"
    );
    let mut refreshed = first.clone();
    within("the refreshed token to be served", async {
        while refreshed == first {
            tokio::time::sleep(Duration::from_millis(10)).await;
            refreshed = upstream_authorization(&call(&url, &caller).await);
        }
    })
    .await;
    assert_eq!(idp.counters().token, 2, "exactly one background refresh");
    drop(dir);
}

#[tokio::test]
async fn an_entry_past_its_life_is_exchanged_again() {
    let idp = idp().await;
    let clock = oboe::clock::ManualClock::starting_now();
    let (oboe, _echo, dir) = clocked_graph(&idp, "", clock.clone()).await;
    let url = oboe.proxy_url("/graph/me");
    let first = upstream_authorization(&call(&url, &idp.mint(&user_mint())).await);
    // One-hour token, default 5 min margin: the entry ends at 55 min.
    clock.advance(Duration::from_secs(56 * 60));
    idp.advance_clock(56 * 60);
    let next = upstream_authorization(&call(&url, &idp.mint(&user_mint())).await);
    assert_ne!(next, first);
    assert_eq!(
        idp.counters().token,
        2,
        "the expired entry was exchanged again"
    );
    drop(dir);
}

#[tokio::test]
async fn concurrency_routes_and_keying_decide_how_many_exchanges_happen() {
    let idp = idp().await;
    let (dir, secret) = secret_file();
    let echo = Upstream::echo().await;
    let credential = format!("client_secret: {{ file: {secret} }}");
    let yaml = format!(
        "{}routes:\n{}{}",
        entra_identity(&idp, DEV_TENANT, &credential),
        route(
            "graph",
            "/graph/",
            &echo.url("/"),
            "{ required: true }",
            &obo_token()
        ),
        route(
            "mail",
            "/mail/",
            &echo.url("/"),
            "{ required: true }",
            "{ grant: on_behalf_of, scopes: [https://graph.microsoft.com/Mail.Read] }"
        ),
    );
    let oboe = Oboe::start(&yaml).await;
    let caller = idp.mint(&user_mint());
    let url = oboe.proxy_url("/graph/me");
    let burst = (0..500).map(|_| {
        let (url, caller) = (url.clone(), caller.clone());
        tokio::spawn(async move { call(&url, &caller).await.status })
    });
    for status in futures_util::future::join_all(burst).await {
        assert_eq!(status.expect("task"), 200);
    }
    assert_eq!(
        idp.counters().token,
        1,
        "500 concurrent requests, one exchange"
    );
    assert_eq!(call(&oboe.proxy_url("/mail/x"), &caller).await.status, 200);
    assert_eq!(idp.counters().token, 2, "another scope is another exchange");
    let second = idp.mint(&user("00000000-0000-4000-8000-0000000000ee"));
    assert_eq!(call(&url, &second).await.status, 200);
    assert_eq!(idp.counters().token, 3, "another user is another exchange");

    // `key: token`: two tokens of one user are two entries.
    let yaml = format!(
        "{}cache:\n  key: token\nroutes:\n{}",
        entra_identity(&idp, DEV_TENANT, &credential),
        route(
            "graph",
            "/graph/",
            &echo.url("/"),
            "{ required: true }",
            &obo_token()
        ),
    );
    let by_token = Oboe::start(&yaml).await;
    let before = idp.counters().token;
    let url = by_token.proxy_url("/graph/me");
    for token in [
        &caller,
        &caller,
        &idp.mint(&user_mint().claim("uti", "other")),
    ] {
        assert_eq!(call(&url, token).await.status, 200);
    }
    assert_eq!(idp.counters().token - before, 2);
    drop(dir);
}

#[tokio::test]
async fn client_credentials_send_no_caller_token() {
    let s = setup().await;
    let caller = s.idp.mint(&user_mint());
    let reply = call(&s.oboe.proxy_url("/jobs/run"), &caller).await;
    assert_eq!(reply.status, 200);
    assert!(!reply.text().contains(&caller));
    let sent = &s.idp.token_request_log()[0];
    assert!(
        sent.form.iter().all(|(_, v)| !v.contains(&caller)),
        "{:?}",
        sent.form.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    assert!(sent.get("assertion").is_none() && sent.get("subject_token").is_none());
}

#[tokio::test]
async fn when_the_idp_goes_down_cached_tokens_are_still_served() {
    let s = setup().await;
    let cached = s.idp.mint(&user_mint());
    assert_eq!(
        call(&s.oboe.proxy_url("/graph/me"), &cached).await.status,
        200
    );
    let newcomer = s.idp.mint(&user("00000000-0000-4000-8000-0000000000ff"));
    s.idp.fail_next(StatusCode::SERVICE_UNAVAILABLE, 1000);
    let started = std::time::Instant::now();
    call(&s.oboe.proxy_url("/graph/me"), &newcomer)
        .await
        .assert_problem(503, "idp_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        call(&s.oboe.proxy_url("/graph/me"), &cached).await.status,
        200
    );
}

#[tokio::test]
async fn the_idp_can_be_reached_over_tls_with_an_extra_ca() {
    let idp = idp().await;
    let ca = TestCa::new();
    let (tls, _tunnel) = ca.tls_tunnel(idp.addr()).await;
    let (dir, secret) = secret_file();
    let echo = Upstream::echo().await;
    // Discovery and the token endpoint over TLS; the issuer values inside the
    // documents stay the IdP's own.
    let yaml = format!(
        "upstream:\n  ca_file: {}\nidentity:\n  provider: entra\n  instance: https://{tls}\n  tenant_id: {DEV_TENANT}\n  client_id: {CLIENT_ID}\n  credential:\n    client_secret: {{ file: {secret} }}\nroutes:\n{}",
        ca.ca_path().display(),
        route(
            "graph",
            "/graph/",
            &echo.url("/"),
            "{ required: true }",
            &obo_token()
        ),
    );
    let oboe = Oboe::start(&yaml).await;
    let reply = call(&oboe.proxy_url("/graph/me"), &idp.mint(&user_mint())).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(idp.counters().token, 1);
    drop(dir);
}

#[tokio::test]
async fn logs_never_carry_tokens_or_secrets() {
    let idp = idp().await;
    let (dir, secret) = secret_file();
    let echo = Upstream::echo().await;
    let routes = format!(
        "{}routes:\n{}",
        entra_identity(
            &idp,
            DEV_TENANT,
            &format!("client_secret: {{ file: {secret} }}")
        ),
        route(
            "graph",
            "/graph/",
            &echo.url("/"),
            "{ required: true }",
            &obo_token()
        ),
    );
    let mut oboe = OboeProcess::start_with_log(&routes, "debug").await;
    let caller = idp.mint(&user_mint());
    let reply = call(&oboe.proxy_url("/graph/me"), &caller).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let downstream = upstream_authorization(&reply);
    idp.update_behaviour(|b| {
        b.claims_challenge = Some(oboe::dev::idp::ClaimsChallenge::for_user(
            "00000000-0000-4000-8000-000000000abc",
        ))
    });
    let challenged = idp.mint(&user("00000000-0000-4000-8000-000000000abc"));
    call(&oboe.proxy_url("/graph/me"), &challenged).await;
    call(&oboe.proxy_url("/graph/me"), "not.a.token").await;
    oboe.terminate();
    oboe.wait_exit().await;
    let log = oboe.stderr();
    assert!(log.contains("oboe::access"), "{log}");
    for (what, secret) in [
        ("caller token", caller.as_str()),
        ("challenged token", challenged.as_str()),
        ("downstream token", downstream.trim_start_matches("Bearer ")),
        ("client secret", SECRET),
        ("user id", DEV_USER_OID),
    ] {
        assert!(!log.contains(secret), "the log carries the {what}");
    }
    drop(dir);
}

#[tokio::test]
async fn an_assertion_the_idp_refuses_is_401_invalid_token() {
    let s = setup().await;
    let caller = s.idp.mint(&user_mint().lifetime(Duration::from_secs(600)));
    // Valid for oboe, expired for the IdP (its clock is ahead).
    s.idp.advance_clock(1200);
    let reply = call(&s.oboe.proxy_url("/graph/me"), &caller).await;
    let body = reply.assert_problem(401, "invalid_token");
    assert_eq!(body["idp_error_codes"], json!([500133]), "{body}");
    assert!(
        reply
            .header("www-authenticate")
            .unwrap_or_default()
            .contains("error=\"invalid_token\""),
    );
    assert_eq!(s.echo.received(), 0);
}
