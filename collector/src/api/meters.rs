//! `GET /v2/meters`.

use axum::extract::{RawQuery, State};
use axum::response::Response;
use base64::Engine as _;
use serde_json::json;
use sqlx::{QueryBuilder, Row};

use super::Api;
use super::auth::Caller;
use super::error::ApiError;
use super::query::{Fields, limit, request};
use super::sql::push_cond;
use super::stream::stream_list;

/// `GET /v2/meters`: one entry per (meter, resource, project, user, source)
/// (`unique=true`: one per meter).
pub(super) async fn list_meters(
    State(api): State<Api>,
    who: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let fields = Fields {
        timestamp: false,
        meter: false,
        message_id: false,
    };
    let (q, c) = request(&who, raw.as_deref(), &["unique"], fields)?;
    let unique = matches!(q.param("unique"), Some("true" | "True" | "1"));
    let mut qb = QueryBuilder::new(if unique {
        "select distinct m.name, m.type, m.unit, null::text, null::text, null::text, null::text
         from series se join meter m on m.id = se.meter_id join resource r on r.id = se.resource_id where true"
    } else {
        // One entry per (meter, resource, project, user, source): a resource whose samples
        // changed owner is listed once per owner, as Ceilometer's SQL driver did.
        "select distinct m.name, m.type, m.unit, r.resource_id, r.project_id, r.user_id, r.source
         from series se join meter m on m.id = se.meter_id join resource r on r.id = se.resource_id where true"
    });
    push_cond(&mut qb, &c, false);
    qb.push(if unique {
        " order by 1, 2, 3 limit "
    } else {
        " order by 1, 4, 5, 6, 7 limit "
    });
    qb.push_bind(limit(&api, &q)?);
    stream_list(api.pool.clone(), qb, |r| {
        let (name, kind, unit): (String, String, String) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        let rid: Option<String> = r.try_get(3)?;
        Ok(json!({
            "name": name,
            "type": kind,
            "unit": unit,
            "resource_id": rid,
            "project_id": r.try_get::<Option<String>, _>(4)?,
            "user_id": r.try_get::<Option<String>, _>(5)?,
            "source": r.try_get::<Option<String>, _>(6)?,
            "meter_id": rid.as_ref().map(|rid| base64::engine::general_purpose::STANDARD.encode(format!("{rid}+{name}"))),
        }))
    })
    .await
}
