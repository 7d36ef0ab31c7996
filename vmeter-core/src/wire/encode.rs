//! Writing batches: `encode` (serde) and `BatchWriter` (the hand-written msgpack encoder the agent and notification use).

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

use crate::sample::{Metadata, Sample, SampleType};

/// Encodes a batch in the current format. Infallible for vmeter's own `Sample`s.
pub fn encode(samples: &[Sample]) -> Vec<u8> {
    encode_iter(samples.iter(), samples.len())
}

/// Encodes the samples `samples` points at, in that order (lets a caller reorder or select
/// without moving samples).
pub fn encode_refs(samples: &[&Sample]) -> Vec<u8> {
    encode_iter(samples.iter().copied(), samples.len())
}

pub(super) fn encode_iter<'a>(samples: impl Iterator<Item = &'a Sample>, len: usize) -> Vec<u8> {
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
pub(super) fn put_shared(
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
pub(super) const BODY_HEAD: &[u8] = b"\x83\xa7samples\xdd\0\0\0\0";

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
pub(super) fn put_head(b: &mut Vec<u8>, name: &str, kind: SampleType, unit: &str) {
    put_str(b, "n");
    put_str(b, name);
    put_str(b, "t");
    put_str(b, kind.as_str());
    put_str(b, "u");
    put_str(b, unit);
}

/// A sample's own value and id: `v`, `id` (2 map entries).
#[inline(always)]
pub(super) fn put_value(b: &mut Vec<u8>, volume: f64, id: &Uuid) {
    put_str(b, "v");
    put_f64(b, volume);
    put_str(b, "id");
    rmp::encode::write_bin(b, id.as_bytes()).expect(VEC_WRITE);
}

// msgpack values through `rmp` (what rmp-serde writes with). Writing into a `Vec` cannot
// fail: it grows.
pub(super) const VEC_WRITE: &str = "writing msgpack into a Vec cannot fail";

#[inline(always)]
pub(super) fn put_str(b: &mut Vec<u8>, s: &str) {
    rmp::encode::write_str(b, s).expect(VEC_WRITE);
}

#[inline(always)]
pub(super) fn put_opt_str(b: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(b, s),
        None => put_nil(b),
    }
}

#[inline(always)]
pub(super) fn put_nil(b: &mut Vec<u8>) {
    rmp::encode::write_nil(b).expect(VEC_WRITE);
}

#[inline(always)]
pub(super) fn put_f64(b: &mut Vec<u8>, v: f64) {
    rmp::encode::write_f64(b, v).expect(VEC_WRITE);
}

/// An integer in its shortest msgpack form.
#[inline(always)]
pub(super) fn put_int(b: &mut Vec<u8>, v: i64) {
    rmp::encode::write_sint(b, v).expect(VEC_WRITE);
}
