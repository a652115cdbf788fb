//! Forwarding: what the upstream receives and what the caller gets back, over
//! HTTP/1.1, h2c, TLS and HTTP/2 upstreams.

use http::{Request, StatusCode, Version};

use crate::harness::{Client, Oboe, TestCa, Upstream, full, open_route, raw_exchange};

#[tokio::test]
async fn method_path_query_headers_and_body_reach_the_upstream_with_the_prefix_rewritten() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("echo", "/echo/", &upstream.url("/base/v1/"), "")
    ))
    .await;

    let reply = Client::http1()
        .send(
            Request::patch(oboe.proxy_url("/echo/users/42?select=name&x=%20y"))
                .header("x-custom", "kept")
                .header("content-type", "text/plain")
                .body(full("hello upstream"))
                .expect("request"),
        )
        .await;

    assert_eq!(reply.status, StatusCode::OK);
    let seen = reply.json();
    assert_eq!(seen["method"], "PATCH");
    assert_eq!(seen["path"], "/base/v1/users/42");
    assert_eq!(seen["query"], "select=name&x=%20y");
    assert_eq!(seen["headers"]["x-custom"][0], "kept");
    assert_eq!(seen["headers"]["content-type"][0], "text/plain");
    assert_eq!(seen["body_bytes"], 14);
    assert_eq!(seen["body_error"], serde_json::Value::Null);
}

#[tokio::test]
async fn request_and_response_bodies_pass_through_byte_for_byte() {
    // The upstream answers with the request body it received.
    let upstream = Upstream::serve(|req| async move {
        let body = http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
            req.into_body(),
            |e| -> crate::harness::BoxError { Box::new(e) },
        ));
        http::Response::new(body)
    })
    .await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("mirror", "/mirror/", &upstream.url("/"), "")
    ))
    .await;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();

    let reply = Client::http1()
        .send(
            Request::put(oboe.proxy_url("/mirror/blob"))
                .body(full(payload.clone()))
                .expect("request"),
        )
        .await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.as_ref(), payload.as_slice());
}

#[tokio::test]
async fn longest_prefix_wins_and_the_route_root_maps_to_the_upstream_base_path() {
    let (api, v2) = (Upstream::echo().await, Upstream::echo().await);
    let oboe = Oboe::start(&format!(
        "routes:\n{}{}",
        open_route("api", "/api/", &api.url("/one/"), ""),
        open_route("api-v2", "/api/v2/", &v2.url("/two/"), ""),
    ))
    .await;
    let client = Client::http1();

    let deep = client.get(&oboe.proxy_url("/api/v2/users")).await.json();
    let shallow = client.get(&oboe.proxy_url("/api/v20")).await.json();
    let root = client.get(&oboe.proxy_url("/api")).await.json();

    assert_eq!(deep["path"], "/two/users");
    assert_eq!(shallow["path"], "/one/v20");
    assert_eq!(root["path"], "/one");
    assert_eq!((api.received(), v2.received()), (2, 1));
}

#[tokio::test]
async fn host_and_forwarding_headers_are_set_for_the_upstream() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("echo", "/echo/", &upstream.url("/"), "")
    ))
    .await;

    let seen = Client::http1()
        .send(
            Request::get(oboe.proxy_url("/echo/x"))
                .header("host", "app.example:8443")
                .header("x-forwarded-for", "203.0.113.7")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .header("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
                .body(crate::harness::empty())
                .expect("request"),
        )
        .await
        .json();

    let headers = &seen["headers"];
    assert_eq!(headers["host"][0], upstream.addr.to_string());
    assert_eq!(headers["x-forwarded-for"][0], "203.0.113.7, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"][0], "http");
    assert_eq!(headers["x-forwarded-host"][0], "app.example:8443");
    assert_eq!(
        headers["traceparent"][0],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(
        headers["tracestate"][0],
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    );
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_not_forwarded() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("echo", "/echo/", &upstream.url("/"), "")
    ))
    .await;

    // Raw bytes: a client library would manage some of these itself.
    let reply = raw_exchange(
        oboe.proxy,
        b"GET /echo/hop HTTP/1.1\r\n\
          Host: app.local\r\n\
          Connection: close, X-Hop-Secret\r\n\
          X-Hop-Secret: must-not-leave\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: gzip\r\n\
          Upgrade: websocket\r\n\
          Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n\
          Proxy-Connection: keep-alive\r\n\
          X-End-To-End: kept\r\n\
          \r\n",
    )
    .await;

    assert_eq!(reply.status, 200);
    let headers = reply.json()["headers"].clone();
    for name in [
        "connection",
        "x-hop-secret",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            headers.get(name).is_none(),
            "{name} reached the upstream: {headers}"
        );
    }
    assert_eq!(headers["x-end-to-end"][0], "kept");
}

#[tokio::test]
async fn te_trailers_is_the_one_te_value_forwarded() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("echo", "/echo/", &upstream.url("/"), "")
    ))
    .await;

    let reply = raw_exchange(
        oboe.proxy,
        b"GET /echo/grpcish HTTP/1.1\r\nHost: app.local\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;

    assert_eq!(reply.json()["headers"]["te"][0], "trailers");
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_returned_to_the_caller() {
    let upstream = Upstream::raw(
        b"HTTP/1.1 200 OK\r\n\
          Content-Length: 2\r\n\
          Connection: close, X-Resp-Hop\r\n\
          X-Resp-Hop: upstream-internal\r\n\
          Keep-Alive: timeout=5\r\n\
          Proxy-Authenticate: Basic realm=\"upstream\"\r\n\
          Proxy-Connection: keep-alive\r\n\
          X-End-To-End: kept\r\n\
          \r\n\
          ok",
    )
    .await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("raw", "/raw/", &upstream.url("/"), "")
    ))
    .await;

    let reply = Client::http1().get(&oboe.proxy_url("/raw/x")).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "ok");
    for name in [
        "x-resp-hop",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
    ] {
        assert!(
            reply.header(name).is_none(),
            "{name} reached the caller: {:?}",
            reply.headers
        );
    }
    // oboe's own connection to the caller is not closed because the upstream's was.
    assert_ne!(reply.header("connection"), Some("close, X-Resp-Hop"));
    assert_eq!(reply.header("x-end-to-end"), Some("kept"));
}

#[tokio::test]
async fn route_header_edits_set_and_remove_headers() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route(
            "echo",
            "/echo/",
            &upstream.url("/"),
            "    headers:\n      set: {x-client: my-api, x-override: from-route}\n      remove: [cookie, x-drop]\n"
        )
    ))
    .await;

    let seen = Client::http1()
        .send(
            Request::get(oboe.proxy_url("/echo/x"))
                .header("cookie", "session=abc")
                .header("x-drop", "1")
                .header("x-override", "from-caller")
                .header("x-other", "kept")
                .body(crate::harness::empty())
                .expect("request"),
        )
        .await
        .json();

    let headers = &seen["headers"];
    assert!(headers.get("cookie").is_none(), "{headers}");
    assert!(headers.get("x-drop").is_none(), "{headers}");
    assert_eq!(headers["x-client"][0], "my-api");
    assert_eq!(headers["x-override"][0], "from-route");
    assert_eq!(headers["x-override"].as_array().map(Vec::len), Some(1));
    assert_eq!(headers["x-other"][0], "kept");
}

#[tokio::test]
async fn authorization_is_stripped_on_none_routes_and_kept_on_forward_routes() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}  - name: fwd\n    path_prefix: /fwd/\n    upstream: {}\n    caller: {{ required: false }}\n    token: {{ grant: forward }}\n",
        open_route("none", "/none/", &upstream.url("/"), ""),
        upstream.url("/"),
    ))
    .await;
    let client = Client::http1();
    let with_token = |path: &str| {
        Request::get(oboe.proxy_url(path))
            .header("authorization", "Bearer caller-token")
            .body(crate::harness::empty())
            .expect("request")
    };

    let none = client.send(with_token("/none/x")).await.json();
    let forward = client.send(with_token("/fwd/x")).await.json();

    assert!(none["headers"].get("authorization").is_none(), "{none}");
    assert_eq!(
        forward["headers"]["authorization"][0],
        "Bearer caller-token"
    );
}

#[tokio::test]
async fn an_h2c_client_is_served_and_proxied_to_an_http1_upstream() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("echo", "/echo/", &upstream.url("/"), "")
    ))
    .await;

    let reply = Client::h2c()
        .send(
            Request::post(oboe.proxy_url("/echo/h2?q=1"))
                .header("x-custom", "over-h2")
                .body(full("twelve bytes"))
                .expect("request"),
        )
        .await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.version, Version::HTTP_2);
    let seen = reply.json();
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["path"], "/h2");
    assert_eq!(seen["query"], "q=1");
    assert_eq!(seen["body_bytes"], 12);
    assert_eq!(seen["headers"]["x-custom"][0], "over-h2");
    assert_eq!(seen["headers"]["host"][0], upstream.addr.to_string());
    // On HTTP/2 the caller's authority is `:authority`, not a Host header.
    assert_eq!(
        seen["headers"]["x-forwarded-host"][0],
        oboe.proxy.to_string()
    );
}

#[tokio::test]
async fn an_https_upstream_signed_by_the_configured_ca_is_reached() {
    let ca = TestCa::new();
    let upstream = Upstream::tls_echo(&ca, &[b"http/1.1"]).await;
    let oboe = Oboe::start(&format!(
        "upstream: {{ ca_file: {} }}\nroutes:\n{}",
        ca.ca_path().display(),
        open_route(
            "tls",
            "/tls/",
            &format!("https://{}/secure/", upstream.addr),
            ""
        )
    ))
    .await;

    let reply = Client::http1().get(&oboe.proxy_url("/tls/x?y=1")).await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["path"], "/secure/x");
    assert_eq!(seen["query"], "y=1");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(upstream.received(), 1);
}

#[tokio::test]
async fn an_https_upstream_with_an_unknown_ca_is_refused_with_502() {
    let ca = TestCa::new();
    let upstream = Upstream::tls_echo(&ca, &[b"http/1.1"]).await;
    // No ca_file: only the web PKI roots are trusted.
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("tls", "/tls/", &format!("https://{}/", upstream.addr), "")
    ))
    .await;

    let reply = Client::http1().get(&oboe.proxy_url("/tls/x")).await;

    reply.assert_problem(502, "upstream_unreachable");
    assert_eq!(upstream.received(), 0);
}

#[tokio::test]
async fn an_http2_upstream_is_spoken_to_over_tls_with_alpn_h2() {
    let ca = TestCa::new();
    let upstream = Upstream::tls_echo(&ca, &[b"h2"]).await;
    let oboe = Oboe::start(&format!(
        "upstream: {{ ca_file: {} }}\nroutes:\n{}",
        ca.ca_path().display(),
        open_route("h2", "/h2/", &format!("https://{}/", upstream.addr), "")
    ))
    .await;
    let client = Client::http1();

    let reply = client
        .send(
            Request::post(oboe.proxy_url("/h2/items?page=2"))
                .header("x-custom", "kept")
                .body(full("0123456789"))
                .expect("request"),
        )
        .await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["version"], "HTTP/2.0");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/items");
    assert_eq!(seen["query"], "page=2");
    assert_eq!(seen["body_bytes"], 10);
    assert_eq!(seen["headers"]["x-custom"][0], "kept");
    // The pooled HTTP/2 connection serves the next request too.
    let again = client.get(&oboe.proxy_url("/h2/again")).await;
    assert_eq!(again.json()["version"], "HTTP/2.0");
}

/// With the default pool size, connections to the upstream that a burst of
/// concurrent requests opened are all kept and reused by the next burst: the
/// pool never closes a connection a request in flight will want again (a
/// pool smaller than the concurrency churns connections under load).
#[tokio::test]
async fn a_burst_of_concurrent_requests_reuses_every_pooled_upstream_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const BURST: usize = 100;
    let listener = crate::harness::bind_loopback().await;
    let addr = listener.local_addr().expect("address");
    let connections = Arc::new(AtomicUsize::new(0));
    // Every request waits until the whole burst is in flight, so the burst
    // needs BURST upstream connections at once, and they all go idle together.
    let barrier = Arc::new(tokio::sync::Barrier::new(BURST));
    let accepted = connections.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let barrier = barrier.clone();
                    async move {
                        barrier.wait().await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(full("ok")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("burst", "/", &format!("http://{addr}/"), "")
    ))
    .await;

    let (client, url) = (Client::http1(), oboe.proxy_url("/x"));
    for round in 1..=3 {
        let requests = (0..BURST).map(|_| client.get(&url));
        let replies =
            crate::harness::within("a burst", futures_util::future::join_all(requests)).await;
        assert!(
            replies.iter().all(|r| r.status == StatusCode::OK),
            "round {round}"
        );
        assert_eq!(
            connections.load(Ordering::SeqCst),
            BURST,
            "round {round}: upstream connections opened so far"
        );
    }
    server.abort();
}
