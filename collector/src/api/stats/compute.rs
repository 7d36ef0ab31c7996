//! Statistics computed in Rust from whichever layout holds each hour, in one summation
//! order (issue 18, docs/design-compaction.md).
//!
//! An hour's samples live in one of three places, told apart by two watermarks read in
//! one snapshot: before the compaction watermark `C` in `sample_hour` (decoded here);
//! from `C` to the rollup watermark `R` in the narrow table, with their per-minute
//! aggregates in `sample_rollup` (a sparse hour's row has none: its samples are read);
//! from `R` on in the narrow table only.
//!
//! A request is computed in one of two modes:
//! - **minutes** when every bucket bound is a whole minute (the period a multiple of 60 s,
//!   the buckets and the time bounds on minutes): the parts are per-minute aggregates
//!   (rollup rows; for a compacted hour and an hour not rolled up yet the same aggregates
//!   computed from its samples, bit for bit, by [`rollup::minutes_of`]), or for a sparse
//!   series-hour (fewer than two samples per minute, the rollup job's rule) its samples;
//! - **samples** otherwise: every sample in the range is a part.
//!
//! Every part is added to its (bucket, unit, group) in one order, whatever layout it came
//! from: by series (meter id, attribution id), then time. So an answer is the same bytes
//! before and after its hours are rolled up and compacted: the same doubles, added in the
//! same order. (An hour still open can change from sparse to dense as samples arrive.)
//! Memory: the compacted and rollup rows of the range (≈ 9 and 8 B per sample), the parts
//! of one narrow sample at a time, and one accumulator per (bucket, unit, group).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row, Transaction};

use super::plan::{GroupBy, RESOURCE_GROUPS};
use super::{Groups, Plan, StatRow, from_micros, micros, rank_groups};
use crate::api::Api;
use crate::api::error::ApiError;
use crate::api::sql::push_ids;
use crate::store::rollup::WINDOW_US;
use crate::store::{hourcodec, rollup};

/// One hour, µs.
const HOUR_US: i64 = 3_600_000_000;

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
            // Stable: the parts of one key stay in the order they were added.
            parts.sort_by_key(|(k, _)| *k);
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

/// Which parts a request is computed from (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Mode {
    Minutes,
    Samples,
}

impl Mode {
    /// The `path` label of `vmeter_api_statistics_total`.
    pub(super) fn label(self) -> &'static str {
        match self {
            Mode::Minutes => "rollup",
            Mode::Samples => "samples",
        }
    }
}

/// What a request selects, its conditions folded in: meters, attributions (`None`: every
/// one), the time range `[a, b)` in µs, and the mode.
#[derive(Debug, PartialEq)]
struct Selection {
    meters: Vec<i32>,
    rints: Option<Vec<i32>>,
    a: i64,
    b: i64,
    mode: Mode,
}

/// The selection of `p`. Timestamps have µs precision, so `gt t` is `ge t + 1 µs` and
/// `le t` is `lt t + 1 µs`; a sample key narrows all three.
fn selection(p: &Plan<'_>) -> Selection {
    let c = p.c;
    let (mut a, mut b) = (i64::MIN, i64::MAX);
    let mut meters = p.meter_ids.clone();
    let mut rints = p.res_ids.clone();
    if let Some(t) = c.ge {
        a = a.max(micros(t));
    }
    if let Some(t) = c.gt {
        a = a.max(micros(t).saturating_add(1));
    }
    if let Some(t) = c.lt {
        b = b.min(micros(t));
    }
    if let Some(t) = c.le {
        b = b.min(micros(t).saturating_add(1));
    }
    if let Some((m, r, t)) = c.sample {
        meters.retain(|x| *x == m);
        rints = Some(match rints {
            Some(ids) => ids.into_iter().filter(|x| *x == r).collect(),
            None => vec![r],
        });
        a = a.max(micros(t));
        b = b.min(micros(t).saturating_add(1));
    }
    let on_minute = |t: i64| t == i64::MIN || t == i64::MAX || t.rem_euclid(WINDOW_US) == 0;
    let mut minutes = on_minute(a) && on_minute(b);
    if let Some((us, t0, end)) = p.buckets {
        minutes &= us % WINDOW_US == 0 && on_minute(micros(t0));
        a = a.max(micros(t0));
        b = b.min(micros(end));
    }
    Selection {
        meters,
        rints,
        a,
        b,
        mode: if minutes {
            Mode::Minutes
        } else {
            Mode::Samples
        },
    }
}

/// Each attribution's group and, for the cardinalities, its resource, user and project.
struct Attributions {
    /// Sorted attribution ids.
    rints: Vec<i32>,
    gid: Vec<u32>,
    names: Vec<[Option<String>; 3]>,
}

impl Attributions {
    fn at(&self, rint: i32) -> Option<usize> {
        self.rints.binary_search(&rint).ok()
    }
}

/// The groups of every attribution of the selected series (one group, no names, when
/// neither a `groupby` nor a cardinality needs the resource table).
async fn attributions(
    tx: &mut Transaction<'_, Postgres>,
    p: &Plan<'_>,
    sel: &Selection,
) -> Result<(Attributions, Groups), ApiError> {
    let none = Attributions {
        rints: Vec::new(),
        gid: Vec::new(),
        names: Vec::new(),
    };
    if p.groupby.is_empty() && !p.card_asked.iter().any(|a| *a) {
        return Ok((none, vec![Vec::new()]));
    }
    let mut qb = QueryBuilder::new(format!(
        "select r.id, r.resource_id, r.user_id, r.project_id, {} from resource r
         where r.id in (select s.resource_id from series s where true",
        RESOURCE_GROUPS.map(|(_, expr)| expr).join(", ")
    ));
    push_ids(&mut qb, "s.meter_id", &sel.meters);
    qb.push(")");
    if let Some(ids) = &sel.rints {
        push_ids(&mut qb, "r.id", ids);
    }
    qb.push(" order by r.id");
    let rows = qb.build().fetch_all(&mut **tx).await?;
    let mut out = none;
    let mut keys = Vec::with_capacity(rows.len());
    for r in &rows {
        out.rints.push(r.try_get(0)?);
        out.names
            .push([r.try_get(1)?, r.try_get(2)?, r.try_get(3)?]);
        let mut k = Vec::with_capacity(p.groupby.len());
        for g in &p.groupby {
            k.push(match g {
                GroupBy::ResourceId => r.try_get::<Option<String>, _>(1)?,
                GroupBy::Resource(i) => r.try_get::<Option<String>, _>(4 + i)?,
            });
        }
        keys.push(k);
    }
    let (groups, rank) = rank_groups(keys);
    out.gid = rank;
    Ok((out, groups))
}

/// One closed hour of one series, read before the narrow samples are streamed.
enum Hour {
    /// A compacted row: its index among the `sample_hour` rows read.
    Compacted(usize),
    /// A rollup row with minutes: its index among the `sample_rollup` rows read.
    Rolled(usize),
    /// A sparse rolled-up hour's samples, in time order.
    Sparse(Vec<(i64, f64)>),
}

struct Item {
    meter: i32,
    rint: i32,
    /// The hour's start, µs.
    hour: i64,
    what: Hour,
}

/// Where the parts go: the accumulators, and the attributions seen per cell for the
/// cardinalities.
struct Merge<'a> {
    p: &'a Plan<'a>,
    sel: &'a Selection,
    attrs: &'a Attributions,
    sink: Sink,
    /// (bucket, unit, group, attribution index) of the parts, when a cardinality is asked.
    seen: Option<Vec<(i64, u32, u32, u32)>>,
    t0: i64,
    period: i64,
}

impl Merge<'_> {
    /// Adds `x`, a part of series (`meter`, `rint`) whose bucket is that of time `t`.
    #[inline]
    fn part(&mut self, meter: i32, rint: i32, t: i64, x: &Acc) {
        let unit = self.p.unit_of.get(&meter).copied().unwrap_or(0);
        let at = self.attrs.at(rint);
        let gid = at.map_or(0, |i| self.attrs.gid[i]);
        let k = if self.p.buckets.is_some() {
            (t - self.t0) / self.period
        } else {
            0
        };
        self.sink.add(k, unit, gid, x);
        if let (Some(seen), Some(i)) = (&mut self.seen, at) {
            let key = (k, unit, gid, i as u32);
            if seen.last() != Some(&key) {
                seen.push(key);
            }
        }
    }

    fn sample(&mut self, meter: i32, rint: i32, ts: i64, v: f64) {
        if ts < self.sel.a || ts >= self.sel.b {
            return;
        }
        let x = Acc {
            n: 1,
            sum: v,
            min: v,
            max: v,
            sumsq: v * v,
            first: ts,
            last: ts,
        };
        self.part(meter, rint, ts, &x);
    }

    fn minute(&mut self, meter: i32, rint: i32, hour: i64, m: &rollup::Minute) {
        let w = hour + i64::from(m.minute) * WINDOW_US;
        if w < self.sel.a || w >= self.sel.b {
            return;
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
        self.part(meter, rint, w, &x);
    }

    /// The parts of one series-hour's samples (in time order): in minutes mode what the
    /// rollup job makes of the hour, its minutes, or for a sparse series (fewer than two
    /// samples per minute) the samples themselves; else the samples.
    fn hour(&mut self, meter: i32, rint: i32, hour: i64, samples: &[(i64, f64)]) {
        if self.sel.mode == Mode::Minutes {
            let minutes = rollup::minutes_of(hour, samples);
            if samples.len() >= 2 * minutes.len() {
                for m in &minutes {
                    self.minute(meter, rint, hour, m);
                }
                return;
            }
        }
        for &(ts, v) in samples {
            self.sample(meter, rint, ts, v);
        }
    }

    fn item(&mut self, it: &Item, compacted: &[PgRow], rolled: &[PgRow]) -> Result<(), ApiError> {
        match &it.what {
            Hour::Compacted(i) => {
                let samples = decode(&compacted[*i], it)?;
                self.hour(it.meter, it.rint, it.hour, &samples);
            }
            Hour::Rolled(i) => {
                let data: &[u8] = rolled[*i].try_get_unchecked(3)?;
                for m in rollup::unpack(data) {
                    self.minute(it.meter, it.rint, it.hour, &m);
                }
            }
            Hour::Sparse(samples) => {
                for &(ts, v) in samples {
                    self.sample(it.meter, it.rint, ts, v);
                }
            }
        }
        Ok(())
    }

    /// The rows, with the cardinalities counted (distinct non-null names per cell).
    fn rows(self) -> Vec<StatRow> {
        let mut card: HashMap<(i64, u32, u32), [i64; 3]> = HashMap::new();
        if let Some(mut seen) = self.seen {
            seen.sort_unstable();
            seen.dedup();
            for cell in seen.chunk_by(|x, y| x.0 == y.0 && x.1 == y.1 && x.2 == y.2) {
                let mut counts = [0i64; 3];
                for (col, n) in counts.iter_mut().enumerate() {
                    let mut names: Vec<&str> = cell
                        .iter()
                        .filter_map(|x| self.attrs.names[x.3 as usize][col].as_deref())
                        .collect();
                    names.sort_unstable();
                    names.dedup();
                    *n = names.len() as i64;
                }
                card.insert((cell[0].0, cell[0].1, cell[0].2), counts);
            }
        }
        let mut rows = self.sink.rows(self.p);
        if !card.is_empty() {
            for r in &mut rows {
                let k = r.bucket.map_or(0, |b| (b - self.t0) / self.period);
                if let Some(c) = card.get(&(k, r.unit, r.gid)) {
                    r.card = *c;
                }
            }
        }
        rows
    }
}

/// A compacted row's samples, `(µs, volume)` in time order; a row that does not decode is
/// an error naming it (the answer would be wrong without it).
fn decode(row: &PgRow, it: &Item) -> Result<Vec<(i64, f64)>, ApiError> {
    let (ts, v): (&[u8], &[u8]) = (row.try_get_unchecked(3)?, row.try_get_unchecked(4)?);
    match (
        hourcodec::decode_timestamps(ts),
        hourcodec::decode_volumes(v),
    ) {
        (Ok(ts), Ok(v)) if ts.len() == v.len() => Ok(ts.into_iter().zip(v).collect()),
        (t, v) => Err(ApiError::Internal(format!(
            "compacted hour (meter {}, attribution {}, {}) does not decode: timestamps {:?}, volumes {:?}",
            it.meter,
            it.rint,
            from_micros(it.hour),
            t.map(|x| x.len()),
            v.map(|x| x.len())
        ))),
    }
}

/// `and hour > a - 1 h and hour < b` (the hours that overlap `[a, b)`).
fn push_hours(qb: &mut QueryBuilder<Postgres>, sel: &Selection) {
    if sel.a > i64::MIN {
        qb.push(" and hour > ");
        qb.push_bind(from_micros(sel.a.saturating_sub(HOUR_US)));
    }
    if sel.b < i64::MAX {
        qb.push(" and hour < ");
        qb.push_bind(from_micros(sel.b));
    }
}

fn push_series(qb: &mut QueryBuilder<Postgres>, col: &str, sel: &Selection) {
    push_ids(qb, &format!("{col}meter_id"), &sel.meters);
    if let Some(ids) = &sel.rints {
        push_ids(qb, &format!("{col}resource_id"), ids);
    }
}

/// The statistics rows of `p` and its groups, and the mode that computed them.
pub(super) async fn compute(
    api: &Api,
    p: &Plan<'_>,
) -> Result<(Vec<StatRow>, Groups, Mode), ApiError> {
    let sel = selection(p);
    if sel.a >= sel.b || sel.meters.is_empty() || sel.rints.as_ref().is_some_and(Vec::is_empty) {
        return Ok((Vec::new(), Vec::new(), sel.mode));
    }
    // One snapshot for every statement: the rollup and compaction jobs commit their rows
    // and watermarks together.
    let mut tx = api.pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    let (r, c): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "select (select watermark from rollup_state), (select watermark from compaction_state)",
    )
    .fetch_one(&mut *tx)
    .await?;
    let compacted_to = c.map_or(i64::MIN, micros);
    let rolled_to = r.map_or(i64::MIN, micros).max(compacted_to);
    let (attrs, groups) = attributions(&mut tx, p, &sel).await?;

    // The closed hours: compacted rows, and in minutes mode the rollup rows after them.
    let mut items: Vec<Item> = Vec::new();
    let mut compacted: Vec<PgRow> = Vec::new();
    if sel.a < compacted_to {
        let mut qb = QueryBuilder::new(
            "select meter_id, resource_id, hour, ts, v from sample_hour where hour < ",
        );
        qb.push_bind(from_micros(compacted_to));
        push_hours(&mut qb, &sel);
        push_series(&mut qb, "", &sel);
        compacted = qb.build().fetch_all(&mut *tx).await?;
        for (i, row) in compacted.iter().enumerate() {
            items.push(Item {
                meter: row.try_get_unchecked(0)?,
                rint: row.try_get_unchecked(1)?,
                hour: micros(row.try_get_unchecked(2)?),
                what: Hour::Compacted(i),
            });
        }
    }
    let mut rolled: Vec<PgRow> = Vec::new();
    let narrow_from = match sel.mode {
        Mode::Samples => compacted_to,
        Mode::Minutes => rolled_to,
    };
    if sel.mode == Mode::Minutes && sel.a < rolled_to && sel.b > compacted_to {
        let mut qb = QueryBuilder::new(
            "select meter_id, resource_id, hour, minutes from sample_rollup where hour < ",
        );
        qb.push_bind(from_micros(rolled_to));
        if compacted_to > i64::MIN {
            qb.push(" and hour >= ");
            qb.push_bind(from_micros(compacted_to));
        }
        push_hours(&mut qb, &sel);
        push_series(&mut qb, "", &sel);
        let mut sparse: Vec<(i32, i32, DateTime<Utc>)> = Vec::new();
        for row in qb.build().fetch_all(&mut *tx).await? {
            let (meter, rint, hour) = (
                row.try_get_unchecked(0)?,
                row.try_get_unchecked(1)?,
                row.try_get_unchecked::<DateTime<Utc>, _>(2)?,
            );
            if row.try_get_unchecked::<Option<&[u8]>, _>(3)?.is_some() {
                items.push(Item {
                    meter,
                    rint,
                    hour: micros(hour),
                    what: Hour::Rolled(rolled.len()),
                });
                rolled.push(row);
            } else {
                sparse.push((meter, rint, hour));
            }
        }
        if !sparse.is_empty() {
            sparse_hours(&mut tx, &sel, &sparse, &mut items).await?;
        }
    }
    // Series, then time: each source's rows are sorted alike, and their hours are disjoint.
    items.sort_by_key(|it| (it.meter, it.rint, it.hour));

    let (t0, period) = p
        .buckets
        .map_or((0, i64::MAX), |(us, t0, _)| (micros(t0), us));
    let buckets = match p.buckets {
        Some(_) => (sel.b - t0 + period - 1) / period,
        None => 1,
    };
    let units = p.unit_of.values().max().map_or(1, |u| *u as usize + 1);
    let mut expected = 0usize;
    for it in &items {
        expected += match &it.what {
            Hour::Compacted(i) => {
                let n: usize = compacted[*i]
                    .try_get_unchecked::<&[u8], _>(3)?
                    .get(1..5)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
                if sel.mode == Mode::Minutes { n / 6 } else { n }
            }
            Hour::Rolled(i) => rollup::minutes_in(rolled[*i].try_get_unchecked::<&[u8], _>(3)?),
            Hour::Sparse(s) => s.len(),
        };
    }
    let mut m = Merge {
        p,
        sel: &sel,
        attrs: &attrs,
        sink: Sink::new(buckets, units, groups.len(), expected),
        seen: p.card_asked.iter().any(|a| *a).then(Vec::new),
        t0,
        period,
    };

    // The narrow samples from `narrow_from` on, in series and time order, merged with the
    // closed hours: a series' closed hours come before its narrow samples. In minutes mode
    // they are read by whole hours and taken an hour at a time, as the rollup job and a
    // compacted hour take them: an answer does not change when an hour is rolled up.
    let mut next = 0;
    let (mut lo, mut hi) = (sel.a.max(narrow_from), sel.b);
    if sel.mode == Mode::Minutes {
        lo = lo.saturating_sub(lo.rem_euclid(HOUR_US)).max(narrow_from);
        hi = hi.saturating_add((HOUR_US - hi.rem_euclid(HOUR_US)) % HOUR_US);
    }
    if lo < hi {
        let mut qb = QueryBuilder::new(
            "select s.meter_id, s.resource_id, s.ts, s.volume from sample s where true",
        );
        if lo > i64::MIN {
            qb.push(" and s.ts >= ");
            qb.push_bind(from_micros(lo));
        }
        if hi < i64::MAX {
            qb.push(" and s.ts < ");
            qb.push_bind(from_micros(hi));
        }
        push_series(&mut qb, "s.", &sel);
        qb.push(" order by s.meter_id, s.resource_id, s.ts");
        let mut rows = qb.build().fetch(&mut *tx);
        // The series-hour being gathered (minutes mode).
        let mut open: Option<(i32, i32, i64)> = None;
        let mut hour: Vec<(i64, f64)> = Vec::new();
        while let Some(r) = rows.try_next().await? {
            let (meter, rint): (i32, i32) = (r.try_get_unchecked(0)?, r.try_get_unchecked(1)?);
            let (ts, v) = (micros(r.try_get_unchecked(2)?), r.try_get_unchecked(3)?);
            let key = (meter, rint, ts - ts.rem_euclid(HOUR_US));
            if open != Some(key) {
                if let Some((om, or, oh)) = open.take() {
                    m.hour(om, or, oh, &hour);
                    hour.clear();
                }
                while let Some(it) = items
                    .get(next)
                    .filter(|it| (it.meter, it.rint) <= (meter, rint))
                {
                    m.item(it, &compacted, &rolled)?;
                    next += 1;
                }
                open = Some(key);
            }
            if sel.mode == Mode::Samples {
                m.sample(meter, rint, ts, v);
            } else {
                hour.push((ts, v));
            }
        }
        if let Some((om, or, oh)) = open {
            m.hour(om, or, oh, &hour);
        }
    }
    for it in &items[next..] {
        m.item(it, &compacted, &rolled)?;
    }
    drop((compacted, rolled));
    tx.commit().await?;
    let rows = m.rows();
    Ok((rows, groups, sel.mode))
}

/// The samples of sparse rolled-up hours (rollup rows without minutes), as items.
async fn sparse_hours(
    tx: &mut Transaction<'_, Postgres>,
    sel: &Selection,
    hours: &[(i32, i32, DateTime<Utc>)],
    items: &mut Vec<Item>,
) -> Result<(), ApiError> {
    let mut qb =
        QueryBuilder::new("select s.meter_id, s.resource_id, u.h, s.ts, s.volume from unnest(");
    qb.push_bind(hours.iter().map(|x| x.0).collect::<Vec<i32>>());
    qb.push("::int4[], ");
    qb.push_bind(hours.iter().map(|x| x.1).collect::<Vec<i32>>());
    qb.push("::int4[], ");
    qb.push_bind(hours.iter().map(|x| x.2).collect::<Vec<DateTime<Utc>>>());
    qb.push(
        "::timestamptz[]) as u(m, r, h) join sample s on s.meter_id = u.m and s.resource_id = u.r
         and s.ts >= u.h and s.ts < u.h + interval '1 hour'",
    );
    if sel.a > i64::MIN {
        qb.push(" and s.ts >= ");
        qb.push_bind(from_micros(sel.a));
    }
    if sel.b < i64::MAX {
        qb.push(" and s.ts < ");
        qb.push_bind(from_micros(sel.b));
    }
    qb.push(" order by s.meter_id, s.resource_id, s.ts");
    let mut rows = qb.build().fetch(&mut **tx);
    while let Some(r) = rows.try_next().await? {
        let (meter, rint): (i32, i32) = (r.try_get_unchecked(0)?, r.try_get_unchecked(1)?);
        let hour = micros(r.try_get_unchecked(2)?);
        let x = (micros(r.try_get_unchecked(3)?), r.try_get_unchecked(4)?);
        match items.last_mut() {
            Some(Item {
                meter: m,
                rint: ri,
                hour: h,
                what: Hour::Sparse(v),
            }) if (*m, *ri, *h) == (meter, rint, hour) => v.push(x),
            _ => items.push(Item {
                meter,
                rint,
                hour,
                what: Hour::Sparse(vec![x]),
            }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::query::Cond;
    use std::collections::HashMap;

    /// The grid and the sorted list merge the same parts into the same rows (the same
    /// doubles), in the same (bucket, unit, group) order.
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
            // The same doubles: a list keeps the parts of one key in the order added.
            assert_eq!(
                (a.min, a.max, a.sum.to_bits(), a.sumsq.to_bits()),
                (b.min, b.max, b.sum.to_bits(), b.sumsq.to_bits())
            );
            total += a.count;
        }
        assert_eq!(total, parts.iter().map(|(_, a)| a.n).sum::<i64>());
        assert!(
            g.windows(2)
                .all(|w| (w[0].bucket, w[0].unit, w[0].gid) < (w[1].bucket, w[1].unit, w[1].gid))
        );
    }
}
