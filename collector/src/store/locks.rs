//! The advisory locks of the storage, in one place.
//!
//! Lock order, everywhere: [`ROLLUP_LOCK`] before [`PARTITION_LOCK`]. Who takes what:
//!
//! | lock | exclusive | shared |
//! |---|---|---|
//! | [`ROLLUP_LOCK`] | the rollup and compaction jobs (advancing their watermarks), retention | every sample write, until it commits |
//! | [`PARTITION_LOCK`] | creating a partition, retention and the compaction job (dropping partitions) | — |
//!
//! Never wait for anything in this process (a turn, a channel, another task) while holding
//! one of these locks: PostgreSQL's deadlock detector cannot see that wait. A shared request
//! queues behind a waiting exclusive one, so a writer holding [`ROLLUP_LOCK`] shared while it
//! waits for an earlier writer deadlocks as soon as the rollup job asks for it.

use sqlx::PgConnection;

/// Rollups: exclusive for the rollup job and retention, shared for sample writes.
pub const ROLLUP_LOCK: i64 = 7_266_315_513;

/// Partitions of `sample`: creating and dropping them is serialised between collectors.
pub const PARTITION_LOCK: i64 = 7_266_315_512;

/// Takes `key` exclusively until the transaction on `conn` ends.
pub async fn exclusive(conn: &mut PgConnection, key: i64) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(key)
        .execute(conn)
        .await
        .map(|_| ())
}
