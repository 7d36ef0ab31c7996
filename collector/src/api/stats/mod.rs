//! `GET /v2/meters/{meter}/statistics`.
//!
//! Computed in Rust (`compute.rs`) from whichever layout holds each hour: compacted hours
//! (`sample_hour`), per-minute rollups, narrow samples. Two modes with the same answer:
//! **minutes** when every bucket bound is a whole minute (the period is a multiple of 60 s,
//! the buckets start on a minute, the time bounds are on minutes), from per-minute
//! aggregates wherever an hour is closed; **samples** otherwise, from every sample. Every
//! part is added in one order (series, then time), so an answer does not change when its
//! hours are compacted. Rows come in Ceilometer's order (period, unit, groupby values).

use std::collections::HashMap;

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Row};

use crate::api::Api;
use crate::api::auth::Caller;
use crate::api::error::ApiError;
use crate::api::query::{Cond, request};
use crate::api::samples::SAMPLES;
use crate::api::sql::{MeterInfo, meters_named, push_ids, resource_ids};
use crate::api::stream::json_bytes;
use crate::jsonw;

use compute::compute;
use plan::{Agg, GroupBy, MIN_PERIOD_SECS, aggregates, bucket_grid};
use write::{StatCtx, write_stat};

mod compute;
mod plan;
mod write;

/// One row of the answer.
struct StatRow {
    /// Bucket start, µs since the epoch; `None` without a period.
    bucket: Option<i64>,
    /// Index into the unit list.
    unit: u32,
    /// Index into the group list, which is in Ceilometer's order of the `groupby` values.
    gid: u32,
    count: i64,
    min: f64,
    max: f64,
    sum: f64,
    sumsq: f64,
    /// First and last sample, µs since the epoch.
    first: i64,
    last: i64,
    /// Distinct resources, users, projects (0 unless asked for).
    card: [i64; 3],
}

/// The `groupby` values of each group, in `groupby` order; a group's id is its index.
type Groups = Vec<Vec<Option<String>>>;

/// What both paths need to know about the request.
struct Plan<'a> {
    c: &'a Cond,
    meter_ids: Vec<i32>,
    /// Meter id → index into the unit list.
    unit_of: HashMap<i32, u32>,
    /// Resources selected by resource-level filters (`None`: every resource).
    res_ids: Option<Vec<i32>>,
    groupby: Vec<GroupBy>,
    /// (period µs, t0, end of the last bucket).
    buckets: Option<(i64, DateTime<Utc>, DateTime<Utc>)>,
    card_asked: [bool; 3],
}

/// Sorts distinct group keys into Ceilometer's order. Returns the sorted distinct keys and,
/// for each input key, its index among them.
fn rank_groups(keys: Vec<Vec<Option<String>>>) -> (Groups, Vec<u32>) {
    let mut order: Vec<u32> = (0..keys.len() as u32).collect();
    order.sort_unstable_by(|a, b| keys[*a as usize].cmp(&keys[*b as usize]));
    let mut rank = vec![0u32; keys.len()];
    let mut groups: Groups = Vec::new();
    for i in order {
        let k = &keys[i as usize];
        if groups.last() != Some(k) {
            groups.push(k.clone());
        }
        rank[i as usize] = groups.len() as u32 - 1;
    }
    (groups, rank)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `GET /v2/meters/{meter}/statistics` (see the module doc). Buckets are Ceilometer's
/// `[t0 + kP, t0 + (k+1)P)`, with `t0` the query's start or else the first sample's time.
pub(super) async fn statistics(
    State(api): State<Api>,
    who: Caller,
    Path(meter): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = ["groupby", "period", "aggregate.func", "aggregate.param"];
    let (q, mut c) = request(&who, raw.as_deref(), &params, SAMPLES)?;
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
            if v < MIN_PERIOD_SECS {
                return Err(ApiError::BadRequest(format!(
                    "Period must be at least {MIN_PERIOD_SECS} s."
                )));
            }
            Some(v)
        }
    };
    let mut groupby: Vec<GroupBy> = Vec::new();
    for g in q.params("groupby") {
        let col = GroupBy::parse(g)
            .ok_or_else(|| ApiError::BadRequest(format!("Invalid groupby fields: {g}")))?;
        if !groupby.contains(&col) {
            groupby.push(col);
        }
    }
    let aggs = aggregates(&q)?;
    let empty = || Ok(json_bytes(b"[]".to_vec()));

    let meters = meters_named(&api, c.meter.as_deref()).await?;
    let res_ids = resource_ids(&api, &c).await?;
    if meters.is_empty() || res_ids.as_ref().is_some_and(Vec::is_empty) {
        return empty();
    }
    let mut meter_ids: Vec<i32> = meters.keys().copied().collect();
    meter_ids.sort_unstable();
    // Units in a stable order; a meter name stored with several units gives one result
    // set per unit (Ceilometer groups statistics by unit).
    let mut units: Vec<&str> = meter_ids.iter().map(|m| meters[m].unit.as_str()).collect();
    units.sort_unstable();
    units.dedup();
    let unit_of: HashMap<i32, u32> = meter_ids
        .iter()
        .map(|m| {
            let u: &MeterInfo = &meters[m];
            (
                *m,
                units.iter().position(|x| *x == u.unit).unwrap_or(0) as u32,
            )
        })
        .collect();

    // Bucket origin and end: the query's bounds, else the first/last sample of the
    // selected series (kept per series by the collector: no scan of the samples).
    let (mut t0, mut t1) = (c.start(), c.end());
    if period.is_some() && (t0.is_none() || t1.is_none()) {
        let mut qb = QueryBuilder::new("select min(first_ts), max(last_ts) from series where true");
        push_ids(&mut qb, "meter_id", &meter_ids);
        if let Some(ids) = &res_ids {
            push_ids(&mut qb, "resource_id", ids);
        }
        let row = qb.build().fetch_one(&api.pool).await?;
        let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
            (row.try_get(0)?, row.try_get(1)?);
        t0 = t0.or(first);
        t1 = t1.or(last);
    }
    // With a period: buckets [t0 + kP, t0 + (k+1)P) for k < ceil((t1 - t0) / P).
    let buckets = match (period, t0, t1) {
        (Some(p), Some(t0), Some(t1)) => Some(bucket_grid(p, t0, t1)?),
        (Some(_), _, _) => return empty(),
        _ => None,
    };

    let plan = Plan {
        c: &c,
        meter_ids,
        unit_of,
        res_ids,
        groupby,
        buckets,
        card_asked: [
            aggs.contains(&Agg::Cardinality("resource_id")),
            aggs.contains(&Agg::Cardinality("user_id")),
            aggs.contains(&Agg::Cardinality("project_id")),
        ],
    };
    let (mut out, groups, mode) = compute(&api, &plan).await?;
    path_counter(mode.label()).inc();

    let g = plan.groupby.len();
    let mut names: Vec<(&'static str, usize)> = plan
        .groupby
        .iter()
        .enumerate()
        .map(|(i, g)| (g.name(), i))
        .collect();
    names.sort_unstable();
    let ctx = StatCtx {
        groups: &groups,
        aggs: &aggs,
        units: &units,
        groupby: &names,
        period_us: plan.buckets.map(|(us, _, _)| us),
        period_s: plan.buckets.map_or(0.0, |(us, _, _)| us as f64 / 1e6),
        start: c.start().map(micros),
        end: c.end().map(micros),
    };
    debug_assert!(groups.iter().all(|k| k.len() == g));
    // Sorting and writing tens of MB is CPU work: off the async worker's clock.
    let body = cpu_bound(|| {
        // Ceilometer's order: by period, then unit, then the groupby values.
        out.sort_unstable_by_key(|r| (r.bucket, r.unit, r.gid));
        // ~350 B per row; two writer threads from 20,000 rows.
        jsonw::array(&out, 380, 20_000, |j, r| write_stat(j, r, &ctx))
    });
    Ok(json_bytes(body))
}

fn path_counter(path: &str) -> vmeter_core::telemetry::Counter {
    vmeter_core::telemetry::counter(
        "vmeter_api_statistics_total",
        "Statistics requests answered, by the parts that computed them (rollup: per-minute aggregates of the closed hours, rollups or compacted, plus the samples not rolled up yet; samples: every sample).",
        &[("path", path)],
    )
}

/// Runs `f` where blocking is allowed: `block_in_place` on a multi-threaded runtime.
fn cpu_bound<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
