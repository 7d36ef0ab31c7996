//! Writing a batch: meters, attributions, series, then the samples in one transaction.

use std::collections::HashSet;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::AssertSqlSafe;
use vmeter_core::Sample;

use super::attribution::upsert_attributions;
use super::error::{StoreError, is_unique_violation};
use super::{Store, compact, rollup};

/// Result of writing one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// New rows.
    pub inserted: u64,
    /// Samples that were already stored (redeliveries): ignored.
    pub duplicates: u64,
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

/// Whether day `d` ends before the compaction watermark `c`.
fn compacted_day(d: &NaiveDate, c: Option<DateTime<Utc>>) -> bool {
    let end = d.succ_opt().and_then(|n| n.and_hms_opt(0, 0, 0));
    end.zip(c).is_some_and(|(end, c)| end.and_utc() <= c)
}

impl Store {
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
        //    A day that ends before the compaction watermark needs none: its samples are
        //    merged into `sample_hour` (its partition may have been dropped). The watermark
        //    is read again when a day's partition is not known (it only grows).
        let days: HashSet<NaiveDate> = samples.iter().map(|s| s.timestamp.date_naive()).collect();
        let missing: Vec<NaiveDate> = days
            .into_iter()
            .filter(|d| !self.partitions.contains(d) && !compacted_day(d, self.compacted_to))
            .collect();
        if !missing.is_empty() {
            let mut tx = self.pool.begin().await?;
            self.compacted_to = compact::watermark(&mut tx).await?;
            for d in missing {
                if !compacted_day(&d, self.compacted_to) {
                    self.ensure_partition(&mut tx, d).await?;
                }
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
        let (mut ts, mut mid, mut rid, mut vol): (
            Vec<DateTime<Utc>>,
            Vec<i32>,
            Vec<i32>,
            Vec<f64>,
        ) = (
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

        // 2. The samples and the late hours' rollups, in one transaction. The turn is
        //    waited for before the transaction takes ROLLUP_LOCK: waiting for the previous
        //    batch while holding it shared deadlocks once the rollup job queues for it
        //    exclusively (the previous batch's shared request then queues behind the job,
        //    which waits for this batch, which waits for the previous one; PostgreSQL cannot
        //    see the wait in this process). Seen as a collector that stored nothing more.
        turn.wait().await;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        // Compacted hours are all rolled up: a sample before `compacted` is late for both.
        let (watermark, compacted) = rollup::writer_watermarks(&mut tx).await?;
        self.compacted_to = compacted;
        // Samples of compacted hours are merged into their compacted rows and nothing else:
        // those hours have no rollup rows any more, and their day's narrow partition may be
        // gone. The rows are sorted by time within a series: each hour's list is in order.
        let mut merge = compact::LateSamples::new();
        if let Some(c) = compacted.filter(|c| ts.iter().any(|t| t < c)) {
            let mut keep = 0;
            for i in 0..ts.len() {
                if ts[i] < c {
                    merge
                        .entry((mid[i], rid[i], rollup::floor_hour(ts[i])))
                        .or_default()
                        .push((ts[i].timestamp_micros(), vol[i]));
                } else {
                    (ts[keep], mid[keep], rid[keep], vol[keep]) = (ts[i], mid[i], rid[i], vol[i]);
                    keep += 1;
                }
            }
            ts.truncate(keep);
            mid.truncate(keep);
            rid.truncate(keep);
            vol.truncate(keep);
        }
        let oldest = ts.iter().min().copied();
        // Samples of rolled-up hours: learn which hours got new rows, and fold them in.
        let late_before = watermark.filter(|w| oldest.is_some_and(|o| o < *w));
        let mut inserted = if ts.is_empty() {
            turn.pass();
            0
        } else if let Some(w) = late_before {
            // The rows this statement inserted (not the duplicates it skipped).
            type Inserted = Vec<(i32, i32, DateTime<Utc>)>;
            let rows: Result<Inserted, sqlx::Error> = sqlx::query_as(AssertSqlSafe(format!(
                "{} returning meter_id, resource_id, ts",
                how.sql()
            )))
            .bind(&ts)
            .bind(&mid)
            .bind(&rid)
            .bind(&vol)
            .fetch_all(&mut *tx)
            .await;
            turn.pass();
            let rows = rows?;
            let mut late: Vec<(i32, i32, DateTime<Utc>)> = rows
                .iter()
                .filter(|r| r.2 < w)
                .map(|r| (r.0, r.1, rollup::floor_hour(r.2)))
                .collect();
            late.sort_unstable();
            late.dedup();
            rollup::fold_late(&mut tx, &late).await?;
            rows.len() as u64
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
        inserted += compact::merge_late(&mut tx, &merge).await?;
        tx.commit().await?;
        Ok(Written {
            inserted,
            duplicates: samples.len() as u64 - inserted,
        })
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
        // The test runtime has one thread: each yield lets the spawned waiter run. Had it
        // not waited for the first turn, it would be done after its first poll.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
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
