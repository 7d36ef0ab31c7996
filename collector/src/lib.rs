//! vmeter's collector: stores processed samples in PostgreSQL and serves the v2 query API.
//!
//! Module map:
//! - [`store`]: schema migrations, partitions, idempotent batched inserts.
//! - [`rollup`]: per-minute rollups of closed hours, for statistics.
//! - [`ingest`]: the AMQP consumer loop (ack after commit, dead-letter what can never be stored).
//! - [`api`]: the Ceilometer-v2-style HTTP API.
//! - [`keystone`]: Keystone v3 token validation for the API.
//! - [`jsonw`]: the JSON writer behind the API's large answers.
//! - [`config`]: the `collector.yaml` structure.

pub mod api;
pub mod config;
pub mod ingest;
pub mod jsonw;
pub mod keystone;
pub mod raw;
pub mod rollup;
pub mod store;
