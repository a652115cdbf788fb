//! Per-route caller policy: scopes (any of, from `scp`), roles (any of, from
//! `roles`) and token kinds (`user`, `app`).

use crate::config::{CallerKind, CallerPolicy};

use super::Caller;

/// Why a valid token is not enough for a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forbidden {
    /// None of the route's scopes is in `scp`.
    MissingScope(Vec<String>),
    /// None of the route's roles is in `roles`.
    MissingRole(Vec<String>),
    /// The token's kind (user or app) is not accepted by the route.
    WrongKind {
        /// What the caller sent.
        got: CallerKind,
    },
}

impl Forbidden {
    /// Label value for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Forbidden::MissingScope(_) => "insufficient_scope",
            Forbidden::MissingRole(_) => "insufficient_role",
            Forbidden::WrongKind { .. } => "wrong_token_kind",
        }
    }

    /// The scopes or roles that would have been enough, space-separated (the
    /// `scope` attribute of the RFC 6750 challenge).
    pub fn needed(&self) -> Option<String> {
        match self {
            Forbidden::MissingScope(s) | Forbidden::MissingRole(s) => Some(s.join(" ")),
            Forbidden::WrongKind { .. } => None,
        }
    }
}

impl std::fmt::Display for Forbidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Forbidden::MissingScope(s) => {
                write!(
                    f,
                    "the token lacks a required scope: one of {}",
                    s.join(", ")
                )
            }
            Forbidden::MissingRole(r) => {
                write!(
                    f,
                    "the token lacks a required role: one of {}",
                    r.join(", ")
                )
            }
            Forbidden::WrongKind {
                got: CallerKind::App,
            } => f.write_str(
                "this route accepts user (delegated) tokens; the caller sent an app-only token",
            ),
            Forbidden::WrongKind {
                got: CallerKind::User,
            } => f.write_str(
                "this route accepts app-only tokens; the caller sent a user (delegated) token",
            ),
        }
    }
}

/// Applies a route's policy to a validated caller.
pub fn authorize(policy: &CallerPolicy, caller: &Caller) -> Result<(), Forbidden> {
    if !policy.kinds.is_empty() && !policy.kinds.contains(&caller.kind) {
        return Err(Forbidden::WrongKind { got: caller.kind });
    }
    if !policy.scopes.is_empty() && !policy.scopes.iter().any(|s| caller.scopes.contains(s)) {
        return Err(Forbidden::MissingScope(policy.scopes.clone()));
    }
    if !policy.roles.is_empty() && !policy.roles.iter().any(|r| caller.roles.contains(r)) {
        return Err(Forbidden::MissingRole(policy.roles.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caller(claims: serde_json::Value) -> Caller {
        Caller::from_claims(claims.as_object().cloned().unwrap_or_default(), u64::MAX)
    }

    fn policy(scopes: &[&str], roles: &[&str], kinds: &[CallerKind]) -> CallerPolicy {
        CallerPolicy {
            required: true,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            kinds: kinds.to_vec(),
        }
    }

    #[test]
    fn scopes_and_roles_are_any_of() {
        let user = caller(json!({"scp": "read write", "idtyp": "user"}));
        assert!(authorize(&policy(&["admin", "write"], &[], &[]), &user).is_ok());
        assert_eq!(
            authorize(&policy(&["admin"], &[], &[]), &user),
            Err(Forbidden::MissingScope(vec!["admin".into()]))
        );
        let app = caller(json!({"roles": ["Orders.Read"], "idtyp": "app"}));
        assert!(authorize(&policy(&[], &["Orders.Write", "Orders.Read"], &[]), &app).is_ok());
        assert!(authorize(&policy(&[], &["Orders.Write"], &[]), &app).is_err());
        // A scope never satisfies a role, nor the other way round.
        let tricky = caller(json!({"scp": "Orders.Write", "roles": ["read"]}));
        assert!(authorize(&policy(&[], &["Orders.Write"], &[]), &tricky).is_err());
        assert!(authorize(&policy(&["read"], &[], &[]), &tricky).is_err());
    }

    #[test]
    fn kind_is_idtyp_else_the_presence_of_scp() {
        assert_eq!(
            caller(json!({"idtyp": "app", "scp": "x"})).kind,
            CallerKind::App
        );
        assert_eq!(caller(json!({"idtyp": "user"})).kind, CallerKind::User);
        assert_eq!(caller(json!({"scp": "x"})).kind, CallerKind::User);
        assert_eq!(caller(json!({"roles": ["r"]})).kind, CallerKind::App);
        let users_only = policy(&[], &[], &[CallerKind::User]);
        assert_eq!(
            authorize(&users_only, &caller(json!({"roles": ["r"]}))),
            Err(Forbidden::WrongKind {
                got: CallerKind::App
            })
        );
    }
}
