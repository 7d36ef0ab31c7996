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
///
/// The classification decides between "store nothing, retry later" and "isolate the
/// samples PostgreSQL refuses and dead-letter them": a data error taken for an outage holds
/// the whole queue hostage, an outage taken for a data error dead-letters good samples.
/// Classes of SQLSTATE (PostgreSQL's appendix A):
///
/// | class | meaning | here |
/// |---|---|---|
/// | 08, 53, 57, 58, XX, no SQLSTATE (I/O, pool) | connection, resources, shutdown, system | [`Transient`](StoreError::Transient) |
/// | 42 | syntax, undefined table, permission: the schema or the role, not a sample | [`Transient`](StoreError::Transient) (an operator must act; retried, `/health` says so) |
/// | 40, 55, 25 | deadlock, serialization, lock not available, aborted transaction | [`Contended`](StoreError::Contended): retried; if it repeats on the same samples while the database answers, they are isolated |
/// | anything else (22 data, 23 integrity, 54 limits, …) | the data | [`Permanent`](StoreError::Permanent) |
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data itself is unacceptable: retrying cannot help; the offending samples are
    /// isolated and go to the dead-letter queue.
    #[error("rejected by the database: {0}")]
    Permanent(sqlx::Error),
    /// Connection lost, database down, timeouts, a broken schema: retry later, ack nothing.
    #[error("database unavailable: {0}")]
    Transient(sqlx::Error),
    /// A conflict with another transaction: retry; repeated on the same samples while the
    /// database answers other queries, the samples are the cause.
    #[error("conflict with another transaction: {0}")]
    Contended(sqlx::Error),
    /// A sample PostgreSQL could not hold, found before asking it (e.g. a day outside the
    /// years partitions can be named for).
    #[error("rejected before writing: {0}")]
    Refused(String),
}

impl StoreError {
    /// The SQLSTATE of the database's answer, if it gave one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Permanent(e) | StoreError::Transient(e) | StoreError::Contended(e) => {
                match e {
                    sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
                    _ => None,
                }
            }
            StoreError::Refused(_) => None,
        }
    }

    /// Whether the samples are at fault (never for an outage).
    pub fn is_data(&self) -> bool {
        matches!(self, StoreError::Permanent(_) | StoreError::Refused(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let class = match &e {
            sqlx::Error::Database(db) => db.code().map(|c| c.chars().take(2).collect::<String>()),
            sqlx::Error::Encode(_) | sqlx::Error::TypeNotFound { .. } => {
                return StoreError::Permanent(e);
            }
            _ => None,
        };
        match class.as_deref() {
            None | Some("08" | "53" | "57" | "58" | "XX" | "42") => StoreError::Transient(e),
            Some("40" | "55" | "25") => StoreError::Contended(e),
            Some(_) => StoreError::Permanent(e),
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

/// Whether PostgreSQL answers a trivial query within `timeout` (tells an outage from a
/// refusal of particular data).
pub async fn ping(pool: &PgPool, timeout: std::time::Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, sqlx::query("select 1").execute(pool)).await,
        Ok(Ok(_))
    )
}

/// How [`Store::write`] inserts samples (`$1..$4`: ts, meter ids, attribution ids, volumes,
/// in primary-key order without repeated keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Insert {
    /// Skip rows whose key is stored, by an index probe per row. `offset 0` keeps the probe
    /// a per-row subplan: as an anti-join, the planner hashes the whole partition for a
    /// batch of 20,000 rows (430 ms instead of 90 ms measured here).
    Probe,
    /// `on conflict do nothing`: also skips rows that a concurrent transaction committed
    /// after this statement's snapshot.
    OnConflict,
}

impl Insert {
    fn sql(self) -> &'static str {
        match self {
            Insert::Probe => {
                "insert into sample (ts, meter_id, resource_id, volume)
                 select * from unnest($1::timestamptz[], $2::int4[], $3::int4[], $4::float8[]) as u(ts, m, r, v)
                 where not exists (select from sample s
                                   where s.meter_id = u.m and s.resource_id = u.r and s.ts = u.ts
                                   offset 0)"
            }
            Insert::OnConflict => {
                "insert into sample (ts, meter_id, resource_id, volume)
                 select * from unnest($1::timestamptz[], $2::int4[], $3::int4[], $4::float8[])
                 on conflict do nothing"
            }
        }
    }
}

/// The attribution of a sample: what it names besides its meter, time and volume.
type AttrKey<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str);

/// Upserts the attributions of `samples` (one statement) and returns each sample's
/// attribution id (a `resource` row), in the order of `samples`.
///
/// An attribution is a distinct (resource id, user, project, source, metadata): see
/// migration 0004. The distinct ones of a batch are found here first (metadata compared by
/// pointer, then by value: the decoder shares one `Arc` per distinct metadata of a
/// message), so that the statement handles each once; PostgreSQL's own key (md5 of the
/// metadata's jsonb text) decides between rows, and the answer maps every input row to its
/// row's id. Rows are inserted and locked in key order: concurrent writers touching the
/// same attributions wait for each other in one direction only.
async fn upsert_attributions(
    conn: &mut sqlx::PgConnection,
    samples: &[Sample],
) -> Result<Vec<i32>, StoreError> {
    let mut index: HashMap<AttrKey<'_>, Vec<usize>> = HashMap::new();
    // Distinct attributions: a sample that carries it, first and last time.
    let mut attrs: Vec<(&Sample, DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let mut of_sample = Vec::with_capacity(samples.len());
    for s in samples {
        let key = (
            s.resource_id.as_str(),
            s.user_id.as_deref(),
            s.project_id.as_deref(),
            s.source.as_str(),
        );
        let list = index.entry(key).or_default();
        let found = list.iter().copied().find(|&a| {
            let md = &attrs[a].0.resource_metadata;
            std::sync::Arc::ptr_eq(md, &s.resource_metadata) || **md == *s.resource_metadata
        });
        let a = match found {
            Some(a) => {
                let (_, first, last) = &mut attrs[a];
                *first = (*first).min(s.timestamp);
                *last = (*last).max(s.timestamp);
                a
            }
            None => {
                attrs.push((s, s.timestamp, s.timestamp));
                list.push(attrs.len() - 1);
                attrs.len() - 1
            }
        };
        of_sample.push(a);
    }
    let n = attrs.len();
    let (mut rids, mut users, mut projects, mut sources, mut metas, mut firsts, mut lasts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (s, first, last) in &attrs {
        rids.push(s.resource_id.as_str());
        users.push(s.user_id.as_deref());
        projects.push(s.project_id.as_deref());
        sources.push(s.source.as_str());
        metas.push(sqlx::types::Json(&*s.resource_metadata));
        firsts.push(*first);
        lasts.push(*last);
    }
    let rows: Vec<(i64, i32)> = sqlx::query_as(
        "with input as (
           select u.*, md5(u.metadata::text) as h
           from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::timestamptz[], $7::timestamptz[])
             with ordinality as u(resource_id, user_id, project_id, source, metadata, first_seen, last_seen, n)
         ), ins as (
           insert into resource as r (resource_id, user_id, project_id, source, metadata, first_seen, last_seen)
           select resource_id, user_id, project_id, source, (array_agg(metadata))[1], min(first_seen), max(last_seen)
           from input
           group by resource_id, user_id, project_id, source, h
           order by resource_id, user_id, project_id, source, h
           on conflict (resource_id, user_id, project_id, source, md5(metadata::text)) do update set
             first_seen = least(r.first_seen, excluded.first_seen),
             last_seen  = greatest(r.last_seen, excluded.last_seen)
           returning r.id, r.resource_id, r.user_id, r.project_id, r.source, md5(r.metadata::text) as h
         )
         select i.n, ins.id from input i join ins on ins.resource_id = i.resource_id and ins.h = i.h
           and ins.user_id is not distinct from i.user_id
           and ins.project_id is not distinct from i.project_id
           and ins.source is not distinct from i.source",
    )
    .bind(&rids)
    .bind(&users)
    .bind(&projects)
    .bind(&sources)
    .bind(&metas)
    .bind(&firsts)
    .bind(&lasts)
    .fetch_all(&mut *conn)
    .await?;
    let mut ids = vec![None; n];
    for (at, id) in rows {
        if let Some(slot) = usize::try_from(at - 1).ok().and_then(|i| ids.get_mut(i)) {
            *slot = Some(id);
        }
    }
    let ids: Vec<i32> = ids
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| StoreError::Refused("an attribution got no row".into()))?;
    Ok(of_sample.into_iter().map(|a| ids[a]).collect())
}

/// (meter id, resource id), (first, last sample time) of one series in a batch.
type SeriesSpan = ((i32, i32), (DateTime<Utc>, DateTime<Utc>));

/// Upserts the first and last sample time of each (meter, resource) series (sorted by key,
/// so concurrent writers lock shared rows in the same order).
async fn upsert_series(
    conn: &mut sqlx::PgConnection,
    series: &[SeriesSpan],
) -> Result<(), StoreError> {
    let (sm, sr): (Vec<i32>, Vec<i32>) = series.iter().map(|(k, _)| *k).unzip();
    let (sf, sl): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) = series.iter().map(|(_, v)| *v).unzip();
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
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A write's place in the order in which concurrent writes insert their samples.
///
/// For writes at once (the collector's batches in flight): everything else of a write
/// (lookups, upserts, late folds, commit) overlaps, but the sample inserts run one after
/// the other, in the order the turns were made. Run at once, two batches append to the
/// same series' index pages in turns, and PostgreSQL then splits those pages in the middle
/// instead of after the newest entry: the primary key's leaf pages were 70 % full instead
/// of 89 % here (5–8 B more per sample).
#[derive(Debug, Default)]
pub struct InsertTurn {
    /// Completes, or is dropped, once the previous write's insert is over.
    after: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Dropped once this write's insert is over (or the write is): the next may go.
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InsertTurn {
    /// The next turn after `last` (the previous turn's signal, replaced by this one's).
    pub fn next(last: &mut Option<tokio::sync::oneshot::Receiver<()>>) -> InsertTurn {
        let (done, rx) = tokio::sync::oneshot::channel();
        InsertTurn {
            after: last.replace(rx),
            done: Some(done),
        }
    }

    async fn wait(&mut self) {
        if let Some(after) = self.after.take() {
            // An error is a dropped sender: that write is over too.
            let _ = after.await;
        }
    }

    fn pass(&mut self) {
        self.done.take();
    }
}

/// SQLSTATE 23505.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
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
        // The table name holds the day as eight digits: years 0..=9999 only (the sample
        // contract keeps timestamps in 1970..=9999; this guards direct callers too).
        if !(0..=9999).contains(&chrono::Datelike::year(&day)) {
            return Err(StoreError::Refused(format!(
                "day {day} is outside the years a partition can be named for"
            )));
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
        conn: &mut sqlx::PgConnection,
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
        .fetch_one(&mut *conn)
        .await?;
        self.meters
            .entry(s.name.clone())
            .or_default()
            .push((s.kind, s.unit.clone(), id));
        Ok(id)
    }

    /// Writes `samples`; duplicates (same meter, resource, timestamp, whether already stored
    /// or repeated within `samples`) are ignored, the first of repeated samples wins. The
    /// samples are written in one transaction: none is stored if it fails.
    ///
    /// Samples are inserted with an index probe per row (`not exists`) rather than
    /// `on conflict do nothing`, whose speculative insertion costs PostgreSQL about a quarter
    /// more per row in batches of 20,000 (docs/storage.md, "Ingest"). The probe cannot see rows that a
    /// concurrent writer has not committed yet: the insert then waits for that writer and
    /// fails with a unique violation, and the batch is written again with
    /// `on conflict do nothing`. Rows are inserted in key order, so two writers sharing keys
    /// wait for each other in one direction only.
    pub async fn write(&mut self, samples: &[Sample]) -> Result<Written, StoreError> {
        self.write_in_turn(samples, &mut InsertTurn::default())
            .await
    }

    /// [`write`](Self::write), inserting the samples in `turn` (only the first attempt
    /// waits for it).
    pub async fn write_in_turn(
        &mut self,
        samples: &[Sample],
        turn: &mut InsertTurn,
    ) -> Result<Written, StoreError> {
        if samples.is_empty() {
            return Ok(Written::default());
        }
        let mut result = self.write_inner(samples, Insert::Probe, turn).await;
        if let Err(StoreError::Permanent(e)) = &result
            && is_unique_violation(e)
        {
            tracing::info!(error = %e, "Concurrent insert of the same samples; writing the batch again with on conflict do nothing.");
            self.forget_cached();
            result = self.write_inner(samples, Insert::OnConflict, turn).await;
        }
        if result.is_err() {
            self.forget_cached();
        }
        result
    }

    /// After a failure: retention may have removed a meter we cached, a rolled-back
    /// transaction a partition; look them up again.
    fn forget_cached(&mut self) {
        self.partitions.clear();
        self.meters.clear();
    }

    async fn write_inner(
        &mut self,
        samples: &[Sample],
        how: Insert,
        turn: &mut InsertTurn,
    ) -> Result<Written, StoreError> {
        // 1. Partitions, then meters, resources and series, committed in short transactions
        //    before the samples' one: that transaction then locks no resource or series row,
        //    so two of them (this collector's next batch, another collector) can write the
        //    same series at once. Should the samples' transaction fail, the resources'
        //    metadata and first/last seen and the series' first/last time may already show
        //    the batch; writing it again is idempotent.
        let days: HashSet<NaiveDate> = samples.iter().map(|s| s.timestamp.date_naive()).collect();
        let missing: Vec<NaiveDate> = days
            .into_iter()
            .filter(|d| !self.partitions.contains(d))
            .collect();
        if !missing.is_empty() {
            let mut tx = self.pool.begin().await?;
            for d in missing {
                self.ensure_partition(&mut tx, d).await?;
            }
            tx.commit().await?;
        }
        let mut conn = self.pool.acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut meter_ids = Vec::with_capacity(samples.len());
        for s in samples {
            meter_ids.push(self.meter_id(&mut tx, s).await?);
        }
        let attr_ids = upsert_attributions(&mut tx, samples).await?;

        // Rows in key order, repeated keys dropped (the first wins): the probe cannot see rows
        // of its own statement, concurrent writers insert shared keys in the same order (no
        // deadlock), and sorted rows fill each series' index and heap pages together (one
        // resource's samples of a batch share heap pages).
        let mut rows: Vec<(i32, i32, DateTime<Utc>, usize)> = samples
            .iter()
            .zip(&meter_ids)
            .enumerate()
            .map(|(i, (s, m))| (*m, attr_ids[i], s.timestamp, i))
            .collect();
        rows.sort_unstable();
        rows.dedup_by_key(|r| (r.0, r.1, r.2));
        let (mut ts, mut mid, mut rid, mut vol) = (
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
        );
        // Series: first and last time per (meter, resource) in this batch.
        let mut series: Vec<SeriesSpan> = Vec::new();
        for &(m, r, t, i) in &rows {
            ts.push(t);
            mid.push(m);
            rid.push(r);
            vol.push(samples[i].volume);
            match series.last_mut() {
                // Rows are sorted by (meter, resource, ts): the last time is the newest.
                Some((k, (_, last))) if *k == (m, r) => *last = t,
                _ => series.push(((m, r), (t, t))),
            }
        }
        upsert_series(&mut tx, &series).await?;
        tx.commit().await?;

        // 2. The samples and the late hours' rollups, in one transaction.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let watermark = rollup::writer_watermark(&mut tx).await?;
        let oldest = ts.iter().min().copied();
        turn.wait().await;
        // Samples of rolled-up hours: learn which hours got new rows, and fold them in.
        let late_before = watermark.filter(|w| oldest.is_some_and(|o| o < *w));
        let inserted = if let Some(w) = late_before {
            type HourRows = Vec<(i32, i32, DateTime<Utc>, i64)>;
            let hours: Result<HourRows, sqlx::Error> = sqlx::query_as(AssertSqlSafe(format!(
                "with ins as (
                   {}
                   returning meter_id, resource_id, ts)
                 select meter_id, resource_id, date_bin('1 hour', ts, {}), count(*)
                 from ins group by 1, 2, 3 order by 1, 2, 3",
                how.sql(),
                rollup::EPOCH
            )))
            .bind(&ts)
            .bind(&mid)
            .bind(&rid)
            .bind(&vol)
            .fetch_all(&mut *tx)
            .await;
            turn.pass();
            let hours = hours?;
            let late: Vec<(i32, i32, DateTime<Utc>)> = hours
                .iter()
                .filter(|h| h.2 < w)
                .map(|h| (h.0, h.1, h.2))
                .collect();
            rollup::fold_late(&mut tx, &late).await?;
            hours.iter().map(|h| h.3 as u64).sum()
        } else {
            let done = sqlx::query(how.sql())
                .bind(&ts)
                .bind(&mid)
                .bind(&rid)
                .bind(&vol)
                .execute(&mut *tx)
                .await;
            turn.pass();
            done?.rows_affected()
        };
        tx.commit().await?;
        Ok(Written {
            inserted,
            duplicates: samples.len() as u64 - inserted,
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

#[cfg(test)]
mod tests {
    use super::InsertTurn;

    #[tokio::test]
    async fn turns_go_in_order_and_a_dropped_turn_lets_the_next_go() {
        let mut last = None;
        let mut first = InsertTurn::next(&mut last);
        let mut second = InsertTurn::next(&mut last);
        let mut third = InsertTurn::next(&mut last);
        first.wait().await; // the first waits for nobody
        let waiting = tokio::spawn(async move {
            second.wait().await;
            second
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "the second went before the first passed"
        );
        first.pass();
        let second = waiting.await.unwrap();
        // The second write ends without inserting (an error before its insert): dropped.
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), third.wait())
            .await
            .expect("the third goes once the second is dropped");
    }
}
