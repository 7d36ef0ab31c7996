//! Statistics from the per-minute rollups plus what is not rolled up yet, merged in Rust.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{Postgres, QueryBuilder, Row, Transaction};

use super::plan::{GroupBy, RESOURCE_GROUPS};
use super::{Groups, Plan, StatRow, from_micros, micros, rank_groups};
use crate::api::Api;
use crate::api::error::ApiError;
use crate::api::sql::push_ids;
use crate::store::rollup;
use crate::store::rollup::WINDOW_US;

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
pub(super) async fn from_rollups(
    api: &Api,
    p: &Plan<'_>,
) -> Result<Option<(Vec<StatRow>, Groups)>, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::query::Cond;
    use std::collections::HashMap;

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
