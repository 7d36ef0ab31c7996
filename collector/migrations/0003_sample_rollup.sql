-- vmeter storage, version 3: per-minute rollups, for statistics over many samples.
--
-- One row per (meter, resource, UTC hour) that has samples, written once the hour is
-- closed (see docs/storage.md, "Rollups"). `minutes` packs one 46-byte record per minute
-- of the hour that has samples, big-endian as PostgreSQL's send functions write them:
--   minute int2 (0..59), n int4 (samples), first_us int4, last_us int4 (first and last
--   sample, µs after the minute's start), sum, min, max, sumsq float8 (of the volumes).
-- A packed column rather than eight arrays: the API reads it with one copy, where sending
-- arrays costs PostgreSQL a function call per element (59 ms against ~5 ms for a day of
-- 100 series here), and it is a quarter smaller. `minutes` is null for "read the samples":
-- the series has too few samples per minute for a rollup to pay (fewer than two on
-- average), or a late sample is being folded in. This table is the API's cache; the
-- samples stay the truth, and operators query them (view `samples`).
--
-- `rollup_state.watermark`: every (meter, resource, hour) before it is rolled up; null
-- until the first rollup. Samples older than the watermark that arrive later update
-- their row in the same transaction (the collector holds a shared advisory lock while it
-- writes, the rollup job an exclusive one while it advances the watermark).

create table rollup_state (
    singleton boolean primary key default true check (singleton),
    watermark timestamptz
);
insert into rollup_state (singleton, watermark) values (true, null);

create table sample_rollup (
    meter_id integer not null,
    resource_id integer not null,
    hour timestamptz not null,
    minutes bytea,
    constraint sample_rollup_pkey primary key (meter_id, resource_id, hour)
-- Rows stay inline and uncompressed (2.8 KB for a full hour): packed floats do not
-- compress, and reading them back must not cost a decompression.
) with (toast_tuple_target = 8160);

-- Time-range scans of the samples not rolled up yet (the current hours): a BRIN index
-- costs a few pages per daily partition, as samples arrive roughly in time order.
create index sample_ts_brin on sample using brin (ts);
