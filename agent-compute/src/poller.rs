//! The polling loop: a dedicated thread owns the libvirt connection (libvirt calls block),
//! the async side schedules cycles and publishes.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use vmeter_core::amqp::{self, Backoff, Publisher};
use vmeter_core::http::Health;
use vmeter_core::shutdown::Shutdown;
use vmeter_core::{Sample, telemetry};

use crate::config::Config;
use crate::inspector::{CycleStats, Inspector};

type PollReply = oneshot::Sender<Result<(Vec<Sample>, CycleStats), String>>;

/// Starts the libvirt thread; each request runs one cycle. The thread reconnects with
/// back-off when the connection is down (including libvirtd not up yet at start).
pub fn spawn_libvirt_thread(uri: String, host: String) -> mpsc::Sender<PollReply> {
    let (tx, mut rx) = mpsc::channel::<PollReply>(1);
    std::thread::Builder::new()
        .name("libvirt".into())
        .spawn(move || {
            virt::error::clear_error_callback();
            let mut inspector: Option<Inspector> = None;
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
            while let Some(reply) = rx.blocking_recv() {
                if inspector.as_ref().is_some_and(|i| !i.alive()) {
                    tracing::warn!(%uri, "libvirt connection lost; reopening.");
                    inspector = None;
                }
                if inspector.is_none() {
                    match Inspector::open(&uri, host.clone()) {
                        Ok(i) => {
                            tracing::info!(%uri, "Connected to libvirt (read-only).");
                            backoff.reset();
                            inspector = Some(i);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(format!("cannot open {uri}: {e}")));
                            std::thread::sleep(backoff.next_delay());
                            continue;
                        }
                    }
                }
                let result = inspector.as_mut().expect("opened above").poll();
                if result.is_err() {
                    inspector = None;
                }
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
        })
        .expect("spawn libvirt thread");
    tx
}

/// Runs polling and publishing until shutdown.
pub async fn run(
    cfg: Config,
    uri: String,
    host: String,
    health: Health,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let signer = cfg.signing.signer("agent-compute");
    let libvirt = spawn_libvirt_thread(uri, host);
    let libvirt_up = health.part("libvirt");
    let broker_up = health.part("broker");
    let cycles = telemetry::counter(
        "vmeter_agent_cycles_total",
        "Polling cycles completed.",
        &[],
    );
    let polled = telemetry::counter(
        "vmeter_agent_samples_polled_total",
        "Samples produced by polling.",
        &[],
    );
    let published = telemetry::counter(
        "vmeter_agent_samples_published_total",
        "Samples confirmed by the broker.",
        &[],
    );
    let pending_gauge = telemetry::gauge(
        "vmeter_agent_pending_samples",
        "Samples waiting for the broker.",
        &[],
    );
    let cycle_ms = telemetry::gauge(
        "vmeter_agent_last_cycle_ms",
        "Duration of the last libvirt polling cycle, ms.",
        &[],
    );

    // Random start delay, drawn once.
    let delay = Duration::from_secs_f64(cfg.polling.shuffle_time_secs * fastrand::f64());
    tracing::info!(
        delay_ms = delay.as_millis() as u64,
        interval_secs = cfg.polling.interval_secs,
        "Polling starts after the random start delay."
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = vmeter_core::shutdown::wait(&mut shutdown) => return Ok(()),
    }
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(cfg.polling.interval_secs));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: VecDeque<Sample> = VecDeque::new();
    let mut publisher: Option<(lapin::Connection, Publisher)> = None;
    let mut broker_backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(cfg.broker.reconnect_max_secs.max(1)),
    );
    let mut next_broker_try = tokio::time::Instant::now();

    loop {
        tokio::select! {
            biased;
            _ = vmeter_core::shutdown::wait(&mut shutdown) => break,
            _ = ticker.tick() => {}
        }
        let (tx, rx) = oneshot::channel();
        let started = std::time::Instant::now();
        if libvirt.send(tx).await.is_err() {
            anyhow::bail!("libvirt thread stopped");
        }
        match rx.await {
            Ok(Ok((samples, stats))) => {
                libvirt_up.store(true, Ordering::Relaxed);
                cycles.inc();
                polled.add(samples.len() as u64);
                cycle_ms.set(started.elapsed().as_millis() as i64);
                tracing::debug!(
                    domains = stats.domains,
                    skipped = stats.skipped,
                    samples = stats.samples,
                    ms = started.elapsed().as_millis() as u64,
                    "Cycle done."
                );
                pending.extend(samples);
            }
            Ok(Err(e)) => {
                libvirt_up.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "Polling cycle failed; retrying next cycle.");
            }
            Err(_) => anyhow::bail!("libvirt thread stopped"),
        }
        let overflow = pending
            .len()
            .saturating_sub(cfg.polling.max_pending_samples);
        if overflow > 0 {
            pending.drain(..overflow);
            for _ in 0..overflow {
                telemetry::counter(
                    "vmeter_samples_dropped_total",
                    "Samples dropped, by service and reason.",
                    &[("service", "agent-compute"), ("reason", "pending_full")],
                )
                .inc();
            }
            tracing::warn!(
                dropped = overflow,
                "Broker away too long: pending buffer full, oldest samples dropped."
            );
        }

        // Publish what is pending, oldest first; on failure keep it for the next cycle.
        if publisher.is_none() && tokio::time::Instant::now() >= next_broker_try {
            match amqp::connect(&cfg.broker, "vmeter-agent-compute").await {
                Ok(conn) => match Publisher::open(&conn, signer.clone()).await {
                    Ok(p) => match amqp::declare_topology(p.channel(), &cfg.broker).await {
                        Ok(()) => {
                            tracing::info!(url = %cfg.broker.redacted_url(), "Connected to the broker.");
                            broker_backoff.reset();
                            publisher = Some((conn, p));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Declaring the broker topology failed.")
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "Opening a channel failed."),
                },
                Err(e) => {
                    let wait = broker_backoff.next_delay();
                    next_broker_try = tokio::time::Instant::now() + wait;
                    tracing::warn!(url = %cfg.broker.redacted_url(), error = %e, pending = pending.len(), "Broker unreachable; samples kept in memory.");
                }
            }
        }
        if let Some((_, p)) = &publisher {
            match publish_all(p, &cfg, &mut pending).await {
                Ok(n) => {
                    broker_up.store(true, Ordering::Relaxed);
                    published.add(n as u64);
                }
                Err(e) => {
                    broker_up.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, pending = pending.len(), "Publishing failed; will retry.");
                    publisher = None;
                }
            }
        }
        pending_gauge.set(pending.len() as i64);
    }
    if let Some((conn, p)) = publisher {
        let _ = publish_all(&p, &cfg, &mut pending).await;
        let _ = conn.close(200, "shutdown".into()).await;
    }
    if !pending.is_empty() {
        tracing::warn!(lost = pending.len(), "Stopped with unpublished samples.");
    }
    Ok(())
}

/// Sends pending samples in batches, waits for all confirms, removes what was confirmed.
async fn publish_all(
    p: &Publisher,
    cfg: &Config,
    pending: &mut VecDeque<Sample>,
) -> Result<usize, amqp::PublishError> {
    let samples: Vec<Sample> = pending.iter().cloned().collect();
    let mut confirms = Vec::new();
    for chunk in samples.chunks(cfg.polling.batch_size) {
        confirms.push((
            chunk.len(),
            p.send_batch(&cfg.broker.exchange, &cfg.broker.raw_routing_key, chunk)
                .await?,
        ));
    }
    let mut done = 0;
    for (n, c) in confirms {
        c.confirmed().await?;
        pending.drain(..n);
        done += n;
    }
    Ok(done)
}
