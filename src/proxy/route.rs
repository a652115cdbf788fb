//! Pure route matching: which route a path belongs to and what path the
//! upstream sees. No I/O, so it is unit-tested with tables.

use std::sync::Arc;

use crate::config::Route;

/// Why a request path is refused before any routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    /// A `.` or `..` segment: a proxy that normalises it can be walked into
    /// another route or upstream path.
    #[error("the path contains a `.` or `..` segment")]
    DotSegment,
    /// `%2e`, `%2f` or `%5c`: decoded by some upstreams into `.`, `/` or `\`.
    #[error("the path contains a percent-encoded `.`, `/` or `\\`")]
    EncodedSeparator,
    /// A raw backslash, which some servers treat as `/`.
    #[error("the path contains a backslash")]
    Backslash,
    /// Not an origin-form path.
    #[error("the path does not start with `/`")]
    NotAbsolute,
}

/// Refuses paths that could be normalised into another route or upstream path.
pub fn check_path(path: &str) -> Result<(), BadPath> {
    if !path.starts_with('/') {
        return Err(BadPath::NotAbsolute);
    }
    if path.contains('\\') {
        return Err(BadPath::Backslash);
    }
    let bytes = path.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = bytes.get(i + 1..i + 3);
            if let Some([h, l]) = hex {
                let decoded = (hex_val(*h), hex_val(*l));
                if let (Some(h), Some(l)) = decoded
                    && matches!(h << 4 | l, b'.' | b'/' | b'\\')
                {
                    return Err(BadPath::EncodedSeparator);
                }
            }
        }
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(BadPath::DotSegment);
    }
    Ok(())
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The routes, ordered for longest-prefix matching.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// Longest prefix first.
    routes: Vec<Arc<Route>>,
}

/// A matched route and the path the upstream will see.
#[derive(Debug)]
pub struct Matched<'a> {
    /// The route.
    pub route: &'a Arc<Route>,
    /// The rest of the request path after the prefix, starting with `/` or empty.
    pub rest: &'a str,
}

impl Router {
    /// Builds a router; ties cannot happen because prefixes are unique.
    pub fn new(routes: impl IntoIterator<Item = Route>) -> Self {
        let mut routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        Self { routes }
    }

    /// The route with the longest prefix matching `path`. A prefix matches at a
    /// segment boundary: `/api` and `/api/` both match `/api` and `/api/x`, never `/apix`.
    pub fn find<'a>(&'a self, path: &'a str) -> Option<Matched<'a>> {
        self.routes.iter().find_map(|route| {
            let base = route.path_prefix.trim_end_matches('/');
            let rest = path.strip_prefix(base)?;
            (rest.is_empty() || rest.starts_with('/')).then_some(Matched { route, rest })
        })
    }

    /// Looks a route up by name.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.name == name)
    }
}

/// The upstream path and query: the upstream's base path, then the rest of the
/// request path, then the original query.
pub fn upstream_path_and_query(base_path: &str, rest: &str, query: Option<&str>) -> String {
    let mut out =
        String::with_capacity(base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1);
    out.push_str(base_path);
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        let table: &[(&str, Result<(), BadPath>)] = &[
            ("/api/x", Ok(())),
            ("/api/x.json", Ok(())),
            ("/api/..x", Ok(())),
            ("/api/%41", Ok(())),
            ("/api/%252e%252e", Ok(())),
            ("/", Ok(())),
            ("/api/../admin", Err(BadPath::DotSegment)),
            ("/api/./x", Err(BadPath::DotSegment)),
            ("/api/..", Err(BadPath::DotSegment)),
            ("/api/%2e%2e/admin", Err(BadPath::EncodedSeparator)),
            ("/api/%2E./admin", Err(BadPath::EncodedSeparator)),
            ("/api/a%2fb", Err(BadPath::EncodedSeparator)),
            ("/api/a%2Fb", Err(BadPath::EncodedSeparator)),
            ("/api/a%5cb", Err(BadPath::EncodedSeparator)),
            ("/api/a\\b", Err(BadPath::Backslash)),
            ("api", Err(BadPath::NotAbsolute)),
            ("*", Err(BadPath::NotAbsolute)),
        ];
        for (path, want) in table {
            assert_eq!(check_path(path), *want, "{path}");
        }
    }

    fn route(name: &str, prefix: &str) -> Route {
        let yaml = format!(
            "routes:\n  - name: {name}\n    path_prefix: {prefix}\n    upstream: http://127.0.0.1:1/\n    caller: {{ required: false }}\n    token: {{ grant: none }}\n"
        );
        crate::config::load_str(&yaml, figment::providers::Env::raw().only(&[]))
            .expect("valid")
            .routes
            .remove(0)
    }

    #[test]
    fn longest_prefix_wins_at_segment_boundaries() {
        let router = Router::new([
            route("root", "/"),
            route("api", "/api/"),
            route("api-v2", "/api/v2"),
        ]);
        let table = [
            ("/api/x", "api", "/x"),
            ("/api", "api", ""),
            ("/api/v2/users", "api-v2", "/users"),
            ("/api/v2", "api-v2", ""),
            ("/api/v20", "api", "/v20"),
            ("/apix", "root", "/apix"),
            ("/", "root", "/"),
        ];
        for (path, name, rest) in table {
            let m = router.find(path).expect(path);
            assert_eq!((m.route.name.as_str(), m.rest), (name, rest), "{path}");
        }
        assert!(
            Router::new([route("api", "/api/")])
                .find("/other")
                .is_none()
        );
    }

    #[test]
    fn upstream_path_replaces_prefix_and_keeps_query() {
        let table = [
            ("/v1.0", "/me", Some("a=1&b=2"), "/v1.0/me?a=1&b=2"),
            ("/v1.0", "", None, "/v1.0"),
            ("", "", None, "/"),
            ("", "/x/y", None, "/x/y"),
            ("", "", Some("q"), "/?q"),
        ];
        for (base, rest, query, want) in table {
            assert_eq!(upstream_path_and_query(base, rest, query), want);
        }
    }
}
