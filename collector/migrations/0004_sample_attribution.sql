-- vmeter storage, version 4: every sample keeps its own attribution.
--
-- Until version 3 a `resource` row was one per resource id and held the user, project,
-- source and metadata of the resource's newest sample, so the `samples` view showed
-- today's owner and flavor for every historical sample. From version 4 a `resource` row is
-- one *attribution*: a distinct (resource id, user, project, source, metadata), as in
-- Ceilometer's SQL driver. `sample.resource_id` (and `series`, `sample_rollup`) refer to
-- the attribution the sample was taken with; the `samples` view, unchanged, therefore
-- shows each sample's own user, project, source and metadata, and every API filter,
-- statistic and groupby reads them per sample. The newest attribution of a resource (what
-- `/v2/resources` shows) is the one with the greatest `last_seen`: view `resource_latest`.
--
-- In place, without rewriting a sample: each existing row becomes the attribution of all
-- its resource's samples (the attribution those samples had before version 4 overwrote it
-- is not recorded anywhere, so it cannot be recovered).
--
-- Uniqueness is on the md5 of the metadata's canonical jsonb text (a b-tree cannot hold
-- 64 KiB of metadata); NULLS NOT DISTINCT makes a sample without user or project share one
-- attribution per metadata, as equality in Rust does.

alter table resource drop constraint resource_resource_id_key;
create unique index resource_attribution_key
    on resource (resource_id, user_id, project_id, source, md5(metadata::text))
    nulls not distinct;
-- The newest attribution of each resource: `order by last_seen desc` per resource id.
create index resource_newest_idx on resource (resource_id, last_seen desc);

create view resource_latest as
select distinct on (r.resource_id)
       r.resource_id, r.user_id, r.project_id, r.source, r.metadata,
       min(r.first_seen) over (partition by r.resource_id) as first_seen,
       max(r.last_seen) over (partition by r.resource_id) as last_seen
from resource r
-- Qualified: unqualified, `last_seen` would name the output column (the maximum).
order by r.resource_id, r.last_seen desc, r.id desc;
