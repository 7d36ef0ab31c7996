//! What a statistics request asks for: aggregates, `groupby` fields, the bucket grid.

use chrono::{DateTime, Utc};

use crate::api::error::ApiError;
use crate::api::query::Query;

/// A statistics aggregate requested with `aggregate.func`/`aggregate.param`.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Agg {
    Std(&'static str),
    Cardinality(&'static str),
}

pub(super) fn aggregates(q: &Query) -> Result<Vec<Agg>, ApiError> {
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

/// A `groupby` field: its output name and where its value comes from.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum GroupBy {
    /// The resource id. Read as the sample's attribution id (a resource has one per
    /// distinct owner and metadata) and named afterwards (no join per sample row); the
    /// groups of one resource's attributions are then one group.
    ResourceId,
    /// A column of the resource table: its index in [`RESOURCE_GROUPS`].
    Resource(usize),
}

/// The resource-table fields a `groupby` can name: output name, SQL expression (alias `r`).
pub(super) const RESOURCE_GROUPS: [(&str, &str); 4] = [
    ("user_id", "r.user_id"),
    ("project_id", "r.project_id"),
    ("source", "r.source"),
    (
        "resource_metadata.instance_type",
        "r.metadata->>'instance_type'",
    ),
];

impl GroupBy {
    pub(super) fn parse(field: &str) -> Option<GroupBy> {
        if field == "resource_id" {
            return Some(GroupBy::ResourceId);
        }
        RESOURCE_GROUPS
            .iter()
            .position(|(name, _)| *name == field)
            .map(GroupBy::Resource)
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            GroupBy::ResourceId => "resource_id",
            GroupBy::Resource(i) => RESOURCE_GROUPS[i].0,
        }
    }
}

/// Smallest `period`, s: finer buckets than the samples (10 s apart at the finest
/// polling) only cost memory.
pub const MIN_PERIOD_SECS: f64 = 1.0;

/// Most buckets one answer may have: each is a row per unit and group, built in memory.
pub const MAX_BUCKETS: i64 = 100_000;

/// The bucket grid `(period µs, t0, end of the last bucket)` of a period over [t0, t1], in
/// checked arithmetic: a period or range that would overflow, or more than [`MAX_BUCKETS`]
/// buckets, is a 400, never a panic.
pub(super) fn bucket_grid(
    period_secs: f64,
    t0: DateTime<Utc>,
    t1: DateTime<Utc>,
) -> Result<(i64, DateTime<Utc>, DateTime<Utc>), ApiError> {
    let too_long = || ApiError::BadRequest(format!("Period {period_secs} s is too long."));
    let us = period_secs * 1e6;
    // 2^62 µs is ~146,000 years: beyond any timestamp PostgreSQL or chrono hold.
    if us.round() >= (1u64 << 62) as f64 {
        return Err(too_long());
    }
    let us = (us.round() as i64).max(1);
    let span = (t1 - t0).num_microseconds().unwrap_or(i64::MAX).max(0);
    let n = span / us + i64::from(span % us != 0);
    if n > MAX_BUCKETS {
        return Err(ApiError::BadRequest(format!(
            "Period {period_secs} s makes {n} buckets over the requested time range (at most {MAX_BUCKETS}): use a longer period or a shorter range."
        )));
    }
    let end = n
        .checked_mul(us)
        .map(chrono::Duration::microseconds)
        .and_then(|d| t0.checked_add_signed(d))
        .ok_or_else(too_long)?;
    Ok((us, t0, end))
}
