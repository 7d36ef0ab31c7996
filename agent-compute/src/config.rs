//! `agent-compute.yaml`.

use serde::{Deserialize, Serialize};
use vmeter_core::amqp::{BrokerConfig, SigningConfig};
use vmeter_core::telemetry::LogConfig;

/// The agent's configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub broker: BrokerConfig,
    pub signing: SigningConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub libvirt: LibvirtConfig,
    pub polling: PollingConfig,
    pub spool: SpoolConfig,
    /// The sample contract every resource must keep before its samples are published
    /// (docs/security.md); the timestamp window does not apply (the agent's own clock).
    pub contract: vmeter_core::contract::Contract,
}

/// `spool:` section: where batches wait while the broker is away (see `spool.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory of the spool (created if missing; kept across restarts).
    pub dir: std::path::PathBuf,
    /// Most bytes kept; beyond it the oldest batches are dropped and counted.
    pub max_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: "/var/lib/vmeter/agent-spool".into(),
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

vmeter_core::endpoint_config!(HttpConfig, 9101);

/// `libvirt:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// Connection URI, opened read-only. `demo` selects the embedded demo node (libvirt's
    /// in-process test driver with four fake domains) — never used unless asked for.
    pub uri: String,
    /// Host name reported as `resource_metadata.host` and the host resource id
    /// (default: the system's host name).
    pub host: Option<String>,
    /// Use the bulk call `virConnectGetAllDomainStats` for the stats groups the driver
    /// supports (probed per group at connect); `false` forces per-domain calls for all.
    pub bulk_stats: bool,
    /// A libvirt call (the bulk call, or one domain's per-domain calls) still running after
    /// this many seconds is abandoned: the cycle is counted in
    /// `vmeter_agent_libvirt_timeouts_total`, logged with the call and domain, and the next
    /// cycle runs on a fresh connection that skips that domain until the call returns.
    pub call_timeout_secs: f64,
    /// Re-read a domain's XML (devices, Nova metadata) at least this often, seconds; it is
    /// re-read at once when the domain restarts, changes state or its devices change.
    pub xml_refresh_secs: f64,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            uri: "qemu:///system".into(),
            host: None,
            bulk_stats: true,
            call_timeout_secs: 20.0,
            xml_refresh_secs: 300.0,
        }
    }
}

/// `polling:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollingConfig {
    /// Seconds between the starts of two polling cycles.
    pub interval_secs: f64,
    /// Upper bound of the random delay before the first cycle, seconds (drawn once at start,
    /// so a fleet restarted together spreads its load).
    pub shuffle_time_secs: f64,
    /// Most samples per published message.
    pub batch_size: usize,
    /// A Ceilometer-style polling.yaml (`sources: [{name, interval, meters}]`); when set,
    /// its sources replace `interval_secs` (one source of every meter).
    pub sources_file: Option<std::path::PathBuf>,
    /// Random delay 0..N s added to every cycle's wake-up (the schedule itself does not
    /// drift), so that hosts started together do not stay in step.
    pub jitter_secs: f64,
}

impl Default for PollingConfig {
    fn default() -> Self {
        PollingConfig {
            interval_secs: 60.0,
            shuffle_time_secs: 10.0,
            batch_size: 500,
            sources_file: None,
            jitter_secs: 0.0,
        }
    }
}

impl Config {
    /// Checks values serde cannot check.
    pub fn validate(&self) -> Result<(), String> {
        if !self.polling.interval_secs.is_finite() || self.polling.interval_secs <= 0.0 {
            return Err(format!(
                "polling.interval_secs must be > 0, got {}",
                self.polling.interval_secs
            ));
        }
        if !self.polling.shuffle_time_secs.is_finite() || self.polling.shuffle_time_secs < 0.0 {
            return Err(format!(
                "polling.shuffle_time_secs must be >= 0, got {}",
                self.polling.shuffle_time_secs
            ));
        }
        if !self.polling.jitter_secs.is_finite() || self.polling.jitter_secs < 0.0 {
            return Err(format!(
                "polling.jitter_secs must be >= 0, got {}",
                self.polling.jitter_secs
            ));
        }
        for (key, v) in [
            ("libvirt.call_timeout_secs", self.libvirt.call_timeout_secs),
            ("libvirt.xml_refresh_secs", self.libvirt.xml_refresh_secs),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return Err(format!("{key} must be > 0, got {v}"));
            }
        }
        if self.polling.batch_size == 0 {
            return Err("polling.batch_size must be > 0".into());
        }
        Ok(())
    }
}
