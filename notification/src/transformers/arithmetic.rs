//! `arithmetic`: an expression over several meters of one resource, e.g.
//! `100 * $(memory.usage) / $(memory)`, emitted on flush once every referenced meter is
//! present for a resource (then that resource's cache is cleared).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_yaml_ng::Value;
use vmeter_core::Sample;

use super::{Cx, DropReason, RawTarget, Transformer, params};
use crate::expr::{Expr, Scope, Val};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    target: Option<RawTarget>,
}

/// Parameters of `arithmetic`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArithmeticSpec {
    pub name: Option<String>,
    pub unit: Option<String>,
    pub kind: Option<vmeter_core::SampleType>,
    /// `None` when the expression references no meter ("misconfigured": never emits).
    pub expr: Option<Expr>,
    /// Referenced meters in order of first appearance; the first is the reference meter.
    pub meters: Vec<String>,
}

impl ArithmeticSpec {
    pub(super) fn from_value(v: Value, warnings: &mut Vec<String>) -> Result<Self, String> {
        let raw: Raw = params(v)?;
        let t = raw.target.unwrap_or_default();
        if t.scale.is_some() || t.map_to.is_some() || t.max.is_some() {
            return Err("arithmetic takes target.name, unit, type and expr only".into());
        }
        let kind =
            match &t.kind {
                None => None,
                Some(k) => Some(vmeter_core::SampleType::parse(k).ok_or_else(|| {
                    format!("target.type {k:?} is not gauge, delta or cumulative")
                })?),
            };
        let text = t.expr.unwrap_or_default();
        let expr = if text.trim().is_empty() {
            None
        } else {
            Some(Expr::parse_arithmetic(&text).map_err(|e| format!("target.expr: {e}"))?)
        };
        let meters = expr.as_ref().map(Expr::meters).unwrap_or_default();
        if meters.is_empty() {
            warnings.push(format!(
                "arithmetic: expression {text:?} references no meter $(...); it will never emit"
            ));
        }
        Ok(ArithmeticSpec {
            name: t.name,
            unit: t.unit,
            kind,
            expr: if meters.is_empty() { None } else { expr },
            meters,
        })
    }
}

/// See the module doc.
pub struct Arithmetic {
    spec: ArithmeticSpec,
    cache: HashMap<String, HashMap<String, Sample>>,
    latest: Option<DateTime<Utc>>,
}

impl Arithmetic {
    pub fn new(spec: ArithmeticSpec) -> Self {
        Arithmetic {
            spec,
            cache: HashMap::new(),
            latest: None,
        }
    }
}

struct MeterScope<'a>(&'a HashMap<String, Sample>);

impl Scope for MeterScope<'_> {
    fn attr(&self, _path: &[String]) -> Val<'_> {
        Val::Missing
    }
    fn meter(&self, meter: &str, path: &[String]) -> Val<'_> {
        match self.0.get(meter) {
            None => Val::Missing,
            Some(s) if path.is_empty() => Val::Float(s.volume),
            Some(s) => super::sample_attr(s, path),
        }
    }
}

impl Transformer for Arithmetic {
    fn evict(&mut self, cutoff: DateTime<Utc>) -> usize {
        let before = self.cache.len();
        self.cache
            .retain(|_, meters| meters.values().any(|s| s.timestamp >= cutoff));
        before - self.cache.len()
    }

    fn handle(&mut self, s: Sample, _cx: &mut Cx<'_>) -> Option<Sample> {
        self.latest = Some(s.timestamp);
        if self.spec.expr.is_some() && self.spec.meters.contains(&s.name) {
            self.cache
                .entry(s.resource_id.clone())
                .or_default()
                .insert(s.name.clone(), s);
        }
        None
    }

    fn flush(&mut self, cx: &mut Cx<'_>) -> Vec<Sample> {
        let Some(expr) = &self.spec.expr else {
            return Vec::new();
        };
        let complete: BTreeMap<String, ()> = self
            .cache
            .iter()
            .filter(|(_, m)| self.spec.meters.iter().all(|n| m.contains_key(n)))
            .map(|(r, _)| (r.clone(), ()))
            .collect();
        let mut out = Vec::new();
        for rid in complete.into_keys() {
            let Some(metersmap) = self.cache.remove(&rid) else {
                continue;
            };
            let reference = &metersmap[&self.spec.meters[0]];
            match expr.eval_f64(&MeterScope(&metersmap)) {
                Ok(v) if v.is_finite() => {
                    let ids: Vec<&[u8]> = self
                        .spec
                        .meters
                        .iter()
                        .map(|m| metersmap[m].message_id.as_bytes().as_slice())
                        .collect();
                    let id = cx.derive_id(&ids);
                    let mut s = super::derived(
                        reference,
                        self.spec
                            .name
                            .clone()
                            .unwrap_or_else(|| reference.name.clone()),
                        self.spec
                            .unit
                            .clone()
                            .unwrap_or_else(|| reference.unit.clone()),
                        self.spec.kind.unwrap_or(reference.kind),
                        v,
                        id,
                    );
                    s.timestamp = self.latest.unwrap_or(reference.timestamp);
                    out.push(s);
                }
                Ok(v) => cx.drop(
                    DropReason::ExprError,
                    format!("arithmetic {expr} for {rid}: result {v} is not finite"),
                ),
                Err(e) => cx.drop(
                    DropReason::ExprError,
                    format!("arithmetic {expr} for {rid}: {}", e.0),
                ),
            }
        }
        out
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({"cache": self.cache, "latest": self.latest})
    }

    fn restore_state(&mut self, mut state: serde_json::Value) -> Result<(), String> {
        self.cache =
            serde_json::from_value(state["cache"].take()).map_err(|e| format!("cache: {e}"))?;
        self.latest =
            serde_json::from_value(state["latest"].take()).map_err(|e| format!("latest: {e}"))?;
        Ok(())
    }
}
