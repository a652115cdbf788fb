//! What the caller gets when oboe refuses or the upstream fails: RFC 9457
//! problem bodies with stable codes, unsafe paths refused before any upstream
//! call, and the upstream's own errors passed through untouched.

use std::time::{Duration, Instant};

use http::{Request, StatusCode};

use crate::harness::{
    Client, Oboe, Upstream, closed_port, empty, open_route, raw_exchange, within,
};

#[tokio::test]
async fn dot_segment_and_encoded_separator_paths_are_refused_before_any_upstream_call() {
    let (api, admin) = (Upstream::echo().await, Upstream::echo().await);
    let oboe = Oboe::start(&format!(
        "routes:\n{}{}",
        open_route("api", "/api/", &api.url("/"), ""),
        open_route("admin", "/admin/", &admin.url("/"), ""),
    ))
    .await;

    for path in [
        "/api/../admin",
        "/api/../admin/",
        "/api/%2e%2e/admin",
        "/api/%2E%2E/admin",
        "/api/./x",
        "/api/a%2fb",
        "/api/a%2Fb",
        "/api/a%5cb",
        "/api/a\\b",
    ] {
        // Raw bytes: HTTP clients would normalise these before sending.
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n\r\n");
        let reply = raw_exchange(oboe.proxy, request.as_bytes()).await;
        assert_eq!(reply.status, 400, "{path}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json"),
            "{path}"
        );
        assert_eq!(reply.json()["error"], "bad_path", "{path}");
    }
    assert_eq!(api.received(), 0, "the api upstream was called");
    assert_eq!(admin.received(), 0, "the admin upstream was called");
}

#[tokio::test]
async fn a_path_no_route_matches_is_404_no_route() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("api", "/api/", &upstream.url("/"), "")
    ))
    .await;
    let client = Client::http1();

    let elsewhere = client.get(&oboe.proxy_url("/other/x")).await;
    // A prefix matches at a segment boundary only.
    let lookalike = client.get(&oboe.proxy_url("/apix")).await;

    let body = elsewhere.assert_problem(404, "no_route");
    assert_eq!(body["type"], "urn:oboe:error:no_route");
    assert_eq!(elsewhere.header("cache-control"), Some("no-store"));
    lookalike.assert_problem(404, "no_route");
    assert_eq!(upstream.received(), 0);
}

#[tokio::test]
async fn an_upstream_refusing_connections_is_502_upstream_unreachable() {
    let dead = closed_port().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("dead", "/dead/", &format!("http://{dead}/"), "")
    ))
    .await;

    let reply = Client::http1().get(&oboe.proxy_url("/dead/x")).await;

    let body = reply.assert_problem(502, "upstream_unreachable");
    assert_eq!(body["route"], "dead");
    // The detail must not name internal addresses.
    assert!(
        !reply.text().contains(&dead.port().to_string()),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn an_upstream_closing_without_an_answer_is_502_upstream_failed() {
    let upstream = Upstream::raw(b"").await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("hangup", "/hangup/", &upstream.url("/"), "")
    ))
    .await;

    let reply = Client::http1().get(&oboe.proxy_url("/hangup/x")).await;

    reply.assert_problem(502, "upstream_failed");
    assert!(upstream.received() >= 1);
}

#[tokio::test]
async fn an_upstream_slower_than_the_route_timeout_is_504_upstream_timeout() {
    let upstream = Upstream::silent().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("slow", "/slow/", &upstream.url("/"), "    timeout: 300ms\n")
    ))
    .await;

    let started = Instant::now();
    let reply = Client::http1().get(&oboe.proxy_url("/slow/x")).await;
    let waited = started.elapsed();

    reply.assert_problem(504, "upstream_timeout");
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    assert_eq!(upstream.received(), 1);
}

#[tokio::test]
async fn requests_over_max_requests_are_503_overloaded_not_queued() {
    let (upstream, held) = Upstream::held().await;
    let oboe = Oboe::start(&format!(
        "limits: {{ max_requests: 1 }}\nroutes:\n{}",
        open_route("held", "/held/", &upstream.url("/"), "")
    ))
    .await;
    let client = Client::http1();
    let first = tokio::spawn({
        let (client, url) = (client.clone(), oboe.proxy_url("/held/first"));
        async move { client.get(&url).await }
    });
    held.arrived().await;

    let second = Client::http1().get(&oboe.proxy_url("/held/second")).await;

    second.assert_problem(503, "overloaded");
    assert_eq!(second.header("retry-after"), Some("1"));
    assert_eq!(
        upstream.received(),
        1,
        "the refused request reached the upstream"
    );
    held.release("first done");
    let first = within("the held request", first).await.expect("task");
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.text(), "first done");
    // The slot is free again once the first response has ended.
    held.release("third done");
    let third = client.get(&oboe.proxy_url("/held/third")).await;
    assert_eq!(third.text(), "third done");
}

#[tokio::test]
async fn connections_over_max_connections_are_answered_503_and_closed() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "limits: {{ max_connections: 1 }}\nroutes:\n{}",
        open_route("echo", "/echo/", &upstream.url("/"), "")
    ))
    .await;
    // The first client's keep-alive connection holds the only slot.
    let first = Client::http1();
    assert_eq!(
        first.get(&oboe.proxy_url("/echo/a")).await.status,
        StatusCode::OK
    );

    let reply = raw_exchange(
        oboe.proxy,
        b"GET /echo/b HTTP/1.1\r\nHost: app.local\r\n\r\n",
    )
    .await;

    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("connection"), Some("close"));
    assert_eq!(reply.json()["error"], "overloaded");
    assert_eq!(upstream.received(), 1);
}

#[tokio::test]
async fn a_request_head_larger_than_max_header_bytes_is_refused() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "limits: {{ max_header_bytes: 8192 }}\nroutes:\n{}",
        open_route("echo", "/echo/", &upstream.url("/"), "")
    ))
    .await;
    let big = "a".repeat(20_000);

    let reply = raw_exchange(
        oboe.proxy,
        format!(
            "GET /echo/x HTTP/1.1\r\nHost: app.local\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;

    assert_eq!(reply.status, 431);
    assert_eq!(upstream.received(), 0);
}

#[tokio::test]
async fn the_upstreams_own_error_answers_pass_through_unchanged() {
    let unauthorized = Upstream::fixed(
        401,
        &[
            (
                "www-authenticate",
                "Bearer realm=\"api\", error=\"invalid_token\"",
            ),
            ("content-type", "application/json"),
        ],
        r#"{"code":"from-upstream"}"#,
    )
    .await;
    let unavailable = Upstream::fixed(
        503,
        &[("retry-after", "7"), ("content-type", "text/plain")],
        "upstream busy",
    )
    .await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}{}",
        open_route("auth", "/auth/", &unauthorized.url("/"), ""),
        open_route("busy", "/busy/", &unavailable.url("/"), ""),
    ))
    .await;
    let client = Client::http1();

    let denied = client.get(&oboe.proxy_url("/auth/x")).await;
    let busy = client
        .send(
            Request::delete(oboe.proxy_url("/busy/x"))
                .body(empty())
                .expect("request"),
        )
        .await;

    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        denied.header("www-authenticate"),
        Some("Bearer realm=\"api\", error=\"invalid_token\"")
    );
    assert_eq!(denied.header("content-type"), Some("application/json"));
    assert_eq!(denied.text(), r#"{"code":"from-upstream"}"#);
    assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(busy.header("retry-after"), Some("7"));
    assert_eq!(busy.header("content-type"), Some("text/plain"));
    assert_eq!(busy.text(), "upstream busy");
}
