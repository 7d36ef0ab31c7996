//! Sample endpoints: `GET /v2/meters/{meter}`, `GET /v2/samples`, `GET /v2/samples/{id}`.

use std::collections::HashMap;

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use sqlx::{PgPool, Postgres, QueryBuilder, Row};

use super::Api;
use super::auth::Caller;
use super::error::ApiError;
use super::ids::{parse_named_sample_id, parse_sample_id};
use super::query::{Cond, Fields, limit, request};
use super::shape::{Field, NEW_SAMPLE, OLD_SAMPLE, ResInfo, SampleRow, flat, write_row};
use super::sql::{MeterInfo, lookups, push_cond, push_ids, sample_level};
use super::stream::{CHUNK, Chunk, chunked, json_bytes};
use crate::jsonw;
use crate::jsonw::JsonBuf;
use crate::store::hourcodec;
use crate::store::rollup::floor_hour;

/// Samples plus the meters and resources they refer to.
#[derive(Default)]
pub(super) struct Fetched {
    pub(super) rows: Vec<SampleRow>,
    pub(super) meters: HashMap<i32, MeterInfo>,
    pub(super) res: HashMap<i32, ResInfo>,
}

impl Fetched {
    /// Rows with their meter and resource; a row whose resource was pruned between the
    /// queries (retention running concurrently) is left out rather than failing the request.
    pub(super) fn joined(&self) -> impl Iterator<Item = (&SampleRow, &MeterInfo, &ResInfo)> {
        self.rows
            .iter()
            .filter_map(|s| Some((s, self.meters.get(&s.meter_id)?, self.res.get(&s.rint)?)))
    }

    /// The first row alone in the v2 Sample shape (`GET /v2/samples/{id}`), if any.
    pub(super) fn first_new_json(&self) -> Option<Vec<u8>> {
        let row = self.joined().next()?;
        let mut j = JsonBuf::with_capacity(1024);
        write_row(&mut j, NEW_SAMPLE, &row);
        Some(j.buf)
    }

    /// The rows as a JSON array in `shape`, written on a blocking thread in chunks that
    /// are sent as they are written: sending 10,000 samples (~7 MB) overlaps writing them
    /// instead of following it.
    pub(super) async fn stream(
        self,
        shape: &'static [(&'static str, Field)],
    ) -> Result<Response, ApiError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
        tokio::task::spawn_blocking(move || {
            let mut a = jsonw::ArrayChunks::new(CHUNK);
            for row in self.joined() {
                if let Some(c) = a.item(|j| write_row(j, shape, &row))
                    && tx.blocking_send(Ok((c, false))).is_err()
                {
                    return; // the client left
                }
            }
            let _ = tx.blocking_send(Ok((a.finish(), true)));
        });
        chunked(rx).await
    }
}

/// The sample query of `c`: the narrow table alone, meters and resources as integer ids,
/// newest first (ties by meter and attribution id: the same order as [`compacted_samples`]),
/// from `from` on (the compaction watermark: the hours before it are read compacted).
pub(super) fn sample_query(
    c: &Cond,
    meters: &HashMap<i32, MeterInfo>,
    res_ids: Option<&[i32]>,
    limit: i64,
    from: Option<DateTime<Utc>>,
) -> QueryBuilder<Postgres> {
    let mut qb = QueryBuilder::new(
        "select s.ts, s.volume, s.meter_id, s.resource_id from sample s where true",
    );
    if let Some(from) = from {
        qb.push(" and s.ts >= ");
        qb.push_bind(from);
    }
    if c.meter.is_some() {
        let mut ids: Vec<i32> = meters.keys().copied().collect();
        ids.sort_unstable();
        push_ids(&mut qb, "s.meter_id", &ids);
    }
    if let Some(ids) = res_ids {
        push_ids(&mut qb, "s.resource_id", ids);
    }
    push_cond(&mut qb, &sample_level(c), true);
    qb.push(" order by s.ts desc, s.meter_id, s.resource_id limit ");
    qb.push_bind(limit);
    qb
}

/// `compaction_state.watermark`: the hours before it are read from `sample_hour` (`None`:
/// nothing is compacted; the narrow table holds everything).
pub(super) async fn compacted_before(pool: &PgPool) -> Result<Option<DateTime<Utc>>, ApiError> {
    Ok(
        sqlx::query_scalar("select watermark from compaction_state where singleton")
            .fetch_one(pool)
            .await?,
    )
}

/// Whether `t` keeps the time bounds and sample key of `c`.
fn keeps(c: &Cond, meter: i32, rint: i32, t: DateTime<Utc>) -> bool {
    c.ge.is_none_or(|b| t >= b)
        && c.gt.is_none_or(|b| t > b)
        && c.le.is_none_or(|b| t <= b)
        && c.lt.is_none_or(|b| t < b)
        && c.sample
            .is_none_or(|(m, r, k)| m == meter && r == rint && k == t)
}

/// The samples of compacted hours (before `wm`) that `c` selects, newest first (ties by
/// meter and attribution id), at most `limit`: the `sample_hour` rows of the meters and
/// attributions whose hours overlap the range, read newest hour first and decoded here, until
/// a whole hour has been read past `limit` samples.
pub(super) async fn compacted_samples(
    pool: &PgPool,
    c: &Cond,
    meters: &HashMap<i32, MeterInfo>,
    res_ids: Option<&[i32]>,
    wm: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<SampleRow>, ApiError> {
    let mut out: Vec<SampleRow> = Vec::new();
    if limit <= 0 {
        return Ok(out);
    }
    let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
        "select h.meter_id, h.resource_id, h.hour, h.ts, h.v from sample_hour h where h.hour < ",
    );
    qb.push_bind(wm);
    if c.meter.is_some() {
        let mut ids: Vec<i32> = meters.keys().copied().collect();
        ids.sort_unstable();
        push_ids(&mut qb, "h.meter_id", &ids);
    }
    if let Some(ids) = res_ids {
        push_ids(&mut qb, "h.resource_id", ids);
    }
    if let Some((m, r, t)) = c.sample {
        qb.push(" and h.meter_id = ");
        qb.push_bind(m);
        qb.push(" and h.resource_id = ");
        qb.push_bind(r);
        qb.push(" and h.hour = ");
        qb.push_bind(floor_hour(t));
    }
    if let Some(start) = c.start() {
        qb.push(" and h.hour >= ");
        qb.push_bind(floor_hour(start));
    }
    if let Some(end) = c.end() {
        qb.push(" and h.hour <= ");
        qb.push_bind(end);
    }
    qb.push(" order by h.hour desc");
    let mut rows = qb.build().fetch(pool);
    let mut hour: Vec<SampleRow> = Vec::new();
    let mut current: Option<DateTime<Utc>> = None;
    let flush = |hour: &mut Vec<SampleRow>, out: &mut Vec<SampleRow>| {
        hour.sort_unstable_by(|a, b| {
            b.ts.cmp(&a.ts)
                .then(a.meter_id.cmp(&b.meter_id))
                .then(a.rint.cmp(&b.rint))
        });
        out.append(hour);
    };
    while let Some(row) = rows.next().await {
        let row = row?;
        let (meter, rint, h): (i32, i32, DateTime<Utc>) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if current != Some(h) {
            flush(&mut hour, &mut out);
            if out.len() as i64 >= limit {
                break;
            }
            current = Some(h);
        }
        let (ts, v): (&[u8], &[u8]) = (row.try_get(3)?, row.try_get(4)?);
        let (Ok(ts), Ok(v)) = (
            hourcodec::decode_timestamps(ts),
            hourcodec::decode_volumes(v),
        ) else {
            return Err(ApiError::Internal(format!(
                "compacted hour ({meter}, {rint}, {h}) does not decode"
            )));
        };
        for (us, volume) in ts.into_iter().zip(v) {
            let Some(t) = DateTime::from_timestamp_micros(us) else {
                continue;
            };
            if keeps(c, meter, rint, t) {
                hour.push(SampleRow {
                    ts: t,
                    volume,
                    meter_id: meter,
                    rint,
                });
            }
        }
    }
    flush(&mut hour, &mut out);
    out.truncate(limit as usize);
    Ok(out)
}

pub(super) fn sample_row(r: &sqlx::postgres::PgRow) -> Result<SampleRow, sqlx::Error> {
    Ok(SampleRow {
        ts: r.try_get(0)?,
        volume: r.try_get(1)?,
        meter_id: r.try_get(2)?,
        rint: r.try_get(3)?,
    })
}

/// Samples matching `c`, newest first. Meter and resource conditions are resolved to
/// integer ids first, so the sample query reads the narrow table alone: for one meter of
/// one resource that is an index-only scan of the primary key, already in time order.
pub(super) async fn fetch_samples(api: &Api, c: &Cond, limit: i64) -> Result<Fetched, ApiError> {
    match lookups(api, c).await? {
        Some((meters, res_ids)) => read_samples(api, c, limit, meters, res_ids.as_deref()).await,
        None => Ok(Fetched::default()),
    }
}

/// The samples of `c` read whole, then the resources they name.
pub(super) async fn read_samples(
    api: &Api,
    c: &Cond,
    limit: i64,
    meters: HashMap<i32, MeterInfo>,
    res_ids: Option<&[i32]>,
) -> Result<Fetched, ApiError> {
    let wm = compacted_before(&api.pool).await?;
    let rows = sample_query(c, &meters, res_ids, limit, wm)
        .build()
        .fetch_all(&api.pool)
        .await?;
    let mut rows: Vec<SampleRow> = rows
        .iter()
        .map(sample_row)
        .collect::<Result<_, sqlx::Error>>()?;
    // Older than every narrow row read: the compacted hours, newest first.
    if let Some(wm) = wm {
        let more = limit - rows.len() as i64;
        rows.extend(compacted_samples(&api.pool, c, &meters, res_ids, wm, more).await?);
    }
    let mut ids: Vec<i32> = rows.iter().map(|r| r.rint).collect();
    ids.sort_unstable();
    ids.dedup();
    let res = resources_by_id(api, &ids).await?;
    Ok(Fetched { rows, meters, res })
}

/// A list of samples matching `c` in `shape`, streamed. When the query names few
/// resources (a resource id, a project's handful), their rows are read first and each
/// sample is written as PostgreSQL sends it, each 256 KiB chunk sent as it fills: reading,
/// writing and sending overlap. Otherwise the rows are read whole first (the resources
/// to join are those the rows name), then written and sent in chunks.
///
/// Errors before the first chunk are answered with their status; a database error
/// after it (rare: the statement is already running) aborts the body, so the client
/// sees a cut answer, never a short valid one.
pub(super) async fn sample_list(
    api: &Api,
    c: Cond,
    limit: i64,
    shape: &'static [(&'static str, Field)],
) -> Result<Response, ApiError> {
    let Some((meters, res_ids)) = lookups(api, &c).await? else {
        return Ok(json_bytes(b"[]".to_vec()));
    };
    let ids = match res_ids {
        Some(ids) if ids.len() <= 64 => ids,
        other => {
            let f = read_samples(api, &c, limit, meters, other.as_deref()).await?;
            return f.stream(shape).await;
        }
    };
    let res = resources_by_id(api, &ids).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let pool = api.pool.clone();
    let wm = compacted_before(&pool).await?;
    tokio::spawn(async move {
        let mut qb = sample_query(&c, &meters, Some(&ids), limit, wm);
        let mut rows = qb.build().fetch(&pool);
        let mut a = jsonw::ArrayChunks::new(CHUNK);
        let mut sent = 0i64;
        // A resource pruned meanwhile (retention) is left out, as in `Fetched::joined`.
        macro_rules! send {
            ($row:expr) => {
                let row = $row;
                if let (Some(m), Some(r)) = (meters.get(&row.meter_id), res.get(&row.rint)) {
                    if let Some(chunk) = a.item(|j| write_row(j, shape, &(&row, m, r)))
                        && tx.send(Ok((chunk, false))).await.is_err()
                    {
                        return; // the client left
                    }
                }
            };
        }
        while let Some(row) = rows.next().await {
            let row = match row.and_then(|r| sample_row(&r)) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            sent += 1;
            send!(row);
        }
        drop(rows);
        // Older than every narrow row sent: the compacted hours, newest first.
        if let Some(wm) = wm {
            match compacted_samples(&pool, &c, &meters, Some(&ids), wm, limit - sent).await {
                Ok(more) => {
                    for row in more {
                        send!(row);
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        let _ = tx.send(Ok((a.finish(), true))).await;
    });
    chunked(rx).await
}

/// The resources with these ids, metadata flattened (Ceilometer's OldSample form) and
/// serialised once each.
pub(super) async fn resources_by_id(
    api: &Api,
    ids: &[i32],
) -> Result<HashMap<i32, ResInfo>, ApiError> {
    let res_rows = sqlx::query(
        "select id, resource_id, user_id, project_id, source, metadata from resource where id = any($1)",
    )
    .bind(ids)
    .fetch_all(&api.pool)
    .await?;
    let mut res = HashMap::with_capacity(res_rows.len());
    for r in &res_rows {
        let md = serde_json::value::to_raw_value(&flat(r.try_get(5)?))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        res.insert(
            r.try_get::<i32, _>(0)?,
            ResInfo {
                rid: r.try_get(1)?,
                user: r.try_get(2)?,
                project: r.try_get(3)?,
                source: r.try_get(4)?,
                md,
            },
        );
    }
    Ok(res)
}

pub(super) const SAMPLES: Fields = Fields {
    timestamp: true,
    meter: false,
    message_id: true,
};

/// `GET /v2/meters/{meter}`: the meter's samples, newest first, as Ceilometer's OldSample.
pub(super) async fn meter_samples(
    State(api): State<Api>,
    who: Caller,
    Path(meter): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (q, mut c) = request(&who, raw.as_deref(), &[], SAMPLES)?;
    c.meter = Some(meter);
    let limit = limit(&api, &q)?;
    sample_list(&api, c, limit, OLD_SAMPLE).await
}

/// `GET /v2/samples`: samples of any meter (`q.field=meter`), newest first.
pub(super) async fn list_samples(
    State(api): State<Api>,
    who: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let fields = Fields {
        meter: true,
        ..SAMPLES
    };
    let (q, c) = request(&who, raw.as_deref(), &[], fields)?;
    let limit = limit(&api, &q)?;
    sample_list(&api, c, limit, NEW_SAMPLE).await
}

/// `GET /v2/samples/{id}`.
pub(super) async fn one_sample(
    State(api): State<Api>,
    who: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound(format!("Sample {id} Not Found"));
    let (_, mut c) = request(&who, None, &[], SAMPLES)?;
    match (parse_sample_id(&id), parse_named_sample_id(&id)) {
        (Some(key), _) => c.sample = Some(key),
        (None, Some((meter, resource, ts))) => {
            c.meter = Some(meter);
            c.resource = Some(resource);
            c.ge = Some(ts);
            c.le = Some(ts);
        }
        (None, None) => return Err(not_found()),
    }
    let f = fetch_samples(&api, &c, 1).await?;
    Ok(json_bytes(f.first_new_json().ok_or_else(not_found)?))
}
