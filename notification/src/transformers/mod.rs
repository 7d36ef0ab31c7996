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

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;
use uuid::Uuid;
use vmeter_core::{Sample, SampleType};

use crate::expr::{Expr, Scope, Val};
pub use vmeter_core::telemetry::DropReason;

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

/// `source:` of a transformer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSource {
    /// Only samples with this unit are converted (unit_conversion).
    pub unit: Option<String>,
    /// Regular expressions applied to name/unit, paired with `target.map_to`.
    pub map_from: Option<RawMap>,
}

/// `map_from` / `map_to`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMap {
    pub name: Option<String>,
    pub unit: Option<String>,
}

/// `target:` of a transformer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTarget {
    pub name: Option<String>,
    pub unit: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// A number (factor) or a string (expression).
    pub scale: Option<Value>,
    #[serde(deserialize_with = "lenient_f64")]
    pub max: Option<f64>,
    pub map_to: Option<RawMap>,
    /// Arithmetic expression (arithmetic only).
    pub expr: Option<String>,
}

/// A regex substitution compiled at load (Python `re.sub` semantics: all occurrences,
/// `\1` groups).
#[derive(Debug, Clone)]
pub struct Substitution {
    re: regex::Regex,
    replacement: String,
    pattern: String,
    python_replacement: String,
}

impl PartialEq for Substitution {
    fn eq(&self, o: &Self) -> bool {
        self.pattern == o.pattern && self.python_replacement == o.python_replacement
    }
}

impl Substitution {
    fn new(pattern: &str, replacement: &str) -> Result<Self, String> {
        let re = regex::Regex::new(pattern)
            .map_err(|e| format!("map_from pattern {pattern:?} does not compile: {e}"))?;
        Ok(Substitution {
            re,
            replacement: python_replacement(replacement),
            pattern: pattern.into(),
            python_replacement: replacement.into(),
        })
    }

    fn apply(&self, value: &str) -> String {
        self.re
            .replace_all(value, self.replacement.as_str())
            .into_owned()
    }
}

/// Python `re.sub` replacement syntax (`\1`, `\g<1>`, `\g<name>`, `\\`) → regex crate syntax.
fn python_replacement(r: &str) -> String {
    let mut out = String::new();
    let mut chars = r.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    let mut n = String::new();
                    while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                        n.push(d);
                        chars.next();
                    }
                    out.push_str(&format!("${{{n}}}"));
                }
                Some('g') => {
                    chars.next();
                    if chars.peek() == Some(&'<') {
                        chars.next();
                        let name: String = chars.by_ref().take_while(|c| *c != '>').collect();
                        out.push_str(&format!("${{{name}}}"));
                    } else {
                        out.push_str("\\g");
                    }
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                Some('n') => {
                    chars.next();
                    out.push('\n');
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

/// `scale`: a multiplicative number or an expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Scale {
    Factor(f64),
    Expr(Expr),
}

/// The compiled `target` (+ `source.map_from`) shared by the converting transformers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Target {
    pub name: Option<String>,
    pub unit: Option<String>,
    pub kind: Option<SampleType>,
    pub scale: Option<Scale>,
    /// Cap applied with `min(volume, max)` when set and non-zero (as Ceilometer's truthiness).
    pub max: Option<f64>,
    map_name: Option<Substitution>,
    map_unit: Option<Substitution>,
}

impl Target {
    /// Compiles `target` and the `map_from` of `source`.
    pub fn compile(t: &RawTarget, source: &RawSource) -> Result<Self, String> {
        let kind =
            match &t.kind {
                None => None,
                Some(k) => Some(SampleType::parse(k).ok_or_else(|| {
                    format!("target.type {k:?} is not gauge, delta or cumulative")
                })?),
            };
        let scale = match &t.scale {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(Scale::Factor(
                n.as_f64().ok_or("target.scale is not a number")?,
            )),
            Some(Value::String(s)) => Some(Scale::Expr(
                Expr::parse(s).map_err(|e| format!("target.scale: {e}"))?,
            )),
            Some(other) => {
                return Err(format!(
                    "target.scale must be a number or an expression string, found {other:?}"
                ));
            }
        };
        let pair =
            |from: Option<&String>, to: Option<&String>| -> Result<Option<Substitution>, String> {
                match (from, to) {
                    (Some(f), Some(t)) => Substitution::new(f, t).map(Some),
                    _ => Ok(None),
                }
            };
        let from = source.map_from.clone().unwrap_or_default();
        let to = t.map_to.clone().unwrap_or_default();
        Ok(Target {
            name: t.name.clone(),
            unit: t.unit.clone(),
            kind,
            scale,
            max: t.max,
            map_name: pair(from.name.as_ref(), to.name.as_ref())?,
            map_unit: pair(from.unit.as_ref(), to.unit.as_ref())?,
        })
    }

    /// Output name: `map_from`→`map_to` substitution if both exist (an empty result falls
    /// back), else `target.name`, else the input's.
    pub fn map_name(&self, s: &Sample) -> String {
        Self::map(&self.map_name, &self.name, &s.name)
    }

    /// Output unit, same rules as [`map_name`](Self::map_name).
    pub fn map_unit(&self, s: &Sample) -> String {
        Self::map(&self.map_unit, &self.unit, &s.unit)
    }

    fn map(sub: &Option<Substitution>, fixed: &Option<String>, input: &str) -> String {
        if let Some(sub) = sub {
            let v = sub.apply(input);
            if !v.is_empty() {
                return v;
            }
        }
        fixed.clone().unwrap_or_else(|| input.to_string())
    }

    /// `min(volume, max)` when `max` is set and non-zero.
    pub fn cap(&self, v: f64) -> f64 {
        match self.max {
            Some(m) if m != 0.0 => {
                if m < v {
                    m
                } else {
                    v
                }
            }
            _ => v,
        }
    }
}

/// Expression scope over one sample: `volume`, `resource_metadata.x.y`, `name`, …
pub struct SampleScope<'a>(pub &'a Sample);

impl Scope for SampleScope<'_> {
    fn attr(&self, path: &[String]) -> Val<'_> {
        sample_attr(self.0, path)
    }
}

/// The value at a dotted path of a sample (see [`SampleScope`]).
pub fn sample_attr<'a>(s: &'a Sample, path: &[String]) -> Val<'a> {
    {
        let (root, rest) = match path.split_first() {
            Some(x) => x,
            None => return Val::Missing,
        };
        let scalar = |v: Val<'static>| if rest.is_empty() { v } else { Val::Missing };
        match root.as_str() {
            "volume" => scalar(Val::Float(s.volume)),
            "monotonic_time" => scalar(s.monotonic_time.map(Val::Float).unwrap_or(Val::None)),
            "name" if rest.is_empty() => Val::Str(s.name.as_str().into()),
            "unit" if rest.is_empty() => Val::Str(s.unit.as_str().into()),
            "type" if rest.is_empty() => Val::Str(s.kind.as_str().into()),
            "resource_id" if rest.is_empty() => Val::Str(s.resource_id.as_str().into()),
            "source" if rest.is_empty() => Val::Str(s.source.as_str().into()),
            "user_id" if rest.is_empty() => s
                .user_id
                .as_deref()
                .map(|v| Val::Str(v.into()))
                .unwrap_or(Val::None),
            "project_id" if rest.is_empty() => s
                .project_id
                .as_deref()
                .map(|v| Val::Str(v.into()))
                .unwrap_or(Val::None),
            "timestamp" if rest.is_empty() => {
                Val::Str(vmeter_core::sample::format_timestamp(&s.timestamp).into())
            }
            "id" | "message_id" if rest.is_empty() => Val::Str(s.message_id.to_string().into()),
            "resource_metadata" => {
                let mut cur: Option<&serde_json::Value> = None;
                for (i, key) in rest.iter().enumerate() {
                    let next = if i == 0 {
                        s.resource_metadata.get(key)
                    } else {
                        cur.and_then(|c| c.get(key))
                    };
                    match next {
                        Some(v) => cur = Some(v),
                        None => return Val::Missing,
                    }
                }
                match cur {
                    Some(v) => Val::from_json(v),
                    None if s.resource_metadata.is_empty() => Val::Missing,
                    None => Val::Missing,
                }
            }
            _ => Val::Missing,
        }
    }
}

/// Evaluates a `scale` against `s`: the expression's value, or the factor.
pub fn scale_value(scale: &Scale, s: &Sample) -> Result<f64, String> {
    match scale {
        Scale::Factor(f) => Ok(*f),
        Scale::Expr(e) => e.eval_f64(&SampleScope(s)).map_err(|e| e.0),
    }
}

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

/// Numbers written as strings are accepted (`max: "100"`), `null` is "not set".
pub fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("expected a number, found {s:?}"))),
        Some(other) => Err(D::Error::custom(format!(
            "expected a number, found {other:?}"
        ))),
    }
}

/// Integers written as strings are accepted (`size: "2"`), `null` is "not set".
pub fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    match lenient_f64(d)? {
        None => Ok(None),
        Some(f) if f.fract() == 0.0 && f.is_finite() => Ok(Some(f as i64)),
        Some(f) => Err(D::Error::custom(format!("expected an integer, found {f}"))),
    }
}

/// Booleans as YAML booleans or the strings `true`/`false` (any case), `null` is false.
pub fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(D::Error::custom(format!(
            "expected true or false, found {other:?}"
        ))),
    }
}

/// Deserialises transformer parameters, turning serde's message into a load error string.
pub fn params<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_yaml_ng::from_value(v).map_err(|e| format!("parameters: {e}"))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_replacements() {
        assert_eq!(python_replacement(r"\1.\2.\3.rate"), "${1}.${2}.${3}.rate");
        assert_eq!(python_replacement(r"\1/s"), "${1}/s");
        assert_eq!(python_replacement(r"\g<1>x$"), "${1}x$$");
        let s = Substitution::new(
            r"(disk\.device|disk)\.(read|write)\.(bytes|requests)",
            r"\1.\2.\3.rate",
        )
        .unwrap();
        assert_eq!(
            s.apply("disk.device.read.bytes"),
            "disk.device.read.bytes.rate"
        );
        let u = Substitution::new("(B|request)", r"\1/s").unwrap();
        assert_eq!(u.apply("request"), "request/s");
        assert_eq!(
            u.apply("ns"),
            "ns",
            "a non-matching pattern leaves the value"
        );
    }
}
