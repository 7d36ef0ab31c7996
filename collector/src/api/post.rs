//! `POST /v2/meters/{meter}`: posted samples checked, scoped and published or stored.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use vmeter_core::{Sample, SampleType};

use super::Api;
use super::auth::Caller;
use super::error::ApiError;
use super::ids::named_sample_id;
use super::query::parse_query;
use super::shape::{flatten_metadata, iso};

/// `POST /v2/meters/{meter}`: a list of OldSample. `direct=true` stores them at once;
/// otherwise they are published to the raw queue so the pipeline sees them. Answers 201
/// with the samples as accepted (ids filled).
pub(super) async fn post_samples(
    State(api): State<Api>,
    who: Caller,
    headers: HeaderMap,
    Path(meter): Path<String>,
    RawQuery(raw): RawQuery,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Vec<Value>>), ApiError> {
    let q = parse_query(raw.as_deref())?;
    q.only(&["direct"])?;
    let direct = matches!(q.param("direct"), Some("true" | "True" | "1"));
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let samples = parse_post_body(&meter, &body, &who, &header, &api.contract, Utc::now())?;
    if let Caller::Project(p) = &who {
        owned_by(&api, p, &samples).await?;
    }
    if direct {
        let mut store = crate::store::Store::new(api.pool.clone());
        store.write(&samples).await.map_err(|e| {
            if e.is_data() {
                ApiError::BadRequest(e.to_string())
            } else {
                ApiError::Internal(e.to_string())
            }
        })?;
    } else {
        let Some(raw) = &api.raw else {
            return Err(ApiError::BadRequest(
                "this collector does not publish to the pipeline; use direct=true".into(),
            ));
        };
        raw.publish(samples.clone())
            .await
            .map_err(ApiError::Internal)?;
    }
    let out = samples
        .into_iter()
        .map(|s| {
            json!({
                "source": s.source,
                "counter_name": s.name,
                "counter_type": s.kind.as_str(),
                "counter_unit": s.unit,
                "counter_volume": s.volume,
                "user_id": s.user_id,
                "project_id": s.project_id,
                "resource_id": s.resource_id,
                "timestamp": iso(s.timestamp),
                "resource_metadata": flatten_metadata(&s.resource_metadata),
                "message_id": named_sample_id(&s.name, &s.resource_id, s.timestamp),
            })
        })
        .collect();
    Ok((StatusCode::CREATED, Json(out)))
}

/// The samples of a `POST /v2/meters/{meter}` body (a JSON list of OldSample), each
/// checked against the sample contract at `now`; a 400 names the first bad sample and why.
/// Pure (no I/O): the fuzz tests drive it with hostile bodies.
pub fn parse_post_body(
    meter: &str,
    body: &[u8],
    who: &Caller,
    header: &dyn Fn(&str) -> Option<String>,
    contract: &vmeter_core::contract::Contract,
    now: DateTime<Utc>,
) -> Result<Vec<Sample>, ApiError> {
    let list: Vec<Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("body is not a JSON list of samples: {e}")))?;
    let mut samples = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let s = posted_sample(meter, v, who, header, contract)
            .map_err(|m| ApiError::BadRequest(format!("sample {i}: {m}")))?;
        contract
            .check(&s, now)
            .map_err(|v| ApiError::BadRequest(format!("sample {i}: {v}")))?;
        samples.push(s);
    }
    Ok(samples)
}

/// Refuses (403) samples for resources whose newest sample belongs to another project than
/// `project`. Each sample keeps its own attribution, so such a post could not change what
/// the other project sees; it is refused all the same, as a post into another project's
/// resource is an error or an attack. A resource moved to `project` (its newest samples
/// are `project`'s) takes posts again.
pub(super) async fn owned_by(api: &Api, project: &str, samples: &[Sample]) -> Result<(), ApiError> {
    let mut rids: Vec<&str> = samples.iter().map(|s| s.resource_id.as_str()).collect();
    rids.sort_unstable();
    rids.dedup();
    let other: Option<String> = sqlx::query_scalar(
        "select resource_id from (
           select distinct on (resource_id) resource_id, project_id from resource
           where resource_id = any($1::text[]) order by resource_id, last_seen desc, id desc) n
         where project_id is distinct from $2 limit 1",
    )
    .bind(&rids)
    .bind(project)
    .fetch_optional(&api.pool)
    .await?;
    match other {
        Some(r) => Err(ApiError::Forbidden(format!(
            "resource {r} belongs to another project"
        ))),
        None => Ok(()),
    }
}

/// One posted OldSample → a Sample, with Ceilometer's rules: `counter_name` must be the
/// path's meter, no `message_id`, user/project default from `X-User-Id`/`X-Project-Id`,
/// a project token may only post for its project, `source` becomes `<project>:<source>`,
/// flat dotted metadata keys are nested again.
pub(super) fn posted_sample(
    meter: &str,
    v: &Value,
    who: &Caller,
    header: &dyn Fn(&str) -> Option<String>,
    contract: &vmeter_core::contract::Contract,
) -> Result<Sample, String> {
    let o = v.as_object().ok_or("not an object")?;
    let text = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
    let name = text("counter_name").ok_or("counter_name is required")?;
    if name != meter {
        return Err(format!(
            "counter_name {name} does not match the URL's meter {meter}"
        ));
    }
    if o.get("message_id").is_some_and(|m| !m.is_null()) {
        return Err("message_id must not be set".into());
    }
    let kind = text("counter_type")
        .and_then(|t| SampleType::parse(&t))
        .ok_or("counter_type must be gauge, delta or cumulative")?;
    let unit = text("counter_unit").ok_or("counter_unit is required")?;
    let volume = match o.get("counter_volume") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|v: &f64| v.is_finite())
    .ok_or("counter_volume must be a number")?;
    let resource_id = text("resource_id").ok_or("resource_id is required")?;
    let project_id = text("project_id").or_else(|| header("x-project-id"));
    let user_id = text("user_id").or_else(|| header("x-user-id"));
    if let Caller::Project(p) = who
        && project_id.as_deref().is_some_and(|x| x != p)
    {
        return Err(format!(
            "not authorized to post samples for project {}",
            project_id.unwrap_or_default()
        ));
    }
    let project_id = match who {
        Caller::Project(p) => Some(project_id.unwrap_or_else(|| p.clone())),
        Caller::Admin => project_id,
    };
    let timestamp = match text("timestamp") {
        Some(t) => vmeter_core::sample::parse_timestamp(&t)
            .ok_or(format!("timestamp {t:?} is not ISO-8601"))?,
        None => Utc::now(),
    };
    let source = format!(
        "{}:{}",
        project_id.clone().unwrap_or_default(),
        text("source").unwrap_or_else(|| vmeter_core::sample::DEFAULT_SOURCE.to_string())
    );
    let mut md = Map::new();
    if let Some(m) = o.get("resource_metadata").and_then(Value::as_object) {
        for (k, v) in m {
            let mut cur = &mut md;
            // Each dot is a level of nesting: refuse before building what the contract
            // would refuse anyway (10,000 dots would be 10,000 nested maps).
            if k.split('.').count() > contract.max_metadata_depth {
                return Err(format!(
                    "resource_metadata key has more than {} dotted parts",
                    contract.max_metadata_depth
                ));
            }
            let parts: Vec<&str> = k.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                let e = cur
                    .entry(p.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !e.is_object() {
                    *e = Value::Object(Map::new());
                }
                cur = e.as_object_mut().expect("object");
            }
            cur.insert(parts[parts.len() - 1].to_string(), v.clone());
        }
    }
    Ok(Sample {
        name,
        kind,
        unit,
        volume,
        user_id,
        project_id,
        resource_id,
        timestamp,
        resource_metadata: Arc::new(md),
        source,
        message_id: uuid::Uuid::new_v4(),
        monotonic_time: None,
    })
}
