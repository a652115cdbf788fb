//! Extracting the caller's bearer token (RFC 6750 §2.1).

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};

use super::Reason;

/// The bearer token in `Authorization`, strictly: exactly one header, the
/// `Bearer` scheme (case-insensitive), one space, a token68 value.
pub fn extract(headers: &HeaderMap) -> Result<&str, Reason> {
    token(single(headers)?)
}

/// The one `Authorization` header.
pub fn single(headers: &HeaderMap) -> Result<&HeaderValue, Reason> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(Reason::Missing)?;
    if values.next().is_some() {
        return Err(Reason::Malformed("more than one Authorization header"));
    }
    Ok(value)
}

/// The token in one `Authorization` value: the `Bearer` scheme
/// (case-insensitive), one space, a token68 value.
pub fn token(value: &HeaderValue) -> Result<&str, Reason> {
    // Both checks run word-at-a-time; `to_str` would go byte by byte.
    let value = std::str::from_utf8(value.as_bytes())
        .ok()
        .filter(|v| v.is_ascii())
        .ok_or(Reason::Malformed("Authorization is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(Reason::Malformed("Authorization is not `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Reason::Missing);
    }
    if token.is_empty() || !is_b64token(token.trim_end_matches('=').as_bytes()) {
        return Err(Reason::Malformed(
            "the bearer token has characters a token cannot have",
        ));
    }
    Ok(token)
}

/// RFC 6750 §2.1 b64token (before its trailing `=`s): ALPHA / DIGIT / "-" /
/// "." / "_" / "~" / "+" / "/". Every request with a caller token runs this
/// over 1–2 KB, so each byte is classified by comparisons only and the
/// results are and-ed without an early exit: the compiler vectorises that.
fn is_b64token(bytes: &[u8]) -> bool {
    bytes.iter().fold(true, |ok, &b| ok & is_b64token_byte(b))
}

#[inline(always)]
fn is_b64token_byte(b: u8) -> bool {
    let letter = (b | 0x20).wrapping_sub(b'a') < 26;
    let digit = b.wrapping_sub(b'0') < 10;
    let other = (b == b'-') | (b == b'.') | (b == b'_') | (b == b'~') | (b == b'+') | (b == b'/');
    letter | digit | other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b64token_bytes_are_exactly_the_rfc_6750_set() {
        for b in 0..=255u8 {
            let expected = b.is_ascii_alphanumeric() || b"-._~+/".contains(&b);
            assert_eq!(is_b64token_byte(b), expected, "byte {b:#04x}");
        }
    }

    #[test]
    fn bearer_tokens_are_extracted_strictly() {
        let table: &[(&[&str], Result<&str, &str>)] = &[
            (&["Bearer abc.def.ghi"], Ok("abc.def.ghi")),
            (&["bearer abc"], Ok("abc")),
            (&["BEARER abc=="], Ok("abc==")),
            (&[], Err("missing")),
            (&["Basic dXNlcjpwYXNz"], Err("missing")),
            (&["Bearer"], Err("malformed")),
            (&["Bearer "], Err("malformed")),
            (&["Bearer a b"], Err("malformed")),
            (&["Bearer  abc"], Err("malformed")),
            (&["Bearer a\"b"], Err("malformed")),
            (&["Bearer a=b"], Err("malformed")),
            (&["Bearer ab=~"], Err("malformed")),
            (&["Bearer a-b.c_d~e+f/g=="], Ok("a-b.c_d~e+f/g==")),
            (&["Bearer a", "Bearer b"], Err("malformed")),
        ];
        for (values, want) in table {
            let mut h = HeaderMap::new();
            for v in *values {
                h.append(AUTHORIZATION, HeaderValue::from_str(v).expect("value"));
            }
            let got = extract(&h).map_err(|e| match e {
                Reason::Missing => "missing",
                _ => "malformed",
            });
            assert_eq!(got, *want, "{values:?}");
        }
    }
}
