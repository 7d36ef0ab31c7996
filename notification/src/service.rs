//! The notification service: consume `vmeter.samples.raw` as its single active consumer,
//! run the pipelines, publish to `vmeter.samples.processed` with confirms, then ack.
//!
//! Delivery rule: a chunk of deliveries is acked (multiple) only after every output it caused
//! was confirmed by the broker. Outputs that could not be confirmed are kept and published
//! first after reconnecting; the unacked inputs then come back redelivered, and the
//! transformers recognise them by `message_id` (no double rates), while pass-through copies
//! carry their original ids and are dropped by the collector's dedup.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use lapin::options::BasicAckOptions;
use serde::{Deserialize, Serialize};
use vmeter_core::Sample;
use vmeter_core::amqp::{self, BrokerConfig, PublishError, Publisher, SigningConfig};
use vmeter_core::http::Health;
use vmeter_core::shutdown::Shutdown;
use vmeter_core::signing::Signer;
use vmeter_core::telemetry::{self, LogConfig};
use vmeter_core::wire::Decoder;

use crate::definition::{self, PipelineDef, PublisherUrl};
use crate::pipeline::{Emission, Runtime};
use crate::state;

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

/// `http:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/health` and `/metrics`.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9102".parse().expect("valid"),
        }
    }
}

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

const SERVICE: &str = "notification";

/// How often quiet series are looked for (`pipeline.state_ttl_secs`).
const EVICT_EVERY: Duration = Duration::from_secs(60);

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
    let mut last_eviction = tokio::time::Instant::now();

    while !*shutdown.borrow() {
        let Some(conn) =
            amqp::connect_retrying(&cfg.broker, "vmeter-notification", &mut shutdown).await
        else {
            break;
        };
        let session = async {
            let publisher = Publisher::open(&conn, signer.clone()).await?;
            amqp::declare_topology(publisher.channel(), &cfg.broker).await?;
            // Outputs left over from a broken connection go first.
            publish_outputs(&publisher, &signer, &cfg, &mut pending, &metrics).await?;
            let consumer = amqp::consume(
                &conn,
                &cfg.broker,
                &cfg.broker.raw_queue,
                &format!("notification-{}", std::process::id()),
            )
            .await?;
            broker_up.store(true, Ordering::Relaxed);
            tracing::info!(queue = %cfg.broker.raw_queue, "Consuming (single active consumer; a second instance waits as hot standby).");
            let mut chunks = consumer.ready_chunks(cfg.pipeline.max_chunk_messages.max(1));
            let mut timer = tokio::time::interval(flush_every);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = vmeter_core::shutdown::wait(&mut shutdown) => return Ok::<_, anyhow::Error>(()),
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
                                    let samples = keep_contract(&cfg, &mut checker, &publisher, d, samples, now).await?;
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
                        publish_outputs(&publisher, &signer, &cfg, &mut pending, &metrics).await?;
                        if let Some(acker) = last {
                            // A crash here: outputs confirmed, inputs not acked.
                            fail::fail_point!("notification-before-ack", |_| std::process::abort());
                            acker.ack(BasicAckOptions { multiple: true }).await?;
                        }
                        metrics.chunk_seconds.observe_since(started);
                    }
                    _ = timer.tick() => {
                        if last_eviction.elapsed() >= EVICT_EVERY {
                            last_eviction = tokio::time::Instant::now();
                            let n = rt.evict_quiet(state_ttl, Utc::now());
                            if n > 0 {
                                metrics.evicted.add(n as u64);
                                tracing::info!(series = n, "Forgot the transformer state of quiet series.");
                            }
                        }
                        let em = rt.flush(Utc::now());
                        route(&rt, em, &mut pending);
                        report_drops(&mut rt);
                        publish_outputs(&publisher, &signer, &cfg, &mut pending, &metrics).await?;
                    }
                    Ok(()) = reloads.changed() => {
                        let new = reloads.borrow_and_update().clone();
                        apply_reload(&mut rt, new);
                    }
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
                tracing::warn!(error = %e, pending = pending.len(), "Broker session ended; reconnecting.");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
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

/// Restores the state file (if any) into `rt` and `pending`, logging what happened.
fn restore_state(
    path: &std::path::Path,
    cfg: &Config,
    rt: &mut Runtime,
    pending: &mut Vec<Sample>,
) {
    let max_age = Duration::from_secs(cfg.pipeline.state_max_age_secs);
    let outcome = |result: &str| {
        telemetry::counter(
            "vmeter_notification_state_loads_total",
            "State file reads at start-up, by result (restored, fresh: none saved, unusable).",
            &[("result", result)],
        )
        .inc();
    };
    match state::take(path, max_age, Utc::now()) {
        Ok(Some(saved)) => {
            let age = (Utc::now() - saved.saved_at).num_seconds();
            let (restored, skipped) = rt.restore(saved.sinks);
            for (sink, why) in &skipped {
                tracing::warn!(sink = %sink, reason = %why, "Saved state not restored for this sink.");
            }
            *pending = saved.pending;
            tracing::info!(
                path = %path.display(),
                age_s = age,
                restored = ?restored,
                unpublished = pending.len(),
                "Transformer state restored."
            );
            outcome("restored");
        }
        Ok(None) => {
            tracing::info!(path = %path.display(), "No saved state; starting fresh.");
            outcome("fresh");
        }
        Err(e) => {
            tracing::warn!(error = %e, "Saved state not used; starting fresh.");
            outcome("unusable");
        }
    }
}

/// Watches the pipeline file (SIGHUP, and a content check every `reload_check_secs`).
/// Sends every new definition that validates; a file that does not is refused with all
/// its errors logged, and the running pipeline stays.
fn spawn_reload_watcher(
    cfg: &PipelineConfig,
    initial: Arc<PipelineDef>,
    mut shutdown: Shutdown,
) -> tokio::sync::watch::Receiver<Arc<PipelineDef>> {
    let (tx, rx) = tokio::sync::watch::channel(initial);
    let path = cfg.file.clone();
    let every = (cfg.reload_check_secs > 0).then(|| Duration::from_secs(cfg.reload_check_secs));
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "No SIGHUP handler; pipeline reload by file change only.");
                return;
            }
        };
        let mut seen = std::fs::read(&path).ok();
        let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let forced = tokio::select! {
                _ = vmeter_core::shutdown::wait(&mut shutdown) => return,
                _ = hup.recv() => true,
                _ = tick.tick(), if every.is_some() => false,
            };
            let text = match std::fs::read(&path) {
                Ok(t) => t,
                Err(e) => {
                    if forced {
                        tracing::error!(path = %path.display(), error = %e, "Pipeline reload refused: cannot read the file; the running pipeline stays.");
                    }
                    continue;
                }
            };
            if !forced && seen.as_ref() == Some(&text) {
                continue;
            }
            seen = Some(text.clone());
            let result =
                definition::parse(&String::from_utf8_lossy(&text), &path.display().to_string());
            match result {
                Ok(def) => {
                    for w in &def.warnings {
                        tracing::warn!("{}: {w}", path.display());
                    }
                    telemetry::counter(
                        "vmeter_notification_reloads_total",
                        "Pipeline reloads, by result.",
                        &[("result", "accepted")],
                    )
                    .inc();
                    let _ = tx.send(Arc::new(def));
                }
                Err(errors) => {
                    telemetry::counter(
                        "vmeter_notification_reloads_total",
                        "Pipeline reloads, by result.",
                        &[("result", "refused")],
                    )
                    .inc();
                    for e in &errors.errors {
                        tracing::error!(file = %path.display(), line = e.line, "{}", e.message);
                    }
                    tracing::error!(path = %path.display(), errors = errors.errors.len(), "Pipeline reload refused; the running pipeline stays.");
                }
            }
        }
    });
    rx
}

/// Swaps in a new definition between two messages.
fn apply_reload(rt: &mut Runtime, def: Arc<PipelineDef>) {
    if *def == **rt.def() {
        tracing::info!("Pipeline file re-read; no change.");
        return;
    }
    let kept = rt.reload(def.clone());
    telemetry::counter(
        "vmeter_notification_reloads_applied_total",
        "Pipeline definitions swapped in (a changed file that validated).",
        &[],
    )
    .inc();
    let fresh: Vec<&str> = def
        .sinks
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| !kept.iter().any(|k| k == n))
        .collect();
    tracing::info!(
        pipelines = def.pipelines.len(),
        kept_state = ?kept,
        fresh_state = ?fresh,
        "Pipeline reloaded."
    );
}

/// Threads used to encode and sign outputs: one per core, at most 8.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Encodes and signs `chunks` in order, on up to one thread per core when there are several
/// (encoding and HMAC are most of the service's CPU under load).
fn prepare_all(signer: &Signer, chunks: &[&[&Sample]]) -> Vec<amqp::Prepared> {
    let workers = workers().min(chunks.len());
    if workers <= 1 {
        return chunks.iter().map(|c| amqp::prepare(signer, c)).collect();
    }
    let mut out: Vec<Option<amqp::Prepared>> = (0..chunks.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                scope.spawn(move || {
                    (w..chunks.len())
                        .step_by(workers)
                        .map(|i| (i, amqp::prepare(signer, chunks[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, p) in h.join().expect("encoding never panics") {
                out[i] = Some(p);
            }
        }
    });
    out.into_iter()
        .map(|p| p.expect("every chunk prepared"))
        .collect()
}

/// Publishes and confirms everything in `pending`; on success `pending` is empty.
async fn publish_outputs(
    p: &Publisher,
    signer: &Signer,
    cfg: &Config,
    pending: &mut Vec<Sample>,
    m: &Metrics,
) -> Result<(), PublishError> {
    if pending.is_empty() {
        return Ok(());
    }
    let ordered = grouped_by_metadata(pending);
    let chunks: Vec<&[&Sample]> = ordered
        .chunks(cfg.pipeline.max_batch_samples.max(1))
        .collect();
    let prepared = prepare_all(signer, &chunks);
    let mut confirms = Vec::with_capacity(prepared.len());
    for batch in &prepared {
        confirms.push(
            p.send_prepared(
                &cfg.broker.exchange,
                &cfg.broker.processed_routing_key,
                batch,
            )
            .await?,
        );
    }
    for c in confirms {
        c.confirmed().await?;
    }
    m.samples_out.add(pending.len() as u64);
    pending.clear();
    Ok(())
}

/// The order in which to publish `pending`: samples sharing one metadata map (an input's
/// stored copy and what the pipelines derived from it) adjacent, in order of first
/// appearance, so that a batch carries each map once (the wire format writes a map once per
/// batch). Order between different resources carries no meaning downstream (storage
/// dedups by natural key).
fn grouped_by_metadata(pending: &[Sample]) -> Vec<&Sample> {
    let mut group_of: HashMap<*const vmeter_core::Metadata, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(pending.len() / 2, Default::default());
    let mut groups: Vec<Vec<&Sample>> = Vec::new();
    for s in pending {
        let g = *group_of
            .entry(Arc::as_ptr(&s.resource_metadata))
            .or_insert_with(|| {
                groups.push(Vec::with_capacity(4));
                groups.len() - 1
            });
        groups[g].push(s);
    }
    groups.into_iter().flatten().collect()
}

/// Hands emissions to their sinks' publishers: `notifier://` into `pending` (published with
/// confirms by the caller), `log://` and `file://` right away.
fn route(rt: &Runtime, emissions: Vec<Emission>, pending: &mut Vec<Sample>) {
    let def = rt.def();
    for e in emissions {
        let p = &def.pipelines[e.pipeline];
        let publishers = &def.sinks[p.sink].publishers;
        let notifiers = publishers
            .iter()
            .filter(|u| matches!(u, PublisherUrl::Notifier))
            .count();
        let mut notifier_seen = 0;
        for url in publishers {
            match url {
                PublisherUrl::Notifier => {
                    notifier_seen += 1;
                    // The last notifier takes the samples by value below.
                    if notifier_seen < notifiers {
                        pending.extend(e.samples.iter().cloned());
                    }
                }
                PublisherUrl::Log => {
                    for s in &e.samples {
                        tracing::info!(pipeline = %p.name, sample = %crate::replay::sample_to_json(s), "Published sample.");
                    }
                }
                PublisherUrl::File(path) => {
                    if let Err(err) = append_jsonl(path, &e.samples) {
                        telemetry::dropped(SERVICE, telemetry::DropReason::FilePublisherError)
                            .add(e.samples.len() as u64);
                        tracing::warn!(path = %path.display(), error = %err, samples = e.samples.len(), "file:// publisher failed; samples dropped.");
                    }
                }
                PublisherUrl::Test => {}
            }
        }
        if notifiers > 0 {
            pending.extend(e.samples);
        }
    }
}

fn append_jsonl(path: &std::path::Path, samples: &[Sample]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut buf = Vec::new();
    for s in samples {
        serde_json::to_writer(&mut buf, &crate::replay::sample_to_json(s))?;
        buf.push(b'\n');
    }
    f.write_all(&buf)
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
