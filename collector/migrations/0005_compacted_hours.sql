-- vmeter storage, version 5: compacted closed hours (issue 18; docs/design-compaction.md).
--
-- `sample_hour` holds one row per (meter, attribution, UTC hour): the hour's sample times
-- and volumes, each a Gorilla stream (collector/src/store/hourcodec.rs, format 1). The
-- compaction job fills it hour by hour, oldest first, for hours already rolled up, and
-- advances `compaction_state.watermark`: every hour before the watermark is in
-- `sample_hour`, complete. Late samples for such hours are merged into their row by the
-- writer, under the rollup lock's rules (docs/storage.md).
--
-- The `samples` view shows each sample once: narrow rows from the watermark on, decoded
-- compacted rows before it. While the narrow rows of compacted hours are kept (this
-- version: the API reads them), the view reads the compacted ones, which is what proves
-- them complete.
--
-- The decoders below are hourcodec::SQL_DECODERS verbatim (a unit test checks it).

create table compaction_state (
    singleton boolean primary key default true check (singleton),
    watermark timestamptz
);
insert into compaction_state (singleton, watermark) values (true, null);

create table sample_hour (
    meter_id integer not null,
    resource_id integer not null,
    hour timestamptz not null,
    n integer not null,
    ts bytea not null,
    v bytea not null,
    constraint sample_hour_pkey primary key (meter_id, resource_id, hour)
);
-- The streams are compressed already: TOAST compression would only cost CPU.
alter table sample_hour alter column ts set storage external, alter column v set storage external;

create or replace function vmeter_hour_bits(b bytea, pos bigint, n int) returns bigint
language plpgsql immutable strict as $f$
declare
  v bigint := 0; byte int; off int; avail int; take int;
begin
  if pos + n > length(b)::bigint * 8 then
    raise exception 'compacted hour: stream ends early' using errcode = 'data_corrupted';
  end if;
  while n > 0 loop
    byte := get_byte(b, (pos >> 3)::int);
    off := (pos & 7)::int;
    avail := 8 - off;
    take := least(avail, n);
    v := (v << take) | ((byte >> (avail - take)) & ((1 << take) - 1));
    pos := pos + take;
    n := n - take;
  end loop;
  return v;
end $f$;

create or replace function vmeter_float8_of_bits(x bigint) returns float8
language plpgsql immutable strict as $f$
declare
  e int := ((x >> 52) & 2047)::int;
  m bigint := x & 4503599627370495;
  v float8;
begin
  if e = 2047 then
    v := case when m = 0 then 'Infinity'::float8 else 'NaN'::float8 end;
  elsif e = 0 then
    v := m::float8 * 4.9406564584124654e-324::float8;
  else
    v := (1.0::float8 + m::float8 * 2.220446049250313e-16::float8) * power(2::float8, e - 1023);
  end if;
  return case when x < 0 then -v else v end;
end $f$;

create or replace function vmeter_hour_timestamps(b bytea) returns bigint[]
language plpgsql immutable strict as $f$
declare
  n int; pos bigint := 40; out bigint[]; prev bigint; delta bigint := 0; z bigint; w int;
  len bigint := length(b)::bigint * 8;
begin
  if length(b) < 5 or get_byte(b, 0) <> 1 then
    raise exception 'compacted hour: not a timestamp stream of format 1' using errcode = 'data_corrupted';
  end if;
  n := vmeter_hour_bits(b, 8, 32)::int;
  if n = 0 then return '{}'; end if;
  prev := vmeter_hour_bits(b, pos, 64); pos := pos + 64;
  out := array[prev];
  for i in 2..n loop
    -- The bucket prefix, bit by bit without a function call (most are one bit).
    w := -1;
    for k in 0..3 loop
      if pos >= len then
        raise exception 'compacted hour: stream ends early' using errcode = 'data_corrupted';
      end if;
      if ((get_byte(b, (pos >> 3)::int) >> (7 - (pos & 7)::int)) & 1) = 0 then
        w := (array[0, 7, 14, 20])[k + 1];
        pos := pos + 1;
        exit;
      end if;
      pos := pos + 1;
    end loop;
    if w < 0 then w := 64; end if;
    if w > 0 then
      z := vmeter_hour_bits(b, pos, w); pos := pos + w;
      delta := delta + (((z >> 1) & 9223372036854775807) # -(z & 1));
    end if;
    prev := prev + delta;
    out := out || prev;
  end loop;
  return out;
end $f$;

create or replace function vmeter_hour_volumes(b bytea) returns float8[]
language plpgsql immutable strict as $f$
declare
  n int; pos bigint := 40; out float8[]; prev bigint; lead int := -1; trail int := 0; m int;
  len bigint := length(b)::bigint * 8; last float8;
begin
  if length(b) < 5 or get_byte(b, 0) <> 1 then
    raise exception 'compacted hour: not a volume stream of format 1' using errcode = 'data_corrupted';
  end if;
  n := vmeter_hour_bits(b, 8, 32)::int;
  if n = 0 then return '{}'; end if;
  prev := vmeter_hour_bits(b, pos, 64); pos := pos + 64;
  out := array[vmeter_float8_of_bits(prev)];
  last := out[1];
  for i in 2..n loop
    if pos >= len then
      raise exception 'compacted hour: stream ends early' using errcode = 'data_corrupted';
    end if;
    -- `0`: the same volume again (one bit, read without a function call).
    if ((get_byte(b, (pos >> 3)::int) >> (7 - (pos & 7)::int)) & 1) = 1 then
      if vmeter_hour_bits(b, pos + 1, 1) = 0 then
        if lead < 0 then
          raise exception 'compacted hour: window used before it was opened' using errcode = 'data_corrupted';
        end if;
        pos := pos + 2;
        m := 64 - lead - trail;
      else
        lead := vmeter_hour_bits(b, pos + 2, 5)::int;
        m := vmeter_hour_bits(b, pos + 7, 6)::int + 1;
        trail := 64 - lead - m;
        if trail < 0 then
          raise exception 'compacted hour: bad window' using errcode = 'data_corrupted';
        end if;
        pos := pos + 13;
      end if;
      prev := prev # (vmeter_hour_bits(b, pos, m) << trail);
      pos := pos + m;
      last := vmeter_float8_of_bits(prev);
    else
      pos := pos + 1;
    end if;
    out := out || last;
  end loop;
  return out;
end $f$;

create or replace view samples as
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
join resource r on r.id = s.resource_id
where s.ts >= coalesce((select watermark from compaction_state), '-infinity')
union all
select timestamptz '1970-01-01 00:00:00+00' + d.us * interval '1 microsecond',
       m.name,
       m.type,
       m.unit,
       d.volume,
       r.resource_id,
       r.user_id,
       r.project_id,
       r.source,
       r.metadata
from sample_hour h
cross join lateral unnest(vmeter_hour_timestamps(h.ts), vmeter_hour_volumes(h.v)) as d(us, volume)
join meter m on m.id = h.meter_id
join resource r on r.id = h.resource_id
where h.hour < coalesce((select watermark from compaction_state), '-infinity');
