//! Discovery: where an identity provider's keys are, and which issuer values its
//! tokens carry. Issuers come from the provider's own documents, never from
//! hard-coded hosts, so sovereign clouds and the dev IdP work alike.

use serde_json::Value;

use crate::config::{Identity, Provider};
use crate::http_client::{FetchError, IdpClient};

/// The placeholder Entra puts in multi-tenant issuers.
pub const TENANT_PLACEHOLDER: &str = "{tenantid}";

/// An accepted `iss` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerRule {
    /// Exactly this string.
    Exact(String),
    /// An Entra multi-tenant template: `{tenantid}` replaced by the token's `tid`.
    TenantTemplate(String),
}

impl IssuerRule {
    /// True when `iss` is accepted for a token whose `tid` is `tid`.
    pub fn accepts(&self, iss: &str, tid: Option<&str>) -> bool {
        match self {
            IssuerRule::Exact(expected) => iss == expected,
            IssuerRule::TenantTemplate(template) => {
                tid.is_some_and(|tid| template.replace(TENANT_PLACEHOLDER, tid) == iss)
            }
        }
    }
}

/// What discovery found.
#[derive(Debug, Clone)]
pub struct Discovered {
    /// Accepted issuers (Entra: v2 and v1 forms).
    pub issuers: Vec<IssuerRule>,
    /// Where the signing keys are.
    pub jwks_uri: String,
    /// The token endpoint, for exchanges.
    pub token_endpoint: Option<String>,
}

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The document could not be fetched.
    #[error("fetch discovery document: {0}")]
    Fetch(#[from] FetchError),
    /// The document lacks a member or has a wrong one.
    #[error("read discovery document {url}: {detail}")]
    Invalid {
        /// URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
}

fn member<'a>(doc: &'a Value, url: &str, name: &str) -> Result<&'a str, DiscoveryError> {
    doc.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| DiscoveryError::Invalid {
            url: url.to_owned(),
            detail: format!("`{name}` is missing or not a string"),
        })
}

fn issuer_rule(issuer: &str) -> IssuerRule {
    if issuer.contains(TENANT_PLACEHOLDER) {
        IssuerRule::TenantTemplate(issuer.to_owned())
    } else {
        IssuerRule::Exact(issuer.to_owned())
    }
}

/// The discovery document URLs for an identity: Entra's v2 then v1, or the OIDC one.
pub fn document_urls(identity: &Identity) -> Vec<String> {
    match identity.provider {
        Provider::Entra => {
            let instance = identity.instance.as_deref().unwrap_or_default();
            let tenant = identity.tenant_id.as_deref().unwrap_or_default();
            vec![
                format!("{instance}/{tenant}/v2.0/.well-known/openid-configuration"),
                format!("{instance}/{tenant}/.well-known/openid-configuration"),
            ]
        }
        Provider::Oidc => {
            let issuer = identity.issuer.as_deref().unwrap_or_default();
            vec![format!("{issuer}/.well-known/openid-configuration")]
        }
    }
}

/// Reads the identity's discovery documents.
pub async fn discover(
    identity: &Identity,
    client: &IdpClient,
) -> Result<Discovered, DiscoveryError> {
    let urls = document_urls(identity);
    let mut issuers = Vec::new();
    let mut jwks_uri = None;
    let mut token_endpoint = None;
    for (i, url) in urls.iter().enumerate() {
        let (doc, _) = client.get_json(url).await?;
        let issuer = member(&doc, url, "issuer")?;
        if identity.provider == Provider::Oidc {
            // OpenID Connect Discovery §4.3: the issuer must be identical to the one configured.
            let configured = identity.issuer.as_deref().unwrap_or_default();
            if issuer.trim_end_matches('/') != configured {
                return Err(DiscoveryError::Invalid {
                    url: url.clone(),
                    detail: format!("`issuer` is {issuer:?}, not the configured {configured:?}"),
                });
            }
            issuers.push(IssuerRule::Exact(issuer.to_owned()));
        } else {
            issuers.push(issuer_rule(issuer));
        }
        // The first document (v2 on Entra) names the keys and the token endpoint.
        if i == 0 {
            jwks_uri = Some(member(&doc, url, "jwks_uri")?.to_owned());
            token_endpoint = doc
                .get("token_endpoint")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
    }
    let jwks_uri = jwks_uri.ok_or_else(|| DiscoveryError::Invalid {
        url: urls.first().cloned().unwrap_or_default(),
        detail: "no `jwks_uri`".to_owned(),
    })?;
    Ok(Discovered {
        issuers,
        jwks_uri,
        token_endpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_templates_accept_only_their_own_tenant() {
        let rule = IssuerRule::TenantTemplate("https://login.example/{tenantid}/v2.0".into());
        let t = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        assert!(rule.accepts(&format!("https://login.example/{t}/v2.0"), Some(t)));
        assert!(!rule.accepts(&format!("https://login.example/{t}/v2.0"), Some("other")));
        assert!(!rule.accepts(&format!("https://login.example/{t}/v2.0"), None));
        let exact = IssuerRule::Exact("https://a/".into());
        assert!(exact.accepts("https://a/", None));
        assert!(!exact.accepts("https://a", None));
    }
}
