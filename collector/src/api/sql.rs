//! SQL building: conditions as clauses, filters resolved to integer ids.

use std::collections::HashMap;

use sqlx::{Postgres, QueryBuilder, Row};

use super::Api;
use super::error::ApiError;
use super::query::Cond;

/// Appends ` and …` clauses for `c` (aliases: `s` sample, `m` meter, `r` resource).
pub(super) fn push_cond(qb: &mut QueryBuilder<Postgres>, c: &Cond, samples: bool) {
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

/// A meter's columns.
pub(super) struct MeterInfo {
    pub(super) name: String,
    pub(super) kind: String,
    pub(super) unit: String,
}

/// The conditions of `c` on the attribution (resource, project, user, source, metadata).
pub(super) fn resource_part(c: &Cond) -> Cond {
    Cond {
        resource: c.resource.clone(),
        project: c.project.clone(),
        user: c.user.clone(),
        source: c.source.clone(),
        metadata: c.metadata.clone(),
        ..Cond::default()
    }
}

/// The resource-level part of `c` (resource, project, user, source, metadata), if any.
pub(super) fn resource_level(c: &Cond) -> Option<Cond> {
    let r = resource_part(c);
    (r.resource.is_some()
        || r.project.is_some()
        || r.user.is_some()
        || r.source.is_some()
        || !r.metadata.is_empty())
    .then_some(r)
}

/// The sample-level part of `c`: time bounds and a sample key.
pub(super) fn sample_level(c: &Cond) -> Cond {
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
pub(super) async fn meters_named(
    api: &Api,
    name: Option<&str>,
) -> Result<HashMap<i32, MeterInfo>, ApiError> {
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
pub(super) async fn resource_ids(api: &Api, c: &Cond) -> Result<Option<Vec<i32>>, ApiError> {
    let Some(rc) = resource_level(c) else {
        return Ok(None);
    };
    let mut qb = QueryBuilder::new("select r.id from resource r where true");
    push_cond(&mut qb, &rc, false);
    let ids: Vec<i32> = qb.build_query_scalar().fetch_all(&api.pool).await?;
    Ok(Some(ids))
}

/// `and <col> = $n` for one id, `and <col> = any($n)` for several.
pub(super) fn push_ids(qb: &mut QueryBuilder<Postgres>, col: &str, ids: &[i32]) {
    if let [one] = ids {
        qb.push(format!(" and {col} = "));
        qb.push_bind(*one);
    } else {
        qb.push(format!(" and {col} = any("));
        qb.push_bind(ids.to_vec());
        qb.push(")");
    }
}

/// The meters and (when `c` filters on them) the resources `c` names, as integer ids;
/// `None` when nothing can match. The two lookups run concurrently.
pub(super) async fn lookups(
    api: &Api,
    c: &Cond,
) -> Result<Option<(HashMap<i32, MeterInfo>, Option<Vec<i32>>)>, ApiError> {
    let (meters, res_ids) =
        tokio::try_join!(meters_named(api, c.meter.as_deref()), resource_ids(api, c))?;
    let none = meters.is_empty() || res_ids.as_ref().is_some_and(Vec::is_empty);
    Ok((!none).then_some((meters, res_ids)))
}
