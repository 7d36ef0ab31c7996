//! The polling loop: a dedicated thread owns the libvirt connection (libvirt calls block),
//! the async side schedules cycles and publishes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vmeter_core::amqp::{self, Backoff, Publisher};
use vmeter_core::http::Health;
use vmeter_core::shutdown::Shutdown;
use vmeter_core::telemetry;

use crate::config::Config;
use crate::inspector::Options;
use crate::sources::PollingSource;
use crate::spool::Spool;
use libvirt::record_reads;
use outbox::{Outbox, drain_spool};

mod libvirt;
mod outbox;
mod schedule;

pub use libvirt::{Cycle, Libvirt, Next, Outcome};
pub use schedule::Schedule;

/// Which meters a cycle keeps (those of the sources due now), by meter name.
pub type KeepFn = Box<dyn Fn(&str) -> bool + Send>;

/// Runs polling and publishing until shutdown.
pub async fn run(
    cfg: Config,
    sources: Vec<PollingSource>,
    uri: String,
    host: String,
    health: Health,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let signer = cfg.signing.signer("agent-compute");
    let mut libvirt = Libvirt::start(
        uri,
        Options {
            host,
            bulk: cfg.libvirt.bulk_stats,
            xml_refresh: Duration::from_secs_f64(cfg.libvirt.xml_refresh_secs),
            contract: cfg.contract.clone(),
        },
        Duration::from_secs_f64(cfg.libvirt.call_timeout_secs),
    );
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
    let spool_batches = telemetry::gauge(
        "vmeter_agent_spool_batches",
        "Batches waiting in the on-disk spool for the broker.",
        &[],
    );
    let spool_bytes = telemetry::gauge(
        "vmeter_agent_spool_bytes",
        "Bytes in the on-disk spool.",
        &[],
    );
    let cycle_ms = telemetry::gauge(
        "vmeter_agent_last_cycle_ms",
        "Duration of the last libvirt polling cycle, ms.",
        &[],
    );
    let cycle_seconds = telemetry::histogram(
        "vmeter_agent_cycle_seconds",
        "Time of each complete polling cycle: libvirt calls and encoding, its batches handed to the publisher or the spool.",
        &[],
        telemetry::Buckets::Latency,
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
    // Each source has its own schedule on a fixed grid from the first cycle; a cycle polls
    // libvirt once and keeps the samples of the sources that are due.
    let sources = Arc::new(sources);
    let mut schedule = Schedule::new(
        sources.iter().map(|s| s.interval).collect(),
        tokio::time::Instant::now(),
    );
    for s in sources.iter() {
        tracing::info!(source = %s.name, interval_secs = s.interval.as_secs_f64(), "Polling source.");
    }
    let mut spool = Spool::open(&cfg.spool.dir, cfg.spool.max_bytes)
        .map_err(|e| anyhow::anyhow!("spool.dir: {e}"))?;
    if !spool.is_empty() {
        tracing::info!(
            batches = spool.len(),
            samples = spool.samples(),
            dir = %cfg.spool.dir.display(),
            "Spooled batches from before the restart will be sent first."
        );
    }
    let mut publisher: Option<(lapin::Connection, Publisher)> = None;
    let mut broker_backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(cfg.broker.reconnect_max_secs.max(1)),
    );
    let mut next_broker_try = tokio::time::Instant::now();

    loop {
        let jitter = Duration::from_secs_f64(cfg.polling.jitter_secs * fastrand::f64());
        tokio::select! {
            biased;
            _ = vmeter_core::shutdown::wait(&mut shutdown) => break,
            _ = tokio::time::sleep_until(schedule.next() + jitter) => {}
        }
        let active = schedule.take_due(tokio::time::Instant::now());
        // Reach the broker first (when down and its back-off allows), so that fresh
        // batches can go straight out as the libvirt thread produces them.
        if publisher.is_none() && tokio::time::Instant::now() >= next_broker_try {
            match amqp::connect(&cfg.broker, "vmeter-agent-compute").await {
                Ok(conn) => match amqp::open_producer(&conn, signer.clone(), &cfg.broker).await {
                    Ok(p) => {
                        tracing::info!(url = %cfg.broker.redacted_url(), "Connected to the broker.");
                        broker_backoff.reset();
                        publisher = Some((conn, p));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "The broker's exchange is not there (or not visible to this user); batches go to the spool.")
                    }
                },
                Err(e) => {
                    let wait = broker_backoff.next_delay();
                    next_broker_try = tokio::time::Instant::now() + wait;
                    tracing::warn!(url = %cfg.broker.redacted_url(), error = %e, spooled = spool.len(), "Broker unreachable; batches go to the on-disk spool.");
                }
            }
        }

        let started = std::time::Instant::now();
        let keep = keep_due(sources.clone(), active.clone());
        let mut out = Outbox::new(&cfg, &mut spool, &mut publisher, &published, &broker_up);
        match libvirt.start_cycle(keep, cfg.polling.batch_size).await {
            Err(e) => anyhow::bail!("{e}"),
            Ok(mut cycle) => loop {
                match libvirt.next(&mut cycle).await {
                    Next::Batch(body, n) => out.deliver(body, n).await,
                    Next::Done(Outcome::Done(stats)) => {
                        libvirt_up.store(true, Ordering::Relaxed);
                        cycles.inc();
                        polled.add(stats.samples as u64);
                        cycle_ms.set(started.elapsed().as_millis() as i64);
                        cycle_seconds.observe_since(started);
                        record_reads(&stats);
                        tracing::debug!(
                            domains = stats.domains,
                            skipped = stats.skipped,
                            quarantined = stats.quarantined,
                            xml_reads = stats.xml_reads,
                            samples = stats.samples,
                            ms = started.elapsed().as_millis() as u64,
                            "Cycle done."
                        );
                        break;
                    }
                    Next::Done(Outcome::Failed(e)) => {
                        libvirt_up.store(false, Ordering::Relaxed);
                        tracing::warn!(error = %e, "Polling cycle failed; retrying next cycle.");
                        break;
                    }
                    Next::Done(Outcome::TimedOut(what)) => {
                        tracing::warn!(
                            timeout_secs = cfg.libvirt.call_timeout_secs,
                            call = %what,
                            "libvirt call timed out: the rest of this cycle is lost (counted in vmeter_agent_libvirt_timeouts_total); the next cycle uses a fresh connection and skips that domain until the call returns."
                        );
                        break;
                    }
                }
            },
        }
        out.finish().await;

        if let Some((_, p)) = &publisher
            && !spool.is_empty()
        {
            match drain_spool(p, &cfg, &mut spool).await {
                Ok(n) => {
                    broker_up.store(true, Ordering::Relaxed);
                    published.add(n);
                }
                Err(e) => {
                    broker_up.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, spooled = spool.len(), "Sending the spool failed; will retry.");
                    publisher = None;
                }
            }
        }
        spool_batches.set(spool.len() as i64);
        spool_bytes.set(spool.bytes() as i64);
    }
    if let Some((conn, _)) = publisher {
        let _ = conn.close(200, "shutdown".into()).await;
    }
    if !spool.is_empty() {
        tracing::info!(
            batches = spool.len(),
            samples = spool.samples(),
            "Stopped with spooled batches; they are sent after the next start."
        );
    }
    Ok(())
}

/// Keeps the samples of the meters that one of the due sources (`active`) selects.
fn keep_due(sources: Arc<Vec<PollingSource>>, active: Vec<usize>) -> KeepFn {
    Box::new(move |meter| active.iter().any(|&i| sources[i].filter.matches(meter)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources;

    #[test]
    fn only_due_sources_meters_are_kept() {
        let (srcs, _) = sources::parse(
            "sources:\n  - {name: c, interval: 1, meters: [cpu]}\n  - {name: d, interval: 3, meters: ['disk.*']}\n",
            "p.yaml",
        )
        .unwrap();
        let all = || vec!["cpu", "memory", "disk.read.bytes"];
        let kept = |src: Vec<PollingSource>, active: Vec<usize>| -> Vec<&str> {
            let keep = keep_due(Arc::new(src), active);
            all().into_iter().filter(|s| keep(s)).collect()
        };
        let v = kept(srcs[..1].to_vec(), vec![0]);
        assert_eq!(v, ["cpu"], "a single source still selects");
        assert_eq!(kept(srcs.clone(), vec![0, 1]).len(), 2);
        assert_eq!(kept(sources::every_meter(60.0), vec![0]).len(), 3);
    }
}
