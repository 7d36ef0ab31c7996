//! `delta`: the change of a value since its predecessor, as a `delta` sample.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_yaml_ng::Value;
use uuid::Uuid;
use vmeter_core::{Sample, SampleType};

use super::{
    Cx, RawSource, RawTarget, Target, Transformer, lenient_bool, params, seconds_between,
    series_key,
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
    cache: HashMap<String, (f64, DateTime<Utc>, Option<f64>, Uuid)>,
}

impl Delta {
    pub fn new(spec: DeltaSpec) -> Self {
        Delta {
            spec,
            cache: HashMap::new(),
        }
    }
}

impl Transformer for Delta {
    fn handle(&mut self, s: Sample, cx: &mut Cx<'_>) -> Option<Sample> {
        let key = series_key(&s);
        let Some(prev) = self.cache.insert(
            key.clone(),
            (s.volume, s.timestamp, s.monotonic_time, s.message_id),
        ) else {
            cx.drop(
                "no_predecessor",
                format!("{} {}: first sample of the series", s.name, s.resource_id),
            );
            return None;
        };
        if prev.3 == s.message_id {
            self.cache.insert(key, prev);
            cx.drop(
                "duplicate",
                format!(
                    "{} {}: redelivered sample {}",
                    s.name, s.resource_id, s.message_id
                ),
            );
            return None;
        }
        if seconds_between(prev.1, prev.2, s.timestamp, s.monotonic_time) < 0.0 {
            self.cache.insert(key, prev);
            cx.drop(
                "out_of_order",
                format!(
                    "{} {}: sample older than its predecessor",
                    s.name, s.resource_id
                ),
            );
            return None;
        }
        let delta = s.volume - prev.0;
        if self.spec.growth_only && delta < 0.0 {
            cx.drop(
                "negative_delta",
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
