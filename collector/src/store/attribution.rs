//! Attributions: the `resource` rows a batch's samples point to (migration 0004).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use vmeter_core::Sample;

use super::error::StoreError;

/// The attribution of a sample: what it names besides its meter, time and volume.
type AttrKey<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str);

/// Upserts the attributions of `samples` (one statement) and returns each sample's
/// attribution id (a `resource` row), in the order of `samples`.
///
/// An attribution is a distinct (resource id, user, project, source, metadata): see
/// migration 0004. The distinct ones of a batch are found here first (metadata compared by
/// pointer, then by value: the decoder shares one `Arc` per distinct metadata of a
/// message), so that the statement handles each once; PostgreSQL's own key (md5 of the
/// metadata's jsonb text) decides between rows, and the answer maps every input row to its
/// row's id. Rows are inserted and locked in key order: concurrent writers touching the
/// same attributions wait for each other in one direction only.
pub(super) async fn upsert_attributions(
    conn: &mut sqlx::PgConnection,
    samples: &[Sample],
) -> Result<Vec<i32>, StoreError> {
    let mut index: HashMap<AttrKey<'_>, Vec<usize>> = HashMap::new();
    // Distinct attributions: a sample that carries it, first and last time.
    let mut attrs: Vec<(&Sample, DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let mut of_sample = Vec::with_capacity(samples.len());
    for s in samples {
        let key = (
            s.resource_id.as_str(),
            s.user_id.as_deref(),
            s.project_id.as_deref(),
            s.source.as_str(),
        );
        let list = index.entry(key).or_default();
        let found = list.iter().copied().find(|&a| {
            let md = &attrs[a].0.resource_metadata;
            std::sync::Arc::ptr_eq(md, &s.resource_metadata) || **md == *s.resource_metadata
        });
        let a = match found {
            Some(a) => {
                let (_, first, last) = &mut attrs[a];
                *first = (*first).min(s.timestamp);
                *last = (*last).max(s.timestamp);
                a
            }
            None => {
                attrs.push((s, s.timestamp, s.timestamp));
                list.push(attrs.len() - 1);
                attrs.len() - 1
            }
        };
        of_sample.push(a);
    }
    let n = attrs.len();
    let (mut rids, mut users, mut projects, mut sources, mut metas, mut firsts, mut lasts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (s, first, last) in &attrs {
        rids.push(s.resource_id.as_str());
        users.push(s.user_id.as_deref());
        projects.push(s.project_id.as_deref());
        sources.push(s.source.as_str());
        metas.push(sqlx::types::Json(&*s.resource_metadata));
        firsts.push(*first);
        lasts.push(*last);
    }
    let rows: Vec<(i64, i32)> = sqlx::query_as(
        "with input as (
           select u.*, md5(u.metadata::text) as h
           from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::timestamptz[], $7::timestamptz[])
             with ordinality as u(resource_id, user_id, project_id, source, metadata, first_seen, last_seen, n)
         ), ins as (
           insert into resource as r (resource_id, user_id, project_id, source, metadata, first_seen, last_seen)
           select resource_id, user_id, project_id, source, (array_agg(metadata))[1], min(first_seen), max(last_seen)
           from input
           group by resource_id, user_id, project_id, source, h
           order by resource_id, user_id, project_id, source, h
           on conflict (resource_id, user_id, project_id, source, md5(metadata::text)) do update set
             first_seen = least(r.first_seen, excluded.first_seen),
             last_seen  = greatest(r.last_seen, excluded.last_seen)
           returning r.id, r.resource_id, r.user_id, r.project_id, r.source, md5(r.metadata::text) as h
         )
         select i.n, ins.id from input i join ins on ins.resource_id = i.resource_id and ins.h = i.h
           and ins.user_id is not distinct from i.user_id
           and ins.project_id is not distinct from i.project_id
           and ins.source is not distinct from i.source",
    )
    .bind(&rids)
    .bind(&users)
    .bind(&projects)
    .bind(&sources)
    .bind(&metas)
    .bind(&firsts)
    .bind(&lasts)
    .fetch_all(&mut *conn)
    .await?;
    let mut ids = vec![None; n];
    for (at, id) in rows {
        if let Some(slot) = usize::try_from(at - 1).ok().and_then(|i| ids.get_mut(i)) {
            *slot = Some(id);
        }
    }
    let ids: Vec<i32> = ids
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| StoreError::Refused("an attribution got no row".into()))?;
    Ok(of_sample.into_iter().map(|a| ids[a]).collect())
}
