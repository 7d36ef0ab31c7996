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

use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use vmeter_core::Sample;
use vmeter_core::amqp::{self, Backoff, Publisher};
use vmeter_core::http::Health;
use vmeter_core::shutdown::Shutdown;
use vmeter_core::telemetry::{self, Counter};

use crate::config::Config;
use crate::store::{InsertTurn, Store, StoreError};

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
    while !*shutdown.borrow() {
        // One store (its own caches) per batch in flight.
        let mut free: Vec<Store> = (0..IN_FLIGHT).map(|_| Store::new(pool.clone())).collect();
        let Some(conn) =
            amqp::connect_retrying(&cfg.broker, "vmeter-collector", &mut shutdown).await
        else {
            break;
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(1);
        let mut reader: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
        let session = async {
            let publisher = Publisher::open(&conn, signer.clone()).await?;
            amqp::declare_topology(publisher.channel(), &cfg.broker).await?;
            let consumer = amqp::consume(
                &conn,
                &cfg.broker,
                &cfg.broker.processed_queue,
                &format!("collector-{}", std::process::id()),
            )
            .await?;
            broker_up.store(true, Ordering::Relaxed);
            tracing::info!(queue = %cfg.broker.processed_queue, "Consuming.");
            reader = Some(tokio::spawn(read_batches(
                consumer,
                cfg.database.clone(),
                cfg.contract.clone(),
                signer.clone(),
                tx,
            )));
            let publisher = &publisher;
            let mut inflight = FuturesOrdered::new();
            let mut inflight_keys: VecDeque<HashSet<u64>> = VecDeque::new();
            // Sample inserts take turns in batch order (store::InsertTurn).
            let mut last_turn = None;
            loop {
                tokio::select! {
                    biased;
                    _ = vmeter_core::shutdown::wait(&mut shutdown) => {
                        // Batches in flight finish (or give up at their next retry) and are
                        // acked; the reader's batch is redelivered.
                        drain(&mut inflight, &mut inflight_keys, &mut free).await?;
                        return Ok::<_, anyhow::Error>(());
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
        let result = session.await;
        if let Some(r) = reader {
            r.abort();
        }
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
    watcher.abort();
    tracing::info!("Collector ingest stopped.");
    Ok(())
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

/// A conflict ([`StoreError::Contended`]) that repeats this often on the same samples while
/// PostgreSQL answers other queries is taken for a refusal of those samples.
const CONTENDED_STRIKES: u32 = 5;

/// How one attempt to store some samples ended.
enum Piece {
    Stored,
    /// PostgreSQL refuses these samples (and answers other queries).
    Rejected(StoreError),
    Shutdown,
}

/// Writes `samples`, retrying outages with back-off until they are stored, refused, or
/// shutdown comes. Counts what was stored; keeps the health flags true to the database's
/// state: an outage turns `ingest` down, a refusal of data never does.
async fn write_piece(
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
async fn isolate(
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
async fn dead_letter_refused(
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

/// The reader task: gathers and decodes batches until the consumer fails or `tx` closes.
async fn read_batches(
    mut consumer: lapin::Consumer,
    cfg: crate::config::DatabaseConfig,
    contract: vmeter_core::contract::Contract,
    signer: vmeter_core::signing::Signer,
    tx: tokio::sync::mpsc::Sender<Batch>,
) -> anyhow::Result<()> {
    let mut decoder = vmeter_core::wire::Decoder::default();
    // Long-lived, as the decoder: each resource's metadata is walked once, not per message.
    let mut checker = vmeter_core::contract::Checker::new(&contract);
    let hasher = std::collections::hash_map::RandomState::new();
    loop {
        let deliveries = next_batch(&mut consumer, &cfg).await?;
        let mut batch = Batch {
            deliveries,
            samples: Vec::new(),
            good: Vec::new(),
            bad: Vec::new(),
            violations: Vec::new(),
            keys: HashSet::new(),
        };
        let now = chrono::Utc::now();
        for (i, d) in batch.deliveries.iter().enumerate() {
            match amqp::open_delivery_with(&signer, &mut decoder, &d.properties, &d.data) {
                Ok(s) => {
                    let (s, violations) = checker.partition(s, now);
                    if !violations.is_empty() {
                        batch.violations.push((i, violations));
                    }
                    let start = batch.samples.len();
                    batch.samples.extend(s);
                    batch.good.push((i, start..batch.samples.len()));
                }
                Err(e) => {
                    tracing::warn!(reason = e.reason(), error = %e, "Message can never be stored; dead-lettering it.");
                    batch.bad.push((i, e.reason()));
                }
            }
        }
        batch.keys.reserve(batch.samples.len());
        for s in &batch.samples {
            batch
                .keys
                .insert(hasher.hash_one((&s.name, &s.resource_id, s.timestamp)));
        }
        if tx.send(batch).await.is_err() {
            return Ok(());
        }
    }
}

/// Waits for the first delivery, then collects more until `batch_max_messages` messages or
/// `batch_max_samples` samples (by the sender's `x-vmeter-samples` header) are in hand, or
/// `batch_max_wait_ms` passed since the first: large transactions under load, low latency
/// when traffic is light.
async fn next_batch(
    consumer: &mut lapin::Consumer,
    cfg: &crate::config::DatabaseConfig,
) -> anyhow::Result<Vec<Delivery>> {
    let limits = BatchLimits {
        messages: cfg.batch_max_messages.max(1),
        samples: cfg.batch_max_samples,
        wait: Duration::from_millis(cfg.batch_max_wait_ms),
    };
    let mut deliveries = consumer.map(|d| d.map_err(anyhow::Error::from));
    gather(&mut deliveries, &limits, samples_in).await
}

/// When a batch is complete.
struct BatchLimits {
    messages: usize,
    samples: usize,
    /// Counted from the first item's arrival.
    wait: Duration,
}

/// The batching rule of [`next_batch`] over any stream: waits for a first item, then takes
/// more until `limits` says the batch is complete (`size` gives an item's samples). The
/// stream ending is an error (the broker cancelled the consumer).
async fn gather<T, S>(
    items: &mut S,
    limits: &BatchLimits,
    size: impl Fn(&T) -> usize,
) -> anyhow::Result<Vec<T>>
where
    S: futures::Stream<Item = anyhow::Result<T>> + Unpin,
{
    let first = match items.next().await {
        Some(d) => d?,
        None => anyhow::bail!("consumer cancelled by the broker"),
    };
    let deadline = tokio::time::Instant::now() + limits.wait;
    let mut samples = size(&first);
    let mut out = vec![first];
    while out.len() < limits.messages && samples < limits.samples {
        match tokio::time::timeout_at(deadline, items.next()).await {
            Ok(Some(d)) => {
                let d = d?;
                samples += size(&d);
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

#[cfg(test)]
mod tests {
    use super::{BatchLimits, gather};
    use std::time::Duration;

    /// The batch timer on tokio's paused clock: items arrive at chosen virtual times.
    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_at_its_wait_or_its_size() {
        let t0 = tokio::time::Instant::now();
        let (tx, mut rx) = futures::channel::mpsc::unbounded::<anyhow::Result<(u32, usize)>>();
        let feeder = tokio::spawn(async move {
            // (arrival in ms, item, samples)
            for (at, item, n) in [
                (0, 1, 10),
                (100, 2, 10),
                (150, 3, 10),
                (300, 4, 10),
                (310, 5, 990),
            ] {
                tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
                let _ = tx.unbounded_send(Ok((item, n)));
            }
        });
        let limits = BatchLimits {
            messages: 100,
            samples: 1000,
            wait: Duration::from_millis(200),
        };
        let size = |x: &(u32, usize)| x.1;
        // Items 1..3 arrive within 200 ms of the first; item 4 (at 300 ms) is too late.
        let b = gather(&mut rx, &limits, size).await.unwrap();
        assert_eq!(b.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!((tokio::time::Instant::now() - t0).as_millis(), 200);
        // The next batch starts with item 4; item 5 brings it to 1,000 samples: complete at
        // once, without waiting out its 200 ms.
        let b = gather(&mut rx, &limits, size).await.unwrap();
        assert_eq!(b.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!((tokio::time::Instant::now() - t0).as_millis(), 310);
        feeder.await.unwrap();
        // The stream ending (the broker cancelled the consumer) is an error, not a batch.
        assert!(gather(&mut rx, &limits, size).await.is_err());
    }
}
