//! Bodies stream both ways and are never buffered whole; a broken exchange on
//! either side does not stop oboe from serving the next request.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::{
    Client, GeneratedBody, Oboe, RssPeak, Upstream, drain_body, open_route, within,
};

const FIFTY_MB: u64 = 50 * 1024 * 1024;
/// Growth of this process's resident memory allowed while 50 MB pass through
/// oboe, the upstream and the client (all in this process).
const MEMORY_BOUND: u64 = 30 * 1024 * 1024;

#[tokio::test]
async fn a_50_mb_download_streams_through_with_memory_bounded() {
    let upstream = Upstream::download(FIFTY_MB).await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("files", "/files/", &upstream.url("/"), "")
    ))
    .await;
    let rss = RssPeak::start();

    let response = Client::http1()
        .stream(
            Request::get(oboe.proxy_url("/files/big.bin"))
                .body(crate::harness::empty())
                .expect("request"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-length"],
        FIFTY_MB.to_string().as_str()
    );
    let mut body = response.into_body();
    let (mut received, mut frames) = (0u64, 0u64);
    while let Some(frame) = within("the next frame", body.frame()).await {
        let frame = frame.expect("body frame");
        received += frame.data_ref().map_or(0, |d| d.len() as u64);
        frames += 1;
        if frames % 16 == 0 {
            rss.sample();
        }
    }
    rss.sample();

    assert_eq!(received, FIFTY_MB);
    assert!(
        rss.growth() < MEMORY_BOUND,
        "resident memory grew by {} MiB during the download",
        rss.growth() / (1024 * 1024)
    );
}

#[tokio::test]
async fn a_50_mb_upload_streams_through_with_memory_bounded() {
    let upstream = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("upload", "/upload/", &upstream.url("/"), "")
    ))
    .await;
    let rss = RssPeak::start();

    let reply = Client::http1()
        .send(
            Request::post(oboe.proxy_url("/upload/big.bin"))
                .header("content-length", FIFTY_MB)
                .body(GeneratedBody::new(FIFTY_MB, Some(rss.clone())).boxed())
                .expect("request"),
        )
        .await;
    rss.sample();

    assert_eq!(reply.status, StatusCode::OK);
    let seen = reply.json();
    assert_eq!(seen["body_bytes"], FIFTY_MB);
    assert_eq!(seen["body_error"], serde_json::Value::Null);
    assert_eq!(seen["headers"]["content-length"][0], FIFTY_MB.to_string());
    assert!(
        rss.growth() < MEMORY_BOUND,
        "resident memory grew by {} MiB during the upload",
        rss.growth() / (1024 * 1024)
    );
}

#[tokio::test]
async fn a_slowly_dripped_chunked_response_reaches_the_client_chunk_by_chunk() {
    let (upstream, drip) = Upstream::drip().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("drip", "/drip/", &upstream.url("/"), "")
    ))
    .await;
    drip.send(Bytes::from_static(b"first;"))
        .await
        .expect("drip");

    let response = Client::http1()
        .stream(
            Request::get(oboe.proxy_url("/drip/events"))
                .body(crate::harness::empty())
                .expect("request"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let mut body = response.into_body();

    // Each chunk is read by the client before the upstream sends the next one.
    let chunks = ["first;", "second;", "third;"];
    for (i, chunk) in chunks.iter().enumerate() {
        let frame = within("a dripped chunk", body.frame())
            .await
            .expect("a frame before the end")
            .expect("body frame");
        assert_eq!(frame.into_data().expect("a data frame"), chunk.as_bytes());
        if let Some(next) = chunks.get(i + 1) {
            drip.send(Bytes::from_static(next.as_bytes()))
                .await
                .expect("drip");
        }
    }
    drop(drip);
    let rest = within("the end of the body", body.collect())
        .await
        .expect("body");
    assert!(rest.to_bytes().is_empty());
}

#[tokio::test]
async fn a_client_disconnecting_mid_body_leaves_oboe_serving_the_next_request() {
    let (upstream, mut outcomes) = Upstream::body_sink().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}",
        open_route("sink", "/sink/", &upstream.url("/"), "")
    ))
    .await;

    let mut stream = TcpStream::connect(oboe.proxy).await.expect("connect");
    stream
        .write_all(b"POST /sink/x HTTP/1.1\r\nHost: app.local\r\nContent-Length: 10000000\r\n\r\n")
        .await
        .expect("write head");
    stream
        .write_all(&[b'x'; 64 * 1024])
        .await
        .expect("write part of the body");
    let cut = within("the upstream to see the body", outcomes.recv());
    drop(stream);

    // The upstream sees the body cut short, not a complete (truncated) request.
    let outcome = cut.await.expect("an outcome");
    assert!(
        outcome.is_err(),
        "the upstream saw a complete body: {outcome:?}"
    );
    let reply = Client::http1()
        .send(
            Request::post(oboe.proxy_url("/sink/y"))
                .body(crate::harness::full("whole"))
                .expect("request"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let next = within("the next body", outcomes.recv())
        .await
        .expect("an outcome");
    assert_eq!(next, Ok(5));
}

#[tokio::test]
async fn an_upstream_dying_mid_response_leaves_oboe_serving_the_next_request() {
    let dying = Upstream::raw(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nContent-Type: application/octet-stream\r\n\r\npartial-body-then-the-upstream-dies",
    )
    .await;
    let healthy = Upstream::echo().await;
    let oboe = Oboe::start(&format!(
        "routes:\n{}{}",
        open_route("dying", "/dying/", &dying.url("/"), ""),
        open_route("echo", "/echo/", &healthy.url("/"), ""),
    ))
    .await;
    let client = Client::http1();

    let response = client
        .stream(
            Request::get(oboe.proxy_url("/dying/x"))
                .body(crate::harness::empty())
                .expect("request"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (received, error) = drain_body(response.into_body()).await;

    // The caller learns the body is incomplete: it is cut, never ended cleanly.
    assert!(
        error.is_some(),
        "the body ended cleanly after {received} bytes"
    );
    assert!(received < 1_000_000);
    let next = client.get(&oboe.proxy_url("/echo/after")).await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(next.json()["path"], "/after");
    // And the broken route itself still answers (and breaks) the same way.
    let again = client
        .stream(
            Request::get(oboe.proxy_url("/dying/again"))
                .body(crate::harness::empty())
                .expect("request"),
        )
        .await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(dying.received(), 2);
}
