//! Who is asking: static bearer tokens, then Keystone.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;

use super::Api;
use super::error::ApiError;

/// Bearer tokens: none configured means the API is open (logged at start).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Tokens that see everything.
    pub admin: Vec<String>,
    /// Token → the one project it sees.
    pub projects: BTreeMap<String, String>,
    /// Tokens that are neither are validated against Keystone, if configured.
    pub keystone: Option<Arc<crate::keystone::Keystone>>,
}

impl Auth {
    /// Whether callers must authenticate (else every caller is admin).
    pub fn enabled(&self) -> bool {
        !self.admin.is_empty() || !self.projects.is_empty() || self.keystone.is_some()
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    Admin,
    Project(String),
}

/// Every handler that reads or writes data takes a `Caller` argument: axum resolves it
/// from the request's headers before the handler runs, so no route can skip
/// authentication (a failure is the handler's answer: 401, or 503 when Keystone cannot be
/// asked).
impl FromRequestParts<Api> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, Self::Rejection> {
        caller(api, &parts.headers).await
    }
}

/// Resolves the caller from `Authorization: Bearer T` or `X-Auth-Token: T`: the static
/// tokens first, then Keystone (if configured).
pub(super) async fn caller(api: &Api, headers: &HeaderMap) -> Result<Caller, ApiError> {
    if !api.auth.enabled() {
        return Ok(Caller::Admin);
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-auth-token").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::Unauthorized("authentication required: send a bearer token".into())
        })?;
    // Every configured token is compared, each through its SHA-256 digest in constant
    // time: neither the length of a token nor which one matched shows in the timing.
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let given = Sha256::digest(token.as_bytes());
    let matches = |t: &str| Sha256::digest(t.as_bytes()).ct_eq(&given);
    let mut admin = subtle::Choice::from(0);
    for t in &api.auth.admin {
        admin |= matches(t);
    }
    let mut project: Option<&String> = None;
    for (t, p) in &api.auth.projects {
        let hit = matches(t);
        // All tokens are compared whichever matched.
        project = if bool::from(hit) { Some(p) } else { project };
    }
    if bool::from(admin) && !token.is_empty() {
        return Ok(Caller::Admin);
    }
    match project {
        Some(p) if !token.is_empty() => return Ok(Caller::Project(p.clone())),
        _ => {}
    }
    let Some(keystone) = api.auth.keystone.as_ref().filter(|_| !token.is_empty()) else {
        return Err(ApiError::Unauthorized("invalid token".into()));
    };
    match keystone.validate(token).await {
        Ok(Some(id)) if id.admin => Ok(Caller::Admin),
        Ok(Some(crate::keystone::Identity {
            project: Some(p), ..
        })) => Ok(Caller::Project(p)),
        Ok(Some(_)) => Err(ApiError::Unauthorized(
            "the token is not scoped to a project".into(),
        )),
        Ok(None) => Err(ApiError::Unauthorized("invalid token".into())),
        Err(e) => {
            tracing::warn!(error = %e, "Could not validate a token with Keystone.");
            Err(ApiError::Unavailable(format!(
                "the token could not be validated: {e}"
            )))
        }
    }
}
