//! The token-endpoint client: one POST per grant, one retry with jitter on a
//! connection failure or a 5xx (grants are idempotent), no retry after a
//! timeout, and `Retry-After` on 429/503 honoured by failing fast: while the IdP
//! throttles, requests are answered 503 at once instead of queueing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, StatusCode};

use super::ExchangeError;
use super::credential::Secret;
use super::grant::{IdpError, Issued, parse_success};
use crate::clock::SharedClock;
use crate::http_client::{FetchError, IdpClient};

/// Longest `Retry-After` honoured; a larger value is clamped.
const MAX_RETRY_AFTER_SECS: u64 = 300;
/// `Retry-After` given to callers when a 429 carries none.
const DEFAULT_RETRY_AFTER_SECS: u64 = 5;

/// Posts grants to token endpoints.
pub struct TokenClient {
    client: IdpClient,
    clock: SharedClock,
    /// Clock time (ms) until which the IdP asked not to be called.
    throttled_until_ms: AtomicU64,
    /// Base delay before the single retry (jitter is added on top).
    retry_delay: Duration,
}

impl TokenClient {
    /// A client over `client` (its timeouts are the connect and total timeouts).
    pub fn new(client: IdpClient, clock: SharedClock) -> Self {
        Self {
            client,
            clock,
            throttled_until_ms: AtomicU64::new(0),
            retry_delay: Duration::from_millis(50),
        }
    }

    /// Posts `form` to `url` and reads the answer.
    pub async fn request(
        &self,
        url: &str,
        form: &[(&'static str, Secret)],
        basic: Option<&Secret>,
    ) -> Result<Issued, ExchangeError> {
        let now = self.clock.now_ms();
        let until = self.throttled_until_ms.load(Ordering::Relaxed);
        if now < until {
            return Err(ExchangeError::Throttled {
                retry_after: (until - now).div_ceil(1000),
            });
        }
        let body = {
            let mut s = form_urlencoded::Serializer::new(String::new());
            for (k, v) in form {
                s.append_pair(k, v.expose());
            }
            Bytes::from(s.finish())
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(basic) = basic {
            let mut value = HeaderValue::from_str(basic.expose()).map_err(|_| {
                ExchangeError::BadAnswer("client id or secret cannot be sent as HTTP Basic".into())
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }

        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt == 2;
            let answer = self
                .client
                .send(Method::POST, url, headers.clone(), body.clone())
                .await;
            let answer = match answer {
                Ok(answer) => answer,
                Err(FetchError::Timeout { .. }) => return Err(ExchangeError::Timeout),
                Err(FetchError::TooLarge { .. }) => {
                    return Err(ExchangeError::BadAnswer("the answer is too large".into()));
                }
                Err(e) if !last => {
                    tracing::debug!(error = %e, "token request failed; retrying once");
                    self.pause().await;
                    continue;
                }
                Err(e) => return Err(ExchangeError::Unavailable(e.to_string())),
            };
            let status = answer.status;
            if status == StatusCode::OK {
                return parse_success(&answer.body).map_err(ExchangeError::BadAnswer);
            }
            let retry_after = retry_after(&answer.headers, self.clock.now_ms());
            if status == StatusCode::TOO_MANY_REQUESTS
                || (status == StatusCode::SERVICE_UNAVAILABLE && retry_after.is_some())
            {
                let secs = retry_after
                    .unwrap_or(DEFAULT_RETRY_AFTER_SECS)
                    .clamp(1, MAX_RETRY_AFTER_SECS);
                self.throttled_until_ms
                    .fetch_max(self.clock.now_ms() + secs * 1000, Ordering::Relaxed);
                return Err(ExchangeError::Throttled { retry_after: secs });
            }
            if status.is_server_error() {
                if !last {
                    tracing::debug!(%status, "token endpoint failed; retrying once");
                    self.pause().await;
                    continue;
                }
                return Err(ExchangeError::Unavailable(format!(
                    "the token endpoint answered {status}"
                )));
            }
            return Err(match IdpError::parse(&answer.body) {
                Some(e) => ExchangeError::from_idp(e, status),
                None => ExchangeError::BadAnswer(format!(
                    "the token endpoint answered {status} without an OAuth error"
                )),
            });
        }
    }

    async fn pause(&self) {
        let mut byte = [0u8; 1];
        let _ = aws_lc_rs::rand::fill(&mut byte);
        let jitter = Duration::from_millis(u64::from(byte[0]) % 100);
        tokio::time::sleep(self.retry_delay + jitter).await;
    }
}

/// `Retry-After` in seconds: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
fn retry_after(headers: &HeaderMap, now_ms: u64) -> Option<u64> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64;
    Some(at_ms.saturating_sub(now_ms).div_ceil(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, 0), Some(7));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Thu, 01 Jan 1970 00:00:30 GMT"),
        );
        assert_eq!(retry_after(&h, 10_000), Some(20));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, 0), None);
    }
}
