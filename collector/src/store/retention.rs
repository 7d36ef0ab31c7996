//! Retention: whole expired days dropped, then what has no samples left.

use chrono::{DateTime, Duration, Utc};
use sqlx::AssertSqlSafe;

use super::error::StoreError;
use super::partitions::partition_days;
use super::{Store, locks};

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
    /// Compacted series-hours of the dropped days.
    pub compacted_rows: u64,
}

impl Store {
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
        locks::exclusive(&mut tx, locks::ROLLUP_LOCK).await?;
        locks::exclusive(&mut tx, locks::PARTITION_LOCK).await?;
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
            // Compacted hours of the dropped days.
            out.compacted_rows = sqlx::query("delete from sample_hour where hour < $1")
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
