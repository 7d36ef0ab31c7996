//! Keystone v3 token validation for the API, as OpenStack services authenticate
//! (keystonemiddleware's `auth_token`, reduced to what the v2 API needs).
//!
//! The collector holds a token of its own service user (password authentication, scoped to
//! its project, renewed a minute before it expires or when Keystone refuses it) and
//! validates a caller's `X-Auth-Token` with `GET /v3/auth/tokens` (`X-Subject-Token`). A
//! valid token scoped to a project is that project's caller; a token with one of
//! `admin_roles` (Ceilometer's `context_is_admin`: `role:admin`) is admin. Validated tokens
//! are cached by their SHA-256 digest for `cache_secs` (at most until they expire): a token
//! revoked meanwhile stays valid here that long, as with keystonemiddleware's cache.
//! Refused tokens are remembered for 10 s, so a client retrying a bad token does not make
//! every request a Keystone call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

/// `http.keystone:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeystoneConfig {
    /// Keystone's v3 endpoint, e.g. `https://keystone.example:5000/v3`.
    pub url: String,
    /// The collector's service user (needs the `service` role, or `reader` with system
    /// scope, to validate tokens under Keystone's default policy).
    pub username: String,
    /// Its password; or `password_file` (read once at start-up, trailing newline removed).
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub user_domain_id: String,
    /// The project the service token is scoped to.
    pub project_name: String,
    pub project_domain_id: String,
    /// Roles that make a caller admin (sees every project).
    pub admin_roles: Vec<String>,
    /// How long a validated token is trusted without asking Keystone again, s (capped by
    /// the token's own expiry).
    pub cache_secs: u64,
    /// Timeout of each call to Keystone, s.
    pub timeout_secs: u64,
    /// A PEM file of CA certificates to trust besides the bundled Mozilla roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for KeystoneConfig {
    fn default() -> Self {
        KeystoneConfig {
            url: String::new(),
            username: "ceilometer".into(),
            password: None,
            password_file: None,
            user_domain_id: "default".into(),
            project_name: "service".into(),
            project_domain_id: "default".into(),
            admin_roles: vec!["admin".into()],
            cache_secs: 300,
            timeout_secs: 5,
            ca_file: None,
        }
    }
}

/// Who a valid token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Has one of the admin roles.
    pub admin: bool,
    /// The project the token is scoped to.
    pub project: Option<String>,
}

/// Why a token could not be validated (not: the token is invalid).
#[derive(Debug, thiserror::Error)]
pub enum KeystoneError {
    #[error("keystone configuration: {0}")]
    Config(String),
    #[error("keystone unreachable: {0}")]
    Http(#[from] reqwest::Error),
    #[error("keystone answered {status} to {what}")]
    Status {
        what: &'static str,
        status: reqwest::StatusCode,
    },
    #[error("keystone's answer to {0} is not what v3 documents")]
    Shape(&'static str),
}

/// Most cached tokens (valid and refused); when full, expired entries go, then all.
const MAX_CACHED: usize = 10_000;
/// How long a refused token is remembered.
const NEGATIVE_SECS: u64 = 10;

/// A cached answer: the identity (`None`: refused) and until when it holds.
type Cached = (Option<Identity>, Instant);

/// The validator, shared by the API's handlers.
pub struct Keystone {
    cfg: KeystoneConfig,
    password: String,
    client: reqwest::Client,
    /// The service user's token and when to renew it.
    service: Mutex<Option<(String, Instant)>>,
    /// Token digest → (identity, or `None` for refused; trusted until).
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl std::fmt::Debug for Keystone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password or a token.
        f.debug_struct("Keystone")
            .field("url", &self.cfg.url)
            .field("username", &self.cfg.username)
            .finish_non_exhaustive()
    }
}

impl Keystone {
    /// A validator for `cfg` (reads the password file and the CA file now).
    pub fn new(cfg: KeystoneConfig) -> Result<Keystone, KeystoneError> {
        let password = match (&cfg.password, &cfg.password_file) {
            (Some(p), None) => p.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| KeystoneError::Config(format!("password_file {}: {e}", f.display())))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            _ => {
                return Err(KeystoneError::Config(
                    "give exactly one of password and password_file".into(),
                ));
            }
        };
        if !cfg.url.starts_with("http://") && !cfg.url.starts_with("https://") {
            return Err(KeystoneError::Config(format!(
                "url {:?} is not an http(s) URL",
                cfg.url
            )));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_secs.max(1)))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(f) = &cfg.ca_file {
            let pem = std::fs::read(f)
                .map_err(|e| KeystoneError::Config(format!("ca_file {}: {e}", f.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| KeystoneError::Config(format!("ca_file {}: {e}", f.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Keystone {
            password,
            client: builder.build()?,
            service: Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            cfg,
        })
    }

    fn endpoint(&self) -> String {
        format!("{}/auth/tokens", self.cfg.url.trim_end_matches('/'))
    }

    /// The identity of `token`, `None` if Keystone says it is not valid.
    pub async fn validate(&self, token: &str) -> Result<Option<Identity>, KeystoneError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((id, until)) = self.cache.lock().await.get(&key)
            && *until > now
        {
            counter("cached").inc();
            return Ok(id.clone());
        }
        let (id, until) = match self.ask(token, false).await {
            Ok(Some((id, expires))) => {
                let until = now + Duration::from_secs(self.cfg.cache_secs);
                counter("valid").inc();
                (Some(id), expires.map_or(until, |e| e.min(until)))
            }
            Ok(None) => {
                counter("invalid").inc();
                (None, now + Duration::from_secs(NEGATIVE_SECS))
            }
            Err(e) => {
                counter("error").inc();
                return Err(e);
            }
        };
        let mut cache = self.cache.lock().await;
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (_, u)| *u > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (id.clone(), until));
        Ok(id)
    }

    /// One validation call; with a refused service token, renews it and asks once more.
    async fn ask(
        &self,
        token: &str,
        renewed: bool,
    ) -> Result<Option<(Identity, Option<Instant>)>, KeystoneError> {
        let service = self.service_token(renewed).await?;
        let res = self
            .client
            .get(self.endpoint())
            .header("X-Auth-Token", service)
            .header("X-Subject-Token", token)
            .send()
            .await?;
        match res.status().as_u16() {
            200 => {
                let body: Value = res.json().await?;
                Ok(Some(self.identity(&body)?))
            }
            // The subject token is unknown, expired, revoked (404) or malformed (400).
            400 | 404 => Ok(None),
            401 if !renewed => Box::pin(self.ask(token, true)).await,
            _ => Err(KeystoneError::Status {
                what: "token validation",
                status: res.status(),
            }),
        }
    }

    fn identity(&self, body: &Value) -> Result<(Identity, Option<Instant>), KeystoneError> {
        let t = body
            .get("token")
            .ok_or(KeystoneError::Shape("validation"))?;
        let admin = t["roles"].as_array().is_some_and(|roles| {
            roles.iter().any(|r| {
                r["name"]
                    .as_str()
                    .is_some_and(|n| self.cfg.admin_roles.iter().any(|a| a == n))
            })
        });
        let project = t["project"]["id"].as_str().map(str::to_string);
        Ok((Identity { admin, project }, expiry(t)))
    }

    /// The service user's token: cached, renewed a minute before it expires (or now, if
    /// Keystone refused it).
    async fn service_token(&self, renew: bool) -> Result<String, KeystoneError> {
        let mut service = self.service.lock().await;
        if !renew
            && let Some((t, until)) = &*service
            && *until > Instant::now()
        {
            return Ok(t.clone());
        }
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": self.cfg.username,
                "domain": {"id": self.cfg.user_domain_id},
                "password": self.password,
            }}},
            "scope": {"project": {
                "name": self.cfg.project_name,
                "domain": {"id": self.cfg.project_domain_id},
            }},
        }});
        let res = self.client.post(self.endpoint()).json(&body).send().await?;
        if res.status().as_u16() != 201 {
            return Err(KeystoneError::Status {
                what: "the service user's authentication",
                status: res.status(),
            });
        }
        let token = res
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .ok_or(KeystoneError::Shape("authentication"))?
            .to_string();
        let v: Value = res.json().await?;
        let until = expiry(&v["token"])
            .map(|e| e.checked_sub(Duration::from_secs(60)).unwrap_or(e))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(600));
        *service = Some((token.clone(), until));
        Ok(token)
    }
}

/// When a token (`token` object of a v3 answer) expires, as an `Instant`.
fn expiry(token: &Value) -> Option<Instant> {
    let at = chrono::DateTime::parse_from_rfc3339(token["expires_at"].as_str()?).ok()?;
    let left = (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    Some(Instant::now() + left)
}

fn counter(result: &str) -> vmeter_core::telemetry::Counter {
    vmeter_core::telemetry::counter(
        "vmeter_api_keystone_validations_total",
        "Caller tokens checked against Keystone, by result (cached: answered from the cache without asking Keystone).",
        &[("result", result)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ks() -> Keystone {
        Keystone::new(KeystoneConfig {
            url: "http://127.0.0.1:1/v3".into(),
            password: Some("x".into()),
            ..KeystoneConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn identity_from_a_v3_validation_answer() {
        let k = ks();
        let body = json!({"token": {
            "expires_at": "2099-01-01T00:00:00.000000Z",
            "project": {"id": "p1", "name": "tenant", "domain": {"id": "default"}},
            "roles": [{"id": "r1", "name": "member"}, {"id": "r2", "name": "reader"}],
        }});
        let (id, exp) = k.identity(&body).unwrap();
        assert_eq!(
            id,
            Identity {
                admin: false,
                project: Some("p1".into())
            }
        );
        assert!(exp.is_some());
        let body = json!({"token": {"roles": [{"name": "admin"}], "system": {"all": true}}});
        let (id, exp) = k.identity(&body).unwrap();
        assert_eq!(
            id,
            Identity {
                admin: true,
                project: None
            }
        );
        assert!(exp.is_none());
        assert!(k.identity(&json!({"error": {}})).is_err());
    }

    #[test]
    fn config_errors_are_named() {
        let e = Keystone::new(KeystoneConfig {
            url: "http://k/v3".into(),
            ..KeystoneConfig::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("password"), "{e}");
        let e = Keystone::new(KeystoneConfig {
            url: "keystone:5000".into(),
            password: Some("x".into()),
            ..KeystoneConfig::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("http"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_keystone_is_an_error_not_an_invalid_token() {
        let k = ks();
        assert!(matches!(k.validate("t").await, Err(KeystoneError::Http(_))));
    }
}
