//! The Ceilometer-v2-style HTTP API.
//!
//! Routes: `GET /v2/meters`, `GET|POST /v2/meters/{meter}`, `GET /v2/meters/{meter}/statistics`,
//! `GET /v2/samples`, `GET /v2/samples/{id}`, `GET /v2/resources`, `GET /v2/resources/{id}`,
//! `GET /v2/capabilities`. Shapes, filters and statistics semantics follow Ceilometer 9's v2
//! API (reference §g.3); where vmeter differs it says so in docs/api.md.
//!
//! Errors are JSON `{"error_message": {"faultstring": "…"}}` (Ceilometer's shape) with 400,
//! 401 or 404; internal errors are logged and answered with a generic 500 message, never a
//! trace. All SQL uses bound parameters; meter and resource filters are resolved to integer
//! ids with small lookups first, then samples and statistics are read from the narrow sample
//! table in one statement.
//!
//! Where things are:
//! - `auth`: who is asking (static tokens, Keystone); `Caller` is an extractor, so every
//!   data handler authenticates before it runs.
//! - `error`: `ApiError` and Ceilometer's JSON error shape.
//! - `query`: the `q.*` grammar and the conditions it makes; `sql`: conditions as SQL,
//!   filters resolved to integer ids.
//! - `samples`, `meters`, `resources`, `stats`, `complex`, `post`: one endpoint
//!   family each; `meta`: version documents, 410s, JSON fallbacks, capabilities.
//! - `shape`: JSON shapes of samples and resources; `ids`: sample ids; `stream`:
//!   chunked answers.

use std::sync::Arc;

use axum::Router;
use axum::routing::{any, get};
use sqlx::PgPool;
use vmeter_core::Sample;

use meta::capabilities;
use meters::list_meters;
use post::post_samples;
use resources::{list_resources, one_resource};
use samples::{list_samples, meter_samples, one_sample};

pub use auth::{Auth, Caller};
pub use error::ApiError;
pub use ids::{named_sample_id, parse_named_sample_id, parse_sample_id};
pub use post::parse_post_body;
pub use query::{Filter, Query, parse_query};
pub use shape::flatten_metadata;

mod auth;
mod complex;
mod dashboard;
mod error;
mod ids;
mod meta;
mod meters;
mod post;
mod query;
mod resources;
mod samples;
mod shape;
mod sql;
mod stats;
mod stream;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    pub pool: PgPool,
    pub default_limit: i64,
    /// Largest `limit` a request may ask for (larger: 400).
    pub max_limit: i64,
    /// The sample contract every posted sample must keep (else 400).
    pub contract: vmeter_core::contract::Contract,
    pub auth: Arc<Auth>,
    /// Publishes posted samples to the raw queue (`None`: only `direct=true` is accepted).
    pub raw: Option<Arc<dyn RawPublish>>,
}

/// Publishing posted samples to the raw queue (implemented by the collector over its
/// broker connection).
pub trait RawPublish: Send + Sync {
    fn publish(
        &self,
        samples: Vec<Sample>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
}

/// The API routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v2/meters", get(list_meters))
        .route("/v2/meters/{meter}", get(meter_samples).post(post_samples))
        .route("/v2/meters/{meter}/statistics", get(stats::statistics))
        .route("/v2/samples", get(list_samples))
        .route("/v2/samples/{id}", get(one_sample))
        .route("/v2/resources", get(list_resources))
        .route("/v2/resources/{id}", get(one_resource))
        .route("/v2/capabilities", get(capabilities))
        .route(
            "/v2/query/samples",
            axum::routing::post(complex::query_samples),
        )
        .route("/dashboard", get(dashboard::redirect))
        .route("/dashboard/", get(dashboard::index))
        .route("/dashboard/{*file}", get(dashboard::file))
        .route("/", get(meta::versions))
        .route("/v2", get(meta::version_v2))
        .route("/v2/", get(meta::version_v2))
        .route("/v2/alarms", any(meta::gone_alarms))
        .route("/v2/alarms/{*rest}", any(meta::gone_alarms))
        .route("/v2/events", any(meta::gone_events))
        .route("/v2/events/{*rest}", any(meta::gone_events))
        .route("/v2/event_types", any(meta::gone_events))
        .route("/v2/event_types/{*rest}", any(meta::gone_events))
        .route_layer(axum::middleware::from_fn(timed))
        .fallback(meta::not_found)
        .method_not_allowed_fallback(meta::method_not_allowed)
        .with_state(api)
}

/// Times every request to a known route into `vmeter_api_request_seconds{route, method}`
/// (until the answer's head is ready; a streamed body goes on after).
async fn timed(
    route: axum::extract::MatchedPath,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let res = next.run(req).await;
    vmeter_core::telemetry::histogram(
        "vmeter_api_request_seconds",
        "API requests to known routes, until the answer's head, by route and method.",
        &[("route", route.as_str()), ("method", method.as_str())],
        vmeter_core::telemetry::Buckets::Latency,
    )
    .observe_since(started);
    res
}
