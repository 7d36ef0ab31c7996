//! Shared pieces of vmeter, used by all three services.
//!
//! Module map:
//! - [`sample`]: the [`Sample`] type — Ceilometer's fields plus `monotonic_time`.
//! - [`contract`]: the sample contract (lengths, characters, finite volumes, timestamp
//!   window, metadata depth and size) that every door checks.
//! - [`wire`]: one AMQP message = one msgpack batch of samples; headers and format version.
//! - [`signing`]: HMAC-SHA256 over the exact body bytes, verified in constant time.
//! - [`amqp`]: broker topology (exchange, queues, dead-letter), connection with back-off,
//!   a publisher that waits for confirms and treats returns and nacks as errors.
//! - [`config`]: one YAML file + `VMETER_<SECTION>__<KEY>` environment overrides, errors that
//!   name the file, line and key.
//! - [`telemetry`]: tracing setup and a small Prometheus counter registry.
//! - [`http`]: the `/health` and `/metrics` endpoints every service exposes.
//! - [`service`]: the skeleton every service runs in (config exit code 2, runtime, HTTP
//!   endpoint bound before the work starts, exit codes).
//! - [`shutdown`]: SIGINT/SIGTERM as a watch channel.
//! - [`meters`]: meter selection with shell globs and `!` exclusions (pipeline.yaml and
//!   polling.yaml sources share the rules).

pub mod amqp;
pub mod config;
pub mod contract;
pub mod http;
pub mod meters;
pub mod sample;
pub mod service;
pub mod shutdown;
pub mod signing;
pub mod telemetry;
pub mod tls_server;
pub mod wire;

pub use sample::{Metadata, Sample, SampleType};
