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

use serde::Deserialize;
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

fn encode_iter<'a>(samples: impl Iterator<Item = &'a Sample>, len: usize) -> Vec<u8> {
    let mut w = BatchWriter::with_capacity(len);
    for s in samples {
        // Distinct metadata by identity: producers share one Arc per instance (and a
        // pipeline's outputs keep their input's), so identity finds the repeats cheaply.
        let md = &s.resource_metadata;
        let i = w.metadata(Arc::as_ptr(md) as usize, |out| {
            rmp_serde::encode::write(out, &**md).expect("metadata always serialises to msgpack")
        });
        w.push(&s.view(), i);
    }
    w.finish()
}

/// Encodes `md` as a metadata blob (a msgpack map), the form [`BatchWriter::metadata`]
/// copies into a batch. A producer that sends the same metadata every cycle keeps this
/// instead of the map.
pub fn encode_metadata(md: &Metadata) -> Vec<u8> {
    rmp_serde::to_vec(md).expect("metadata always serialises to msgpack")
}

/// A sample borrowed from wherever its parts live (everything but the metadata, which a
/// [`BatchWriter`] takes separately, once per batch).
#[derive(Debug, Clone, Copy)]
pub struct SampleView<'a> {
    pub name: &'a str,
    pub kind: SampleType,
    pub unit: &'a str,
    pub volume: f64,
    pub user_id: Option<&'a str>,
    pub project_id: Option<&'a str>,
    pub resource_id: &'a str,
    /// Microseconds since the Unix epoch.
    pub timestamp_us: i64,
    pub source: &'a str,
    pub message_id: Uuid,
    /// Seconds of the producing host's monotonic clock.
    pub monotonic_time: Option<f64>,
}

impl Sample {
    /// This sample as a [`SampleView`].
    pub fn view(&self) -> SampleView<'_> {
        SampleView {
            name: &self.name,
            kind: self.kind,
            unit: &self.unit,
            volume: self.volume,
            user_id: self.user_id.as_deref(),
            project_id: self.project_id.as_deref(),
            resource_id: &self.resource_id,
            timestamp_us: self.timestamp.timestamp_micros(),
            source: &self.source,
            message_id: self.message_id,
            monotonic_time: self.monotonic_time,
        }
    }
}

/// The fields that the samples of one resource from one reading share (owner, resource
/// id, time, source, monotonic clock), encoded once for all of them
/// ([`BatchWriter::push_shared`]). Reusable: [`Shared::set`] overwrites it.
#[derive(Debug, Default, Clone)]
pub struct Shared {
    bytes: Vec<u8>,
}

impl Shared {
    /// Encodes the shared fields.
    pub fn set(
        &mut self,
        user_id: Option<&str>,
        project_id: Option<&str>,
        resource_id: &str,
        timestamp_us: i64,
        source: &str,
        monotonic_time: Option<f64>,
    ) {
        let t = &mut self.bytes;
        t.clear();
        key(t, b"usr");
        put_opt_str(t, user_id);
        key(t, b"prj");
        put_opt_str(t, project_id);
        key(t, b"rid");
        put_str(t, resource_id);
        key(t, b"ts");
        put_int(t, timestamp_us);
        key(t, b"src");
        put_str(t, source);
        key(t, b"mono");
        match monotonic_time {
            Some(m) => put_f64(t, m),
            None => t.push(0xc0),
        }
    }
}

/// What is particular to one sample when the rest is [`Shared`].
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub name: &'a str,
    pub kind: SampleType,
    pub unit: &'a str,
    pub volume: f64,
    pub message_id: Uuid,
}

/// Writes one batch (format 2) sample by sample, without building [`Sample`]s: the body
/// is `{"samples": [WireSample…], "metadata": [bin…]}` (readers take the keys in any
/// order). Samples are encoded straight into the body; each distinct metadata blob is
/// copied once per batch. Reusable: [`BatchWriter::finish`] starts the next batch.
///
/// Sample keys are short but named, so fields can be added without breaking old readers:
/// `n` name, `t` type, `u` unit, `v` volume (f64), `id` message id (16-byte bin), `md`
/// index into `metadata`, `usr`/`prj` owner (str or nil), `rid` resource id, `ts` µs
/// since the epoch (int), `src` source, `mono` monotonic seconds (f64 or nil).
pub struct BatchWriter {
    body: Vec<u8>,
    count: u32,
    /// Metadata blobs, each as msgpack bin32, in index order.
    blobs: Vec<u8>,
    /// Identity key of each blob already in this batch → its index.
    seen: HashMap<usize, u32, foldhash::fast::RandomState>,
    /// The last (key, index) looked up: consecutive samples mostly share metadata.
    last_md: Option<(usize, u32)>,
    /// Scratch space of [`BatchWriter::push`].
    scratch: Shared,
}

/// `{"samples": ` then an array32 header whose count is patched by `finish`.
const BODY_HEAD: &[u8] = b"\x82\xa7samples\xdd\0\0\0\0";

impl Default for BatchWriter {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl BatchWriter {
    /// A writer with room for about `samples` samples before it regrows.
    pub fn with_capacity(samples: usize) -> Self {
        let mut body = Vec::with_capacity(BODY_HEAD.len() + samples * 200);
        body.extend_from_slice(BODY_HEAD);
        BatchWriter {
            body,
            count: 0,
            blobs: Vec::new(),
            seen: HashMap::default(),
            last_md: None,
            scratch: Shared::default(),
        }
    }

    /// Samples written since the last [`BatchWriter::finish`].
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether no sample was written since the last [`BatchWriter::finish`].
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The index in this batch of the metadata identified by `key`. The first time `key`
    /// is seen in a batch, `write` appends the metadata as one msgpack map (for metadata
    /// kept encoded, a copy of [`encode_metadata`]'s bytes).
    ///
    /// Invariant (the caller's): within one batch, equal keys mean equal metadata. A
    /// pointer works while every pointee outlives the batch; producers whose metadata is
    /// replaced mid-batch use a number never reused instead.
    pub fn metadata(&mut self, key: usize, write: impl FnOnce(&mut Vec<u8>)) -> u32 {
        if let Some((k, i)) = self.last_md
            && k == key
        {
            return i;
        }
        let next = self.seen.len() as u32;
        let i = *self.seen.entry(key).or_insert_with(|| {
            let at = self.blobs.len();
            self.blobs.extend_from_slice(&[0xc6, 0, 0, 0, 0]);
            write(&mut self.blobs);
            let n = (self.blobs.len() - at - 5) as u32;
            self.blobs[at + 1..at + 5].copy_from_slice(&n.to_be_bytes());
            next
        });
        self.last_md = Some((key, i));
        i
    }

    /// Appends one sample whose metadata is entry `md` of this batch.
    pub fn push(&mut self, s: &SampleView<'_>, md: u32) {
        let mut shared = std::mem::take(&mut self.scratch);
        shared.set(
            s.user_id,
            s.project_id,
            s.resource_id,
            s.timestamp_us,
            s.source,
            s.monotonic_time,
        );
        let r = Reading {
            name: s.name,
            kind: s.kind,
            unit: s.unit,
            volume: s.volume,
            message_id: s.message_id,
        };
        self.push_shared(&r, &shared, md);
        self.scratch = shared;
    }

    /// Appends one sample made of `r` and the fields it shares with other samples; its
    /// metadata is entry `md` of this batch.
    pub fn push_shared(&mut self, r: &Reading<'_>, shared: &Shared, md: u32) {
        let b = &mut self.body;
        // Room for everything at once: one capacity check instead of one per field.
        b.reserve(64 + r.name.len() + r.unit.len() + shared.bytes.len());
        b.push(0x8c); // a map of 12 entries
        key(b, b"n");
        put_str(b, r.name);
        key(b, b"t");
        put_str(b, r.kind.as_str());
        key(b, b"u");
        put_str(b, r.unit);
        key(b, b"v");
        put_f64(b, r.volume);
        key(b, b"id");
        b.extend_from_slice(&[0xc4, 16]);
        b.extend_from_slice(r.message_id.as_bytes());
        key(b, b"md");
        put_int(b, md as i64);
        b.extend_from_slice(&shared.bytes);
        self.count += 1;
    }

    /// The encoded batch; the writer is empty again afterwards (its buffers keep their
    /// capacity).
    pub fn finish(&mut self) -> Vec<u8> {
        let at = BODY_HEAD.len() - 4;
        self.body[at..at + 4].copy_from_slice(&self.count.to_be_bytes());
        let n = self.seen.len() as u32;
        let mut trailer = [0u8; 14];
        trailer[0] = 0xa8;
        trailer[1..9].copy_from_slice(b"metadata");
        trailer[9] = 0xdd;
        trailer[10..14].copy_from_slice(&n.to_be_bytes());
        // The batch is copied out at its exact size: the writer's buffers stay allocated
        // and warm for the next batch (a fresh buffer per batch costs more in page faults
        // than the copy).
        let len = self.body.len() + trailer.len() + self.blobs.len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&trailer);
        out.extend_from_slice(&self.blobs);
        self.body.truncate(BODY_HEAD.len());
        self.blobs.clear();
        self.seen.clear();
        self.last_md = None;
        self.count = 0;
        out
    }
}

/// A short key (fixstr, < 32 bytes).
#[inline(always)]
fn key(b: &mut Vec<u8>, k: &[u8]) {
    debug_assert!(k.len() < 32);
    b.push(0xa0 | k.len() as u8);
    b.extend_from_slice(k);
}

#[inline(always)]
fn put_str(b: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        b.push(0xa0 | n as u8);
    } else if n <= u8::MAX as usize {
        b.extend_from_slice(&[0xd9, n as u8]);
    } else if n <= u16::MAX as usize {
        b.push(0xda);
        b.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        b.push(0xdb);
        b.extend_from_slice(&(n as u32).to_be_bytes());
    }
    b.extend_from_slice(s.as_bytes());
}

fn put_opt_str(b: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(b, s),
        None => b.push(0xc0),
    }
}

#[inline(always)]
fn put_f64(b: &mut Vec<u8>, v: f64) {
    b.push(0xcb);
    b.extend_from_slice(&v.to_be_bytes());
}

/// An integer in its shortest msgpack form.
#[inline(always)]
fn put_int(b: &mut Vec<u8>, v: i64) {
    if (-32..128).contains(&v) {
        // Positive and negative fixint: the value's own low byte.
        b.push(v as u8);
    } else if v >= 0 {
        b.push(0xcf);
        b.extend_from_slice(&(v as u64).to_be_bytes());
    } else {
        b.push(0xd3);
        b.extend_from_slice(&v.to_be_bytes());
    }
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
    fn hand_written_encoding_round_trips_every_length_class() {
        // String lengths at each msgpack size boundary, integers at each form's edge.
        let mut all = Vec::new();
        for (len, ts) in [
            (0, 0),
            (31, 127),
            (32, 128),
            (255, -1),
            (256, -32),
            (65_535, -33),
            (65_536, i64::MIN / 4),
        ] {
            let mut s = sample();
            s.name = "n".repeat(len);
            s.resource_id = "é".repeat(len / 2);
            s.unit = "u".repeat(len.min(40));
            s.project_id = Some("p".repeat(len));
            s.monotonic_time = if len % 2 == 0 { None } else { Some(-0.5) };
            s.timestamp = chrono::DateTime::from_timestamp_micros(ts).unwrap();
            s.kind = [SampleType::Gauge, SampleType::Delta, SampleType::Cumulative][len % 3];
            all.push(s);
        }
        let body = encode(&all);
        assert_eq!(decode(&body, Some(FORMAT_VERSION)).unwrap(), all);
        // A reused writer starts clean after `finish`.
        let mut w = BatchWriter::default();
        for round in 0..2 {
            for s in &all[round..] {
                let i = w.metadata(round, |o| {
                    rmp_serde::encode::write(o, &*s.resource_metadata).unwrap()
                });
                w.push(&s.view(), i);
            }
            assert_eq!(w.len(), all.len() - round);
            let got = decode(&w.finish(), None).unwrap();
            assert_eq!(got, all[round..]);
            assert!(w.is_empty());
        }
    }

    #[test]
    fn shared_fields_are_re_encoded_when_any_one_changes() {
        let base = sample();
        let mut v = vec![base.clone(), base.clone()];
        let variants: [&dyn Fn(&mut Sample); 8] = [
            &|s| s.user_id = None,
            &|s| s.project_id = Some("p2".into()),
            &|s| s.resource_id.push('x'),
            &|s| s.source = "other".into(),
            &|s| s.timestamp += chrono::Duration::microseconds(1),
            &|s| s.monotonic_time = None,
            &|s| s.monotonic_time = Some(1.0),
            &|s| s.resource_metadata = Arc::new(crate::Metadata::new()),
        ];
        for f in variants {
            let mut x = base.clone();
            f(&mut x);
            v.push(x.clone());
            v.push(x);
            v.push(base.clone());
        }
        assert_eq!(decode(&encode(&v), None).unwrap(), v);
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
