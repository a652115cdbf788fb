//! oboe's own client credential, exactly one per identity: a client secret
//! (env or file), a certificate that signs a fresh client assertion per
//! request, a workload-identity federated token file, or a private-key JWT.
//!
//! Secrets live in [`Secret`], whose `Debug` and `Display` never show the value.
//! Files are re-read when used, so a rotated Kubernetes Secret or a kubelet-
//! refreshed projected token is picked up without a restart.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::json;

use crate::config::{AssertionAlgorithm, Credential, SecretAuthMethod, SecretSource};

/// The `client_assertion_type` of RFC 7523 §2.2.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Lifetime of the client assertions oboe signs (Entra accepts at most 10 min).
const ASSERTION_LIFETIME_SECS: u64 = 5 * 60;

/// A secret value. Never printed, never logged.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for putting it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why the credential cannot be used. Names the source, never the value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// The environment variable is unset or empty.
    #[error("client secret: environment variable {0} is unset or empty")]
    Env(String),
    /// A file could not be read.
    #[error("{what}: read {path}: {detail}")]
    File {
        /// Which credential part.
        what: &'static str,
        /// File path.
        path: PathBuf,
        /// The I/O error.
        detail: String,
    },
    /// A file does not hold what it should.
    #[error("{what}: {path}: {detail}")]
    Invalid {
        /// Which credential part.
        what: &'static str,
        /// File path.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Signing the assertion failed.
    #[error("sign client assertion: {0}")]
    Sign(String),
}

/// The credential as the token endpoint sees it, ready to use.
pub enum ClientAuth {
    /// Client secret.
    Secret {
        /// Where it comes from (re-read from files on use).
        source: SecretSource,
        /// In the body or as HTTP Basic.
        method: SecretAuthMethod,
    },
    /// A certificate signs a client assertion.
    Certificate {
        /// The signing key.
        key: EncodingKey,
        /// `alg`.
        algorithm: Algorithm,
        /// base64url(SHA-256(DER)) of the leaf certificate.
        thumbprint: String,
        /// base64 DER chain, when `x5c` is sent.
        x5c: Option<Vec<String>>,
    },
    /// A projected service-account token is the assertion.
    FederatedTokenFile {
        /// Token file path.
        path: PathBuf,
    },
    /// A private key signs the assertion (generic IdPs).
    PrivateKeyJwt {
        /// The signing key.
        key: EncodingKey,
        /// `alg`.
        algorithm: Algorithm,
        /// `kid` header.
        kid: Option<String>,
    },
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe().as_str())
    }
}

/// What a credential adds to a token request.
#[derive(Debug, Default)]
pub struct Presented {
    /// Form fields (client_id is always set by the caller of this module).
    pub fields: Vec<(&'static str, Secret)>,
    /// `Authorization: Basic ...`, for `client_secret_basic`.
    pub basic: Option<Secret>,
}

impl ClientAuth {
    /// Loads the credential and checks that it can be used now: files exist
    /// and parse, variables are set. Errors name the source, never the value.
    pub fn load(credential: &Credential) -> Result<Self, CredentialError> {
        let auth = match credential {
            Credential::ClientSecret {
                source,
                auth_method,
            } => {
                read_secret(source)?;
                ClientAuth::Secret {
                    source: source.clone(),
                    method: *auth_method,
                }
            }
            Credential::Certificate {
                cert_file,
                key_file,
                send_x5c,
                algorithm,
            } => {
                let pem = read_file("certificate", cert_file)?;
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| invalid("certificate", cert_file, format!("not PEM: {e}")))?;
                let leaf = chain.first().ok_or_else(|| {
                    invalid("certificate", cert_file, "no CERTIFICATE block".to_owned())
                })?;
                let thumbprint = URL_SAFE_NO_PAD.encode(
                    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref()).as_ref(),
                );
                let x5c = send_x5c.then(|| chain.iter().map(|c| STANDARD.encode(c)).collect());
                let (key, algorithm) = signing_key("certificate key", key_file, *algorithm)?;
                ClientAuth::Certificate {
                    key,
                    algorithm,
                    thumbprint,
                    x5c,
                }
            }
            Credential::FederatedTokenFile { path } => {
                read_token_file(path)?;
                ClientAuth::FederatedTokenFile { path: path.clone() }
            }
            Credential::PrivateKeyJwt {
                key_file,
                kid,
                algorithm,
            } => {
                let (key, algorithm) = signing_key("private_key_jwt key", key_file, *algorithm)?;
                ClientAuth::PrivateKeyJwt {
                    key,
                    algorithm,
                    kid: kid.clone(),
                }
            }
        };
        Ok(auth)
    }

    /// Which credential this is and where it comes from, for operators: safe to
    /// log and to put in a 502's detail.
    pub fn describe(&self) -> String {
        match self {
            ClientAuth::Secret { source, .. } => match source {
                SecretSource::Env(name) => {
                    format!("client secret from environment variable {name}")
                }
                SecretSource::File(path) => format!("client secret from file {}", path.display()),
            },
            ClientAuth::Certificate { thumbprint, .. } => {
                format!("certificate with x5t#S256 {thumbprint}")
            }
            ClientAuth::FederatedTokenFile { path } => {
                format!("federated token file {}", path.display())
            }
            ClientAuth::PrivateKeyJwt { kid, .. } => format!(
                "private_key_jwt key{}",
                kid.as_deref().map(|k| format!(" {k}")).unwrap_or_default()
            ),
        }
    }

    /// The fields (or header) that authenticate `client_id` at `token_url`.
    /// Assertions are signed fresh for each request: `aud` is the exact URL
    /// called, and every `jti` is new.
    pub fn present(
        &self,
        client_id: &str,
        token_url: &str,
        now: u64,
    ) -> Result<Presented, CredentialError> {
        let mut presented = Presented::default();
        match self {
            ClientAuth::Secret { source, method } => {
                let secret = read_secret(source)?;
                match method {
                    SecretAuthMethod::Post => presented.fields.push(("client_secret", secret)),
                    SecretAuthMethod::Basic => {
                        // RFC 6749 §2.3.1: both parts form-urlencoded before base64.
                        let pair = format!(
                            "{}:{}",
                            form_encode(client_id),
                            form_encode(secret.expose())
                        );
                        presented.basic =
                            Some(Secret::new(format!("Basic {}", STANDARD.encode(pair))));
                    }
                }
            }
            ClientAuth::Certificate {
                key,
                algorithm,
                thumbprint,
                x5c,
            } => {
                let mut header = Header::new(*algorithm);
                header.typ = Some("JWT".to_owned());
                header.x5t_s256 = Some(thumbprint.clone());
                header.x5c = x5c.clone();
                let assertion = sign_assertion(&header, key, client_id, token_url, now)?;
                push_assertion(&mut presented, assertion);
            }
            ClientAuth::FederatedTokenFile { path } => {
                let token = read_token_file(path)?;
                push_assertion(&mut presented, token);
            }
            ClientAuth::PrivateKeyJwt {
                key,
                algorithm,
                kid,
            } => {
                let mut header = Header::new(*algorithm);
                header.typ = Some("JWT".to_owned());
                header.kid = kid.clone();
                let assertion = sign_assertion(&header, key, client_id, token_url, now)?;
                push_assertion(&mut presented, assertion);
            }
        }
        Ok(presented)
    }
}

fn push_assertion(presented: &mut Presented, assertion: Secret) {
    presented.fields.push((
        "client_assertion_type",
        Secret::new(JWT_BEARER_ASSERTION.to_owned()),
    ));
    presented.fields.push(("client_assertion", assertion));
}

fn sign_assertion(
    header: &Header,
    key: &EncodingKey,
    client_id: &str,
    token_url: &str,
    now: u64,
) -> Result<Secret, CredentialError> {
    let claims = json!({
        "aud": token_url,
        "iss": client_id,
        "sub": client_id,
        "jti": random_id(),
        "iat": now,
        "nbf": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    jsonwebtoken::encode(header, &claims, key)
        .map(Secret::new)
        .map_err(|e| CredentialError::Sign(e.to_string()))
}

/// A random 128-bit identifier in GUID form.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    // The system RNG failing is not recoverable; a zero id would still be unique
    // enough to not be a security problem here, as the signature binds it.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    guid_text(&bytes)
}

/// 16 bytes in the 8-4-4-4-12 hex GUID form.
pub fn guid_text(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn signing_key(
    what: &'static str,
    path: &Path,
    algorithm: AssertionAlgorithm,
) -> Result<(EncodingKey, Algorithm), CredentialError> {
    let pem = read_file(what, path)?;
    let (key, algorithm) = match algorithm {
        AssertionAlgorithm::PS256 => (EncodingKey::from_rsa_pem(&pem), Algorithm::PS256),
        AssertionAlgorithm::RS256 => (EncodingKey::from_rsa_pem(&pem), Algorithm::RS256),
        AssertionAlgorithm::ES256 => (EncodingKey::from_ec_pem(&pem), Algorithm::ES256),
    };
    let key = key.map_err(|e| {
        invalid(
            what,
            path,
            format!("not a PEM private key for {algorithm:?}: {e}"),
        )
    })?;
    // Sign once now so that a key of the wrong type fails at start, not on the
    // first request.
    jsonwebtoken::crypto::sign(b"probe", &key, algorithm)
        .map_err(|e| invalid(what, path, format!("cannot sign with {algorithm:?}: {e}")))?;
    Ok((key, algorithm))
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, CredentialError> {
    std::fs::read(path).map_err(|e| CredentialError::File {
        what,
        path: path.to_owned(),
        detail: e.kind().to_string(),
    })
}

fn invalid(what: &'static str, path: &Path, detail: String) -> CredentialError {
    CredentialError::Invalid {
        what,
        path: path.to_owned(),
        detail,
    }
}

/// Reads a secret; a trailing newline (as `echo` and editors leave) is not part of it.
pub fn read_secret(source: &SecretSource) -> Result<Secret, CredentialError> {
    let value = match source {
        SecretSource::Env(name) => std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| CredentialError::Env(name.clone()))?,
        SecretSource::File(path) => {
            let bytes = read_file("client secret", path)?;
            String::from_utf8(bytes)
                .map_err(|_| invalid("client secret", path, "not UTF-8".to_owned()))?
        }
    };
    let value = value.trim_end_matches(['\r', '\n']).to_owned();
    if value.is_empty() {
        if let SecretSource::File(path) = source {
            return Err(invalid(
                "client secret",
                path,
                "the file is empty".to_owned(),
            ));
        }
        return Err(CredentialError::Env(String::new()));
    }
    Ok(Secret::new(value))
}

fn read_token_file(path: &Path) -> Result<Secret, CredentialError> {
    let bytes = read_file("federated token", path)?;
    let token = String::from_utf8(bytes)
        .map_err(|_| invalid("federated token", path, "not UTF-8".to_owned()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(invalid(
            "federated token",
            path,
            "the file is empty".to_owned(),
        ));
    }
    Ok(Secret::new(token.to_owned()))
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s} {s:?}"), "<redacted> Secret(<redacted>)");
    }

    #[test]
    fn basic_auth_form_encodes_both_parts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "a:b+c/d\n").expect("write");
        let auth = ClientAuth::load(&Credential::ClientSecret {
            source: SecretSource::File(path),
            auth_method: SecretAuthMethod::Basic,
        })
        .expect("load");
        let presented = auth
            .present("my app", "https://idp/token", 0)
            .expect("present");
        let basic = presented.basic.expect("basic");
        let decoded = STANDARD
            .decode(basic.expose().trim_start_matches("Basic "))
            .expect("base64");
        assert_eq!(decoded, b"my+app:a%3Ab%2Bc%2Fd");
        assert!(presented.fields.is_empty());
    }

    #[test]
    fn load_errors_name_the_source_not_the_value() {
        let missing = ClientAuth::load(&Credential::ClientSecret {
            source: SecretSource::File("/nonexistent/secret".into()),
            auth_method: SecretAuthMethod::Post,
        })
        .expect_err("missing file");
        assert!(
            missing.to_string().contains("/nonexistent/secret"),
            "{missing}"
        );
        let unset = ClientAuth::load(&Credential::ClientSecret {
            source: SecretSource::Env("OBOE_TEST_SURELY_UNSET_VARIABLE".into()),
            auth_method: SecretAuthMethod::Post,
        })
        .expect_err("unset env");
        assert!(
            unset
                .to_string()
                .contains("OBOE_TEST_SURELY_UNSET_VARIABLE")
        );
    }
}
