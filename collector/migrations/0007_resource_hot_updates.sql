-- vmeter storage, version 7: attribution rows updated in place.
--
-- Every batch the collector writes moves the first/last seen of the attributions in it.
-- With `last_seen` in an index (resource_newest_idx), each of those updates wrote a new
-- row version on another page and new index entries: after a day's batches the table and
-- its indexes held mostly free space (the ingest bench: 1.9–2.4 bytes per stored sample,
-- more than every other lookup table together, against 9 for the compacted samples).
-- Without that index, and with room left on each page, PostgreSQL updates a row on its own
-- page (a HOT update: no new index entry) and prunes the old versions as it goes. The
-- newest attribution of a resource is still found through `resource_attribution_key`
-- (resource id first) and a sort of that resource's few rows.
drop index resource_newest_idx;
alter table resource set (fillfactor = 70);
