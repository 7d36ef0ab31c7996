//! `GET /v2/meters/{meter}/statistics`.
//!
//! Two ways to the same answer:
//! - **from the rollups** (collector/src/rollup.rs) when every bucket bound is a whole
//!   minute (the period is a multiple of 60 s and the buckets start on a minute, `timestamp`
//!   bounds with `ge`/`lt` on minutes) and no cardinality is asked: the rolled-up hours are
//!   read as packed per-minute partial aggregates, the hours after the watermark (and
//!   series too sparse to roll up) from the samples, and the parts are merged in Rust;
//! - **from the samples** otherwise: one SQL statement over the narrow sample table.
//!
//! Both give Ceilometer's rows in Ceilometer's order (period, unit, groupby values); sums
//! may differ in the last bits, as summation order differs.

use std::collections::HashMap;

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::types::PgInterval;
use sqlx::{Postgres, QueryBuilder, Row, Transaction};

use super::Api;
use super::auth::Caller;
use super::error::ApiError;
use super::query::{Cond, Query, request};
use super::samples::SAMPLES;
use super::sql::{MeterInfo, meters_named, push_cond, push_ids, resource_ids, sample_level};
use super::stream::json_bytes;
use crate::jsonw::{self, JsonBuf};
use crate::rollup::{self, WINDOW_US};

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

/// A `groupby` field: its output name and where its value comes from.
#[derive(Clone, Copy, PartialEq)]
enum GroupBy {
    /// The resource id. Read as the sample's attribution id (a resource has one per
    /// distinct owner and metadata) and named afterwards (no join per sample row); the
    /// groups of one resource's attributions are then one group.
    ResourceId,
    /// A column of the resource table: its index in [`RESOURCE_GROUPS`].
    Resource(usize),
}

/// The resource-table fields a `groupby` can name: output name, SQL expression (alias `r`).
const RESOURCE_GROUPS: [(&str, &str); 4] = [
    ("user_id", "r.user_id"),
    ("project_id", "r.project_id"),
    ("source", "r.source"),
    (
        "resource_metadata.instance_type",
        "r.metadata->>'instance_type'",
    ),
];

impl GroupBy {
    fn parse(field: &str) -> Option<GroupBy> {
        if field == "resource_id" {
            return Some(GroupBy::ResourceId);
        }
        RESOURCE_GROUPS
            .iter()
            .position(|(name, _)| *name == field)
            .map(GroupBy::Resource)
    }

    fn name(self) -> &'static str {
        match self {
            GroupBy::ResourceId => "resource_id",
            GroupBy::Resource(i) => RESOURCE_GROUPS[i].0,
        }
    }
}

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
    stddev: bool,
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

/// Smallest `period`, s: finer buckets than the samples (10 s apart at the finest
/// polling) only cost memory.
pub const MIN_PERIOD_SECS: f64 = 1.0;

/// Most buckets one answer may have: each is a row per unit and group, built in memory.
pub const MAX_BUCKETS: i64 = 100_000;

/// The bucket grid `(period µs, t0, end of the last bucket)` of a period over [t0, t1], in
/// checked arithmetic: a period or range that would overflow, or more than [`MAX_BUCKETS`]
/// buckets, is a 400, never a panic.
fn bucket_grid(
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
        stddev: aggs.contains(&Agg::Std("stddev")),
        card_asked: [
            aggs.contains(&Agg::Cardinality("resource_id")),
            aggs.contains(&Agg::Cardinality("user_id")),
            aggs.contains(&Agg::Cardinality("project_id")),
        ],
    };
    let (mut out, groups) = match from_rollups(&api, &plan).await? {
        Some(x) => {
            path_counter("rollup").inc();
            x
        }
        None => {
            path_counter("samples").inc();
            from_samples(&api, &plan).await?
        }
    };

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
        "Statistics requests answered, by the path that computed them (rollup: per-minute rollups plus the samples not rolled up yet; samples: the sample table only).",
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

/// One statement over the sample table, grouped by unit, the `groupby` fields and, with a
/// period, the time bucket.
///
/// The meter and the resource-level filters are already integer ids; the statement reads
/// only the sample table (an index-only scan for one series) and joins the resource table
/// only when a `groupby` field or a cardinality needs one of its columns. Buckets are
/// `date_bin(period, ts, t0)`.
async fn from_samples(api: &Api, p: &Plan<'_>) -> Result<(Vec<StatRow>, Groups), ApiError> {
    // Samples carry their attribution's id (a resource may have several): joined, the
    // resource id is grouped and counted by name; not joined, by attribution, and the
    // groups of one resource are merged below.
    let join = p.card_asked.iter().any(|a| *a)
        || p.groupby.iter().any(|g| matches!(g, GroupBy::Resource(..)));
    let mut qb = QueryBuilder::new("select ");
    if p.unit_of.values().all(|u| *u == 0) {
        qb.push("0");
    } else {
        qb.push("case s.meter_id");
        for m in &p.meter_ids {
            qb.push(format!(" when {m} then {}", p.unit_of[m]));
        }
        qb.push(" end");
    }
    for g in &p.groupby {
        match g {
            GroupBy::ResourceId if join => qb.push(", r.resource_id"),
            GroupBy::ResourceId => qb.push(", s.resource_id"),
            GroupBy::Resource(i) => qb.push(format!(", {}", RESOURCE_GROUPS[*i].1)),
        };
    }
    match p.buckets {
        Some((us, t0, _)) => {
            qb.push(", date_bin(");
            qb.push_bind(PgInterval {
                months: 0,
                days: 0,
                microseconds: us,
            });
            qb.push(", s.ts, ");
            qb.push_bind(t0);
            qb.push(")");
        }
        None => {
            qb.push(", null::timestamptz");
        }
    }
    qb.push(", count(*), min(s.volume), max(s.volume), sum(s.volume), ");
    qb.push(if p.stddev {
        "sum(s.volume * s.volume)"
    } else {
        "0::float8"
    });
    qb.push(", min(s.ts), max(s.ts)");
    // Distinct counts only when asked for (they force a sort per group).
    for (asked, col) in p
        .card_asked
        .iter()
        .zip(["r.resource_id", "r.user_id", "r.project_id"])
    {
        if *asked {
            qb.push(format!(", count(distinct {col})"));
        } else {
            qb.push(", 0::bigint");
        }
    }
    qb.push(" from sample s");
    if join {
        qb.push(" join resource r on r.id = s.resource_id");
    }
    qb.push(" where true");
    push_ids(&mut qb, "s.meter_id", &p.meter_ids);
    if let Some(ids) = &p.res_ids {
        push_ids(&mut qb, "s.resource_id", ids);
    }
    push_cond(&mut qb, &sample_level(p.c), true);
    if let Some((_, t0, end)) = p.buckets {
        qb.push(" and s.ts >= ");
        qb.push_bind(t0);
        qb.push(" and s.ts < ");
        qb.push_bind(end);
    }
    let g = p.groupby.len();
    let group_cols: Vec<String> = (1..=g + 2).map(|i| i.to_string()).collect();
    qb.push(format!(" group by {}", group_cols.join(", ")));
    let mut tx = api.pool.begin().await?;
    // Hash aggregation in memory for many buckets; no JIT start-up cost.
    sqlx::query("set local work_mem = '256MB'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("set local jit = off").execute(&mut *tx).await?;
    let rows = qb.build().fetch_all(&mut *tx).await?;
    tx.commit().await?;

    // Group keys as they come (resource key, resource-table values), numbered in order of
    // appearance; named and ranked afterwards.
    let rid_at = p
        .groupby
        .iter()
        .position(|g| *g == GroupBy::ResourceId)
        .filter(|_| !join);
    let mut tmp: HashMap<(i32, Vec<Option<String>>), u32> = HashMap::new();
    let mut out: Vec<StatRow> = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut texts = Vec::new();
        let mut rint = 0;
        for (i, gb) in p.groupby.iter().enumerate() {
            match gb {
                GroupBy::ResourceId if !join => rint = r.try_get_unchecked(1 + i)?,
                GroupBy::ResourceId | GroupBy::Resource(..) => {
                    texts.push(r.try_get_unchecked::<Option<String>, _>(1 + i)?)
                }
            }
        }
        let n = tmp.len() as u32;
        let gid = *tmp.entry((rint, texts)).or_insert(n);
        out.push(StatRow {
            unit: r.try_get_unchecked::<i32, _>(0)? as u32,
            gid,
            bucket: r
                .try_get_unchecked::<Option<DateTime<Utc>>, _>(1 + g)?
                .map(micros),
            count: r.try_get_unchecked(2 + g)?,
            min: r.try_get_unchecked(3 + g)?,
            max: r.try_get_unchecked(4 + g)?,
            sum: r.try_get_unchecked(5 + g)?,
            sumsq: r.try_get_unchecked(6 + g)?,
            first: micros(r.try_get_unchecked(7 + g)?),
            last: micros(r.try_get_unchecked(8 + g)?),
            card: [
                r.try_get_unchecked(9 + g)?,
                r.try_get_unchecked(10 + g)?,
                r.try_get_unchecked(11 + g)?,
            ],
        });
    }
    drop(rows);
    let mut rid_names: HashMap<i32, String> = HashMap::new();
    if rid_at.is_some() {
        let mut ids: Vec<i32> = tmp.keys().map(|k| k.0).collect();
        ids.sort_unstable();
        ids.dedup();
        rid_names = sqlx::query_as("select id, resource_id from resource where id = any($1)")
            .bind(&ids)
            .fetch_all(&api.pool)
            .await?
            .into_iter()
            .collect();
    }
    let mut keys = vec![Vec::new(); tmp.len()];
    for ((rint, texts), at) in tmp {
        let mut texts = texts.into_iter();
        keys[at as usize] = (0..g)
            .map(|i| {
                if Some(i) == rid_at {
                    rid_names.get(&rint).cloned()
                } else {
                    texts.next().flatten()
                }
            })
            .collect();
    }
    let (groups, rank) = rank_groups(keys);
    for r in &mut out {
        r.gid = rank[r.gid as usize];
    }
    if rid_at.is_some() {
        out = merge_rows(out);
    }
    Ok((out, groups))
}

/// Rows of one (bucket, unit, group) merged into one: the attributions of one resource
/// come out of PostgreSQL as groups of their own. Distinct counts are not merged: they
/// are only asked for with the resource table joined, where no group repeats.
fn merge_rows(mut rows: Vec<StatRow>) -> Vec<StatRow> {
    rows.sort_unstable_by_key(|r| (r.bucket, r.unit, r.gid));
    let mut out: Vec<StatRow> = Vec::with_capacity(rows.len());
    for r in rows {
        match out.last_mut() {
            Some(o) if (o.bucket, o.unit, o.gid) == (r.bucket, r.unit, r.gid) => {
                o.count += r.count;
                o.min = o.min.min(r.min);
                o.max = o.max.max(r.max);
                o.sum += r.sum;
                o.sumsq += r.sumsq;
                o.first = o.first.min(r.first);
                o.last = o.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    out
}

/// A partial aggregate of one series: a rolled-up minute, or one sample.
#[derive(Clone, Copy)]
struct Acc {
    /// Samples (0: nothing yet).
    n: i64,
    sum: f64,
    min: f64,
    max: f64,
    sumsq: f64,
    /// First and last sample, µs since the epoch.
    first: i64,
    last: i64,
}

impl Acc {
    const EMPTY: Acc = Acc {
        n: 0,
        sum: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        sumsq: 0.0,
        first: i64::MAX,
        last: i64::MIN,
    };

    fn add(&mut self, x: &Acc) {
        self.n += x.n;
        self.sum += x.sum;
        self.sumsq += x.sumsq;
        self.min = self.min.min(x.min);
        self.max = self.max.max(x.max);
        self.first = self.first.min(x.first);
        self.last = self.last.max(x.last);
    }

    fn row(&self, p: &Plan<'_>, k: i64, unit: u32, gid: u32) -> StatRow {
        StatRow {
            bucket: p.buckets.map(|(us, t0, _)| micros(t0) + k * us),
            unit,
            gid,
            count: self.n,
            min: self.min,
            max: self.max,
            sum: self.sum,
            sumsq: self.sumsq,
            first: self.first,
            last: self.last,
            card: [0; 3],
        }
    }
}

/// Where partial aggregates are merged into one per (bucket, unit, group).
enum Sink {
    /// Few empty cells: a dense grid indexed by the three, in answer order (linear time).
    Grid {
        cells: Vec<Acc>,
        units: usize,
        groups: usize,
    },
    /// Else the parts with their keys, sorted at the end.
    List(Vec<((i64, u32, u32), Acc)>),
}

impl Sink {
    /// A grid when `buckets × units × groups` is at most about 4× the `parts` expected.
    fn new(buckets: i64, units: usize, groups: usize, parts: usize) -> Sink {
        let cells = usize::try_from(buckets.max(1))
            .ok()
            .and_then(|b| b.checked_mul(units.max(1)))
            .and_then(|c| c.checked_mul(groups.max(1)));
        match cells {
            Some(c) if c <= 4 * parts + 4096 => Sink::Grid {
                cells: vec![Acc::EMPTY; c],
                units: units.max(1),
                groups: groups.max(1),
            },
            _ => Sink::List(Vec::with_capacity(parts)),
        }
    }

    #[inline]
    fn add(&mut self, k: i64, unit: u32, gid: u32, x: &Acc) {
        if let Sink::Grid {
            cells,
            units,
            groups,
        } = self
        {
            let (u, g) = (unit as usize, gid as usize);
            let at = usize::try_from(k)
                .ok()
                .filter(|_| u < *units && g < *groups)
                .and_then(|k| (k * *units + u).checked_mul(*groups)?.checked_add(g))
                .filter(|at| *at < cells.len());
            match at {
                Some(at) => return cells[at].add(x),
                // Off the grid (the bounds were computed wrong): keep every part anyway.
                None => *self = Sink::List(self.take_parts()),
            }
        }
        if let Sink::List(v) = self {
            v.push(((k, unit, gid), *x));
        }
    }

    /// The parts merged so far, with their keys (a grid's non-empty cells).
    fn take_parts(&mut self) -> Vec<((i64, u32, u32), Acc)> {
        match std::mem::replace(self, Sink::List(Vec::new())) {
            Sink::List(v) => v,
            Sink::Grid {
                cells,
                units,
                groups,
            } => cells
                .into_iter()
                .enumerate()
                .filter(|(_, c)| c.n > 0)
                .map(|(at, c)| {
                    let (g, u, k) = (at % groups, at / groups % units, at / groups / units);
                    ((k as i64, u as u32, g as u32), c)
                })
                .collect(),
        }
    }

    /// One row per non-empty (bucket, unit, group), in that order.
    fn rows(mut self, p: &Plan<'_>) -> Vec<StatRow> {
        // A grid's cells come out in key order, one per key.
        let sorted = matches!(self, Sink::Grid { .. });
        let mut parts = self.take_parts();
        if !sorted {
            parts.sort_unstable_by_key(|(k, _)| *k);
        }
        let mut out: Vec<StatRow> = Vec::with_capacity(parts.len());
        let mut acc = Acc::EMPTY;
        let mut cur = None;
        for (key, x) in parts {
            if cur.is_some_and(|c| c != key) {
                let (k, u, g) = cur.expect("checked");
                out.push(acc.row(p, k, u, g));
                acc = Acc::EMPTY;
            }
            cur = Some(key);
            acc.add(&x);
        }
        if let Some((k, u, g)) = cur {
            out.push(acc.row(p, k, u, g));
        }
        out
    }
}

/// One sample read on the rollup path (what is not rolled up).
struct RawSample {
    meter: i32,
    rint: i32,
    ts: i64,
    volume: f64,
}

/// The answer from the rollups, or `None` when the request does not fit them (see the
/// module doc) or nothing is rolled up yet.
async fn from_rollups(api: &Api, p: &Plan<'_>) -> Result<Option<(Vec<StatRow>, Groups)>, ApiError> {
    let c = p.c;
    if p.card_asked.iter().any(|a| *a) || c.sample.is_some() || c.gt.is_some() || c.le.is_some() {
        return Ok(None);
    }
    let on_minute = |t: DateTime<Utc>| micros(t).rem_euclid(WINDOW_US) == 0;
    // The time range [a, b), µs.
    let (mut a, mut b) = (i64::MIN, i64::MAX);
    if let Some(t) = c.ge {
        if !on_minute(t) {
            return Ok(None);
        }
        a = micros(t);
    }
    if let Some(t) = c.lt {
        if !on_minute(t) {
            return Ok(None);
        }
        b = micros(t);
    }
    if let Some((us, t0, end)) = p.buckets {
        if us % WINDOW_US != 0 || !on_minute(t0) {
            return Ok(None);
        }
        a = a.max(micros(t0));
        b = b.min(micros(end));
    }
    if a >= b {
        return Ok(Some((Vec::new(), Vec::new())));
    }
    // One snapshot for every statement: the rollup job commits rows and watermark together.
    let mut tx = api.pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    let Some(wm) = rollup::watermark(&mut tx).await? else {
        return Ok(None);
    };
    let wm = micros(wm);

    // Rolled-up hours that overlap [a, b); sparse ones are read from the samples.
    let mut rolled = Vec::new();
    let mut sparse: Vec<(i32, i32, DateTime<Utc>)> = Vec::new();
    if a < wm {
        let mut qb = QueryBuilder::new(
            "select meter_id, resource_id, hour, minutes from sample_rollup where hour < ",
        );
        qb.push_bind(from_micros(wm.min(b)));
        if a > i64::MIN {
            qb.push(" and hour > ");
            qb.push_bind(from_micros(a - 3_600_000_000));
        }
        push_ids(&mut qb, "meter_id", &p.meter_ids);
        if let Some(ids) = &p.res_ids {
            push_ids(&mut qb, "resource_id", ids);
        }
        for r in qb.build().fetch_all(&mut *tx).await? {
            if r.try_get_unchecked::<Option<&[u8]>, _>(3)?.is_some() {
                rolled.push(r);
            } else {
                sparse.push((
                    r.try_get_unchecked(0)?,
                    r.try_get_unchecked(1)?,
                    r.try_get_unchecked(2)?,
                ));
            }
        }
    }
    // The samples of what is not rolled up: after the watermark, and the sparse hours.
    let mut raw = Vec::new();
    let lo = a.max(wm);
    if lo < b {
        raw_samples(&mut tx, p, lo, b, None, &mut raw).await?;
    }
    if !sparse.is_empty() {
        raw_samples(&mut tx, p, a, b, Some(&sparse), &mut raw).await?;
    }

    // Group ids: each resource's `groupby` values, ranked. `rints` is sorted: a resource's
    // group is found by binary search.
    let mut rints: Vec<i32> = Vec::with_capacity(rolled.len() + 64);
    for r in &rolled {
        rints.push(r.try_get_unchecked(1)?);
    }
    rints.extend(raw.iter().map(|x| x.rint));
    rints.sort_unstable();
    rints.dedup();
    let mut gid_at = vec![0u32; rints.len()];
    let groups = if p.groupby.is_empty() {
        vec![Vec::new()]
    } else {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "select r.id, r.resource_id, {} from resource r where r.id = any($1)",
            RESOURCE_GROUPS.map(|(_, expr)| expr).join(", ")
        )))
        .bind(&rints)
        .fetch_all(&mut *tx)
        .await?;
        let mut keys = Vec::with_capacity(rows.len());
        let mut at = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: i32 = r.try_get(0)?;
            let Ok(i) = rints.binary_search(&id) else {
                continue;
            };
            at.push(i);
            let mut k = Vec::with_capacity(p.groupby.len());
            for g in &p.groupby {
                k.push(match g {
                    GroupBy::ResourceId => r.try_get::<Option<String>, _>(1)?,
                    GroupBy::Resource(i) => r.try_get::<Option<String>, _>(2 + i)?,
                });
            }
            keys.push(k);
        }
        let (groups, rank) = rank_groups(keys);
        for (i, g) in at.into_iter().zip(rank) {
            gid_at[i] = g;
        }
        groups
    };
    tx.commit().await?;
    let gid = |rint: i32| rints.binary_search(&rint).map_or(0, |i| gid_at[i]);

    // Merge every part into its (bucket, unit, group).
    let units = p.unit_of.values().max().map_or(1, |u| *u as usize + 1);
    let (t0, period) = p
        .buckets
        .map_or((0, i64::MAX), |(us, t0, _)| (micros(t0), us));
    let bucket_of = |t: i64| {
        if p.buckets.is_some() {
            (t - t0) / period
        } else {
            0
        }
    };
    let buckets = if p.buckets.is_some() {
        (b - t0 + period - 1) / period
    } else {
        1
    };
    let mut expected = raw.len();
    for r in &rolled {
        expected += rollup::minutes_in(r.try_get_unchecked::<&[u8], _>(3)?);
    }
    let mut sink = Sink::new(buckets, units, groups.len(), expected);
    for r in &rolled {
        let meter: i32 = r.try_get_unchecked(0)?;
        let rint: i32 = r.try_get_unchecked(1)?;
        let h = micros(r.try_get_unchecked::<DateTime<Utc>, _>(2)?);
        let (unit, g) = (p.unit_of.get(&meter).copied().unwrap_or(0), gid(rint));
        for m in rollup::unpack(r.try_get_unchecked::<&[u8], _>(3)?) {
            let w = h + i64::from(m.minute) * WINDOW_US;
            if w < a || w >= b {
                continue;
            }
            let x = Acc {
                n: i64::from(m.n),
                sum: m.sum,
                min: m.min,
                max: m.max,
                sumsq: m.sumsq,
                first: w + i64::from(m.first_us),
                last: w + i64::from(m.last_us),
            };
            sink.add(bucket_of(w), unit, g, &x);
        }
    }
    drop(rolled);
    for x in &raw {
        let acc = Acc {
            n: 1,
            sum: x.volume,
            min: x.volume,
            max: x.volume,
            sumsq: x.volume * x.volume,
            first: x.ts,
            last: x.ts,
        };
        let unit = p.unit_of.get(&x.meter).copied().unwrap_or(0);
        sink.add(bucket_of(x.ts), unit, gid(x.rint), &acc);
    }
    Ok(Some((sink.rows(p), groups)))
}

/// The samples in [lo, hi) µs (and, with `hours`, only in those (meter, resource,
/// hour)s). They are aggregated here: that costs less than PostgreSQL's hash aggregation,
/// and they are few (what is not rolled up yet).
async fn raw_samples(
    tx: &mut Transaction<'_, Postgres>,
    p: &Plan<'_>,
    lo: i64,
    hi: i64,
    hours: Option<&[(i32, i32, DateTime<Utc>)]>,
    out: &mut Vec<RawSample>,
) -> Result<(), ApiError> {
    let mut qb = QueryBuilder::new("select s.meter_id, s.resource_id, s.ts, s.volume from ");
    match hours {
        Some(h) => {
            qb.push("unnest(");
            qb.push_bind(h.iter().map(|x| x.0).collect::<Vec<i32>>());
            qb.push("::int4[], ");
            qb.push_bind(h.iter().map(|x| x.1).collect::<Vec<i32>>());
            qb.push("::int4[], ");
            qb.push_bind(h.iter().map(|x| x.2).collect::<Vec<DateTime<Utc>>>());
            qb.push(
                "::timestamptz[]) as u(m, r, h) join sample s on s.meter_id = u.m and s.resource_id = u.r
                 and s.ts >= u.h and s.ts < u.h + interval '1 hour' where true",
            );
        }
        None => {
            qb.push("sample s where true");
            push_ids(&mut qb, "s.meter_id", &p.meter_ids);
            if let Some(ids) = &p.res_ids {
                push_ids(&mut qb, "s.resource_id", ids);
            }
        }
    }
    if lo > i64::MIN {
        qb.push(" and s.ts >= ");
        qb.push_bind(from_micros(lo));
    }
    if hi < i64::MAX {
        qb.push(" and s.ts < ");
        qb.push_bind(from_micros(hi));
    }
    let mut rows = qb.build().fetch(&mut **tx);
    while let Some(r) = rows.try_next().await? {
        out.push(RawSample {
            meter: r.try_get_unchecked(0)?,
            rint: r.try_get_unchecked(1)?,
            ts: micros(r.try_get_unchecked(2)?),
            volume: r.try_get_unchecked(3)?,
        });
    }
    Ok(())
}

/// What every statistics row is written with.
struct StatCtx<'a> {
    groups: &'a Groups,
    aggs: &'a [Agg],
    units: &'a [&'a str],
    /// `groupby` output names in JSON key order, with their index in a group's values.
    groupby: &'a [(&'static str, usize)],
    period_us: Option<i64>,
    period_s: f64,
    /// The query's bounds, µs since the epoch.
    start: Option<i64>,
    end: Option<i64>,
}

/// One row as Ceilometer's Statistics: `max`, `min`, `sum`, `avg`, `count` (all of them, or
/// with `aggregate.func` only those asked for, plus the `aggregate` map), `duration*`
/// clamped to the query's bounds, `period*`, `unit`, `groupby`.
fn write_stat(j: &mut JsonBuf, r: &StatRow, ctx: &StatCtx<'_>) {
    let n = r.count as f64;
    let avg = r.sum / n;
    let std = (r.sumsq / n - avg * avg).max(0.0).sqrt();
    let value = |name: &str| -> f64 {
        match name {
            "max" => r.max,
            "min" => r.min,
            "sum" => r.sum,
            "avg" => avg,
            "count" => n,
            _ => std,
        }
    };
    let all = ctx.aggs.is_empty();
    let mut first = true;
    let mut key = |j: &mut JsonBuf, k: &str| {
        j.raw(if first { "{\"" } else { ",\"" });
        first = false;
        j.raw(k);
        j.raw("\":");
    };
    for name in ["max", "min", "sum", "avg"] {
        if all || ctx.aggs.contains(&Agg::Std(name)) {
            key(j, name);
            j.f64(value(name));
        }
    }
    if all || ctx.aggs.contains(&Agg::Std("count")) {
        key(j, "count");
        j.i64(r.count);
    }
    // Clamp the duration to the query's bounds (as Ceilometer's API).
    let d0 = ctx.start.map_or(r.first, |s| r.first.max(s));
    let d1 = ctx.end.map_or(r.last, |e| r.last.min(e));
    key(j, "duration");
    if d0 > d1 {
        j.raw("null,\"duration_start\":null,\"duration_end\":null");
    } else {
        j.f64((d1 - d0) as f64 / 1e6);
        j.raw(",\"duration_start\":");
        j.ts_us(d0);
        j.raw(",\"duration_end\":");
        j.ts_us(d1);
    }
    j.raw(",\"period\":");
    j.f64(ctx.period_s);
    let (ps, pe) = match (r.bucket, ctx.period_us) {
        (Some(b), Some(us)) => (b, b + us),
        _ => (r.first, r.last),
    };
    j.raw(",\"period_start\":");
    j.ts_us(ps);
    j.raw(",\"period_end\":");
    j.ts_us(pe);
    j.raw(",\"unit\":");
    j.str(ctx.units.get(r.unit as usize).copied().unwrap_or(""));
    j.raw(",\"groupby\":");
    if ctx.groupby.is_empty() {
        j.raw("null");
    } else {
        let values = &ctx.groups[r.gid as usize];
        for (i, (name, at)) in ctx.groupby.iter().enumerate() {
            j.raw(if i == 0 { "{" } else { "," });
            j.str(name);
            j.raw(":");
            j.opt_str(values[*at].as_deref());
        }
        j.raw("}");
    }
    if !all {
        // The aggregate map, keys in sorted order.
        let mut entries: Vec<(String, Option<f64>, Option<i64>)> = ctx
            .aggs
            .iter()
            .map(|a| match a {
                Agg::Std("count") => ("count".to_string(), None, Some(r.count)),
                Agg::Std(name) => (name.to_string(), Some(value(name)), None),
                Agg::Cardinality(p) => {
                    let v = match *p {
                        "resource_id" => r.card[0],
                        "user_id" => r.card[1],
                        _ => r.card[2],
                    };
                    (format!("cardinality/{p}"), None, Some(v))
                }
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        j.raw(",\"aggregate\":");
        for (i, (k, f, int)) in entries.iter().enumerate() {
            j.raw(if i == 0 { "{" } else { "," });
            j.str(k);
            j.raw(":");
            match (f, int) {
                (Some(v), _) => j.f64(*v),
                (_, Some(v)) => j.i64(*v),
                _ => j.raw("null"),
            }
        }
        j.raw("}");
    }
    j.raw("}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grid and the sorted list merge the same parts into the same rows, in the same
    /// (bucket, unit, group) order.
    #[test]
    fn grid_and_list_merge_alike() {
        let c = Cond::default();
        let t0 = DateTime::from_timestamp(1_767_225_600, 0).unwrap();
        let p = Plan {
            c: &c,
            meter_ids: vec![1, 2],
            unit_of: HashMap::from([(1, 0), (2, 1)]),
            res_ids: None,
            groupby: vec![GroupBy::ResourceId],
            buckets: Some((60_000_000, t0, t0 + chrono::Duration::minutes(50))),
            stddev: true,
            card_asked: [false; 3],
        };
        let mut parts = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x % 1000) as f64 / 7.0;
            let ts = micros(t0) + (x % 3_000_000_000) as i64;
            let key = (
                (ts - micros(t0)) / 60_000_000,
                (x % 2) as u32,
                (x >> 8) as u32 % 7,
            );
            let acc = Acc {
                n: 1 + (x % 3) as i64,
                sum: v,
                min: v - 1.0,
                max: v + 1.0,
                sumsq: v * v,
                first: ts,
                last: ts + 5,
            };
            parts.push((key, acc));
        }
        let mut grid = Sink::new(50, 2, 7, parts.len());
        let mut list = Sink::List(Vec::new());
        assert!(matches!(grid, Sink::Grid { .. }));
        for (k, a) in &parts {
            grid.add(k.0, k.1, k.2, a);
            list.add(k.0, k.1, k.2, a);
        }
        let (g, l) = (grid.rows(&p), list.rows(&p));
        assert_eq!(g.len(), l.len());
        assert!(g.len() > 500, "{} rows", g.len());
        let mut total = 0;
        for (a, b) in g.iter().zip(&l) {
            assert_eq!(
                (a.bucket, a.unit, a.gid, a.count, a.first, a.last),
                (b.bucket, b.unit, b.gid, b.count, b.first, b.last)
            );
            assert_eq!((a.min, a.max), (b.min, b.max));
            assert!((a.sum - b.sum).abs() < 1e-9 * a.sum.abs().max(1.0));
            total += a.count;
        }
        assert_eq!(total, parts.iter().map(|(_, a)| a.n).sum::<i64>());
        assert!(
            g.windows(2)
                .all(|w| (w[0].bucket, w[0].unit, w[0].gid) < (w[1].bucket, w[1].unit, w[1].gid))
        );
    }
}
