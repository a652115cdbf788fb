//! The three grants on the wire: the form each one sends and how the token
//! endpoint's answer is read (success and the Entra/RFC 6749 error shape).

use serde::Deserialize;
use serde_json::Value;

use super::credential::Secret;

/// `grant_type` of Entra's On-Behalf-Of (RFC 7523 jwt-bearer).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// `grant_type` of RFC 8693.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 token type of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// What to ask the IdP for, from a route's `token` section.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GrantRequest {
    /// Entra OBO: the caller's token is the assertion.
    OnBehalfOf {
        /// Requested scopes.
        scopes: Vec<String>,
    },
    /// RFC 8693: the caller's token is the subject token.
    TokenExchange {
        /// `scope` values.
        scopes: Vec<String>,
        /// `audience` values (repeated).
        audience: Vec<String>,
        /// `resource` values (repeated).
        resource: Vec<String>,
        /// `requested_token_type`.
        requested_token_type: Option<String>,
    },
    /// App-only token.
    ClientCredentials {
        /// Requested scopes (`<resource>/.default` on Entra).
        scopes: Vec<String>,
    },
}

impl GrantRequest {
    /// Label value for metrics.
    pub fn name(&self) -> &'static str {
        match self {
            GrantRequest::OnBehalfOf { .. } => "on_behalf_of",
            GrantRequest::TokenExchange { .. } => "token_exchange",
            GrantRequest::ClientCredentials { .. } => "client_credentials",
        }
    }

    /// True when the grant acts for the caller (needs the caller's token).
    pub fn is_delegated(&self) -> bool {
        !matches!(self, GrantRequest::ClientCredentials { .. })
    }

    /// The form fields of the grant itself (client authentication is added
    /// separately). `subject` is the caller's token for delegated grants.
    pub fn form(&self, subject: Option<&str>) -> Vec<(&'static str, Secret)> {
        let s = |v: &str| Secret::new(v.to_owned());
        let mut fields = Vec::new();
        match self {
            GrantRequest::OnBehalfOf { scopes } => {
                fields.push(("grant_type", s(JWT_BEARER_GRANT)));
                fields.push(("requested_token_use", s("on_behalf_of")));
                if let Some(subject) = subject {
                    fields.push(("assertion", s(subject)));
                }
                fields.push(("scope", s(&scopes.join(" "))));
            }
            GrantRequest::TokenExchange {
                scopes,
                audience,
                resource,
                requested_token_type,
            } => {
                fields.push(("grant_type", s(TOKEN_EXCHANGE_GRANT)));
                if let Some(subject) = subject {
                    fields.push(("subject_token", s(subject)));
                }
                fields.push(("subject_token_type", s(ACCESS_TOKEN_TYPE)));
                for a in audience {
                    fields.push(("audience", s(a)));
                }
                for r in resource {
                    fields.push(("resource", s(r)));
                }
                if !scopes.is_empty() {
                    fields.push(("scope", s(&scopes.join(" "))));
                }
                if let Some(t) = requested_token_type {
                    fields.push(("requested_token_type", s(t)));
                }
            }
            GrantRequest::ClientCredentials { scopes } => {
                fields.push(("grant_type", s("client_credentials")));
                fields.push(("scope", s(&scopes.join(" "))));
            }
        }
        fields
    }
}

/// A successful token response.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The access token.
    pub access_token: Secret,
    /// Seconds until it expires, as the IdP said.
    pub expires_in: u64,
}

/// `expires_in` is a number per RFC 6749, but Entra's v1 endpoint and some IdPs
/// send a string.
fn seconds(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Reads a 200 answer: `access_token` must be a non-empty string, `token_type`
/// Bearer (case-insensitive) when present, `expires_in` a number of seconds.
pub fn parse_success(body: &[u8]) -> Result<Issued, String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|_| "the answer is not JSON".to_owned())?;
    let access_token = doc
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("the answer has no access_token")?;
    if let Some(t) = doc.get("token_type") {
        let bearer = t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("bearer"));
        // RFC 8693 §2.2.1: N_A is allowed for tokens that are not access tokens;
        // oboe only forwards bearer tokens.
        if !bearer {
            return Err("token_type is not Bearer".to_owned());
        }
    }
    let expires_in = doc
        .get("expires_in")
        .and_then(seconds)
        .ok_or("the answer has no numeric expires_in")?;
    Ok(Issued {
        access_token: Secret::new(access_token.to_owned()),
        expires_in,
    })
}

/// An error answer (RFC 6749 §5.2 with Entra's members).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct IdpError {
    /// `error`.
    #[serde(default)]
    pub error: String,
    /// `error_description` (Entra: "AADSTSnnnnn: ...").
    #[serde(default)]
    pub error_description: Option<String>,
    /// `error_codes`.
    #[serde(default)]
    pub error_codes: Vec<u64>,
    /// `suberror` (Entra: consent_required, basic_action, ...).
    #[serde(default)]
    pub suberror: Option<String>,
    /// Claims challenge JSON (a string).
    #[serde(default)]
    pub claims: Option<String>,
    /// Entra `trace_id`.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// Entra `correlation_id`.
    #[serde(default)]
    pub correlation_id: Option<String>,
}

impl IdpError {
    /// Parses an error body; `None` when it is not the RFC 6749 shape.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let e: IdpError = serde_json::from_slice(body).ok()?;
        (!e.error.is_empty()).then_some(e)
    }

    /// The first `AADSTS` code, from `error_codes` or the description.
    pub fn code(&self) -> Option<u64> {
        self.error_codes.first().copied().or_else(|| {
            let d = self.error_description.as_deref()?;
            let rest = d.strip_prefix("AADSTS")?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
    }

    /// True when the IdP asks the user to satisfy more claims (MFA, Conditional Access).
    pub fn is_claims_challenge(&self) -> bool {
        self.claims.as_deref().is_some_and(|c| !c.trim().is_empty())
            && matches!(
                self.error.as_str(),
                "interaction_required" | "invalid_grant"
            )
    }

    /// True when the user or an admin has not consented (AADSTS65001).
    pub fn is_consent_required(&self) -> bool {
        self.code() == Some(65001) || self.suberror.as_deref() == Some("consent_required")
    }

    /// True when the caller's token (the assertion) itself was refused:
    /// expired, wrong audience, signature, or not a user token.
    pub fn is_assertion_rejected(&self) -> bool {
        matches!(
            self.code(),
            Some(50013 | 500133 | 50132 | 50173 | 700024 | 700082)
        ) || (self.error == "invalid_grant" && self.code().is_none() && !self.is_claims_challenge())
    }

    /// True when oboe's own client credential was refused.
    pub fn is_invalid_client(&self) -> bool {
        self.error == "invalid_client"
            || self.error == "unauthorized_client"
            || matches!(
                self.code(),
                Some(7000215 | 7000222 | 700016 | 700027 | 700023 | 70002 | 7000112)
            )
    }

    /// A short text for the problem detail: the error and the IdP's code.
    pub fn summary(&self) -> String {
        let mut out = match self.code() {
            Some(code) => format!("{} (AADSTS{code})", self.error),
            None => self.error.clone(),
        };
        if let Some(description) = &self.error_description {
            // The IdP's own words help the operator; Entra's first line is enough.
            let first = description.lines().next().unwrap_or_default();
            let short: String = first.chars().take(200).collect();
            out.push_str(": ");
            out.push_str(&short);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(g: &GrantRequest, subject: Option<&str>) -> Vec<(&'static str, String)> {
        g.form(subject)
            .into_iter()
            .map(|(k, v)| (k, v.expose().to_owned()))
            .collect()
    }

    #[test]
    fn obo_form_is_entras() {
        let g = GrantRequest::OnBehalfOf {
            scopes: vec![
                "https://graph.microsoft.com/User.Read".into(),
                "offline_access".into(),
            ],
        };
        assert_eq!(
            fields(&g, Some("eyJ.a.b")),
            vec![
                ("grant_type", JWT_BEARER_GRANT.to_owned()),
                ("requested_token_use", "on_behalf_of".to_owned()),
                ("assertion", "eyJ.a.b".to_owned()),
                (
                    "scope",
                    "https://graph.microsoft.com/User.Read offline_access".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn token_exchange_repeats_audience_and_resource() {
        let g = GrantRequest::TokenExchange {
            scopes: vec![],
            audience: vec!["a".into(), "b".into()],
            resource: vec!["https://r/".into()],
            requested_token_type: Some(ACCESS_TOKEN_TYPE.into()),
        };
        let f = fields(&g, Some("t"));
        assert_eq!(f.iter().filter(|(k, _)| *k == "audience").count(), 2);
        assert!(f.contains(&("subject_token_type", ACCESS_TOKEN_TYPE.to_owned())));
        assert!(!f.iter().any(|(k, _)| *k == "scope"));
    }

    #[test]
    fn success_and_error_answers() {
        let ok =
            parse_success(br#"{"token_type":"Bearer","expires_in":"3599","access_token":"x"}"#)
                .expect("string expires_in");
        assert_eq!(ok.expires_in, 3599);
        assert!(parse_success(br#"{"token_type":"Bearer","expires_in":10}"#).is_err());
        assert!(parse_success(b"<html>").is_err());
        assert!(
            parse_success(br#"{"token_type":"mac","expires_in":10,"access_token":"x"}"#).is_err()
        );

        let challenge = IdpError::parse(
            br#"{"error":"interaction_required","error_description":"AADSTS50076: Due to ...","error_codes":[50076],"claims":"{\"access_token\":{}}","trace_id":"t","correlation_id":"c"}"#,
        )
        .expect("parse");
        assert!(challenge.is_claims_challenge());
        assert_eq!(challenge.code(), Some(50076));
        let consent = IdpError::parse(
            br#"{"error":"invalid_grant","error_description":"AADSTS65001: The user or administrator has not consented"}"#,
        )
        .expect("parse");
        assert!(consent.is_consent_required());
        assert!(!consent.is_assertion_rejected());
        let client = IdpError::parse(br#"{"error":"invalid_client","error_codes":[7000215]}"#)
            .expect("parse");
        assert!(client.is_invalid_client());
        assert!(IdpError::parse(br#"{"nope":1}"#).is_none());
    }
}
