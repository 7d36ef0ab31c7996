//! The polling loop: a dedicated thread owns the libvirt connection (libvirt calls block),
//! the async side schedules cycles and publishes.

use crate::sources::PollingSource;
use crate::spool::Spool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use vmeter_core::amqp::{self, Backoff, Publisher};
use vmeter_core::http::Health;
use vmeter_core::shutdown::Shutdown;
use vmeter_core::telemetry;

use crate::config::Config;
use crate::inspector::{CycleStats, Guard, Inspector, Options};
use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

/// Which meters a cycle keeps (those of the sources due now), by meter name.
pub type KeepFn = Box<dyn Fn(&str) -> bool + Send>;

/// One cycle asked of the libvirt thread. The thread filters and encodes samples batch by
/// batch as they are built, so a cycle's samples are never all in memory at once (with
/// 1,000 domains they would be about 40,000 `Sample`s, ~18 MB).
struct PollRequest {
    keep: KeepFn,
    batch_size: usize,
    batches: mpsc::Sender<(Vec<u8>, u64)>,
    done: oneshot::Sender<Result<CycleStats, String>>,
}

/// A cycle in progress: its batches arrive as the libvirt thread encodes them.
pub struct Cycle {
    batches: mpsc::Receiver<(Vec<u8>, u64)>,
    done: oneshot::Receiver<Result<CycleStats, String>>,
}

/// The next thing a cycle in progress gave.
pub enum Next {
    /// One encoded batch (body, sample count).
    Batch(Vec<u8>, u64),
    /// The cycle ended.
    Done(Outcome),
}

/// Most libvirt threads left blocked in an abandoned call before the agent stops starting
/// new ones (libvirtd itself is then not answering; more threads would not help).
const MAX_STUCK_WORKERS: usize = 3;

/// How one cycle ended.
pub enum Outcome {
    Done(CycleStats),
    /// The connection could not be opened or the domain list read.
    Failed(String),
    /// The cycle overran `libvirt.call_timeout_secs`; the text says which call.
    TimedOut(String),
}

/// One libvirt thread: owns a connection, runs one cycle per request.
struct Worker {
    tx: mpsc::Sender<PollRequest>,
    guard: Arc<Guard>,
    /// Set when the scheduler gives up on this thread: `Some(uuid)` of the domain its
    /// blocked call was about (quarantined until the call returns).
    abandoned: Arc<Mutex<Option<Option<String>>>>,
}

/// The agent's libvirt side: a worker thread per connection, replaced when a call wedges.
pub struct Libvirt {
    uri: String,
    opts: Options,
    timeout: Duration,
    guard: Arc<Guard>,
    worker: Worker,
    stuck: Arc<AtomicUsize>,
}

impl Libvirt {
    /// Starts the first libvirt thread (it connects on the first cycle).
    pub fn start(uri: String, opts: Options, timeout: Duration) -> Libvirt {
        let guard = Arc::new(Guard::default());
        let stuck = Arc::new(AtomicUsize::new(0));
        let worker = spawn_worker(uri.clone(), opts.clone(), guard.clone(), stuck.clone());
        Libvirt {
            uri,
            opts,
            timeout,
            guard,
            worker,
            stuck,
        }
    }

    /// Starts a cycle: the samples `keep` accepts, encoded in batches of `batch_size`.
    pub async fn start_cycle(&mut self, keep: KeepFn, batch_size: usize) -> Result<Cycle, String> {
        // A few batches of look-ahead: polling goes on while the broker confirms.
        let (btx, brx) = mpsc::channel(4);
        let (dtx, drx) = oneshot::channel();
        let req = PollRequest {
            keep,
            batch_size: batch_size.max(1),
            batches: btx,
            done: dtx,
        };
        self.worker
            .tx
            .send(req)
            .await
            .map_err(|_| "libvirt thread stopped".to_string())?;
        Ok(Cycle {
            batches: brx,
            done: drx,
        })
    }

    /// The next batch of `cycle`, or its end. libvirt making no progress for `timeout`
    /// (no batch and no end) abandons the cycle: see [`Libvirt::abandon`].
    pub async fn next(&mut self, cycle: &mut Cycle) -> Next {
        match tokio::time::timeout(self.timeout, cycle.batches.recv()).await {
            Ok(Some((body, n))) => Next::Batch(body, n),
            Ok(None) => Next::Done(match (&mut cycle.done).await {
                Ok(Ok(stats)) => Outcome::Done(stats),
                Ok(Err(e)) => Outcome::Failed(e),
                Err(_) => Outcome::Failed("libvirt thread stopped".into()),
            }),
            Err(_) => Next::Done(Outcome::TimedOut(self.abandon())),
        }
    }

    /// Gives up on the worker's blocked call: counts it, quarantines the domain it is
    /// about, leaves the thread behind (it ends when the call returns) and starts a fresh
    /// one. Returns what was blocked, for the log.
    fn abandon(&mut self) -> String {
        let call = self.worker.guard.in_flight();
        let what = match &call {
            Some(c) => match &c.domain {
                Some((name, uuid)) => format!(
                    "{} of domain {name} ({uuid}), blocked {:.1} s",
                    c.call,
                    c.since.elapsed().as_secs_f64()
                ),
                None => format!(
                    "{}, blocked {:.1} s",
                    c.call,
                    c.since.elapsed().as_secs_f64()
                ),
            },
            None => "a libvirt call".into(),
        };
        let call_name = call.as_ref().map(|c| c.call).unwrap_or("unknown");
        telemetry::counter(
            "vmeter_agent_libvirt_timeouts_total",
            "Polling cycles cut short because a libvirt call overran libvirt.call_timeout_secs, by call.",
            &[("call", call_name)],
        )
        .inc();
        let domain = call.and_then(|c| c.domain).map(|(_, uuid)| uuid);
        if self.stuck.load(Ordering::SeqCst) >= MAX_STUCK_WORKERS {
            tracing::error!(
                blocked = MAX_STUCK_WORKERS,
                "libvirt is not answering: several calls are blocked; waiting for them instead of opening more connections."
            );
            return what;
        }
        if let Some(uuid) = &domain {
            self.guard.quarantine(uuid);
        }
        *self.worker.abandoned.lock().expect("poisoned") = Some(domain);
        self.stuck.fetch_add(1, Ordering::SeqCst);
        self.worker = spawn_worker(
            self.uri.clone(),
            self.opts.clone(),
            Arc::new(self.guard.sibling()),
            self.stuck.clone(),
        );
        what
    }
}

/// Starts a libvirt thread; each request runs one cycle. The thread reconnects with
/// back-off when the connection is down (including libvirtd not up yet at start).
fn spawn_worker(uri: String, opts: Options, guard: Arc<Guard>, stuck: Arc<AtomicUsize>) -> Worker {
    let (tx, mut rx) = mpsc::channel::<PollRequest>(1);
    let abandoned: Arc<Mutex<Option<Option<String>>>> = Arc::new(Mutex::new(None));
    let worker = Worker {
        tx,
        guard: guard.clone(),
        abandoned: abandoned.clone(),
    };
    std::thread::Builder::new()
        .name("libvirt".into())
        .spawn(move || {
            virt::error::clear_error_callback();
            let mut inspector: Option<Inspector> = None;
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
            while let Some(req) = rx.blocking_recv() {
                let reply = req.done;
                if inspector.as_ref().is_some_and(|i| !i.alive()) {
                    tracing::warn!(%uri, "libvirt connection lost; reopening.");
                    inspector = None;
                }
                if inspector.is_none() {
                    guard.enter("open connection", None);
                    let opened = Inspector::open(&uri, opts.clone(), guard.clone());
                    guard.leave();
                    match opened {
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
                // Samples are filtered and encoded as they are built and handed over batch
                // by batch: memory stays at a few batches whatever the number of domains.
                let out = req.batches;
                let result = inspector.as_mut().expect("opened above").poll_batches(
                    &*req.keep,
                    req.batch_size,
                    &mut |body, n| hand_over(&out, (body, n)),
                );
                drop(out);
                if result.is_err() {
                    inspector = None;
                }
                if let Some(domain) = abandoned.lock().expect("poisoned").take() {
                    if let Some(uuid) = domain {
                        guard.release(&uuid);
                    }
                    stuck.fetch_sub(1, Ordering::SeqCst);
                    tracing::info!(%uri, "An abandoned libvirt call returned; its thread ends.");
                    return;
                }
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
        })
        .expect("spawn libvirt thread");
    worker
}

/// Adds a cycle's reads per stats group and path to `vmeter_agent_stats_reads_total`.
fn record_reads(stats: &CycleStats) {
    for (i, (_, name)) in crate::bulk::group::NAMED.iter().enumerate() {
        for (p, path) in ["bulk", "per_domain"].iter().enumerate() {
            let n = stats.reads[i][p];
            if n > 0 {
                telemetry::counter(
                    "vmeter_agent_stats_reads_total",
                    "Domains whose stats group was read, by group and path (bulk call or per-domain calls).",
                    &[("group", name), ("path", path)],
                )
                .add(n);
            }
        }
    }
}

/// When each polling source is due: a fixed grid per source from the first cycle
/// (`start`, `start + interval`, …), so that a source's samples stay evenly spaced
/// whatever the cycles cost.
#[derive(Debug)]
pub struct Schedule {
    intervals: Vec<Duration>,
    due: Vec<tokio::time::Instant>,
}

impl Schedule {
    /// Every source due at `start`. Intervals are at least 1 ms.
    pub fn new(intervals: Vec<Duration>, start: tokio::time::Instant) -> Schedule {
        let intervals: Vec<Duration> = intervals
            .into_iter()
            .map(|i| i.max(Duration::from_millis(1)))
            .collect();
        Schedule {
            due: vec![start; intervals.len()],
            intervals,
        }
    }

    /// The earliest time a source is due.
    pub fn next(&self) -> tokio::time::Instant {
        *self.due.iter().min().expect("at least one source")
    }

    /// The sources due at `now` (by index), each moved to its next slot on its grid after
    /// `now`: slots missed while a cycle ran long are skipped, not made up.
    pub fn take_due(&mut self, now: tokio::time::Instant) -> Vec<usize> {
        let active: Vec<usize> = (0..self.due.len())
            .filter(|&i| self.due[i] <= now)
            .collect();
        for &i in &active {
            while self.due[i] <= now {
                self.due[i] += self.intervals[i];
            }
        }
        active
    }
}

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
        let mut out = Outbox {
            cfg: &cfg,
            spool: &mut spool,
            publisher: &mut publisher,
            window: VecDeque::new(),
            published: &published,
            broker_up: &broker_up,
        };
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

/// Passes a batch to the scheduler. When it gave up on this cycle (the cycle overran
/// `libvirt.call_timeout_secs`), the batch's samples are counted as dropped.
fn hand_over(out: &mpsc::Sender<(Vec<u8>, u64)>, batch: (Vec<u8>, u64)) {
    let n = batch.1;
    if out.blocking_send(batch).is_err() {
        telemetry::dropped("agent-compute", telemetry::DropReason::LibvirtTimeout).add(n);
    }
}

/// Most batches sent and not yet confirmed while a cycle is being published.
const WINDOW: usize = 16;

/// Where a cycle's batches go as they arrive: straight to the broker when it is up and
/// nothing older waits in the spool, else to the spool (so order is kept). A batch sent
/// directly is kept until its confirm; when sending or a confirm fails, it and everything
/// after it go to the spool.
struct Outbox<'a> {
    cfg: &'a Config,
    spool: &'a mut Spool,
    publisher: &'a mut Option<(lapin::Connection, Publisher)>,
    window: VecDeque<(Vec<u8>, u64, amqp::Pending)>,
    published: &'a telemetry::Counter,
    broker_up: &'a std::sync::atomic::AtomicBool,
}

impl Outbox<'_> {
    async fn deliver(&mut self, body: Vec<u8>, n: u64) {
        let direct = self.spool.is_empty();
        let Some((_, p)) = self.publisher.as_ref().filter(|_| direct) else {
            spool_push(self.spool, self.cfg, &body, n);
            return;
        };
        match p
            .send_body(
                &self.cfg.broker.exchange,
                &self.cfg.broker.raw_routing_key,
                &body,
                amqp::count_header(n as usize),
            )
            .await
        {
            Ok(pending) => {
                self.window.push_back((body, n, pending));
                if self.window.len() > WINDOW {
                    self.confirm_front().await;
                }
            }
            Err(e) => {
                self.fail(&e.to_string());
                spool_push(self.spool, self.cfg, &body, n);
            }
        }
    }

    /// Waits for the oldest batch's confirm.
    async fn confirm_front(&mut self) {
        let Some((body, n, pending)) = self.window.pop_front() else {
            return;
        };
        match pending.confirmed().await {
            Ok(()) => {
                self.broker_up.store(true, Ordering::Relaxed);
                self.published.add(n);
            }
            Err(e) => {
                // Keep the order: this batch, then the ones sent after it.
                spool_push(self.spool, self.cfg, &body, n);
                self.fail(&e.to_string());
            }
        }
    }

    /// The broker failed: what is still unconfirmed goes to the spool, in order.
    fn fail(&mut self, error: &str) {
        self.broker_up.store(false, Ordering::Relaxed);
        tracing::warn!(error, "Publishing failed; spooling to disk.");
        *self.publisher = None;
        for (body, n, _) in std::mem::take(&mut self.window) {
            spool_push(self.spool, self.cfg, &body, n);
        }
    }

    /// Waits for every confirm of the cycle.
    async fn finish(mut self) {
        while !self.window.is_empty() {
            self.confirm_front().await;
        }
    }
}

/// Appends a batch to the spool; evictions (spool full) and write errors are counted.
fn spool_push(spool: &mut Spool, cfg: &Config, body: &[u8], n: u64) {
    match spool.push(body, n) {
        Ok(evicted) => {
            let lost: u64 = evicted.iter().map(|e| e.samples).sum();
            if lost > 0 {
                telemetry::dropped("agent-compute", telemetry::DropReason::SpoolFull).add(lost);
                tracing::warn!(
                    dropped_samples = lost,
                    max_bytes = cfg.spool.max_bytes,
                    "Spool full: oldest batches dropped."
                );
            }
        }
        Err(e) => {
            telemetry::dropped("agent-compute", telemetry::DropReason::SpoolWriteError).add(n);
            tracing::error!(error = %e, samples = n, "Could not spool a batch; its samples are lost.");
        }
    }
}

/// Keeps the samples of the meters that one of the due sources (`active`) selects.
fn keep_due(sources: Arc<Vec<PollingSource>>, active: Vec<usize>) -> KeepFn {
    Box::new(move |meter| active.iter().any(|&i| sources[i].filter.matches(meter)))
}

/// Sends the spool oldest first, `WINDOW` batches in flight; a batch leaves the spool only
/// after its confirm. Returns the samples sent.
async fn drain_spool(p: &Publisher, cfg: &Config, spool: &mut Spool) -> Result<u64, anyhow::Error> {
    const WINDOW: usize = 16;
    let mut sent = 0;
    while !spool.is_empty() {
        let head = match spool.first(WINDOW) {
            Ok(h) => h,
            Err(e) => {
                // An unreadable batch would block the spool forever: give it up, counted.
                let lost = spool.discard_front().map_or(0, |e| e.samples);
                telemetry::dropped("agent-compute", telemetry::DropReason::SpoolUnreadable)
                    .add(lost);
                tracing::error!(error = %e, samples = lost, "Spooled batch unreadable; dropped.");
                continue;
            }
        };
        let mut confirms = Vec::with_capacity(head.len());
        for (e, body) in &head {
            confirms.push((
                e.samples,
                p.send_body(
                    &cfg.broker.exchange,
                    &cfg.broker.raw_routing_key,
                    body,
                    amqp::count_header(e.samples as usize),
                )
                .await?,
            ));
        }
        for (n, c) in confirms {
            c.confirmed().await?;
            spool.pop_front();
            sent += n;
        }
    }
    Ok(sent)
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

    /// The schedule on tokio's paused clock: sleeping until `next()` advances virtual time
    /// exactly, so the grid is checked to the millisecond without waiting for it.
    #[tokio::test(start_paused = true)]
    async fn sources_fire_on_their_grids_and_skip_missed_slots() {
        let t0 = tokio::time::Instant::now();
        let mut s = Schedule::new(vec![Duration::from_secs(1), Duration::from_secs(3)], t0);
        let mut fired: Vec<(u64, Vec<usize>)> = Vec::new();
        while fired.len() < 7 {
            tokio::time::sleep_until(s.next()).await;
            let now = tokio::time::Instant::now();
            fired.push(((now - t0).as_millis() as u64, s.take_due(now)));
        }
        assert_eq!(
            fired,
            vec![
                (0, vec![0, 1]),
                (1000, vec![0]),
                (2000, vec![0]),
                (3000, vec![0, 1]),
                (4000, vec![0]),
                (5000, vec![0]),
                (6000, vec![0, 1]),
            ]
        );
        // A cycle that overruns by 2.5 s: source 0 missed 7 s and 8 s; it runs once now and
        // goes back to its grid (9 s), as does source 1 (due at 9 s, not yet).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let now = tokio::time::Instant::now();
        assert_eq!((now - t0).as_millis(), 8500);
        assert_eq!(s.take_due(now), vec![0]);
        assert_eq!((s.next() - t0).as_millis(), 9000);
        tokio::time::sleep_until(s.next()).await;
        assert_eq!(s.take_due(tokio::time::Instant::now()), vec![0, 1]);
        assert_eq!((s.next() - t0).as_millis(), 10_000);
    }
}
