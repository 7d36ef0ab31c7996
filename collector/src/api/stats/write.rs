//! Statistics rows as Ceilometer's JSON.

use super::plan::Agg;
use super::{Groups, StatRow};
use crate::jsonw::JsonBuf;

/// What every statistics row is written with.
pub(super) struct StatCtx<'a> {
    pub(super) groups: &'a Groups,
    pub(super) aggs: &'a [Agg],
    pub(super) units: &'a [&'a str],
    /// `groupby` output names in JSON key order, with their index in a group's values.
    pub(super) groupby: &'a [(&'static str, usize)],
    pub(super) period_us: Option<i64>,
    pub(super) period_s: f64,
    /// The query's bounds, µs since the epoch.
    pub(super) start: Option<i64>,
    pub(super) end: Option<i64>,
}

/// One row as Ceilometer's Statistics: `max`, `min`, `sum`, `avg`, `count` (all of them, or
/// with `aggregate.func` only those asked for, plus the `aggregate` map), `duration*`
/// clamped to the query's bounds, `period*`, `unit`, `groupby`.
pub(super) fn write_stat(j: &mut JsonBuf, r: &StatRow, ctx: &StatCtx<'_>) {
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
