//! What a transformer's outputs are called: the `target` mapping (name, unit, type, scale
//! expression, Python-style substitutions), evaluated against the input sample.

use serde::Deserialize;
use serde_yaml_ng::Value;
use vmeter_core::{Sample, SampleType};

use super::params::lenient_f64;
use crate::expr::{Expr, Scope, Val};

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
    pub(super) fn new(pattern: &str, replacement: &str) -> Result<Self, String> {
        let re = regex::Regex::new(pattern)
            .map_err(|e| format!("map_from pattern {pattern:?} does not compile: {e}"))?;
        Ok(Substitution {
            re,
            replacement: python_replacement(replacement),
            pattern: pattern.into(),
            python_replacement: replacement.into(),
        })
    }

    pub(super) fn apply(&self, value: &str) -> String {
        self.re
            .replace_all(value, self.replacement.as_str())
            .into_owned()
    }
}

/// Python `re.sub` replacement syntax (`\1`, `\g<1>`, `\g<name>`, `\\`) → regex crate syntax.
pub(super) fn python_replacement(r: &str) -> String {
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

    pub(super) fn map(sub: &Option<Substitution>, fixed: &Option<String>, input: &str) -> String {
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
