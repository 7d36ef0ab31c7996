//! Consume `vmeter.samples.processed`, write to PostgreSQL, ack after commit.
//!
//! A batch of deliveries (by count, sample count and time: `database.batch_max_*`) is
//! verified and decoded; what can never be stored (bad
//! signature, undecodable) is dead-lettered; the rest is written in one transaction and the
//! chunk is acked (multiple) after the commit. If PostgreSQL is down the same chunk is
//! retried with back-off and nothing is acked: the queue holds the backlog. If the database
//! rejects the data itself, the chunk is retried message by message so only the offending
//! message is dead-lettered.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use vmeter_core::Sample;
use vmeter_core::amqp::{self, Backoff, Publisher};
use vmeter_core::http::Health;
use vmeter_core::shutdown::Shutdown;
use vmeter_core::telemetry;

use crate::config::Config;
use crate::store::{Store, StoreError};

const SERVICE: &str = "collector";

/// Runs the ingest loop until shutdown.
pub async fn run(
    cfg: Config,
    mut store: Store,
    health: Health,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let signer = cfg.signing.signer(SERVICE);
    let broker_up = health.part("broker");
    let db_up = health.part("database");
    // The caller applied the migrations: the database answered a moment ago.
    db_up.store(true, Ordering::Relaxed);
    let stored = telemetry::counter(
        "vmeter_collector_samples_stored_total",
        "Samples written to PostgreSQL.",
        &[],
    );
    let dups = telemetry::counter(
        "vmeter_collector_duplicates_total",
        "Samples already stored (redeliveries), ignored.",
        &[],
    );
    let batches = telemetry::counter(
        "vmeter_collector_batches_total",
        "Transactions committed.",
        &[],
    );

    let mut decoder = vmeter_core::wire::Decoder::default();
    while !*shutdown.borrow() {
        let Some(conn) =
            amqp::connect_retrying(&cfg.broker, "vmeter-collector", &mut shutdown).await
        else {
            break;
        };
        let session = async {
            let publisher = Publisher::open(&conn, signer.clone()).await?;
            amqp::declare_topology(publisher.channel(), &cfg.broker).await?;
            let mut consumer = amqp::consume(
                &conn,
                &cfg.broker,
                &cfg.broker.processed_queue,
                &format!("collector-{}", std::process::id()),
            )
            .await?;
            broker_up.store(true, Ordering::Relaxed);
            tracing::info!(queue = %cfg.broker.processed_queue, "Consuming.");
            loop {
                let deliveries = tokio::select! {
                    biased;
                    _ = vmeter_core::shutdown::wait(&mut shutdown) => return Ok::<_, anyhow::Error>(()),
                    b = next_batch(&mut consumer, &cfg.database) => b?,
                };
                // Decoded samples of all good messages, and which range belongs to which.
                let mut all: Vec<Sample> = Vec::new();
                let mut good: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
                for (i, d) in deliveries.iter().enumerate() {
                    match amqp::open_delivery_with(&signer, &mut decoder, &d.properties, &d.data) {
                        Ok(s) => {
                            let start = all.len();
                            all.extend(s);
                            good.push((i, start..all.len()));
                        }
                        Err(e) => {
                            tracing::warn!(reason = e.reason(), error = %e, "Message can never be stored; dead-lettering it.");
                            publisher
                                .dead_letter_delivery(&cfg.broker, d, SERVICE, e.reason())
                                .await?;
                        }
                    }
                }
                let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
                loop {
                    match store.write(&all).await {
                        Ok(w) => {
                            db_up.store(true, Ordering::Relaxed);
                            stored.add(w.inserted);
                            dups.add(w.duplicates);
                            batches.inc();
                            break;
                        }
                        Err(StoreError::Transient(e)) => {
                            db_up.store(false, Ordering::Relaxed);
                            let wait = backoff.next_delay();
                            tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "PostgreSQL unavailable; nothing acked, retrying.");
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = vmeter_core::shutdown::wait(&mut shutdown) => return Ok(()),
                            }
                        }
                        Err(StoreError::Permanent(e)) => {
                            tracing::warn!(error = %e, "Batch rejected by PostgreSQL; writing message by message to isolate it.");
                            for (i, range) in &good {
                                match store.write(&all[range.clone()]).await {
                                    Ok(w) => {
                                        stored.add(w.inserted);
                                        dups.add(w.duplicates);
                                    }
                                    Err(StoreError::Permanent(e)) => {
                                        let d = &deliveries[*i];
                                        tracing::warn!(error = %e, "Message violates the schema; dead-lettering it.");
                                        publisher
                                            .dead_letter_delivery(
                                                &cfg.broker,
                                                d,
                                                SERVICE,
                                                "rejected_by_database",
                                            )
                                            .await?;
                                    }
                                    Err(StoreError::Transient(e)) => anyhow::bail!(
                                        "database failed while isolating a bad message: {e}"
                                    ),
                                }
                            }
                            break;
                        }
                    }
                }
                if let Some(last) = deliveries.last() {
                    last.acker.ack(BasicAckOptions { multiple: true }).await?;
                }
            }
        };
        let result = session.await;
        broker_up.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => {
                let _ = conn.close(200, "shutdown".into()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Broker session ended; reconnecting (unacked messages will be redelivered).");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    tracing::info!("Collector ingest stopped.");
    Ok(())
}

/// Waits for the first delivery, then collects more until `batch_max_messages` messages or
/// `batch_max_samples` samples (by the sender's `x-vmeter-samples` header) are in hand, or
/// `batch_max_wait_ms` passed since the first: large transactions under load, low latency
/// when traffic is light.
async fn next_batch(
    consumer: &mut lapin::Consumer,
    cfg: &crate::config::DatabaseConfig,
) -> anyhow::Result<Vec<Delivery>> {
    let first = match consumer.next().await {
        Some(d) => d?,
        None => anyhow::bail!("consumer cancelled by the broker"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.batch_max_wait_ms);
    let mut samples = samples_in(&first);
    let mut out = vec![first];
    while out.len() < cfg.batch_max_messages.max(1) && samples < cfg.batch_max_samples {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(d)) => {
                let d = d?;
                samples += samples_in(&d);
                out.push(d);
            }
            Ok(None) => anyhow::bail!("consumer cancelled by the broker"),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// The sample count a vmeter publisher put in the headers (1 when absent).
fn samples_in(d: &Delivery) -> usize {
    amqp::sample_count(&d.properties).unwrap_or(1).max(1)
}
