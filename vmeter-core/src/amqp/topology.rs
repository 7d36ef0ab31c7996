//! Declaring the exchanges and queues (idempotent, by every service at start-up).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use super::config::{BrokerConfig, QueueType};
use super::publisher::Publisher;
use crate::signing::Signer;

pub(super) fn queue_args(cfg: &BrokerConfig, single_active: bool, dead_letter: bool) -> FieldTable {
    let mut args = FieldTable::default();
    if cfg.queue_type == QueueType::Quorum {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
    }
    if single_active {
        args.insert(
            ShortString::from("x-single-active-consumer"),
            AMQPValue::Boolean(true),
        );
    }
    if dead_letter {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(cfg.dead_letter_exchange.clone().into()),
        );
    }
    args
}

/// Declares exchanges, queues and bindings (idempotent).
pub async fn declare_topology(ch: &Channel, cfg: &BrokerConfig) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        cfg.exchange.as_str().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        cfg.dead_letter_exchange.as_str().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    let q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(
        cfg.raw_queue.as_str().into(),
        q,
        queue_args(cfg, true, true),
    )
    .await?;
    ch.queue_declare(
        cfg.processed_queue.as_str().into(),
        q,
        queue_args(cfg, false, true),
    )
    .await?;
    ch.queue_declare(
        cfg.dead_letter_queue.as_str().into(),
        q,
        queue_args(cfg, false, false),
    )
    .await?;
    let bind = |queue: &str, exchange: &str, key: &str| {
        let (queue, exchange, key) = (
            ShortString::from(queue),
            ShortString::from(exchange),
            ShortString::from(key),
        );
        async move {
            ch.queue_bind(
                queue,
                exchange,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
    };
    bind(&cfg.raw_queue, &cfg.exchange, &cfg.raw_routing_key).await?;
    bind(
        &cfg.processed_queue,
        &cfg.exchange,
        &cfg.processed_routing_key,
    )
    .await?;
    bind(&cfg.dead_letter_queue, &cfg.dead_letter_exchange, "#").await?;
    Ok(())
}

/// Opens a publisher for a producer that may lack the right to declare (an agent's broker
/// user can publish raw samples and nothing else): declares the topology when the broker
/// allows it, else checks passively, on a fresh channel, that the exchange exists. A
/// producer then publishes into the topology the control host's services declared; until
/// they did, its mandatory publishes come back unroutable and it spools.
pub async fn open_producer(
    conn: &Connection,
    signer: Signer,
    cfg: &BrokerConfig,
) -> Result<Publisher, lapin::Error> {
    let p = Publisher::open(conn, signer.clone()).await?;
    match declare_topology(p.channel(), cfg).await {
        Ok(()) => Ok(p),
        Err(e) => {
            tracing::debug!(error = %e, "Not allowed to declare the topology; checking that the exchange exists.");
            let p = Publisher::open(conn, signer).await?;
            p.channel()
                .exchange_declare(
                    cfg.exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok(p)
        }
    }
}
