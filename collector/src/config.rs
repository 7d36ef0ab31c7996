//! `collector.yaml`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use vmeter_core::amqp::{BrokerConfig, SigningConfig};
use vmeter_core::telemetry::LogConfig;

/// The collector's configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub broker: BrokerConfig,
    pub signing: SigningConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    /// The sample contract, checked on every sample consumed and posted.
    pub contract: vmeter_core::contract::Contract,
}

impl Config {
    /// Checks what parsing cannot: tokens that would let anyone in or are ambiguous.
    pub fn validate(&self) -> Result<(), vmeter_core::config::ConfigError> {
        let invalid = |key: &str, message: String| vmeter_core::config::ConfigError::Invalid {
            origin: "collector".into(),
            key: key.into(),
            message,
        };
        if self.http.admin_tokens.iter().any(|t| t.trim().is_empty()) {
            return Err(invalid(
                "http.admin_tokens",
                "an empty token would let anyone in as admin".into(),
            ));
        }
        for (token, project) in &self.http.project_tokens {
            if token.trim().is_empty() {
                return Err(invalid(
                    "http.project_tokens",
                    format!("an empty token for project {project}"),
                ));
            }
            if project.trim().is_empty() {
                return Err(invalid(
                    "http.project_tokens",
                    "a token for an empty project id".into(),
                ));
            }
            if self.http.admin_tokens.contains(token) {
                return Err(invalid(
                    "http.project_tokens",
                    format!("a token of project {project} is also an admin token"),
                ));
            }
        }
        if let Some(k) = &self.http.keystone {
            if !k.url.starts_with("http://") && !k.url.starts_with("https://") {
                return Err(invalid(
                    "http.keystone.url",
                    format!("{:?} is not an http(s) URL", k.url),
                ));
            }
            if k.password.is_some() == k.password_file.is_some() {
                return Err(invalid(
                    "http.keystone.password",
                    "give exactly one of password and password_file".into(),
                ));
            }
        }
        if self.http.tls_cert_file.is_some() != self.http.tls_key_file.is_some() {
            return Err(invalid(
                "http.tls_cert_file",
                "set both tls_cert_file and tls_key_file (HTTPS), or neither (HTTP)".into(),
            ));
        }
        if self.http.max_limit < 1 || self.http.default_limit < 1 {
            return Err(invalid(
                "http.max_limit",
                "limits must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl HttpConfig {
    /// The HTTPS configuration from `tls_cert_file` and `tls_key_file` (`None`: plain
    /// HTTP). A file that cannot be read or parsed, or a key that is not the certificate's,
    /// is a config error naming the key and the file.
    pub fn tls(
        &self,
    ) -> Result<Option<vmeter_core::tls_server::ServerConfig>, vmeter_core::config::ConfigError>
    {
        let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) else {
            return Ok(None);
        };
        vmeter_core::tls_server::server_config(cert, key)
            .map(Some)
            .map_err(|e| vmeter_core::config::ConfigError::Invalid {
                origin: cert.display().to_string(),
                key: "http.tls_cert_file".into(),
                message: e.to_string(),
            })
    }
}

/// `http:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the API, `/health` and `/metrics` (8777 is Ceilometer's API port).
    pub listen: SocketAddr,
    /// Page size when a request gives no `limit` (Ceilometer's `default_api_return_limit`).
    pub default_limit: i64,
    /// Largest `limit` a request may ask for; larger is a 400 (answers are built from that
    /// many rows).
    pub max_limit: i64,
    /// Bearer tokens that see every project. With no token at all configured, the API is
    /// open (said at start-up): bind it to loopback or put it behind a proxy that
    /// authenticates.
    pub admin_tokens: Vec<String>,
    /// Token → project id: such a token sees (and may post for) that project only.
    pub project_tokens: std::collections::BTreeMap<String, String>,
    /// Validate other tokens against Keystone v3 (`null`: static tokens only).
    pub keystone: Option<crate::keystone::KeystoneConfig>,
    /// Serve HTTPS (the API, the dashboard, `/health`, `/metrics`) with this certificate:
    /// a PEM file, the server's certificate first, then any intermediates. Set both this
    /// and `tls_key_file`, or neither (plain HTTP).
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1), readable by the service.
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8777".parse().expect("valid"),
            default_limit: 100,
            max_limit: 100_000,
            admin_tokens: Vec::new(),
            project_tokens: Default::default(),
            keystone: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// `database:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL. The default names the role and database deploy/setup.sh creates;
    /// the role's password is random (`DB_PASSWORD` of /etc/vmeter/credentials.env) and
    /// must be added to the URL.
    pub url: String,
    /// Pool size (ingest uses one connection at a time; the rest serve the API).
    pub max_connections: u32,
    /// Most AMQP messages written in one transaction.
    pub batch_max_messages: usize,
    /// A transaction is written once this many samples are in hand...
    pub batch_max_samples: usize,
    /// ...or this long after its first message arrived, ms.
    pub batch_max_wait_ms: u64,
    /// Daily partitions created ahead of today.
    pub partitions_ahead_days: u32,
    /// Keep samples this many days (whole daily partitions are dropped once entirely older);
    /// `null` (default) keeps everything.
    pub retention_days: Option<u32>,
    /// How often retention runs (and partitions ahead are created), s.
    pub maintenance_interval_secs: u64,
    /// How often the rollup job looks for closed hours to roll up, s (0: never, and no
    /// compaction either; statistics then compute every hour's minutes from its samples).
    pub rollup_interval_secs: u64,
    /// An hour is rolled up once the wall clock and the newest stored sample are this far
    /// past its end, s. Samples that arrive later for a rolled-up hour are folded in by the
    /// transaction that writes them (correct, but slower than the common path).
    pub rollup_lag_secs: u64,
    /// Compact rolled-up hours into `sample_hour` after each rollup round (docs/storage.md,
    /// "Compacted hours"): ~9 B per sample instead of ~95. A compacted hour's rollup rows
    /// are deleted, and a day's narrow partition is dropped once the day is compacted.
    /// Off: every sample stays in the narrow table (what earlier versions stored); turning
    /// it off later leaves what is compacted compacted (the API reads both layouts).
    pub compaction: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://vmeter@127.0.0.1:5432/vmeter".into(),
            max_connections: 8,
            batch_max_messages: 100,
            batch_max_samples: 20_000,
            batch_max_wait_ms: 200,
            partitions_ahead_days: 2,
            retention_days: None,
            maintenance_interval_secs: 3600,
            rollup_interval_secs: 60,
            rollup_lag_secs: 600,
            compaction: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_ambiguous_tokens_are_refused() {
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.http.admin_tokens = vec!["  ".into()];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("http.admin_tokens")
        );
        c.http.admin_tokens = vec!["a".into()];
        c.http.project_tokens.insert(String::new(), "p".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("empty token")
        );
        c.http.project_tokens.clear();
        c.http.project_tokens.insert("a".into(), "p".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("also an admin")
        );
    }
}
