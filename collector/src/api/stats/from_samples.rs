//! Statistics from the samples: one SQL statement over the narrow sample table.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::types::PgInterval;
use sqlx::{QueryBuilder, Row};

use super::plan::{GroupBy, RESOURCE_GROUPS};
use super::{Groups, Plan, StatRow, micros, rank_groups};
use crate::api::Api;
use crate::api::error::ApiError;
use crate::api::sql::{push_cond, push_ids, sample_level};

/// One statement over the sample table, grouped by unit, the `groupby` fields and, with a
/// period, the time bucket.
///
/// The meter and the resource-level filters are already integer ids; the statement reads
/// only the sample table (an index-only scan for one series) and joins the resource table
/// only when a `groupby` field or a cardinality needs one of its columns. Buckets are
/// `date_bin(period, ts, t0)`.
pub(super) async fn from_samples(
    api: &Api,
    p: &Plan<'_>,
) -> Result<(Vec<StatRow>, Groups), ApiError> {
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
