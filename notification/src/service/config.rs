//! `notification.yaml`: the service's configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmeter_core::amqp::{BrokerConfig, SigningConfig};
use vmeter_core::telemetry::LogConfig;

/// `notification.yaml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub broker: BrokerConfig,
    pub signing: SigningConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub pipeline: PipelineConfig,
    /// The sample contract checked on every sample consumed: violators are dead-lettered
    /// one by one with the rule as reason; the rest of their message goes on.
    pub contract: vmeter_core::contract::Contract,
}

vmeter_core::endpoint_config!(HttpConfig, 9102);

/// `pipeline:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// The pipeline.yaml to run.
    pub file: PathBuf,
    /// Period of the timer flush that lets time-based aggregation emit without traffic, ms.
    pub flush_interval_ms: u64,
    /// Most samples per message published to the processed queue.
    pub max_batch_samples: usize,
    /// Most deliveries processed before their outputs are published and they are acked.
    pub max_chunk_messages: usize,
    /// Where transformer state is saved on graceful shutdown and restored from at start
    /// (`null` or `""` disables; from the environment: `VMETER_PIPELINE__STATE_FILE='""'`).
    /// See [`crate::state`].
    pub state_file: Option<PathBuf>,
    /// A state file older than this is ignored at start, s.
    pub state_max_age_secs: u64,
    /// How often the pipeline file is checked for changes, s (0: only on SIGHUP).
    pub reload_check_secs: u64,
    /// Transformer state of a series (predecessor of `rate_of_change`/`delta`, cached meters
    /// of `arithmetic`) is forgotten once the series has been quiet this long, s, measured
    /// on the stream's newest timestamp; checked once a minute, counted in
    /// `vmeter_notification_state_evicted_total`. Bounds memory when resources come and go.
    pub state_ttl_secs: u64,
}

impl PipelineConfig {
    /// The state file, unless disabled.
    pub fn state_path(&self) -> Option<&std::path::Path> {
        self.state_file
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            file: "/etc/vmeter/pipeline.yaml".into(),
            flush_interval_ms: 1000,
            max_batch_samples: 1000,
            max_chunk_messages: 64,
            state_file: Some("/var/lib/vmeter/notification-state.json".into()),
            state_max_age_secs: 900,
            reload_check_secs: 5,
            state_ttl_secs: 3600,
        }
    }
}
