//! Daily partitions of `sample`: named `sample_pYYYYMMDD`, made ahead and on demand.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use sqlx::{AssertSqlSafe, Postgres, Transaction};

use super::error::StoreError;
use super::{Store, locks};

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

impl Store {
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

    pub(super) async fn ensure_partition(
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
        locks::exclusive(tx, locks::PARTITION_LOCK).await?;
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
}
