//! The Ceilometer-v2-style HTTP API.
//!
//! Routes: `GET /v2/meters`, `GET|POST /v2/meters/{meter}`, `GET /v2/meters/{meter}/statistics`,
//! `GET /v2/samples`, `GET /v2/samples/{id}`, `GET /v2/resources`, `GET /v2/resources/{id}`,
//! `GET /v2/capabilities`. Shapes, filters and statistics semantics follow Ceilometer 9's v2
//! API (reference §g.3); where vmeter differs it says so in docs/api.md.
//!
//! Errors are JSON `{"error_message": {"faultstring": "…"}}` (Ceilometer's shape) with 400,
//! 401 or 404; internal errors are logged and answered with a generic 500 message, never a
//! trace. All SQL uses bound parameters; meter and resource filters are resolved to integer
//! ids with small lookups first, then samples and statistics are read from the narrow sample
//! table in one statement.

use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{
    Json, Router,
    routing::{any, get},
};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use vmeter_core::{Sample, SampleType};

use crate::jsonw::{self, JsonBuf};

mod complex;
mod meta;
mod stats;

/// Bearer tokens: none configured means the API is open (logged at start).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Tokens that see everything.
    pub admin: Vec<String>,
    /// Token → the one project it sees.
    pub projects: BTreeMap<String, String>,
    /// Tokens that are neither are validated against Keystone, if configured.
    pub keystone: Option<Arc<crate::keystone::Keystone>>,
}

impl Auth {
    /// Whether callers must authenticate (else every caller is admin).
    pub fn enabled(&self) -> bool {
        !self.admin.is_empty() || !self.projects.is_empty() || self.keystone.is_some()
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
    /// Largest `limit` a request may ask for (larger: 400).
    pub max_limit: i64,
    /// The sample contract every posted sample must keep (else 400).
    pub contract: vmeter_core::contract::Contract,
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
        .route("/v2/meters/{meter}/statistics", get(stats::statistics))
        .route("/v2/samples", get(list_samples))
        .route("/v2/samples/{id}", get(one_sample))
        .route("/v2/resources", get(list_resources))
        .route("/v2/resources/{id}", get(one_resource))
        .route("/v2/capabilities", get(capabilities))
        .route(
            "/v2/query/samples",
            axum::routing::post(complex::query_samples),
        )
        .route("/", get(meta::versions))
        .route("/v2", get(meta::version_v2))
        .route("/v2/", get(meta::version_v2))
        .route("/v2/alarms", any(meta::gone_alarms))
        .route("/v2/alarms/{*rest}", any(meta::gone_alarms))
        .route("/v2/events", any(meta::gone_events))
        .route("/v2/events/{*rest}", any(meta::gone_events))
        .route("/v2/event_types", any(meta::gone_events))
        .route("/v2/event_types/{*rest}", any(meta::gone_events))
        .fallback(meta::not_found)
        .method_not_allowed_fallback(meta::method_not_allowed)
        .with_state(api)
}

/// An API error; its message is safe to show to clients.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(String),
    /// Authenticated, but the data belongs to another project.
    Forbidden(String),
    NotFound(String),
    MethodNotAllowed(String),
    /// What Ceilometer moved to another service (alarms, events).
    Gone(String),
    /// A service the answer depends on (Keystone) cannot be asked.
    Unavailable(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::MethodNotAllowed(m) => (StatusCode::METHOD_NOT_ALLOWED, m),
            ApiError::Gone(m) => (StatusCode::GONE, m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
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
///
/// Two orders are in use and both are read. Ceilometer pairs the i-th `q.field` with the
/// i-th `q.op` and `q.value`, and its own client sends all fields, then all ops, then all
/// values; hand-written queries interleave each field with its op and value, and may leave
/// an op out. When every field has an op and a value (or no op is given at all), the
/// terms are paired by position, which reads both orders alike; otherwise each `q.op` and
/// `q.value` belongs to the `q.field` before it.
pub fn parse_query(raw: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query::default();
    let (mut fields, mut ops, mut values) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved reading: a q.op or q.value belongs to the q.field before it.
    let mut triplets: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    let mut orphan = false;
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k), percent_decode(v));
        match k.as_str() {
            "q.field" => {
                fields.push(v.clone());
                triplets.push((v, None, None));
            }
            "q.op" => {
                ops.push(v.clone());
                match triplets.last_mut() {
                    Some(t) => t.1 = Some(v),
                    None => orphan = true,
                }
            }
            "q.value" => {
                values.push(v.clone());
                match triplets.last_mut() {
                    Some(t) => t.2 = Some(v),
                    None => orphan = true,
                }
            }
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
    let positional = values.len() == fields.len() && (ops.len() == fields.len() || ops.is_empty());
    if positional {
        let mut ops = ops.into_iter();
        for (field, value) in fields.into_iter().zip(values) {
            let op = ops.next().unwrap_or_else(|| "eq".into());
            q.filters.push(Filter { field, op, value });
        }
        return Ok(q);
    }
    if orphan {
        return Err(ApiError::BadRequest(
            "q.op and q.value must follow their q.field".into(),
        ));
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

/// Appends the API id of a stored sample to `out`: its natural key (meter, resource, µs
/// timestamp) in hex, `<meter>-<resource>-<µs>`. Storage keeps no per-sample uuid
/// (docs/storage.md); this id finds the row through the primary key.
fn write_sample_id(out: &mut Vec<u8>, meter_id: i32, resource: i32, ts: DateTime<Utc>) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{meter_id:x}-{resource:x}-{:x}", ts.timestamp_micros());
}

/// The id a `POST` answers for a sample it accepted, as its `message_id`:
/// `s-<hex of the meter name>-<hex of the resource id>-<µs in hex>`. It names the sample
/// by its natural key without the storage's integer ids (which a sample posted through the
/// pipeline does not have yet), so `GET /v2/samples/{id}` finds it once it is stored —
/// what Ceilometer's `sample-create` then `sample-show` do.
pub fn named_sample_id(meter: &str, resource_id: &str, ts: DateTime<Utc>) -> String {
    format!(
        "s-{}-{}-{:x}",
        hex::encode(meter),
        hex::encode(resource_id),
        ts.timestamp_micros()
    )
}

/// Inverse of [`named_sample_id`]; `None` for anything else.
pub fn parse_named_sample_id(id: &str) -> Option<(String, String, DateTime<Utc>)> {
    let mut it = id.strip_prefix("s-")?.split('-');
    let text = |h: &str| String::from_utf8(hex::decode(h).ok()?).ok();
    let meter = text(it.next()?)?;
    let resource = text(it.next()?)?;
    let us = i64::from_str_radix(it.next()?, 16).ok()?;
    if it.next().is_some() || meter.is_empty() || resource.is_empty() {
        return None;
    }
    Some((meter, resource, DateTime::from_timestamp_micros(us)?))
}

/// Inverse of [`write_sample_id`]; `None` for anything else.
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

/// Resolves the caller from `Authorization: Bearer T` or `X-Auth-Token: T`: the static
/// tokens first, then Keystone (if configured).
async fn caller(api: &Api, headers: &HeaderMap) -> Result<Caller, ApiError> {
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
    // Every configured token is compared, each through its SHA-256 digest in constant
    // time: neither the length of a token nor which one matched shows in the timing.
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let given = Sha256::digest(token.as_bytes());
    let matches = |t: &str| Sha256::digest(t.as_bytes()).ct_eq(&given);
    let mut admin = subtle::Choice::from(0);
    for t in &api.auth.admin {
        admin |= matches(t);
    }
    let mut project: Option<&String> = None;
    for (t, p) in &api.auth.projects {
        let hit = matches(t);
        // All tokens are compared whichever matched.
        project = if bool::from(hit) { Some(p) } else { project };
    }
    if bool::from(admin) && !token.is_empty() {
        return Ok(Caller::Admin);
    }
    match project {
        Some(p) if !token.is_empty() => return Ok(Caller::Project(p.clone())),
        _ => {}
    }
    let Some(keystone) = api.auth.keystone.as_ref().filter(|_| !token.is_empty()) else {
        return Err(ApiError::Unauthorized("invalid token".into()));
    };
    match keystone.validate(token).await {
        Ok(Some(id)) if id.admin => Ok(Caller::Admin),
        Ok(Some(crate::keystone::Identity {
            project: Some(p), ..
        })) => Ok(Caller::Project(p)),
        Ok(Some(_)) => Err(ApiError::Unauthorized(
            "the token is not scoped to a project".into(),
        )),
        Ok(None) => Err(ApiError::Unauthorized("invalid token".into())),
        Err(e) => {
            tracing::warn!(error = %e, "Could not validate a token with Keystone.");
            Err(ApiError::Unavailable(format!(
                "the token could not be validated: {e}"
            )))
        }
    }
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
async fn request(
    api: &Api,
    headers: &HeaderMap,
    raw: Option<&str>,
    params: &[&str],
    fields: Fields,
) -> Result<(Query, Cond), ApiError> {
    let who = caller(api, headers).await?;
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

fn limit(api: &Api, q: &Query) -> Result<i64, ApiError> {
    limit_of(api, q.limit)
}

/// A request's `limit` (absent: `http.default_limit`), at most `http.max_limit`.
fn limit_of(api: &Api, asked: Option<i64>) -> Result<i64, ApiError> {
    match asked {
        Some(n) if n <= 0 => Err(ApiError::BadRequest("Limit must be positive".into())),
        Some(n) if n > api.max_limit => Err(ApiError::BadRequest(format!(
            "limit {n} is larger than this API answers at once ({}); page with timestamp filters",
            api.max_limit
        ))),
        Some(n) => Ok(n),
        None => Ok(api.default_limit.min(api.max_limit)),
    }
}

/// Ceilometer's timestamp format (naive UTC, microseconds), as [`JsonBuf::ts_bare`] writes it.
fn iso(ts: DateTime<Utc>) -> String {
    let mut j = JsonBuf::with_capacity(26);
    j.ts_bare(ts);
    String::from_utf8(j.buf).expect("ASCII digits and separators")
}

fn flat(md: Value) -> Map<String, Value> {
    match md {
        Value::Object(m) => flatten_metadata(&m),
        _ => Map::new(),
    }
}

/// A meter's columns.
struct MeterInfo {
    name: String,
    kind: String,
    unit: String,
}

/// One sample row: the narrow table's columns only; names come from [`MeterInfo`] and
/// [`ResInfo`], fetched once per meter and per resource.
struct SampleRow {
    ts: DateTime<Utc>,
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

/// Samples plus the meters and resources they refer to.
#[derive(Default)]
struct Fetched {
    rows: Vec<SampleRow>,
    meters: HashMap<i32, MeterInfo>,
    res: HashMap<i32, ResInfo>,
}

impl Fetched {
    /// Rows with their meter and resource; a row whose resource was pruned between the
    /// queries (retention running concurrently) is left out rather than failing the request.
    fn joined(&self) -> impl Iterator<Item = (&SampleRow, &MeterInfo, &ResInfo)> {
        self.rows
            .iter()
            .filter_map(|s| Some((s, self.meters.get(&s.meter_id)?, self.res.get(&s.rint)?)))
    }

    /// The first row alone in the v2 Sample shape (`GET /v2/samples/{id}`), if any.
    fn first_new_json(&self) -> Option<Vec<u8>> {
        let row = self.joined().next()?;
        let mut j = JsonBuf::with_capacity(1024);
        write_row(&mut j, NEW_SAMPLE, &row);
        Some(j.buf)
    }

    /// The rows as a JSON array in `shape`, written on a blocking thread in chunks that
    /// are sent as they are written: sending 10,000 samples (~7 MB) overlaps writing them
    /// instead of following it.
    async fn stream(self, shape: &'static [(&'static str, Field)]) -> Result<Response, ApiError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
        tokio::task::spawn_blocking(move || {
            let mut a = jsonw::ArrayChunks::new(CHUNK);
            for row in self.joined() {
                if let Some(c) = a.item(|j| write_row(j, shape, &row))
                    && tx.blocking_send(Ok((c, false))).is_err()
                {
                    return; // the client left
                }
            }
            let _ = tx.blocking_send(Ok((a.finish(), true)));
        });
        chunked(rx).await
    }
}

/// A piece of a streamed answer: bytes and whether they are the last, or why it stopped.
type Chunk = Result<(Vec<u8>, bool), ApiError>;

/// The answer made of the chunks `rx` brings. An error (or the writer stopping) before the
/// first chunk is answered with its status; after it, the body is aborted, so the client
/// sees a cut answer, never a short valid one.
async fn chunked(mut rx: tokio::sync::mpsc::Receiver<Chunk>) -> Result<Response, ApiError> {
    let stopped = || ApiError::Internal("the answer's writer stopped".into());
    let (first, last) = rx.recv().await.ok_or_else(stopped)??;
    let rest = futures::stream::unfold((rx, last), |(mut rx, done)| async move {
        if done {
            return None;
        }
        let next = match rx.recv().await {
            Some(Ok((chunk, last))) => return Some((Ok(chunk), (rx, last))),
            Some(Err(e)) => format!("{e:?}"),
            None => "the answer's writer stopped".to_string(),
        };
        tracing::error!(error = %next, "Answer cut short.");
        Some((Err(std::io::Error::other(next)), (rx, true)))
    });
    let body = futures::stream::once(async move { Ok(first) }).chain(rest);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// One sample as a JSON object with the keys of `shape`, in its order.
fn write_row(
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
enum Field {
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
const OLD_SAMPLE: &[(&str, Field)] = &[
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
const NEW_SAMPLE: &[(&str, Field)] = &[
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

/// A JSON response from bytes already written.
fn json_bytes(body: Vec<u8>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The resource-level part of `c` (resource, project, user, source, metadata), if any.
fn resource_level(c: &Cond) -> Option<Cond> {
    let r = Cond {
        resource: c.resource.clone(),
        project: c.project.clone(),
        user: c.user.clone(),
        source: c.source.clone(),
        metadata: c.metadata.clone(),
        ..Cond::default()
    };
    (r.resource.is_some()
        || r.project.is_some()
        || r.user.is_some()
        || r.source.is_some()
        || !r.metadata.is_empty())
    .then_some(r)
}

/// The sample-level part of `c`: time bounds and a sample key.
fn sample_level(c: &Cond) -> Cond {
    Cond {
        ge: c.ge,
        gt: c.gt,
        le: c.le,
        lt: c.lt,
        sample: c.sample,
        ..Cond::default()
    }
}

/// Meters named `name` (all meters without a name), by id.
async fn meters_named(api: &Api, name: Option<&str>) -> Result<HashMap<i32, MeterInfo>, ApiError> {
    let rows =
        sqlx::query("select id, name, type, unit from meter where $1::text is null or name = $1")
            .bind(name)
            .fetch_all(&api.pool)
            .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in &rows {
        out.insert(
            r.try_get::<i32, _>(0)?,
            MeterInfo {
                name: r.try_get(1)?,
                kind: r.try_get(2)?,
                unit: r.try_get(3)?,
            },
        );
    }
    Ok(out)
}

/// Ids of the resources that match the resource-level conditions of `c`; `None` when
/// `c` has none (every resource).
async fn resource_ids(api: &Api, c: &Cond) -> Result<Option<Vec<i32>>, ApiError> {
    let Some(rc) = resource_level(c) else {
        return Ok(None);
    };
    let mut qb = QueryBuilder::new("select r.id from resource r where true");
    push_cond(&mut qb, &rc, false);
    let ids: Vec<i32> = qb.build_query_scalar().fetch_all(&api.pool).await?;
    Ok(Some(ids))
}

/// `and <col> = $n` for one id, `and <col> = any($n)` for several.
fn push_ids(qb: &mut QueryBuilder<Postgres>, col: &str, ids: &[i32]) {
    if let [one] = ids {
        qb.push(format!(" and {col} = "));
        qb.push_bind(*one);
    } else {
        qb.push(format!(" and {col} = any("));
        qb.push_bind(ids.to_vec());
        qb.push(")");
    }
}

/// The sample query of `c`: the narrow table alone, meters and resources as integer ids,
/// newest first.
fn sample_query(
    c: &Cond,
    meters: &HashMap<i32, MeterInfo>,
    res_ids: Option<&[i32]>,
    limit: i64,
) -> QueryBuilder<Postgres> {
    let mut qb = QueryBuilder::new(
        "select s.ts, s.volume, s.meter_id, s.resource_id from sample s where true",
    );
    if c.meter.is_some() {
        let mut ids: Vec<i32> = meters.keys().copied().collect();
        ids.sort_unstable();
        push_ids(&mut qb, "s.meter_id", &ids);
    }
    if let Some(ids) = res_ids {
        push_ids(&mut qb, "s.resource_id", ids);
    }
    push_cond(&mut qb, &sample_level(c), true);
    qb.push(" order by s.ts desc limit ");
    qb.push_bind(limit);
    qb
}

fn sample_row(r: &sqlx::postgres::PgRow) -> Result<SampleRow, sqlx::Error> {
    Ok(SampleRow {
        ts: r.try_get(0)?,
        volume: r.try_get(1)?,
        meter_id: r.try_get(2)?,
        rint: r.try_get(3)?,
    })
}

/// Samples matching `c`, newest first. Meter and resource conditions are resolved to
/// integer ids first, so the sample query reads the narrow table alone: for one meter of
/// one resource that is an index-only scan of the primary key, already in time order.
async fn fetch_samples(api: &Api, c: &Cond, limit: i64) -> Result<Fetched, ApiError> {
    match lookups(api, c).await? {
        Some((meters, res_ids)) => read_samples(api, c, limit, meters, res_ids.as_deref()).await,
        None => Ok(Fetched::default()),
    }
}

/// The meters and (when `c` filters on them) the resources `c` names, as integer ids;
/// `None` when nothing can match. The two lookups run concurrently.
async fn lookups(
    api: &Api,
    c: &Cond,
) -> Result<Option<(HashMap<i32, MeterInfo>, Option<Vec<i32>>)>, ApiError> {
    let (meters, res_ids) =
        tokio::try_join!(meters_named(api, c.meter.as_deref()), resource_ids(api, c))?;
    let none = meters.is_empty() || res_ids.as_ref().is_some_and(Vec::is_empty);
    Ok((!none).then_some((meters, res_ids)))
}

/// The samples of `c` read whole, then the resources they name.
async fn read_samples(
    api: &Api,
    c: &Cond,
    limit: i64,
    meters: HashMap<i32, MeterInfo>,
    res_ids: Option<&[i32]>,
) -> Result<Fetched, ApiError> {
    let rows = sample_query(c, &meters, res_ids, limit)
        .build()
        .fetch_all(&api.pool)
        .await?;
    let rows: Vec<SampleRow> = rows
        .iter()
        .map(sample_row)
        .collect::<Result<_, sqlx::Error>>()?;
    let mut ids: Vec<i32> = rows.iter().map(|r| r.rint).collect();
    ids.sort_unstable();
    ids.dedup();
    let res = resources_by_id(api, &ids).await?;
    Ok(Fetched { rows, meters, res })
}

/// Bytes of JSON per chunk of a streamed answer.
const CHUNK: usize = 256 * 1024;

/// A list of samples matching `c` in `shape`, streamed. When the query names few
/// resources (a resource id, a project's handful), their rows are read first and each
/// sample is written as PostgreSQL sends it, each 256 KiB chunk sent as it fills: reading,
/// writing and sending overlap. Otherwise the rows are read whole first (the resources
/// to join are those the rows name), then written and sent in chunks.
///
/// Errors before the first chunk are answered with their status; a database error
/// after it (rare: the statement is already running) aborts the body, so the client
/// sees a cut answer, never a short valid one.
async fn sample_list(
    api: &Api,
    c: Cond,
    limit: i64,
    shape: &'static [(&'static str, Field)],
) -> Result<Response, ApiError> {
    let Some((meters, res_ids)) = lookups(api, &c).await? else {
        return Ok(json_bytes(b"[]".to_vec()));
    };
    let ids = match res_ids {
        Some(ids) if ids.len() <= 64 => ids,
        other => {
            let f = read_samples(api, &c, limit, meters, other.as_deref()).await?;
            return f.stream(shape).await;
        }
    };
    let res = resources_by_id(api, &ids).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let pool = api.pool.clone();
    tokio::spawn(async move {
        let mut qb = sample_query(&c, &meters, Some(&ids), limit);
        let mut rows = qb.build().fetch(&pool);
        let mut a = jsonw::ArrayChunks::new(CHUNK);
        while let Some(row) = rows.next().await {
            let row = match row.and_then(|r| sample_row(&r)) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            // A resource pruned meanwhile (retention) is left out, as in `Fetched::joined`.
            let (Some(m), Some(r)) = (meters.get(&row.meter_id), res.get(&row.rint)) else {
                continue;
            };
            if let Some(chunk) = a.item(|j| write_row(j, shape, &(&row, m, r)))
                && tx.send(Ok((chunk, false))).await.is_err()
            {
                return; // the client left
            }
        }
        let _ = tx.send(Ok((a.finish(), true))).await;
    });
    chunked(rx).await
}

/// The resources with these ids, metadata flattened (Ceilometer's OldSample form) and
/// serialised once each.
async fn resources_by_id(api: &Api, ids: &[i32]) -> Result<HashMap<i32, ResInfo>, ApiError> {
    let res_rows = sqlx::query(
        "select id, resource_id, user_id, project_id, source, metadata from resource where id = any($1)",
    )
    .bind(ids)
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
    Ok(res)
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
    let (q, mut c) = request(&api, &headers, raw.as_deref(), &[], SAMPLES).await?;
    c.meter = Some(meter);
    let limit = limit(&api, &q)?;
    sample_list(&api, c, limit, OLD_SAMPLE).await
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
    let (q, c) = request(&api, &headers, raw.as_deref(), &[], fields).await?;
    let limit = limit(&api, &q)?;
    sample_list(&api, c, limit, NEW_SAMPLE).await
}

/// `GET /v2/samples/{id}`.
async fn one_sample(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound(format!("Sample {id} Not Found"));
    let (_, mut c) = request(&api, &headers, None, &[], SAMPLES).await?;
    match (parse_sample_id(&id), parse_named_sample_id(&id)) {
        (Some(key), _) => c.sample = Some(key),
        (None, Some((meter, resource, ts))) => {
            c.meter = Some(meter);
            c.resource = Some(resource);
            c.ge = Some(ts);
            c.le = Some(ts);
        }
        (None, None) => return Err(not_found()),
    }
    let f = fetch_samples(&api, &c, 1).await?;
    Ok(json_bytes(f.first_new_json().ok_or_else(not_found)?))
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

/// `GET /v2/meters`: one entry per (meter, resource, project, user, source)
/// (`unique=true`: one per meter).
async fn list_meters(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let fields = Fields {
        timestamp: false,
        meter: false,
        message_id: false,
    };
    let (q, c) = request(&api, &headers, raw.as_deref(), &["unique"], fields).await?;
    let unique = matches!(q.param("unique"), Some("true" | "True" | "1"));
    let mut qb = QueryBuilder::new(if unique {
        "select distinct m.name, m.type, m.unit, null::text, null::text, null::text, null::text
         from series se join meter m on m.id = se.meter_id join resource r on r.id = se.resource_id where true"
    } else {
        // One entry per (meter, resource, project, user, source): a resource whose samples
        // changed owner is listed once per owner, as Ceilometer's SQL driver did.
        "select distinct m.name, m.type, m.unit, r.resource_id, r.project_id, r.user_id, r.source
         from series se join meter m on m.id = se.meter_id join resource r on r.id = se.resource_id where true"
    });
    push_cond(&mut qb, &c, false);
    qb.push(if unique {
        " order by 1, 2, 3 limit "
    } else {
        " order by 1, 4, 5, 6, 7 limit "
    });
    qb.push_bind(limit(&api, &q)?);
    stream_list(api.pool.clone(), qb, |r| {
        let (name, kind, unit): (String, String, String) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        let rid: Option<String> = r.try_get(3)?;
        Ok(json!({
            "name": name,
            "type": kind,
            "unit": unit,
            "resource_id": rid,
            "project_id": r.try_get::<Option<String>, _>(4)?,
            "user_id": r.try_get::<Option<String>, _>(5)?,
            "source": r.try_get::<Option<String>, _>(6)?,
            "meter_id": rid.as_ref().map(|rid| base64(format!("{rid}+{name}").as_bytes())),
        }))
    })
    .await
}

/// `GET /v2/resources`.
async fn list_resources(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let fields = Fields {
        timestamp: true,
        meter: true,
        message_id: false,
    };
    let (q, c) = request(&api, &headers, raw.as_deref(), &["meter_links"], fields).await?;
    let links = !matches!(q.param("meter_links"), Some("0" | "false" | "False"));
    let qb = resources_query(&c, limit(&api, &q)?);
    stream_list(api.pool.clone(), qb, move |r| {
        Ok(resource_json(resource_row(r)?, &headers, links))
    })
    .await
}

/// `GET /v2/resources/{id}`.
async fn one_resource(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, mut c) = request(&api, &headers, None, &[], SAMPLES).await?;
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

/// Resources under `c`, each as its newest attribution among those `c` selects (a
/// resource's attribution is per sample: see migration 0004). Time filters select the
/// attributions whose first..last sample span overlaps the range (kept per attribution
/// instead of scanning samples); first and last seen are over the selected ones, and the
/// meters are those of the selected ones.
async fn fetch_resources(api: &Api, c: &Cond, limit: i64) -> Result<Vec<ResourceRow>, ApiError> {
    let rows = resources_query(c, limit)
        .build()
        .fetch_all(&api.pool)
        .await?;
    rows.iter()
        .map(resource_row)
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ApiError::from)
}

/// The resources `c` selects, in resource id order, at most `limit` (see
/// [`fetch_resources`]).
fn resources_query(c: &Cond, limit: i64) -> QueryBuilder<Postgres> {
    let mut qb = QueryBuilder::new(
        "select n.resource_id, n.user_id, n.project_id, n.source, n.metadata, g.first_seen, g.last_seen,
                coalesce((select array_agg(distinct m.name order by m.name) from series se join meter m on m.id = se.meter_id
                          where se.resource_id = any(g.ids)), '{}')
         from (select r.resource_id, min(r.first_seen) as first_seen, max(r.last_seen) as last_seen,
                      array_agg(r.id order by r.last_seen desc, r.id desc) as ids
               from resource r where true",
    );
    let c2 = Cond {
        resource: c.resource.clone(),
        project: c.project.clone(),
        user: c.user.clone(),
        source: c.source.clone(),
        metadata: c.metadata.clone(),
        ..Cond::default()
    };
    push_cond(&mut qb, &c2, false);
    if let Some(m) = &c.meter {
        qb.push(" and exists (select 1 from series se join meter m on m.id = se.meter_id where se.resource_id = r.id and m.name = ");
        qb.push_bind(m.clone());
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
    qb.push(" group by r.resource_id order by r.resource_id limit ");
    qb.push_bind(limit);
    qb.push(") g join resource n on n.id = g.ids[1] order by g.resource_id");
    qb
}

fn resource_row(r: &sqlx::postgres::PgRow) -> Result<ResourceRow, sqlx::Error> {
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
}

/// Bytes of JSON gathered before a chunk of a streamed list is sent.
const LIST_CHUNK: usize = 64 << 10;

/// Answers the rows of `qb` as a JSON array, each row made a value by `to_json`, written
/// and sent in chunks as PostgreSQL sends the rows: memory stays a chunk whatever `limit`
/// asked for. Errors before the first chunk keep their status; later ones cut the body.
async fn stream_list(
    pool: PgPool,
    mut qb: QueryBuilder<Postgres>,
    to_json: impl Fn(&sqlx::postgres::PgRow) -> Result<Value, sqlx::Error> + Send + 'static,
) -> Result<Response, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    tokio::spawn(async move {
        let mut rows = qb.build().fetch(&pool);
        let mut buf = Vec::with_capacity(LIST_CHUNK + 1024);
        buf.push(b'[');
        let mut first = true;
        loop {
            let value = match rows.next().await {
                None => break,
                Some(row) => row.and_then(|r| to_json(&r)),
            };
            let value = match value {
                Ok(v) => v,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            if !first {
                buf.push(b',');
            }
            first = false;
            // Writing a Value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut buf, &value);
            if buf.len() >= LIST_CHUNK
                && tx
                    .send(Ok((
                        std::mem::replace(&mut buf, Vec::with_capacity(LIST_CHUNK + 1024)),
                        false,
                    )))
                    .await
                    .is_err()
            {
                return;
            }
        }
        buf.push(b']');
        let _ = tx.send(Ok((buf, true))).await;
    });
    chunked(rx).await
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
    let who = caller(&api, &headers).await?;
    let q = parse_query(raw.as_deref())?;
    q.only(&["direct"])?;
    let direct = matches!(q.param("direct"), Some("true" | "True" | "1"));
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let samples = parse_post_body(&meter, &body, &who, &header, &api.contract, Utc::now())?;
    if let Caller::Project(p) = &who {
        owned_by(&api, p, &samples).await?;
    }
    if direct {
        let mut store = crate::store::Store::new(api.pool.clone());
        store.write(&samples).await.map_err(|e| {
            if e.is_data() {
                ApiError::BadRequest(e.to_string())
            } else {
                ApiError::Internal(e.to_string())
            }
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
                "message_id": named_sample_id(&s.name, &s.resource_id, s.timestamp),
            })
        })
        .collect();
    Ok((StatusCode::CREATED, Json(out)))
}

/// The samples of a `POST /v2/meters/{meter}` body (a JSON list of OldSample), each
/// checked against the sample contract at `now`; a 400 names the first bad sample and why.
/// Pure (no I/O): the fuzz tests drive it with hostile bodies.
pub fn parse_post_body(
    meter: &str,
    body: &[u8],
    who: &Caller,
    header: &dyn Fn(&str) -> Option<String>,
    contract: &vmeter_core::contract::Contract,
    now: DateTime<Utc>,
) -> Result<Vec<Sample>, ApiError> {
    let list: Vec<Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("body is not a JSON list of samples: {e}")))?;
    let mut samples = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let s = posted_sample(meter, v, who, header, contract)
            .map_err(|m| ApiError::BadRequest(format!("sample {i}: {m}")))?;
        contract
            .check(&s, now)
            .map_err(|v| ApiError::BadRequest(format!("sample {i}: {v}")))?;
        samples.push(s);
    }
    Ok(samples)
}

/// Refuses (403) samples for resources whose newest sample belongs to another project than
/// `project`. Each sample keeps its own attribution, so such a post could not change what
/// the other project sees; it is refused all the same, as a post into another project's
/// resource is an error or an attack. A resource moved to `project` (its newest samples
/// are `project`'s) takes posts again.
async fn owned_by(api: &Api, project: &str, samples: &[Sample]) -> Result<(), ApiError> {
    let mut rids: Vec<&str> = samples.iter().map(|s| s.resource_id.as_str()).collect();
    rids.sort_unstable();
    rids.dedup();
    let other: Option<String> = sqlx::query_scalar(
        "select resource_id from (
           select distinct on (resource_id) resource_id, project_id from resource
           where resource_id = any($1::text[]) order by resource_id, last_seen desc, id desc) n
         where project_id is distinct from $2 limit 1",
    )
    .bind(&rids)
    .bind(project)
    .fetch_optional(&api.pool)
    .await?;
    match other {
        Some(r) => Err(ApiError::Forbidden(format!(
            "resource {r} belongs to another project"
        ))),
        None => Ok(()),
    }
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
    contract: &vmeter_core::contract::Contract,
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
            // Each dot is a level of nesting: refuse before building what the contract
            // would refuse anyway (10,000 dots would be 10,000 nested maps).
            if k.split('.').count() > contract.max_metadata_depth {
                return Err(format!(
                    "resource_metadata key has more than {} dotted parts",
                    contract.max_metadata_depth
                ));
            }
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
    fn named_sample_ids_round_trip() {
        let ts = DateTime::from_timestamp_micros(1_772_360_880_123_456).unwrap();
        let id = named_sample_id("disk.device.read.bytes", "9b3e-vda", ts);
        assert!(
            !id.contains(['/', '?', '#', '%']),
            "an id fits in a URL path: {id}"
        );
        assert_eq!(
            parse_named_sample_id(&id),
            Some(("disk.device.read.bytes".into(), "9b3e-vda".into(), ts))
        );
        for bad in [
            "s-",
            "s-zz-61-1",
            "s-61-62",
            "s-61-62-1-2",
            "s--62-1",
            "1-2-3",
        ] {
            assert_eq!(parse_named_sample_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn sample_ids_round_trip() {
        let ts = DateTime::from_timestamp_micros(1_772_360_880_123_456).unwrap();
        let mut id = Vec::new();
        write_sample_id(&mut id, 3, 0x1f, ts);
        let id = String::from_utf8(id).unwrap();
        assert_eq!(id, "3-1f-64bf3ecac6e40");
        assert_eq!(parse_sample_id(&id), Some((3, 0x1f, ts)));
        assert_eq!(parse_sample_id("3-1f"), None);
        assert_eq!(parse_sample_id("3-1f-zz"), None);
    }

    #[test]
    fn query_terms_pair_by_position_or_by_order() {
        let f = |raw: &str| {
            parse_query(Some(raw))
                .unwrap()
                .filters
                .into_iter()
                .map(|f| (f.field, f.op, f.value))
                .collect::<Vec<_>>()
        };
        let t = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        let want = vec![
            t("resource_id", "eq", "vm-1"),
            t("timestamp", "ge", "2026-01-01T00:00:00"),
        ];
        // python-ceilometerclient 2.9.0: all fields, then all ops, then all values.
        assert_eq!(
            f(
                "q.field=resource_id&q.field=timestamp&q.op=eq&q.op=ge&q.type=&q.type=&q.value=vm-1&q.value=2026-01-01T00%3A00%3A00"
            ),
            want
        );
        // Interleaved, every op given.
        assert_eq!(
            f(
                "q.field=resource_id&q.op=eq&q.value=vm-1&q.field=timestamp&q.op=ge&q.value=2026-01-01T00%3A00%3A00"
            ),
            want
        );
        // Interleaved with an op left out: each op belongs to the field before it.
        assert_eq!(
            f(
                "q.field=resource_id&q.value=vm-1&q.field=timestamp&q.op=ge&q.value=2026-01-01T00%3A00%3A00"
            ),
            want
        );
        // Grouped without any op: all eq.
        assert_eq!(
            f("q.field=a&q.field=b&q.value=1&q.value=2"),
            vec![t("a", "eq", "1"), t("b", "eq", "2")]
        );
        assert!(parse_query(Some("q.op=eq&q.field=a&q.field=b&q.value=1")).is_err());
        assert!(parse_query(Some("q.field=a&q.field=b&q.value=1")).is_err());
    }

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
        // Paired by position, as Ceilometer does, whatever the order of the keys.
        assert_eq!(
            parse_query(Some("q.op=gt&q.field=x&q.value=1"))
                .unwrap()
                .filters[0]
                .op,
            "gt"
        );
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
