//! Bench input shared by the notification benches: cumulative `cpu` samples of many
//! resources, with the metadata agent-compute sends for a Nova instance.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use uuid::Uuid;
use vmeter_core::{Sample, SampleType};

/// Seconds between two polling rounds.
pub const INTERVAL_S: i64 = 60;

/// The agent's metadata for one instance (same keys as agent-compute sends).
pub fn metadata(r: usize) -> vmeter_core::sample::Metadata {
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

/// Resource ids, metadata and the start instant, shared by all rounds.
pub struct Input {
    pub resources: usize,
    ids: Vec<String>,
    md: Vec<vmeter_core::sample::Metadata>,
    t0: DateTime<Utc>,
}

impl Input {
    pub fn new(resources: usize) -> Self {
        Input {
            resources,
            ids: (0..resources)
                .map(|r| Uuid::new_v5(&Uuid::NAMESPACE_OID, &r.to_le_bytes()).to_string())
                .collect(),
            md: (0..resources).map(metadata).collect(),
            t0: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        }
    }

    /// Round `round`: one cumulative cpu sample per resource, 60 s after the previous round.
    /// Every sample owns its strings and metadata, as after decoding a message.
    pub fn context(&self, round: usize) -> Vec<Sample> {
        (0..self.resources)
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
