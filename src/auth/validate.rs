//! Validating a caller's JWT access token: the shape checks that come before any
//! decoding, the header rules, the signature, and the claim rules (Entra issuer
//! forms and multi-tenancy included).
//!
//! jsonwebtoken does the cryptography (`crypto::verify`, aws-lc-rs backend); the
//! rules around it are written out here so that each one is visible and tested:
//! jsonwebtoken by itself ignores `crit`, does not check `nbf` by default and
//! would trust the algorithm a token names.

use std::collections::HashSet;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::{Map, Value};

use super::Reason;
use super::discovery::{IssuerRule, TENANT_PLACEHOLDER};
use super::jwks::VerifyingKey;
use crate::config::is_guid;

/// Largest token accepted, checked before anything is decoded.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Header members that would make oboe fetch or trust a key the token itself
/// names, or change how the signature is computed. Their presence is refused.
const FORBIDDEN_HEADERS: &[&str] = &["crit", "jku", "x5u", "jwk", "x5c", "b64", "enc", "zip"];

/// A JWT split into its parts, with header and claims decoded.
#[derive(Debug)]
pub struct Parsed<'t> {
    /// The `alg` the token names (already checked against the allow-list).
    pub alg: Algorithm,
    /// The key id.
    pub kid: String,
    /// The claims.
    pub claims: Map<String, Value>,
    /// `header.payload`, the signed message.
    pub signing_input: &'t str,
    /// The signature part, base64url.
    pub signature: &'t str,
}

/// Checks size and shape, decodes header and claims, and applies the header
/// rules. No cryptography yet.
pub fn parse<'t>(token: &'t str, allowed: &[Algorithm]) -> Result<Parsed<'t>, Reason> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Reason::TooLarge);
    }
    let dots = token.bytes().filter(|b| *b == b'.').count();
    match dots {
        2 => {}
        4 => return Err(Reason::Encrypted),
        _ => return Err(Reason::Malformed("a JWT has three dot-separated parts")),
    }
    let (signing_input, signature) = token
        .rsplit_once('.')
        .ok_or(Reason::Malformed("a JWT has three dot-separated parts"))?;
    let (header_b64, payload_b64) = signing_input
        .split_once('.')
        .ok_or(Reason::Malformed("a JWT has three dot-separated parts"))?;
    if signature.is_empty() {
        return Err(Reason::Malformed("the token is unsigned"));
    }
    let header = decode_object(header_b64, "header")?;
    let claims = decode_object(payload_b64, "claims")?;
    // The signature must at least be base64url; verification decodes it again.
    if !is_base64url(signature) {
        return Err(Reason::Malformed("the signature is not base64url"));
    }

    for name in FORBIDDEN_HEADERS {
        if header.contains_key(*name) {
            return Err(Reason::ForbiddenHeader(name));
        }
    }
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.as_str(),
        Some(_) => return Err(Reason::Malformed("`alg` is not a string")),
        None => return Err(Reason::Malformed("the header has no `alg`")),
    };
    let alg = parse_asymmetric(alg)
        .filter(|a| allowed.contains(a))
        .ok_or(Reason::AlgorithmNotAllowed)?;
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        Some(_) => return Err(Reason::Malformed("`kid` is not a non-empty string")),
        None => return Err(Reason::Malformed("the header has no `kid`")),
    };
    if let Some(typ) = header.get("typ") {
        let ok = typ
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case("JWT") || t.eq_ignore_ascii_case("at+jwt"));
        if !ok {
            return Err(Reason::Malformed("`typ` is not JWT or at+jwt"));
        }
    }
    Ok(Parsed {
        alg,
        kid,
        claims,
        signing_input,
        signature,
    })
}

/// Only asymmetric algorithms have a name here: `none` and `HS*` never parse.
fn parse_asymmetric(alg: &str) -> Option<Algorithm> {
    use Algorithm::*;
    Some(match alg {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        _ => return None,
    })
}

/// Parses configured algorithm names (validated by the config already).
pub fn algorithms(names: &[String]) -> Vec<Algorithm> {
    names.iter().filter_map(|n| parse_asymmetric(n)).collect()
}

fn is_base64url(part: &str) -> bool {
    part.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn decode_object(part: &str, what: &'static str) -> Result<Map<String, Value>, Reason> {
    if part.is_empty() || !is_base64url(part) {
        return Err(Reason::Malformed(match what {
            "header" => "the header is not base64url",
            _ => "the claims are not base64url",
        }));
    }
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        Reason::Malformed(match what {
            "header" => "the header is not base64url",
            _ => "the claims are not base64url",
        })
    })?;
    serde_json::from_slice::<StrictObject>(&bytes)
        .map(|o| o.0)
        .map_err(|_| {
            Reason::Malformed(match what {
                "header" => "the header is not a JSON object with unique members",
                _ => "the claims are not a JSON object with unique members",
            })
        })
}

/// A JSON object whose member names are unique at the top level: a token with
/// two `alg`s or two `aud`s is ambiguous, and parsers disagree on which wins.
struct StrictObject(Map<String, Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictObject, A::Error> {
                let mut out = Map::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    if out.insert(key, value).is_some() {
                        return Err(serde::de::Error::custom("duplicate member"));
                    }
                }
                Ok(StrictObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Verifies the signature with a key bound to the token's algorithm.
pub fn verify_signature(parsed: &Parsed<'_>, key: &VerifyingKey) -> Result<(), Reason> {
    if !key.algorithms.contains(&parsed.alg) {
        return Err(Reason::AlgorithmNotAllowed);
    }
    match jsonwebtoken::crypto::verify(
        parsed.signature,
        parsed.signing_input.as_bytes(),
        &key.key,
        parsed.alg,
    ) {
        Ok(true) => Ok(()),
        _ => Err(Reason::BadSignature),
    }
}

/// The claim rules of one identity.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    /// Accepted issuers.
    pub issuers: Vec<IssuerRule>,
    /// Accepted audiences (any of).
    pub audiences: HashSet<String>,
    /// Allowed clock skew in seconds.
    pub leeway: u64,
    /// Entra multi-tenant: `tid` must be a GUID and the key's issuer must match.
    pub multi_tenant: bool,
}

/// Lifetime claims as numbers.
#[derive(Debug, Clone, Copy)]
pub struct Lifetime {
    /// `exp`, seconds since the epoch.
    pub exp: u64,
}

/// Checks `iss`, `aud`, `exp`, `nbf`, `iat` and the Entra tenant rules at `now`
/// (seconds since the epoch).
pub fn check_claims(
    claims: &Map<String, Value>,
    rules: &ClaimRules,
    now: u64,
) -> Result<Lifetime, Reason> {
    let exp = numeric_date(claims, "exp")?.ok_or(Reason::Malformed("the token has no `exp`"))?;
    check_lifetime(claims, exp, rules.leeway, now)?;

    let tid = match claims.get("tid") {
        None => None,
        Some(Value::String(tid)) => Some(tid.as_str()),
        Some(_) => return Err(Reason::Malformed("`tid` is not a string")),
    };
    if rules.multi_tenant && !tid.is_some_and(is_guid) {
        return Err(Reason::WrongTenant);
    }
    let iss = match claims.get("iss") {
        Some(Value::String(iss)) => iss.as_str(),
        Some(_) => return Err(Reason::Malformed("`iss` is not a string")),
        None => return Err(Reason::WrongIssuer),
    };
    if !rules.issuers.iter().any(|r| r.accepts(iss, tid)) {
        return Err(Reason::WrongIssuer);
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => rules.audiences.contains(aud),
        Some(Value::Array(auds)) => auds
            .iter()
            .any(|a| a.as_str().is_some_and(|a| rules.audiences.contains(a))),
        Some(_) => return Err(Reason::Malformed("`aud` is not a string or an array")),
        None => false,
    };
    if !audience_ok {
        return Err(Reason::WrongAudience);
    }
    Ok(Lifetime { exp })
}

/// Entra publishes each key's own issuer; a key of one tenant must not sign for
/// another. The key's issuer, with the token's tenant in it, must be the token's
/// `iss` or one of the issuers accepted for that tenant.
pub fn check_key_issuer(
    claims: &Map<String, Value>,
    key: &VerifyingKey,
    rules: &ClaimRules,
) -> Result<(), Reason> {
    let Some(key_issuer) = &key.issuer else {
        return Ok(());
    };
    let tid = claims.get("tid").and_then(Value::as_str);
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let resolved = match tid {
        Some(tid) => key_issuer.replace(TENANT_PLACEHOLDER, tid),
        None => key_issuer.clone(),
    };
    if resolved == iss || rules.issuers.iter().any(|r| r.accepts(&resolved, tid)) {
        Ok(())
    } else {
        Err(Reason::KeyIssuerMismatch)
    }
}

/// `exp` (already read), `nbf` and `iat` against `now` with leeway. Also used on
/// every hit of the verified-token cache.
pub fn check_lifetime(
    claims: &Map<String, Value>,
    exp: u64,
    leeway: u64,
    now: u64,
) -> Result<(), Reason> {
    if exp.saturating_add(leeway) <= now {
        return Err(Reason::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now.saturating_add(leeway)
    {
        return Err(Reason::NotYetValid);
    }
    if let Some(iat) = numeric_date(claims, "iat")?
        && iat > now.saturating_add(leeway)
    {
        return Err(Reason::IssuedInFuture);
    }
    Ok(())
}

/// A NumericDate claim (RFC 7519 §2): a non-negative JSON number of seconds.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, Reason> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                        Ok(Some(f as u64))
                    }
                    _ => Err(Reason::BadDate(name)),
                }
            }
        }
        Some(_) => Err(Reason::BadDate(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap_or_default())
    }

    fn token(header: Value, claims: Value) -> String {
        format!("{}.{}.c2ln", b64(&header), b64(&claims))
    }

    fn parse_err(token: &str) -> Reason {
        match parse(token, &[Algorithm::RS256, Algorithm::ES256]) {
            Ok(_) => panic!("accepted {token}"),
            Err(r) => r,
        }
    }

    const TID: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";

    fn rules() -> ClaimRules {
        ClaimRules {
            issuers: vec![
                IssuerRule::Exact(format!("https://login.example/{TID}/v2.0")),
                IssuerRule::Exact(format!("https://sts.example/{TID}/")),
            ],
            audiences: ["api://app".to_owned(), "app".to_owned()].into(),
            leeway: 60,
            multi_tenant: false,
        }
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    const NOW: u64 = 1_800_000_000;

    fn good() -> Value {
        json!({"iss": format!("https://login.example/{TID}/v2.0"), "aud": "app", "tid": TID,
               "exp": NOW + 600, "nbf": NOW - 10, "iat": NOW - 10})
    }

    #[test]
    fn shape_and_header_rules_refuse_before_any_crypto() {
        let ok_header = json!({"alg": "RS256", "kid": "k", "typ": "JWT"});
        assert!(parse(&token(ok_header.clone(), good()), &[Algorithm::RS256]).is_ok());

        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(parse_err(&big), Reason::TooLarge);
        assert_eq!(parse_err("a.b.c.d.e"), Reason::Encrypted);
        assert!(matches!(parse_err("a.b"), Reason::Malformed(_)));
        assert!(matches!(parse_err("a.b.c.d"), Reason::Malformed(_)));
        let unsigned = format!("{}.{}.", b64(&ok_header), b64(&good()));
        assert!(matches!(parse_err(&unsigned), Reason::Malformed(_)));
        let padded = format!("{}=.{}.c2ln", b64(&ok_header), b64(&good()));
        assert!(matches!(parse_err(&padded), Reason::Malformed(_)));
        let not_json = format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode("nope"), b64(&good()));
        assert!(matches!(parse_err(&not_json), Reason::Malformed(_)));
        let array = format!("{}.{}.c2ln", b64(&json!([1])), b64(&good()));
        assert!(matches!(parse_err(&array), Reason::Malformed(_)));
        let dup = format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k","alg":"none"}"#),
            b64(&good())
        );
        assert!(matches!(parse_err(&dup), Reason::Malformed(_)));
        let bad_sig = format!("{}.{}.c2l*", b64(&ok_header), b64(&good()));
        assert!(matches!(parse_err(&bad_sig), Reason::Malformed(_)));

        for alg in ["none", "None", "HS256", "HS512", "RS1", "PS256", ""] {
            let t = token(json!({"alg": alg, "kid": "k"}), good());
            assert_eq!(parse_err(&t), Reason::AlgorithmNotAllowed, "{alg}");
        }
        for name in ["crit", "jku", "x5u", "jwk", "x5c", "b64", "enc", "zip"] {
            let t = token(json!({"alg": "RS256", "kid": "k", name: ["x"]}), good());
            assert_eq!(parse_err(&t), Reason::ForbiddenHeader(name), "{name}");
        }
        assert!(matches!(
            parse_err(&token(json!({"alg": "RS256"}), good())),
            Reason::Malformed(_)
        ));
        assert!(matches!(
            parse_err(&token(json!({"alg": "RS256", "kid": 7}), good())),
            Reason::Malformed(_)
        ));
        assert!(matches!(
            parse_err(&token(
                json!({"alg": "RS256", "kid": "k", "typ": "JWE"}),
                good()
            )),
            Reason::Malformed(_)
        ));
        assert!(matches!(
            parse_err(&token(json!({"alg": 256, "kid": "k"}), good())),
            Reason::Malformed(_)
        ));
    }

    #[test]
    fn claim_rules() {
        let r = rules();
        assert!(check_claims(&claims(good()), &r, NOW).is_ok());
        let with = |k: &str, v: Value| {
            let mut c = claims(good());
            c.insert(k.to_owned(), v);
            check_claims(&c, &r, NOW)
        };
        let without = |k: &str| {
            let mut c = claims(good());
            c.remove(k);
            check_claims(&c, &r, NOW)
        };
        assert_eq!(with("exp", json!(NOW - 61)).err(), Some(Reason::Expired));
        assert!(with("exp", json!(NOW - 59)).is_ok(), "inside the leeway");
        assert!(matches!(without("exp"), Err(Reason::Malformed(_))));
        assert_eq!(
            with("exp", json!("soon")).err(),
            Some(Reason::BadDate("exp"))
        );
        assert_eq!(with("exp", json!(-5)).err(), Some(Reason::BadDate("exp")));
        assert_eq!(
            with("nbf", json!(NOW + 61)).err(),
            Some(Reason::NotYetValid)
        );
        assert!(with("nbf", json!(NOW + 59)).is_ok());
        assert_eq!(
            with("iat", json!(NOW + 3600)).err(),
            Some(Reason::IssuedInFuture)
        );
        assert_eq!(
            with("iss", json!("https://evil/")).err(),
            Some(Reason::WrongIssuer)
        );
        assert_eq!(without("iss").err(), Some(Reason::WrongIssuer));
        assert!(
            with("iss", json!(format!("https://sts.example/{TID}/"))).is_ok(),
            "v1 form"
        );
        assert_eq!(
            with("aud", json!("other")).err(),
            Some(Reason::WrongAudience)
        );
        assert_eq!(without("aud").err(), Some(Reason::WrongAudience));
        assert!(with("aud", json!(["other", "api://app"])).is_ok());
        assert_eq!(
            with("aud", json!(["other", 5])).err(),
            Some(Reason::WrongAudience)
        );
        assert!(matches!(
            with("aud", json!({"a": 1})),
            Err(Reason::Malformed(_))
        ));
        assert!(
            with("exp", json!((NOW + 10) as f64 + 0.5)).is_ok(),
            "fractional dates"
        );
    }

    #[test]
    fn multi_tenant_needs_a_guid_tid_and_a_matching_template() {
        let mut r = rules();
        r.multi_tenant = true;
        r.issuers = vec![IssuerRule::TenantTemplate(
            "https://login.example/{tenantid}/v2.0".to_owned(),
        )];
        let other = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        assert!(check_claims(&claims(good()), &r, NOW).is_ok());
        let mut c = claims(good());
        c.insert("tid".into(), json!(other));
        assert_eq!(
            check_claims(&c, &r, NOW).err(),
            Some(Reason::WrongIssuer),
            "iss of another tenant"
        );
        c.insert("tid".into(), json!("organizations"));
        assert_eq!(check_claims(&c, &r, NOW).err(), Some(Reason::WrongTenant));
        c.remove("tid");
        assert_eq!(check_claims(&c, &r, NOW).err(), Some(Reason::WrongTenant));

        let key = |issuer: Option<&str>| VerifyingKey {
            kid: "k".into(),
            algorithms: vec![Algorithm::RS256],
            key: jsonwebtoken::DecodingKey::from_rsa_components("AQAB", "AQAB").expect("key"),
            issuer: issuer.map(str::to_owned),
        };
        let good = claims(good());
        assert!(check_key_issuer(&good, &key(None), &r).is_ok());
        assert!(
            check_key_issuer(
                &good,
                &key(Some("https://login.example/{tenantid}/v2.0")),
                &r
            )
            .is_ok()
        );
        assert!(
            check_key_issuer(
                &good,
                &key(Some(&format!("https://login.example/{TID}/v2.0"))),
                &r
            )
            .is_ok()
        );
        assert_eq!(
            check_key_issuer(
                &good,
                &key(Some(&format!("https://login.example/{other}/v2.0"))),
                &r
            ),
            Err(Reason::KeyIssuerMismatch)
        );
    }
}
