//! `GET /v2/resources`, `GET /v2/resources/{id}`.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Postgres, QueryBuilder, Row};

use super::Api;
use super::auth::Caller;
use super::error::ApiError;
use super::query::{Cond, Fields, limit, request};
use super::samples::SAMPLES;
use super::shape::resource_json;
use super::sql::{push_cond, resource_part};
use super::stream::stream_list;

/// `GET /v2/resources`.
pub(super) async fn list_resources(
    State(api): State<Api>,
    who: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let fields = Fields {
        timestamp: true,
        meter: true,
        message_id: false,
    };
    let (q, c) = request(&who, raw.as_deref(), &["meter_links"], fields)?;
    let links = !matches!(q.param("meter_links"), Some("0" | "false" | "False"));
    let qb = resources_query(&c, limit(&api, &q)?);
    stream_list(api.pool.clone(), qb, move |r| {
        Ok(resource_json(resource_row(r)?, &headers, links))
    })
    .await
}

/// `GET /v2/resources/{id}`.
pub(super) async fn one_resource(
    State(api): State<Api>,
    who: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, mut c) = request(&who, None, &[], SAMPLES)?;
    c.resource = Some(id.clone());
    let row = fetch_resources(&api, &c, 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound(format!("Resource {id} Not Found")))?;
    Ok(Json(resource_json(row, &headers, true)))
}

pub(super) struct ResourceRow {
    pub(super) rid: String,
    pub(super) user: Option<String>,
    pub(super) project: Option<String>,
    pub(super) source: Option<String>,
    pub(super) md: Value,
    pub(super) first: DateTime<Utc>,
    pub(super) last: DateTime<Utc>,
    pub(super) meters: Vec<String>,
}

/// Resources under `c`, each as its newest attribution among those `c` selects (a
/// resource's attribution is per sample: see migration 0004). Time filters select the
/// attributions whose first..last sample span overlaps the range (kept per attribution
/// instead of scanning samples); first and last seen are over the selected ones, and the
/// meters are those of the selected ones.
pub(super) async fn fetch_resources(
    api: &Api,
    c: &Cond,
    limit: i64,
) -> Result<Vec<ResourceRow>, ApiError> {
    let rows = resources_query(c, limit)
        .build()
        .fetch_all(&api.pool)
        .await?;
    rows.iter()
        .map(resource_row)
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ApiError::from)
}

/// The resources `c` selects, in resource id order, at most `limit` (see
/// [`fetch_resources`]).
pub(super) fn resources_query(c: &Cond, limit: i64) -> QueryBuilder<Postgres> {
    let mut qb = QueryBuilder::new(
        "select n.resource_id, n.user_id, n.project_id, n.source, n.metadata, g.first_seen, g.last_seen,
                coalesce((select array_agg(distinct m.name order by m.name) from series se join meter m on m.id = se.meter_id
                          where se.resource_id = any(g.ids)), '{}')
         from (select r.resource_id, min(r.first_seen) as first_seen, max(r.last_seen) as last_seen,
                      array_agg(r.id order by r.last_seen desc, r.id desc) as ids
               from resource r where true",
    );
    push_cond(&mut qb, &resource_part(c), false);
    if let Some(m) = &c.meter {
        qb.push(" and exists (select 1 from series se join meter m on m.id = se.meter_id where se.resource_id = r.id and m.name = ");
        qb.push_bind(m.clone());
        qb.push(")");
    }
    if let Some(t) = c.start() {
        qb.push(" and r.last_seen >= ");
        qb.push_bind(t);
    }
    if let Some(t) = c.end() {
        qb.push(" and r.first_seen <= ");
        qb.push_bind(t);
    }
    qb.push(" group by r.resource_id order by r.resource_id limit ");
    qb.push_bind(limit);
    qb.push(") g join resource n on n.id = g.ids[1] order by g.resource_id");
    qb
}

pub(super) fn resource_row(r: &sqlx::postgres::PgRow) -> Result<ResourceRow, sqlx::Error> {
    Ok(ResourceRow {
        rid: r.try_get(0)?,
        user: r.try_get(1)?,
        project: r.try_get(2)?,
        source: r.try_get(3)?,
        md: r.try_get(4)?,
        first: r.try_get(5)?,
        last: r.try_get(6)?,
        meters: r.try_get(7)?,
    })
}
