//! The libvirt side of the loop: a worker thread per connection (libvirt calls block),
//! cycles handed to it and their batches streamed back, a stuck call abandoned with its
//! worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use vmeter_core::amqp::Backoff;
use vmeter_core::telemetry;

use super::KeepFn;
use super::outbox::hand_over;
use crate::inspector::{CycleStats, Guard, Inspector, Options};

/// One cycle asked of the libvirt thread. The thread filters and encodes samples batch by
/// batch as they are built, so a cycle's samples are never all in memory at once (with
/// 1,000 domains they would be about 40,000 `Sample`s, ~18 MB).
pub(super) struct PollRequest {
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
pub(super) const MAX_STUCK_WORKERS: usize = 3;

/// How one cycle ended.
pub enum Outcome {
    Done(CycleStats),
    /// The connection could not be opened or the domain list read.
    Failed(String),
    /// The cycle overran `libvirt.call_timeout_secs`; the text says which call.
    TimedOut(String),
}

/// One libvirt thread: owns a connection, runs one cycle per request.
pub(super) struct Worker {
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
    pub(super) fn abandon(&mut self) -> String {
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
pub(super) fn spawn_worker(
    uri: String,
    opts: Options,
    guard: Arc<Guard>,
    stuck: Arc<AtomicUsize>,
) -> Worker {
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
pub(super) fn record_reads(stats: &CycleStats) {
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
