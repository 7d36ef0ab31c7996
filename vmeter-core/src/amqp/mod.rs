//! RabbitMQ: topology, connection with back-off, a confirming publisher, and the checks every
//! consumer applies to a delivery (signature, format, decode).
//!
//! Topology (names configurable, see [`BrokerConfig`]):
//! - `vmeter` durable topic exchange;
//! - `vmeter.samples.raw` (bound `sample.raw`, single active consumer) and
//!   `vmeter.samples.processed` (bound `sample.processed`), quorum queues by default, both
//!   dead-lettering into `vmeter.dlx`;
//! - `vmeter.dlx` topic exchange → `vmeter.dead` (bound `#`): messages that can never be
//!   processed, kept for inspection with an [`DEAD_REASON_HEADER`](crate::wire::DEAD_REASON_HEADER).
//!
//! Every service declares the whole topology at start-up; declarations are idempotent.

mod config;
mod connection;
mod delivery;
mod publisher;
mod session;
mod topology;

pub use config::{BrokerConfig, QueueType, SigningConfig, redact_url};
pub use connection::{Backoff, ConnectError, connect, connect_retrying};
pub use delivery::{Undeliverable, consume, open_delivery, open_delivery_with, sample_count};
pub use publisher::{Pending, Prepared, Publisher, count_header, prepare};
pub use session::run_sessions;
pub use topology::{declare_topology, open_producer};

/// Errors of one publish.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Connection or channel failure; retry after reconnecting.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused to take responsibility for the message.
    #[error("broker nacked the message")]
    Nacked,
    /// The message was unroutable (no queue bound) and came back.
    #[error("message returned by the broker: {code} {text}")]
    Returned { code: u16, text: String },
    /// Confirms were not enabled on the channel (a programming error).
    #[error("publisher confirms are not enabled on this channel")]
    NotConfirmed,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable};

    use super::*;
    use crate::signing::Signer;
    use crate::wire;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2fvmeter"),
            "amqp://guest:***@127.0.0.1:5672/%2fvmeter"
        );
        assert_eq!(
            redact_url("postgres://vmeter@h/db"),
            "postgres://vmeter@h/db"
        );
        assert_eq!(redact_url("amqp://h"), "amqp://h");
    }

    #[test]
    fn backoff_doubles_to_max_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert!((80..=120).contains(&d[0]), "{d:?}");
        assert!((160..=240).contains(&d[1]), "{d:?}");
        assert!(
            (320..=480).contains(&d[2]) && (320..=480).contains(&d[4]),
            "{d:?}"
        );
        b.reset();
        assert!(b.next_delay().as_millis() <= 120);
    }

    #[test]
    fn open_delivery_checks_signature_then_format() {
        let signer = Signer::new("s");
        let body = wire::encode(&[]);
        let mut h = FieldTable::default();
        h.insert(
            "x-vmeter-signature".into(),
            AMQPValue::LongString(signer.sign(&body).unwrap().into()),
        );
        h.insert("x-vmeter-format".into(), AMQPValue::LongLongInt(1));
        let props = BasicProperties::default().with_headers(h.clone());
        assert!(open_delivery(&signer, &props, &body).unwrap().is_empty());
        let e = open_delivery(&Signer::new("other"), &props, &body).unwrap_err();
        assert_eq!(e.reason(), "signature_mismatch");
        let e = open_delivery(&signer, &BasicProperties::default(), &body).unwrap_err();
        assert_eq!(e.reason(), "signature_missing");
        h.insert("x-vmeter-format".into(), AMQPValue::LongLongInt(9));
        let e =
            open_delivery(&signer, &BasicProperties::default().with_headers(h), &body).unwrap_err();
        assert_eq!(e.reason(), "unsupported_format");
        let e = open_delivery(&Signer::new(""), &BasicProperties::default(), b"\xc1").unwrap_err();
        assert_eq!(e.reason(), "undecodable");
    }
}
