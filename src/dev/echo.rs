//! An upstream that answers every request with what it received, as JSON: the
//! method, path, query, headers and the size of the body (counted while
//! streaming, never buffered). Used by `oboe dev`, the tests and the benchmark.

use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

/// Serves the echo upstream on `listener` (HTTP/1.1 and h2c) until the task is dropped.
pub async fn serve(listener: TcpListener) {
    let builder = crate::server::http_builder(64 * 1024);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let conn = builder
            .serve_connection(TokioIo::new(stream), service_fn(echo))
            .into_owned();
        tokio::spawn(conn);
    }
}

/// Answers one request with its own description.
pub async fn echo(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, mut body) = request.into_parts();
    let mut body_bytes: u64 = 0;
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    let mut headers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str())
            .or_default()
            .push(value.to_str().unwrap_or("<binary>"));
    }
    let answer = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
        "body_error": body_error,
    });
    let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
