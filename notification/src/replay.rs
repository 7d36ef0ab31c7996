//! `notification replay`: run a pipeline offline on JSON lines (contract: docs/pipeline.md).
//!
//! Input lines: `{"samples": [SAMPLE, …]}` (one publish context) or `{"clock": "ISO-8601"}`
//! (the wall clock time-based transformers see from then on; default: newest timestamp
//! seen). Output: one line per published sample, in publish order:
//! `{"pipeline": "src:sink", "publisher": 0, "url": "notifier://", "sample": {…}}`.
//! Bad lines and dropped samples are reported on stderr with their line number.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;
use vmeter_core::sample::{DEFAULT_SOURCE, format_timestamp, parse_timestamp};
use vmeter_core::{Sample, SampleType};

use crate::definition::PipelineDef;
use crate::pipeline::Runtime;
use crate::transformers::ID_NAMESPACE;

/// Counts of a replay run.
#[derive(Debug, Default)]
pub struct Summary {
    pub contexts: u64,
    pub samples_in: u64,
    pub samples_out: u64,
    pub bad_lines: u64,
    pub dropped: BTreeMap<String, u64>,
}

/// Why a JSON sample was rejected before the pipeline.
#[derive(Debug, PartialEq)]
pub struct Rejected {
    pub reason: &'static str,
    pub detail: String,
}

fn rej(reason: &'static str, detail: impl Into<String>) -> Rejected {
    Rejected {
        reason,
        detail: detail.into(),
    }
}

/// Reads a sample in Ceilometer's JSON field names; lenient where Ceilometer was (numeric
/// string volumes, `null` ids, naive timestamps in UTC). `fallback_id` is used when the
/// sample carries no `message_id`.
pub fn sample_from_json(v: &Value, fallback_id: Uuid) -> Result<Sample, Rejected> {
    let o = v
        .as_object()
        .ok_or_else(|| rej("invalid_sample", "sample is not a JSON object"))?;
    let text = |k: &str| -> Result<String, Rejected> {
        match o.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            None | Some(Value::Null) => Err(rej("invalid_sample", format!("missing field {k}"))),
            Some(other) => Err(rej(
                "invalid_sample",
                format!("field {k} is not a string: {other}"),
            )),
        }
    };
    let opt_text = |k: &str| -> Option<String> {
        match o.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    };
    let name = text("name")?;
    let kind_s = text("type")?;
    let kind = SampleType::parse(&kind_s)
        .ok_or_else(|| rej("unknown_type", format!("{name}: unknown type {kind_s:?}")))?;
    let volume = match o.get("volume") {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(Value::String(s)) => s.trim().parse::<f64>().map_err(|_| {
            rej(
                "invalid_volume",
                format!("{name}: volume {s:?} is not a number"),
            )
        })?,
        None | Some(Value::Null) => {
            return Err(rej("missing_volume", format!("{name}: volume is missing")));
        }
        Some(other) => {
            return Err(rej(
                "invalid_volume",
                format!("{name}: volume {other} is not a number"),
            ));
        }
    };
    if !volume.is_finite() {
        return Err(rej(
            "invalid_volume",
            format!("{name}: volume is not finite"),
        ));
    }
    let ts_s = text("timestamp")?;
    let timestamp = parse_timestamp(&ts_s).ok_or_else(|| {
        rej(
            "invalid_timestamp",
            format!("{name}: timestamp {ts_s:?} does not parse"),
        )
    })?;
    let resource_metadata = match o.get("resource_metadata") {
        Some(Value::Object(m)) => m.clone(),
        None | Some(Value::Null) => Default::default(),
        Some(other) => {
            return Err(rej(
                "invalid_sample",
                format!("{name}: resource_metadata is not an object: {other}"),
            ));
        }
    };
    let message_id = match opt_text("message_id").or_else(|| opt_text("id")) {
        Some(s) => {
            Uuid::parse_str(&s).unwrap_or_else(|_| Uuid::new_v5(&ID_NAMESPACE, s.as_bytes()))
        }
        None => fallback_id,
    };
    let monotonic_time = match o.get("monotonic_time") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    Ok(Sample {
        name,
        kind,
        unit: text("unit").or_else(|_| {
            if o.contains_key("unit") {
                Ok(String::new())
            } else {
                Err(rej("invalid_sample", "missing field unit"))
            }
        })?,
        volume,
        user_id: opt_text("user_id"),
        project_id: opt_text("project_id"),
        resource_id: text("resource_id")?,
        timestamp,
        resource_metadata: resource_metadata.into(),
        source: opt_text("source").unwrap_or_else(|| DEFAULT_SOURCE.to_string()),
        message_id,
        monotonic_time,
    })
}

/// A sample in Ceilometer's JSON field names (timestamps RFC 3339 UTC with microseconds).
pub fn sample_to_json(s: &Sample) -> Value {
    json!({
        "name": s.name,
        "type": s.kind.as_str(),
        "unit": s.unit,
        "volume": s.volume,
        "user_id": s.user_id,
        "project_id": s.project_id,
        "resource_id": s.resource_id,
        "timestamp": format_timestamp(&s.timestamp),
        "resource_metadata": s.resource_metadata,
        "source": s.source,
        "message_id": s.message_id.to_string(),
        "monotonic_time": s.monotonic_time,
    })
}

/// Runs `def` over `input`, writing outputs to `out` and reports to `err`.
pub fn run(
    def: Arc<PipelineDef>,
    input: impl BufRead,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<Summary> {
    let mut rt = Runtime::new(def.clone());
    let mut sum = Summary::default();
    let mut clock: Option<DateTime<Utc>> = None;
    let mut newest: Option<DateTime<Utc>> = None;
    for (i, line) in input.lines().enumerate() {
        let lineno = i + 1;
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                sum.bad_lines += 1;
                writeln!(err, "line {lineno}: not JSON: {e}")?;
                continue;
            }
        };
        if let Some(c) = v.get("clock") {
            match c.as_str().and_then(parse_timestamp) {
                Some(t) => clock = Some(t),
                None => {
                    sum.bad_lines += 1;
                    writeln!(err, "line {lineno}: clock {c} is not an ISO-8601 timestamp")?;
                }
            }
            continue;
        }
        let Some(list) = v.get("samples").and_then(Value::as_array) else {
            sum.bad_lines += 1;
            writeln!(
                err,
                "line {lineno}: expected {{\"samples\": [...]}} or {{\"clock\": \"...\"}}"
            )?;
            continue;
        };
        let mut samples = Vec::with_capacity(list.len());
        for (j, sv) in list.iter().enumerate() {
            sum.samples_in += 1;
            let fallback = Uuid::new_v5(&ID_NAMESPACE, format!("replay:{lineno}:{j}").as_bytes());
            match sample_from_json(sv, fallback) {
                Ok(s) => {
                    newest = Some(newest.map_or(s.timestamp, |n| n.max(s.timestamp)));
                    samples.push(s);
                }
                Err(r) => {
                    *sum.dropped.entry(r.reason.to_string()).or_default() += 1;
                    writeln!(
                        err,
                        "line {lineno}: sample {j} dropped ({}): {}",
                        r.reason, r.detail
                    )?;
                }
            }
        }
        sum.contexts += 1;
        let now = clock.or(newest).unwrap_or_else(Utc::now);
        let emissions = rt.publish_context(samples, now);
        for d in rt.take_drops() {
            *sum.dropped.entry(d.reason.to_string()).or_default() += 1;
            if !d.reason.is_expected() {
                writeln!(
                    err,
                    "line {lineno}: sample dropped ({}): {}",
                    d.reason, d.detail
                )?;
            }
        }
        for e in emissions {
            let p = &def.pipelines[e.pipeline];
            let sink = &def.sinks[p.sink];
            for (pub_idx, url) in sink.publishers.iter().enumerate() {
                let url = url.url();
                for s in &e.samples {
                    sum.samples_out += 1;
                    let line = json!({"pipeline": p.name, "publisher": pub_idx, "url": url, "sample": sample_to_json(s)});
                    writeln!(out, "{line}")?;
                }
            }
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(pipeline: &str, input: &str) -> (Vec<Value>, String) {
        let def = Arc::new(crate::definition::parse(pipeline, "p.yaml").unwrap());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        run(def, input.as_bytes(), &mut out, &mut err).unwrap();
        let lines = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines, String::from_utf8(err).unwrap())
    }

    const CPU: &str = "sources: [{name: s, meters: [cpu], sinks: [k]}]\nsinks: [{name: k, transformers: [{name: rate_of_change, parameters: {target: {name: cpu_util, unit: '%', type: gauge, scale: '100.0 / (10**9 * (resource_metadata.cpu_number or 1))'}}}], publishers: [notifier://]}]";

    #[test]
    fn cpu_util_through_replay() {
        let input = r#"{"samples": [{"name": "cpu", "type": "cumulative", "unit": "ns", "volume": "120000000000", "user_id": null, "project_id": "p", "resource_id": "r", "timestamp": "2018-07-30T12:00:00", "resource_metadata": {"cpu_number": 2}}]}
not json
{"samples": [{"name": "cpu", "type": "cumulative", "unit": "ns", "volume": 180000000000, "user_id": null, "project_id": "p", "resource_id": "r", "timestamp": "2018-07-30T12:01:00", "resource_metadata": {"cpu_number": 2}}, {"name": "cpu", "type": "bogus", "unit": "ns", "volume": 1, "user_id": null, "project_id": null, "resource_id": "r", "timestamp": "2018-07-30T12:01:00"}]}
"#;
        let (out, err) = replay(CPU, input);
        assert_eq!(out.len(), 1, "{err}");
        assert_eq!(out[0]["pipeline"], "s:k");
        assert_eq!(out[0]["url"], "notifier://");
        assert_eq!(out[0]["sample"]["volume"], 50.0);
        assert_eq!(out[0]["sample"]["name"], "cpu_util");
        assert!(err.contains("line 2: not JSON"), "{err}");
        assert!(
            err.contains("line 3: sample 1 dropped (unknown_type)"),
            "{err}"
        );
    }

    #[test]
    fn lenient_sample_parsing() {
        let base = json!({"name": "m", "type": "gauge", "unit": "B", "volume": 1, "user_id": "u", "project_id": "p", "resource_id": "r", "timestamp": "2018-07-30T12:00:00"});
        let id = Uuid::nil();
        assert!(sample_from_json(&base, id).is_ok());
        let mut v = base.clone();
        v["volume"] = Value::Null;
        assert_eq!(
            sample_from_json(&v, id).unwrap_err().reason,
            "missing_volume"
        );
        v["volume"] = json!("abc");
        assert_eq!(
            sample_from_json(&v, id).unwrap_err().reason,
            "invalid_volume"
        );
        let mut v = base.clone();
        v["timestamp"] = json!("yesterday");
        assert_eq!(
            sample_from_json(&v, id).unwrap_err().reason,
            "invalid_timestamp"
        );
        let mut v = base;
        v["message_id"] = json!("not-a-uuid");
        let a = sample_from_json(&v, id).unwrap().message_id;
        assert_eq!(
            a,
            sample_from_json(&v, id).unwrap().message_id,
            "non-uuid ids map deterministically"
        );
    }
}
