//! Property tests that fuzz the notification service's parsers on stable Rust: the
//! pipeline.yaml loader (any text, mutations of real files, hostile nesting), the expression
//! language (parser and evaluator) and the pipeline runtime on any samples. None may panic
//! or overflow the stack; a bad file is an error, never a half-loaded pipeline.
//!
//! Cases per property: `VMETER_FUZZ_CASES` (default 1,000: the CI budget); the long local
//! mode is e.g. `VMETER_FUZZ_CASES=200000 cargo test --release -p notification --test fuzz`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use notification::definition;
use notification::expr::Expr;
use notification::pipeline::Runtime;
use notification::transformers::SampleScope;
use proptest::prelude::*;
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

/// The repository's default pipeline.yaml (Ceilometer's five defaults), shipped with the crate's tests.
const DEFAULT_PIPELINE: &str = include_str!("../../pipeline.yaml");

/// Tokens of the expression language and near misses, so generated texts get past the lexer.
fn arb_expr() -> impl Strategy<Value = String> {
    let tok = prop_oneof![
        Just("volume"),
        Just("resource_metadata"),
        Just("."),
        Just("cpu_number"),
        Just("flavor"),
        Just("vcpus"),
        Just("("),
        Just(")"),
        Just("+"),
        Just("-"),
        Just("*"),
        Just("/"),
        Just("%"),
        Just("**"),
        Just("<"),
        Just("=="),
        Just("and"),
        Just("or"),
        Just("not"),
        Just("min"),
        Just("max"),
        Just("abs"),
        Just("int"),
        Just("float"),
        Just("round"),
        Just(","),
        Just("1"),
        Just("0"),
        Just("2.5e308"),
        Just("1e-320"),
        Just("10**9"),
        Just("9223372036854775807"),
        Just("'s'"),
        Just("$(cpu)"),
        Just("$(memory.usage)"),
        Just("None"),
        Just("True"),
    ];
    prop::collection::vec(tok, 0..40).prop_map(|t| t.join(" "))
}

fn sample(volume: f64, md: Metadata) -> Sample {
    Sample {
        name: "cpu".into(),
        kind: SampleType::Cumulative,
        unit: "ns".into(),
        volume,
        user_id: None,
        project_id: Some("p".into()),
        resource_id: "r".into(),
        timestamp: DateTime::UNIX_EPOCH,
        resource_metadata: Arc::new(md),
        source: "openstack".into(),
        message_id: uuid::Uuid::nil(),
        monotonic_time: None,
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any text: the loader answers a pipeline or errors, never a panic.
    #[test]
    fn loader_never_panics_on_any_text(text in ".{0,300}") {
        let _ = definition::parse(&text, "fuzz.yaml");
    }

    /// The default file with bytes replaced, inserted or removed: still no panic, and every
    /// error names the file.
    #[test]
    fn loader_never_panics_on_mutated_files(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, "[-:\\[\\]{}!*&'\" a-z0-9\n]{0,3}"), 1..6),
    ) {
        let mut text = DEFAULT_PIPELINE.to_string();
        for (at, kind, piece) in &edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            match kind {
                0 => text.insert_str(i, piece),
                1 => {
                    let mut end = (i + piece.len().max(1)).min(text.len());
                    while !text.is_char_boundary(end) {
                        end += 1;
                    }
                    text.replace_range(i..end, piece);
                }
                _ => {
                    let mut end = (i + 5).min(text.len());
                    while !text.is_char_boundary(end) {
                        end += 1;
                    }
                    text.replace_range(i..end, "");
                }
            }
        }
        if let Err(e) = definition::parse(&text, "fuzz.yaml") {
            prop_assert!(e.to_string().contains("fuzz.yaml"), "{e}");
        }
    }

    /// Expressions: parse or error; a parsed one evaluates to a number or an error.
    #[test]
    fn expressions_parse_and_evaluate_without_panic(text in arb_expr(), volume in any::<f64>(), cpus in prop::option::of(any::<i64>())) {
        let mut md = Metadata::new();
        if let Some(c) = cpus {
            md.insert("cpu_number".into(), c.into());
        }
        md.insert("flavor".into(), serde_json::json!({"vcpus": 2}));
        let s = sample(volume, md);
        for e in [Expr::parse(&text), Expr::parse_arithmetic(&text)].into_iter().flatten() {
            let _ = e.eval_f64(&SampleScope(&s));
        }
    }

    /// Any characters at all reach the lexer too.
    #[test]
    fn expression_lexer_never_panics(text in ".{0,80}") {
        let _ = Expr::parse(&text);
        let _ = Expr::parse_arithmetic(&text);
    }

    /// The default pipeline on arbitrary samples (any volume, time, type, repeated ids):
    /// publish contexts and flushes never panic.
    #[test]
    fn runtime_never_panics_on_any_samples(
        batch in prop::collection::vec((
            prop_oneof![Just("cpu"), Just("disk.device.read.bytes"), Just("network.incoming.bytes"), Just("memory"), Just("x")],
            0u8..3,
            any::<f64>(),
            -62_000_000_000_000_000i64..250_000_000_000_000_000i64,
            prop::option::of(any::<f64>()),
            0u8..4,
            prop::option::of(any::<i32>()),
        ), 0..30),
    ) {
        let def = Arc::new(definition::parse(DEFAULT_PIPELINE, "pipeline.yaml").unwrap());
        let mut rt = Runtime::new(def);
        let mut samples = Vec::new();
        for (name, kind, volume, us, mono, rid, cpus) in batch {
            let mut md = Metadata::new();
            if let Some(c) = cpus {
                md.insert("cpu_number".into(), c.into());
            }
            let mut s = sample(volume, md);
            s.name = name.into();
            s.kind = [SampleType::Gauge, SampleType::Delta, SampleType::Cumulative][kind as usize];
            s.timestamp = DateTime::from_timestamp_micros(us).unwrap_or(DateTime::UNIX_EPOCH);
            s.monotonic_time = mono;
            s.resource_id = format!("r{rid}");
            s.message_id = uuid::Uuid::from_u128(u128::from(rid) + us as u128);
            samples.push(s);
        }
        let now = Utc::now();
        let half = samples.len() / 2;
        let rest = samples.split_off(half);
        let _ = rt.publish_context(samples, now);
        let _ = rt.publish_context(rest, now);
        let _ = rt.flush(DateTime::<Utc>::MAX_UTC);
        let _ = rt.evict_quiet(chrono::Duration::MAX, now);
        let _ = rt.take_drops();
    }
}

/// Nesting far deeper than any stack allows, in YAML: an error, not a crash.
#[test]
fn deeply_nested_yaml_is_an_error() {
    let deep = format!("sources: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let mapping = format!("sinks: {}1{}\n", "{a: ".repeat(50_000), "}".repeat(50_000));
    for text in [deep, mapping] {
        let out = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || definition::parse(&text, "deep.yaml").is_err())
            .unwrap()
            .join()
            .expect("the loader must not crash");
        assert!(out);
    }
}
