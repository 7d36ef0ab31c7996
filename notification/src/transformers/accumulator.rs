//! `accumulator`: holds samples until `size` are buffered, then releases them all in order.

use serde::Deserialize;
use serde_yaml_ng::Value;
use vmeter_core::Sample;

use super::{Cx, Transformer, lenient_i64, params};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    #[serde(deserialize_with = "lenient_i64")]
    size: Option<i64>,
}

/// Parameters of `accumulator`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccumulatorSpec {
    /// Samples to buffer before releasing (default 1); below 1 samples pass straight through.
    pub size: i64,
}

impl AccumulatorSpec {
    pub(super) fn from_value(v: Value) -> Result<Self, String> {
        let raw: Raw = params(v)?;
        Ok(AccumulatorSpec {
            size: raw.size.unwrap_or(1),
        })
    }
}

/// See the module doc. Released samples keep their ids (they are the inputs).
pub struct Accumulator {
    spec: AccumulatorSpec,
    buf: Vec<Sample>,
}

impl Accumulator {
    pub fn new(spec: AccumulatorSpec) -> Self {
        Accumulator {
            spec,
            buf: Vec::new(),
        }
    }
}

impl Transformer for Accumulator {
    fn handle(&mut self, s: Sample, _cx: &mut Cx<'_>) -> Option<Sample> {
        if self.spec.size < 1 {
            return Some(s);
        }
        self.buf.push(s);
        None
    }

    fn flush(&mut self, _cx: &mut Cx<'_>) -> Vec<Sample> {
        if self.spec.size >= 1 && self.buf.len() as i64 >= self.spec.size {
            std::mem::take(&mut self.buf)
        } else {
            Vec::new()
        }
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::to_value(&self.buf).unwrap_or_default()
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), String> {
        self.buf = serde_json::from_value(state).map_err(|e| e.to_string())?;
        Ok(())
    }
}
