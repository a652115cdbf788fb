//! The access log, read from the real binary's stderr (JSON lines): one line
//! per request, and never a credential, a cookie or a query string.

use http::{Request, StatusCode};

use crate::harness::{Client, OboeProcess, Upstream, empty, open_route};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LWNsYWltcw.c2lnbmF0dXJlLXZhbHVl";
const COOKIE: &str = "session=cookie-secret-4711";
const QUERY: &str = "code=query-secret-0815&state=xyz";

#[tokio::test]
async fn access_log_has_one_line_per_request_without_authorization_cookies_or_query() {
    let upstream = Upstream::echo().await;
    let mut oboe = OboeProcess::start(&format!(
        "routes:\n{}",
        open_route("echo", "/echo/", &upstream.url("/"), "")
    ))
    .await;
    let client = Client::http1();
    for path in ["/echo/callback", "/nowhere"] {
        let reply = client
            .send(
                Request::get(oboe.proxy_url(&format!("{path}?{QUERY}")))
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .header("cookie", COOKIE)
                    .body(empty())
                    .expect("request"),
            )
            .await;
        assert_ne!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    oboe.terminate();
    assert_eq!(oboe.wait_exit().await.code(), Some(0));

    let log = oboe.stderr();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "oboe::access")
        .collect();
    assert_eq!(access.len(), 2, "{log}");
    assert_eq!(access[0]["route"], "echo");
    assert_eq!(access[0]["method"], "GET");
    assert_eq!(access[0]["status"], 200);
    assert_eq!(access[0]["upstream_status"], 200);
    assert!(access[0]["duration_ms"].is_number());
    assert!(access[0]["bytes"].as_u64().is_some_and(|b| b > 0));
    assert_eq!(access[1]["status"], 404);
    assert_eq!(access[1]["error"], "no_route");
    for secret in [
        TOKEN,
        "Bearer",
        "cookie-secret-4711",
        "query-secret-0815",
        "state=xyz",
    ] {
        assert!(!log.contains(secret), "the log contains {secret:?}:\n{log}");
    }
    // The upstream did get the query: it is kept off the log, not dropped.
    assert_eq!(upstream.last_request().uri.query(), Some(QUERY));
}
