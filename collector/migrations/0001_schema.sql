-- vmeter storage, version 1.
--
-- Lookup tables give meters and resources small integer keys so the sample table stays
-- narrow; the sample table is range-partitioned by day so that retention drops partitions.
-- The dedup key is the natural one, (meter_id, resource_id, ts): a redelivered message carries
-- the same meter, resource and microsecond timestamp, so the primary key that serves queries
-- also makes inserts idempotent, and no extra index on a random uuid is needed.

create table meter (
    id integer generated always as identity primary key,
    name text not null,
    type text not null check (type in ('gauge', 'delta', 'cumulative')),
    unit text not null,
    constraint meter_name_type_unit_key unique (name, type, unit)
);

create table resource (
    id integer generated always as identity primary key,
    resource_id text not null constraint resource_resource_id_key unique,
    user_id text,
    project_id text,
    source text,
    -- metadata of the newest sample seen for this resource
    metadata jsonb not null default '{}',
    first_seen timestamptz not null,
    last_seen timestamptz not null
);
create index resource_project_idx on resource (project_id);

create table sample (
    ts timestamptz not null,
    meter_id integer not null,
    resource_id integer not null,
    volume double precision not null,
    message_id uuid not null,
    constraint sample_pkey primary key (meter_id, resource_id, ts)
) partition by range (ts);

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
       r.metadata as resource_metadata,
       s.message_id
from sample s
join meter m on m.id = s.meter_id
join resource r on r.id = s.resource_id;
