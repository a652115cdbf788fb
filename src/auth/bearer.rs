//! Extracting the caller's bearer token (RFC 6750 §2.1).

use http::HeaderMap;
use http::header::AUTHORIZATION;

use super::Reason;

/// The bearer token in `Authorization`, strictly: exactly one header, the
/// `Bearer` scheme (case-insensitive), one space, a token68 value.
pub fn extract(headers: &HeaderMap) -> Result<&str, Reason> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(Reason::Missing)?;
    if values.next().is_some() {
        return Err(Reason::Malformed("more than one Authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| Reason::Malformed("Authorization is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(Reason::Malformed("Authorization is not `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Reason::Missing);
    }
    // RFC 6750 §2.1 b64token: ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" then "="*
    let valid = !token.is_empty()
        && token
            .trim_end_matches('=')
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if !valid {
        return Err(Reason::Malformed(
            "the bearer token has characters a token cannot have",
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
