-- vmeter storage, version 2.
--
-- 1. The sample row loses message_id (16 B of 40 B of data per row). Storage dedups on the
--    natural key (meter_id, resource_id, ts) and nothing looks samples up by message_id, so
--    the column only cost bytes: the API's sample id is derived from the natural key.
-- 2. `series`: one row per (meter, resource) with its first and last sample time, kept by the
--    collector (one upsert per series per batch). It answers "which meters does this resource
--    have" (GET /v2/meters, resource links) without scanning samples, and tells retention
--    which meters and resources have no samples left.

drop view samples;
alter table sample drop column message_id;

create table series (
    meter_id integer not null references meter (id),
    resource_id integer not null references resource (id),
    first_ts timestamptz not null,
    last_ts timestamptz not null,
    constraint series_pkey primary key (meter_id, resource_id)
);
create index series_resource_idx on series (resource_id);

insert into series (meter_id, resource_id, first_ts, last_ts)
select meter_id, resource_id, min(ts), max(ts) from sample group by meter_id, resource_id;

-- What operators query: names joined back.
--   select timestamp, volume from samples where meter = 'cpu_util' and resource_id = '…';
create view samples as
select s.ts as timestamp,
       m.name as meter,
       m.type,
       m.unit,
       s.volume,
       r.resource_id,
       r.user_id,
       r.project_id,
       r.source,
       r.metadata as resource_metadata
from sample s
join meter m on m.id = s.meter_id
join resource r on r.id = s.resource_id;
