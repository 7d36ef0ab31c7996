//! Connecting to the broker, with exponential back-off while it is away.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};

use std::sync::atomic::{AtomicUsize, Ordering};

use super::config::{BrokerConfig, redact_url};
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

/// Where the next [`connect`] starts among a broker's addresses: the index of the one that
/// last worked; `usize::MAX` until the first connect picks one at random. One per process:
/// a service's connections (consumer, API publisher) follow the same node.
static PREFERRED: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Opens a connection named `name` (visible in `rabbitmqctl list_connections`) to the first
/// of the broker's addresses ([`BrokerConfig::addresses`]) that answers, starting with the
/// one that last worked and going round once. Each address gets `connect_timeout_secs`; an
/// address that refuses costs nothing, so a dead cluster node only delays a connect when it
/// black-holes the connection. The error is the last address's, after every failure was
/// logged with its address.
pub async fn connect(cfg: &BrokerConfig, name: &str) -> Result<Connection, ConnectError> {
    let addresses: Vec<&str> = cfg.addresses().collect();
    let n = addresses.len();
    let first = match PREFERRED.load(Ordering::Relaxed) {
        usize::MAX => fastrand::usize(..n),
        i => i % n,
    };
    let mut last = None;
    for k in 0..n {
        let at = (first + k) % n;
        match connect_one(cfg, addresses[at], name).await {
            Ok(c) => {
                PREFERRED.store(at, Ordering::Relaxed);
                if n > 1 {
                    tracing::info!(address = %redact_url(addresses[at]), "Connected to broker node {} of {n}.", at + 1);
                }
                return Ok(c);
            }
            Err(e) => {
                if n > 1 {
                    tracing::warn!(address = %redact_url(addresses[at]), error = %e, "Broker node unreachable; trying the next.");
                }
                if matches!(e, ConnectError::CaFile { .. }) {
                    return Err(e);
                }
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one address"))
}

/// One attempt at one address.
async fn connect_one(
    cfg: &BrokerConfig,
    url: &str,
    name: &str,
) -> Result<Connection, ConnectError> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    let parsed = url.parse::<lapin::uri::AMQPUri>();
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
            _ => Connection::connect_with_config(url, props, tls, runtime).await,
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

    /// Two addresses, one refusing and one silent: each is tried once per connect (one
    /// round, whichever comes first), the refusal costs no time, the silent one its limit
    /// (1 s). On the real clock: a refusal is real I/O, which a paused clock would time out.
    #[tokio::test]
    async fn a_connect_tries_every_address_once() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refused_addr = refused.local_addr().unwrap();
        drop(refused);
        let cfg = BrokerConfig {
            url: format!("amqp://u:p@{refused_addr}/%2f"),
            failover_urls: vec![format!("amqp://u:p@{}/%2f", silent.local_addr().unwrap())],
            connect_timeout_secs: 1,
            ..Default::default()
        };
        for _ in 0..3 {
            let started = std::time::Instant::now();
            connect(&cfg, "test").await.unwrap_err();
            let took = started.elapsed().as_secs_f64();
            // Both addresses timed out would be 2 s; the silent one not tried, under 1 s.
            assert!((1.0..1.9).contains(&took), "{took} s");
        }
        assert_eq!(
            cfg.redacted_url(),
            format!(
                "amqp://u:***@{refused_addr}/%2f,amqp://u:***@{}/%2f",
                silent.local_addr().unwrap()
            )
        );
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
