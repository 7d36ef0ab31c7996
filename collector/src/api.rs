//! The Ceilometer-v2-style HTTP API (`GET /v2/meters/{meter}` so far).
//!
//! Errors are JSON `{"error_message": {"faultstring": "…"}}` (Ceilometer's shape) with a 4xx
//! status; internal errors are logged and answered with a generic 500 message.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sqlx::PgPool;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    pub pool: PgPool,
    pub default_limit: i64,
}

/// The API routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v2/meters/{meter}", get(meter_samples))
        .with_state(api)
}

/// An API error; its message is safe to show to clients.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "API request failed.");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the collector log".to_string(),
                )
            }
        };
        (code, Json(json!({"error_message": {"faultstring": msg}}))).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// One `q.field/q.op/q.value` triplet.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub field: String,
    pub op: String,
    pub value: String,
}

/// Parsed query string: filters and `limit`.
#[derive(Debug, Default, PartialEq)]
pub struct Query {
    pub filters: Vec<Filter>,
    pub limit: Option<i64>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `q.field=…&q.op=…&q.value=…` (repeated, `op` defaults to `eq`) and `limit`.
pub fn parse_query(raw: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query::default();
    let (mut fields, mut ops, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k), percent_decode(v));
        match k.as_str() {
            "q.field" => fields.push(v),
            "q.op" => ops.push(v),
            "q.value" => values.push(v),
            "q.type" => {}
            "limit" => {
                let n: i64 = v
                    .parse()
                    .map_err(|_| ApiError::BadRequest(format!("limit {v:?} is not an integer")))?;
                if n <= 0 {
                    return Err(ApiError::BadRequest("Limit must be positive".into()));
                }
                q.limit = Some(n);
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    if fields.len() != values.len() || ops.len() > fields.len() {
        return Err(ApiError::BadRequest(
            "every q.field needs a q.value (and at most one q.op)".into(),
        ));
    }
    for (i, (field, value)) in fields.into_iter().zip(values).enumerate() {
        let op = ops.get(i).cloned().unwrap_or_else(|| "eq".into());
        q.filters.push(Filter { field, op, value });
    }
    Ok(q)
}

fn parse_ts(v: &str) -> Result<DateTime<Utc>, ApiError> {
    vmeter_core::sample::parse_timestamp(v)
        .ok_or_else(|| ApiError::BadRequest(format!("timestamp {v:?} is not ISO-8601")))
}

/// Ceilometer's flattening: first level joined with `.`, deeper levels with `:`; values as
/// Python's `str()` would print them.
pub fn flatten_metadata(md: &Map<String, Value>) -> Map<String, Value> {
    fn py(v: &Value) -> String {
        match v {
            Value::Null => "None".into(),
            Value::Bool(true) => "True".into(),
            Value::Bool(false) => "False".into(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    fn walk(prefix: &str, sep: &str, v: &Value, out: &mut Map<String, Value>) {
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

type Row = (
    DateTime<Utc>,
    String,
    String,
    String,
    f64,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Value,
    i32,
    i32,
);

/// The API id of a stored sample: its natural key (meter, resource, µs timestamp) in hex.
/// Storage keeps no per-sample uuid (docs/storage.md); this id finds the row through the
/// primary key.
pub fn sample_id(meter_id: i32, resource: i32, ts: DateTime<Utc>) -> String {
    format!("{meter_id:x}-{resource:x}-{:x}", ts.timestamp_micros())
}

/// Inverse of [`sample_id`]; `None` for anything else.
pub fn parse_sample_id(id: &str) -> Option<(i32, i32, DateTime<Utc>)> {
    let mut it = id.split('-');
    let m = i32::from_str_radix(it.next()?, 16).ok()?;
    let r = i32::from_str_radix(it.next()?, 16).ok()?;
    let us = i64::from_str_radix(it.next()?, 16).ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((m, r, DateTime::from_timestamp_micros(us)?))
}

/// `GET /v2/meters/{meter}`: the meter's samples, newest first, as Ceilometer's OldSample.
async fn meter_samples(
    State(api): State<Api>,
    Path(meter): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<Value>>, ApiError> {
    let q = parse_query(raw.as_deref())?;
    let (mut resource, mut project, mut user, mut source) = (None, None, None, None);
    let (mut ge, mut gt, mut le, mut lt) = (None, None, None, None);
    for f in &q.filters {
        match (f.field.as_str(), f.op.as_str()) {
            ("timestamp", "ge") => ge = Some(parse_ts(&f.value)?),
            ("timestamp", "gt") => gt = Some(parse_ts(&f.value)?),
            ("timestamp", "le") => le = Some(parse_ts(&f.value)?),
            ("timestamp", "lt") => lt = Some(parse_ts(&f.value)?),
            ("timestamp", op) => {
                return Err(ApiError::BadRequest(format!(
                    "operator {op} is not supported for timestamp (use ge, gt, le, lt)"
                )));
            }
            (field, op) if op != "eq" => {
                return Err(ApiError::BadRequest(format!(
                    "unimplemented operator {op} for field {field}"
                )));
            }
            ("resource_id" | "resource", _) => resource = Some(f.value.clone()),
            ("project_id" | "project", _) => project = Some(f.value.clone()),
            ("user_id" | "user", _) => user = Some(f.value.clone()),
            ("source", _) => source = Some(f.value.clone()),
            (field, _) => {
                return Err(ApiError::BadRequest(format!(
                    "unrecognized field in query: {field}"
                )));
            }
        }
    }
    let limit = q.limit.unwrap_or(api.default_limit);
    let rows: Vec<Row> = sqlx::query_as(
        "select s.ts, m.name, m.type, m.unit, s.volume, r.resource_id, r.user_id, r.project_id, r.source, r.metadata, s.meter_id, s.resource_id
         from sample s join meter m on m.id = s.meter_id join resource r on r.id = s.resource_id
         where m.name = $1
           and ($2::text is null or r.resource_id = $2)
           and ($3::text is null or r.project_id = $3)
           and ($4::text is null or r.user_id = $4)
           and ($5::text is null or r.source = $5)
           and ($6::timestamptz is null or s.ts >= $6)
           and ($7::timestamptz is null or s.ts > $7)
           and ($8::timestamptz is null or s.ts <= $8)
           and ($9::timestamptz is null or s.ts < $9)
         order by s.ts desc
         limit $10",
    )
    .bind(&meter)
    .bind(resource)
    .bind(project)
    .bind(user)
    .bind(source)
    .bind(ge)
    .bind(gt)
    .bind(le)
    .bind(lt)
    .bind(limit)
    .fetch_all(&api.pool)
    .await?;
    let out = rows
        .into_iter()
        .map(
            |(ts, name, kind, unit, volume, rid, user, project, source, md, mid, rint)| {
                let md = match md {
                    Value::Object(m) => flatten_metadata(&m),
                    _ => Map::new(),
                };
                json!({
                    "source": source,
                    "counter_name": name,
                    "counter_type": kind,
                    "counter_unit": unit,
                    "counter_volume": volume,
                    "user_id": user,
                    "project_id": project,
                    "resource_id": rid,
                    "timestamp": ts.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
                    "resource_metadata": md,
                    "message_id": sample_id(mid, rint, ts),
                })
            },
        )
        .collect();
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = parse_query(Some("q.field=resource_id&q.value=abc%2D1&q.field=timestamp&q.op=ge&q.value=2026-01-01T00%3A00%3A00&limit=5")).unwrap();
        assert_eq!(q.limit, Some(5));
        assert_eq!(
            q.filters[0],
            Filter {
                field: "resource_id".into(),
                op: "ge".into(),
                value: "abc-1".into()
            }
        );
        // q.op pairs positionally with the fields that precede it, as in Ceilometer clients
        // that always send all three; with a missing op the default is eq.
        let q = parse_query(Some("q.field=project_id&q.op=eq&q.value=p")).unwrap();
        assert_eq!(q.filters[0].op, "eq");
        assert!(
            matches!(parse_query(Some("limit=0")), Err(ApiError::BadRequest(m)) if m == "Limit must be positive")
        );
        assert!(parse_query(Some("q.field=x")).is_err());
        assert!(parse_query(Some("bogus=1")).is_err());
    }

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
