//! `aggregator`: combines samples per (meter, resource[, user][, project]) and emits on flush
//! once `size` samples were handled or `retention_time` passed: gauge → mean, delta → sum,
//! cumulative → last.
//!
//! Deliberate fixes over Ceilometer 11: with only `retention_time` the aggregation is by
//! time (upstream silently kept the default size 1); a renamed gauge averages correctly
//! (upstream looked up the count under the renamed key and divided by zero).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_yaml_ng::Value;
use uuid::Uuid;
use vmeter_core::{Sample, SampleType};

use super::{
    Cx, DropReason, RawSource, RawTarget, Scale, Target, Transformer, lenient_f64, lenient_i64,
    params, scale_value,
};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    #[serde(deserialize_with = "lenient_i64")]
    size: Option<i64>,
    #[serde(deserialize_with = "lenient_f64")]
    retention_time: Option<f64>,
    project_id: Option<String>,
    user_id: Option<String>,
    resource_metadata: Option<String>,
    timestamp: Option<String>,
    source: Option<RawSource>,
    target: Option<RawTarget>,
}

/// How an attribute of later samples merges into the aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    First,
    Last,
    Drop,
}

/// Parameters of `aggregator`.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregatorSpec {
    /// Emit after this many handled samples (all groups together). `None`: time only.
    pub size: Option<i64>,
    /// Emit when the oldest aggregated sample is older than this many seconds.
    pub retention_time: Option<f64>,
    /// `None`: the attribute is part of the grouping key.
    pub project_id: Option<Merge>,
    pub user_id: Option<Merge>,
    pub resource_metadata: Merge,
    /// `Last` keeps the newest sample's timestamp (`First` by default).
    pub timestamp: Merge,
    pub target: Target,
}

fn policy(
    key: &str,
    v: Option<String>,
    default: Merge,
    allow_drop: bool,
    warnings: &mut Vec<String>,
) -> Option<Merge> {
    let v = v?;
    Some(match v.as_str() {
        "first" => Merge::First,
        "last" => Merge::Last,
        "drop" if allow_drop => Merge::Drop,
        other => {
            warnings.push(format!(
                "aggregator: unknown {key} policy {other:?}, using {default:?}"
            ));
            default
        }
    })
}

impl AggregatorSpec {
    pub(super) fn from_value(v: Value, warnings: &mut Vec<String>) -> Result<Self, String> {
        let raw: Raw = params(v)?;
        let size = raw.size.filter(|s| *s != 0);
        let retention_time = raw.retention_time.filter(|r| *r != 0.0);
        let size = match (size, retention_time) {
            (None, None) => Some(1),
            (s, _) => s,
        };
        let target = Target::compile(
            &raw.target.unwrap_or_default(),
            &raw.source.unwrap_or_default(),
        )?;
        Ok(AggregatorSpec {
            size,
            retention_time,
            project_id: policy("project_id", raw.project_id, Merge::Last, false, warnings),
            user_id: policy("user_id", raw.user_id, Merge::Last, false, warnings),
            resource_metadata: policy(
                "resource_metadata",
                raw.resource_metadata,
                Merge::Last,
                true,
                warnings,
            )
            .unwrap_or(Merge::Last),
            timestamp: policy("timestamp", raw.timestamp, Merge::First, false, warnings)
                .unwrap_or(Merge::First),
            target,
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Group {
    sample: Sample,
    count: u64,
    first_id: Uuid,
    last_id: Uuid,
}

/// What an aggregator carries over a planned restart.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    /// Groups in arrival order.
    groups: Vec<(String, Group)>,
    handled: i64,
    initial: Option<DateTime<Utc>>,
}

/// See the module doc.
pub struct Aggregator {
    spec: AggregatorSpec,
    groups: HashMap<String, Group>,
    order: Vec<String>,
    handled: i64,
    initial: Option<DateTime<Utc>>,
}

impl Aggregator {
    pub fn new(spec: AggregatorSpec) -> Self {
        Aggregator {
            spec,
            groups: HashMap::new(),
            order: Vec::new(),
            handled: 0,
            initial: None,
        }
    }

    fn key(&self, s: &Sample) -> String {
        let mut k = format!("{}-{}", s.name, s.resource_id);
        for (policy, v) in [
            (self.spec.project_id, &s.project_id),
            (self.spec.user_id, &s.user_id),
        ] {
            if policy.is_none() {
                k.push('-');
                k.push_str(v.as_deref().unwrap_or("<undefined>"));
            }
        }
        k
    }

    fn scaled(&self, s: &Sample) -> Result<f64, String> {
        match &self.spec.target.scale {
            Some(Scale::Expr(_)) => {
                scale_value(self.spec.target.scale.as_ref().expect("matched"), s)
            }
            Some(Scale::Factor(f)) if *f != 0.0 => Ok(s.volume * f),
            _ => Ok(s.volume),
        }
    }
}

impl Transformer for Aggregator {
    fn handle(&mut self, s: Sample, cx: &mut Cx<'_>) -> Option<Sample> {
        let volume = match self.scaled(&s) {
            Ok(v) => v,
            Err(e) => {
                cx.drop(
                    DropReason::ScaleError,
                    format!("{} {}: {e}", s.name, s.resource_id),
                );
                return None;
            }
        };
        self.initial.get_or_insert(s.timestamp);
        self.handled += 1;
        let key = self.key(&s);
        let spec = &self.spec;
        match self.groups.get_mut(&key) {
            None => {
                let t = &spec.target;
                let mut first = super::derived(
                    &s,
                    t.map_name(&s),
                    t.map_unit(&s),
                    t.kind.unwrap_or(s.kind),
                    t.cap(volume),
                    s.message_id,
                );
                if spec.resource_metadata == Merge::Drop {
                    first.resource_metadata = Default::default();
                }
                self.order.push(key.clone());
                self.groups.insert(
                    key,
                    Group {
                        sample: first,
                        count: 1,
                        first_id: s.message_id,
                        last_id: s.message_id,
                    },
                );
            }
            Some(g) => {
                g.count += 1;
                g.last_id = s.message_id;
                if spec.timestamp == Merge::Last {
                    g.sample.timestamp = s.timestamp;
                    g.sample.monotonic_time = s.monotonic_time;
                }
                g.sample.volume = if s.kind == SampleType::Cumulative {
                    volume
                } else {
                    g.sample.volume + volume
                };
                if spec.user_id == Some(Merge::Last) {
                    g.sample.user_id = s.user_id.clone();
                }
                if spec.project_id == Some(Merge::Last) {
                    g.sample.project_id = s.project_id.clone();
                }
                if spec.resource_metadata == Merge::Last {
                    g.sample.resource_metadata = s.resource_metadata;
                }
            }
        }
        None
    }

    fn flush(&mut self, cx: &mut Cx<'_>) -> Vec<Sample> {
        if self.handled == 0 {
            return Vec::new();
        }
        let full = self.spec.size.is_some_and(|n| self.handled >= n);
        let expired = match (self.spec.retention_time, self.initial) {
            (Some(r), Some(t0)) => {
                (cx.now - t0).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6 > r
            }
            _ => false,
        };
        if !(full || expired) {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.order.len());
        for key in self.order.drain(..) {
            let Some(mut g) = self.groups.remove(&key) else {
                continue;
            };
            if g.sample.kind == SampleType::Gauge {
                g.sample.volume /= g.count as f64;
            }
            g.sample.message_id = cx.derive_id(&[
                key.as_bytes(),
                g.first_id.as_bytes(),
                g.last_id.as_bytes(),
                &g.count.to_le_bytes(),
            ]);
            out.push(g.sample);
        }
        self.handled = 0;
        self.initial = None;
        out
    }

    fn save_state(&self) -> serde_json::Value {
        #[derive(serde::Serialize)]
        struct SavedRef<'a> {
            groups: Vec<(&'a String, &'a Group)>,
            handled: i64,
            initial: Option<DateTime<Utc>>,
        }
        let groups = self
            .order
            .iter()
            .filter_map(|k| self.groups.get(k).map(|g| (k, g)))
            .collect();
        serde_json::to_value(SavedRef {
            groups,
            handled: self.handled,
            initial: self.initial,
        })
        .unwrap_or_default()
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), String> {
        let saved: Saved = serde_json::from_value(state).map_err(|e| e.to_string())?;
        self.order = saved.groups.iter().map(|(k, _)| k.clone()).collect();
        self.groups = saved.groups.into_iter().collect();
        self.handled = saved.handled;
        self.initial = saved.initial;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::sample;
    use super::*;
    use chrono::TimeZone;

    fn agg(yaml: &str) -> Aggregator {
        let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        Aggregator::new(AggregatorSpec::from_value(v, &mut Vec::new()).unwrap())
    }

    fn feed(a: &mut Aggregator, samples: Vec<Sample>, now: DateTime<Utc>) -> Vec<Sample> {
        let mut d = Vec::new();
        let mut cx = Cx {
            now,
            sink: "s",
            index: 0,
            drops: &mut d,
        };
        for s in samples {
            assert!(a.handle(s, &mut cx).is_none());
        }
        a.flush(&mut cx)
    }

    #[test]
    fn defaults_match_upstream() {
        let s = AggregatorSpec::from_value(Value::Mapping(Default::default()), &mut Vec::new())
            .unwrap();
        assert_eq!(
            (s.size, s.retention_time, s.timestamp),
            (Some(1), None, Merge::First)
        );
    }

    #[test]
    fn renamed_gauge_averages() {
        let mut a = agg("size: 3\ntarget: {name: renamed}");
        let out = feed(
            &mut a,
            (1..=3)
                .map(|i| sample("g", SampleType::Gauge, i as f64, "r", i))
                .collect(),
            Utc::now(),
        );
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].name.as_str(), out[0].volume), ("renamed", 2.0));
    }

    #[test]
    fn retention_only_aggregates_by_time() {
        let mut a = agg("retention_time: 60");
        let t0 = Utc.with_ymd_and_hms(2018, 7, 30, 12, 0, 0).unwrap();
        let out = feed(
            &mut a,
            vec![
                sample("d", SampleType::Delta, 1.0, "r", 0),
                sample("d", SampleType::Delta, 2.0, "r", 10),
            ],
            t0 + chrono::Duration::seconds(30),
        );
        assert!(
            out.is_empty(),
            "not expired yet, and size must not default to 1"
        );
        let out = feed(&mut a, vec![], t0 + chrono::Duration::seconds(61));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].volume, 3.0);
    }

    #[test]
    fn unknown_policy_falls_back_with_warning() {
        let mut w = Vec::new();
        let s = AggregatorSpec::from_value(
            serde_yaml_ng::from_str("user_id: bogus\ntimestamp: nope").unwrap(),
            &mut w,
        )
        .unwrap();
        assert_eq!((s.user_id, s.timestamp), (Some(Merge::Last), Merge::First));
        assert_eq!(w.len(), 2);
    }
}
