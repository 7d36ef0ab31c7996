//! Property tests that fuzz vmeter-core's decoders on stable Rust: the wire decoder (any
//! bytes, mutations of real batches, hostile nesting), the sample contract and the
//! timestamp parser. None may panic, overflow the stack or accept what breaks its rules.
//!
//! Cases per property: `VMETER_FUZZ_CASES` (default 1,000: the CI budget); the long local
//! mode is e.g. `VMETER_FUZZ_CASES=200000 cargo test --release -p vmeter-core --test fuzz`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use vmeter_core::contract::Contract;
use vmeter_core::sample::parse_timestamp;
use vmeter_core::wire::{self, Decoder};
use vmeter_core::{Metadata, Sample, SampleType};

fn cases() -> u32 {
    std::env::var("VMETER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn arb_json(depth: u32) -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(depth, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_metadata() -> impl Strategy<Value = Metadata> {
    prop::collection::btree_map(".{0,10}", arb_json(4), 0..8).prop_map(|m| m.into_iter().collect())
}

fn arb_sample() -> impl Strategy<Value = Sample> {
    (
        (
            ".{0,20}",
            prop_oneof![
                Just(SampleType::Gauge),
                Just(SampleType::Delta),
                Just(SampleType::Cumulative)
            ],
            ".{0,6}",
            prop_oneof![
                any::<f64>(),
                Just(f64::NAN),
                Just(f64::INFINITY),
                -1e18f64..1e18
            ],
            prop::option::of(".{0,12}"),
            prop::option::of(".{0,12}"),
        ),
        (
            ".{0,40}",
            // Microseconds over the whole range chrono accepts and beyond the contract's.
            -62_000_000_000_000_000i64..250_000_000_000_000_000i64,
            arb_metadata(),
            ".{0,10}",
            any::<u128>(),
            prop::option::of(any::<f64>()),
        ),
    )
        .prop_map(
            |((name, kind, unit, volume, user, project), (rid, us, md, source, id, mono))| Sample {
                name,
                kind,
                unit,
                volume,
                user_id: user,
                project_id: project,
                resource_id: rid,
                timestamp: DateTime::from_timestamp_micros(us).unwrap_or(DateTime::UNIX_EPOCH),
                resource_metadata: Arc::new(md),
                source,
                message_id: uuid::Uuid::from_u128(id),
                monotonic_time: mono,
            },
        )
}

/// Equality that treats NaN as equal to NaN (a round trip must keep every bit pattern
/// class, not compare NaN by IEEE rules).
fn same(a: &Sample, b: &Sample) -> bool {
    let f = |x: f64, y: f64| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
    let m = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => f(x, y),
        (None, None) => true,
        _ => false,
    };
    a.name == b.name
        && a.kind == b.kind
        && a.unit == b.unit
        && f(a.volume, b.volume)
        && a.user_id == b.user_id
        && a.project_id == b.project_id
        && a.resource_id == b.resource_id
        && a.timestamp == b.timestamp
        && a.resource_metadata == b.resource_metadata
        && a.source == b.source
        && a.message_id == b.message_id
        && m(a.monotonic_time, b.monotonic_time)
}

proptest! {
    #![proptest_config(config())]

    /// Whatever the bytes and the format header, decoding answers Ok or Err.
    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(
        body in prop::collection::vec(any::<u8>(), 0..2048),
        version in prop::option::of(-2i64..6),
    ) {
        let _ = wire::decode(&body, version);
    }

    /// Every sample (NaN volumes, any string, nested metadata) survives a round trip exactly.
    #[test]
    fn batches_round_trip(samples in prop::collection::vec(arb_sample(), 0..12)) {
        let body = wire::encode(&samples);
        let back = wire::decode(&body, Some(wire::FORMAT_VERSION)).unwrap();
        prop_assert_eq!(back.len(), samples.len());
        for (a, b) in samples.iter().zip(&back) {
            prop_assert!(same(a, b), "{a:?} != {b:?}");
        }
    }

    /// A real batch with bytes flipped, inserted or cut off: decoding and then checking the
    /// contract on what decoded never panics, with a long-lived decoder (its cache) too.
    #[test]
    fn mutated_batches_never_panic(
        samples in prop::collection::vec(arb_sample(), 1..6),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut body = wire::encode(&samples);
        for (i, b) in &flips {
            let i = i.index(body.len());
            body[i] = *b;
        }
        if truncate {
            body.truncate(cut.index(body.len() + 1));
        }
        let mut d = Decoder::default();
        for _ in 0..2 {
            if let Ok(out) = d.decode(&body, None) {
                let contract = Contract::default();
                let now = Utc::now();
                for s in &out {
                    let _ = contract.check(s, now);
                }
            }
        }
    }

    /// The contract never panics, and what it accepts keeps every rule.
    #[test]
    fn contract_accepts_only_what_keeps_its_rules(s in arb_sample(), age in prop::option::of(any::<u32>()), ahead in any::<u64>()) {
        let c = Contract { max_age_days: age, max_future_secs: ahead, ..Contract::default() };
        let now = Utc::now();
        if c.check(&s, now).is_ok() {
            for f in [&s.name, &s.unit, &s.resource_id, &s.source] {
                prop_assert!(f.len() <= c.max_id_bytes && !f.chars().any(char::is_control));
            }
            prop_assert!(!s.name.is_empty() && !s.resource_id.is_empty());
            prop_assert!(s.volume.is_finite());
            prop_assert!(s.timestamp >= DateTime::UNIX_EPOCH);
            prop_assert!(chrono::Datelike::year(&s.timestamp) <= 9999);
            let json = serde_json::to_string(&*s.resource_metadata).unwrap();
            prop_assert!(!json.contains("\\u0000"));
        }
    }

    /// The timestamp parser answers Some or None for any text.
    #[test]
    fn timestamp_parser_never_panics(text in ".{0,40}", digits in "[-+0-9T:. Z]{0,40}") {
        let _ = parse_timestamp(&text);
        let _ = parse_timestamp(&digits);
    }
}

/// Metadata nested far deeper than any stack allows: the decoder refuses it (or decodes it
/// within its own depth limit) instead of overflowing the stack, and the contract refuses
/// what decoded.
#[test]
fn deeply_nested_metadata_is_refused_without_overflow() {
    let mut s = Sample {
        name: "cpu".into(),
        kind: SampleType::Gauge,
        unit: "ns".into(),
        volume: 1.0,
        user_id: None,
        project_id: None,
        resource_id: "r".into(),
        timestamp: Utc::now(),
        resource_metadata: Arc::new(Metadata::new()),
        source: "s".into(),
        message_id: uuid::Uuid::nil(),
        monotonic_time: None,
    };
    let mut md = Metadata::new();
    md.insert("k".into(), serde_json::Value::from("MARK"));
    s.resource_metadata = Arc::new(md);
    let body = wire::encode(std::slice::from_ref(&s));
    // Replace the metadata's value, the fixstr "MARK", with 100,000 nested one-element
    // arrays around a nil: a blob no encoder of ours would write.
    let mark = body.windows(5).position(|w| w == b"\xa4MARK").unwrap();
    // Blobs are bin 32 (0xc6, four length bytes); this one is {"k": "MARK"}, 8 bytes.
    let blob_start = body[..mark].iter().rposition(|b| *b == 0xc6).unwrap();
    let old_len =
        u32::from_be_bytes(body[blob_start + 1..blob_start + 5].try_into().unwrap()) as usize;
    assert_eq!(old_len, 8);
    let mut blob = body[blob_start + 5..blob_start + 5 + old_len].to_vec();
    let at = blob.windows(5).position(|w| w == b"\xa4MARK").unwrap();
    let mut nested = vec![0x91u8; 100_000];
    nested.push(0xc0);
    blob.splice(at..at + 5, nested);
    let mut hostile = body[..blob_start].to_vec();
    hostile.push(0xc6);
    hostile.extend_from_slice(&(blob.len() as u32).to_be_bytes());
    hostile.extend_from_slice(&blob);
    hostile.extend_from_slice(&body[blob_start + 5 + old_len..]);
    // Run on a thread with a small stack, as tokio's workers have (2 MiB).
    let out = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || match wire::decode(&hostile, None) {
            Err(_) => None,
            Ok(samples) => {
                let verdict = Contract::default().check(&samples[0], Utc::now());
                // Unnest before dropping: the drop of a deep serde_json::Value recurses.
                let mut samples = samples;
                let md = Arc::get_mut(&mut samples[0].resource_metadata).map(std::mem::take);
                if let Some(mut md) = md {
                    let mut v = md.remove("k");
                    while let Some(serde_json::Value::Array(mut a)) = v {
                        v = a.pop();
                    }
                }
                Some(verdict.map_err(|e| e.reason()))
            }
        })
        .unwrap()
        .join()
        .expect("decoding must not crash");
    assert!(
        matches!(out, None | Some(Err("contract_metadata_too_deep"))),
        "{out:?}"
    );
}
