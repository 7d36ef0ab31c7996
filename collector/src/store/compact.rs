//! Compacted closed hours (migration 0005, docs/design-compaction.md): one `sample_hour`
//! row per (meter, attribution, UTC hour) with the hour's times and volumes as two
//! [`hourcodec`] streams.
//!
//! Invariant: for every (meter, attribution, hour) before `compaction_state.watermark`
//! that has stored samples, `sample_hour` has a row holding exactly those samples, each
//! once, in time order. It holds because:
//! - the job ([`Store::compact`]) compacts whole hours, oldest first, only hours before the
//!   rollup watermark (closed), and advances the watermark in the same transaction, under
//!   [`ROLLUP_LOCK`] exclusive: a crash anywhere leaves the watermark where the last commit
//!   put it, and the next run starts there (an hour is never half compacted);
//! - every sample write holds the same lock shared until it commits and reads the watermark
//!   after taking it; the samples it stores for hours before the watermark it merges into
//!   their rows ([`merge_late`]) after locking them, skipping times a row already has (a
//!   redelivery), so two writers of the same hour each merge into what the other committed.
//!
//! The rollup rows of a compacted hour are deleted in its transaction (the API computes
//! its per-minute aggregates from the compacted row), and the narrow partition of a day is
//! dropped once the whole day is compacted ([`DROP_MARGIN`] after). The `samples` view
//! reads the compacted rows before the watermark, the narrow ones from it on.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Transaction};

use super::hourcodec::{self, CodecError};
use super::locks;
use super::partitions::partition_days;
use super::rollup::{self, ROLLUP_LOCK, floor_hour};
use super::{Store, StoreError};

/// `compaction_state.watermark`: every hour before it is compacted (`None`: none is).
pub async fn watermark(conn: &mut PgConnection) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("select watermark from compaction_state where singleton")
        .fetch_one(conn)
        .await
}

/// What one [`Store::compact`] call did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompactRun {
    /// Hours compacted (one transaction each).
    pub hours: u32,
    /// Series-hours written.
    pub rows: u64,
    /// Samples compacted.
    pub samples: u64,
    /// Bytes of the two streams written.
    pub bytes: u64,
    /// The watermark afterwards.
    pub watermark: Option<DateTime<Utc>>,
    /// Whether every rolled-up hour is compacted (false: stopped at `max_hours`).
    pub caught_up: bool,
}

/// How long after the compaction watermark passes a day's end its narrow partition is
/// dropped. A reader that read the watermark (the API, in one snapshot; the `samples`
/// view, per statement) reads the narrow rows from it on: the partition must outlive any
/// such statement still running. `DROP TABLE` also waits for the statements using it.
pub const DROP_MARGIN: Duration = Duration::hours(1);

/// One series-hour, encoded.
struct Encoded {
    meter: i32,
    resource: i32,
    n: i32,
    ts: Vec<u8>,
    v: Vec<u8>,
}

fn encode(meter: i32, resource: i32, samples: &[(i64, f64)]) -> Encoded {
    let ts: Vec<i64> = samples.iter().map(|s| s.0).collect();
    let v: Vec<f64> = samples.iter().map(|s| s.1).collect();
    Encoded {
        meter,
        resource,
        n: samples.len() as i32,
        ts: hourcodec::encode_timestamps(&ts),
        v: hourcodec::encode_volumes(&v),
    }
}

fn decode(ts: &[u8], v: &[u8]) -> Result<Vec<(i64, f64)>, CodecError> {
    let t = hourcodec::decode_timestamps(ts)?;
    let v = hourcodec::decode_volumes(v)?;
    if t.len() != v.len() {
        return Err(CodecError::Truncated(t.len().max(v.len()) as u32));
    }
    Ok(t.into_iter().zip(v).collect())
}

/// `rows` (sorted by time) with `new` merged in: a time already there keeps its sample
/// (the first stored wins, as in the narrow table). Returns how many were added.
fn merge(rows: &mut Vec<(i64, f64)>, new: &[(i64, f64)]) -> usize {
    let before = rows.len();
    for &(t, v) in new {
        if let Err(at) = rows.binary_search_by_key(&t, |r| r.0) {
            rows.insert(at, (t, v));
        }
    }
    rows.len() - before
}

/// Writes `rows` into `sample_hour` for `hour` (replacing what is there).
async fn upsert(
    tx: &mut PgConnection,
    hour: &[DateTime<Utc>],
    rows: &[Encoded],
) -> Result<(), sqlx::Error> {
    let m: Vec<i32> = rows.iter().map(|r| r.meter).collect();
    let r: Vec<i32> = rows.iter().map(|r| r.resource).collect();
    let n: Vec<i32> = rows.iter().map(|r| r.n).collect();
    let ts: Vec<&[u8]> = rows.iter().map(|r| r.ts.as_slice()).collect();
    let v: Vec<&[u8]> = rows.iter().map(|r| r.v.as_slice()).collect();
    sqlx::query(
        "insert into sample_hour (meter_id, resource_id, hour, n, ts, v)
         select * from unnest($1::int4[], $2::int4[], $3::timestamptz[], $4::int4[], $5::bytea[], $6::bytea[])
         on conflict on constraint sample_hour_pkey do update
           set n = excluded.n, ts = excluded.ts, v = excluded.v",
    )
    .bind(&m)
    .bind(&r)
    .bind(hour)
    .bind(&n)
    .bind(&ts)
    .bind(&v)
    .execute(tx)
    .await?;
    Ok(())
}

/// Samples stored by a writer for hours before the compaction watermark, by (meter,
/// attribution, hour start): (µs since the epoch, volume).
pub type LateSamples = BTreeMap<(i32, i32, DateTime<Utc>), Vec<(i64, f64)>>;

/// Merges `late` into the compacted rows of their hours, inside the writer's transaction
/// (which holds [`ROLLUP_LOCK`] shared). Rows are created if missing (empty streams) and
/// locked in key order before they are read, so a concurrent writer's merge is in what this
/// one reads. Returns the samples added (a time already in the row is a redelivery: skipped).
pub async fn merge_late(
    tx: &mut Transaction<'_, Postgres>,
    late: &LateSamples,
) -> Result<u64, StoreError> {
    if late.is_empty() {
        return Ok(0);
    }
    let m: Vec<i32> = late.keys().map(|k| k.0).collect();
    let r: Vec<i32> = late.keys().map(|k| k.1).collect();
    let h: Vec<DateTime<Utc>> = late.keys().map(|k| k.2).collect();
    let (empty_ts, empty_v) = (
        hourcodec::encode_timestamps(&[]),
        hourcodec::encode_volumes(&[]),
    );
    sqlx::query(
        "insert into sample_hour (meter_id, resource_id, hour, n, ts, v)
         select m, r, h, 0, $4, $5 from unnest($1::int4[], $2::int4[], $3::timestamptz[]) as u(m, r, h)
         on conflict do nothing",
    )
    .bind(&m)
    .bind(&r)
    .bind(&h)
    .bind(&empty_ts)
    .bind(&empty_v)
    .execute(&mut **tx)
    .await?;
    type Row = (i32, i32, DateTime<Utc>, Vec<u8>, Vec<u8>);
    let rows: Vec<Row> = sqlx::query_as(
        "select meter_id, resource_id, hour, ts, v from sample_hour
         where (meter_id, resource_id, hour) in (select * from unnest($1::int4[], $2::int4[], $3::timestamptz[]))
         order by meter_id, resource_id, hour
         for update",
    )
    .bind(&m)
    .bind(&r)
    .bind(&h)
    .fetch_all(&mut **tx)
    .await?;
    let mut added = 0;
    let mut out = Vec::with_capacity(rows.len());
    let mut hours = Vec::with_capacity(rows.len());
    for (meter, resource, hour, ts, v) in rows {
        let mut samples = decode(&ts, &v).map_err(|e| {
            StoreError::Permanent(sqlx::Error::Decode(
                format!("sample_hour ({meter}, {resource}, {hour}): {e}").into(),
            ))
        })?;
        let new = &late[&(meter, resource, hour)];
        let n = merge(&mut samples, new);
        if n > 0 {
            added += n as u64;
            out.push(encode(meter, resource, &samples));
            hours.push(hour);
        }
    }
    if !out.is_empty() {
        upsert(tx, &hours, &out).await?;
    }
    vmeter_core::telemetry::counter(
        "vmeter_compaction_late_samples_total",
        "Samples merged into hours that were already compacted.",
        &[],
    )
    .add(added);
    Ok(added)
}

impl Store {
    /// Compacts rolled-up hours, oldest first, one transaction per hour, at most `max_hours`
    /// (docs/design-compaction.md). Stretches without a sample partition are skipped.
    pub async fn compact(&self, max_hours: u32) -> Result<CompactRun, StoreError> {
        let mut run = CompactRun::default();
        loop {
            let mut tx = self.pool().begin().await?;
            locks::exclusive(&mut tx, ROLLUP_LOCK).await?;
            let wm = watermark(&mut tx).await?;
            run.watermark = wm;
            let rolled = rollup::watermark(&mut tx).await?;
            let oldest: Option<DateTime<Utc>> =
                sqlx::query_scalar("select min(first_ts) from series")
                    .fetch_one(&mut *tx)
                    .await?;
            let (Some(limit), Some(oldest)) = (rolled, oldest) else {
                run.caught_up = true;
                return Ok(run);
            };
            lag_gauge(wm, limit);
            let mut start = wm.unwrap_or_else(|| floor_hour(oldest));
            if start >= limit || run.hours >= max_hours {
                run.caught_up = start >= limit;
                return Ok(run);
            }
            start = rollup::next_stored(&mut tx, start, limit).await?;
            let end = (start + Duration::hours(1)).min(limit);
            if end > start {
                let hour = floor_hour(start);
                type Series = (i32, i32, Vec<DateTime<Utc>>, Vec<f64>);
                let series: Vec<Series> = sqlx::query_as(
                    "select meter_id, resource_id, array_agg(ts order by ts), array_agg(volume order by ts)
                     from sample where ts >= $1 and ts < $2
                     group by meter_id, resource_id order by meter_id, resource_id",
                )
                .bind(start)
                .bind(end)
                .fetch_all(&mut *tx)
                .await?;
                let rows: Vec<Encoded> = series
                    .iter()
                    .map(|(m, r, ts, v)| {
                        let samples: Vec<(i64, f64)> = ts
                            .iter()
                            .map(DateTime::timestamp_micros)
                            .zip(v.iter().copied())
                            .collect();
                        encode(*m, *r, &samples)
                    })
                    .collect();
                let samples: u64 = rows.iter().map(|r| r.n as u64).sum();
                let bytes: u64 = rows.iter().map(|r| (r.ts.len() + r.v.len()) as u64).sum();
                upsert(&mut tx, &vec![hour; rows.len()], &rows).await?;
                // The hour's per-minute aggregates are computed from its compacted rows
                // from now on (decision 2): its rollup rows go.
                sqlx::query("delete from sample_rollup where hour >= $1 and hour < $2")
                    .bind(hour)
                    .bind(end)
                    .execute(&mut *tx)
                    .await?;
                run.rows += rows.len() as u64;
                run.samples += samples;
                run.bytes += bytes;
                run.hours += 1;
                metrics(samples, bytes);
            }
            sqlx::query("update compaction_state set watermark = $1 where singleton")
                .bind(end)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            run.watermark = Some(end);
            lag_gauge(Some(end), limit);
        }
    }
}

impl Store {
    /// Drops the narrow partitions (`sample_pYYYYMMDD`) of the days that end at least
    /// [`DROP_MARGIN`] before the compaction watermark: every sample of those days is in
    /// `sample_hour`, and writers route samples before the watermark there. The collector's
    /// job runs it after [`compact`](Self::compact). Returns the names dropped.
    pub async fn drop_compacted_days(&self) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool().begin().await?;
        locks::exclusive(&mut tx, locks::PARTITION_LOCK).await?;
        let Some(wm) = watermark(&mut tx).await? else {
            return Ok(Vec::new());
        };
        let mut dropped = Vec::new();
        for (name, day) in partition_days(&mut tx).await? {
            let end = day
                .succ_opt()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc());
            if end.is_some_and(|end| end + DROP_MARGIN <= wm) {
                sqlx::query(AssertSqlSafe(format!("drop table {name}")))
                    .execute(&mut *tx)
                    .await?;
                dropped.push(name);
            }
        }
        tx.commit().await?;
        if !dropped.is_empty() {
            vmeter_core::telemetry::counter(
                "vmeter_compaction_partitions_dropped_total",
                "Narrow sample partitions dropped because their day is compacted.",
                &[],
            )
            .add(dropped.len() as u64);
        }
        Ok(dropped)
    }
}

fn metrics(samples: u64, bytes: u64) {
    use vmeter_core::telemetry::counter;
    counter(
        "vmeter_compaction_hours_total",
        "Hours compacted into sample_hour.",
        &[],
    )
    .inc();
    counter(
        "vmeter_compaction_samples_total",
        "Samples compacted into sample_hour.",
        &[],
    )
    .add(samples);
    counter(
        "vmeter_compaction_bytes_total",
        "Bytes of the compacted streams written (times and volumes).",
        &[],
    )
    .add(bytes);
}

/// `vmeter_compaction_lag_seconds`: rolled up but not compacted yet.
fn lag_gauge(wm: Option<DateTime<Utc>>, rolled: DateTime<Utc>) {
    let lag = wm.map_or(0, |w| (rolled - w).num_seconds().max(0));
    vmeter_core::telemetry::gauge(
        "vmeter_compaction_lag_seconds",
        "Time between the rollup watermark and the compaction watermark.",
        &[],
    )
    .set(lag);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_time_order_and_the_first_sample_of_a_time() {
        let mut rows = vec![(10, 1.0), (30, 3.0)];
        assert_eq!(merge(&mut rows, &[(20, 2.0), (30, 9.0), (5, 0.5)]), 2);
        assert_eq!(rows, vec![(5, 0.5), (10, 1.0), (20, 2.0), (30, 3.0)]);
        assert_eq!(merge(&mut rows, &[(20, 7.0)]), 0);
    }

    #[test]
    fn an_encoded_hour_decodes_to_its_samples() {
        let s = vec![(1_700_000_000_000_000, 1.5), (1_700_000_010_000_123, -0.25)];
        let e = encode(1, 2, &s);
        assert_eq!(e.n, 2);
        assert_eq!(decode(&e.ts, &e.v).unwrap(), s);
        assert!(decode(&e.ts, &hourcodec::encode_volumes(&[1.0])).is_err());
    }

    #[test]
    fn the_migration_holds_the_sql_decoders_verbatim() {
        let migration = include_str!("../../migrations/0005_compacted_hours.sql");
        assert!(migration.contains(hourcodec::SQL_DECODERS));
    }
}
