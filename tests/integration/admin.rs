//! The admin listener: probes and the Prometheus text kubelet and Prometheus see.

use http::{Request, StatusCode};

use crate::harness::{Client, Oboe, Upstream, closed_port, empty, metric, open_route};

#[tokio::test]
async fn healthz_and_readyz_answer_while_serving_and_unknown_paths_are_404() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("echo", "/echo/", &upstream.url("/"), "")
    ))
    .await;
    let client = Client::http1();

    let healthz = client.get(&oboe.admin_url("/healthz")).await;
    let readyz = client.get(&oboe.admin_url("/readyz")).await;
    let unknown = client.get(&oboe.admin_url("/nope")).await;
    let post = client
        .send(
            Request::post(oboe.admin_url("/readyz"))
                .body(empty())
                .expect("request"),
        )
        .await;

    assert_eq!(healthz.status, StatusCode::OK);
    assert_eq!(readyz.status, StatusCode::OK);
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    // The admin listener is not the proxy: nothing is routed from it.
    assert_eq!(
        client.get(&oboe.admin_url("/echo/x")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(upstream.received(), 0);
}

#[tokio::test]
async fn metrics_count_requests_by_route_method_and_status_class() {
    let upstream = Upstream::echo().await;
    let dead = closed_port().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}{}",
        open_route("echo", "/echo/", &upstream.url("/"), ""),
        open_route("dead", "/dead/", &format!("http://{dead}/"), ""),
    ))
    .await;
    let client = Client::http1();

    for _ in 0..3 {
        assert_eq!(
            client.get(&oboe.proxy_url("/echo/x")).await.status,
            StatusCode::OK
        );
    }
    let post = Request::post(oboe.proxy_url("/echo/y"))
        .body(crate::harness::full("body"))
        .expect("request");
    assert_eq!(client.send(post).await.status, StatusCode::OK);
    client.get(&oboe.proxy_url("/nowhere")).await;
    client.get(&oboe.proxy_url("/dead/x")).await;
    client.get(&oboe.proxy_url("/dead/y")).await;
    let text = oboe.metrics().await;

    assert_eq!(
        metric(
            &text,
            r#"oboe_requests_total{route="echo",method="GET",status="2xx"}"#
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"oboe_requests_total{route="echo",method="POST",status="2xx"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"oboe_requests_total{route="none",method="GET",status="4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"oboe_requests_total{route="dead",method="GET",status="5xx"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"oboe_upstream_errors_total{route="dead",kind="connect"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"oboe_request_duration_seconds_count{route="echo"}"#
        ),
        4.0
    );
    assert_eq!(metric(&text, "oboe_requests_in_flight"), 0.0);
    assert!(
        text.contains(&format!(
            r#"oboe_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_show_a_request_in_flight_until_its_body_ends() {
    let (upstream, held) = Upstream::held().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("held", "/held/", &upstream.url("/"), "")
    ))
    .await;
    let request = tokio::spawn({
        let url = oboe.proxy_url("/held/x");
        async move { Client::http1().get(&url).await }
    });
    held.arrived().await;

    let during = oboe.metrics().await;
    held.release("done");
    let reply = crate::harness::within("the held request", request)
        .await
        .expect("task");
    let after = oboe.metrics().await;

    assert_eq!(metric(&during, "oboe_requests_in_flight"), 1.0, "{during}");
    assert_eq!(reply.text(), "done");
    assert_eq!(metric(&after, "oboe_requests_in_flight"), 0.0, "{after}");
    assert_eq!(
        metric(
            &after,
            r#"oboe_requests_total{route="held",method="GET",status="2xx"}"#
        ),
        1.0
    );
}
