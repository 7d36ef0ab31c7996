//! JSON shapes of samples and resources (Ceilometer's OldSample and Sample), metadata flattening.

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::ids::write_sample_id;
use super::resources::ResourceRow;
use super::sql::MeterInfo;
use crate::jsonw::JsonBuf;

/// Ceilometer's flattening: first level joined with `.`, deeper levels with `:`; values as
/// Python's `str()` would print them.
pub fn flatten_metadata(md: &Map<String, Value>) -> Map<String, Value> {
    pub(super) fn py(v: &Value) -> String {
        match v {
            Value::Null => "None".into(),
            Value::Bool(true) => "True".into(),
            Value::Bool(false) => "False".into(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    pub(super) fn walk(prefix: &str, sep: &str, v: &Value, out: &mut Map<String, Value>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    walk(&format!("{prefix}{sep}{k}"), ":", child, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), Value::String(py(other)));
            }
        }
    }
    let mut out = Map::new();
    for (k, v) in md {
        match v {
            Value::Object(m) => {
                for (k2, child) in m {
                    walk(&format!("{k}.{k2}"), ":", child, &mut out);
                }
            }
            other => {
                out.insert(k.clone(), Value::String(py(other)));
            }
        }
    }
    out
}

/// Ceilometer's timestamp format (naive UTC, microseconds), as [`JsonBuf::ts_bare`] writes it.
pub(super) fn iso(ts: DateTime<Utc>) -> String {
    let mut j = JsonBuf::with_capacity(26);
    j.ts_bare(ts);
    String::from_utf8(j.buf).expect("ASCII digits and separators")
}

pub(super) fn flat(md: Value) -> Map<String, Value> {
    match md {
        Value::Object(m) => flatten_metadata(&m),
        _ => Map::new(),
    }
}

/// One sample row: the narrow table's columns only; names come from [`MeterInfo`] and
/// [`ResInfo`], fetched once per meter and per resource.
pub(super) struct SampleRow {
    pub(super) ts: DateTime<Utc>,
    pub(super) volume: f64,
    pub(super) meter_id: i32,
    pub(super) rint: i32,
}

/// A resource's columns, with its metadata flattened and serialised once.
pub(super) struct ResInfo {
    pub(super) rid: String,
    pub(super) user: Option<String>,
    pub(super) project: Option<String>,
    pub(super) source: Option<String>,
    pub(super) md: Box<serde_json::value::RawValue>,
}

/// One sample as a JSON object with the keys of `shape`, in its order.
pub(super) fn write_row(
    j: &mut JsonBuf,
    shape: &[(&str, Field)],
    (s, m, r): &(&SampleRow, &MeterInfo, &ResInfo),
) {
    for (i, (key, field)) in shape.iter().enumerate() {
        j.raw(if i == 0 { "{\"" } else { ",\"" });
        j.raw(key);
        j.raw("\":");
        match field {
            Field::Id => {
                j.raw("\"");
                write_sample_id(&mut j.buf, s.meter_id, s.rint, s.ts);
                j.raw("\"");
            }
            Field::Meter => j.str(&m.name),
            Field::Kind => j.str(&m.kind),
            Field::Unit => j.str(&m.unit),
            Field::Volume => j.f64(s.volume),
            Field::User => j.opt_str(r.user.as_deref()),
            Field::Project => j.opt_str(r.project.as_deref()),
            Field::Resource => j.str(&r.rid),
            Field::Source => j.opt_str(r.source.as_deref()),
            // Storage keeps one time per sample: recorded_at is the sample's time.
            Field::Time => j.ts(s.ts),
            Field::Metadata => j.raw(r.md.get()),
        }
    }
    j.raw("}");
}

/// A sample field in the API's answers.
#[derive(Clone, Copy)]
pub(super) enum Field {
    Id,
    Meter,
    Kind,
    Unit,
    Volume,
    User,
    Project,
    Resource,
    Source,
    Time,
    Metadata,
}

/// Ceilometer's OldSample, keys in its order.
pub(super) const OLD_SAMPLE: &[(&str, Field)] = &[
    ("source", Field::Source),
    ("counter_name", Field::Meter),
    ("counter_type", Field::Kind),
    ("counter_unit", Field::Unit),
    ("counter_volume", Field::Volume),
    ("user_id", Field::User),
    ("project_id", Field::Project),
    ("resource_id", Field::Resource),
    ("timestamp", Field::Time),
    ("recorded_at", Field::Time),
    ("resource_metadata", Field::Metadata),
    ("message_id", Field::Id),
];

/// The v2 Sample, keys in its order.
pub(super) const NEW_SAMPLE: &[(&str, Field)] = &[
    ("id", Field::Id),
    ("meter", Field::Meter),
    ("type", Field::Kind),
    ("unit", Field::Unit),
    ("volume", Field::Volume),
    ("user_id", Field::User),
    ("project_id", Field::Project),
    ("resource_id", Field::Resource),
    ("source", Field::Source),
    ("timestamp", Field::Time),
    ("recorded_at", Field::Time),
    ("metadata", Field::Metadata),
];

pub(super) fn resource_json(r: ResourceRow, headers: &HeaderMap, links: bool) -> Value {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let base = format!("http://{host}/v2");
    let mut l = vec![json!({"href": format!("{base}/resources/{}", r.rid), "rel": "self"})];
    if links {
        for m in &r.meters {
            l.push(json!({"href": format!("{base}/meters/{m}?q.field=resource_id&q.value={}", r.rid), "rel": m}));
        }
    }
    json!({
        "resource_id": r.rid,
        "project_id": r.project,
        "user_id": r.user,
        "source": r.source,
        "first_sample_timestamp": iso(r.first),
        "last_sample_timestamp": iso(r.last),
        "metadata": flat(r.md),
        "links": l,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattening_like_ceilometer() {
        let md: Map<String, Value> = serde_json::from_str(r#"{"a": {"b": {"c": "d"}}, "flavor": {"name": "m1", "vcpus": 2}, "x": true, "n": null, "cpu_number": 2}"#).unwrap();
        let f = flatten_metadata(&md);
        assert_eq!(f["a.b:c"], "d");
        assert_eq!(f["flavor.name"], "m1");
        assert_eq!(f["flavor.vcpus"], "2");
        assert_eq!(f["x"], "True");
        assert_eq!(f["n"], "None");
        assert_eq!(f["cpu_number"], "2");
    }
}
