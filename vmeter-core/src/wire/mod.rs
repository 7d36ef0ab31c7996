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
//!
//! Where things are: this file holds the format's constants and errors; `encode.rs` writes
//! batches, `decode.rs` reads every format.

mod decode;
mod encode;

pub use decode::{CACHE_BLOB_MAX, CACHE_BYTES, Decoder, MAX_DECODE_DEPTH, decode};
pub use encode::{
    BatchWriter, MeterHead, Reading, SampleView, Shared, encode, encode_metadata, encode_refs,
};

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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use uuid::Uuid;

    use crate::sample::Sample;

    use super::decode::*;
    use super::encode::*;
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
