//! `broker:` and `signing:` sections of every service's config.

use serde::{Deserialize, Serialize};

use crate::signing::Signer;

/// Queue implementation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Raft-replicated; faster than classic for persistent messages on RabbitMQ 3.10 (measured).
    #[default]
    Quorum,
    /// Classic mirrored-less queues, for brokers without quorum support.
    Classic,
}

/// `broker:` section shared by every service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// AMQP URL; the vhost is percent-encoded (`%2fvmeter` is the vhost `/vmeter`).
    pub url: String,
    /// Further addresses of the same broker cluster (other nodes), full URLs like `url`.
    /// Every connect tries the addresses in turn, starting with the one that last worked
    /// (at first a random one, so that many hosts spread over the nodes), and moves on to
    /// the next at once when one fails; the back-off only starts when all have failed.
    pub failover_urls: Vec<String>,
    /// Topic exchange carrying all sample traffic.
    pub exchange: String,
    /// Queue from the agents to the notification service (single active consumer).
    pub raw_queue: String,
    /// Routing key of raw batches.
    pub raw_routing_key: String,
    /// Queue from the notification service to the collectors.
    pub processed_queue: String,
    /// Routing key of processed batches.
    pub processed_routing_key: String,
    /// Dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Queue that keeps dead-lettered messages for inspection.
    pub dead_letter_queue: String,
    /// `quorum` (default) or `classic`. Changing it for an existing queue requires deleting
    /// the queue first: RabbitMQ refuses a redeclaration with other arguments.
    pub queue_type: QueueType,
    /// Unacknowledged deliveries a consumer may hold (bounds consumer memory).
    pub prefetch: u16,
    /// Upper bound of the reconnect back-off, seconds.
    pub reconnect_max_secs: u64,
    /// Longest wait for a connection's AMQP handshake, seconds; then the attempt counts as
    /// failed and the back-off goes on.
    pub connect_timeout_secs: u64,
    /// With an `amqps://` URL: a PEM file of CA certificates trusted for the broker's
    /// certificate, besides the system's (`/etc/ssl/certs`). The certificate is always
    /// verified, host name included; there is no switch to skip it.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Largest AMQP frame this client accepts, bytes (the broker may lower it). The client
    /// keeps two I/O buffers of 32 frames each, so this bounds them: 128 KiB (RabbitMQ's
    /// default) costs 8 MiB per connection, 16 KiB 1 MiB. Unset: the service's default
    /// (agent-compute 16 KiB, where memory counts on every hypervisor; the broker's value
    /// for the others). A `frame_max` in `url` wins.
    pub frame_max: Option<u32>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2fvmeter".into(),
            failover_urls: Vec::new(),
            exchange: "vmeter".into(),
            raw_queue: "vmeter.samples.raw".into(),
            raw_routing_key: "sample.raw".into(),
            processed_queue: "vmeter.samples.processed".into(),
            processed_routing_key: "sample.processed".into(),
            dead_letter_exchange: "vmeter.dlx".into(),
            dead_letter_queue: "vmeter.dead".into(),
            queue_type: QueueType::Quorum,
            prefetch: 200,
            reconnect_max_secs: 30,
            connect_timeout_secs: 10,
            tls_ca_file: None,
            frame_max: None,
        }
    }
}

impl BrokerConfig {
    /// The URL with any password replaced by `***`, for logs; with failover addresses, all
    /// of them, comma-separated.
    pub fn redacted_url(&self) -> String {
        self.addresses()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `url`, then `failover_urls`: the broker's addresses in their configured order.
    pub fn addresses(&self) -> impl ExactSizeIterator<Item = &str> {
        std::iter::once(self.url.as_str())
            .chain(self.failover_urls.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .into_iter()
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `signing:` section shared by every service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// Shared HMAC-SHA256 secret; must be the same on every agent, notification and collector.
    /// Empty (and no `telemetry_secret_file`) disables signing and verification (logged
    /// loudly at start-up).
    pub telemetry_secret: String,
    /// A file holding the secret (surrounding whitespace ignored), read at start: keeps the
    /// secret out of the config file. The shipped configs point at
    /// `/etc/vmeter/telemetry_secret`, which deploy/setup.sh makes. A file that cannot be
    /// read, or is empty, is a config error.
    pub telemetry_secret_file: Option<std::path::PathBuf>,
}

impl SigningConfig {
    /// Reads `telemetry_secret_file` into `telemetry_secret` (a config error if it cannot
    /// be read, is empty, or both keys are set).
    pub fn resolve(&mut self) -> Result<(), crate::config::ConfigError> {
        let Some(path) = &self.telemetry_secret_file else {
            return Ok(());
        };
        let invalid = |message: String| crate::config::ConfigError::Invalid {
            origin: path.display().to_string(),
            key: "signing.telemetry_secret_file".into(),
            message,
        };
        if !self.telemetry_secret.is_empty() {
            return Err(invalid(
                "set either telemetry_secret or telemetry_secret_file, not both".into(),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(invalid("the file is empty".into()));
        }
        self.telemetry_secret = secret.to_string();
        Ok(())
    }

    /// Builds the signer and warns when signing is off.
    pub fn signer(&self, service: &str) -> Signer {
        let s = Signer::new(&self.telemetry_secret);
        if !s.enabled() {
            tracing::warn!(
                service,
                "signing.telemetry_secret is empty: messages are NOT signed and signatures are NOT verified."
            );
        }
        s
    }
}
