//! PostgreSQL storage: migrations, daily partitions, idempotent batched inserts.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Transaction};
use vmeter_core::Sample;

use crate::rollup;

/// Embedded, numbered migrations (collector/migrations), applied at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A storage failure, classified for the ack decision.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data itself is unacceptable (SQLSTATE class 22 data exception or 23 integrity
    /// violation): retrying cannot help; the message goes to the dead-letter queue.
    #[error("rejected by the database: {0}")]
    Permanent(sqlx::Error),
    /// Connection lost, database down, timeouts…: retry later, ack nothing.
    #[error("database unavailable: {0}")]
    Transient(sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let permanent = match &e {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            sqlx::Error::Encode(_) | sqlx::Error::TypeNotFound { .. } => true,
            _ => false,
        };
        if permanent {
            StoreError::Permanent(e)
        } else {
            StoreError::Transient(e)
        }
    }
}

/// Result of writing one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// New rows.
    pub inserted: u64,
    /// Samples that were already stored (redeliveries): ignored.
    pub duplicates: u64,
}

/// What [`Store::apply_retention`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Dropped daily partitions (table names).
    pub partitions: Vec<String>,
    /// (meter, resource) series, resources and meters left without samples and deleted.
    pub series: u64,
    pub resources: u64,
    pub meters: u64,
    /// Rollup rows of the dropped days.
    pub rollup_rows: u64,
}

/// The storage handle: a pool plus caches of meter ids and existing partitions.
pub struct Store {
    pool: PgPool,
    /// Meter name → (type, unit, id); looked up without allocating.
    meters: HashMap<String, Vec<(vmeter_core::SampleType, String, i32)>>,
    partitions: HashSet<NaiveDate>,
}

/// The daily partitions of `sample` (`sample_pYYYYMMDD`, covering [day, day + 1)) with
/// their day, in day order. Tables attached under other names are left out.
pub async fn partition_days(
    conn: &mut sqlx::PgConnection,
) -> Result<Vec<(String, NaiveDate)>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_inherits i join pg_class c on c.oid = i.inhrelid
         where i.inhparent = 'sample'::regclass order by 1",
    )
    .fetch_all(conn)
    .await?;
    Ok(names
        .into_iter()
        .filter_map(|n| {
            let day = NaiveDate::parse_from_str(n.strip_prefix("sample_p")?, "%Y%m%d").ok()?;
            Some((n, day))
        })
        .collect())
}

/// Connects a pool (lazily: no connection is made until first use).
///
/// Each connection sets `random_page_cost = 1.1` for itself (PostgreSQL's default, 4, is
/// for spinning disks): the recent samples the API reads are in memory or on SSD, and with
/// the default the planner reads one series' 10,000 newest samples through a bitmap scan
/// and a sort (11–18 ms here) instead of the primary key backwards, already in order
/// (6–7 ms). The setting is per session; the server's configuration is untouched.
pub fn pool(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("set random_page_cost = 1.1")
                    .execute(conn)
                    .await
                    .map(|_| ())
            })
        })
        .connect_lazy(url)
}

impl Store {
    /// Wraps a pool; call [`migrate`](Self::migrate) before use.
    pub fn new(pool: PgPool) -> Self {
        Store {
            pool,
            meters: HashMap::new(),
            partitions: HashSet::new(),
        }
    }

    /// The pool (shared with the API).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations (idempotent; concurrent collectors serialise on sqlx's lock).
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// Creates the daily partitions from yesterday to `ahead_days` after today.
    pub async fn ensure_partitions_around(
        &mut self,
        now: DateTime<Utc>,
        ahead_days: u32,
    ) -> Result<(), StoreError> {
        let today = now.date_naive();
        let days: Vec<NaiveDate> = (-1..=ahead_days as i64)
            .map(|d| today + Duration::days(d))
            .collect();
        let mut tx = self.pool.begin().await?;
        for d in days {
            self.ensure_partition(&mut tx, d).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn ensure_partition(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        day: NaiveDate,
    ) -> Result<(), StoreError> {
        if self.partitions.contains(&day) {
            return Ok(());
        }
        // Serialise partition creation between collectors.
        sqlx::query("select pg_advisory_xact_lock(7266315512)")
            .execute(&mut **tx)
            .await?;
        let next = day + Duration::days(1);
        let sql = format!(
            "create table if not exists sample_p{} partition of sample for values from ('{} 00:00:00+00') to ('{} 00:00:00+00')",
            day.format("%Y%m%d"),
            day.format("%Y-%m-%d"),
            next.format("%Y-%m-%d")
        );
        sqlx::query(AssertSqlSafe(sql)).execute(&mut **tx).await?;
        self.partitions.insert(day);
        Ok(())
    }

    async fn meter_id(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        s: &Sample,
    ) -> Result<i32, StoreError> {
        if let Some(id) = self.meters.get(&s.name).and_then(|v| {
            v.iter()
                .find(|(k, u, _)| *k == s.kind && *u == s.unit)
                .map(|(_, _, id)| *id)
        }) {
            return Ok(id);
        }
        let id: i32 = sqlx::query_scalar(
            "insert into meter (name, type, unit) values ($1, $2, $3)
             on conflict on constraint meter_name_type_unit_key do update set name = excluded.name
             returning id",
        )
        .bind(&s.name)
        .bind(s.kind.as_str())
        .bind(&s.unit)
        .fetch_one(&mut **tx)
        .await?;
        self.meters
            .entry(s.name.clone())
            .or_default()
            .push((s.kind, s.unit.clone(), id));
        Ok(id)
    }

    /// Writes `samples` in one transaction; duplicates (same meter, resource, timestamp) are
    /// ignored. Nothing is written if it fails.
    pub async fn write(&mut self, samples: &[Sample]) -> Result<Written, StoreError> {
        if samples.is_empty() {
            return Ok(Written::default());
        }
        let result = self.write_inner(samples).await;
        if result.is_err() {
            // A rolled-back transaction may have created partitions or meters we cached.
            self.partitions.clear();
            self.meters.clear();
        }
        result
    }

    async fn write_inner(&mut self, samples: &[Sample]) -> Result<Written, StoreError> {
        let mut tx = self.pool.begin().await?;
        // First (lock order: rollup lock, then partition lock).
        let watermark = rollup::writer_watermark(&mut tx).await?;
        let days: HashSet<NaiveDate> = samples.iter().map(|s| s.timestamp.date_naive()).collect();
        for d in days {
            self.ensure_partition(&mut tx, d).await?;
        }
        let mut meter_ids = Vec::with_capacity(samples.len());
        for s in samples {
            meter_ids.push(self.meter_id(&mut tx, s).await?);
        }

        // Resources: the newest sample of each carries the metadata to keep. Rows are upserted
        // in sorted order so that concurrent collectors lock them in the same order (no
        // deadlock between two transactions touching the same resources).
        let mut newest: HashMap<&str, &Sample> = HashMap::new();
        let mut oldest: HashMap<&str, DateTime<Utc>> = HashMap::new();
        for s in samples {
            let e = newest.entry(s.resource_id.as_str()).or_insert(s);
            if s.timestamp >= e.timestamp {
                *e = s;
            }
            let o = oldest.entry(s.resource_id.as_str()).or_insert(s.timestamp);
            *o = (*o).min(s.timestamp);
        }
        let mut newest: Vec<(&str, &Sample)> = newest.into_iter().collect();
        newest.sort_unstable_by_key(|(rid, _)| *rid);
        let mut rids = Vec::new();
        let (mut users, mut projects, mut sources, mut metas, mut firsts, mut lasts) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for (rid, s) in &newest {
            rids.push(rid.to_string());
            users.push(s.user_id.clone());
            projects.push(s.project_id.clone());
            sources.push(s.source.clone());
            metas.push(sqlx::types::Json(s.resource_metadata.clone()));
            firsts.push(oldest[rid]);
            lasts.push(s.timestamp);
        }
        let rows: Vec<(i32, String)> = sqlx::query_as(
            "insert into resource (resource_id, user_id, project_id, source, metadata, first_seen, last_seen)
             select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::timestamptz[], $7::timestamptz[])
             on conflict on constraint resource_resource_id_key do update set
               user_id    = case when excluded.last_seen >= resource.last_seen then excluded.user_id else resource.user_id end,
               project_id = case when excluded.last_seen >= resource.last_seen then excluded.project_id else resource.project_id end,
               source     = case when excluded.last_seen >= resource.last_seen then excluded.source else resource.source end,
               metadata   = case when excluded.last_seen >= resource.last_seen then excluded.metadata else resource.metadata end,
               first_seen = least(resource.first_seen, excluded.first_seen),
               last_seen  = greatest(resource.last_seen, excluded.last_seen)
             returning id, resource_id",
        )
        .bind(&rids)
        .bind(&users)
        .bind(&projects)
        .bind(&sources)
        .bind(&metas)
        .bind(&firsts)
        .bind(&lasts)
        .fetch_all(&mut *tx)
        .await?;
        let resource_ids: HashMap<String, i32> = rows.into_iter().map(|(id, r)| (r, id)).collect();

        let n = samples.len();
        let (mut ts, mut rid, mut vol) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        // Series: first and last time per (meter, resource) in this batch.
        let mut series: HashMap<(i32, i32), (DateTime<Utc>, DateTime<Utc>)> = HashMap::new();
        for (s, m) in samples.iter().zip(&meter_ids) {
            let r = resource_ids[&s.resource_id];
            ts.push(s.timestamp);
            rid.push(r);
            vol.push(s.volume);
            let e = series.entry((*m, r)).or_insert((s.timestamp, s.timestamp));
            e.0 = e.0.min(s.timestamp);
            e.1 = e.1.max(s.timestamp);
        }
        let oldest = ts.iter().min().copied();
        // Samples of rolled-up hours: learn which hours got new rows, and fold them in.
        let late_before = watermark.filter(|w| oldest.is_some_and(|o| o < *w));
        let inserted = if let Some(w) = late_before {
            let hours: Vec<(i32, i32, DateTime<Utc>, i64)> =
                sqlx::query_as(AssertSqlSafe(format!(
                    "with ins as (
                   insert into sample (ts, meter_id, resource_id, volume)
                   select * from unnest($1::timestamptz[], $2::int4[], $3::int4[], $4::float8[])
                   on conflict do nothing
                   returning meter_id, resource_id, ts)
                 select meter_id, resource_id, date_bin('1 hour', ts, {}), count(*)
                 from ins group by 1, 2, 3 order by 1, 2, 3",
                    rollup::EPOCH
                )))
                .bind(&ts)
                .bind(&meter_ids)
                .bind(&rid)
                .bind(&vol)
                .fetch_all(&mut *tx)
                .await?;
            let late: Vec<(i32, i32, DateTime<Utc>)> = hours
                .iter()
                .filter(|h| h.2 < w)
                .map(|h| (h.0, h.1, h.2))
                .collect();
            rollup::fold_late(&mut tx, &late).await?;
            hours.iter().map(|h| h.3 as u64).sum()
        } else {
            sqlx::query(
                "insert into sample (ts, meter_id, resource_id, volume)
                 select * from unnest($1::timestamptz[], $2::int4[], $3::int4[], $4::float8[])
                 on conflict do nothing",
            )
            .bind(&ts)
            .bind(&meter_ids)
            .bind(&rid)
            .bind(&vol)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        };
        let mut series: Vec<_> = series.into_iter().collect();
        series.sort_unstable_by_key(|(k, _)| *k);
        let (sm, sr): (Vec<i32>, Vec<i32>) = series.iter().map(|(k, _)| *k).unzip();
        let (sf, sl): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) =
            series.iter().map(|(_, v)| *v).unzip();
        sqlx::query(
            "insert into series (meter_id, resource_id, first_ts, last_ts)
             select * from unnest($1::int4[], $2::int4[], $3::timestamptz[], $4::timestamptz[])
             on conflict on constraint series_pkey do update set
               first_ts = least(series.first_ts, excluded.first_ts),
               last_ts  = greatest(series.last_ts, excluded.last_ts)",
        )
        .bind(&sm)
        .bind(&sr)
        .bind(&sf)
        .bind(&sl)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Written {
            inserted,
            duplicates: n as u64 - inserted,
        })
    }

    /// Drops every daily partition that lies entirely before `now - days` (whole days: a
    /// partition goes once its last instant is older than the cutoff), then prunes series,
    /// resources and meters that have no samples left. One transaction; serialised with
    /// partition creation by the same advisory lock.
    pub async fn apply_retention(
        &mut self,
        now: DateTime<Utc>,
        days: u32,
    ) -> Result<Retention, StoreError> {
        let cutoff = now - Duration::days(i64::from(days));
        let mut tx = self.pool.begin().await?;
        // Lock order: rollup lock, then partition lock (as sample writes).
        sqlx::query("select pg_advisory_xact_lock($1)")
            .bind(rollup::ROLLUP_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query("select pg_advisory_xact_lock(7266315512)")
            .execute(&mut *tx)
            .await?;
        let mut out = Retention::default();
        let mut dropped_until: Option<DateTime<Utc>> = None;
        for (name, day) in partition_days(&mut tx).await? {
            let end = (day + Duration::days(1))
                .and_hms_opt(0, 0, 0)
                .expect("midnight")
                .and_utc();
            if end <= cutoff {
                dropped_until = dropped_until.max(Some(end));
                sqlx::query(AssertSqlSafe(format!("drop table {name}")))
                    .execute(&mut *tx)
                    .await?;
                self.partitions.remove(&day);
                out.partitions.push(name);
            }
        }
        if let Some(end) = dropped_until {
            // Rollups of the dropped days.
            out.rollup_rows = sqlx::query("delete from sample_rollup where hour < $1")
                .bind(end)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if !out.partitions.is_empty() {
            // Series whose every sample is gone; the others start no earlier than what is left.
            out.series = sqlx::query("delete from series where last_ts < $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("update series set first_ts = $1 where first_ts < $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await?;
            out.resources = sqlx::query(
                "delete from resource r where not exists (select 1 from series se where se.resource_id = r.id)",
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query("update resource set first_seen = $1 where first_seen < $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await?;
            out.meters = sqlx::query(
                "delete from meter m where not exists (select 1 from series se where se.meter_id = m.id)",
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        if out.meters > 0 {
            self.meters.clear();
        }
        Ok(out)
    }
}
