//! The unit of data that flows through vmeter.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Free-form resource metadata (`resource_metadata` in Ceilometer), nested maps allowed.
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// Ceilometer's three sample types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleType {
    /// An absolute value at one instant (memory in MiB, vCPU count, cpu_util %).
    Gauge,
    /// The change since the previous report.
    Delta,
    /// A monotonically increasing counter that may reset (CPU time in ns, bytes read).
    Cumulative,
}

impl SampleType {
    /// The lowercase name used on the wire, in pipeline.yaml and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            SampleType::Gauge => "gauge",
            SampleType::Delta => "delta",
            SampleType::Cumulative => "cumulative",
        }
    }

    /// Parses the lowercase name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gauge" => Some(SampleType::Gauge),
            "delta" => Some(SampleType::Delta),
            "cumulative" => Some(SampleType::Cumulative),
            _ => None,
        }
    }
}

impl std::fmt::Display for SampleType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One measurement of one meter for one resource.
///
/// Field names are Ceilometer's so that pipeline.yaml expressions (`resource_metadata.cpu_number`)
/// and SQL read the same. Invariants kept by every producer in vmeter: `volume` is finite;
/// `message_id` is unique per distinct measurement and stable across redeliveries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Meter name, e.g. `cpu`, `disk.device.read.bytes`, `cpu_util`.
    pub name: String,
    /// Gauge, delta or cumulative.
    #[serde(rename = "type")]
    pub kind: SampleType,
    /// Unit of `volume`: `ns`, `B`, `MiB`, `%`, `vcpu`, `B/s`, …
    pub unit: String,
    /// The measured value, in `unit`.
    pub volume: f64,
    /// Owner user (Nova instance owner); `None` when unknown.
    pub user_id: Option<String>,
    /// Owner project (tenant); `None` when unknown.
    pub project_id: Option<String>,
    /// What was measured: instance UUID, `<uuid>-vda`, `<name>-<uuid>-tap0`, host name, …
    pub resource_id: String,
    /// When the value was read, UTC, microsecond precision on the wire.
    #[serde(with = "micros")]
    pub timestamp: DateTime<Utc>,
    /// Metadata a scale expression, a bill or a dashboard needs (`cpu_number`, `flavor`, …).
    ///
    /// Shared (`Arc`): one instance's metadata is the same for all its samples of a cycle,
    /// and a pipeline clones samples once per matching sink; cloning must be a refcount.
    #[serde(default)]
    pub resource_metadata: Arc<Metadata>,
    /// Origin of the sample (`openstack` by default, as in Ceilometer).
    pub source: String,
    /// Unique id of this measurement; the storage dedup key's companion and the API sample id.
    pub message_id: Uuid,
    /// The producing host's monotonic clock, in seconds, at the moment libvirt answered.
    /// Preferred over `timestamp` for rates because it does not jump with NTP.
    #[serde(default)]
    pub monotonic_time: Option<f64>,
}

/// Default `source` of samples, as Ceilometer's `sample_source` option.
pub const DEFAULT_SOURCE: &str = "openstack";

/// Serialises a timestamp as integer microseconds since the Unix epoch (compact and exact).
pub mod micros {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(ts.timestamp_micros())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let us = i64::deserialize(d)?;
        DateTime::from_timestamp_micros(us)
            .ok_or_else(|| D::Error::custom("timestamp out of range"))
    }
}

/// Parses an ISO-8601 timestamp as Ceilometer wrote them: with or without an offset (a naive
/// timestamp is UTC), with a `T` or a space, with or without fractional seconds.
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M:%S%.f%z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc());
        }
    }
    None
}

/// Formats a timestamp the way the API and tools print it: RFC 3339, microseconds, `+00:00`.
pub fn format_timestamp(ts: &DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_naive_offset_and_space_forms() {
        let a = parse_timestamp("2018-07-30T12:00:00").unwrap();
        let b = parse_timestamp("2018-07-30T12:00:00+00:00").unwrap();
        let c = parse_timestamp("2018-07-30 14:00:00.000000+02:00").unwrap();
        let d = parse_timestamp("2018-07-30T12:00:00Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, d);
        let e = parse_timestamp("2018-07-30T12:00:00.000001").unwrap();
        assert_eq!((e - a).num_microseconds(), Some(1));
        assert!(parse_timestamp("yesterday").is_none());
        assert!(parse_timestamp("2018-13-30T12:00:00").is_none());
    }
}
