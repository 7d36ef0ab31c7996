//! Per-minute rollups of the sample table (migration 0003, docs/storage.md "Rollups").
//!
//! One `sample_rollup` row per (meter, resource, UTC hour) holds, for each minute of the
//! hour that has samples, the count, sum, min, max and sum of squares of the volumes and the
//! first and last sample time. Statistics whose buckets are whole minutes read these rows
//! instead of every sample.
//!
//! Invariant: for every (meter, resource, hour) before `rollup_state.watermark` that has
//! samples, `sample_rollup` has a row, and that row either describes exactly the stored
//! samples of that hour or has null arrays ("read the samples"). It holds because:
//! - the rollup job ([`Store::roll_up`]) computes whole hours and advances the watermark in
//!   one transaction under an exclusive advisory lock ([`ROLLUP_LOCK`]);
//! - every sample write holds the same lock shared until it commits, reads the watermark
//!   after taking it, and recomputes the rows of the hours before the watermark that it
//!   added samples to ([`fold_late`]), after locking those rows, so that two writers of the
//!   same hour each recompute from a snapshot that includes the other's committed samples.

use chrono::{DateTime, Duration, DurationRound, Utc};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Transaction};

use super::locks;
pub use super::locks::ROLLUP_LOCK;
use super::partitions::partition_days;
use super::{Store, StoreError};

/// PostgreSQL's `timestamptz` epoch, the origin of every `date_bin` here (UTC minutes and
/// hours whatever the session's time zone).
pub const EPOCH: &str = "timestamptz '1970-01-01 00:00:00+00'";

/// Rollup width, µs. Statistics use rollups when their bucket bounds are multiples of it.
pub const WINDOW_US: i64 = 60_000_000;

/// `insert … on conflict do update` of the rollup rows computed from the sample rows that
/// `source` (a `from` clause, alias `s`) selects, grouped by (meter, resource, hour).
///
/// Each minute's aggregates see its samples in time order (the sorted subquery feeds the
/// grouped aggregation in that order), so `sum` and `sumsq` are the same doubles however the
/// rows are stored: [`minutes_of`] computes them again from the samples, bit for bit (what a
/// compacted hour, issue 18, relies on).
///
/// A row gets null `minutes` when its series has fewer than two samples per non-empty minute:
/// such a rollup would be no smaller than the samples it replaces. A full hour (all 60
/// minutes) is packed without the minute numbers ([`DENSE_RECORD`]-byte records in minute
/// order): 2,640 bytes, so that three rows fit in a page where two of 2,760 did (the
/// rollups took 11.2 B/sample of the bench's data, 7.5 with this).
fn upsert_sql(source: &str) -> String {
    format!(
        "insert into sample_rollup (meter_id, resource_id, hour, minutes)
         select meter_id, resource_id, hour,
                case when sum(n) < 2 * count(*) then null
                     when count(*) = 60 then string_agg(substring(rec from 3), ''::bytea order by w)
                     else string_agg(rec, ''::bytea order by w) end
         from (
           select meter_id, resource_id, date_bin('1 hour', w, {EPOCH}) as hour, n, w,
                  int2send((date_part('epoch', w - date_bin('1 hour', w, {EPOCH})) / 60)::int2)
                  || int4send(n) || int4send(first_us) || int4send(last_us)
                  || float8send(sum) || float8send(min) || float8send(max) || float8send(sumsq)
                  as rec
           from (
             select meter_id, resource_id, w, count(*)::int4 as n, sum(volume) as sum,
                    min(volume) as min, max(volume) as max, sum(volume * volume) as sumsq,
                    (date_part('epoch', min(ts) - w) * 1000000)::int4 as first_us,
                    (date_part('epoch', max(ts) - w) * 1000000)::int4 as last_us
             from (
               select s.meter_id, s.resource_id, s.ts, s.volume,
                      date_bin('1 minute', s.ts, {EPOCH}) as w
               {source}
               order by meter_id, resource_id, w, ts
             ) x
             group by meter_id, resource_id, w
           ) m
           order by meter_id, resource_id, w
         ) h
         group by meter_id, resource_id, hour
         on conflict on constraint sample_rollup_pkey do update set minutes = excluded.minutes"
    )
}

/// Size of one packed minute in `sample_rollup.minutes`, bytes: minute number (int2) and
/// [`DENSE_RECORD`].
pub const RECORD: usize = 46;

/// Size of one packed minute of a full hour, bytes: n, first_us, last_us (int4), sum, min,
/// max, sumsq (float8). A full hour is 60 of them, 2,640 bytes, a length that no number of
/// [`RECORD`]s has (57.4), so the two layouts cannot be confused.
pub const DENSE_RECORD: usize = 44;

const DENSE_HOUR: usize = 60 * DENSE_RECORD;

/// How many minutes `data` (a `sample_rollup.minutes` value) holds.
pub fn minutes_in(data: &[u8]) -> usize {
    if data.len() == DENSE_HOUR {
        60
    } else {
        data.len() / RECORD
    }
}

/// One rolled-up minute, as unpacked from `sample_rollup.minutes`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Minute {
    /// Minute of the hour, 0..59.
    pub minute: i16,
    /// Samples in the minute (≥ 1).
    pub n: i32,
    /// First and last sample, µs after the minute's start.
    pub first_us: i32,
    pub last_us: i32,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub sumsq: f64,
}

/// The per-minute aggregates of one series-hour from its samples, `(µs since the epoch,
/// volume)` in time order, exactly as the rollup SQL computes them ([`upsert_sql`]):
/// `sum` and `sumsq` added in time order from the first sample, `min`/`max` keeping the
/// later of equal values (PostgreSQL's `float8smaller`/`float8larger`), first and last
/// sample in µs after the minute's start. `hour_us` is the hour's start.
pub fn minutes_of(hour_us: i64, samples: &[(i64, f64)]) -> Vec<Minute> {
    let mut out: Vec<Minute> = Vec::new();
    for &(ts, v) in samples {
        let since = ts - hour_us;
        let minute = since.div_euclid(WINDOW_US) as i16;
        let at = (since - minute as i64 * WINDOW_US) as i32;
        match out.last_mut() {
            Some(m) if m.minute == minute => {
                m.n += 1;
                m.last_us = at;
                m.sum += v;
                m.sumsq += v * v;
                // The state unless the new value is strictly beyond it (equals: the new).
                m.min = if m.min < v { m.min } else { v };
                m.max = if m.max > v { m.max } else { v };
            }
            _ => out.push(Minute {
                minute,
                n: 1,
                first_us: at,
                last_us: at,
                sum: v,
                min: v,
                max: v,
                sumsq: v * v,
            }),
        }
    }
    out
}

/// The minutes packed in `data`: big-endian [`RECORD`]-byte records, or for a full hour
/// (exactly 60 × [`DENSE_RECORD`] bytes) the 60 minutes in order without their numbers. A
/// trailing partial record is ignored.
pub fn unpack(data: &[u8]) -> impl Iterator<Item = Minute> + '_ {
    let dense = data.len() == DENSE_HOUR;
    let (size, at) = if dense {
        (DENSE_RECORD, 0)
    } else {
        (RECORD, 2)
    };
    data.chunks_exact(size).enumerate().map(move |(i, r)| {
        let i4 = |o: usize| i32::from_be_bytes(r[at + o..at + o + 4].try_into().expect("4 bytes"));
        let f8 = |o: usize| f64::from_be_bytes(r[at + o..at + o + 8].try_into().expect("8 bytes"));
        Minute {
            minute: if dense {
                i as i16
            } else {
                i16::from_be_bytes([r[0], r[1]])
            },
            n: i4(0),
            first_us: i4(4),
            last_us: i4(8),
            sum: f8(12),
            min: f8(20),
            max: f8(28),
            sumsq: f8(36),
        }
    })
}

/// `rollup_state.watermark`: every (meter, resource, hour) before it is rolled up (`None`:
/// nothing is yet).
pub async fn watermark(conn: &mut PgConnection) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("select watermark from rollup_state where singleton")
        .fetch_one(conn)
        .await
}

/// Takes [`ROLLUP_LOCK`] shared for the transaction and returns the rollup and compaction
/// watermarks read after it: samples written in this transaction before the first must be
/// folded in ([`fold_late`]), before the second merged into their compacted rows
/// (`compact::merge_late`). The compaction watermark is never after the rollup one.
///
/// The same statement turns JIT compilation off for the transaction: the per-row probe of
/// the sample insert makes its estimated cost exceed `jit_above_cost`, and compiling costs
/// 6 ms per batch for nothing (the insert is index probes, not expressions).
pub async fn writer_watermarks(
    tx: &mut Transaction<'_, Postgres>,
) -> Result<(Option<DateTime<Utc>>, Option<DateTime<Utc>>), StoreError> {
    sqlx::query("select pg_advisory_xact_lock_shared($1), set_config('jit', 'off', true)")
        .bind(ROLLUP_LOCK)
        .execute(&mut **tx)
        .await?;
    // A statement of its own: its snapshot is taken after the lock was granted. Both in
    // one round trip (this is on every batch's path).
    Ok(sqlx::query_as(
        "select r.watermark, c.watermark from rollup_state r, compaction_state c
         where r.singleton and c.singleton",
    )
    .fetch_one(&mut **tx)
    .await?)
}

/// Recomputes the rollup rows of `hours` (meter, resource, hour start; sorted, distinct)
/// from the samples, inside the writer's transaction (which holds [`ROLLUP_LOCK`] shared).
///
/// The rows are created if missing (null `minutes`, which readers treat as "read the
/// samples") and locked in key order first; the recomputation is a later statement, so its
/// snapshot includes the samples of any other writer that held those rows before.
pub async fn fold_late(
    tx: &mut Transaction<'_, Postgres>,
    hours: &[(i32, i32, DateTime<Utc>)],
) -> Result<(), StoreError> {
    if hours.is_empty() {
        return Ok(());
    }
    let m: Vec<i32> = hours.iter().map(|h| h.0).collect();
    let r: Vec<i32> = hours.iter().map(|h| h.1).collect();
    let h: Vec<DateTime<Utc>> = hours.iter().map(|h| h.2).collect();
    sqlx::query(
        "insert into sample_rollup (meter_id, resource_id, hour)
         select * from unnest($1::int4[], $2::int4[], $3::timestamptz[])
         on conflict do nothing",
    )
    .bind(&m)
    .bind(&r)
    .bind(&h)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "select 1 from sample_rollup
         where (meter_id, resource_id, hour) in (select * from unnest($1::int4[], $2::int4[], $3::timestamptz[]))
         order by meter_id, resource_id, hour
         for update",
    )
    .bind(&m)
    .bind(&r)
    .bind(&h)
    .execute(&mut **tx)
    .await?;
    let sql = upsert_sql(
        "from unnest($1::int4[], $2::int4[], $3::timestamptz[]) as u(m, r, h)
         join sample s on s.meter_id = u.m and s.resource_id = u.r
                      and s.ts >= u.h and s.ts < u.h + interval '1 hour'",
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(&m)
        .bind(&r)
        .bind(&h)
        .execute(&mut **tx)
        .await?;
    vmeter_core::telemetry::counter(
        "vmeter_rollup_late_hours_total",
        "Rolled-up hours recomputed because samples arrived for them after the rollup.",
        &[],
    )
    .add(hours.len() as u64);
    Ok(())
}

/// What one [`Store::roll_up`] call did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RollupRun {
    /// Hours rolled up (one transaction each).
    pub hours: u32,
    /// Rollup rows written.
    pub rows: u64,
    /// The watermark afterwards.
    pub watermark: Option<DateTime<Utc>>,
    /// Whether every closed hour is rolled up (false: the call stopped at `max_hours`).
    pub caught_up: bool,
}

/// Where a job that works hour by hour from `start` (up to `limit`) goes on: `start`, or
/// past the days without a sample partition (nothing stored there), or `limit`.
pub async fn next_stored(
    conn: &mut PgConnection,
    start: DateTime<Utc>,
    limit: DateTime<Utc>,
) -> Result<DateTime<Utc>, sqlx::Error> {
    // Partitions in day order: the first whose day ends after `start`.
    let next_day = partition_days(conn)
        .await?
        .into_iter()
        .filter_map(|(_, d)| Some(d.and_hms_opt(0, 0, 0)?.and_utc()))
        .find(|d| *d + Duration::days(1) > start);
    Ok(match next_day {
        Some(d) if d > start => d.min(limit),
        Some(_) => start,
        None => limit,
    })
}

/// Start of the UTC hour containing `t`.
pub fn floor_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::hours(1)).unwrap_or(t)
}

impl Store {
    /// Rolls up closed hours, oldest first, one transaction per hour, at most `max_hours`.
    ///
    /// An hour is closed when both the wall clock (`now`) and the newest stored sample are
    /// at least `lag` past its end: data time, so that a backlog being ingested in time
    /// order is not rolled up under its own feet (samples that still come later are
    /// folded in by their writer). Stretches without a sample partition are skipped.
    pub async fn roll_up(
        &self,
        now: DateTime<Utc>,
        lag: Duration,
        max_hours: u32,
    ) -> Result<RollupRun, StoreError> {
        let mut run = RollupRun::default();
        loop {
            let mut tx = self.pool().begin().await?;
            locks::exclusive(&mut tx, ROLLUP_LOCK).await?;
            let wm = watermark(&mut tx).await?;
            run.watermark = wm;
            let (oldest, newest): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
                sqlx::query_as("select min(first_ts), max(last_ts) from series")
                    .fetch_one(&mut *tx)
                    .await?;
            let (Some(oldest), Some(newest)) = (oldest, newest) else {
                run.caught_up = true;
                return Ok(run);
            };
            let limit = floor_hour(now.min(newest) - lag);
            let mut start = wm.unwrap_or_else(|| floor_hour(oldest));
            if start >= limit {
                run.caught_up = true;
                return Ok(run);
            }
            if run.hours >= max_hours {
                return Ok(run);
            }
            start = next_stored(&mut tx, start, limit).await?;
            let end = (start + Duration::hours(1)).min(limit);
            if end > start {
                let rows = sqlx::query(AssertSqlSafe(upsert_sql(
                    "from sample s where s.ts >= $1 and s.ts < $2",
                )))
                .bind(start)
                .bind(end)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                run.rows += rows;
                run.hours += 1;
            }
            sqlx::query("update rollup_state set watermark = $1 where singleton")
                .bind(end)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            run.watermark = Some(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_reads_big_endian_records_as_postgresql_sends_them() {
        let mut data = Vec::new();
        for (minute, n, sum) in [(0i16, 6i32, 1.5f64), (59, 1, -2.25)] {
            data.extend_from_slice(&minute.to_be_bytes());
            data.extend_from_slice(&n.to_be_bytes());
            data.extend_from_slice(&7i32.to_be_bytes());
            data.extend_from_slice(&59_999_999i32.to_be_bytes());
            for v in [sum, -1.0, 3.0, 9.5] {
                data.extend_from_slice(&v.to_be_bytes());
            }
        }
        assert_eq!(data.len(), 2 * RECORD);
        data.push(0xff); // a torn trailing record is ignored
        let got: Vec<Minute> = unpack(&data).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            Minute {
                minute: 59,
                n: 1,
                first_us: 7,
                last_us: 59_999_999,
                sum: -2.25,
                min: -1.0,
                max: 3.0,
                sumsq: 9.5
            }
        );
        assert_eq!((got[0].minute, got[0].n, got[0].sum), (0, 6, 1.5));
    }

    #[test]
    fn unpack_reads_a_full_hour_without_minute_numbers() {
        let mut data = Vec::new();
        for m in 0..60i32 {
            for v in [m + 1, 5, 59_000_000] {
                data.extend_from_slice(&v.to_be_bytes());
            }
            for v in [f64::from(m), -1.0, 3.0, 9.5] {
                data.extend_from_slice(&v.to_be_bytes());
            }
        }
        assert_eq!(minutes_in(&data), 60);
        let got: Vec<Minute> = unpack(&data).collect();
        assert_eq!(got.len(), 60);
        for (m, g) in got.iter().enumerate() {
            assert_eq!(
                (g.minute, g.n, g.first_us, g.sum),
                (m as i16, m as i32 + 1, 5, m as f64)
            );
            assert_eq!(
                (g.last_us, g.min, g.max, g.sumsq),
                (59_000_000, -1.0, 3.0, 9.5)
            );
        }
        // Every sparse length is a multiple of 46 and never 2,640.
        assert!((1..=60).all(|n| n * RECORD != DENSE_HOUR));
        assert_eq!(minutes_in(&data[..2 * RECORD]), 2);
    }

    #[test]
    fn floor_hour_truncates_to_the_utc_hour() {
        let t = DateTime::parse_from_rfc3339("2026-03-02T05:59:59.999999+05:30")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(floor_hour(t).to_rfc3339(), "2026-03-02T00:00:00+00:00");
    }
}
