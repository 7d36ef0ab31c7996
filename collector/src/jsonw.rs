//! A JSON writer for the API's large answers (10,000 samples, 100,000+ statistics rows).
//!
//! Writes straight into one byte buffer: no intermediate `Value` tree, no `String` per
//! timestamp or id. Output is byte-for-byte what `serde_json` writes for the same values
//! (floats through zmij as serde_json does, non-finite floats as `null`, strings escaped by `serde_json`);
//! the unit tests hold it to that.

use chrono::{DateTime, Datelike, Timelike, Utc};

/// A JSON document under construction.
#[derive(Default)]
pub struct JsonBuf {
    pub buf: Vec<u8>,
}

impl JsonBuf {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
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
        let year = t.year();
        if !(0..=9999).contains(&year) {
            // Outside what the fixed-width form can hold; PostgreSQL's range is wider.
            let s = t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
            self.raw(&s);
            return;
        }
        let mut out = *b"0000-00-00T00:00:00.000000";
        let put = |o: &mut [u8; 26], at: usize, width: usize, mut v: u32| {
            for i in (0..width).rev() {
                o[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(&mut out, 0, 4, year as u32);
        put(&mut out, 5, 2, t.month());
        put(&mut out, 8, 2, t.day());
        put(&mut out, 11, 2, t.hour());
        put(&mut out, 14, 2, t.minute());
        put(&mut out, 17, 2, t.second());
        put(&mut out, 20, 6, t.nanosecond() / 1000 % 1_000_000);
        self.buf.extend_from_slice(&out);
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
}
