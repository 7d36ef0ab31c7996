//! The six Ceilometer transformers and what they share: parameters, target mapping, scale,
//! deterministic output ids.
//!
//! | transformer | emits | module |
//! |---|---|---|
//! | `rate_of_change`, `unit_conversion` | per sample | [`scaling`] |
//! | `delta` | per sample | [`delta`] |
//! | `accumulator` | on flush | [`accumulator`] |
//! | `aggregator` | on flush | [`aggregator`] |
//! | `arithmetic` | on flush | [`arithmetic`] |

pub mod accumulator;
pub mod aggregator;
pub mod arithmetic;
pub mod delta;
pub mod scaling;

use chrono::{DateTime, Utc};
use serde_yaml_ng::Value;
use uuid::Uuid;
pub use vmeter_core::telemetry::DropReason;
use vmeter_core::{Sample, SampleType};

mod params;
mod series;
mod target;

pub use params::{lenient_bool, lenient_f64, lenient_i64, params};
pub use series::{FastMap, Predecessor, SeriesMap, seconds_between};
pub use target::{
    RawMap, RawSource, RawTarget, SampleScope, Scale, Substitution, Target, sample_attr,
    scale_value,
};

/// A sample a transformer dropped, with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    /// Why (the metric label); [`DropReason::is_expected`] says whether it is a warning.
    pub reason: DropReason,
    /// Human detail for the log (meter, resource, error).
    pub detail: String,
}

/// What a transformer sees besides the sample: wall clock, where it sits, where drops go.
pub struct Cx<'a> {
    /// Wall clock for time-based decisions (aggregator retention).
    pub now: DateTime<Utc>,
    /// Name of the sink owning the transformer (part of derived ids).
    pub sink: &'a str,
    /// Position of the transformer in its sink's chain (part of derived ids).
    pub index: usize,
    /// Drops recorded during this call.
    pub drops: &'a mut Vec<Dropped>,
}

/// Namespace of all ids vmeter derives (UUIDv5).
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d3e_5a8e_7c1f_4b0a_9f2e_1d4c_8b7a_6e5f);

impl Cx<'_> {
    /// Deterministic id of an output derived from `parts`, salted with sink and position:
    /// a redelivered input reproduces the same id, so storage drops the copy.
    pub fn derive_id(&self, parts: &[&[u8]]) -> Uuid {
        // Stack buffer for the common case (short sink name, one uuid part).
        let mut stack = [0u8; 128];
        let mut heap = Vec::new();
        let len = self.sink.len() + 5 + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let buf: &mut [u8] = if len <= stack.len() {
            &mut stack[..len]
        } else {
            heap.resize(len, 0);
            &mut heap
        };
        let mut at = 0;
        let mut put = |b: &[u8]| {
            buf[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        };
        put(self.sink.as_bytes());
        put(&[0]);
        put(&(self.index as u32).to_le_bytes());
        for p in parts {
            put(p);
            put(&[0]);
        }
        Uuid::new_v5(&ID_NAMESPACE, buf)
    }

    /// Records a dropped sample.
    pub fn drop(&mut self, reason: DropReason, detail: String) {
        self.drops.push(Dropped { reason, detail });
    }
}

/// A transformer instance with its state. One instance per sink entry; pipelines that share
/// a sink share the instance.
pub trait Transformer: Send {
    /// Handles one sample: returns the sample to pass on, or `None` (held or dropped).
    fn handle(&mut self, s: Sample, cx: &mut Cx<'_>) -> Option<Sample>;
    /// Releases what is due at the end of a publish context or on the timer.
    fn flush(&mut self, _cx: &mut Cx<'_>) -> Vec<Sample> {
        Vec::new()
    }
    /// The state to carry over a planned restart (JSON; `null` when stateless).
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores what [`save_state`](Self::save_state) produced for the same definition.
    fn restore_state(&mut self, _state: serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// Forgets the state of series whose newest sample is older than `cutoff` (resources
    /// gone quiet: deleted or migrated away); returns how many series were forgotten. A
    /// series that comes back starts afresh (one sample without predecessor).
    fn evict(&mut self, _cutoff: DateTime<Utc>) -> usize {
        0
    }
}

/// A parsed and validated transformer entry of pipeline.yaml.
#[derive(Debug, Clone, PartialEq)]
pub enum TransformerSpec {
    RateOfChange(scaling::ScalingSpec),
    UnitConversion(scaling::ScalingSpec),
    Delta(delta::DeltaSpec),
    Accumulator(accumulator::AccumulatorSpec),
    Aggregator(aggregator::AggregatorSpec),
    Arithmetic(arithmetic::ArithmeticSpec),
}

impl TransformerSpec {
    /// Parses the `parameters` of transformer `name`; `null` means all defaults.
    pub fn from_config(
        name: &str,
        params: Value,
        warnings: &mut Vec<String>,
    ) -> Result<Self, String> {
        let params = if params.is_null() {
            Value::Mapping(Default::default())
        } else {
            params
        };
        Ok(match name {
            "rate_of_change" => {
                TransformerSpec::RateOfChange(scaling::ScalingSpec::from_value(params, true)?)
            }
            "unit_conversion" => {
                TransformerSpec::UnitConversion(scaling::ScalingSpec::from_value(params, false)?)
            }
            "delta" => TransformerSpec::Delta(delta::DeltaSpec::from_value(params)?),
            "accumulator" => {
                TransformerSpec::Accumulator(accumulator::AccumulatorSpec::from_value(params)?)
            }
            "aggregator" => TransformerSpec::Aggregator(aggregator::AggregatorSpec::from_value(
                params, warnings,
            )?),
            "arithmetic" => TransformerSpec::Arithmetic(arithmetic::ArithmeticSpec::from_value(
                params, warnings,
            )?),
            other => {
                return Err(format!(
                    "No transformer named {other} loaded (known: rate_of_change, unit_conversion, delta, accumulator, aggregator, arithmetic)"
                ));
            }
        })
    }

    /// A fresh instance with empty state.
    pub fn build(&self) -> Box<dyn Transformer> {
        match self {
            TransformerSpec::RateOfChange(s) => Box::new(scaling::RateOfChange::new(s.clone())),
            TransformerSpec::UnitConversion(s) => Box::new(scaling::UnitConversion::new(s.clone())),
            TransformerSpec::Delta(s) => Box::new(delta::Delta::new(s.clone())),
            TransformerSpec::Accumulator(s) => Box::new(accumulator::Accumulator::new(s.clone())),
            TransformerSpec::Aggregator(s) => Box::new(aggregator::Aggregator::new(s.clone())),
            TransformerSpec::Arithmetic(s) => Box::new(arithmetic::Arithmetic::new(s.clone())),
        }
    }

    /// The pipeline.yaml name.
    pub fn name(&self) -> &'static str {
        match self {
            TransformerSpec::RateOfChange(_) => "rate_of_change",
            TransformerSpec::UnitConversion(_) => "unit_conversion",
            TransformerSpec::Delta(_) => "delta",
            TransformerSpec::Accumulator(_) => "accumulator",
            TransformerSpec::Aggregator(_) => "aggregator",
            TransformerSpec::Arithmetic(_) => "arithmetic",
        }
    }
}

// ---------------------------------------------------------------- shared parameter pieces

/// A new sample derived from `s` (ids, owner, resource, timestamp, metadata kept).
pub fn derived(
    s: &Sample,
    name: String,
    unit: String,
    kind: SampleType,
    volume: f64,
    id: Uuid,
) -> Sample {
    Sample {
        name,
        kind,
        unit,
        volume,
        user_id: s.user_id.clone(),
        project_id: s.project_id.clone(),
        resource_id: s.resource_id.clone(),
        timestamp: s.timestamp,
        resource_metadata: s.resource_metadata.clone(),
        source: s.source.clone(),
        message_id: id,
        monotonic_time: s.monotonic_time,
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use chrono::TimeZone;

    pub fn sample(name: &str, kind: SampleType, volume: f64, rid: &str, secs: i64) -> Sample {
        Sample {
            name: name.into(),
            kind,
            unit: "ns".into(),
            volume,
            user_id: Some("u".into()),
            project_id: Some("p".into()),
            resource_id: rid.into(),
            timestamp: Utc.with_ymd_and_hms(2018, 7, 30, 12, 0, 0).unwrap()
                + chrono::Duration::seconds(secs),
            resource_metadata: Default::default(),
            source: "openstack".into(),
            message_id: Uuid::new_v4(),
            monotonic_time: None,
        }
    }

    pub fn run(t: &mut dyn Transformer, s: Sample, drops: &mut Vec<Dropped>) -> Option<Sample> {
        let mut cx = Cx {
            now: Utc::now(),
            sink: "sink",
            index: 0,
            drops,
        };
        t.handle(s, &mut cx)
    }
}
