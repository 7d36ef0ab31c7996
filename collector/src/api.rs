//! The Ceilometer-v2-style HTTP API.
//!
//! Routes: `GET /v2/meters`, `GET|POST /v2/meters/{meter}`, `GET /v2/meters/{meter}/statistics`,
//! `GET /v2/samples`, `GET /v2/samples/{id}`, `GET /v2/resources`, `GET /v2/resources/{id}`,
//! `GET /v2/capabilities`. Shapes, filters and statistics semantics follow Ceilometer 9's v2
//! API (reference §g.3); where vmeter differs it says so in docs/api.md.
//!
//! Errors are JSON `{"error_message": {"faultstring": "…"}}` (Ceilometer's shape) with 400,
//! 401 or 404; internal errors are logged and answered with a generic 500 message, never a
//! trace. Every query is one SQL statement with bound parameters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use vmeter_core::{Sample, SampleType};

/// Bearer tokens: none configured means the API is open (logged at start).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Tokens that see everything.
    pub admin: Vec<String>,
    /// Token → the one project it sees.
    pub projects: BTreeMap<String, String>,
}

impl Auth {
    fn enabled(&self) -> bool {
        !self.admin.is_empty() || !self.projects.is_empty()
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    Admin,
    Project(String),
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    pub pool: PgPool,
    pub default_limit: i64,
    pub auth: Arc<Auth>,
    /// Publishes posted samples to the raw queue (`None`: only `direct=true` is accepted).
    pub raw: Option<Arc<dyn RawPublish>>,
}

/// Publishing posted samples to the raw queue (implemented by the collector over its
/// broker connection).
pub trait RawPublish: Send + Sync {
    fn publish(
        &self,
        samples: Vec<Sample>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
}

/// The API routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v2/meters", get(list_meters))
        .route("/v2/meters/{meter}", get(meter_samples).post(post_samples))
        .route("/v2/meters/{meter}/statistics", get(statistics))
        .route("/v2/samples", get(list_samples))
        .route("/v2/samples/{id}", get(one_sample))
        .route("/v2/resources", get(list_resources))
        .route("/v2/resources/{id}", get(one_resource))
        .route("/v2/capabilities", get(capabilities))
        .with_state(api)
}

/// An API error; its message is safe to show to clients.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(String),
    NotFound(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
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

/// Parsed query string: filters, `limit` and the other known parameters.
#[derive(Debug, Default, PartialEq)]
pub struct Query {
    pub filters: Vec<Filter>,
    pub limit: Option<i64>,
    /// `groupby`, `period`, `aggregate.*`, `unique`, `direct`, `meter_links`, in order.
    pub params: Vec<(String, String)>,
}

impl Query {
    fn param(&self, k: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    fn params(&self, k: &str) -> impl Iterator<Item = &str> {
        self.params
            .iter()
            .filter(move |(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self
            .params
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()))
        {
            Some((k, _)) => Err(ApiError::BadRequest(format!(
                "parameter {k} is not valid here"
            ))),
            None => Ok(()),
        }
    }
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
    // Triplets in order: a q.op or q.value belongs to the q.field before it.
    let mut triplets: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    let orphan = || ApiError::BadRequest("q.op and q.value must follow their q.field".into());
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k), percent_decode(v));
        match k.as_str() {
            "q.field" => triplets.push((v, None, None)),
            "q.op" => triplets.last_mut().ok_or_else(orphan)?.1 = Some(v),
            "q.value" => triplets.last_mut().ok_or_else(orphan)?.2 = Some(v),
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
            "groupby" | "period" | "aggregate.func" | "aggregate.param" | "unique" | "direct"
            | "meter_links" => q.params.push((k, v)),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    for (field, op, value) in triplets {
        let value =
            value.ok_or_else(|| ApiError::BadRequest(format!("q.field {field} has no q.value")))?;
        let op = op.unwrap_or_else(|| "eq".into());
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

/// Resolves the caller from `Authorization: Bearer T` or `X-Auth-Token: T`.
fn caller(api: &Api, headers: &HeaderMap) -> Result<Caller, ApiError> {
    if !api.auth.enabled() {
        return Ok(Caller::Admin);
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-auth-token").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::Unauthorized("authentication required: send a bearer token".into())
        })?;
    if api.auth.admin.iter().any(|t| constant_time_eq(t, token)) {
        return Ok(Caller::Admin);
    }
    for (t, project) in api.auth.projects.iter() {
        if constant_time_eq(t, token) {
            return Ok(Caller::Project(project.clone()));
        }
    }
    Err(ApiError::Unauthorized("invalid token".into()))
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Filters applicable to samples (`s`), meters (`m`) and resources (`r`).
#[derive(Debug, Default)]
struct Cond {
    meter: Option<String>,
    resource: Option<String>,
    project: Option<String>,
    user: Option<String>,
    source: Option<String>,
    sample: Option<(i32, i32, DateTime<Utc>)>,
    ge: Option<DateTime<Utc>>,
    gt: Option<DateTime<Utc>>,
    le: Option<DateTime<Utc>>,
    lt: Option<DateTime<Utc>>,
    /// `metadata.a.b` = value, compared as text (`True`/`False` as JSON booleans).
    metadata: Vec<(Vec<String>, String)>,
}

impl Cond {
    /// Start and end of the time range, as Ceilometer's (start ge/gt, end le/lt).
    fn start(&self) -> Option<DateTime<Utc>> {
        self.ge.or(self.gt)
    }
    fn end(&self) -> Option<DateTime<Utc>> {
        self.lt.or(self.le)
    }
}

/// What a handler accepts in `q.field`.
#[derive(Clone, Copy)]
struct Fields {
    timestamp: bool,
    meter: bool,
    message_id: bool,
}

/// What every query endpoint does first: authenticate, parse the query string, check its
/// extra parameters against `params`, and turn the filters into conditions.
fn request(
    api: &Api,
    headers: &HeaderMap,
    raw: Option<&str>,
    params: &[&str],
    fields: Fields,
) -> Result<(Query, Cond), ApiError> {
    let who = caller(api, headers)?;
    let q = parse_query(raw)?;
    q.only(params)?;
    let c = conditions(&q, fields, &who)?;
    Ok((q, c))
}

fn conditions(q: &Query, allowed: Fields, who: &Caller) -> Result<Cond, ApiError> {
    let mut c = Cond::default();
    for f in &q.filters {
        let field = f.field.as_str();
        if field == "timestamp" {
            if !allowed.timestamp {
                return Err(ApiError::BadRequest(
                    "timestamp is not a valid filter here".into(),
                ));
            }
            let t = parse_ts(&f.value)?;
            match f.op.as_str() {
                "ge" => c.ge = Some(t),
                "gt" => c.gt = Some(t),
                "le" => c.le = Some(t),
                "lt" => c.lt = Some(t),
                op => {
                    return Err(ApiError::BadRequest(format!(
                        "operator {op} is not supported for timestamp (use ge, gt, le, lt)"
                    )));
                }
            }
            continue;
        }
        if f.op != "eq" {
            return Err(ApiError::BadRequest(format!(
                "unimplemented operator {} for field {field}",
                f.op
            )));
        }
        let v = f.value.clone();
        match field {
            "resource_id" | "resource" => c.resource = Some(v),
            "project_id" | "project" => c.project = Some(v),
            "user_id" | "user" => c.user = Some(v),
            "source" => c.source = Some(v),
            "meter" | "counter_name" if allowed.meter => c.meter = Some(v),
            "message_id" | "id" if allowed.message_id => {
                c.sample = Some(parse_sample_id(&v).ok_or_else(|| {
                    ApiError::BadRequest(format!("{v:?} is not a vmeter sample id"))
                })?)
            }
            other => {
                let path = other
                    .strip_prefix("metadata.")
                    .or_else(|| other.strip_prefix("resource_metadata."));
                match path {
                    Some(p) if !p.is_empty() => {
                        let v = match v.as_str() {
                            "True" => "true".to_string(),
                            "False" => "false".to_string(),
                            _ => v,
                        };
                        c.metadata
                            .push((p.split(['.', ':']).map(str::to_string).collect(), v));
                    }
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "unrecognized field in query: {other}"
                        )));
                    }
                }
            }
        }
    }
    if let Caller::Project(p) = who {
        match &c.project {
            Some(asked) if asked != p => {
                return Err(ApiError::Unauthorized(format!(
                    "not authorized to access project {asked}"
                )));
            }
            _ => c.project = Some(p.clone()),
        }
    }
    Ok(c)
}

/// Appends ` and …` clauses for `c` (aliases: `s` sample, `m` meter, `r` resource).
fn push_cond(qb: &mut QueryBuilder<Postgres>, c: &Cond, samples: bool) {
    macro_rules! eq {
        ($col:literal, $v:expr) => {
            if let Some(v) = &$v {
                qb.push(concat!(" and ", $col, " = "));
                qb.push_bind(v.clone());
            }
        };
    }
    eq!("m.name", c.meter);
    eq!("r.resource_id", c.resource);
    eq!("r.project_id", c.project);
    eq!("r.user_id", c.user);
    eq!("r.source", c.source);
    for (path, v) in &c.metadata {
        qb.push(" and r.metadata #>> ");
        qb.push_bind(path.clone());
        qb.push(" = ");
        qb.push_bind(v.clone());
    }
    if samples {
        if let Some((m, r, t)) = c.sample {
            qb.push(" and s.meter_id = ");
            qb.push_bind(m);
            qb.push(" and s.resource_id = ");
            qb.push_bind(r);
            qb.push(" and s.ts = ");
            qb.push_bind(t);
        }
        for (op, t) in [(">=", c.ge), (">", c.gt), ("<=", c.le), ("<", c.lt)] {
            if let Some(t) = t {
                qb.push(format!(" and s.ts {op} "));
                qb.push_bind(t);
            }
        }
    }
}

fn limit(api: &Api, q: &Query) -> i64 {
    q.limit.unwrap_or(api.default_limit)
}

/// Ceilometer's timestamp format (naive UTC, microseconds). Hand-formatted: chrono's
/// strftime interpreter was a third of the statistics endpoint's time for large answers.
fn iso(ts: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let t = ts.naive_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 1000 % 1_000_000
    )
}

fn flat(md: Value) -> Map<String, Value> {
    match md {
        Value::Object(m) => flatten_metadata(&m),
        _ => Map::new(),
    }
}

const SAMPLE_COLS: &str = "select s.ts, m.name, m.type, m.unit, s.volume, s.meter_id, s.resource_id
     from sample s join meter m on m.id = s.meter_id join resource r on r.id = s.resource_id
     where true";

/// One sample row; its resource's columns are fetched once per resource ([`ResInfo`]).
struct SampleRow {
    ts: DateTime<Utc>,
    name: String,
    kind: String,
    unit: String,
    volume: f64,
    meter_id: i32,
    rint: i32,
}

/// A resource's columns, with its metadata flattened and serialised once.
struct ResInfo {
    rid: String,
    user: Option<String>,
    project: Option<String>,
    source: Option<String>,
    md: Box<serde_json::value::RawValue>,
}

/// Samples plus the resources they refer to.
struct Fetched {
    rows: Vec<SampleRow>,
    res: HashMap<i32, ResInfo>,
}

#[derive(serde::Serialize)]
struct OldSampleOut<'a> {
    source: Option<&'a str>,
    counter_name: &'a str,
    counter_type: &'a str,
    counter_unit: &'a str,
    counter_volume: f64,
    user_id: Option<&'a str>,
    project_id: Option<&'a str>,
    resource_id: &'a str,
    timestamp: String,
    recorded_at: String,
    resource_metadata: &'a serde_json::value::RawValue,
    message_id: String,
}

#[derive(serde::Serialize)]
struct SampleOut<'a> {
    id: String,
    meter: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    unit: &'a str,
    volume: f64,
    user_id: Option<&'a str>,
    project_id: Option<&'a str>,
    resource_id: &'a str,
    source: Option<&'a str>,
    timestamp: String,
    recorded_at: String,
    metadata: &'a serde_json::value::RawValue,
}

impl Fetched {
    /// Rows with their resource; a row whose resource was pruned between the two queries
    /// (retention running concurrently) is left out rather than failing the request.
    fn joined(&self) -> impl Iterator<Item = (&SampleRow, &ResInfo)> {
        self.rows
            .iter()
            .filter_map(|s| self.res.get(&s.rint).map(|r| (s, r)))
    }

    fn old(&self) -> Vec<OldSampleOut<'_>> {
        self.joined()
            .map(|(s, r)| OldSampleOut {
                source: r.source.as_deref(),
                counter_name: &s.name,
                counter_type: &s.kind,
                counter_unit: &s.unit,
                counter_volume: s.volume,
                user_id: r.user.as_deref(),
                project_id: r.project.as_deref(),
                resource_id: &r.rid,
                timestamp: iso(s.ts),
                recorded_at: iso(s.ts),
                resource_metadata: &r.md,
                message_id: sample_id(s.meter_id, s.rint, s.ts),
            })
            .collect()
    }

    fn new_shape(&self) -> Vec<SampleOut<'_>> {
        self.joined()
            .map(|(s, r)| SampleOut {
                id: sample_id(s.meter_id, s.rint, s.ts),
                meter: &s.name,
                kind: &s.kind,
                unit: &s.unit,
                volume: s.volume,
                user_id: r.user.as_deref(),
                project_id: r.project.as_deref(),
                resource_id: &r.rid,
                source: r.source.as_deref(),
                timestamp: iso(s.ts),
                recorded_at: iso(s.ts),
                metadata: &r.md,
            })
            .collect()
    }
}

/// A JSON response from something serialisable (no intermediate `Value` tree).
fn json_response<T: serde::Serialize>(v: &T) -> Result<Response, ApiError> {
    let mut body = Vec::with_capacity(64 * 1024);
    serde_json::to_writer(&mut body, v).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

async fn fetch_samples(api: &Api, c: &Cond, limit: i64) -> Result<Fetched, ApiError> {
    let mut qb = QueryBuilder::new(SAMPLE_COLS);
    push_cond(&mut qb, c, true);
    qb.push(" order by s.ts desc limit ");
    qb.push_bind(limit);
    let rows = qb.build().fetch_all(&api.pool).await?;
    let rows: Vec<SampleRow> = rows
        .iter()
        .map(|r| {
            Ok(SampleRow {
                ts: r.try_get(0)?,
                name: r.try_get(1)?,
                kind: r.try_get(2)?,
                unit: r.try_get(3)?,
                volume: r.try_get(4)?,
                meter_id: r.try_get(5)?,
                rint: r.try_get(6)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    let mut ids: Vec<i32> = rows.iter().map(|r| r.rint).collect();
    ids.sort_unstable();
    ids.dedup();
    let res_rows = sqlx::query(
        "select id, resource_id, user_id, project_id, source, metadata from resource where id = any($1)",
    )
    .bind(&ids)
    .fetch_all(&api.pool)
    .await?;
    let mut res = HashMap::with_capacity(res_rows.len());
    for r in &res_rows {
        let md = serde_json::value::to_raw_value(&flat(r.try_get(5)?))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        res.insert(
            r.try_get::<i32, _>(0)?,
            ResInfo {
                rid: r.try_get(1)?,
                user: r.try_get(2)?,
                project: r.try_get(3)?,
                source: r.try_get(4)?,
                md,
            },
        );
    }
    Ok(Fetched { rows, res })
}

const SAMPLES: Fields = Fields {
    timestamp: true,
    meter: false,
    message_id: true,
};

/// `GET /v2/meters/{meter}`: the meter's samples, newest first, as Ceilometer's OldSample.
async fn meter_samples(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(meter): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (q, mut c) = request(&api, &headers, raw.as_deref(), &[], SAMPLES)?;
    c.meter = Some(meter);
    let f = fetch_samples(&api, &c, limit(&api, &q)).await?;
    json_response(&f.old())
}

/// `GET /v2/samples`: samples of any meter (`q.field=meter`), newest first.
async fn list_samples(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let fields = Fields {
        meter: true,
        ..SAMPLES
    };
    let (q, c) = request(&api, &headers, raw.as_deref(), &[], fields)?;
    let f = fetch_samples(&api, &c, limit(&api, &q)).await?;
    json_response(&f.new_shape())
}

/// `GET /v2/samples/{id}`.
async fn one_sample(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound(format!("Sample {id} Not Found"));
    let (_, mut c) = request(&api, &headers, None, &[], SAMPLES)?;
    let key = parse_sample_id(&id).ok_or_else(not_found)?;
    c.sample = Some(key);
    let f = fetch_samples(&api, &c, 1).await?;
    let one = f.new_shape().into_iter().next().ok_or_else(not_found)?;
    json_response(&one)
}

/// Standard base64 (for Ceilometer's `meter_id`).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET /v2/meters`: one entry per (meter, resource) (`unique=true`: one per meter).
async fn list_meters(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<Value>>, ApiError> {
    let fields = Fields {
        timestamp: false,
        meter: false,
        message_id: false,
    };
    let (q, c) = request(&api, &headers, raw.as_deref(), &["unique"], fields)?;
    let unique = matches!(q.param("unique"), Some("true" | "True" | "1"));
    let mut qb = QueryBuilder::new(if unique {
        "select distinct m.name, m.type, m.unit, null::text, null::text, null::text, null::text
         from series se join meter m on m.id = se.meter_id join resource r on r.id = se.resource_id where true"
    } else {
        "select m.name, m.type, m.unit, r.resource_id, r.project_id, r.user_id, r.source
         from series se join meter m on m.id = se.meter_id join resource r on r.id = se.resource_id where true"
    });
    push_cond(&mut qb, &c, false);
    qb.push(if unique {
        " order by 1, 2, 3 limit "
    } else {
        " order by m.name, r.resource_id limit "
    });
    qb.push_bind(limit(&api, &q));
    let rows = qb.build().fetch_all(&api.pool).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let (name, kind, unit): (String, String, String) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        let rid: Option<String> = r.try_get(3)?;
        out.push(json!({
            "name": name,
            "type": kind,
            "unit": unit,
            "resource_id": rid,
            "project_id": r.try_get::<Option<String>, _>(4)?,
            "user_id": r.try_get::<Option<String>, _>(5)?,
            "source": r.try_get::<Option<String>, _>(6)?,
            "meter_id": rid.as_ref().map(|rid| base64(format!("{rid}+{name}").as_bytes())),
        }));
    }
    Ok(Json(out))
}

/// `GET /v2/resources`.
async fn list_resources(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<Value>>, ApiError> {
    let fields = Fields {
        timestamp: true,
        meter: true,
        message_id: false,
    };
    let (q, c) = request(&api, &headers, raw.as_deref(), &["meter_links"], fields)?;
    let links = !matches!(q.param("meter_links"), Some("0" | "false" | "False"));
    let rows = fetch_resources(&api, &c, limit(&api, &q)).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| resource_json(r, &headers, links))
            .collect(),
    ))
}

/// `GET /v2/resources/{id}`.
async fn one_resource(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, mut c) = request(&api, &headers, None, &[], SAMPLES)?;
    c.resource = Some(id.clone());
    let row = fetch_resources(&api, &c, 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound(format!("Resource {id} Not Found")))?;
    Ok(Json(resource_json(row, &headers, true)))
}

struct ResourceRow {
    rid: String,
    user: Option<String>,
    project: Option<String>,
    source: Option<String>,
    md: Value,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    meters: Vec<String>,
}

/// Resources under `c`. Time filters select resources whose first..last sample span
/// overlaps the range (vmeter keeps first/last per resource instead of scanning samples).
async fn fetch_resources(api: &Api, c: &Cond, limit: i64) -> Result<Vec<ResourceRow>, ApiError> {
    let mut qb = QueryBuilder::new(
        "select r.resource_id, r.user_id, r.project_id, r.source, r.metadata, r.first_seen, r.last_seen,
                coalesce((select array_agg(m.name order by m.name) from series se join meter m on m.id = se.meter_id where se.resource_id = r.id), '{}')
         from resource r where true",
    );
    let meter = c.meter.clone();
    let c2 = Cond {
        meter: None,
        ..Cond {
            resource: c.resource.clone(),
            project: c.project.clone(),
            user: c.user.clone(),
            source: c.source.clone(),
            metadata: c.metadata.clone(),
            ..Cond::default()
        }
    };
    push_cond(&mut qb, &c2, false);
    if let Some(m) = meter {
        qb.push(" and exists (select 1 from series se join meter m on m.id = se.meter_id where se.resource_id = r.id and m.name = ");
        qb.push_bind(m);
        qb.push(")");
    }
    if let Some(t) = c.start() {
        qb.push(" and r.last_seen >= ");
        qb.push_bind(t);
    }
    if let Some(t) = c.end() {
        qb.push(" and r.first_seen <= ");
        qb.push_bind(t);
    }
    qb.push(" order by r.resource_id limit ");
    qb.push_bind(limit);
    let rows = qb.build().fetch_all(&api.pool).await?;
    rows.iter()
        .map(|r| {
            Ok(ResourceRow {
                rid: r.try_get(0)?,
                user: r.try_get(1)?,
                project: r.try_get(2)?,
                source: r.try_get(3)?,
                md: r.try_get(4)?,
                first: r.try_get(5)?,
                last: r.try_get(6)?,
                meters: r.try_get(7)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ApiError::from)
}

fn resource_json(r: ResourceRow, headers: &HeaderMap, links: bool) -> Value {
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

/// `GET /v2/capabilities`.
async fn capabilities() -> Json<Value> {
    let agg = json!({"standard": true, "selectable": {"max": true, "min": true, "sum": true, "avg": true, "count": true, "stddev": true, "cardinality": true, "quartile": false}});
    Json(json!({
        "api": {
            "meters": {"query": {"simple": true, "metadata": true}},
            "resources": {"query": {"simple": true, "metadata": true}},
            "samples": {"query": {"simple": true, "metadata": true, "complex": false}},
            "statistics": {"groupby": true, "query": {"simple": true, "metadata": true}, "aggregation": agg},
        },
        "storage": {"storage:production_ready": true},
    }))
}

/// A statistics aggregate requested with `aggregate.func`/`aggregate.param`.
#[derive(Debug, Clone, PartialEq)]
enum Agg {
    Std(&'static str),
    Cardinality(&'static str),
}

fn aggregates(q: &Query) -> Result<Vec<Agg>, ApiError> {
    let funcs: Vec<&str> = q.params("aggregate.func").collect();
    let params: Vec<&str> = q.params("aggregate.param").collect();
    let mut out = Vec::new();
    for (i, f) in funcs.iter().enumerate() {
        let a = match *f {
            "max" => Agg::Std("max"),
            "min" => Agg::Std("min"),
            "sum" => Agg::Std("sum"),
            "avg" => Agg::Std("avg"),
            "count" => Agg::Std("count"),
            "stddev" => Agg::Std("stddev"),
            "cardinality" => match params.get(i).copied() {
                Some("resource_id") => Agg::Cardinality("resource_id"),
                Some("user_id") => Agg::Cardinality("user_id"),
                Some("project_id") => Agg::Cardinality("project_id"),
                p => {
                    return Err(ApiError::BadRequest(format!(
                        "Bad aggregate: cardinality.{}",
                        p.unwrap_or("")
                    )));
                }
            },
            other => {
                return Err(ApiError::BadRequest(format!(
                    "Invalid aggregation function: {other}"
                )));
            }
        };
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// `GET /v2/meters/{meter}/statistics`: one SQL statement over the filtered samples,
/// grouped by unit, the `groupby` fields and, with `period`, the time bucket.
async fn statistics(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(meter): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = ["groupby", "period", "aggregate.func", "aggregate.param"];
    let (q, mut c) = request(&api, &headers, raw.as_deref(), &params, SAMPLES)?;
    c.meter = Some(meter);
    let period: Option<f64> = match q.param("period") {
        None => None,
        Some(p) => {
            let v: f64 = p
                .parse()
                .map_err(|_| ApiError::BadRequest(format!("period {p:?} is not a number")))?;
            if v <= 0.0 || !v.is_finite() {
                return Err(ApiError::BadRequest("Period must be positive.".into()));
            }
            Some(v)
        }
    };
    let mut groupby: Vec<(&'static str, &'static str)> = Vec::new();
    for g in q.params("groupby") {
        let col = match g {
            "user_id" => ("user_id", "r.user_id"),
            "project_id" => ("project_id", "r.project_id"),
            "resource_id" => ("resource_id", "r.resource_id"),
            "source" => ("source", "r.source"),
            "resource_metadata.instance_type" => (
                "resource_metadata.instance_type",
                "r.metadata->>'instance_type'",
            ),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "Invalid groupby fields: {other}"
                )));
            }
        };
        if !groupby.contains(&col) {
            groupby.push(col);
        }
    }
    let aggs = aggregates(&q)?;

    // Bucket origin and end: the query's bounds, else the first/last sample of the
    // selected series (kept per series by the collector: no scan of the samples).
    let (mut t0, mut t1) = (c.start(), c.end());
    if period.is_some() && (t0.is_none() || t1.is_none()) {
        let mut qb = QueryBuilder::new(
            "select min(se.first_ts), max(se.last_ts) from series se join meter m on m.id = se.meter_id join resource r on r.id = se.resource_id where true",
        );
        push_cond(&mut qb, &c, false);
        let row = qb.build().fetch_one(&api.pool).await?;
        let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
            (row.try_get(0)?, row.try_get(1)?);
        t0 = t0.or(first);
        t1 = t1.or(last);
    }
    // With a period: buckets [t0 + kP, t0 + (k+1)P) for k < ceil((t1 - t0) / P).
    let buckets = match (period, t0, t1) {
        (Some(p), Some(t0), Some(t1)) => {
            let span = (t1 - t0).num_microseconds().unwrap_or(0) as f64 / 1e6;
            let n = (span / p).ceil().max(0.0);
            Some((
                p,
                t0,
                t0 + chrono::Duration::microseconds((n * p * 1e6) as i64),
            ))
        }
        (Some(_), _, _) => return json_response(&Vec::<Value>::new()),
        _ => None,
    };

    // One statement in two levels: the inner level reads only the narrow sample table
    // (meter and resources resolved to their integer ids first, no per-row join) and
    // aggregates per (meter id, resource, bucket); the outer level joins the names and
    // merges to (unit, groupby fields, bucket). stddev from the sum of squares.
    let mut qb = QueryBuilder::new("select m.unit");
    for (_, expr) in &groupby {
        qb.push(format!(", {expr}"));
    }
    qb.push(", a.k, sum(a.n)::bigint, min(a.mn), max(a.mx), sum(a.sm), sum(a.sm) / sum(a.n), sqrt(greatest(sum(a.sq) / sum(a.n) - (sum(a.sm) / sum(a.n))^2, 0)), min(a.t0), max(a.t1)");
    // Distinct counts only when asked for (they force a sort per group).
    for (i, col) in ["r.resource_id", "r.user_id", "r.project_id"]
        .iter()
        .enumerate()
    {
        if aggs.contains(&Agg::Cardinality(
            ["resource_id", "user_id", "project_id"][i],
        )) {
            qb.push(format!(", count(distinct {col})"));
        } else {
            qb.push(", 0::bigint");
        }
    }
    qb.push(" from (select s.meter_id, s.resource_id");
    match buckets {
        Some((p, t0, _)) => {
            qb.push(", floor(extract(epoch from s.ts - ");
            qb.push_bind(t0);
            qb.push("::timestamptz)::float8 / ");
            qb.push_bind(p);
            qb.push(")::bigint as k");
        }
        None => {
            qb.push(", 0::bigint as k");
        }
    }
    qb.push(", count(*) as n, min(s.volume) as mn, max(s.volume) as mx, sum(s.volume) as sm, sum(s.volume * s.volume) as sq, min(s.ts) as t0, max(s.ts) as t1 from sample s where s.meter_id = any(array(select id from meter where name = ");
    qb.push_bind(c.meter.clone().unwrap_or_default());
    qb.push("))");
    let resource_level = Cond {
        resource: c.resource.clone(),
        project: c.project.clone(),
        user: c.user.clone(),
        source: c.source.clone(),
        metadata: c.metadata.clone(),
        ..Cond::default()
    };
    if resource_level.resource.is_some()
        || resource_level.project.is_some()
        || resource_level.user.is_some()
        || resource_level.source.is_some()
        || !resource_level.metadata.is_empty()
    {
        qb.push(" and s.resource_id = any(array(select r.id from resource r where true");
        push_cond(&mut qb, &resource_level, false);
        qb.push("))");
    }
    let time_only = Cond {
        ge: c.ge,
        gt: c.gt,
        le: c.le,
        lt: c.lt,
        sample: c.sample,
        ..Cond::default()
    };
    push_cond(&mut qb, &time_only, true);
    if let Some((_, t0, end)) = buckets {
        qb.push(" and s.ts >= ");
        qb.push_bind(t0);
        qb.push(" and s.ts < ");
        qb.push_bind(end);
    }
    qb.push(" group by 1, 2, 3) a join meter m on m.id = a.meter_id join resource r on r.id = a.resource_id");
    let gcount = groupby.len();
    let group_cols: String = (1..=gcount + 2)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    qb.push(format!(" group by {group_cols} order by {}, 1", gcount + 2));
    for i in 0..gcount {
        qb.push(format!(", {}", i + 2));
    }
    let mut tx = api.pool.begin().await?;
    // Hash aggregation in memory for many buckets; no JIT start-up cost.
    sqlx::query("set local work_mem = '256MB'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("set local jit = off").execute(&mut *tx).await?;
    sqlx::query("set local enable_sort = off")
        .execute(&mut *tx)
        .await?;
    let rows = qb.build().fetch_all(&mut *tx).await?;
    tx.commit().await?;

    let g = gcount;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let unit: String = r.try_get(0)?;
        let groups = if g == 0 {
            None
        } else {
            let mut gmap = BTreeMap::new();
            for (i, (name, _)) in groupby.iter().enumerate() {
                gmap.insert(*name, r.try_get::<Option<String>, _>(1 + i)?);
            }
            Some(gmap)
        };
        let k: i64 = r.try_get(1 + g)?;
        let count: i64 = r.try_get(2 + g)?;
        let min: f64 = r.try_get(3 + g)?;
        let max: f64 = r.try_get(4 + g)?;
        let sum: f64 = r.try_get(5 + g)?;
        let avg: f64 = r.try_get(6 + g)?;
        let stddev: Option<f64> = r.try_get(7 + g)?;
        let d0: DateTime<Utc> = r.try_get(8 + g)?;
        let d1: DateTime<Utc> = r.try_get(9 + g)?;
        let card: [i64; 3] = [r.try_get(10 + g)?, r.try_get(11 + g)?, r.try_get(12 + g)?];
        let (p_start, p_end, period_s) = match buckets {
            Some((p, t0, _)) => {
                let us = (p * 1e6) as i64;
                let ps = t0 + chrono::Duration::microseconds(us * k);
                (ps, ps + chrono::Duration::microseconds(us), p)
            }
            None => (d0, d1, 0.0),
        };
        // Clamp the duration to the query's bounds (as Ceilometer's API).
        let d0c = c.start().map_or(d0, |s| d0.max(s));
        let d1c = c.end().map_or(d1, |e| d1.min(e));
        let (duration, ds, de) = if d0c > d1c {
            (None, None, None)
        } else {
            (
                Some((d1c - d0c).num_microseconds().unwrap_or(0) as f64 / 1e6),
                Some(iso(d0c)),
                Some(iso(d1c)),
            )
        };
        let std_value = |name: &str| -> f64 {
            match name {
                "max" => max,
                "min" => min,
                "sum" => sum,
                "avg" => avg,
                "count" => count as f64,
                _ => stddev.unwrap_or(0.0),
            }
        };
        let mut row = StatOut {
            duration,
            duration_start: ds,
            duration_end: de,
            period: period_s,
            period_start: iso(p_start),
            period_end: iso(p_end),
            unit,
            groupby: groups,
            max: None,
            min: None,
            sum: None,
            avg: None,
            count: None,
            aggregate: None,
        };
        if aggs.is_empty() {
            (row.max, row.min, row.sum, row.avg, row.count) =
                (Some(max), Some(min), Some(sum), Some(avg), Some(count));
        } else {
            let mut amap = BTreeMap::new();
            for a in &aggs {
                match a {
                    Agg::Std(name) => {
                        let v = std_value(name);
                        match *name {
                            "max" => row.max = Some(v),
                            "min" => row.min = Some(v),
                            "sum" => row.sum = Some(v),
                            "avg" => row.avg = Some(v),
                            "count" => row.count = Some(count),
                            // stddev is not one of the standard fields: aggregate map only.
                            _ => {}
                        }
                        amap.insert(
                            name.to_string(),
                            json!(if *name == "count" {
                                json!(count)
                            } else {
                                json!(v)
                            }),
                        );
                    }
                    Agg::Cardinality(p) => {
                        let v = match *p {
                            "resource_id" => card[0],
                            "user_id" => card[1],
                            _ => card[2],
                        };
                        amap.insert(format!("cardinality/{p}"), json!(v));
                    }
                }
            }
            row.aggregate = Some(amap);
        }
        out.push(row);
    }
    json_response(&out)
}

/// One statistics row (Ceilometer's Statistics); absent aggregates are left out.
#[derive(serde::Serialize)]
struct StatOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    avg: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<i64>,
    duration: Option<f64>,
    duration_start: Option<String>,
    duration_end: Option<String>,
    period: f64,
    period_start: String,
    period_end: String,
    unit: String,
    groupby: Option<BTreeMap<&'static str, Option<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aggregate: Option<BTreeMap<String, Value>>,
}

/// `POST /v2/meters/{meter}`: a list of OldSample. `direct=true` stores them at once;
/// otherwise they are published to the raw queue so the pipeline sees them. Answers 201
/// with the samples as accepted (ids filled).
async fn post_samples(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(meter): Path<String>,
    RawQuery(raw): RawQuery,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Vec<Value>>), ApiError> {
    let who = caller(&api, &headers)?;
    let q = parse_query(raw.as_deref())?;
    q.only(&["direct"])?;
    let direct = matches!(q.param("direct"), Some("true" | "True" | "1"));
    let list: Vec<Value> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("body is not a JSON list of samples: {e}")))?;
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut samples = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        samples.push(
            posted_sample(&meter, v, &who, &header)
                .map_err(|m| ApiError::BadRequest(format!("sample {i}: {m}")))?,
        );
    }
    if direct {
        let mut store = crate::store::Store::new(api.pool.clone());
        store.write(&samples).await.map_err(|e| match e {
            crate::store::StoreError::Permanent(e) => {
                ApiError::BadRequest(format!("rejected by the database: {e}"))
            }
            crate::store::StoreError::Transient(e) => ApiError::Internal(e.to_string()),
        })?;
    } else {
        let Some(raw) = &api.raw else {
            return Err(ApiError::BadRequest(
                "this collector does not publish to the pipeline; use direct=true".into(),
            ));
        };
        raw.publish(samples.clone())
            .await
            .map_err(ApiError::Internal)?;
    }
    let out = samples
        .into_iter()
        .map(|s| {
            json!({
                "source": s.source,
                "counter_name": s.name,
                "counter_type": s.kind.as_str(),
                "counter_unit": s.unit,
                "counter_volume": s.volume,
                "user_id": s.user_id,
                "project_id": s.project_id,
                "resource_id": s.resource_id,
                "timestamp": iso(s.timestamp),
                "resource_metadata": flatten_metadata(&s.resource_metadata),
                "message_id": s.message_id.to_string(),
            })
        })
        .collect();
    Ok((StatusCode::CREATED, Json(out)))
}

/// One posted OldSample → a Sample, with Ceilometer's rules: `counter_name` must be the
/// path's meter, no `message_id`, user/project default from `X-User-Id`/`X-Project-Id`,
/// a project token may only post for its project, `source` becomes `<project>:<source>`,
/// flat dotted metadata keys are nested again.
fn posted_sample(
    meter: &str,
    v: &Value,
    who: &Caller,
    header: &dyn Fn(&str) -> Option<String>,
) -> Result<Sample, String> {
    let o = v.as_object().ok_or("not an object")?;
    let text = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
    let name = text("counter_name").ok_or("counter_name is required")?;
    if name != meter {
        return Err(format!(
            "counter_name {name} does not match the URL's meter {meter}"
        ));
    }
    if o.get("message_id").is_some_and(|m| !m.is_null()) {
        return Err("message_id must not be set".into());
    }
    let kind = text("counter_type")
        .and_then(|t| SampleType::parse(&t))
        .ok_or("counter_type must be gauge, delta or cumulative")?;
    let unit = text("counter_unit").ok_or("counter_unit is required")?;
    let volume = match o.get("counter_volume") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|v: &f64| v.is_finite())
    .ok_or("counter_volume must be a number")?;
    let resource_id = text("resource_id").ok_or("resource_id is required")?;
    let project_id = text("project_id").or_else(|| header("x-project-id"));
    let user_id = text("user_id").or_else(|| header("x-user-id"));
    if let Caller::Project(p) = who
        && project_id.as_deref().is_some_and(|x| x != p)
    {
        return Err(format!(
            "not authorized to post samples for project {}",
            project_id.unwrap_or_default()
        ));
    }
    let project_id = match who {
        Caller::Project(p) => Some(project_id.unwrap_or_else(|| p.clone())),
        Caller::Admin => project_id,
    };
    let timestamp = match text("timestamp") {
        Some(t) => vmeter_core::sample::parse_timestamp(&t)
            .ok_or(format!("timestamp {t:?} is not ISO-8601"))?,
        None => Utc::now(),
    };
    let source = format!(
        "{}:{}",
        project_id.clone().unwrap_or_default(),
        text("source").unwrap_or_else(|| vmeter_core::sample::DEFAULT_SOURCE.to_string())
    );
    let mut md = Map::new();
    if let Some(m) = o.get("resource_metadata").and_then(Value::as_object) {
        for (k, v) in m {
            let mut cur = &mut md;
            let parts: Vec<&str> = k.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                let e = cur
                    .entry(p.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !e.is_object() {
                    *e = Value::Object(Map::new());
                }
                cur = e.as_object_mut().expect("object");
            }
            cur.insert(parts[parts.len() - 1].to_string(), v.clone());
        }
    }
    Ok(Sample {
        name,
        kind,
        unit,
        volume,
        user_id,
        project_id,
        resource_id,
        timestamp,
        resource_metadata: Arc::new(md),
        source,
        message_id: uuid::Uuid::new_v4(),
        monotonic_time: None,
    })
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
                op: "eq".into(),
                value: "abc-1".into()
            }
        );
        // A q.op belongs to the q.field before it; without one the op is eq.
        assert_eq!(q.filters[1].op, "ge");
        assert!(parse_query(Some("q.op=eq&q.field=x&q.value=1")).is_err());
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
