//! PostgreSQL storage: migrations, daily partitions, idempotent batched inserts.
//!
//! Where things are: `error` (StoreError, classified for the ack decision), `locks` (the
//! advisory locks and their order), `partitions`, `attribution` (the `resource` rows
//! samples point to), `write` (a batch's transactions), `rollup` (per-minute rollups and
//! their late folds), `retention`, `hourcodec` (the codec of compacted hours) and `compact`
//! (the compaction job and the writers' merges into compacted hours, issue 18). The background jobs that run rollups and retention
//! are in [`crate::jobs`].

use std::collections::{HashMap, HashSet};

use chrono::NaiveDate;
use sqlx::postgres::{PgPool, PgPoolOptions};

mod attribution;
pub mod compact;
mod error;
pub mod hourcodec;
pub mod locks;
mod partitions;
mod retention;
pub mod rollup;
mod write;

pub use error::StoreError;
pub use partitions::partition_days;
pub use retention::Retention;
pub use write::{InsertTurn, Written};

/// Embedded, numbered migrations (collector/migrations), applied at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The storage handle: a pool plus caches of meter ids and existing partitions.
pub struct Store {
    pool: PgPool,
    /// Meter name → (type, unit, id); looked up without allocating.
    meters: HashMap<String, Vec<(vmeter_core::SampleType, String, i32)>>,
    partitions: HashSet<NaiveDate>,
    /// The compaction watermark as this store last read it (it only grows): the days that
    /// end before it need no narrow partition (their samples go to `sample_hour`).
    compacted_to: Option<chrono::DateTime<chrono::Utc>>,
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

impl Store {
    /// Wraps a pool; call [`migrate`](Self::migrate) before use.
    pub fn new(pool: PgPool) -> Self {
        Store {
            pool,
            meters: HashMap::new(),
            partitions: HashSet::new(),
            compacted_to: None,
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
}
