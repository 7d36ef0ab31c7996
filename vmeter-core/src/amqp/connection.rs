//! Connecting to the broker, with exponential back-off while it is away.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};

use super::config::BrokerConfig;
use crate::shutdown::Shutdown;

/// Why [`connect`] did not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Refused, unreachable, authentication failed, ….
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// `tls_ca_file` cannot be read.
    #[error("broker.tls_ca_file {path}: {source}")]
    CaFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The broker took the TCP connection but did not finish the AMQP handshake in time (a
    /// RabbitMQ node that is still booting does this; without a limit the caller would wait
    /// forever: seen as a notification service that never reconnected after a broker restart).
    #[error("no AMQP handshake within {0:?} (the broker may still be starting)")]
    Timeout(Duration),
}

/// Opens a connection named `name` (visible in `rabbitmqctl list_connections`), giving up
/// after `connect_timeout_secs`.
pub async fn connect(cfg: &BrokerConfig, name: &str) -> Result<Connection, ConnectError> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    let parsed = cfg.url.parse::<lapin::uri::AMQPUri>();
    let limit = Duration::from_secs(cfg.connect_timeout_secs.max(1));
    let tls = match &cfg.tls_ca_file {
        Some(path) => OwnedTLSConfig {
            identity: None,
            cert_chain: Some(std::fs::read_to_string(path).map_err(|source| {
                ConnectError::CaFile {
                    path: path.clone(),
                    source,
                }
            })?),
        },
        None => OwnedTLSConfig::default(),
    };
    let connecting = async {
        let runtime = lapin::runtime::default_runtime()?;
        match (cfg.frame_max, parsed) {
            (Some(frame_max), Ok(mut uri)) => {
                uri.query.frame_max.get_or_insert(frame_max);
                Connection::connect_uri_with_config(uri, props, tls, runtime).await
            }
            // Unset, or a URL that does not parse (lapin says why).
            _ => Connection::connect_with_config(&cfg.url, props, tls, runtime).await,
        }
    };
    match tokio::time::timeout(limit, connecting).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnectError::Timeout(limit)),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that takes TCP connections and never says a word, as a booting RabbitMQ
    /// node can: the attempt must end at the limit, not hang. On tokio's paused clock the
    /// limit passes as soon as nothing else can run.
    #[tokio::test(start_paused = true)]
    async fn a_broker_that_never_answers_the_handshake_times_out() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = BrokerConfig {
            url: format!("amqp://u:p@{}/%2f", silent.local_addr().unwrap()),
            connect_timeout_secs: 7,
            ..Default::default()
        };
        let started = tokio::time::Instant::now();
        let e = connect(&cfg, "test").await.unwrap_err();
        assert!(
            matches!(e, ConnectError::Timeout(d) if d == Duration::from_secs(7)),
            "{e}"
        );
        assert_eq!(started.elapsed().as_secs(), 7);
        drop(silent);
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let bases = [500u64, 1000, 2000, 4000, 4000, 4000];
        for base in bases {
            let d = b.next_delay().as_secs_f64() * 1000.0;
            let base = base as f64;
            assert!(
                d >= base * 0.8 - 1e-6 && d <= base * 1.2 + 1e-6,
                "{d} vs {base}"
            );
        }
        b.reset();
        let d = b.next_delay().as_millis();
        assert!((400..=600).contains(&d), "{d}");
    }
}
