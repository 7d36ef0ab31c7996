//! The notification service: consume `vmeter.samples.raw` as its single active consumer,
//! run the pipelines, publish to `vmeter.samples.processed` with confirms, then ack.
//!
//! Delivery rule: a chunk of deliveries is acked (multiple) only after every output it caused
//! was confirmed by the broker. Outputs that could not be confirmed are kept and published
//! first after reconnecting; the unacked inputs then come back redelivered, and the
//! transformers recognise them by `message_id` (no double rates), while pass-through copies
//! carry their original ids and are dropped by the collector's dedup.
//!
//! Where things are: this file runs the consume loop; `config.rs` is `notification.yaml`;
//! `publish.rs` routes, signs and publishes outputs; `reload.rs` restores state at start and
//! reloads `pipeline.yaml`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use lapin::options::BasicAckOptions;
use vmeter_core::Sample;
use vmeter_core::amqp::{self, PublishError, Publisher};
use vmeter_core::http::Health;
use vmeter_core::shutdown::Shutdown;
use vmeter_core::telemetry;
use vmeter_core::wire::Decoder;

use crate::definition::PipelineDef;
use crate::pipeline::Runtime;
use crate::state;
use cadence::Cadence;
use publish::{publish_outputs, route};
use reload::{apply_reload, restore_state, spawn_reload_watcher};

mod cadence;
mod config;
mod publish;
mod reload;

pub use config::{Config, HttpConfig, PipelineConfig};

const SERVICE: &str = "notification";

/// Counters of this service (handles cached at start).
struct Metrics {
    messages_in: telemetry::Counter,
    samples_in: telemetry::Counter,
    samples_out: telemetry::Counter,
    dead_lettered: telemetry::Counter,
    evicted: telemetry::Counter,
    /// From a chunk of messages in hand to its outputs confirmed and its inputs acked, s.
    chunk_seconds: telemetry::Histogram,
}

impl Metrics {
    fn new() -> Self {
        Metrics {
            messages_in: telemetry::counter(
                "vmeter_notification_messages_total",
                "Raw messages consumed.",
                &[],
            ),
            samples_in: telemetry::counter(
                "vmeter_notification_samples_in_total",
                "Samples received from agents.",
                &[],
            ),
            samples_out: telemetry::counter(
                "vmeter_notification_samples_out_total",
                "Samples published to the processed queue.",
                &[],
            ),
            dead_lettered: telemetry::counter(
                "vmeter_notification_dead_lettered_total",
                "Messages sent to the dead-letter queue.",
                &[],
            ),
            evicted: telemetry::counter(
                "vmeter_notification_state_evicted_total",
                "Series whose transformer state was forgotten after pipeline.state_ttl_secs of quiet.",
                &[],
            ),
            chunk_seconds: telemetry::histogram(
                "vmeter_notification_chunk_seconds",
                "From a chunk of raw messages in hand to its outputs confirmed and its messages acked.",
                &[],
                telemetry::Buckets::Latency,
            ),
        }
    }
}

/// Runs until shutdown. Returns an error only for what retrying cannot fix.
pub async fn run(
    cfg: Config,
    def: Arc<PipelineDef>,
    health: Health,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let signer = cfg.signing.signer(SERVICE);
    let metrics = Metrics::new();
    let broker_up = health.part("broker");
    let mut rt = Runtime::new(def.clone());
    let mut decoder = Decoder::default();
    // Long-lived, as the decoder: each resource's metadata is walked once, not per message.
    let mut checker = vmeter_core::contract::Checker::new(&cfg.contract);
    let mut pending: Vec<Sample> = Vec::new();
    let flush_every = Duration::from_millis(cfg.pipeline.flush_interval_ms.max(10));
    if let Some(path) = cfg.pipeline.state_path() {
        restore_state(path, &cfg, &mut rt, &mut pending);
    }
    let mut reloads = spawn_reload_watcher(&cfg.pipeline, def, shutdown.clone());
    let state_ttl = chrono::Duration::seconds(
        i64::try_from(cfg.pipeline.state_ttl_secs)
            .unwrap_or(i64::MAX / 1000)
            .min(i64::MAX / 1000),
    );
    let mut cadence = Cadence::new(flush_every);

    let session = async |conn: &lapin::Connection,
                         publisher: &Publisher,
                         shutdown: &mut Shutdown|
           -> anyhow::Result<()> {
        // Outputs left over from a broken connection go first.
        publish_outputs(publisher, &signer, &cfg, &mut pending, &metrics).await?;
        let consumer = amqp::consume(
            conn,
            &cfg.broker,
            &cfg.broker.raw_queue,
            &format!("notification-{}", std::process::id()),
        )
        .await?;
        broker_up.store(true, Ordering::Relaxed);
        tracing::info!(queue = %cfg.broker.raw_queue, "Consuming (single active consumer; a second instance waits as hot standby).");
        let mut chunks = consumer.ready_chunks(cfg.pipeline.max_chunk_messages.max(1));
        cadence.restart();
        loop {
            tokio::select! {
                biased;
                _ = vmeter_core::shutdown::wait(shutdown) => return Ok::<_, anyhow::Error>(()),
                chunk = chunks.next() => {
                    let Some(chunk) = chunk else { anyhow::bail!("consumer cancelled by the broker") };
                    let started = std::time::Instant::now();
                    let deliveries: Vec<lapin::message::Delivery> =
                        chunk.into_iter().collect::<Result<_, _>>()?;
                    for d in &deliveries {
                        metrics.messages_in.inc();
                        // Verifying and decoding on worker threads was measured slower
                        // (cross-thread frees of every sample); see docs/performance.md.
                        match amqp::open_delivery_with(&signer, &mut decoder, &d.properties, &d.data) {
                            Ok(samples) => {
                                metrics.samples_in.add(samples.len() as u64);
                                let now = Utc::now();
                                let samples = keep_contract(&cfg, &mut checker, publisher, d, samples, now).await?;
                                let em = rt.publish_context(samples, now);
                                route(&rt, em, &mut pending);
                                report_drops(&mut rt);
                            }
                            Err(e) => {
                                tracing::warn!(reason = e.reason(), error = %e, "Message can never be processed; dead-lettering it.");
                                publisher.dead_letter_delivery(&cfg.broker, d, SERVICE, e.reason()).await?;
                                metrics.dead_lettered.inc();
                            }
                        }
                    }
                    let last = deliveries.last().map(|d| &d.acker);
                    publish_outputs(publisher, &signer, &cfg, &mut pending, &metrics).await?;
                    if let Some(acker) = last {
                        // A crash here: outputs confirmed, inputs not acked.
                        fail::fail_point!("notification-before-ack", |_| std::process::abort());
                        acker.ack(BasicAckOptions { multiple: true }).await?;
                    }
                    metrics.chunk_seconds.observe_since(started);
                }
                tick = cadence.tick() => {
                    if tick.evict {
                        let n = rt.evict_quiet(state_ttl, Utc::now());
                        if n > 0 {
                            metrics.evicted.add(n as u64);
                            tracing::info!(series = n, "Forgot the transformer state of quiet series.");
                        }
                    }
                    let em = rt.flush(Utc::now());
                    route(&rt, em, &mut pending);
                    report_drops(&mut rt);
                    publish_outputs(publisher, &signer, &cfg, &mut pending, &metrics).await?;
                }
                Ok(()) = reloads.changed() => {
                    let new = reloads.borrow_and_update().clone();
                    apply_reload(&mut rt, new);
                }
            }
        }
    };
    amqp::run_sessions(
        &cfg.broker,
        "vmeter-notification",
        &signer,
        &broker_up,
        &mut shutdown,
        session,
    )
    .await;
    if let Some(path) = cfg.pipeline.state_path() {
        let saved = state::Saved {
            format: state::FORMAT,
            saved_at: Utc::now(),
            sinks: rt.snapshot(),
            pending: std::mem::take(&mut pending),
        };
        match state::save(path, &saved) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                unpublished = saved.pending.len(),
                "Transformer state saved for the next start."
            ),
            Err(e) => {
                tracing::error!(error = %e, "Could not save transformer state; the next start begins without predecessors.")
            }
        }
    } else if !pending.is_empty() {
        telemetry::dropped(SERVICE, telemetry::DropReason::UnpublishedAtShutdown)
            .add(pending.len() as u64);
        tracing::warn!(
            samples = pending.len(),
            "Stopped with unpublished outputs and no state_file configured: they are lost."
        );
    }
    tracing::info!("Notification service stopped.");
    Ok(())
}

/// The samples of one delivery that keep the sample contract; the others are dead-lettered
/// (confirmed, counted as dropped) grouped by rule, before the delivery can be acked.
async fn keep_contract(
    cfg: &Config,
    checker: &mut vmeter_core::contract::Checker<'_>,
    publisher: &Publisher,
    d: &lapin::message::Delivery,
    samples: Vec<Sample>,
    now: chrono::DateTime<Utc>,
) -> Result<Vec<Sample>, PublishError> {
    let (good, bad) = checker.partition(samples, now);
    publisher
        .dead_letter_violations(&cfg.broker, d.routing_key.as_str(), &bad, SERVICE)
        .await?;
    Ok(good)
}

fn report_drops(rt: &mut Runtime) {
    // One counter update per reason and message, not per sample (the registry is locked).
    let mut counts: Vec<(telemetry::DropReason, u64)> = Vec::new();
    for d in rt.take_drops() {
        match counts.iter_mut().find(|(r, _)| *r == d.reason) {
            Some((_, n)) => *n += 1,
            None => counts.push((d.reason, 1)),
        }
        if d.reason.is_expected() {
            tracing::debug!(reason = %d.reason, detail = %d.detail, "Sample not transformed.");
        } else {
            tracing::warn!(reason = %d.reason, detail = %d.detail, "Sample dropped.");
        }
    }
    for (reason, n) in counts {
        telemetry::dropped(SERVICE, reason).add(n);
    }
}
