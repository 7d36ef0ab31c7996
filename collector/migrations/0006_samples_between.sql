-- vmeter storage, version 6: `samples_between(t_from, t_to)`, the `samples` view's rows
-- whose timestamp is in [t_from, t_to] (both ends included, as Grafana's $__timeFilter).
--
-- The view is right for every query, but PostgreSQL cannot turn a condition on a decoded
-- timestamp into one on `sample_hour.hour`: a time-bounded query over the view decodes
-- every compacted hour of the series it selects. This function bounds both sides by the
-- range first: the narrow partitions are pruned, and only the compacted hours that overlap
-- the range are decoded. A plain SQL function: PostgreSQL inlines it, so the caller's
-- other conditions (meter, resource, project) reach the tables as with the view.
create function samples_between(t_from timestamptz, t_to timestamptz)
returns setof samples
language sql stable as $f$
select s.ts, m.name, m.type, m.unit, s.volume,
       r.resource_id, r.user_id, r.project_id, r.source, r.metadata
from sample s
join meter m on m.id = s.meter_id
join resource r on r.id = s.resource_id
where s.ts >= greatest(t_from, coalesce((select watermark from compaction_state), '-infinity'))
  and s.ts <= t_to
union all
select d.ts, m.name, m.type, m.unit, d.volume,
       r.resource_id, r.user_id, r.project_id, r.source, r.metadata
from sample_hour h
join meter m on m.id = h.meter_id
join resource r on r.id = h.resource_id
cross join lateral (
  select timestamptz '1970-01-01 00:00:00+00' + x.us * interval '1 microsecond' as ts, x.volume
  from unnest(vmeter_hour_timestamps(h.ts), vmeter_hour_volumes(h.v)) as x(us, volume)
) d
where h.hour < coalesce((select watermark from compaction_state), '-infinity')
  and h.hour > t_from - interval '1 hour'
  and h.hour <= t_to
  and d.ts >= t_from
  and d.ts <= t_to
$f$;
