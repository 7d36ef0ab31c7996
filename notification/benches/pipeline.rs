//! In-process pipeline throughput (issue 4): 1,000 resources × 1,000 cumulative `cpu`
//! samples through
//! (a) the `cpu_util` sink alone (one `rate_of_change` transformer) and
//! (b) the repository's default `pipeline.yaml` (Ceilometer's five default pipelines),
//! on one thread, one publish context per polling round of all resources (1,000 samples,
//! like one agent batch). Each round's input is generated untimed just before it is
//! processed; the timed region includes routing, every transformer, the id derivation and
//! dropping inputs and outputs.
//!
//! Baseline in the same run: a pass-through pipeline (`*` → sink without transformers), i.e.
//! the cost of routing and cloning a sample with no arithmetic at all.
//!
//! Run: `cargo bench -p notification --bench pipeline` (prints samples/s; best of 3 runs).

use std::hint::black_box;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use notification::definition;
use notification::pipeline::Runtime;

mod common;
use common::Input;

const RESOURCES: usize = 1_000;
const ROUNDS: usize = 1_000;

const CPU_UTIL: &str = r#"
sources: [{name: cpu_source, meters: [cpu], sinks: [cpu_sink]}]
sinks:
  - name: cpu_sink
    transformers:
      - name: rate_of_change
        parameters:
          target: {name: cpu_util, unit: "%", type: gauge, max: 100,
                   scale: "100.0 / (10**9 * (resource_metadata.cpu_number or 1))"}
    publishers: [notifier://]
"#;

const PASSTHROUGH: &str = r#"
sources: [{name: all, meters: ["*"], sinks: [all]}]
sinks: [{name: all, publishers: [notifier://]}]
"#;

const DEFAULT: &str = include_str!("../../pipeline.yaml");

/// Runs all rounds once; returns (seconds inside the runtime, samples published).
///
/// Each round's input is built just before it is processed (untimed), as the service
/// decodes a message just before processing it: the samples are cache-warm, as they are
/// in the service. Timed: `publish_context` and dropping its outputs.
fn run_once(yaml: &str, input: &Input) -> (f64, usize) {
    let def = Arc::new(definition::parse(yaml, "bench.yaml").expect("bench pipeline loads"));
    let mut rt = Runtime::new(def);
    let now = Utc::now();
    let mut published = 0usize;
    let mut timed = std::time::Duration::ZERO;
    for round in 0..ROUNDS {
        let ctx = input.context(round);
        let start = Instant::now();
        for e in rt.publish_context(ctx, now) {
            published += e.samples.len();
            black_box(e);
        }
        black_box(rt.take_drops());
        timed += start.elapsed();
    }
    (timed.as_secs_f64(), published)
}

fn bench(label: &str, yaml: &str, target: Option<f64>) {
    let n = (RESOURCES * ROUNDS) as f64;
    let mut best = f64::INFINITY;
    let mut published = 0;
    let input = Input::new(RESOURCES);
    for _ in 0..3 {
        let (secs, p) = run_once(yaml, &input);
        best = best.min(secs);
        published = p;
    }
    let rate = n / best;
    let verdict = match target {
        Some(t) if rate >= t => format!("target ≥ {t:.0}/s: MET"),
        Some(t) => format!("target ≥ {t:.0}/s: NOT MET"),
        None => "baseline".to_string(),
    };
    println!(
        "{label:<34} {n:>9.0} samples in {best:>7.3} s = {rate:>11.0} samples/s  ({published} published; {verdict})"
    );
}

/// Per-sample cost of what the service does around the pipeline: msgpack decode and
/// encode of a 1,000-sample batch and the HMAC over its bytes.
fn codec() {
    let input = Input::new(RESOURCES);
    let batch = input.context(1);
    let body = vmeter_core::wire::encode(&batch);
    let signer = vmeter_core::signing::Signer::new("bench-secret");
    let reps = 200;
    let n = (reps * batch.len()) as f64;
    let t = Instant::now();
    for _ in 0..reps {
        black_box(vmeter_core::wire::decode(black_box(&body), None).unwrap());
    }
    let dec_new = t.elapsed().as_secs_f64() * 1e9 / n;
    // A service's decoder has seen these instances' metadata in the previous cycle.
    let mut decoder = vmeter_core::wire::Decoder::default();
    decoder.decode(&body, None).unwrap();
    let t = Instant::now();
    for _ in 0..reps {
        black_box(decoder.decode(black_box(&body), None).unwrap());
    }
    let dec = t.elapsed().as_secs_f64() * 1e9 / n;
    let t = Instant::now();
    for _ in 0..reps {
        black_box(vmeter_core::wire::encode(black_box(&batch)));
    }
    let enc = t.elapsed().as_secs_f64() * 1e9 / n;
    let t = Instant::now();
    for _ in 0..reps {
        black_box(signer.sign(black_box(&body)));
    }
    let sig = t.elapsed().as_secs_f64() * 1e9 / n;
    println!(
        "codec: {:.0} B/sample; decode {dec:.0} ns (metadata seen before; {dec_new:.0} ns first time), encode {enc:.0} ns, HMAC-SHA256 {sig:.0} ns per sample",
        body.len() as f64 / batch.len() as f64
    );
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters cases by substring.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    println!(
        "notification in-process pipeline, {RESOURCES} resources × {ROUNDS} cumulative cpu samples, one thread, best of 3"
    );
    let cases: [(&str, &str, Option<f64>); 3] = [
        ("baseline: pass-through sink", PASSTHROUGH, None),
        ("(a) cpu_util sink", CPU_UTIL, Some(1_000_000.0)),
        ("(b) default pipeline.yaml", DEFAULT, Some(500_000.0)),
    ];
    if filter.as_deref().is_none_or(|f| "codec".contains(f)) {
        codec();
    }
    for (label, yaml, target) in cases {
        if filter.as_deref().is_none_or(|f| label.contains(f)) {
            bench(label, yaml, target);
        }
    }
}
