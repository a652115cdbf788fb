//! The IdP's signing keys: one RSA-2048 key (RS256 and PS256, as Entra signs
//! with RSA) and one P-256 key (ES256) per generation, published as a JWKS the
//! way Entra publishes it, and rotated on demand.

use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};

use super::jose::{Jws, PublicKey, b64url};
use super::random_bytes;

/// Why keys could not be made or used.
#[derive(Debug, thiserror::Error)]
pub(super) enum KeyError {
    /// Key generation failed.
    #[error("generate {0} signing key")]
    Generate(&'static str),
    /// Signing failed.
    #[error("sign token with {0:?}")]
    Sign(Algorithm),
}

struct RsaKey {
    kid: String,
    pair: RsaKeyPair,
    public: PublicKey,
    /// `RSAPublicKey` DER: also the HMAC secret of the alg-confusion attack.
    pkcs1: Vec<u8>,
}

struct EcKey {
    kid: String,
    pair: EcdsaKeyPair,
    public: PublicKey,
}

/// Every published key; the last of each kind signs.
pub(super) struct KeySet {
    rsa: Vec<RsaKey>,
    ec: Vec<EcKey>,
}

fn new_kid() -> String {
    b64url(random_bytes::<20>())
}

impl KeySet {
    /// One fresh generation of keys.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self {
            rsa: vec![generate_rsa()?],
            ec: vec![generate_ec()?],
        })
    }

    /// Adds a new generation; drops the older ones unless `keep_old`.
    pub fn rotate(&mut self, keep_old: bool) -> Result<(), KeyError> {
        let (rsa, ec) = (generate_rsa()?, generate_ec()?);
        if !keep_old {
            self.rsa.clear();
            self.ec.clear();
        }
        self.rsa.push(rsa);
        self.ec.push(ec);
        Ok(())
    }

    /// The `kid` of the current key for `alg`, if the IdP has a key of that type.
    pub fn current_kid(&self, alg: Algorithm) -> Option<&str> {
        match alg {
            Algorithm::ES256 => self.ec.last().map(|k| k.kid.as_str()),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
            | Algorithm::HS256
            | Algorithm::HS384
            | Algorithm::HS512 => self.rsa.last().map(|k| k.kid.as_str()),
            _ => None,
        }
    }

    /// Signs `header` and `claims` as a compact JWS with the current key for
    /// `alg`, setting `alg`, and `kid` unless the header has one.
    ///
    /// RS*/PS* use the RSA key and ES256 the P-256 key. HS* are keyed with the
    /// RSA key's public `RSAPublicKey` DER: the algorithm-confusion attack a
    /// verifier must resist. Any other algorithm gets random signature bytes.
    pub fn sign(
        &self,
        alg: Algorithm,
        mut header: Map<String, Value>,
        claims: &Map<String, Value>,
    ) -> Result<String, KeyError> {
        header.insert("alg".into(), json!(alg));
        if !header.contains_key("kid")
            && let Some(kid) = self.current_kid(alg)
        {
            header.insert("kid".into(), json!(kid));
        }
        let signing_input = format!(
            "{}.{}",
            b64url(Value::Object(header).to_string()),
            b64url(Value::Object(claims.clone()).to_string())
        );
        let signature = self.signature(alg, signing_input.as_bytes())?;
        Ok(format!("{signing_input}.{}", b64url(signature)))
    }

    fn signature(&self, alg: Algorithm, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rsa = || self.rsa.last().ok_or(KeyError::Sign(alg));
        let rsa_sign = |encoding: &'static dyn signature::RsaEncoding| {
            let key = rsa()?;
            let mut out = vec![0; key.pair.public_modulus_len()];
            key.pair
                .sign(
                    encoding,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    message,
                    &mut out,
                )
                .map_err(|_| KeyError::Sign(alg))?;
            Ok(out)
        };
        let hmac = |hmac_alg| {
            let key = aws_lc_rs::hmac::Key::new(hmac_alg, &rsa()?.pkcs1);
            Ok(aws_lc_rs::hmac::sign(&key, message).as_ref().to_vec())
        };
        match alg {
            Algorithm::RS256 => rsa_sign(&signature::RSA_PKCS1_SHA256),
            Algorithm::RS384 => rsa_sign(&signature::RSA_PKCS1_SHA384),
            Algorithm::RS512 => rsa_sign(&signature::RSA_PKCS1_SHA512),
            Algorithm::PS256 => rsa_sign(&signature::RSA_PSS_SHA256),
            Algorithm::PS384 => rsa_sign(&signature::RSA_PSS_SHA384),
            Algorithm::PS512 => rsa_sign(&signature::RSA_PSS_SHA512),
            Algorithm::ES256 => {
                let key = self.ec.last().ok_or(KeyError::Sign(alg))?;
                key.pair
                    .sign(&aws_lc_rs::rand::SystemRandom::new(), message)
                    .map(|s| s.as_ref().to_vec())
                    .map_err(|_| KeyError::Sign(alg))
            }
            Algorithm::HS256 => hmac(aws_lc_rs::hmac::HMAC_SHA256),
            Algorithm::HS384 => hmac(aws_lc_rs::hmac::HMAC_SHA384),
            Algorithm::HS512 => hmac(aws_lc_rs::hmac::HMAC_SHA512),
            _ => Ok(random_bytes::<64>().to_vec()),
        }
    }

    /// Verifies a token against the published key its `kid` names, as a
    /// relying party would: no `kid` or an unknown one fails, and the key's
    /// type decides which algorithms can pass.
    pub fn verify(&self, jws: &Jws) -> bool {
        let Some(kid) = jws.header_str("kid") else {
            return false;
        };
        let rsa = self.rsa.iter().find(|k| k.kid == kid).map(|k| &k.public);
        let ec = self.ec.iter().find(|k| k.kid == kid).map(|k| &k.public);
        rsa.or(ec).is_some_and(|key| jws.verify(key))
    }

    /// The JWKS (RFC 7517 §5). `issuer`, when given, is added to every key as
    /// Entra does (`https://login.microsoftonline.com/{tenantid}/v2.0`). RSA
    /// keys carry no `alg`, as in Entra's set, because one RSA key may sign
    /// RS256 and PS256; the P-256 key is bound to ES256.
    pub fn jwks(&self, issuer: Option<&str>) -> Value {
        let mut keys = Vec::new();
        for key in &self.rsa {
            let PublicKey::Rsa { n, e } = &key.public else {
                continue;
            };
            let mut jwk = json!({
                "kty": "RSA",
                "use": "sig",
                "kid": key.kid,
                "n": b64url(n),
                "e": b64url(e),
            });
            if let (Some(issuer), Some(map)) = (issuer, jwk.as_object_mut()) {
                map.insert("issuer".into(), json!(issuer));
            }
            keys.push(jwk);
        }
        for key in &self.ec {
            let PublicKey::P256 { point } = &key.public else {
                continue;
            };
            // An uncompressed point is `04 || x || y` (SEC 1 §2.3.3).
            let x = point.get(1..33).unwrap_or_default();
            let y = point.get(33..).unwrap_or_default();
            let mut jwk = json!({
                "kty": "EC",
                "use": "sig",
                "kid": key.kid,
                "crv": "P-256",
                "x": b64url(x),
                "y": b64url(y),
                "alg": "ES256",
            });
            if let (Some(issuer), Some(map)) = (issuer, jwk.as_object_mut()) {
                map.insert("issuer".into(), json!(issuer));
            }
            keys.push(jwk);
        }
        json!({ "keys": keys })
    }
}

fn generate_rsa() -> Result<RsaKey, KeyError> {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate("RSA"))?;
    let pkcs1 = pair.public_key().as_ref().to_vec();
    let public = PublicKey::from_pkcs1(&pkcs1).ok_or(KeyError::Generate("RSA"))?;
    Ok(RsaKey {
        kid: new_kid(),
        pair,
        public,
        pkcs1,
    })
}

fn generate_ec() -> Result<EcKey, KeyError> {
    let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
        .map_err(|_| KeyError::Generate("P-256"))?;
    let point = pair.public_key().as_ref().to_vec();
    if point.len() != 65 {
        return Err(KeyError::Generate("P-256"));
    }
    Ok(EcKey {
        kid: new_kid(),
        pair,
        public: PublicKey::P256 { point },
    })
}
