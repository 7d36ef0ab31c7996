//! Sample ids: the storage form (natural key in hex) and the named form a POST answers.

use chrono::{DateTime, Utc};

/// Appends the API id of a stored sample to `out`: its natural key (meter, resource, µs
/// timestamp) in hex, `<meter>-<resource>-<µs>`. Storage keeps no per-sample uuid
/// (docs/storage.md); this id finds the row through the primary key.
pub(super) fn write_sample_id(out: &mut Vec<u8>, meter_id: i32, resource: i32, ts: DateTime<Utc>) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{meter_id:x}-{resource:x}-{:x}", ts.timestamp_micros());
}

/// The id a `POST` answers for a sample it accepted, as its `message_id`:
/// `s-<hex of the meter name>-<hex of the resource id>-<µs in hex>`. It names the sample
/// by its natural key without the storage's integer ids (which a sample posted through the
/// pipeline does not have yet), so `GET /v2/samples/{id}` finds it once it is stored —
/// what Ceilometer's `sample-create` then `sample-show` do.
pub fn named_sample_id(meter: &str, resource_id: &str, ts: DateTime<Utc>) -> String {
    format!(
        "s-{}-{}-{:x}",
        hex::encode(meter),
        hex::encode(resource_id),
        ts.timestamp_micros()
    )
}

/// Inverse of [`named_sample_id`]; `None` for anything else.
pub fn parse_named_sample_id(id: &str) -> Option<(String, String, DateTime<Utc>)> {
    let mut it = id.strip_prefix("s-")?.split('-');
    let text = |h: &str| String::from_utf8(hex::decode(h).ok()?).ok();
    let meter = text(it.next()?)?;
    let resource = text(it.next()?)?;
    let us = i64::from_str_radix(it.next()?, 16).ok()?;
    if it.next().is_some() || meter.is_empty() || resource.is_empty() {
        return None;
    }
    Some((meter, resource, DateTime::from_timestamp_micros(us)?))
}

/// Inverse of `write_sample_id`; `None` for anything else.
pub fn parse_sample_id(id: &str) -> Option<(i32, i32, DateTime<Utc>)> {
    let mut it = id.split('-');
    let m = i32::from_str_radix(it.next()?, 16).ok()?;
    let r = i32::from_str_radix(it.next()?, 16).ok()?;
    let us = i64::from_str_radix(it.next()?, 16).ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((m, r, DateTime::from_timestamp_micros(us)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_sample_ids_round_trip() {
        let ts = DateTime::from_timestamp_micros(1_772_360_880_123_456).unwrap();
        let id = named_sample_id("disk.device.read.bytes", "9b3e-vda", ts);
        assert!(
            !id.contains(['/', '?', '#', '%']),
            "an id fits in a URL path: {id}"
        );
        assert_eq!(
            parse_named_sample_id(&id),
            Some(("disk.device.read.bytes".into(), "9b3e-vda".into(), ts))
        );
        for bad in [
            "s-",
            "s-zz-61-1",
            "s-61-62",
            "s-61-62-1-2",
            "s--62-1",
            "1-2-3",
        ] {
            assert_eq!(parse_named_sample_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn sample_ids_round_trip() {
        let ts = DateTime::from_timestamp_micros(1_772_360_880_123_456).unwrap();
        let mut id = Vec::new();
        write_sample_id(&mut id, 3, 0x1f, ts);
        let id = String::from_utf8(id).unwrap();
        assert_eq!(id, "3-1f-64bf3ecac6e40");
        assert_eq!(parse_sample_id(&id), Some((3, 0x1f, ts)));
        assert_eq!(parse_sample_id("3-1f"), None);
        assert_eq!(parse_sample_id("3-1f-zz"), None);
    }
}
