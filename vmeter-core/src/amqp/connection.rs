//! Connecting to the broker, with exponential back-off while it is away.

use std::time::Duration;

use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};

use super::config::BrokerConfig;
use crate::shutdown::Shutdown;

/// Opens a connection named `name` (visible in `rabbitmqctl list_connections`).
pub async fn connect(cfg: &BrokerConfig, name: &str) -> Result<Connection, lapin::Error> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    let parsed = cfg.url.parse::<lapin::uri::AMQPUri>();
    match (cfg.frame_max, parsed) {
        (Some(frame_max), Ok(mut uri)) => {
            uri.query.frame_max.get_or_insert(frame_max);
            Connection::connect_uri(uri, props).await
        }
        // Unset, or a URL that does not parse (lapin says why).
        _ => Connection::connect(&cfg.url, props).await,
    }
}

/// Connects, retrying with exponential back-off (0.5 s doubling up to `reconnect_max_secs`,
/// ±20 % jitter) and logging each failure. `None` if shutdown was requested meanwhile.
pub async fn connect_retrying(
    cfg: &BrokerConfig,
    name: &str,
    shutdown: &mut Shutdown,
) -> Option<Connection> {
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(cfg.reconnect_max_secs.max(1)),
    );
    loop {
        if *shutdown.borrow() {
            return None;
        }
        match connect(cfg, name).await {
            Ok(c) => {
                tracing::info!(url = %cfg.redacted_url(), "Connected to the broker.");
                return Some(c);
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(url = %cfg.redacted_url(), error = %e, retry_in_ms = wait.as_millis() as u64, "Broker unreachable; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::shutdown::wait(shutdown) => return None,
                }
            }
        }
    }
}

/// Exponential back-off with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            next: initial,
            initial,
            max,
        }
    }
    /// The delay to wait now (with ±20 % jitter); the following one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.8 + 0.4 * fastrand::f64())
    }
    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}
