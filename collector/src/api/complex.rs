//! `POST /v2/query/samples`: Ceilometer's complex query over samples.
//!
//! The body is `{"filter": "<JSON>", "orderby": "<JSON>", "limit": n}`, the filter and the
//! order being JSON documents in strings, as Ceilometer's API and client send them:
//!
//! - a comparison `{"<op>": {"<field>": <value>}}` with `op` one of `= != < <= > >=`
//!   (and their names `eq ne lt le gt ge`, and `=<`/`=>`), or `{"in": {"<field>": [..]}}`;
//! - `{"and": [e, e, ..]}`, `{"or": [e, e, ..]}`, `{"not": e}`;
//! - fields: `counter_name` (or `meter`), `counter_type`, `counter_unit`, `counter_volume`,
//!   `resource_id`, `project_id`, `user_id`, `source`, `timestamp`, `recorded_at`, and
//!   `resource_metadata.<path>` (compared as text, as the v2 filters do);
//! - `orderby`: `[{"<field>": "asc"|"desc"}, ..]` over the same fields but metadata.
//!
//! Every value is a bound parameter; nesting is limited ([`MAX_DEPTH`]) so a hostile filter
//! is a 400, not a deep recursion. A project token only ever sees its project's samples.

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{Postgres, QueryBuilder, Row};

use super::Api;
use super::auth::Caller;
use super::error::ApiError;
use super::ids::write_sample_id;
use super::query::limit_of;
use super::shape::{flat, iso};
use super::stream::stream_list;

/// Deepest nesting of `and`/`or`/`not` a filter may have.
pub const MAX_DEPTH: usize = 32;

/// Most comparisons in one filter (and values in one `in`).
pub const MAX_TERMS: usize = 1000;

/// The body Ceilometer's client posts.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComplexQuery {
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub orderby: Option<String>,
    /// A number, or a string of digits (what python-ceilometerclient sends).
    #[serde(default)]
    pub limit: Option<Value>,
}

impl ComplexQuery {
    fn limit(&self) -> Result<Option<i64>, ApiError> {
        let n = match &self.limit {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        n.map(Some).ok_or_else(|| bad("limit is not an integer"))
    }
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::BadRequest(m.into())
}

/// What a field compares: the SQL expression and the type of its values.
enum Column {
    Text(&'static str),
    Volume,
    Time,
    /// A `resource_metadata` path.
    Metadata(Vec<String>),
}

fn column(field: &str) -> Result<Column, ApiError> {
    Ok(match field {
        "counter_name" | "meter" => Column::Text("m.name"),
        "counter_type" | "type" => Column::Text("m.type"),
        "counter_unit" | "unit" => Column::Text("m.unit"),
        "counter_volume" | "volume" => Column::Volume,
        "resource_id" => Column::Text("r.resource_id"),
        "project_id" => Column::Text("r.project_id"),
        "user_id" => Column::Text("r.user_id"),
        "source" => Column::Text("r.source"),
        "timestamp" | "recorded_at" => Column::Time,
        other => match other
            .strip_prefix("resource_metadata.")
            .or_else(|| other.strip_prefix("metadata."))
        {
            Some(p) if !p.is_empty() => {
                Column::Metadata(p.split(['.', ':']).map(str::to_string).collect())
            }
            _ => return Err(bad(format!("unknown field in query: {other}"))),
        },
    })
}

fn sql_op(op: &str) -> Option<&'static str> {
    Some(match op {
        "=" | "eq" => "=",
        "!=" | "ne" => "<>",
        "<" | "lt" => "<",
        "<=" | "=<" | "le" => "<=",
        ">" | "gt" => ">",
        ">=" | "=>" | "ge" => ">=",
        _ => return None,
    })
}

/// Appends one value of `col` as a bound parameter.
fn push_value(qb: &mut QueryBuilder<Postgres>, col: &Column, v: &Value) -> Result<(), ApiError> {
    match col {
        Column::Volume => {
            let f = match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            }
            .filter(|f: &f64| f.is_finite())
            .ok_or_else(|| bad(format!("counter_volume {v} is not a number")))?;
            qb.push_bind(f);
        }
        Column::Time => {
            let s = v.as_str().ok_or_else(|| bad("timestamps are strings"))?;
            let t = vmeter_core::sample::parse_timestamp(s)
                .ok_or_else(|| bad(format!("timestamp {s:?} is not ISO-8601")))?;
            qb.push_bind(t);
        }
        Column::Text(_) | Column::Metadata(_) => {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return Err(bad(format!("{v} cannot be compared"))),
            };
            qb.push_bind(s);
        }
    }
    Ok(())
}

fn push_column(qb: &mut QueryBuilder<Postgres>, col: &Column) {
    match col {
        Column::Text(c) => {
            qb.push(*c);
        }
        Column::Volume => {
            qb.push("s.volume");
        }
        Column::Time => {
            qb.push("s.ts");
        }
        Column::Metadata(path) => {
            qb.push("(r.metadata #>> ");
            qb.push_bind(path.clone());
            qb.push(")");
        }
    }
}

/// Appends the SQL of filter expression `e`.
fn push_expr(
    qb: &mut QueryBuilder<Postgres>,
    e: &Value,
    depth: usize,
    terms: &mut usize,
) -> Result<(), ApiError> {
    if depth > MAX_DEPTH {
        return Err(bad(format!("filter nested deeper than {MAX_DEPTH} levels")));
    }
    let o = e
        .as_object()
        .filter(|o| o.len() == 1)
        .ok_or_else(|| bad(format!("a filter expression has one operator: {e}")))?;
    let (op, arg) = o.iter().next().expect("one entry");
    match op.to_ascii_lowercase().as_str() {
        "and" | "or" => {
            let list = arg
                .as_array()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| bad(format!("{op} takes a non-empty list")))?;
            qb.push("(");
            for (i, x) in list.iter().enumerate() {
                if i > 0 {
                    qb.push(if op.eq_ignore_ascii_case("and") {
                        " and "
                    } else {
                        " or "
                    });
                }
                push_expr(qb, x, depth + 1, terms)?;
            }
            qb.push(")");
        }
        "not" => {
            qb.push("not coalesce(");
            push_expr(qb, arg, depth + 1, terms)?;
            qb.push(", false)");
        }
        lower => {
            *terms += 1;
            if *terms > MAX_TERMS {
                return Err(bad(format!("more than {MAX_TERMS} comparisons")));
            }
            let (field, value) = arg
                .as_object()
                .filter(|a| a.len() == 1)
                .and_then(|a| a.iter().next())
                .ok_or_else(|| bad(format!("{op} takes one field: {arg}")))?;
            let col = column(field)?;
            if lower == "in" {
                let values = value
                    .as_array()
                    .filter(|v| !v.is_empty() && v.len() <= MAX_TERMS)
                    .ok_or_else(|| bad("in takes a non-empty list"))?;
                push_column(qb, &col);
                qb.push(" in (");
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        qb.push(", ");
                    }
                    push_value(qb, &col, v)?;
                }
                qb.push(")");
            } else {
                let sql = sql_op(lower).ok_or_else(|| bad(format!("unknown operator {op}")))?;
                push_column(qb, &col);
                qb.push(format!(" {sql} "));
                push_value(qb, &col, value)?;
            }
        }
    }
    Ok(())
}

/// Appends `order by …` from Ceilometer's orderby document (newest first by default), over
/// the columns of [`build`]'s outer query (alias `x`). Ties are broken by the sample's key
/// (time, meter, attribution), so an answer does not depend on the layout it came from.
fn push_order(qb: &mut QueryBuilder<Postgres>, orderby: Option<&str>) -> Result<(), ApiError> {
    let mut terms = Vec::new();
    if let Some(text) = orderby.filter(|t| !t.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("orderby is not JSON: {e}")))?;
        let list = v.as_array().ok_or_else(|| bad("orderby is a list"))?;
        for item in list.iter().take(16) {
            let (field, dir) = item
                .as_object()
                .filter(|o| o.len() == 1)
                .and_then(|o| o.iter().next())
                .ok_or_else(|| bad(format!("an orderby term is {{field: asc|desc}}: {item}")))?;
            let col = match column(field)? {
                Column::Text(c) => OUTER
                    .iter()
                    .find(|(inner, _)| *inner == c)
                    .map(|(_, outer)| *outer)
                    .unwrap_or("x.ts"),
                Column::Volume => "x.volume",
                Column::Time => "x.ts",
                Column::Metadata(_) => return Err(bad("orderby on metadata is not supported")),
            };
            let dir = match dir.as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("asc") => "asc",
                Some("desc") => "desc",
                _ => return Err(bad(format!("order {dir} is neither asc nor desc"))),
            };
            terms.push(format!("{col} {dir}"));
        }
    }
    terms.push("x.ts desc, x.meter_id, x.resource_id".into());
    qb.push(" order by ");
    qb.push(terms.join(", "));
    Ok(())
}

/// The outer query's column of each text field.
const OUTER: [(&str, &str); 7] = [
    ("m.name", "x.name"),
    ("m.type", "x.type"),
    ("m.unit", "x.unit"),
    ("r.resource_id", "x.rid"),
    ("r.project_id", "x.project_id"),
    ("r.user_id", "x.user_id"),
    ("r.source", "x.source"),
];

/// The columns both layouts' branches select, in the order the answer reads them.
const COLUMNS: &str =
    "m.name, m.type, m.unit, r.resource_id as rid, r.user_id, r.project_id, r.source, r.metadata";

/// The compaction watermark, in SQL (hours before it are in `sample_hour`).
const WATERMARK: &str = "coalesce((select watermark from compaction_state), '-infinity')";

/// The time bounds a filter puts on every sample it selects (its `timestamp` comparisons
/// at the top level or in a top-level `and`): `(after, until)` for pruning compacted hours.
fn time_bounds(e: &Value) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let mut out = (None, None);
    let conjuncts: Vec<&Value> = match e.get("and").or_else(|| e.get("AND")) {
        Some(Value::Array(list)) if e.as_object().is_some_and(|o| o.len() == 1) => {
            list.iter().collect()
        }
        _ => vec![e],
    };
    for c in conjuncts {
        let Some((op, arg)) = c
            .as_object()
            .filter(|o| o.len() == 1)
            .and_then(|o| o.iter().next())
        else {
            continue;
        };
        let Some((field, v)) = arg
            .as_object()
            .filter(|a| a.len() == 1)
            .and_then(|a| a.iter().next())
        else {
            continue;
        };
        if !matches!(column(field), Ok(Column::Time)) {
            continue;
        }
        let Some(t) = v.as_str().and_then(vmeter_core::sample::parse_timestamp) else {
            continue;
        };
        let op = sql_op(&op.to_ascii_lowercase());
        if matches!(op, Some(">" | ">=" | "=")) {
            out.0 = Some(out.0.map_or(t, |a: DateTime<Utc>| a.max(t)));
        }
        if matches!(op, Some("<" | "<=" | "=")) {
            out.1 = Some(out.1.map_or(t, |b: DateTime<Utc>| b.min(t)));
        }
    }
    out
}

/// The SQL of a complex query over samples, scoped to `who`'s project: the same filter over
/// the narrow rows from the compaction watermark on and over the compacted hours before it
/// (decoded by the PL/pgSQL decoders of migration 0005; only the hours of the series the
/// filter's top-level conditions leave, and within its top-level time bounds, are decoded).
pub fn build(
    q: &ComplexQuery,
    who: &Caller,
    limit: i64,
) -> Result<QueryBuilder<Postgres>, ApiError> {
    let filter: Option<Value> = match q.filter.as_deref().filter(|t| !t.trim().is_empty()) {
        Some(text) => {
            Some(serde_json::from_str(text).map_err(|e| bad(format!("filter is not JSON: {e}")))?)
        }
        None => None,
    };
    let mut qb = QueryBuilder::new(format!(
        "select x.meter_id, x.resource_id, x.ts, x.volume, x.name, x.type, x.unit,
                x.rid, x.user_id, x.project_id, x.source, x.metadata
         from (select s.meter_id, s.resource_id, s.ts, s.volume, {COLUMNS}
               from sample s join meter m on m.id = s.meter_id join resource r on r.id = s.resource_id
               where s.ts >= {WATERMARK}"
    ));
    let push_where = |qb: &mut QueryBuilder<Postgres>| -> Result<(), ApiError> {
        if let Some(e) = &filter {
            qb.push(" and ");
            push_expr(qb, e, 0, &mut 0)?;
        }
        if let Caller::Project(p) = who {
            qb.push(" and r.project_id = ");
            qb.push_bind(p.clone());
        }
        Ok(())
    };
    push_where(&mut qb)?;
    qb.push(format!(
        " union all
          select h.meter_id, h.resource_id, s.ts, s.volume, {COLUMNS}
          from sample_hour h join meter m on m.id = h.meter_id join resource r on r.id = h.resource_id
          cross join lateral (
            select timestamptz '1970-01-01 00:00:00+00' + d.us * interval '1 microsecond' as ts, d.volume
            from unnest(vmeter_hour_timestamps(h.ts), vmeter_hour_volumes(h.v)) as d(us, volume)) s
          where h.hour < {WATERMARK}"
    ));
    let (after, until) = filter.as_ref().map_or((None, None), time_bounds);
    if let Some(t) = after {
        qb.push(" and h.hour > ");
        qb.push_bind(t - chrono::Duration::hours(1));
    }
    if let Some(t) = until {
        qb.push(" and h.hour <= ");
        qb.push_bind(t);
    }
    push_where(&mut qb)?;
    qb.push(") x");
    push_order(&mut qb, q.orderby.as_deref())?;
    qb.push(" limit ");
    qb.push_bind(limit);
    Ok(qb)
}

/// `POST /v2/query/samples`.
pub(super) async fn query_samples(
    State(api): State<Api>,
    who: Caller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let q: ComplexQuery = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("body is not a complex query: {e}")))?;
    let limit = limit_of(&api, q.limit()?)?;
    let qb = build(&q, &who, limit)?;
    stream_list(api.pool.clone(), qb, |r| {
        let (m, rint, ts): (i32, i32, chrono::DateTime<chrono::Utc>) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        let mut id = Vec::new();
        write_sample_id(&mut id, m, rint, ts);
        let md: Value = r.try_get(11)?;
        Ok(json!({
            "id": String::from_utf8_lossy(&id),
            "meter": r.try_get::<String, _>(4)?,
            "type": r.try_get::<String, _>(5)?,
            "unit": r.try_get::<String, _>(6)?,
            "volume": r.try_get::<f64, _>(3)?,
            "resource_id": r.try_get::<String, _>(7)?,
            "user_id": r.try_get::<Option<String>, _>(8)?,
            "project_id": r.try_get::<Option<String>, _>(9)?,
            "source": r.try_get::<String, _>(10)?,
            "timestamp": iso(ts),
            "recorded_at": iso(ts),
            "metadata": flat(md),
        }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(filter: &str, orderby: Option<&str>) -> Result<String, ApiError> {
        let q = ComplexQuery {
            filter: Some(filter.into()),
            orderby: orderby.map(str::to_string),
            limit: None,
        };
        build(&q, &Caller::Admin, 10).map(|qb| qb.sql().as_str().to_string())
    }

    #[test]
    fn filters_become_bound_sql() {
        let s = sql(
            r#"{"and": [{"=": {"resource_id": "vm-1"}}, {">=": {"timestamp": "2026-01-01T00:00:00"}}, {"not": {"in": {"counter_name": ["a", "b"]}}}, {"=": {"resource_metadata.flavor.name": "m1"}}]}"#,
            Some(r#"[{"counter_volume": "ASC"}, {"timestamp": "desc"}]"#),
        )
        .unwrap();
        // The same filter over both layouts, the compacted hours pruned by its time bound.
        assert!(s.contains("(r.resource_id = $1 and s.ts >= $2 and not coalesce(m.name in ($3, $4), false) and (r.metadata #>> $5) = $6)"), "{s}");
        assert!(s.contains("h.hour > $7 and (r.resource_id = $8 and s.ts >= $9 and not coalesce(m.name in ($10, $11), false) and (r.metadata #>> $12) = $13)"), "{s}");
        assert!(
            s.ends_with(
                "order by x.volume asc, x.ts desc, x.ts desc, x.meter_id, x.resource_id limit $14"
            ),
            "{s}"
        );
        assert!(!s.contains("vm-1"), "values are bound, never in the SQL");
    }

    #[test]
    fn hostile_or_malformed_filters_are_400s() {
        let deep = format!(
            "{}{{\"=\": {{\"source\": \"x\"}}}}{}",
            "{\"not\": ".repeat(40),
            "}".repeat(40)
        );
        let many = format!(
            "{{\"or\": [{}]}}",
            vec![r#"{"=": {"source": "x"}}"#; 1001].join(",")
        );
        for bad_filter in [
            deep.as_str(),
            many.as_str(),
            r#"{"=": {"resource_id; drop table sample": "x"}}"#,
            r#"{"~": {"resource_id": "x"}}"#,
            r#"{"and": []}"#,
            r#"{"=": {"timestamp": "yesterday"}}"#,
            r#"{"=": {"counter_volume": "NaN"}}"#,
            r#"{"=": {"a": 1, "b": 2}}"#,
            "not json",
        ] {
            assert!(
                matches!(sql(bad_filter, None), Err(ApiError::BadRequest(_))),
                "{bad_filter}"
            );
        }
        assert!(
            sql(
                r#"{"=": {"source": "x"}}"#,
                Some(r#"[{"resource_metadata.a": "asc"}]"#)
            )
            .is_err()
        );
        assert!(
            sql(
                r#"{"=": {"source": "x"}}"#,
                Some(r#"[{"timestamp": "sideways"}]"#)
            )
            .is_err()
        );
    }

    #[test]
    fn time_bounds_come_from_top_level_conjuncts_only() {
        let t = |s: &str| vmeter_core::sample::parse_timestamp(s);
        let e: Value = serde_json::from_str(
            r#"{"and": [{">": {"timestamp": "2026-01-01T10:00:00"}}, {"<=": {"recorded_at": "2026-01-01T12:00:00"}}, {">=": {"timestamp": "2026-01-01T09:00:00"}}, {"=": {"source": "x"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            time_bounds(&e),
            (t("2026-01-01T10:00:00"), t("2026-01-01T12:00:00"))
        );
        let e: Value =
            serde_json::from_str(r#"{"=": {"timestamp": "2026-01-01T10:00:00"}}"#).unwrap();
        assert_eq!(
            time_bounds(&e),
            (t("2026-01-01T10:00:00"), t("2026-01-01T10:00:00"))
        );
        // Under an `or` or a `not`, a bound says nothing about every sample.
        for text in [
            r#"{"or": [{">": {"timestamp": "2026-01-01T10:00:00"}}, {"=": {"source": "x"}}]}"#,
            r#"{"not": {"<": {"timestamp": "2026-01-01T10:00:00"}}}"#,
            r#"{"and": [{"not": {"<": {"timestamp": "2026-01-01T10:00:00"}}}]}"#,
        ] {
            let e: Value = serde_json::from_str(text).unwrap();
            assert_eq!(time_bounds(&e), (None, None), "{text}");
        }
    }

    #[test]
    fn a_project_token_is_scoped() {
        let q = ComplexQuery {
            filter: Some(
                r#"{"or": [{"=": {"project_id": "other"}}, {"=": {"source": "x"}}]}"#.into(),
            ),
            orderby: None,
            limit: None,
        };
        let s = build(&q, &Caller::Project("mine".into()), 5)
            .unwrap()
            .sql()
            .as_str()
            .to_string();
        assert!(
            s.contains(") and r.project_id = $3") && s.contains(") and r.project_id = $6"),
            "the scope is outside the caller's or, in both layouts: {s}"
        );
    }
}
