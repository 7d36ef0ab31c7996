//! vmeter's collector: stores processed samples in PostgreSQL and serves the v2 query API.
//!
//! Module map:
//! - [`store`]: schema migrations, partitions, idempotent batched inserts, rollups, retention.
//! - [`jobs`]: the background jobs (partitions ahead and retention, rollups).
//! - [`ingest`]: the AMQP consumer loop (ack after commit, dead-letter what can never be stored).
//! - [`api`]: the Ceilometer-v2-style HTTP API.
//! - [`keystone`]: Keystone v3 token validation for the API.
//! - [`jsonw`]: the JSON writer behind the API's large answers.
//! - [`config`]: the `collector.yaml` structure.

pub mod api;
pub mod config;
pub mod ingest;
pub mod jobs;
pub mod jsonw;
pub mod keystone;
pub mod raw;
pub mod store;
