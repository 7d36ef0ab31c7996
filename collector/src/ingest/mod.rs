//! Consume `vmeter.samples.processed`, write to PostgreSQL, ack after commit.
//!
//! A reader task gathers deliveries into batches (by count, sample count and time:
//! `database.batch_max_*`), verifies and decodes them. What can never be stored (bad
//! signature, undecodable) is dead-lettered; the rest of a batch is written in one
//! transaction. Up to [`IN_FLIGHT`] batches are written at once, each on its own
//! connection: their sample inserts take turns in batch order ([`InsertTurn`], which keeps
//! the primary key's pages full), while the lookups and upserts, late folds and commit of one overlap
//! the other's insert, and the next batch is decoded meanwhile. Batches are acked
//! (multiple) in delivery order, each after its own commit and every earlier batch's. A
//! batch that shares a sample key with one in flight waits for it (no two transactions of
//! one collector insert the same row).
//!
//! Samples that break the sample contract ([`vmeter_core::contract`]) are dead-lettered one
//! by one before the write; the rest of their message is written.
//!
//! If PostgreSQL is down the same batch is retried with back-off and nothing is acked: the
//! queue holds the backlog. If PostgreSQL refuses the data itself (a data error, or a
//! conflict that repeats on the same samples while it answers other queries), the batch is
//! bisected down to the refused *samples*: every other sample is stored, each refused one is
//! dead-lettered with its SQLSTATE and counted as dropped. `/health` has two parts here:
//! `database` (PostgreSQL answers, checked every 2 s) and `ingest` (no batch held up by an
//! outage); refused data turns neither down.
//!
//! Where things are: this file runs the loop and acks; `batch.rs` reads batches off the
//! queue; `poison.rs` writes them and isolates what PostgreSQL refuses.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use vmeter_core::Sample;
use vmeter_core::amqp::{self, Publisher};
use vmeter_core::http::Health;
use vmeter_core::shutdown::Shutdown;
use vmeter_core::telemetry::{self, Counter};

use crate::config::Config;
use crate::store::{InsertTurn, Store};
use batch::read_batches;
use poison::{Piece, isolate, write_piece};

mod batch;
mod poison;

/// Batches written at once: two keep PostgreSQL inserting one batch while the other's
/// lookups, upserts and commit run (docs/storage.md, "Ingest").
pub const IN_FLIGHT: usize = 2;

const SERVICE: &str = "collector";

/// Counters and health flags of the ingest loop.
#[derive(Clone)]
struct Counters {
    stored: Counter,
    dups: Counter,
    batches: Counter,
    /// Time of one successful write (lookups, samples, late rollups, commits), s.
    write_seconds: telemetry::Histogram,
    /// Per stored batch: how old its newest sample is once committed, s (from the time it
    /// was taken to the time it can be queried: the pipeline's end-to-end lag).
    sample_age: telemetry::Histogram,
    /// PostgreSQL answers (a trivial query, checked by [`watch_database`] and after
    /// every failed write).
    db_up: Arc<AtomicBool>,
    /// The last write was not held up by an outage (false while a batch is retried).
    ingest_up: Arc<AtomicBool>,
}

/// A batch read from the queue and decoded.
struct Batch {
    deliveries: Vec<Delivery>,
    /// Samples of the good deliveries, in delivery order.
    samples: Vec<Sample>,
    /// Good deliveries: index in `deliveries`, and their range in `samples`.
    good: Vec<(usize, std::ops::Range<usize>)>,
    /// Deliveries that can never be stored: index, reason.
    bad: Vec<(usize, &'static str)>,
    /// Samples of good deliveries that break the sample contract: delivery index, sample,
    /// the rule (dead-lettered before the batch is written).
    violations: Vec<(usize, Vec<(Sample, vmeter_core::contract::Violation)>)>,
    /// Hashes of the samples' keys (meter, resource, timestamp); a collision only makes a
    /// batch wait for another needlessly.
    keys: HashSet<u64>,
}

/// Runs the ingest loop until shutdown.
pub async fn run(
    cfg: Config,
    pool: sqlx::PgPool,
    health: Health,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let signer = cfg.signing.signer(SERVICE);
    let broker_up = health.part("broker");
    let counters = Counters {
        stored: telemetry::counter(
            "vmeter_collector_samples_stored_total",
            "Samples written to PostgreSQL.",
            &[],
        ),
        dups: telemetry::counter(
            "vmeter_collector_duplicates_total",
            "Samples already stored (redeliveries), ignored.",
            &[],
        ),
        batches: telemetry::counter(
            "vmeter_collector_batches_total",
            "Transactions committed.",
            &[],
        ),
        write_seconds: telemetry::histogram(
            "vmeter_collector_write_seconds",
            "Time to store one batch (lookups, samples, late rollups, commits), successful writes.",
            &[],
            telemetry::Buckets::Latency,
        ),
        sample_age: telemetry::histogram(
            "vmeter_collector_sample_age_seconds",
            "Age of each stored batch's newest sample when it was committed: taken to queryable.",
            &[],
            telemetry::Buckets::Age,
        ),
        db_up: health.part("database"),
        ingest_up: health.part("ingest"),
    };
    // The caller applied the migrations: the database answered a moment ago.
    counters.db_up.store(true, Ordering::Relaxed);
    counters.ingest_up.store(true, Ordering::Relaxed);
    let watcher = tokio::spawn(watch_database(
        pool.clone(),
        counters.db_up.clone(),
        shutdown.clone(),
    ));
    let session = async |conn: &lapin::Connection,
                         publisher: &Publisher,
                         shutdown: &mut Shutdown|
           -> anyhow::Result<()> {
        // One store (its own caches) per batch in flight.
        let mut free: Vec<Store> = (0..IN_FLIGHT).map(|_| Store::new(pool.clone())).collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(1);
        let consumer = amqp::consume(
            conn,
            &cfg.broker,
            &cfg.broker.processed_queue,
            &format!("collector-{}", std::process::id()),
        )
        .await?;
        broker_up.store(true, Ordering::Relaxed);
        tracing::info!(queue = %cfg.broker.processed_queue, "Consuming.");
        let mut reader = Some(tokio::spawn(read_batches(
            consumer,
            cfg.database.clone(),
            cfg.contract.clone(),
            signer.clone(),
            tx,
        )));
        // However the session ends, its reader ends with it.
        let _reader_ends = AbortOnDrop(reader.as_ref().expect("spawned").abort_handle());
        let mut inflight = FuturesOrdered::new();
        let mut inflight_keys: VecDeque<HashSet<u64>> = VecDeque::new();
        // Sample inserts take turns in batch order (store::InsertTurn).
        let mut last_turn = None;
        loop {
            tokio::select! {
                biased;
                _ = vmeter_core::shutdown::wait(shutdown) => {
                    // Batches in flight finish (or give up at their next retry) and are
                    // acked; the reader's batch is redelivered.
                    drain(&mut inflight, &mut inflight_keys, &mut free).await?;
                    return Ok(());
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    inflight_keys.pop_front();
                    if !finish(done, &mut free).await? {
                        return Ok(());
                    }
                }
                batch = rx.recv(), if !free.is_empty() => {
                    let Some(mut batch) = batch else {
                        // The reader stopped: its error ends the session.
                        match reader.take().expect("reader started").await {
                            Ok(Err(e)) => return Err(e),
                            Ok(Ok(())) => anyhow::bail!("batch reader stopped"),
                            Err(e) => anyhow::bail!("batch reader failed: {e}"),
                        }
                    };
                    for &(i, reason) in &batch.bad {
                        publisher
                            .dead_letter_delivery(&cfg.broker, &batch.deliveries[i], SERVICE, reason)
                            .await?;
                    }
                    for (i, bad) in std::mem::take(&mut batch.violations) {
                        let rk = batch.deliveries[i].routing_key.as_str();
                        publisher.dead_letter_violations(&cfg.broker, rk, &bad, SERVICE).await?;
                    }
                    if inflight_keys.iter().any(|k| !k.is_disjoint(&batch.keys))
                        && !drain(&mut inflight, &mut inflight_keys, &mut free).await?
                    {
                        // Redeliveries of samples still being written go after them;
                        // shutdown came first.
                        return Ok(());
                    }
                    let store = free.pop().expect("a free store");
                    inflight_keys.push_back(std::mem::take(&mut batch.keys));
                    inflight.push_back(write_batch(
                        store,
                        InsertTurn::next(&mut last_turn),
                        batch,
                        publisher,
                        &cfg,
                        counters.clone(),
                        shutdown.clone(),
                    ));
                }
            }
        }
    };
    amqp::run_sessions(
        &cfg.broker,
        "vmeter-collector",
        &signer,
        &broker_up,
        &mut shutdown,
        session,
    )
    .await;
    watcher.abort();
    tracing::info!("Collector ingest stopped.");
    Ok(())
}

/// Aborts a task when dropped (a session's reader, whatever ends the session).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often [`watch_database`] asks PostgreSQL whether it answers.
const DB_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Keeps the `database` health flag true to whether PostgreSQL answers, with or without
/// traffic (a restart between two batches shows in `/health` too).
async fn watch_database(pool: sqlx::PgPool, up: Arc<AtomicBool>, mut shutdown: Shutdown) {
    let mut every = tokio::time::interval(DB_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = vmeter_core::shutdown::wait(&mut shutdown) => return,
        }
        let answers = crate::store::ping(&pool, DB_CHECK_EVERY).await;
        if up.swap(answers, Ordering::Relaxed) != answers {
            if answers {
                tracing::info!("PostgreSQL answers again.");
            } else {
                tracing::warn!("PostgreSQL does not answer.");
            }
        }
    }
}

/// What a batch write returns: its store, its last delivery, whether it is stored.
type Done = (Store, Option<Delivery>, anyhow::Result<bool>);

/// A written batch: its store back to the free list, then, if the batch is stored, the ack
/// (multiple) of its deliveries and of every earlier one (all stored or dead-lettered by
/// now). Returns whether the batch is stored; `false` (shutdown came first) means no later
/// batch may be acked either, since its ack would cover this batch's deliveries: the
/// caller ends the session, and what is in flight is dropped and redelivered.
async fn finish((store, last, result): Done, free: &mut Vec<Store>) -> anyhow::Result<bool> {
    free.push(store);
    let stored = result?;
    if stored && let Some(last) = last {
        // A crash here: committed, not acked; the redelivery must be stored once.
        fail::fail_point!("collector-before-ack", |_| std::process::abort());
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
    }
    Ok(stored)
}

/// Waits for every batch in flight, in order, acking each ([`finish`]); stops at the first
/// that is not stored and returns `false`.
async fn drain(
    inflight: &mut FuturesOrdered<impl std::future::Future<Output = Done>>,
    keys: &mut VecDeque<HashSet<u64>>,
    free: &mut Vec<Store>,
) -> anyhow::Result<bool> {
    while let Some(done) = inflight.next().await {
        keys.pop_front();
        if !finish(done, free).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes a batch, retrying while PostgreSQL is unavailable, isolating the samples it
/// rejects. Returns the store, the batch's last delivery (to ack) and whether the batch is
/// done (`false`: shutdown came first; nothing may be acked).
async fn write_batch(
    mut store: Store,
    mut turn: InsertTurn,
    batch: Batch,
    publisher: &Publisher,
    cfg: &Config,
    m: Counters,
    mut shutdown: Shutdown,
) -> Done {
    let result = async {
        let all = 0..batch.samples.len();
        let first = match write_piece(&mut store, &mut turn, &batch.samples, &m, &mut shutdown).await {
            Piece::Stored => return Ok(true),
            Piece::Shutdown => return Ok(false),
            Piece::Rejected(e) => e,
        };
        tracing::warn!(error = %first, samples = all.len(), "Batch rejected by PostgreSQL while it answers other queries; isolating the samples it refuses.");
        isolate(&mut store, &mut turn, &batch, all, first, publisher, cfg, &m, &mut shutdown).await
    }
    .await;
    let mut deliveries = batch.deliveries;
    (store, deliveries.pop(), result)
}
