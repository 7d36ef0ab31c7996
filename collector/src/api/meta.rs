//! What every API answers besides the data: Ceilometer's version documents, 410 for what
//! Ceilometer moved to other services (alarms to Aodh, events to Panko), and JSON errors for
//! unknown paths and methods.

use axum::Json;
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::error::ApiError;

/// The v2 version entry of Ceilometer's version document, its links on `host`.
fn v2_entry(headers: &HeaderMap) -> Value {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    json!({
        "id": "v2",
        "status": "stable",
        "updated": "2013-02-13T00:00:00Z",
        "media-types": [
            {"base": "application/json", "type": "application/vnd.openstack.telemetry-v2+json"}
        ],
        "links": [
            {"rel": "self", "href": format!("http://{host}/v2")},
            {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"}
        ]
    })
}

/// `GET /`: Ceilometer's version document (clients that discover versions read it).
pub(super) async fn versions(headers: HeaderMap) -> Json<Value> {
    Json(json!({"versions": {"values": [v2_entry(&headers)]}}))
}

/// `GET /v2`: the one version.
pub(super) async fn version_v2(headers: HeaderMap) -> Json<Value> {
    Json(json!({"version": v2_entry(&headers)}))
}

/// Alarms: Ceilometer moved them to Aodh and answered 410 Gone saying so.
pub(super) async fn gone_alarms() -> ApiError {
    ApiError::Gone(
        "Alarms are not part of this telemetry API (vmeter stores meters only); use Aodh.".into(),
    )
}

/// Events and event types: Ceilometer moved them to Panko and answered 410 Gone.
pub(super) async fn gone_events() -> ApiError {
    ApiError::Gone(
        "Events are not part of this telemetry API (vmeter stores meters only); use Panko.".into(),
    )
}

/// Any other path: a JSON 404, in the shape of every other error.
pub(super) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("The resource could not be found: {}", uri.path()))
}

/// A known path with a method it does not take: a JSON 405.
pub(super) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

/// `GET /v2/capabilities`.
pub(super) async fn capabilities() -> Json<Value> {
    let agg = json!({"standard": true, "selectable": {"max": true, "min": true, "sum": true, "avg": true, "count": true, "stddev": true, "cardinality": true, "quartile": false}});
    Json(json!({
        "api": {
            "meters": {"query": {"simple": true, "metadata": true}},
            "resources": {"query": {"simple": true, "metadata": true}},
            "samples": {"query": {"simple": true, "metadata": true, "complex": false}},
            "statistics": {"groupby": true, "query": {"simple": true, "metadata": true}, "aggregation": agg},
        },
        "storage": {"storage:production_ready": true},
    }))
}
