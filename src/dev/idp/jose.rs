//! The few JOSE pieces the development IdP needs to check what clients send it:
//! compact JWS parsing (RFC 7515 §7.1), signature verification against an RSA
//! or P-256 public key taken from a JWK (RFC 7517/7518), an X.509 certificate or
//! the IdP's own keys, and base64url. Signing lives with the keys (`keys.rs`).
//!
//! Certificates are read with a minimal DER walk down to the
//! SubjectPublicKeyInfo (RFC 5280 §4.1): the IdP trusts the certificate a test
//! registered, so only its public key matters, and a full X.509 parser would
//! be a heavy dependency for the sidecar binary.

use aws_lc_rs::signature::{self, RsaParameters, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

/// Largest token the IdP decodes; real assertions are a few KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// base64url without padding (RFC 7515 §2).
pub(super) fn b64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding; `None` if it is not.
pub(super) fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// Why a JWS could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum JoseError {
    /// Not three base64url parts with JSON objects, or too large.
    #[error("parse token: {0}")]
    Malformed(&'static str),
    /// The header names an algorithm this IdP does not know.
    #[error("parse token: unsupported alg")]
    UnsupportedAlg,
    /// The header carries `crit`, which this IdP understands none of
    /// (RFC 7515 §4.1.11: the recipient must then reject the JWS).
    #[error("parse token: unsupported critical header parameters")]
    Critical,
}

/// A parsed, not yet verified, compact JWS.
#[derive(Clone)]
pub(super) struct Jws {
    /// The protected header.
    pub header: Map<String, Value>,
    /// The claims.
    pub claims: Map<String, Value>,
    /// `alg` from the header.
    pub alg: Algorithm,
    signing_input: String,
    signature: Vec<u8>,
}

impl std::fmt::Debug for Jws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Claims identify users; keep them out of logs and panics.
        f.debug_struct("Jws")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Jws {
    /// Splits and decodes a compact JWS without checking its signature.
    pub fn parse(token: &str) -> Result<Self, JoseError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JoseError::Malformed("token too large"));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JoseError::Malformed("not three dot-separated parts"));
        };
        let object = |part: &str| -> Result<Map<String, Value>, JoseError> {
            let bytes = b64url_decode(part).ok_or(JoseError::Malformed("bad base64url"))?;
            match serde_json::from_slice(&bytes) {
                Ok(Value::Object(map)) => Ok(map),
                _ => Err(JoseError::Malformed("not a JSON object")),
            }
        };
        let header_map = object(header)?;
        let claims_map = object(claims)?;
        let signature = b64url_decode(signature).ok_or(JoseError::Malformed("bad signature"))?;
        if header_map.contains_key("crit") {
            return Err(JoseError::Critical);
        }
        let alg = header_map
            .get("alg")
            .cloned()
            .and_then(|alg| serde_json::from_value::<Algorithm>(alg).ok())
            .ok_or(JoseError::UnsupportedAlg)?;
        Ok(Self {
            header: header_map,
            claims: claims_map,
            alg,
            signing_input: format!("{header}.{claims}"),
            signature,
        })
    }

    /// A header parameter as a string.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }

    /// A claim as a string.
    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A numeric date claim (RFC 7519 §2), whole seconds.
    pub fn claim_time(&self, name: &str) -> Option<i64> {
        let value = self.claims.get(name)?;
        value
            .as_i64()
            .or_else(|| value.as_f64().map(|f| f.floor() as i64))
    }

    /// Whether `aud` is `expected` or an array containing it (RFC 7519 §4.1.3).
    pub fn audience_contains(&self, expected: &str) -> bool {
        match self.claims.get("aud") {
            Some(Value::String(aud)) => aud == expected,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(expected)),
            _ => false,
        }
    }

    /// Whether the signature verifies with `key` under the header's `alg`.
    pub fn verify(&self, key: &PublicKey) -> bool {
        key.verify(self.alg, self.signing_input.as_bytes(), &self.signature)
    }
}

/// A public key a JWS can be checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PublicKey {
    /// RSA modulus and exponent, big-endian without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// A P-256 point, uncompressed (`04 || x || y`).
    P256 { point: Vec<u8> },
}

impl PublicKey {
    /// Verifies `signature` over `message`; the key type binds the algorithm
    /// family, so an RSA key never checks an ES256 or HS256 signature.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Self::Rsa { n, e } => {
                let params: &RsaParameters = match alg {
                    Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Algorithm::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Algorithm::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Algorithm::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                signature::RsaPublicKeyComponents { n, e }
                    .verify(params, message, signature)
                    .is_ok()
            }
            Self::P256 { point } => {
                alg == Algorithm::ES256
                    && UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                        .verify(message, signature)
                        .is_ok()
            }
        }
    }

    /// Reads an RSA or P-256 public JWK (RFC 7518 §6.2, §6.3).
    pub fn from_jwk(jwk: &Value) -> Option<Self> {
        let field = |name: &str| {
            jwk.get(name)
                .and_then(Value::as_str)
                .and_then(b64url_decode)
        };
        match jwk.get("kty").and_then(Value::as_str)? {
            "RSA" => Some(Self::Rsa {
                n: strip_leading_zeros(&field("n")?),
                e: strip_leading_zeros(&field("e")?),
            }),
            "EC" if jwk.get("crv").and_then(Value::as_str) == Some("P-256") => {
                let (x, y) = (field("x")?, field("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return None;
                }
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Some(Self::P256 { point })
            }
            _ => None,
        }
    }

    /// Reads an `RSAPublicKey` (RFC 8017 §A.1.1) DER structure.
    pub fn from_pkcs1(der: &[u8]) -> Option<Self> {
        let (seq, rest) = Der::read(der, TAG_SEQUENCE)?;
        if !rest.is_empty() {
            return None;
        }
        let (n, seq) = Der::read(seq, TAG_INTEGER)?;
        let (e, seq) = Der::read(seq, TAG_INTEGER)?;
        seq.is_empty().then(|| Self::Rsa {
            n: strip_leading_zeros(n),
            e: strip_leading_zeros(e),
        })
    }

    /// The public key of an X.509 certificate, if it is RSA or P-256.
    pub fn from_certificate(cert_der: &[u8]) -> Option<Self> {
        // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
        let (cert, _) = Der::read(cert_der, TAG_SEQUENCE)?;
        let (tbs, _) = Der::read(cert, TAG_SEQUENCE)?;
        // TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber,
        //   signature, issuer, validity, subject, subjectPublicKeyInfo, ... }
        let mut rest = tbs;
        if rest.first() == Some(&TAG_VERSION) {
            rest = Der::read(rest, TAG_VERSION)?.1;
        }
        rest = Der::read(rest, TAG_INTEGER)?.1; // serialNumber
        for _ in 0..4 {
            rest = Der::read(rest, TAG_SEQUENCE)?.1; // signature, issuer, validity, subject
        }
        let (spki, _) = Der::read(rest, TAG_SEQUENCE)?;
        // SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT STRING }
        let (algorithm, spki_rest) = Der::read(spki, TAG_SEQUENCE)?;
        let (bits, _) = Der::read(spki_rest, TAG_BIT_STRING)?;
        let (&unused_bits, key) = bits.split_first()?;
        if unused_bits != 0 {
            return None;
        }
        let (oid, params) = Der::read(algorithm, TAG_OID)?;
        match oid {
            OID_RSA_ENCRYPTION => Self::from_pkcs1(key),
            OID_EC_PUBLIC_KEY => {
                let (curve, _) = Der::read(params, TAG_OID)?;
                (curve == OID_P256 && key.len() == 65 && key[0] == 0x04).then(|| Self::P256 {
                    point: key.to_vec(),
                })
            }
            _ => None,
        }
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> Vec<u8> {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[first..].to_vec()
}

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_VERSION: u8 = 0xa0;
/// 1.2.840.113549.1.1.1
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// 1.2.840.10045.2.1
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// 1.2.840.10045.3.1.7 (secp256r1)
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A DER TLV reader for the handful of single-byte tags above (X.690 §8.1).
struct Der;

impl Der {
    /// Reads one element with tag `tag`; returns its contents and what follows.
    fn read(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&actual, rest) = input.split_first()?;
        if actual != tag {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            // Long form: the low bits count the length octets; DER forbids
            // the indefinite form (0x80) and we never need more than 4 octets.
            let octets = usize::from(first & 0x7f);
            if octets == 0 || octets > 4 || rest.len() < octets {
                return None;
            }
            let (len_bytes, after) = rest.split_at(octets);
            rest = after;
            len_bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        (rest.len() >= len).then(|| rest.split_at(len))
    }
}
