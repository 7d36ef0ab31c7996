//! The query grammar: `q.field`/`q.op`/`q.value` terms, their pairing, and the conditions they make.

use chrono::{DateTime, Utc};

use super::Api;
use super::auth::Caller;
use super::error::ApiError;
use super::ids::parse_sample_id;

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
    pub(super) fn param(&self, k: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    pub(super) fn params(&self, k: &str) -> impl Iterator<Item = &str> {
        self.params
            .iter()
            .filter(move |(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    pub(super) fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
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
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let (k, v) = (k.into_owned(), v.into_owned());
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

pub(super) fn parse_ts(v: &str) -> Result<DateTime<Utc>, ApiError> {
    vmeter_core::sample::parse_timestamp(v)
        .ok_or_else(|| ApiError::BadRequest(format!("timestamp {v:?} is not ISO-8601")))
}

/// Filters applicable to samples (`s`), meters (`m`) and resources (`r`).
#[derive(Debug, Default)]
pub(super) struct Cond {
    pub(super) meter: Option<String>,
    pub(super) resource: Option<String>,
    pub(super) project: Option<String>,
    pub(super) user: Option<String>,
    pub(super) source: Option<String>,
    pub(super) sample: Option<(i32, i32, DateTime<Utc>)>,
    pub(super) ge: Option<DateTime<Utc>>,
    pub(super) gt: Option<DateTime<Utc>>,
    pub(super) le: Option<DateTime<Utc>>,
    pub(super) lt: Option<DateTime<Utc>>,
    /// `metadata.a.b` = value, compared as text (`True`/`False` as JSON booleans).
    pub(super) metadata: Vec<(Vec<String>, String)>,
}

impl Cond {
    /// Start and end of the time range, as Ceilometer's (start ge/gt, end le/lt).
    pub(super) fn start(&self) -> Option<DateTime<Utc>> {
        self.ge.or(self.gt)
    }
    pub(super) fn end(&self) -> Option<DateTime<Utc>> {
        self.lt.or(self.le)
    }
}

/// What a handler accepts in `q.field`.
#[derive(Clone, Copy)]
pub(super) struct Fields {
    pub(super) timestamp: bool,
    pub(super) meter: bool,
    pub(super) message_id: bool,
}

/// What every query endpoint does first (the caller is already authenticated): parse the
/// query string, check its extra parameters against `params`, turn the filters into
/// conditions scoped to `who`.
pub(super) fn request(
    who: &Caller,
    raw: Option<&str>,
    params: &[&str],
    fields: Fields,
) -> Result<(Query, Cond), ApiError> {
    let q = parse_query(raw)?;
    q.only(params)?;
    let c = conditions(&q, fields, who)?;
    Ok((q, c))
}

pub(super) fn conditions(q: &Query, allowed: Fields, who: &Caller) -> Result<Cond, ApiError> {
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

pub(super) fn limit(api: &Api, q: &Query) -> Result<i64, ApiError> {
    limit_of(api, q.limit)
}

/// A request's `limit` (absent: `http.default_limit`), at most `http.max_limit`.
pub(super) fn limit_of(api: &Api, asked: Option<i64>) -> Result<i64, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn percent_decoding_is_form_urlencoded() {
        let q = parse_query(Some("q.field=resource_id&q.value=a%41%20b+c%+5%4")).unwrap();
        // `%+5` is no escape (the old decoder read it as 0x05): `%` stays, `+` is a space.
        assert_eq!(q.filters[0].value, "aA b c% 5%4", "{q:?}");
        let q = parse_query(Some("q.field=resource_id&q.value=%E2%9C%93")).unwrap();
        assert_eq!(q.filters[0].value, "✓");
    }
}
