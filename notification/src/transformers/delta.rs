//! `delta`: the change of a value since its predecessor, as a `delta` sample.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_yaml_ng::Value;
use vmeter_core::{Sample, SampleType};

use super::{
    Cx, DropReason, Predecessor, RawSource, RawTarget, SeriesMap, Target, Transformer,
    lenient_bool, params, seconds_between,
};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    source: Option<RawSource>,
    target: Option<RawTarget>,
    #[serde(deserialize_with = "lenient_bool")]
    growth_only: bool,
}

/// Parameters of `delta`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaSpec {
    /// Only name mapping is used (the unit is the input's; a target unit is ignored as upstream).
    pub target: Target,
    /// Drop negative deltas (the lower value still becomes the predecessor).
    pub growth_only: bool,
}

impl DeltaSpec {
    pub(super) fn from_value(v: Value) -> Result<Self, String> {
        let raw: Raw = params(v)?;
        let target = Target::compile(
            &raw.target.unwrap_or_default(),
            &raw.source.unwrap_or_default(),
        )?;
        Ok(DeltaSpec {
            target,
            growth_only: raw.growth_only,
        })
    }
}

/// See the module doc.
pub struct Delta {
    spec: DeltaSpec,
    cache: SeriesMap<Predecessor>,
}

impl Delta {
    pub fn new(spec: DeltaSpec) -> Self {
        Delta {
            spec,
            cache: SeriesMap::default(),
        }
    }
}

impl Transformer for Delta {
    fn evict(&mut self, cutoff: DateTime<Utc>) -> usize {
        self.cache.retain_fresh(|p| p.timestamp < cutoff)
    }

    fn handle(&mut self, s: Sample, cx: &mut Cx<'_>) -> Option<Sample> {
        let Some(slot) = self.cache.get_mut(&s) else {
            self.cache.insert(&s, Predecessor::of(&s));
            cx.drop(
                DropReason::NoPredecessor,
                format!("{} {}: first sample of the series", s.name, s.resource_id),
            );
            return None;
        };
        if slot.id == s.message_id {
            cx.drop(
                DropReason::Duplicate,
                format!(
                    "{} {}: redelivered sample {}",
                    s.name, s.resource_id, s.message_id
                ),
            );
            return None;
        }
        if seconds_between(
            slot.timestamp,
            slot.monotonic,
            s.timestamp,
            s.monotonic_time,
        ) < 0.0
        {
            cx.drop(
                DropReason::OutOfOrder,
                format!(
                    "{} {}: sample older than its predecessor",
                    s.name, s.resource_id
                ),
            );
            return None;
        }
        let prev = std::mem::replace(slot, Predecessor::of(&s));
        let delta = s.volume - prev.volume;
        if self.spec.growth_only && delta < 0.0 {
            cx.drop(
                DropReason::NegativeDelta,
                format!(
                    "{} {}: value went down by {}",
                    s.name, s.resource_id, -delta
                ),
            );
            return None;
        }
        let id = cx.derive_id(&[s.message_id.as_bytes()]);
        let name = self.spec.target.map_name(&s);
        let mut out = s;
        out.name = name;
        out.kind = SampleType::Delta;
        out.volume = delta;
        out.message_id = id;
        Some(out)
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::to_value(&self.cache).unwrap_or_default()
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), String> {
        self.cache = serde_json::from_value(state).map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{run, sample};
    use super::*;

    fn delta(growth_only: bool) -> Delta {
        let v: Value = serde_yaml_ng::from_str(&format!(
            "target: {{name: cpu.delta}}\ngrowth_only: {growth_only}"
        ))
        .unwrap();
        Delta::new(DeltaSpec::from_value(v).unwrap())
    }

    #[test]
    fn growth_only_drops_negative_but_moves_predecessor() {
        let mut t = delta(true);
        let mut d = Vec::new();
        let out: Vec<_> = [26.0, 16.0, 53.0]
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                run(
                    &mut t,
                    sample("cpu", SampleType::Cumulative, *v, "r", i as i64),
                    &mut d,
                )
            })
            .map(|s| s.volume)
            .collect();
        assert_eq!(out, vec![37.0]);
        let mut t = delta(false);
        let out: Vec<_> = [26.0, 16.0, 53.0]
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                run(
                    &mut t,
                    sample("cpu", SampleType::Cumulative, *v, "r", i as i64),
                    &mut d,
                )
            })
            .map(|s| (s.volume, s.kind, s.name))
            .collect();
        assert_eq!(
            out,
            vec![
                (-10.0, SampleType::Delta, "cpu.delta".to_string()),
                (37.0, SampleType::Delta, "cpu.delta".to_string())
            ]
        );
    }
}
