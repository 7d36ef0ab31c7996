//! The wire format: one AMQP message carries one msgpack batch of samples.
//!
//! Body (format 2, written by this build): msgpack map with named fields
//! `{"metadata": [bin…], "samples": [WireSample…]}` where each distinct `resource_metadata`
//! map is written once, as a msgpack-encoded binary blob in `metadata`, and every sample
//! refers to it by index (`md`). Samples of one instance share one metadata map (the agent
//! reads it once per domain; a pipeline's outputs keep their input's), so it travels once
//! per batch instead of once per sample; and because a blob is bytes, a [`Decoder`] can
//! recognise metadata it has seen before (the same VM every polling cycle) and reuse the
//! parsed map instead of parsing it again.
//!
//! Format 1 (one `resource_metadata` map inline per sample) is still read, so that agents
//! can be upgraded after the services.
//!
//! Headers: [`FORMAT_HEADER`] (integer format version) and, when signing is on,
//! [`SIGNATURE_HEADER`] (hex HMAC-SHA256 of the body).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::sample::{Metadata, Sample, SampleType};

/// MIME type of every vmeter message body.
pub const CONTENT_TYPE: &str = "application/msgpack";
/// Header carrying the body format version (integer).
pub const FORMAT_HEADER: &str = "x-vmeter-format";
/// Header carrying the hex HMAC-SHA256 of the body.
pub const SIGNATURE_HEADER: &str = "x-vmeter-signature";
/// Header carrying the number of samples in the batch (for operators and counters that
/// should not need to parse bodies).
pub const SAMPLES_HEADER: &str = "x-vmeter-samples";
/// Header set on dead-lettered messages: why the message could never be processed.
pub const DEAD_REASON_HEADER: &str = "x-vmeter-dead-reason";
/// The format version this build writes.
pub const FORMAT_VERSION: i64 = 2;
/// Format versions this build reads.
pub const READS: [i64; 2] = [1, 2];

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The format header names a version this build does not read.
    #[error("unsupported format version {0}")]
    Version(i64),
    /// Not msgpack, or not a batch of samples.
    #[error("undecodable batch: {0}")]
    Msgpack(#[from] rmp_serde::decode::Error),
    /// A sample refers to a metadata entry the batch does not have, or a blob is not a map.
    #[error("undecodable batch: {0}")]
    Metadata(String),
}

#[derive(Serialize)]
struct BatchRef<'a> {
    metadata: Vec<&'a serde_bytes::Bytes>,
    samples: Vec<WireRef<'a>>,
}

/// One sample on the wire (format 2). Keys are short but named, so fields can be added
/// without breaking old readers; they are a third of a sample's bytes otherwise.
#[derive(Serialize)]
struct WireRef<'a> {
    #[serde(rename = "n")]
    name: &'a str,
    #[serde(rename = "t")]
    kind: SampleType,
    #[serde(rename = "u")]
    unit: &'a str,
    #[serde(rename = "v")]
    volume: f64,
    #[serde(rename = "usr")]
    user_id: Option<&'a str>,
    #[serde(rename = "prj")]
    project_id: Option<&'a str>,
    #[serde(rename = "rid")]
    resource_id: &'a str,
    /// Microseconds since the Unix epoch.
    #[serde(rename = "ts")]
    timestamp: i64,
    /// Index into the batch's `metadata`.
    md: u32,
    #[serde(rename = "src")]
    source: &'a str,
    #[serde(rename = "id")]
    message_id: &'a Uuid,
    #[serde(rename = "mono")]
    monotonic_time: Option<f64>,
}

#[derive(Deserialize)]
struct BatchIn<'a> {
    #[serde(default, borrow)]
    metadata: Vec<&'a serde_bytes::Bytes>,
    samples: Vec<WireIn>,
}

/// A sample of either format: short keys and `md` (format 2) or Ceilometer's names and
/// inline `resource_metadata` (format 1).
#[derive(Deserialize)]
struct WireIn {
    #[serde(rename = "n", alias = "name")]
    name: String,
    #[serde(rename = "t", alias = "type")]
    kind: SampleType,
    #[serde(rename = "u", alias = "unit")]
    unit: String,
    #[serde(rename = "v", alias = "volume")]
    volume: f64,
    #[serde(rename = "usr", alias = "user_id")]
    user_id: Option<String>,
    #[serde(rename = "prj", alias = "project_id")]
    project_id: Option<String>,
    #[serde(rename = "rid", alias = "resource_id")]
    resource_id: String,
    #[serde(rename = "ts", alias = "timestamp")]
    timestamp: i64,
    #[serde(default)]
    md: Option<u32>,
    #[serde(default)]
    resource_metadata: Option<Metadata>,
    #[serde(rename = "src", alias = "source")]
    source: String,
    #[serde(rename = "id", alias = "message_id")]
    message_id: Uuid,
    #[serde(default, rename = "mono", alias = "monotonic_time")]
    monotonic_time: Option<f64>,
}

/// Encodes a batch in the current format. Infallible for vmeter's own `Sample`s.
pub fn encode(samples: &[Sample]) -> Vec<u8> {
    encode_iter(samples.iter(), samples.len())
}

/// Encodes the samples `samples` points at, in that order (lets a caller reorder or select
/// without moving samples).
pub fn encode_refs(samples: &[&Sample]) -> Vec<u8> {
    encode_iter(samples.iter().copied(), samples.len())
}

fn encode_iter<'a>(samples: impl Iterator<Item = &'a Sample> + Clone, len: usize) -> Vec<u8> {
    // Distinct metadata by identity: producers share one Arc per instance (and a
    // pipeline's outputs keep their input's), so identity finds the repeats cheaply.
    let mut by_ptr: HashMap<*const Metadata, u32, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(len, Default::default());
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    let mut index = Vec::with_capacity(len);
    for s in samples.clone() {
        let ptr = Arc::as_ptr(&s.resource_metadata);
        let i = *by_ptr.entry(ptr).or_insert_with(|| {
            blobs.push(
                rmp_serde::to_vec(&*s.resource_metadata)
                    .expect("metadata always serialises to msgpack"),
            );
            (blobs.len() - 1) as u32
        });
        index.push(i);
    }
    let batch = BatchRef {
        metadata: blobs.iter().map(|b| serde_bytes::Bytes::new(b)).collect(),
        samples: samples
            .zip(index)
            .map(|(s, md)| WireRef {
                name: &s.name,
                kind: s.kind,
                unit: &s.unit,
                volume: s.volume,
                user_id: s.user_id.as_deref(),
                project_id: s.project_id.as_deref(),
                resource_id: &s.resource_id,
                timestamp: s.timestamp.timestamp_micros(),
                md,
                source: &s.source,
                message_id: &s.message_id,
                monotonic_time: s.monotonic_time,
            })
            .collect(),
    };
    // Upper estimate of a sample without metadata, so that the buffer never regrows.
    let per_sample = 96;
    let strings: usize = batch
        .samples
        .iter()
        .map(|w| {
            w.name.len()
                + w.unit.len()
                + w.resource_id.len()
                + w.source.len()
                + w.user_id.map_or(0, str::len)
                + w.project_id.map_or(0, str::len)
        })
        .sum();
    let mut out = Vec::with_capacity(
        64 + len * per_sample + strings + blobs.iter().map(|b| b.len() + 5).sum::<usize>(),
    );
    rmp_serde::encode::write_named(&mut out, &batch).expect("a batch always serialises");
    out
}

/// Decodes a batch of format 1 or 2 (`version` is the value of [`FORMAT_HEADER`]; absent is
/// accepted, the body says which). Uses a throw-away [`Decoder`]; services keep one.
pub fn decode(body: &[u8], version: Option<i64>) -> Result<Vec<Sample>, DecodeError> {
    Decoder::default().decode(body, version)
}

/// Most distinct metadata blobs a [`Decoder`] remembers (then it starts over).
const CACHE_ENTRIES: usize = 50_000;

/// Decodes batches, remembering parsed metadata by its exact bytes so that the metadata of
/// the same instance, which arrives every polling cycle, is parsed once. Bounded: after
/// [`CACHE_ENTRIES`] distinct blobs the memory is dropped and refilled.
#[derive(Default)]
pub struct Decoder {
    cache: HashMap<Vec<u8>, Arc<Metadata>>,
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
        let b: BatchIn<'_> = rmp_serde::from_slice(body)?;
        let mut table = Vec::with_capacity(b.metadata.len());
        for blob in &b.metadata {
            table.push(self.metadata(blob)?);
        }
        let mut out = Vec::with_capacity(b.samples.len());
        for w in b.samples {
            let resource_metadata = match (w.md, w.resource_metadata) {
                (Some(i), _) => table.get(i as usize).cloned().ok_or_else(|| {
                    DecodeError::Metadata(format!("metadata index {i} out of range"))
                })?,
                (None, Some(m)) => Arc::new(m),
                (None, None) => Arc::default(),
            };
            let timestamp =
                chrono::DateTime::from_timestamp_micros(w.timestamp).ok_or_else(|| {
                    DecodeError::Metadata(format!("timestamp {} out of range", w.timestamp))
                })?;
            out.push(Sample {
                name: w.name,
                kind: w.kind,
                unit: w.unit,
                volume: w.volume,
                user_id: w.user_id,
                project_id: w.project_id,
                resource_id: w.resource_id,
                timestamp,
                resource_metadata,
                source: w.source,
                message_id: w.message_id,
                monotonic_time: w.monotonic_time,
            });
        }
        Ok(out)
    }

    fn metadata(&mut self, blob: &[u8]) -> Result<Arc<Metadata>, DecodeError> {
        if let Some(m) = self.cache.get(blob) {
            return Ok(m.clone());
        }
        let m: Metadata = rmp_serde::from_slice(blob)
            .map_err(|e| DecodeError::Metadata(format!("metadata blob: {e}")))?;
        let m = Arc::new(m);
        if self.cache.len() >= CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(blob.to_vec(), m.clone());
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::SampleType;
    use chrono::{TimeZone, Utc};

    fn sample() -> Sample {
        let mut md = crate::Metadata::new();
        md.insert("cpu_number".into(), 2.into());
        md.insert(
            "flavor".into(),
            serde_json::json!({"name": "m1.small", "vcpus": 2}),
        );
        Sample {
            name: "cpu".into(),
            kind: SampleType::Cumulative,
            unit: "ns".into(),
            volume: 1.5e12,
            user_id: Some("u".into()),
            project_id: None,
            resource_id: "r".into(),
            timestamp: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
                + chrono::Duration::microseconds(7),
            resource_metadata: md.into(),
            source: "openstack".into(),
            message_id: uuid::Uuid::now_v7(),
            monotonic_time: Some(12345.678),
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let s = vec![sample(), sample()];
        let body = encode(&s);
        assert_eq!(decode(&body, Some(FORMAT_VERSION)).unwrap(), s);
        assert_eq!(decode(&body, None).unwrap(), s);
    }

    #[test]
    fn metadata_travels_once_and_is_parsed_once() {
        let a = sample();
        let mut b = sample();
        b.resource_metadata = a.resource_metadata.clone();
        let mut c = sample();
        c.resource_metadata = Arc::new(crate::Metadata::new());
        let body = encode(&[a.clone(), b.clone(), c.clone()]);
        #[derive(serde::Deserialize)]
        struct Blobs {
            metadata: Vec<serde_bytes::ByteBuf>,
        }
        let blobs: Blobs = rmp_serde::from_slice(&body).unwrap();
        assert_eq!(
            blobs.metadata.len(),
            2,
            "two distinct maps, written once each"
        );
        let mut dec = Decoder::default();
        let one = dec.decode(&body, Some(2)).unwrap();
        assert_eq!(one, vec![a, b, c]);
        assert!(Arc::ptr_eq(
            &one[0].resource_metadata,
            &one[1].resource_metadata
        ));
        let two = dec.decode(&body, Some(2)).unwrap();
        assert!(
            Arc::ptr_eq(&one[0].resource_metadata, &two[0].resource_metadata),
            "seen metadata is reused, not parsed again"
        );
    }

    #[test]
    fn reads_format_1() {
        #[derive(serde::Serialize)]
        struct V1<'a> {
            samples: &'a [Sample],
        }
        let s = vec![sample(), sample()];
        let body = rmp_serde::to_vec_named(&V1 { samples: &s }).unwrap();
        assert_eq!(decode(&body, Some(1)).unwrap(), s);
        assert_eq!(decode(&body, None).unwrap(), s);
    }

    #[test]
    fn rejects_bad_metadata_index() {
        let mut body = encode(&[sample()]);
        // The single sample's `md` is 0 (positive fixint 0x00 after the key "md").
        let pos = body.windows(3).position(|w| w == b"md\x00").unwrap();
        body[pos + 2] = 0x05;
        assert!(matches!(decode(&body, None), Err(DecodeError::Metadata(_))));
    }

    #[test]
    fn rejects_garbage_and_unknown_version() {
        assert!(matches!(
            decode(b"\x93garbage", None),
            Err(DecodeError::Msgpack(_))
        ));
        assert!(matches!(
            decode(&encode(&[sample()]), Some(99)),
            Err(DecodeError::Version(99))
        ));
        // A valid msgpack map that is not a batch.
        let other = rmp_serde::to_vec_named(&serde_json::json!({"x": 1})).unwrap();
        assert!(decode(&other, None).is_err());
    }
}
