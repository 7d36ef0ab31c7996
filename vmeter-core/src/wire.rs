//! The wire format: one AMQP message carries one msgpack batch of samples.
//!
//! Body (format 3, written by this build): msgpack map with named fields
//! `{"metadata": [bin…], "samples": [WireSample…]}` where each distinct `resource_metadata`
//! map is written once, as a msgpack-encoded binary blob in `metadata`, and every sample
//! refers to it by index (`md`). Samples of one instance share one metadata map (the agent
//! reads it once per domain; a pipeline's outputs keep their input's), so it travels once
//! per batch instead of once per sample; and because a blob is bytes, a [`Decoder`] can
//! recognise metadata it has seen before (the same VM every polling cycle) and reuse the
//! parsed map instead of parsing it again.
//!
//! Format 3 adds `groups`: the fields that the samples of one resource from one reading
//! share (owner, resource id, time, source, monotonic clock, metadata index) written once
//! per batch; such a sample carries only its own fields and `g`, the index of its group.
//! Samples with their fields inline (format 2's) may sit in the same batch.
//!
//! Formats 1 (one `resource_metadata` map inline per sample) and 2 are still read, so that
//! agents can be upgraded after the services.
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
/// Header with what the dead-lettering service knew beyond the reason (e.g. the SQLSTATE and
/// message of a database refusal, the contract rule's wording).
pub const DEAD_DETAIL_HEADER: &str = "x-vmeter-dead-detail";
/// Header naming the service that dead-lettered samples it took out of a message.
pub const DEAD_SERVICE_HEADER: &str = "x-vmeter-dead-service";
/// The format version this build writes.
pub const FORMAT_VERSION: i64 = 3;
/// Format versions this build reads.
pub const READS: [i64; 3] = [1, 2, 3];

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
    #[serde(default)]
    groups: Vec<GroupIn>,
}

/// The shared fields of a group of samples (format 3).
#[derive(Deserialize)]
struct GroupIn {
    #[serde(rename = "usr")]
    user_id: Option<String>,
    #[serde(rename = "prj")]
    project_id: Option<String>,
    #[serde(rename = "rid")]
    resource_id: String,
    #[serde(rename = "ts")]
    timestamp: i64,
    md: u32,
    #[serde(rename = "src")]
    source: String,
    #[serde(default, rename = "mono")]
    monotonic_time: Option<f64>,
}

/// A sample of any format: short keys and `md` (format 2), short keys and a group `g`
/// (format 3), or Ceilometer's names and inline `resource_metadata` (format 1).
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
    #[serde(default, rename = "usr", alias = "user_id")]
    user_id: Option<String>,
    #[serde(default, rename = "prj", alias = "project_id")]
    project_id: Option<String>,
    #[serde(default, rename = "rid", alias = "resource_id")]
    resource_id: Option<String>,
    #[serde(default, rename = "ts", alias = "timestamp")]
    timestamp: Option<i64>,
    #[serde(default)]
    md: Option<u32>,
    #[serde(default)]
    g: Option<u32>,
    #[serde(default)]
    resource_metadata: Option<Metadata>,
    #[serde(default, rename = "src", alias = "source")]
    source: Option<String>,
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
/// id, time, source, monotonic clock), encoded once and written once per batch as a group
/// ([`BatchWriter::push_shared`]). Reusable: [`Shared::set`] overwrites it.
#[derive(Debug, Default)]
pub struct Shared {
    /// Unique in this process for each value set (never reused): the group's identity.
    id: u64,
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
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.bytes.clear();
        put_shared(
            &mut self.bytes,
            user_id,
            project_id,
            resource_id,
            timestamp_us,
            source,
            monotonic_time,
        );
    }
}

/// The six fields a resource's samples share: `usr`, `prj`, `rid`, `ts`, `src`, `mono`.
fn put_shared(
    t: &mut Vec<u8>,
    user_id: Option<&str>,
    project_id: Option<&str>,
    resource_id: &str,
    timestamp_us: i64,
    source: &str,
    monotonic_time: Option<f64>,
) {
    put_str(t, "usr");
    put_opt_str(t, user_id);
    put_str(t, "prj");
    put_opt_str(t, project_id);
    put_str(t, "rid");
    put_str(t, resource_id);
    put_str(t, "ts");
    put_int(t, timestamp_us);
    put_str(t, "src");
    put_str(t, source);
    put_str(t, "mono");
    match monotonic_time {
        Some(m) => put_f64(t, m),
        None => put_nil(t),
    }
}

/// A meter's name, type and unit, encoded once for all its samples (a producer that
/// reports the same meters every cycle keeps one per meter).
#[derive(Debug, Clone)]
pub struct MeterHead {
    name: Box<str>,
    bytes: Box<[u8]>,
}

impl MeterHead {
    pub fn new(name: &str, kind: SampleType, unit: &str) -> MeterHead {
        let mut b = Vec::new();
        put_head(&mut b, name, kind, unit);
        MeterHead {
            name: name.into(),
            bytes: b.into_boxed_slice(),
        }
    }

    /// The meter's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What is particular to one sample when the rest is [`Shared`].
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub meter: &'a MeterHead,
    pub volume: f64,
    pub message_id: Uuid,
}

/// Writes one batch (format 3) sample by sample, without building [`Sample`]s: the body
/// is `{"samples": [WireSample…], "metadata": [bin…], "groups": [Group…]}` (readers take
/// the keys in any order). Samples are encoded straight into the body; each distinct
/// metadata blob is copied once per batch, each [`Shared`] once per run of samples.
/// Reusable: [`BatchWriter::finish`] starts the next batch.
///
/// Keys are short but named, so fields can be added without breaking old readers. A
/// sample: `n` name, `t` type, `u` unit, `v` volume (f64), `id` message id (16-byte bin),
/// then either `g` (index into `groups`) or its own `md` (index into `metadata`),
/// `usr`/`prj` owner (str or nil), `rid` resource id, `ts` µs since the epoch (int), `src`
/// source, `mono` monotonic seconds (f64 or nil). A group has the latter seven.
pub struct BatchWriter {
    body: Vec<u8>,
    count: u32,
    /// Metadata blobs, each as msgpack bin32, in index order.
    blobs: Vec<u8>,
    /// Identity key of each blob already in this batch → its index.
    seen: HashMap<usize, u32, foldhash::fast::RandomState>,
    /// The last (key, index) looked up: consecutive samples mostly share metadata.
    last_md: Option<(usize, u32)>,
    /// Groups of this batch, encoded, and how many.
    groups: Vec<u8>,
    group_count: u32,
    /// (shared id, metadata index) of the last group written.
    last_group: Option<(u64, u32)>,
}

/// `{"samples": ` then an array32 header whose count is patched by `finish`.
const BODY_HEAD: &[u8] = b"\x83\xa7samples\xdd\0\0\0\0";

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
            groups: Vec::new(),
            group_count: 0,
            last_group: None,
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

    /// Appends one sample with all its fields inline; its metadata is entry `md` of this
    /// batch. (For samples that come one per resource, as a pipeline's outputs do.)
    pub fn push(&mut self, s: &SampleView<'_>, md: u32) {
        let b = &mut self.body;
        b.push(0x8c); // a map of 12 entries
        put_head(b, s.name, s.kind, s.unit);
        put_value(b, s.volume, &s.message_id);
        put_str(b, "md");
        put_int(b, md as i64);
        put_shared(
            b,
            s.user_id,
            s.project_id,
            s.resource_id,
            s.timestamp_us,
            s.source,
            s.monotonic_time,
        );
        self.count += 1;
    }

    /// Appends one sample made of `r` and the fields it shares with the samples around
    /// it; its metadata is entry `md` of this batch. The shared fields go into a group of
    /// the batch, written when `shared` or `md` differ from the previous sample's.
    pub fn push_shared(&mut self, r: &Reading<'_>, shared: &Shared, md: u32) {
        if self.last_group != Some((shared.id, md)) {
            let g = &mut self.groups;
            g.push(0x87); // a map of 7 entries
            g.extend_from_slice(&shared.bytes);
            put_str(g, "md");
            put_int(g, md as i64);
            self.group_count += 1;
            self.last_group = Some((shared.id, md));
        }
        let b = &mut self.body;
        b.reserve(48 + r.meter.bytes.len());
        b.push(0x86); // a map of 6 entries
        b.extend_from_slice(&r.meter.bytes);
        put_value(b, r.volume, &r.message_id);
        put_str(b, "g");
        put_int(b, self.group_count as i64 - 1);
        self.count += 1;
    }

    /// The encoded batch; the writer is empty again afterwards (its buffers keep their
    /// capacity).
    pub fn finish(&mut self) -> Vec<u8> {
        let at = BODY_HEAD.len() - 4;
        self.body[at..at + 4].copy_from_slice(&self.count.to_be_bytes());
        // The batch is copied out at its exact size: the writer's buffers stay allocated
        // and warm for the next batch (a fresh buffer per batch costs more in page faults
        // than the copy).
        let len = self.body.len() + 32 + self.blobs.len() + self.groups.len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&self.body);
        put_str(&mut out, "metadata");
        rmp::encode::write_array_len(&mut out, self.seen.len() as u32).expect(VEC_WRITE);
        out.extend_from_slice(&self.blobs);
        put_str(&mut out, "groups");
        rmp::encode::write_array_len(&mut out, self.group_count).expect(VEC_WRITE);
        out.extend_from_slice(&self.groups);
        self.body.truncate(BODY_HEAD.len());
        self.blobs.clear();
        self.seen.clear();
        self.last_md = None;
        self.groups.clear();
        self.group_count = 0;
        self.last_group = None;
        self.count = 0;
        out
    }
}

/// A sample's meter: `n`, `t`, `u` (3 map entries).
#[inline(always)]
fn put_head(b: &mut Vec<u8>, name: &str, kind: SampleType, unit: &str) {
    put_str(b, "n");
    put_str(b, name);
    put_str(b, "t");
    put_str(b, kind.as_str());
    put_str(b, "u");
    put_str(b, unit);
}

/// A sample's own value and id: `v`, `id` (2 map entries).
#[inline(always)]
fn put_value(b: &mut Vec<u8>, volume: f64, id: &Uuid) {
    put_str(b, "v");
    put_f64(b, volume);
    put_str(b, "id");
    rmp::encode::write_bin(b, id.as_bytes()).expect(VEC_WRITE);
}

// msgpack values through `rmp` (what rmp-serde writes with). Writing into a `Vec` cannot
// fail: it grows.
const VEC_WRITE: &str = "writing msgpack into a Vec cannot fail";

#[inline(always)]
fn put_str(b: &mut Vec<u8>, s: &str) {
    rmp::encode::write_str(b, s).expect(VEC_WRITE);
}

#[inline(always)]
fn put_opt_str(b: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(b, s),
        None => put_nil(b),
    }
}

#[inline(always)]
fn put_nil(b: &mut Vec<u8>) {
    rmp::encode::write_nil(b).expect(VEC_WRITE);
}

#[inline(always)]
fn put_f64(b: &mut Vec<u8>, v: f64) {
    rmp::encode::write_f64(b, v).expect(VEC_WRITE);
}

/// An integer in its shortest msgpack form.
#[inline(always)]
fn put_int(b: &mut Vec<u8>, v: i64) {
    rmp::encode::write_sint(b, v).expect(VEC_WRITE);
}

/// Deepest msgpack nesting the decoder follows. rmp-serde's own limit (1,024) lets a
/// forged blob of nested arrays overflow a 2 MiB stack while it is built into JSON values;
/// no batch of ours nests deeper than its metadata, which the sample contract keeps to a
/// few levels.
pub const MAX_DECODE_DEPTH: usize = 64;

/// `rmp_serde::from_slice` with [`MAX_DECODE_DEPTH`].
fn from_slice_limited<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(b);
    de.set_max_depth(MAX_DECODE_DEPTH);
    T::deserialize(&mut de)
}

/// Decodes a batch of format 1, 2 or 3 (`version` is the value of [`FORMAT_HEADER`]; absent is
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

    fn metadata(&mut self, blob: &[u8]) -> Result<Arc<Metadata>, DecodeError> {
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
            (3, 255),
            (4, 256),
            (5, 65_535),
            (6, 65_536),
            (7, u32::MAX as i64),
            (8, u32::MAX as i64 + 1),
            (9, -128),
            (10, -129),
            (11, -32_768),
            (12, -32_769),
            (13, i32::MIN as i64),
            (14, i32::MIN as i64 - 1),
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
    fn many_metadata_entries_keep_their_indexes() {
        // Indexes past every fixint/uint8/uint16 boundary.
        let all: Vec<Sample> = (0..70_000)
            .map(|i| {
                let mut s = sample();
                let mut md = crate::Metadata::new();
                md.insert("i".into(), i.into());
                s.resource_metadata = Arc::new(md);
                s
            })
            .collect();
        let got = decode(&encode(&all), None).unwrap();
        assert_eq!(got.len(), all.len());
        for (g, a) in got.iter().zip(&all).step_by(997) {
            assert_eq!(g, a);
        }
        assert_eq!(got[69_999].resource_metadata["i"], 69_999);
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

    /// Writes `samples` through groups the way the agent does (a new `Shared` whenever the
    /// shared fields change), with an inline sample in between, across two batches.
    #[test]
    fn grouped_samples_decode_to_what_was_written() {
        let base = sample();
        let mut other_md = base.clone();
        other_md.resource_metadata = Arc::new(crate::Metadata::new());
        let mut other_rid = base.clone();
        other_rid.resource_id = "disk-1".into();
        other_rid.user_id = None;
        let mut all = vec![
            base.clone(),
            base.clone(),
            other_md.clone(),
            other_rid.clone(),
        ];
        all.push(other_rid.clone());
        all.push(base.clone());
        for (i, s) in all.iter_mut().enumerate() {
            s.name = format!("m{i}");
            s.message_id = Uuid::from_u128(i as u128);
        }
        let mut w = BatchWriter::default();
        let mut shared = Shared::default();
        let mut last: Option<(String, Option<String>)> = None;
        let mut bodies = Vec::new();
        for (i, s) in all.iter().enumerate() {
            let md = &s.resource_metadata;
            let m = w.metadata(Arc::as_ptr(md) as usize, |o| {
                rmp_serde::encode::write(o, &**md).unwrap()
            });
            if i == 4 {
                // An inline sample between grouped ones.
                w.push(&s.view(), m);
                continue;
            }
            let now = Some((s.resource_id.clone(), s.user_id.clone()));
            if last != now {
                let v = s.view();
                shared.set(
                    v.user_id,
                    v.project_id,
                    v.resource_id,
                    v.timestamp_us,
                    v.source,
                    v.monotonic_time,
                );
                last = now;
            }
            let head = MeterHead::new(&s.name, s.kind, &s.unit);
            let r = Reading {
                meter: &head,
                volume: s.volume,
                message_id: s.message_id,
            };
            w.push_shared(&r, &shared, m);
            if i == 2 {
                // A batch boundary inside a run of one resource's samples.
                bodies.push(w.finish());
            }
        }
        bodies.push(w.finish());
        let mut got = Vec::new();
        for b in &bodies {
            got.extend(decode(b, Some(FORMAT_VERSION)).unwrap());
        }
        assert_eq!(got, all);
    }

    #[test]
    fn rejects_bad_group_index_and_samples_missing_fields() {
        let mut w = BatchWriter::default();
        let mut sh = Shared::default();
        sh.set(None, None, "r", 0, "openstack", None);
        let m = w.metadata(0, |o| o.push(0x80));
        let head = MeterHead::new("cpu", SampleType::Gauge, "ns");
        let r = Reading {
            meter: &head,
            volume: 1.0,
            message_id: Uuid::nil(),
        };
        w.push_shared(&r, &sh, m);
        let mut body = w.finish();
        assert_eq!(decode(&body, None).unwrap().len(), 1);
        let pos = body.windows(2).position(|w| w == b"g\x00").unwrap();
        body[pos + 1] = 0x07;
        assert!(matches!(decode(&body, None), Err(DecodeError::Metadata(_))));
        // A sample with neither a group nor its own resource id.
        #[derive(serde::Serialize)]
        struct Bare<'a> {
            samples: [std::collections::BTreeMap<&'a str, rmpv_like::V>; 1],
        }
        mod rmpv_like {
            #[derive(serde::Serialize)]
            #[serde(untagged)]
            pub enum V {
                S(&'static str),
                F(f64),
                B(serde_bytes::ByteBuf),
            }
        }
        use rmpv_like::V;
        let one = [
            ("n", V::S("cpu")),
            ("t", V::S("gauge")),
            ("u", V::S("ns")),
            ("v", V::F(1.0)),
            ("src", V::S("openstack")),
            ("id", V::B(serde_bytes::ByteBuf::from(vec![0u8; 16]))),
        ]
        .into_iter()
        .collect();
        let body = rmp_serde::to_vec_named(&Bare { samples: [one] }).unwrap();
        let err = decode(&body, None).unwrap_err().to_string();
        assert!(err.contains("without resource id"), "{err}");
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

    #[test]
    fn metadata_cache_is_bounded_by_bytes() {
        let mut d = Decoder::default();
        let mut peak = 0;
        // 400 distinct blobs of ~50 kB each: 20 MB in all, more than CACHE_BYTES.
        for i in 0..400 {
            let mut s = sample();
            let mut md = crate::Metadata::new();
            md.insert("pad".into(), format!("{i:05}{}", "x".repeat(50_000)).into());
            s.resource_metadata = Arc::new(md);
            let out = d.decode(&encode(&[s.clone()]), None).unwrap();
            assert_eq!(out[0].resource_metadata, s.resource_metadata);
            peak = peak.max(d.cached_bytes());
        }
        assert!(peak <= CACHE_BYTES, "cache held {peak} bytes");
        assert!(peak > CACHE_BYTES / 2, "the cache was used ({peak} bytes)");
        // A blob above CACHE_BLOB_MAX is parsed but not remembered.
        let before = d.cached_bytes();
        let mut s = sample();
        let mut md = crate::Metadata::new();
        md.insert("pad".into(), "y".repeat(CACHE_BLOB_MAX + 1).into());
        s.resource_metadata = Arc::new(md);
        assert_eq!(d.decode(&encode(&[s.clone()]), None).unwrap(), vec![s]);
        assert_eq!(d.cached_bytes(), before);
    }
}
