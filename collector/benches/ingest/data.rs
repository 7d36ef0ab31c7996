//! The ingest bench's data: 100 resources × 10,000 points of a `cpu_util`-like gauge with
//! agent metadata that changes now and then, in processed-queue messages.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use serde_json::json;
use vmeter_core::{Sample, SampleType};

use super::{PER_MESSAGE_POINTS, POINTS, RESOURCES};

/// Flavor of resource `r` at point `p`: every resource is resized twice over the run
/// (m1.small → m1.medium at point 3,000, → m1.large at 7,000: ~8 and ~19 hours in).
pub fn flavor(p: usize) -> (&'static str, u32, u32) {
    match p {
        0..3_000 => ("m1.small", 1, 2048),
        3_000..7_000 => ("m1.medium", 2, 4096),
        _ => ("m1.large", 4, 8192),
    }
}

/// Project of resource `r` at point `p`: every tenth resource moves to another project
/// at point 5,000.
pub fn project(r: usize, p: usize) -> String {
    if r.is_multiple_of(10) && p >= 5_000 {
        format!("project-{}-new", r % 10)
    } else {
        format!("project-{}", r % 10)
    }
}

/// Agent-style metadata of resource `r` with flavor `f`.
pub fn metadata(r: usize, f: (&str, u32, u32)) -> Arc<vmeter_core::Metadata> {
    let (name, vcpus, ram) = f;
    let v = json!({
        "name": format!("instance-{r:08x}"), "host": "compute-01", "cpu_number": vcpus,
        "vcpus": vcpus, "memory_mb": ram, "status": "active", "state": "running",
        "display_name": format!("web-{r}"), "instance_type": name,
        "flavor": {"name": name, "vcpus": vcpus, "ram": ram, "disk": 20},
        "image_ref": "5c1a0f5e-6b8a-4c8e-9d0f-2a4b6c8d0e1f",
    });
    Arc::new(v.as_object().unwrap().clone())
}

/// The metadata of each resource, one `Arc` per flavor (as the decoder shares them).
pub type Mds = Vec<HashMap<&'static str, Arc<vmeter_core::Metadata>>>;

pub fn all_metadata() -> Mds {
    (0..RESOURCES)
        .map(|r| {
            [0, 3_000, 7_000]
                .into_iter()
                .map(|p| (flavor(p).0, metadata(r, flavor(p))))
                .collect()
        })
        .collect()
}

/// Samples whose attribution (project, metadata) differs from their resource's newest.
pub fn changed_attribution() -> u64 {
    let last = POINTS - 1;
    (0..RESOURCES)
        .flat_map(|r| (0..POINTS).map(move |p| (r, p)))
        .filter(|&(r, p)| flavor(p).0 != flavor(last).0 || project(r, p) != project(r, last))
        .count() as u64
}

/// Message `k`: points `k*10 .. k*10+10` of every resource.
pub fn message(k: usize, mds: &Mds, ids: &[String]) -> Vec<Sample> {
    let t0 = t0();
    let mut out = Vec::with_capacity(RESOURCES * PER_MESSAGE_POINTS);
    for r in 0..RESOURCES {
        for p in k * PER_MESSAGE_POINTS..(k + 1) * PER_MESSAGE_POINTS {
            out.push(Sample {
                name: "cpu_util".into(),
                kind: SampleType::Gauge,
                unit: "%".into(),
                volume: ((p * 7 + r * 13) % 1000) as f64 / 10.0,
                user_id: Some("0f0e0d0c0b0a09080706050403020100".into()),
                project_id: Some(project(r, p)),
                resource_id: ids[r].clone(),
                timestamp: t0 + chrono::Duration::seconds(p as i64 * 10),
                resource_metadata: mds[r][flavor(p).0].clone(),
                source: "openstack".into(),
                message_id: uuid::Uuid::new_v4(),
                monotonic_time: None,
            });
        }
    }
    out
}

/// The first sample's time.
pub fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}
