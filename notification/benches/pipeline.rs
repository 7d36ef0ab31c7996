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

use chrono::{DateTime, TimeZone, Utc};
use notification::definition;
use notification::pipeline::Runtime;
use serde_json::json;
use uuid::Uuid;
use vmeter_core::{Sample, SampleType};

const RESOURCES: usize = 1_000;
const ROUNDS: usize = 1_000;
const INTERVAL_S: i64 = 60;

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

/// The agent's metadata for one instance (same keys as agent-compute sends).
fn metadata(r: usize) -> vmeter_core::sample::Metadata {
    let vcpus = 1 << (r % 3);
    let v = json!({
        "name": format!("instance-{r:08x}"),
        "instance_id": format!("{:032x}", r),
        "host": "compute-01",
        "cpu_number": vcpus,
        "vcpus": vcpus,
        "memory_mb": 2048,
        "status": "active",
        "state": "running",
        "display_name": format!("web-{r}"),
        "instance_type": "m1.small",
        "flavor": {"name": "m1.small", "vcpus": vcpus, "ram": 2048, "disk": 20},
        "image_ref": "5c1a0f5e-6b8a-4c8e-9d0f-2a4b6c8d0e1f",
    });
    v.as_object().unwrap().clone()
}

/// Input: resource ids, metadata and the start instant, shared by all rounds.
struct Input {
    ids: Vec<String>,
    md: Vec<vmeter_core::sample::Metadata>,
    t0: DateTime<Utc>,
}

impl Input {
    fn new() -> Self {
        Input {
            ids: (0..RESOURCES)
                .map(|r| Uuid::new_v5(&Uuid::NAMESPACE_OID, &r.to_le_bytes()).to_string())
                .collect(),
            md: (0..RESOURCES).map(metadata).collect(),
            t0: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        }
    }

    /// Round `round`: one cumulative cpu sample per resource, 60 s after the previous round.
    /// Every sample owns its strings and metadata, as after decoding a message.
    fn context(&self, round: usize) -> Vec<Sample> {
        (0..RESOURCES)
            .map(|r| Sample {
                name: "cpu".into(),
                kind: SampleType::Cumulative,
                unit: "ns".into(),
                volume: (round as f64) * 30e9 * ((r % 7) as f64 + 1.0) / 7.0,
                user_id: Some("0f0e0d0c0b0a09080706050403020100".into()),
                project_id: Some("00112233445566778899aabbccddeeff".into()),
                resource_id: self.ids[r].clone(),
                timestamp: self.t0 + chrono::Duration::seconds(round as i64 * INTERVAL_S),
                resource_metadata: std::sync::Arc::new(self.md[r].clone()),
                source: "openstack".into(),
                message_id: Uuid::from_u128(((round as u128) << 32) | r as u128),
                monotonic_time: Some((round as i64 * INTERVAL_S) as f64),
            })
            .collect()
    }
}

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
    let input = Input::new();
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
    for (label, yaml, target) in cases {
        if filter.as_deref().is_none_or(|f| label.contains(f)) {
            bench(label, yaml, target);
        }
    }
}
