//! A JSON writer for the API's large answers (10,000 samples, 100,000+ statistics rows).
//!
//! Writes straight into one byte buffer: no intermediate `Value` tree, no `String` per
//! timestamp or id. Output is byte-for-byte what `serde_json` writes for the same values
//! (floats through zmij as serde_json does, non-finite floats as `null`, strings escaped by `serde_json`);
//! the unit tests hold it to that.

use chrono::{DateTime, Datelike, Utc};

/// A JSON document under construction.
pub struct JsonBuf {
    pub buf: Vec<u8>,
    /// The last day written by [`JsonBuf::ts_us_bare`] (days since the epoch) and its
    /// `YYYY-MM-DDT`: answers are mostly about one day, so the calendar is computed once.
    day: i64,
    date: [u8; 11],
}

impl Default for JsonBuf {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

/// "00" to "99".
const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Writes `v` (< 100) as two digits at `out[0..2]`.
#[inline]
fn pair(out: &mut [u8], v: u32) {
    let i = v as usize * 2;
    out[0] = PAIRS[i];
    out[1] = PAIRS[i + 1];
}

impl JsonBuf {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
            day: i64::MIN,
            date: [0; 11],
        }
    }

    /// Appends `s` verbatim (punctuation, keys known not to need escaping, raw JSON).
    #[inline]
    pub fn raw(&mut self, s: &str) {
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// Appends `s` as a JSON string (quoted, escaped).
    #[inline]
    pub fn str(&mut self, s: &str) {
        if s.bytes()
            .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
        {
            self.buf.push(b'"');
            self.buf.extend_from_slice(s.as_bytes());
            self.buf.push(b'"');
        } else {
            // Writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut self.buf, s);
        }
    }

    /// Appends `Some(s)` as a string, `None` as `null`.
    #[inline]
    pub fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.raw("null"),
        }
    }

    /// Appends a float as `serde_json` does (`1.0`, `0.1`, `1e300`; NaN and ±∞ as `null`).
    #[inline]
    pub fn f64(&mut self, v: f64) {
        if v.is_finite() {
            let mut b = zmij::Buffer::new();
            self.buf.extend_from_slice(b.format_finite(v).as_bytes());
        } else {
            self.raw("null");
        }
    }

    #[inline]
    pub fn i64(&mut self, v: i64) {
        let mut b = itoa::Buffer::new();
        self.buf.extend_from_slice(b.format(v).as_bytes());
    }

    /// Appends Ceilometer's timestamp, quoted: naive UTC with microseconds,
    /// `2026-03-01T10:28:00.000000`.
    #[inline]
    pub fn ts(&mut self, t: DateTime<Utc>) {
        self.buf.push(b'"');
        self.ts_bare(t);
        self.buf.push(b'"');
    }

    /// [`JsonBuf::ts`] without the quotes.
    pub fn ts_bare(&mut self, t: DateTime<Utc>) {
        self.ts_us_bare(t.timestamp_micros());
    }

    /// [`JsonBuf::ts`] of a time given in µs since the epoch.
    #[inline]
    pub fn ts_us(&mut self, us: i64) {
        self.buf.push(b'"');
        self.ts_us_bare(us);
        self.buf.push(b'"');
    }

    /// [`JsonBuf::ts_us`] without the quotes.
    pub fn ts_us_bare(&mut self, us: i64) {
        let secs = us.div_euclid(1_000_000);
        let frac = us.rem_euclid(1_000_000) as u32;
        let day = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        if day != self.day {
            let t = DateTime::<Utc>::from_timestamp_micros(us).unwrap_or_default();
            let year = t.year();
            if !(0..=9999).contains(&year) {
                // Outside what the fixed-width form can hold; PostgreSQL's range is wider.
                let s = t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
                self.raw(&s);
                return;
            }
            let d = &mut self.date;
            pair(&mut d[0..], year as u32 / 100);
            pair(&mut d[2..], year as u32 % 100);
            d[4] = b'-';
            pair(&mut d[5..], t.month());
            d[7] = b'-';
            pair(&mut d[8..], t.day());
            d[10] = b'T';
            self.day = day;
        }
        let mut out = *b"0000-00-00T00:00:00.000000";
        out[..11].copy_from_slice(&self.date);
        pair(&mut out[11..], sod / 3600);
        pair(&mut out[14..], sod / 60 % 60);
        pair(&mut out[17..], sod % 60);
        pair(&mut out[20..], frac / 10_000);
        pair(&mut out[22..], frac / 100 % 100);
        pair(&mut out[24..], frac % 100);
        self.buf.extend_from_slice(&out);
    }
}

/// The JSON array of `items`, each written by `item` (without separators). Arrays of at
/// least `parallel_from` items are written by two threads, one half each: the first half
/// straight into the answer, the second appended to it. `bytes_per_item` sizes the buffer
/// (one allocation, no regrowth when it is right).
pub fn array<T: Sync>(
    items: &[T],
    bytes_per_item: usize,
    parallel_from: usize,
    item: impl Fn(&mut JsonBuf, &T) + Sync,
) -> Vec<u8> {
    let write = |j: &mut JsonBuf, items: &[T], comma: bool| {
        for (i, x) in items.iter().enumerate() {
            if i > 0 || comma {
                j.raw(",");
            }
            item(j, x);
        }
    };
    let mut j = JsonBuf::with_capacity(2 + items.len() * bytes_per_item);
    j.raw("[");
    if items.len() < parallel_from.max(2) {
        write(&mut j, items, false);
    } else {
        let (a, b) = items.split_at(items.len() / 2);
        let tail = std::thread::scope(|s| {
            let hb = s.spawn(|| {
                let mut t = JsonBuf::with_capacity(b.len() * bytes_per_item);
                write(&mut t, b, true);
                t.buf
            });
            write(&mut j, a, false);
            hb.join().expect("JSON writer thread")
        });
        j.buf.extend_from_slice(&tail);
    }
    j.raw("]");
    j.buf
}

/// A JSON array written item by item and handed out in chunks of about `chunk_bytes`, so
/// that sending can start before the last item is written. The chunks joined are what
/// [`array()`] writes.
pub struct ArrayChunks {
    j: JsonBuf,
    chunk_bytes: usize,
    empty: bool,
}

impl ArrayChunks {
    pub fn new(chunk_bytes: usize) -> Self {
        let mut j = JsonBuf::with_capacity(chunk_bytes + chunk_bytes / 4);
        j.raw("[");
        ArrayChunks {
            j,
            chunk_bytes,
            empty: true,
        }
    }

    /// Writes one item with `f`; returns a chunk when one is full.
    pub fn item(&mut self, f: impl FnOnce(&mut JsonBuf)) -> Option<Vec<u8>> {
        if !self.empty {
            self.j.raw(",");
        }
        self.empty = false;
        f(&mut self.j);
        (self.j.buf.len() >= self.chunk_bytes).then(|| {
            let next = JsonBuf::with_capacity(self.chunk_bytes + self.chunk_bytes / 4);
            std::mem::replace(&mut self.j, next).buf
        })
    }

    /// The last chunk (it closes the array).
    pub fn finish(mut self) -> Vec<u8> {
        self.j.raw("]");
        self.j.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn floats_and_strings_match_serde_json() {
        for v in [
            0.0,
            -0.0,
            1.0,
            0.1,
            99.7,
            1e300,
            -2.5e-8,
            123456789.125,
            f64::MAX,
            f64::NAN,
            f64::INFINITY,
        ] {
            let mut j = JsonBuf::default();
            j.f64(v);
            assert_eq!(
                String::from_utf8(j.buf).unwrap(),
                serde_json::to_string(&v).unwrap(),
                "{v}"
            );
        }
        for s in [
            "vm-a",
            "",
            "a\"b",
            "back\\slash",
            "tab\there",
            "é ☃",
            "\u{7f}",
        ] {
            let mut j = JsonBuf::default();
            j.str(s);
            assert_eq!(
                String::from_utf8(j.buf).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
        let mut j = JsonBuf::default();
        j.i64(-42);
        j.opt_str(None);
        assert_eq!(j.buf, b"-42null");
    }

    #[test]
    fn timestamps_are_ceilometers_format() {
        let t = Utc.with_ymd_and_hms(2026, 3, 1, 10, 28, 5).unwrap()
            + chrono::Duration::microseconds(7);
        let mut j = JsonBuf::default();
        j.ts(t);
        assert_eq!(j.buf, b"\"2026-03-01T10:28:05.000007\"");
        let mut j = JsonBuf::default();
        j.ts_bare(Utc.with_ymd_and_hms(999, 12, 31, 23, 59, 59).unwrap());
        assert_eq!(j.buf, b"0999-12-31T23:59:59.000000");
    }

    #[test]
    fn timestamps_from_micros_match_chrono_across_days() {
        // One writer for many times (its day cache switches back and forth), against
        // chrono's formatting of each.
        let mut j = JsonBuf::default();
        let mut want = String::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for i in 0..20_000i64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let us = match i % 4 {
                0 => (x % 400_000_000_000_000_000) as i64 - 62_000_000_000_000_000,
                1 => 1_767_225_600_000_000 + (x % 86_400_000_000) as i64,
                2 => -1 - (x % 1_000_000) as i64,
                _ => 1_767_225_600_000_000 - 1 + (i % 3),
            };
            let t = DateTime::<Utc>::from_timestamp_micros(us).unwrap();
            want.push_str(&t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string());
            want.push(',');
            j.ts_us_bare(us);
            j.raw(",");
        }
        assert_eq!(String::from_utf8(j.buf).unwrap(), want);
    }

    #[test]
    fn arrays_are_the_same_written_by_one_thread_or_two() {
        let items: Vec<i64> = (0..1001).map(|i| i * 7 - 300).collect();
        let one = array(&items, 4, usize::MAX, |j, v| j.i64(*v));
        let two = array(&items, 4, 2, |j, v| j.i64(*v));
        assert_eq!(one, two);
        assert_eq!(one, serde_json::to_vec(&items).unwrap());
        assert_eq!(array::<i64>(&[], 4, 2, |j, v| j.i64(*v)), b"[]");
        assert_eq!(array(&[5i64], 4, 2, |j, v| j.i64(*v)), b"[5]");
    }

    #[test]
    fn chunked_arrays_join_to_the_whole_array() {
        let items: Vec<i64> = (0..1001).map(|i| i * 7 - 300).collect();
        for (n, chunk) in [(0, 16), (1, 16), (1001, 1), (1001, 64), (1001, 1 << 20)] {
            let mut a = ArrayChunks::new(chunk);
            let mut parts: Vec<Vec<u8>> = items[..n]
                .iter()
                .filter_map(|v| a.item(|j| j.i64(*v)))
                .collect();
            parts.push(a.finish());
            assert_eq!(
                parts.concat(),
                array(&items[..n], 4, usize::MAX, |j, v| j.i64(*v))
            );
            if n > 100 && chunk < 100 {
                assert!(parts.len() > 10, "written in chunks");
            }
        }
    }
}
