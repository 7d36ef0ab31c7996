//! Reading batches of every format: `decode` and the `Decoder` that remembers metadata it has parsed.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use uuid::Uuid;

use super::{DecodeError, READS};
use crate::sample::{Metadata, Sample, SampleType};

#[derive(Deserialize)]
pub(super) struct BatchIn<'a> {
    #[serde(default, borrow)]
    pub(super) metadata: Vec<&'a serde_bytes::Bytes>,
    pub(super) samples: Vec<WireIn>,
    #[serde(default)]
    pub(super) groups: Vec<GroupIn>,
}

/// The shared fields of a group of samples (format 3).
#[derive(Deserialize)]
pub(super) struct GroupIn {
    #[serde(rename = "usr")]
    pub(super) user_id: Option<String>,
    #[serde(rename = "prj")]
    pub(super) project_id: Option<String>,
    #[serde(rename = "rid")]
    pub(super) resource_id: String,
    #[serde(rename = "ts")]
    pub(super) timestamp: i64,
    pub(super) md: u32,
    #[serde(rename = "src")]
    pub(super) source: String,
    #[serde(default, rename = "mono")]
    pub(super) monotonic_time: Option<f64>,
}

/// A sample of any format: short keys and `md` (format 2), short keys and a group `g`
/// (format 3), or Ceilometer's names and inline `resource_metadata` (format 1).
#[derive(Deserialize)]
pub(super) struct WireIn {
    #[serde(rename = "n", alias = "name")]
    pub(super) name: String,
    #[serde(rename = "t", alias = "type")]
    pub(super) kind: SampleType,
    #[serde(rename = "u", alias = "unit")]
    pub(super) unit: String,
    #[serde(rename = "v", alias = "volume")]
    pub(super) volume: f64,
    #[serde(default, rename = "usr", alias = "user_id")]
    pub(super) user_id: Option<String>,
    #[serde(default, rename = "prj", alias = "project_id")]
    pub(super) project_id: Option<String>,
    #[serde(default, rename = "rid", alias = "resource_id")]
    pub(super) resource_id: Option<String>,
    #[serde(default, rename = "ts", alias = "timestamp")]
    pub(super) timestamp: Option<i64>,
    #[serde(default)]
    pub(super) md: Option<u32>,
    #[serde(default)]
    pub(super) g: Option<u32>,
    #[serde(default)]
    pub(super) resource_metadata: Option<Metadata>,
    #[serde(default, rename = "src", alias = "source")]
    pub(super) source: Option<String>,
    #[serde(rename = "id", alias = "message_id")]
    pub(super) message_id: Uuid,
    #[serde(default, rename = "mono", alias = "monotonic_time")]
    pub(super) monotonic_time: Option<f64>,
}

/// Deepest msgpack nesting the decoder follows. rmp-serde's own limit (1,024) lets a
/// forged blob of nested arrays overflow a 2 MiB stack while it is built into JSON values;
/// no batch of ours nests deeper than its metadata, which the sample contract keeps to a
/// few levels.
pub const MAX_DECODE_DEPTH: usize = 64;

/// `rmp_serde::from_slice` with [`MAX_DECODE_DEPTH`].
pub(super) fn from_slice_limited<'a, T: Deserialize<'a>>(
    b: &'a [u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(b);
    de.set_max_depth(MAX_DECODE_DEPTH);
    T::deserialize(&mut de)
}

/// Decodes a batch of format 1, 2 or 3 (`version` is the value of [`FORMAT_HEADER`](super::FORMAT_HEADER); absent is
/// accepted, the body says which). Uses a throw-away [`Decoder`]; services keep one.
pub fn decode(body: &[u8], version: Option<i64>) -> Result<Vec<Sample>, DecodeError> {
    Decoder::default().decode(body, version)
}

/// Most bytes of metadata blobs a [`Decoder`] remembers (then it starts over). The parsed
/// maps take a few times their encoded size: the cache stays within tens of MiB whatever
/// the senders put in their batches.
pub const CACHE_BYTES: usize = 16 << 20;

/// Largest blob a [`Decoder`] remembers: bigger ones (never an agent's) are parsed each time.
pub const CACHE_BLOB_MAX: usize = 64 << 10;

/// Decodes batches, remembering parsed metadata by its exact bytes so that the metadata of
/// the same instance, which arrives every polling cycle, is parsed once. Bounded by bytes:
/// after [`CACHE_BYTES`] of distinct blobs the memory is dropped and refilled.
#[derive(Default)]
pub struct Decoder {
    cache: HashMap<Vec<u8>, Arc<Metadata>>,
    /// Sum of the cached blobs' lengths.
    cached_bytes: usize,
}

impl Decoder {
    /// Decodes one body (see [`decode`]).
    pub fn decode(
        &mut self,
        body: &[u8],
        version: Option<i64>,
    ) -> Result<Vec<Sample>, DecodeError> {
        if let Some(v) = version
            && !READS.contains(&v)
        {
            return Err(DecodeError::Version(v));
        }
        let b: BatchIn<'_> = from_slice_limited(body)?;
        let mut table = Vec::with_capacity(b.metadata.len());
        for blob in &b.metadata {
            table.push(self.metadata(blob)?);
        }
        let mut out = Vec::with_capacity(b.samples.len());
        let bad = |what: String| DecodeError::Metadata(what);
        for w in b.samples {
            // The fields a group shares, or the sample's own.
            let (user_id, project_id, resource_id, ts, md, source, monotonic_time) = match w.g {
                Some(g) => {
                    let g = b
                        .groups
                        .get(g as usize)
                        .ok_or_else(|| bad(format!("group index {g} out of range")))?;
                    (
                        g.user_id.clone(),
                        g.project_id.clone(),
                        g.resource_id.clone(),
                        g.timestamp,
                        Some(g.md),
                        g.source.clone(),
                        g.monotonic_time,
                    )
                }
                None => (
                    w.user_id,
                    w.project_id,
                    w.resource_id
                        .ok_or_else(|| bad("a sample without resource id".into()))?,
                    w.timestamp
                        .ok_or_else(|| bad("a sample without timestamp".into()))?,
                    w.md,
                    w.source
                        .ok_or_else(|| bad("a sample without source".into()))?,
                    w.monotonic_time,
                ),
            };
            let resource_metadata = match (md, w.resource_metadata) {
                (Some(i), _) => table
                    .get(i as usize)
                    .cloned()
                    .ok_or_else(|| bad(format!("metadata index {i} out of range")))?,
                (None, Some(m)) => Arc::new(m),
                (None, None) => Arc::default(),
            };
            let timestamp = chrono::DateTime::from_timestamp_micros(ts)
                .ok_or_else(|| bad(format!("timestamp {ts} out of range")))?;
            out.push(Sample {
                name: w.name,
                kind: w.kind,
                unit: w.unit,
                volume: w.volume,
                user_id,
                project_id,
                resource_id,
                timestamp,
                resource_metadata,
                source,
                message_id: w.message_id,
                monotonic_time,
            });
        }
        Ok(out)
    }

    pub(super) fn metadata(&mut self, blob: &[u8]) -> Result<Arc<Metadata>, DecodeError> {
        if let Some(m) = self.cache.get(blob) {
            return Ok(m.clone());
        }
        let m: Metadata = from_slice_limited(blob)
            .map_err(|e| DecodeError::Metadata(format!("metadata blob: {e}")))?;
        let m = Arc::new(m);
        if blob.len() > CACHE_BLOB_MAX {
            return Ok(m);
        }
        if self.cached_bytes + blob.len() > CACHE_BYTES {
            self.cache.clear();
            self.cached_bytes = 0;
        }
        self.cached_bytes += blob.len();
        self.cache.insert(blob.to_vec(), m.clone());
        Ok(m)
    }
}

impl Decoder {
    /// Bytes of blobs held in the cache (for tests and metrics).
    pub fn cached_bytes(&self) -> usize {
        self.cached_bytes
    }
}
