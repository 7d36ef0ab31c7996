//! Writing a batch's samples until they are stored, refused or shutdown comes; isolating
//! what PostgreSQL refuses down to the sample and dead-lettering only that.

use std::sync::atomic::Ordering;
use std::time::Duration;

use vmeter_core::Sample;
use vmeter_core::amqp::{Backoff, Publisher};
use vmeter_core::shutdown::Shutdown;
use vmeter_core::telemetry;

use super::{Batch, Counters, SERVICE};
use crate::config::Config;
use crate::store::{InsertTurn, Store, StoreError};

/// A conflict ([`StoreError::Contended`]) that repeats this often on the same samples while
/// PostgreSQL answers other queries is taken for a refusal of those samples.
pub(super) const CONTENDED_STRIKES: u32 = 5;

/// How one attempt to store some samples ended.
pub(super) enum Piece {
    Stored,
    /// PostgreSQL refuses these samples (and answers other queries).
    Rejected(StoreError),
    Shutdown,
}

/// Writes `samples`, retrying outages with back-off until they are stored, refused, or
/// shutdown comes. Counts what was stored; keeps the health flags true to the database's
/// state: an outage turns `ingest` down, a refusal of data never does.
pub(super) async fn write_piece(
    store: &mut Store,
    turn: &mut InsertTurn,
    samples: &[Sample],
    m: &Counters,
    shutdown: &mut Shutdown,
) -> Piece {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut strikes = 0;
    loop {
        let started = std::time::Instant::now();
        let e = match store.write_in_turn(samples, turn).await {
            Ok(w) => {
                m.write_seconds.observe_since(started);
                if let Some(newest) = samples.iter().map(|s| s.timestamp).max() {
                    let age = (chrono::Utc::now() - newest)
                        .num_microseconds()
                        .unwrap_or(0);
                    m.sample_age.observe(age.max(0) as f64 / 1e6);
                }
                m.ingest_up.store(true, Ordering::Relaxed);
                m.stored.add(w.inserted);
                m.dups.add(w.duplicates);
                m.batches.inc();
                return Piece::Stored;
            }
            Err(e) if e.is_data() => return Piece::Rejected(e),
            Err(e) => e,
        };
        let answers = crate::store::ping(store.pool(), Duration::from_secs(3)).await;
        m.db_up.store(answers, Ordering::Relaxed);
        if answers && matches!(e, StoreError::Contended(_)) {
            strikes += 1;
            if strikes >= CONTENDED_STRIKES {
                return Piece::Rejected(e);
            }
        } else {
            m.ingest_up.store(false, Ordering::Relaxed);
        }
        let wait = backoff.next_delay();
        tracing::warn!(error = %e, database_answers = answers, retry_in_ms = wait.as_millis() as u64, "Samples not stored; nothing acked, retrying.");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = vmeter_core::shutdown::wait(shutdown) => return Piece::Shutdown,
        }
    }
}

/// Bisects `range` of the batch (known to be refused with `error`) until every refused
/// sample stands alone: stores every other sample, dead-letters each refused one with the
/// SQLSTATE in its reason and counts it as dropped. A batch of n samples with k offenders
/// takes about 2·k·log2(n) writes.
#[allow(clippy::too_many_arguments)]
pub(super) async fn isolate(
    store: &mut Store,
    turn: &mut InsertTurn,
    batch: &Batch,
    range: std::ops::Range<usize>,
    error: StoreError,
    publisher: &Publisher,
    cfg: &Config,
    m: &Counters,
    shutdown: &mut Shutdown,
) -> anyhow::Result<bool> {
    let mut refused = vec![(range, error)];
    while let Some((r, e)) = refused.pop() {
        if r.len() == 1 {
            dead_letter_refused(batch, r.start, &e, publisher, cfg).await?;
            continue;
        }
        let mid = r.start + r.len() / 2;
        // The second half goes on the stack first: halves are resolved in batch order.
        let mut halves = Vec::with_capacity(2);
        for half in [r.start..mid, mid..r.end] {
            match write_piece(store, turn, &batch.samples[half.clone()], m, shutdown).await {
                Piece::Stored => {}
                Piece::Shutdown => return Ok(false),
                Piece::Rejected(e) => halves.push((half, e)),
            }
        }
        refused.extend(halves.into_iter().rev());
    }
    Ok(true)
}

/// Dead-letters sample `i` of the batch, refused by PostgreSQL with `e`.
pub(super) async fn dead_letter_refused(
    batch: &Batch,
    i: usize,
    e: &StoreError,
    publisher: &Publisher,
    cfg: &Config,
) -> anyhow::Result<()> {
    let delivery = batch
        .good
        .iter()
        .find(|(_, r)| r.contains(&i))
        .map(|(d, _)| &batch.deliveries[*d])
        .expect("every sample comes from a good delivery");
    let reason = telemetry::DropReason::rejected_by_database(e.sqlstate().as_deref());
    publisher
        .dead_letter_samples(
            &cfg.broker,
            delivery.routing_key.as_str(),
            &[&batch.samples[i]],
            SERVICE,
            reason,
            &e.to_string(),
        )
        .await?;
    Ok(())
}
