//! vmeter's notification service: the single active consumer of the raw queue, applying
//! Ceilometer's `pipeline.yaml`.
//!
//! Module map:
//! - [`definition`]: pipeline.yaml parsing and validation (sources, sinks, publishers).
//! - [`meters`]: meter globs of a source.
//! - [`expr`]: the small expression language of `scale` and arithmetic `expr`.
//! - [`transformers`]: the six transformers and their shared pieces.
//! - [`pipeline`]: the runtime — publish contexts, chains, flushes.
//! - [`replay`]: the offline `replay` tool.
//! - [`service`]: the AMQP consumer loop and its config.

pub mod definition;
pub mod expr;
pub use vmeter_core::meters;
pub mod pipeline;
pub mod replay;
pub mod service;
pub mod state;
pub mod transformers;
