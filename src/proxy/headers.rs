//! Header rewriting between the caller and the upstream: hop-by-hop removal
//! (RFC 9110 §7.6.1), forwarding headers, `Host`, route edits. Pure functions
//! over `HeaderMap`, unit-tested with tables.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::HeaderEdits;

/// Always hop-by-hop (RFC 9110 §7.6.1, plus the proxy-auth pair of RFC 9110 §11.7).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers oboe sets itself; a route cannot `set` them.
pub fn is_managed(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
        || name == header::HOST
        || name == header::AUTHORIZATION
        || name == header::CONTENT_LENGTH
        || name == X_FORWARDED_FOR
        || name == X_FORWARDED_PROTO
        || name == X_FORWARDED_HOST
}

/// Removes hop-by-hop headers, including every header named in `Connection`.
/// `TE: trailers` survives a request, because gRPC over HTTP/2 requires it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, is_request: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let keep_te = is_request
        && headers.get_all(header::TE).iter().count() == 1
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in &HOP_BY_HOP {
        if name == header::TE && keep_te {
            continue;
        }
        headers.remove(name);
    }
}

/// What oboe knows about the caller's connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    /// Peer address.
    pub ip: IpAddr,
    /// `http` (or `https` once a TLS listener exists).
    pub proto: &'static str,
}

/// Rewrites the caller's request headers into the upstream's: hop-by-hop
/// removed, route edits applied, forwarding headers appended, `Host` set.
/// `original_host` is the caller's `Host` (or `:authority` on HTTP/2).
pub fn to_upstream(
    headers: &mut HeaderMap,
    edits: &HeaderEdits,
    client: ClientInfo,
    original_host: Option<HeaderValue>,
    upstream_host: &HeaderValue,
) {
    strip_hop_by_hop(headers, true);
    for name in &edits.remove {
        headers.remove(name);
    }
    for (name, value) in &edits.set {
        headers.insert(name.clone(), value.clone());
    }
    append_list(headers, &X_FORWARDED_FOR, &client.ip.to_string());
    append_list(headers, &X_FORWARDED_PROTO, client.proto);
    if let Some(host) = original_host.as_ref().and_then(|h| h.to_str().ok()) {
        append_list(headers, &X_FORWARDED_HOST, host);
    }
    headers.insert(header::HOST, upstream_host.clone());
}

/// Appends `value` to a comma-separated list header, merging repeated fields
/// into one as RFC 9110 §5.3 allows.
fn append_list(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    let merged = {
        let existing: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if existing.is_empty() {
            HeaderValue::from_str(value)
        } else {
            HeaderValue::from_str(&format!("{}, {value}", existing.join(", ")))
        }
    };
    if let Ok(v) = merged {
        headers.insert(name.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("trailer", "x"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, true);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-end-to-end"]);
    }

    #[test]
    fn te_trailers_survives_on_requests_only() {
        let mut req = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut req, true);
        assert_eq!(req.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        let mut resp = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut resp, false);
        assert!(resp.is_empty());
    }

    #[test]
    fn forwarding_headers_are_appended_and_host_replaced() {
        let mut h = map(&[
            ("host", "localhost:7070"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("cookie", "a=b"),
            ("x-keep", "1"),
        ]);
        let edits = HeaderEdits {
            set: vec![(
                HeaderName::from_static("x-set"),
                HeaderValue::from_static("v"),
            )],
            remove: vec![header::COOKIE],
        };
        let client = ClientInfo {
            ip: "127.0.0.1".parse().expect("ip"),
            proto: "http",
        };
        let original = h.get(header::HOST).cloned();
        to_upstream(
            &mut h,
            &edits,
            client,
            original,
            &HeaderValue::from_static("api.example:443"),
        );
        assert_eq!(h["host"], "api.example:443");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "localhost:7070");
        assert_eq!(h["x-set"], "v");
        assert_eq!(h["x-keep"], "1");
        assert!(h.get("cookie").is_none());
    }
}
