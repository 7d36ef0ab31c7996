//! Reading batches from the queue: by message count, sample count and time since the
//! first (`database.batch_max_*`), verified and decoded.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use vmeter_core::amqp;

use super::Batch;

/// The reader task: gathers and decodes batches until the consumer fails or `tx` closes.
pub(super) async fn read_batches(
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
pub(super) async fn next_batch(
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
pub(super) struct BatchLimits {
    pub(super) messages: usize,
    pub(super) samples: usize,
    /// Counted from the first item's arrival.
    pub(super) wait: Duration,
}

/// The batching rule of [`next_batch`] over any stream: waits for a first item, then takes
/// more until `limits` says the batch is complete (`size` gives an item's samples). The
/// stream ending is an error (the broker cancelled the consumer).
pub(super) async fn gather<T, S>(
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
pub(super) fn samples_in(d: &Delivery) -> usize {
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
