//! Per-series state of the stateful transformers: a map keyed by (meter, resource) that
//! forgets series idle past a horizon, and the previous point of a series.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;
use vmeter_core::Sample;

/// Per-series state keyed by (meter name, resource id), looked up without allocating.
///
/// Two levels (meter → resource → value) so that a hit borrows the sample's strings; only a
/// new series allocates its keys. Serialisable for the state file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SeriesMap<V> {
    by_meter: FastMap<String, FastMap<String, V>>,
}

/// `HashMap` with a fast non-cryptographic hasher (keys come from signed messages).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

impl<V> Default for SeriesMap<V> {
    fn default() -> Self {
        SeriesMap {
            by_meter: FastMap::default(),
        }
    }
}

impl<V> SeriesMap<V> {
    /// The state of `s`'s series.
    pub fn get_mut(&mut self, s: &Sample) -> Option<&mut V> {
        self.by_meter.get_mut(&s.name)?.get_mut(&s.resource_id)
    }

    /// Sets the state of `s`'s series (allocating its keys if new).
    pub fn insert(&mut self, s: &Sample, v: V) {
        match self.by_meter.get_mut(&s.name) {
            Some(m) => match m.get_mut(&s.resource_id) {
                Some(slot) => *slot = v,
                None => {
                    m.insert(s.resource_id.clone(), v);
                }
            },
            None => {
                self.by_meter
                    .entry(s.name.clone())
                    .or_default()
                    .insert(s.resource_id.clone(), v);
            }
        }
    }

    /// Removes the series for which `stale` holds; returns how many.
    pub fn retain_fresh(&mut self, stale: impl Fn(&V) -> bool) -> usize {
        let before = self.len();
        for m in self.by_meter.values_mut() {
            m.retain(|_, v| !stale(v));
        }
        self.by_meter.retain(|_, m| !m.is_empty());
        before - self.len()
    }

    /// Number of series.
    pub fn len(&self) -> usize {
        self.by_meter.values().map(FastMap::len).sum()
    }

    /// Whether no series is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What `rate_of_change` and `delta` remember of a series: its latest accepted sample.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Predecessor {
    pub volume: f64,
    pub timestamp: DateTime<Utc>,
    pub monotonic: Option<f64>,
    /// `message_id` of that sample: a redelivery carries the same id.
    pub id: Uuid,
}

impl Predecessor {
    pub fn of(s: &Sample) -> Self {
        Predecessor {
            volume: s.volume,
            timestamp: s.timestamp,
            monotonic: s.monotonic_time,
            id: s.message_id,
        }
    }
}

/// Seconds from `a` to `b`: monotonic clock when both samples carry it, else timestamps.
pub fn seconds_between(
    a_ts: DateTime<Utc>,
    a_mono: Option<f64>,
    b_ts: DateTime<Utc>,
    b_mono: Option<f64>,
) -> f64 {
    match (a_mono, b_mono) {
        (Some(a), Some(b)) => b - a,
        _ => {
            let us = (b_ts - a_ts).num_microseconds().unwrap_or(i64::MAX);
            us as f64 / 1e6
        }
    }
}
