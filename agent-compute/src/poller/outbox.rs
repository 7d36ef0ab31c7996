//! Where a cycle's batches go: published with a window of unconfirmed publishes, spooled to
//! disk while the broker is away, the spool drained in order once it is back.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use vmeter_core::amqp::{self, Publisher};
use vmeter_core::telemetry;

use crate::config::Config;
use crate::spool::Spool;

/// Passes a batch to the scheduler. When it gave up on this cycle (the cycle overran
/// `libvirt.call_timeout_secs`), the batch's samples are counted as dropped.
pub(super) fn hand_over(out: &mpsc::Sender<(Vec<u8>, u64)>, batch: (Vec<u8>, u64)) {
    let n = batch.1;
    if out.blocking_send(batch).is_err() {
        telemetry::dropped("agent-compute", telemetry::DropReason::LibvirtTimeout).add(n);
    }
}

/// Most batches sent and not yet confirmed while a cycle is being published.
pub(super) const WINDOW: usize = 16;

/// Where a cycle's batches go as they arrive: straight to the broker when it is up and
/// nothing older waits in the spool, else to the spool (so order is kept). A batch sent
/// directly is kept until its confirm; when sending or a confirm fails, it and everything
/// after it go to the spool.
pub(super) struct Outbox<'a> {
    cfg: &'a Config,
    spool: &'a mut Spool,
    publisher: &'a mut Option<(lapin::Connection, Publisher)>,
    window: VecDeque<(Vec<u8>, u64, amqp::Pending)>,
    published: &'a telemetry::Counter,
    broker_up: &'a std::sync::atomic::AtomicBool,
}

impl<'a> Outbox<'a> {
    /// A cycle's outbox: publishes through `publisher` while it is connected and the spool
    /// is empty, else spools.
    pub(super) fn new(
        cfg: &'a Config,
        spool: &'a mut Spool,
        publisher: &'a mut Option<(lapin::Connection, Publisher)>,
        published: &'a telemetry::Counter,
        broker_up: &'a std::sync::atomic::AtomicBool,
    ) -> Self {
        Outbox {
            cfg,
            spool,
            publisher,
            window: VecDeque::new(),
            published,
            broker_up,
        }
    }

    pub(super) async fn deliver(&mut self, body: Vec<u8>, n: u64) {
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
    pub(super) async fn confirm_front(&mut self) {
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
    pub(super) fn fail(&mut self, error: &str) {
        self.broker_up.store(false, Ordering::Relaxed);
        tracing::warn!(error, "Publishing failed; spooling to disk.");
        *self.publisher = None;
        for (body, n, _) in std::mem::take(&mut self.window) {
            spool_push(self.spool, self.cfg, &body, n);
        }
    }

    /// Waits for every confirm of the cycle.
    pub(super) async fn finish(mut self) {
        while !self.window.is_empty() {
            self.confirm_front().await;
        }
    }
}

/// Appends a batch to the spool; evictions (spool full) and write errors are counted.
pub(super) fn spool_push(spool: &mut Spool, cfg: &Config, body: &[u8], n: u64) {
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

/// Sends the spool oldest first, `WINDOW` batches in flight; a batch leaves the spool only
/// after its confirm. Returns the samples sent.
pub(super) async fn drain_spool(
    p: &Publisher,
    cfg: &Config,
    spool: &mut Spool,
) -> Result<u64, anyhow::Error> {
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
