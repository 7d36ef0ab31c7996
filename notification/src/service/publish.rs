//! Publishing the pipeline's outputs: routed to their publishers, signed on worker threads, confirmed.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use vmeter_core::Sample;
use vmeter_core::amqp::{self, PublishError, Publisher};
use vmeter_core::signing::Signer;
use vmeter_core::telemetry;

use super::config::Config;
use super::{Metrics, SERVICE};
use crate::definition::PublisherUrl;
use crate::pipeline::{Emission, Runtime};

/// Threads used to encode and sign outputs: one per core, at most 8.
pub(super) fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Encodes and signs `chunks` in order, on up to one thread per core when there are several
/// (encoding and HMAC are most of the service's CPU under load).
pub(super) fn prepare_all(signer: &Signer, chunks: &[&[&Sample]]) -> Vec<amqp::Prepared> {
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
pub(super) async fn publish_outputs(
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
pub(super) fn grouped_by_metadata(pending: &[Sample]) -> Vec<&Sample> {
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
pub(super) fn route(rt: &Runtime, emissions: Vec<Emission>, pending: &mut Vec<Sample>) {
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

pub(super) fn append_jsonl(path: &std::path::Path, samples: &[Sample]) -> std::io::Result<()> {
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
