//! Graceful shutdown: readiness goes false, the listener stops accepting,
//! in-flight requests finish within `shutdown_grace`, and the process exits 0.

use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::net::TcpStream;

use crate::harness::{
    Client, Oboe, OboeProcess, Upstream, eventually, get_request, open_route, within,
};

/// True when a new TCP connection to `addr` is refused.
async fn refuses_connections(addr: std::net::SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}

/// The `/readyz` status, or `None` when the admin listener does not answer.
async fn readyz(client: &Client, url: &str) -> Option<StatusCode> {
    client
        .try_send(get_request(url))
        .await
        .ok()
        .map(|r| r.status)
}

#[tokio::test]
async fn readyz_flips_to_503_during_drain_while_a_request_is_still_in_flight() {
    let (upstream, held) = Upstream::held().await;
    let oboe = Oboe::start(&format!(
        "shutdown_grace: 10s\nroutes:\n{}",
        open_route("held", "/held/", &upstream.url("/"), "")
    ))
    .await;
    let (proxy, readyz_url) = (oboe.proxy, oboe.admin_url("/readyz"));
    let in_flight = tokio::spawn({
        let url = oboe.proxy_url("/held/slow");
        async move { Client::http1().get(&url).await }
    });
    held.arrived().await;

    let drain = oboe.begin_shutdown();

    let client = Client::http1();
    eventually("/readyz to answer 503", || async {
        readyz(&client, &readyz_url).await == Some(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    eventually("the proxy listener to refuse connections", || {
        refuses_connections(proxy)
    })
    .await;
    // Still draining: readiness stays false while the request is in flight.
    assert_eq!(
        readyz(&client, &readyz_url).await,
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(!in_flight.is_finished());
    held.release("finished during drain");
    let reply = within("the in-flight request", in_flight)
        .await
        .expect("task");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "finished during drain");
    drain.finished().await.expect("oboe::run returns Ok");
}

#[tokio::test]
async fn a_request_outliving_shutdown_grace_is_cut_and_the_process_still_exits_0() {
    let (upstream, held) = Upstream::held().await;
    let mut oboe = OboeProcess::start(&format!(
        "shutdown_grace: 300ms\nroutes:\n{}",
        open_route("held", "/held/", &upstream.url("/"), "")
    ))
    .await;
    let in_flight = tokio::spawn({
        let url = oboe.proxy_url("/held/forever");
        async move { Client::http1().try_send(get_request(&url)).await }
    });
    held.arrived().await;

    let started = Instant::now();
    oboe.terminate();
    let status = oboe.wait_exit().await;
    let drained_in = started.elapsed();

    assert_eq!(status.code(), Some(0), "stderr:\n{}", oboe.stderr());
    assert!(
        drained_in >= Duration::from_millis(300) && drained_in < Duration::from_secs(5),
        "exited {drained_in:?} after SIGTERM"
    );
    assert!(oboe.stderr().contains("shutdown grace elapsed"));
    // The never-answered request is cut, not given a made-up success.
    let outcome = within("the cut request", in_flight).await.expect("task");
    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test]
async fn sigterm_lets_the_in_flight_request_finish_refuses_new_connections_and_exits_0() {
    let (upstream, held) = Upstream::held().await;
    let mut oboe = OboeProcess::start(&format!(
        "routes:\n{}",
        open_route("held", "/held/", &upstream.url("/"), "")
    ))
    .await;
    let in_flight = tokio::spawn({
        let url = oboe.proxy_url("/held/slow");
        async move { Client::http1().get(&url).await }
    });
    held.arrived().await;

    oboe.terminate();

    let client = Client::http1();
    let readyz_url = oboe.admin_url("/readyz");
    eventually("/readyz to answer 503", || async {
        readyz(&client, &readyz_url).await == Some(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    let proxy = oboe.proxy;
    eventually("the proxy listener to refuse connections", || {
        refuses_connections(proxy)
    })
    .await;
    assert!(!in_flight.is_finished());
    held.release("finished after SIGTERM");
    let reply = within("the in-flight request", in_flight)
        .await
        .expect("task");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "finished after SIGTERM");
    let status = oboe.wait_exit().await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", oboe.stderr());
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once_without_waiting_for_the_drain() {
    let (upstream, held) = Upstream::held().await;
    let mut oboe = OboeProcess::start(&format!(
        "routes:\n{}",
        open_route("held", "/held/", &upstream.url("/"), "")
    ))
    .await;
    let in_flight = tokio::spawn({
        let url = oboe.proxy_url("/held/slow");
        async move { Client::http1().try_send(get_request(&url)).await }
    });
    held.arrived().await;
    oboe.terminate();
    let (client, readyz_url) = (Client::http1(), oboe.admin_url("/readyz"));
    eventually("the drain to begin", || async {
        readyz(&client, &readyz_url).await == Some(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;

    // The second-signal handler is installed as the drain begins; repeat the
    // signal until it is seen (the held request would keep a drain going 10s).
    let started = Instant::now();
    let status = loop {
        oboe.terminate();
        if let Ok(status) = tokio::time::timeout(Duration::from_millis(200), oboe.wait_exit()).await
        {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "oboe kept draining"
        );
    };

    assert_eq!(status.code(), Some(130), "stderr:\n{}", oboe.stderr());
    assert!(oboe.stderr().contains("second signal"));
    let outcome = within("the cut request", in_flight).await.expect("task");
    assert!(outcome.is_err(), "{outcome:?}");
}
