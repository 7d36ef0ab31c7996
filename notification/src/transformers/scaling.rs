//! `rate_of_change` and `unit_conversion` (Ceilometer's ScalingTransformer family).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_yaml_ng::Value;
use vmeter_core::Sample;

use super::{
    Cx, DropReason, Predecessor, RawSource, RawTarget, Scale, SeriesMap, Target, Transformer,
    derived, params, scale_value, seconds_between,
};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    source: Option<RawSource>,
    target: Option<RawTarget>,
}

/// Parameters of `rate_of_change` / `unit_conversion`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingSpec {
    pub target: Target,
    /// `source.unit`: unit_conversion converts only samples with this unit.
    pub source_unit: Option<String>,
}

impl ScalingSpec {
    pub(super) fn from_value(v: Value, rate: bool) -> Result<Self, String> {
        let raw: Raw = params(v)?;
        let source = raw.source.unwrap_or_default();
        let target = raw.target.unwrap_or_default();
        if target.expr.is_some() {
            return Err("target.expr belongs to the arithmetic transformer".into());
        }
        let mut t = Target::compile(&target, &source)?;
        if rate && t.scale.is_none() {
            t.scale = Some(Scale::Factor(1.0));
        }
        Ok(ScalingSpec {
            target: t,
            source_unit: source.unit,
        })
    }
}

/// Converts a sample's volume by `scale` (a factor, or an expression whose value *is* the new
/// volume), renames/re-units it, caps it by `max`. Samples of another unit than `source.unit`
/// pass unchanged.
pub struct UnitConversion {
    spec: ScalingSpec,
}

impl UnitConversion {
    pub fn new(spec: ScalingSpec) -> Self {
        UnitConversion { spec }
    }
}

impl Transformer for UnitConversion {
    fn handle(&mut self, s: Sample, cx: &mut Cx<'_>) -> Option<Sample> {
        if let Some(u) = &self.spec.source_unit
            && *u != s.unit
        {
            return Some(s);
        }
        let t = &self.spec.target;
        let volume = match &t.scale {
            Some(Scale::Expr(e)) => match e.eval_f64(&super::SampleScope(&s)) {
                Ok(v) => v,
                Err(err) => {
                    cx.drop(
                        DropReason::ScaleError,
                        format!("{} {}: scale {e}: {}", s.name, s.resource_id, err.0),
                    );
                    return None;
                }
            },
            Some(Scale::Factor(f)) if *f != 0.0 => s.volume * f,
            _ => s.volume,
        };
        let id = cx.derive_id(&[s.message_id.as_bytes()]);
        let kind = t.kind.unwrap_or(s.kind);
        Some(derived(
            &s,
            t.map_name(&s),
            t.map_unit(&s),
            kind,
            t.cap(volume),
            id,
        ))
    }
}

/// Δvolume/Δt × scale per (meter, resource), with Ceilometer's rules (reference §c.2) and
/// vmeter's fixes: monotonic time is used when both samples carry it; a redelivered sample
/// (same `message_id` as the stored predecessor) is ignored instead of yielding 0.
pub struct RateOfChange {
    spec: ScalingSpec,
    cache: SeriesMap<Predecessor>,
}

impl RateOfChange {
    pub fn new(spec: ScalingSpec) -> Self {
        RateOfChange {
            spec,
            cache: SeriesMap::default(),
        }
    }
}

impl Transformer for RateOfChange {
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
        let dt = seconds_between(
            slot.timestamp,
            slot.monotonic,
            s.timestamp,
            s.monotonic_time,
        );
        if dt < 0.0 {
            // Out of order: keep the newer predecessor.
            cx.drop(
                DropReason::OutOfOrder,
                format!(
                    "{} {}: sample is {:.6} s older than its predecessor",
                    s.name, s.resource_id, -dt
                ),
            );
            return None;
        }
        let prev = std::mem::replace(slot, Predecessor::of(&s));
        let mut dv = s.volume - prev.volume;
        if s.kind == vmeter_core::SampleType::Cumulative && dv < 0.0 {
            // Counter reset (reboot, migration): assume it restarted from zero.
            dv = s.volume;
        }
        let rate = if dt != 0.0 { 1.0 * dv / dt } else { 0.0 };
        let t = &self.spec.target;
        let factor = match t.scale.as_ref().map(|sc| scale_value(sc, &s)) {
            None => 1.0,
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                // The sample still became the predecessor (as upstream).
                cx.drop(
                    DropReason::ScaleError,
                    format!("{} {}: {e}", s.name, s.resource_id),
                );
                return None;
            }
        };
        let volume = t.cap(factor * rate);
        let id = cx.derive_id(&[s.message_id.as_bytes()]);
        let kind = t.kind.unwrap_or(s.kind);
        let name = t.map_name(&s);
        let unit = t.map_unit(&s);
        let mut out = s;
        out.name = name;
        out.unit = unit;
        out.kind = kind;
        out.volume = volume;
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
    use vmeter_core::SampleType::*;

    fn cpu_util() -> RateOfChange {
        let v: Value = serde_yaml_ng::from_str("target: {name: cpu_util, unit: '%', type: gauge, max: 100, scale: '100.0 / (10**9 * (resource_metadata.cpu_number or 1))'}").unwrap();
        RateOfChange::new(ScalingSpec::from_value(v, true).unwrap())
    }

    #[test]
    fn monotonic_time_wins_over_wall_clock() {
        let mut t = cpu_util();
        let mut d = Vec::new();
        let mut a = sample("cpu", Cumulative, 0.0, "r", 0);
        a.monotonic_time = Some(100.0);
        let mut b = sample("cpu", Cumulative, 10e9, "r", 12345);
        b.monotonic_time = Some(110.0);
        assert!(run(&mut t, a, &mut d).is_none());
        let out = run(&mut t, b, &mut d).unwrap();
        assert_eq!(out.volume, 100.0);
        assert_eq!(
            (out.name.as_str(), out.unit.as_str(), out.kind),
            ("cpu_util", "%", Gauge)
        );
    }

    #[test]
    fn redelivery_is_ignored_not_zero() {
        let mut t = cpu_util();
        let mut d = Vec::new();
        let a = sample("cpu", Cumulative, 0.0, "r", 0);
        let b = sample("cpu", Cumulative, 30e9, "r", 60);
        run(&mut t, a, &mut d);
        let first = run(&mut t, b.clone(), &mut d).unwrap();
        assert_eq!(first.volume, 50.0);
        assert!(
            run(&mut t, b.clone(), &mut d).is_none(),
            "a redelivered sample must not yield 0 %"
        );
        assert_eq!(d.last().unwrap().reason, DropReason::Duplicate);
        let c = sample("cpu", Cumulative, 60e9, "r", 120);
        assert_eq!(run(&mut t, c, &mut d).unwrap().volume, 50.0);
    }

    #[test]
    fn out_of_order_keeps_old_predecessor_and_equal_times_give_zero() {
        let mut t = cpu_util();
        let mut d = Vec::new();
        run(&mut t, sample("cpu", Cumulative, 0.0, "r", 0), &mut d);
        assert!(run(&mut t, sample("cpu", Cumulative, 5e9, "r", -10), &mut d).is_none());
        assert_eq!(d.last().unwrap().reason, DropReason::OutOfOrder);
        assert_eq!(
            run(&mut t, sample("cpu", Cumulative, 15e9, "r", 60), &mut d)
                .unwrap()
                .volume,
            25.0
        );
        assert_eq!(
            run(&mut t, sample("cpu", Cumulative, 16e9, "r", 60), &mut d)
                .unwrap()
                .volume,
            0.0
        );
    }

    #[test]
    fn derived_ids_are_deterministic() {
        let (mut t1, mut t2) = (cpu_util(), cpu_util());
        let mut d = Vec::new();
        let a = sample("cpu", Cumulative, 0.0, "r", 0);
        let b = sample("cpu", Cumulative, 30e9, "r", 60);
        run(&mut t1, a.clone(), &mut d);
        run(&mut t2, a, &mut d);
        let x = run(&mut t1, b.clone(), &mut d).unwrap();
        let y = run(&mut t2, b.clone(), &mut d).unwrap();
        assert_eq!(x.message_id, y.message_id);
        assert_ne!(x.message_id, b.message_id);
    }

    #[test]
    fn unit_conversion_only_matching_unit() {
        let v: Value = serde_yaml_ng::from_str(
            "source: {unit: B}\ntarget: {unit: KiB, scale: 0.0009765625, name: x}",
        )
        .unwrap();
        let mut t = UnitConversion::new(ScalingSpec::from_value(v, false).unwrap());
        let mut d = Vec::new();
        let mut s = sample("m", Gauge, 2048.0, "r", 0);
        s.unit = "B".into();
        let out = run(&mut t, s, &mut d).unwrap();
        assert_eq!(
            (out.volume, out.unit.as_str(), out.name.as_str()),
            (2.0, "KiB", "x")
        );
        let other = sample("m", Gauge, 5.0, "r", 0);
        let id = other.message_id;
        let out = run(&mut t, other, &mut d).unwrap();
        assert_eq!(
            (out.volume, out.message_id),
            (5.0, id),
            "other units pass unchanged"
        );
    }
}
