//! Caller-token validation against the development IdP: valid tokens of every
//! accepted form, a table of hostile ones, route policy, key rotation and
//! refetch limits, readiness, and the validate endpoint.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::Request;
use jsonwebtoken::Algorithm;
use oboe::dev::idp::{DEV_TENANT, DevIdp, Mint, SECOND_TENANT, Version};
use serde_json::{Value, json};

use crate::fixtures::*;
use crate::harness::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A forward route (ingress guard) in front of an echo upstream.
async fn guarded(idp: &DevIdp, caller: &str) -> (Oboe, Upstream) {
    guarded_with(idp, caller, "", oboe::clock::system()).await
}

/// Like [`guarded`], with extra `inbound:` keys (indented YAML) and a clock.
async fn guarded_with(
    idp: &DevIdp,
    caller: &str,
    inbound: &str,
    clock: oboe::clock::SharedClock,
) -> (Oboe, Upstream) {
    let echo = Upstream::echo().await;
    let yaml = format!(
        "{}{inbound}routes:\n{}",
        entra_identity(idp, DEV_TENANT, ""),
        route("api", "/api/", &echo.url("/"), caller, "{ grant: forward }"),
    );
    (Oboe::start_with_clock(&yaml, clock).await, echo)
}

fn good_claims(idp: &DevIdp) -> Value {
    let now = now();
    json!({
        "iss": idp.entra_issuer(DEV_TENANT), "aud": api_audience(), "tid": DEV_TENANT,
        "oid": "0b7c2e7a-5d4f-4d4e-9a57-7f4f2b1d9e11", "sub": "s", "azp": "a",
        "scp": "access_as_user", "idtyp": "user", "ver": "2.0",
        "iat": now, "nbf": now, "exp": now + 600,
    })
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().expect("object").remove(name);
    claims
}

async fn reqwest_json(url: &str) -> Value {
    Client::http1().get(url).await.json()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

#[tokio::test]
async fn valid_tokens_of_every_accepted_form_pass_and_are_forwarded_unchanged() {
    let idp = idp().await;
    let (oboe, echo) = guarded(&idp, "{ required: true }").await;
    let tokens = [
        idp.mint(&user_mint()),
        idp.mint(&user_mint().alg(Algorithm::PS256)),
        idp.mint(&user_mint().alg(Algorithm::ES256)),
        idp.mint(&user_mint().version(Version::V1)),
        idp.mint(&Mint::user(CLIENT_ID).scopes(["access_as_user"])),
        idp.mint(&user_mint().claim("aud", json!(["https://other", api_audience()]))),
        idp.mint(&Mint::app(api_audience()).roles(["Orders.Read"])),
    ];
    for token in &tokens {
        let reply = call(&oboe.proxy_url("/api/x"), token).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let seen = reply.json()["headers"]["authorization"].clone();
        assert_eq!(seen, json!([format!("Bearer {token}")]));
    }
    assert_eq!(echo.received(), tokens.len());
    assert_eq!(
        idp.counters().token,
        0,
        "validation never calls the token endpoint"
    );
}

#[tokio::test]
async fn hostile_tokens_are_refused_with_401_and_reach_nothing() {
    let idp = idp().await;
    let (oboe, echo) = guarded(&idp, "{ required: true }").await;
    let good = good_claims(&idp);
    let rs = |claims: Value| idp.sign_raw(Algorithm::RS256, json!({"typ": "JWT"}), claims);
    let header_rs = |header: Value| idp.sign_raw(Algorithm::RS256, header, good.clone());
    let valid = rs(good.clone());
    let (h, p, s) = {
        let mut parts = valid.split('.');
        (
            parts.next().expect("header").to_owned(),
            parts.next().expect("payload").to_owned(),
            parts.next().expect("signature").to_owned(),
        )
    };
    let other_tenant_issuer = idp.entra_issuer(SECOND_TENANT);
    let ec_kid = idp.current_kid(Algorithm::ES256).expect("EC key");
    let mut flipped = s.clone().into_bytes();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).expect("ascii");
    let other_signature = rs(with(good.clone(), "scp", json!("other")))
        .rsplit('.')
        .next()
        .expect("signature")
        .to_owned();
    let now = now();
    // An attacker's own RSA key, signing with and without the IdP's kid.
    let attacker = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let attacker_key =
        jsonwebtoken::EncodingKey::from_rsa_pem(attacker.serialize_pem().as_bytes()).expect("key");
    let attacker_sign = |kid: &str| {
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &good, &attacker_key).expect("sign")
    };
    let rsa_kid = idp.current_kid(Algorithm::RS256).expect("RSA key");
    // HS256 keyed with the IdP's public key as its JWK text (the PEM/DER form is
    // what sign_raw uses).
    let jwks: Value = reqwest_json(&format!(
        "{}/{DEV_TENANT}/discovery/v2.0/keys",
        idp.base_url()
    ))
    .await;
    let rsa_jwk = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == json!(rsa_kid)))
        .expect("the RSA JWK")
        .to_string();
    let hs_jwk = {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some(rsa_kid.clone());
        jsonwebtoken::encode(
            &header,
            &good,
            &jsonwebtoken::EncodingKey::from_secret(rsa_jwk.as_bytes()),
        )
        .expect("sign")
    };
    let es = idp.sign_raw(Algorithm::ES256, json!({}), good.clone());
    let (es_h, es_p, es_s) = {
        let mut parts = es.split('.');
        (
            parts.next().expect("header").to_owned(),
            parts.next().expect("payload").to_owned(),
            parts.next().expect("signature").to_owned(),
        )
    };
    let es_zero = URL_SAFE_NO_PAD.encode([0u8; 64]);
    let es_der = {
        let raw = URL_SAFE_NO_PAD.decode(&es_s).expect("base64url");
        let int = |half: &[u8]| {
            let mut v = half.to_vec();
            while v.len() > 1 && v[0] == 0 && v[1] < 0x80 {
                v.remove(0);
            }
            if v[0] >= 0x80 {
                v.insert(0, 0);
            }
            let mut out = vec![0x02, v.len() as u8];
            out.extend(v);
            out
        };
        let (r, s) = (int(&raw[..32]), int(&raw[32..]));
        let mut der = vec![0x30, (r.len() + s.len()) as u8];
        der.extend(r);
        der.extend(s);
        URL_SAFE_NO_PAD.encode(der)
    };
    let standard_alphabet = {
        use base64::engine::general_purpose::STANDARD_NO_PAD;
        let sig = URL_SAFE_NO_PAD.decode(&s).expect("base64url");
        format!("{h}.{p}.{}", STANDARD_NO_PAD.encode(sig))
    };
    let truncated = &s[..s.len() - 10];

    // (case, Authorization header value or None for no header)
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no Authorization", None),
        ("Basic scheme", Some("Basic dXNlcjpwYXNz".into())),
        ("Bearer without token", Some("Bearer ".into())),
        ("bad token characters", Some("Bearer a.b.c!".into())),
        ("not a JWT", Some("Bearer abc".into())),
        ("two parts", Some(format!("Bearer {h}.{p}"))),
        ("four parts", Some(format!("Bearer {h}.{p}.{s}.{s}"))),
        ("JWE", Some(format!("Bearer {h}.{p}.{s}.{s}.{s}"))),
        (
            "17 KiB",
            Some(format!("Bearer {h}.{}.{s}", "A".repeat(17 * 1024))),
        ),
        ("empty signature", Some(format!("Bearer {h}.{p}."))),
        (
            "alg none, unsigned",
            Some(format!("Bearer {}.{p}.", b64(&json!({"alg": "none"})))),
        ),
        (
            "alg none, signed",
            Some(format!(
                "Bearer {}.{p}.{s}",
                b64(&json!({"alg": "none", "kid": "x"}))
            )),
        ),
        (
            "HS256 with the public key",
            Some(format!(
                "Bearer {}",
                idp.sign_raw(Algorithm::HS256, json!({}), good.clone())
            )),
        ),
        (
            "RS512 not allowed",
            Some(format!(
                "Bearer {}",
                idp.sign_raw(Algorithm::RS512, json!({}), good.clone())
            )),
        ),
        (
            "ES384 not allowed",
            Some(format!(
                "Bearer {}",
                idp.sign_raw(Algorithm::ES384, json!({}), good.clone())
            )),
        ),
        (
            "crit header",
            Some(format!(
                "Bearer {}",
                header_rs(json!({"crit": ["exp"], "exp": 1}))
            )),
        ),
        (
            "jku header",
            Some(format!(
                "Bearer {}",
                header_rs(json!({"jku": "https://evil/keys"}))
            )),
        ),
        (
            "x5u header",
            Some(format!(
                "Bearer {}",
                header_rs(json!({"x5u": "https://evil/cert"}))
            )),
        ),
        (
            "embedded jwk",
            Some(format!(
                "Bearer {}",
                header_rs(json!({"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}))
            )),
        ),
        (
            "embedded x5c",
            Some(format!("Bearer {}", header_rs(json!({"x5c": ["MIIB"]})))),
        ),
        (
            "b64 false",
            Some(format!("Bearer {}", header_rs(json!({"b64": false})))),
        ),
        (
            "typ JWE",
            Some(format!("Bearer {}", header_rs(json!({"typ": "JWE"})))),
        ),
        (
            "no kid",
            Some(format!("Bearer {}.{p}.{s}", b64(&json!({"alg": "RS256"})))),
        ),
        (
            "unknown kid",
            Some(format!(
                "Bearer {}",
                header_rs(json!({"kid": "forged-kid"}))
            )),
        ),
        (
            "EC key used for RS256",
            Some(format!("Bearer {}", header_rs(json!({"kid": ec_kid})))),
        ),
        (
            "tampered claims",
            Some(format!(
                "Bearer {h}.{}.{s}",
                b64(&with(good.clone(), "scp", json!("admin")))
            )),
        ),
        (
            "flipped signature",
            Some(format!("Bearer {h}.{p}.{flipped}")),
        ),
        (
            "another token's signature",
            Some(format!("Bearer {h}.{p}.{other_signature}")),
        ),
        (
            "signature not base64url",
            Some(format!("Bearer {h}.{p}.{s}+")),
        ),
        ("padded header", Some(format!("Bearer {h}=.{p}.{s}"))),
        (
            "header not JSON",
            Some(format!(
                "Bearer {}.{p}.{s}",
                URL_SAFE_NO_PAD.encode("alg=RS256")
            )),
        ),
        (
            "claims not JSON",
            Some(format!(
                "Bearer {h}.{}.{s}",
                URL_SAFE_NO_PAD.encode("[1,2]")
            )),
        ),
        (
            "duplicate alg",
            Some(format!(
                "Bearer {}.{p}.{s}",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","alg":"none","kid":"k"}"#)
            )),
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                rs(with(good.clone(), "exp", json!(now - 120)))
            )),
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                rs(with(good.clone(), "nbf", json!(now + 600)))
            )),
        ),
        (
            "issued in the future",
            Some(format!(
                "Bearer {}",
                rs(with(good.clone(), "iat", json!(now + 3600)))
            )),
        ),
        (
            "exp as a string",
            Some(format!(
                "Bearer {}",
                rs(with(good.clone(), "exp", json!((now + 600).to_string())))
            )),
        ),
        (
            "no exp",
            Some(format!("Bearer {}", rs(without(good.clone(), "exp")))),
        ),
        (
            "wrong issuer",
            Some(format!(
                "Bearer {}",
                rs(with(good.clone(), "iss", json!("https://evil.example/")))
            )),
        ),
        (
            "issuer with an extra slash",
            Some(format!(
                "Bearer {}",
                rs(with(
                    good.clone(),
                    "iss",
                    json!(format!("{}/", idp.entra_issuer(DEV_TENANT)))
                ))
            )),
        ),
        (
            "no issuer",
            Some(format!("Bearer {}", rs(without(good.clone(), "iss")))),
        ),
        (
            "another tenant's issuer",
            Some(format!(
                "Bearer {}",
                rs(with(
                    with(good.clone(), "iss", json!(other_tenant_issuer)),
                    "tid",
                    json!(SECOND_TENANT)
                ))
            )),
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                rs(with(good.clone(), "aud", json!("api://someone-else")))
            )),
        ),
        (
            "audience array without ours",
            Some(format!(
                "Bearer {}",
                rs(with(good.clone(), "aud", json!(["a", "b"])))
            )),
        ),
        (
            "no audience",
            Some(format!("Bearer {}", rs(without(good.clone(), "aud")))),
        ),
        (
            "alg NONE",
            Some(format!(
                "Bearer {}.{p}.",
                b64(&json!({"alg": "NONE", "kid": "x"}))
            )),
        ),
        (
            "alg nOnE",
            Some(format!(
                "Bearer {}.{p}.{s}",
                b64(&json!({"alg": "nOnE", "kid": "x"}))
            )),
        ),
        ("HS256 keyed with the JWK", Some(format!("Bearer {hs_jwk}"))),
        (
            "kid with path junk",
            Some(format!(
                "Bearer {}",
                header_rs(json!({"kid": "../../../../etc/passwd"}))
            )),
        ),
        (
            "kid with SQL junk",
            Some(format!(
                "Bearer {}",
                header_rs(json!({"kid": "x' OR '1'='1"}))
            )),
        ),
        (
            "attacker key with the right kid",
            Some(format!("Bearer {}", attacker_sign(&rsa_kid))),
        ),
        (
            "attacker key with its own kid",
            Some(format!("Bearer {}", attacker_sign("attacker"))),
        ),
        (
            "crit empty list",
            Some(format!("Bearer {}", header_rs(json!({"crit": []})))),
        ),
        ("signature stripped", Some(format!("Bearer {h}.{p}"))),
        (
            "signature truncated",
            Some(format!("Bearer {h}.{p}.{truncated}")),
        ),
        (
            "alg swapped to PS256",
            Some(format!(
                "Bearer {}.{p}.{s}",
                b64(&json!({"alg": "PS256", "kid": rsa_kid}))
            )),
        ),
        (
            "ES256 zero signature",
            Some(format!("Bearer {es_h}.{es_p}.{es_zero}")),
        ),
        (
            "ES256 DER signature",
            Some(format!("Bearer {es_h}.{es_p}.{es_der}")),
        ),
        (
            "standard base64 alphabet",
            Some(format!("Bearer {standard_alphabet}")),
        ),
        ("whitespace inside", Some(format!("Bearer {h}. {p}.{s}"))),
        (
            "audience an object",
            Some(format!(
                "Bearer {}",
                rs(with(good.clone(), "aud", json!({"aud": api_audience()})))
            )),
        ),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let client = Client::http1();
    for (case, authorization) in &cases {
        let mut request = Request::get(oboe.proxy_url("/api/x"));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let reply = client.send(request.body(empty()).expect("request")).await;
        let body = reply.assert_problem(401, "invalid_token");
        let challenge = reply.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{case}: {challenge}");
        if authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer "))
            && *case != "Bearer without token"
        {
            assert!(
                challenge.contains("error=\"invalid_token\", error_description=\""),
                "{case}: {challenge}"
            );
        }
        let detail = body["detail"].as_str().unwrap_or_default();
        if let Some(value) = authorization {
            let token = value.trim_start_matches("Bearer ");
            assert!(
                token.len() < 8 || !detail.contains(token),
                "{case}: the detail echoes the token"
            );
        }
    }
    assert_eq!(echo.received(), 0, "nothing reached the upstream");
    assert_eq!(
        idp.counters().token,
        0,
        "nothing reached the token endpoint"
    );
    let metrics = oboe.metrics().await;
    for reason in [
        "missing",
        "malformed",
        "algorithm",
        "forbidden_header",
        "bad_signature",
        "expired",
        "issuer",
        "audience",
        "unknown_key",
    ] {
        assert!(
            metric(
                &metrics,
                &format!("oboe_auth_rejections_total{{reason=\"{reason}\"}}")
            ) >= 1.0,
            "{reason} not counted:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn route_policy_refuses_with_403_naming_what_is_missing() {
    let idp = idp().await;
    let echo = Upstream::echo().await;
    let yaml = format!(
        "{}routes:\n{}{}{}",
        entra_identity(&idp, DEV_TENANT, ""),
        route(
            "scoped",
            "/scoped/",
            &echo.url("/"),
            "{ required: true, scopes: [Orders.Write, Orders.Admin] }",
            "{ grant: forward }"
        ),
        route(
            "roles",
            "/roles/",
            &echo.url("/"),
            "{ required: true, roles: [Orders.Sync] }",
            "{ grant: forward }"
        ),
        route(
            "users",
            "/users/",
            &echo.url("/"),
            "{ required: true, kinds: [user] }",
            "{ grant: forward }"
        ),
    );
    let oboe = Oboe::start(&yaml).await;
    let user = idp.mint(&user_mint());
    let app = idp.mint(&Mint::app(api_audience()).roles(["Orders.Read"]));

    let reply = call(&oboe.proxy_url("/scoped/x"), &user).await;
    let body = reply.assert_problem(403, "insufficient_scope");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("Orders.Write"),
        "{body}"
    );
    let challenge = reply.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(
        challenge.contains("scope=\"Orders.Write Orders.Admin\""),
        "{challenge}"
    );

    let body = call(&oboe.proxy_url("/roles/x"), &app)
        .await
        .assert_problem(403, "insufficient_scope");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("Orders.Sync"),
        "{body}"
    );
    let body = call(&oboe.proxy_url("/users/x"), &app)
        .await
        .assert_problem(403, "insufficient_scope");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("app-only"),
        "{body}"
    );

    let writer = idp.mint(&user_mint().scopes(["access_as_user", "Orders.Admin"]));
    assert_eq!(
        call(&oboe.proxy_url("/scoped/x"), &writer).await.status,
        200
    );
    let syncer = idp.mint(&Mint::app(api_audience()).roles(["Orders.Sync"]));
    assert_eq!(call(&oboe.proxy_url("/roles/x"), &syncer).await.status, 200);
    assert_eq!(call(&oboe.proxy_url("/users/x"), &user).await.status, 200);
    assert_eq!(
        echo.received(),
        3,
        "only the allowed requests reached the upstream"
    );
}

#[tokio::test]
async fn validate_endpoint_answers_the_callers_claims() {
    let idp = idp().await;
    let (oboe, echo) = guarded(&idp, "{ required: true }").await;
    let token = idp.mint(&user_mint());
    let reply = call(&oboe.proxy_url("/.oboe/v1/validate"), &token).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let claims = reply.json();
    assert_eq!(claims["tid"], DEV_TENANT);
    assert_eq!(claims["aud"], api_audience());
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    Client::http1()
        .get(&oboe.proxy_url("/.oboe/v1/validate"))
        .await
        .assert_problem(401, "invalid_token");
    assert_eq!(echo.received(), 0);
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_however_many_requests_need_it() {
    let idp = idp().await;
    let (oboe, _echo) = guarded(&idp, "{ required: true }").await;
    assert_eq!(
        call(&oboe.proxy_url("/api/x"), &idp.mint(&user_mint()))
            .await
            .status,
        200
    );
    let fetched = idp.counters().keys;

    idp.rotate_keys(false);
    let token = idp.mint(&user_mint());
    let requests = (0..50).map(|_| {
        let url = oboe.proxy_url("/api/x");
        let token = token.clone();
        tokio::spawn(async move { call(&url, &token).await.status })
    });
    for status in futures_util::future::join_all(requests).await {
        assert_eq!(status.expect("task"), 200);
    }
    assert_eq!(idp.counters().keys, fetched + 1, "one coalesced refetch");
    let metrics = oboe.metrics().await;
    assert!(
        metric(&metrics, "oboe_jwks_refreshes_total{outcome=\"ok\"}") >= 2.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("oboe_jwks_age_seconds{issuer="),
        "{metrics}"
    );
}

#[tokio::test]
async fn forged_kids_cannot_make_oboe_hammer_the_idp() {
    let idp = idp().await;
    let (oboe, _echo) = guarded(&idp, "{ required: true }").await;
    let before = idp.counters().keys;
    let good = good_claims(&idp);
    let client = Client::http1();
    let mut unknown = 0;
    for i in 0..1000 {
        let token = idp.sign_raw(
            Algorithm::RS256,
            json!({"kid": format!("forged-{i}")}),
            good.clone(),
        );
        let reply = client
            .send(bearer_get(&oboe.proxy_url("/api/x"), &token))
            .await;
        assert_eq!(reply.status, 401);
        unknown += 1;
    }
    assert_eq!(unknown, 1000);
    assert!(
        idp.counters().keys - before <= 1,
        "{} refetches",
        idp.counters().keys - before
    );
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_last_good_keys() {
    let idp = idp().await;
    let (oboe, _echo) = guarded(&idp, "{ required: true }").await;
    idp.update_behaviour(|b| b.keys_down = true);
    // A forged kid makes oboe refetch, which fails.
    let forged = idp.sign_raw(
        Algorithm::RS256,
        json!({"kid": "forged"}),
        good_claims(&idp),
    );
    call(&oboe.proxy_url("/api/x"), &forged)
        .await
        .assert_problem(401, "invalid_token");
    // A fresh token signed with the known key is still accepted.
    let fresh = idp.mint(&user_mint().claim("uti", "fresh"));
    assert_eq!(call(&oboe.proxy_url("/api/x"), &fresh).await.status, 200);
    let metrics = oboe.metrics().await;
    assert!(
        metric(&metrics, "oboe_jwks_refreshes_total{outcome=\"failed\"}") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn readiness_waits_for_the_keys_and_requests_meanwhile_get_503() {
    let idp = idp().await;
    idp.update_behaviour(|b| b.keys_down = true);
    let echo = Upstream::echo().await;
    let proxy_listener = bind_loopback().await;
    let admin_listener = bind_loopback().await;
    let (proxy, admin) = (
        proxy_listener.local_addr().expect("addr"),
        admin_listener.local_addr().expect("addr"),
    );
    let yaml = format!(
        "listen: {proxy}\nadmin: {{ listen: {admin} }}\n{}routes:\n{}",
        entra_identity(&idp, DEV_TENANT, ""),
        route(
            "api",
            "/api/",
            &echo.url("/"),
            "{ required: true }",
            "{ grant: forward }"
        ),
    );
    let config =
        oboe::config::load_str(&yaml, figment::providers::Env::raw().only(&[])).expect("config");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(oboe::run(
        config,
        oboe::Listeners {
            proxy: proxy_listener,
            admin: admin_listener,
        },
        async move {
            let _ = rx.await;
        },
    ));
    let client = Client::http1();
    eventually("the admin listener", || async {
        client
            .try_send(get_request(&format!("http://{admin}/readyz")))
            .await
            .is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.get(&format!("http://{admin}/readyz")).await.status,
        503
    );
    let reply = call(&format!("http://{proxy}/api/x"), &idp.mint(&user_mint())).await;
    reply.assert_problem(503, "idp_unavailable");
    assert!(reply.header("retry-after").is_some());

    idp.update_behaviour(|b| b.keys_down = false);
    wait_ready(admin).await;
    assert_eq!(
        call(&format!("http://{proxy}/api/x"), &idp.mint(&user_mint()))
            .await
            .status,
        200
    );
    let _ = tx.send(());
    let _ = task.await;
}

#[tokio::test]
async fn multi_tenant_accepts_each_tenant_on_its_own_issuer_only() {
    let idp = idp().await;
    let echo = Upstream::echo().await;
    let yaml = format!(
        "{}routes:\n{}",
        entra_identity(&idp, "organizations", ""),
        route(
            "api",
            "/api/",
            &echo.url("/"),
            "{ required: true }",
            "{ grant: forward }"
        ),
    );
    let oboe = Oboe::start(&yaml).await;
    for tenant in [DEV_TENANT, SECOND_TENANT] {
        let token = idp.mint(&user_mint().tenant(tenant));
        assert_eq!(
            call(&oboe.proxy_url("/api/x"), &token).await.status,
            200,
            "{tenant}"
        );
        let v1 = idp.mint(&user_mint().tenant(tenant).version(Version::V1));
        assert_eq!(
            call(&oboe.proxy_url("/api/x"), &v1).await.status,
            200,
            "{tenant} v1"
        );
    }
    // tid of one tenant, issuer of another.
    let mixed = idp.mint(
        &user_mint()
            .tenant(SECOND_TENANT)
            .claim("iss", idp.entra_issuer(DEV_TENANT)),
    );
    call(&oboe.proxy_url("/api/x"), &mixed)
        .await
        .assert_problem(401, "invalid_token");
    // tid that is not a GUID, with a matching issuer.
    let not_guid = idp.mint(
        &user_mint()
            .claim("tid", "contoso")
            .claim("iss", format!("{}/contoso/v2.0", idp.base_url())),
    );
    call(&oboe.proxy_url("/api/x"), &not_guid)
        .await
        .assert_problem(401, "invalid_token");
    assert_eq!(echo.received(), 4);
}

#[tokio::test]
async fn generic_oidc_issuers_are_discovered_and_enforced() {
    let idp = idp().await;
    let echo = Upstream::echo().await;
    let yaml = format!(
        "identity:\n  provider: oidc\n  issuer: {}\n  client_id: {CLIENT_ID}\ninbound:\n  audiences: [{}]\nroutes:\n{}",
        idp.oidc_issuer(),
        api_audience(),
        route(
            "api",
            "/api/",
            &echo.url("/"),
            "{ required: true }",
            "{ grant: forward }"
        ),
    );
    let oboe = Oboe::start(&yaml).await;
    let token = idp.mint(
        &Mint::user(api_audience())
            .scopes(["read"])
            .version(Version::Oidc),
    );
    assert_eq!(call(&oboe.proxy_url("/api/x"), &token).await.status, 200);
    let entra = idp.mint(&user_mint());
    call(&oboe.proxy_url("/api/x"), &entra)
        .await
        .assert_problem(401, "invalid_token");
}

#[tokio::test]
async fn a_token_seen_again_skips_verification_but_not_expiry() {
    let idp = idp().await;
    let (oboe, _echo) = guarded(&idp, "{ required: true }").await;
    let token = idp.mint(&user_mint());
    for _ in 0..5 {
        assert_eq!(call(&oboe.proxy_url("/api/x"), &token).await.status, 200);
    }
    let metrics = oboe.metrics().await;
    assert_eq!(
        metric(&metrics, "oboe_verified_token_cache_total{outcome=\"hit\"}"),
        4.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_cached_token_is_refused_once_it_expires() {
    let idp = idp().await;
    // Minted before the manual clock starts, so with no leeway its `iat` and
    // `nbf` are never ahead of oboe's (stopped) clock.
    let token = idp.mint(&user_mint().lifetime(Duration::from_secs(60)));
    let clock = oboe::clock::ManualClock::starting_now();
    let (oboe, echo) =
        guarded_with(&idp, "{ required: true }", "  leeway: 0s\n", clock.clone()).await;
    assert_eq!(call(&oboe.proxy_url("/api/x"), &token).await.status, 200);
    clock.advance(Duration::from_secs(30));
    assert_eq!(call(&oboe.proxy_url("/api/x"), &token).await.status, 200);
    clock.advance(Duration::from_secs(31));
    let reply = call(&oboe.proxy_url("/api/x"), &token).await;
    reply.assert_problem(401, "invalid_token");
    assert!(
        reply
            .header("www-authenticate")
            .unwrap_or_default()
            .contains("expired")
    );
    let metrics = oboe.metrics().await;
    assert_eq!(
        metric(&metrics, "oboe_verified_token_cache_total{outcome=\"hit\"}"),
        2.0,
        "the expired token was refused from the cache: {metrics}"
    );
    assert_eq!(echo.received(), 2);
}
