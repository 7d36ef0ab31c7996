//! The codec of a compacted series-hour (issue 18, docs/design-compaction.md; not used by
//! the storage yet): timestamps and volumes as two byte streams, each lossless, after
//! Facebook's Gorilla (timestamps as delta-of-delta, volumes as XOR with the previous one).
//! The two streams are separate so that a layout may store a VM-hour's shared timestamps
//! once.
//!
//! Format (bits written most significant first, the last byte padded with zeros):
//!
//! - both streams: byte 0 the format (`FORMAT`), then the sample count `n` as a big-endian
//!   `u32`, then `n` values (nothing when `n` is 0);
//! - timestamps (µs since the Unix epoch): the first as 64 bits (two's complement), then
//!   per timestamp the zigzag of its delta-of-delta (the first delta's "previous" is 0):
//!   `0` when 0, `10` + 7 bits, `110` + 14 bits, `1110` + 20 bits, else `1111` + 64 bits;
//! - volumes (IEEE 754 doubles): the first as its 64 bits, then per volume its bits XOR the
//!   previous one's: `0` when equal; `10` + the meaningful bits when they fit the previous
//!   window of leading and trailing zeros; else `11` + leading zeros (5 bits, at most 31) +
//!   meaningful bit count − 1 (6 bits) + the meaningful bits, which opens a new window.
//!
//! Decoding never panics on any input: a blob that is not one of these is an error.

/// The format byte of both streams.
pub const FORMAT: u8 = 1;

/// Most samples one stream may hold when decoding (a series-hour polled every second is
/// 3,600; this bounds what a forged count could make the decoder allocate).
pub const MAX_SAMPLES: u32 = 1 << 20;

/// Why a stream does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("not a compacted-hour stream of format {FORMAT} (first byte {0:?})")]
    Format(Option<u8>),
    #[error("{0} samples: more than a stream may hold ({MAX_SAMPLES})")]
    TooMany(u32),
    #[error("the stream ends before its {0} samples")]
    Truncated(u32),
    #[error("{0} bytes after the last sample")]
    Trailing(usize),
}

/// Bits written most significant first.
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte (0 = a new byte is needed).
    used: u32,
}

impl BitWriter {
    fn new(n: usize, capacity: usize) -> Self {
        let mut bytes = Vec::with_capacity(5 + capacity);
        bytes.push(FORMAT);
        bytes.extend_from_slice(&(n as u32).to_be_bytes());
        BitWriter { bytes, used: 0 }
    }

    /// The low `n` bits of `value` (n ≤ 64).
    fn put(&mut self, value: u64, n: u32) {
        let mut left = n;
        while left > 0 {
            if self.used == 0 {
                self.bytes.push(0);
            }
            let room = 8 - self.used;
            let take = room.min(left);
            let chunk = ((value >> (left - take)) & ((1u64 << take) - 1)) as u8;
            let last = self.bytes.last_mut().expect("a byte was pushed");
            *last |= chunk << (room - take);
            self.used = (self.used + take) % 8;
            left -= take;
        }
    }
}

/// Bits read most significant first, with bounds checks.
struct BitReader<'a> {
    bytes: &'a [u8],
    /// Next bit, counted from the start of `bytes`.
    at: usize,
    n: u32,
}

impl BitReader<'_> {
    /// The next `n` bits (n ≤ 64) as the low bits of a `u64`.
    fn get(&mut self, n: u32) -> Result<u64, CodecError> {
        if self.at + n as usize > self.bytes.len() * 8 {
            return Err(CodecError::Truncated(self.n));
        }
        let mut v = 0u64;
        let mut left = n;
        while left > 0 {
            let byte = self.bytes[self.at / 8];
            let offset = (self.at % 8) as u32;
            let avail = 8 - offset;
            let take = avail.min(left);
            let chunk = (byte >> (avail - take)) & ((1u16 << take) - 1) as u8;
            v = (v << take) | chunk as u64;
            self.at += take as usize;
            left -= take;
        }
        Ok(v)
    }

    /// Whether every bit after the last value is padding (zeros, within the last byte).
    fn finish(&self) -> Result<(), CodecError> {
        let used = self.at.div_ceil(8);
        if used < self.bytes.len() {
            return Err(CodecError::Trailing(self.bytes.len() - used));
        }
        Ok(())
    }
}

/// The header of a stream: its sample count and a reader after it.
fn open(blob: &[u8]) -> Result<BitReader<'_>, CodecError> {
    match blob.first() {
        Some(&FORMAT) => {}
        other => return Err(CodecError::Format(other.copied())),
    }
    let count: [u8; 4] = blob
        .get(1..5)
        .and_then(|b| b.try_into().ok())
        .ok_or(CodecError::Truncated(0))?;
    let n = u32::from_be_bytes(count);
    if n > MAX_SAMPLES {
        return Err(CodecError::TooMany(n));
    }
    Ok(BitReader {
        bytes: &blob[5..],
        at: 0,
        n,
    })
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Timestamps (µs since the epoch, any order) as a stream.
pub fn encode_timestamps(ts: &[i64]) -> Vec<u8> {
    let mut w = BitWriter::new(ts.len(), ts.len() * 2 + 8);
    let Some(&first) = ts.first() else {
        return w.bytes;
    };
    w.put(first as u64, 64);
    let (mut prev, mut delta) = (first, 0i64);
    for &t in &ts[1..] {
        let d = t.wrapping_sub(prev);
        match zigzag(d.wrapping_sub(delta)) {
            0 => w.put(0, 1),
            z if z < 1 << 7 => w.put((0b10 << 7) | z, 9),
            z if z < 1 << 14 => w.put((0b110 << 14) | z, 17),
            z if z < 1 << 20 => w.put((0b1110 << 20) | z, 24),
            z => {
                w.put(0b1111, 4);
                w.put(z, 64);
            }
        }
        prev = t;
        delta = d;
    }
    w.bytes
}

/// The timestamps of a stream made by [`encode_timestamps`].
pub fn decode_timestamps(blob: &[u8]) -> Result<Vec<i64>, CodecError> {
    let mut r = open(blob)?;
    let n = r.n as usize;
    // Every sample after the first takes at least a bit: a forged count allocates no more.
    let mut out = Vec::with_capacity(n.min(r.bytes.len() * 8 + 1));
    if n == 0 {
        r.finish()?;
        return Ok(out);
    }
    let mut prev = r.get(64)? as i64;
    out.push(prev);
    let mut delta = 0i64;
    for _ in 1..n {
        let width = if r.get(1)? == 0 {
            0
        } else if r.get(1)? == 0 {
            7
        } else if r.get(1)? == 0 {
            14
        } else if r.get(1)? == 0 {
            20
        } else {
            64
        };
        let dod = if width == 0 {
            0
        } else {
            unzigzag(r.get(width)?)
        };
        delta = delta.wrapping_add(dod);
        prev = prev.wrapping_add(delta);
        out.push(prev);
    }
    r.finish()?;
    Ok(out)
}

/// Volumes as a stream (every double, NaN and infinities included, round-trips bit for bit).
pub fn encode_volumes(v: &[f64]) -> Vec<u8> {
    let mut w = BitWriter::new(v.len(), v.len() * 4 + 8);
    let Some(&first) = v.first() else {
        return w.bytes;
    };
    w.put(first.to_bits(), 64);
    // The current window: leading and trailing zeros; none before the first `11`.
    let mut window: Option<(u32, u32)> = None;
    let mut prev = first.to_bits();
    for x in &v[1..] {
        let bits = x.to_bits();
        let xor = prev ^ bits;
        prev = bits;
        if xor == 0 {
            w.put(0, 1);
            continue;
        }
        let lead = xor.leading_zeros().min(31);
        let trail = xor.trailing_zeros();
        match window {
            Some((l, t)) if lead >= l && trail >= t => {
                w.put(0b10, 2);
                w.put(xor >> t, 64 - l - t);
            }
            _ => {
                let meaningful = 64 - lead - trail;
                w.put(0b11, 2);
                w.put(lead as u64, 5);
                w.put((meaningful - 1) as u64, 6);
                w.put(xor >> trail, meaningful);
                window = Some((lead, trail));
            }
        }
    }
    w.bytes
}

/// The volumes of a stream made by [`encode_volumes`].
pub fn decode_volumes(blob: &[u8]) -> Result<Vec<f64>, CodecError> {
    let mut r = open(blob)?;
    let n = r.n as usize;
    // Every sample after the first takes at least a bit: a forged count allocates no more.
    let mut out = Vec::with_capacity(n.min(r.bytes.len() * 8 + 1));
    if n == 0 {
        r.finish()?;
        return Ok(out);
    }
    let mut prev = r.get(64)?;
    out.push(f64::from_bits(prev));
    let mut window: Option<(u32, u32)> = None;
    for _ in 1..n {
        if r.get(1)? == 1 {
            let xor = if r.get(1)? == 0 {
                // A window must have been opened before; a forged stream may lack one.
                let (l, t) = window.ok_or(CodecError::Truncated(r.n))?;
                r.get(64 - l - t)? << t
            } else {
                let lead = r.get(5)? as u32;
                let meaningful = r.get(6)? as u32 + 1;
                let Some(trail) = 64u32.checked_sub(lead + meaningful) else {
                    return Err(CodecError::Truncated(r.n));
                };
                window = Some((lead, trail));
                r.get(meaningful)? << trail
            };
            prev ^= xor;
        }
        out.push(f64::from_bits(prev));
    }
    r.finish()?;
    Ok(out)
}

/// The decoders in PL/pgSQL, for SQL users (the `samples` view of compacted hours):
/// `vmeter_hour_timestamps(bytea) → bigint[]` (µs since the epoch) and
/// `vmeter_hour_volumes(bytea) → float8[]`, with `vmeter_hour_bits` and
/// `vmeter_float8_of_bits` as helpers. Their results equal [`decode_timestamps`] and
/// [`decode_volumes`] bit for bit for every finite volume (NaNs come back as PostgreSQL's
/// NaN, infinities as themselves; the sample contract stores neither). A stream that does
/// not decode raises an error naming it.
pub const SQL_DECODERS: &str = r#"
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
"#;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn same(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn an_agent_hour_round_trips_and_is_small() {
        // 360 cycles 10 s apart with a few ms of jitter; a counter, a rate, a flat gauge.
        let mut rng = fastrand::Rng::with_seed(7);
        let ts: Vec<i64> = (0..360)
            .map(|k| 1_800_000_000_000_000 + k * 10_000_000 + rng.i64(-4_000..4_000))
            .collect();
        let mut c = 1e12;
        let counter: Vec<f64> = (0..360)
            .map(|_| {
                c += (rng.u32(0..4000) * 512) as f64;
                c
            })
            .collect();
        let rate: Vec<f64> = (0..360).map(|_| rng.f64() * 100.0).collect();
        let flat = vec![4096.0; 360];
        let t = encode_timestamps(&ts);
        assert_eq!(decode_timestamps(&t).unwrap(), ts);
        assert!(t.len() < 360 * 3, "{} bytes of timestamps", t.len());
        // A uniformly random rate has a full mantissa of entropy: about 8 bytes each.
        for (v, most) in [(&counter, 360 * 5), (&rate, 360 * 8 + 16), (&flat, 60)] {
            let b = encode_volumes(v);
            assert!(same(&decode_volumes(&b).unwrap(), v));
            assert!(b.len() <= most, "{} bytes", b.len());
        }
    }

    #[test]
    fn edge_values_round_trip() {
        let v = [
            0.0,
            -0.0,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            f64::MIN,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1.0,
            1.0,
            -1.5,
        ];
        assert!(same(&decode_volumes(&encode_volumes(&v)).unwrap(), &v));
        let ts = [i64::MIN, i64::MAX, 0, -1, 1, i64::MAX, i64::MIN];
        assert_eq!(decode_timestamps(&encode_timestamps(&ts)).unwrap(), ts);
        for empty in [encode_timestamps(&[]), encode_volumes(&[])] {
            assert_eq!(empty, [FORMAT, 0, 0, 0, 0]);
        }
        assert!(decode_volumes(&encode_volumes(&[])).unwrap().is_empty());
        assert!(
            decode_timestamps(&encode_timestamps(&[]))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn hostile_streams_are_errors() {
        let good = encode_volumes(&[1.0, 2.0, 3.5]);
        assert_eq!(decode_volumes(&[]), Err(CodecError::Format(None)));
        assert_eq!(
            decode_volumes(&[9, 0, 0, 0, 1]),
            Err(CodecError::Format(Some(9)))
        );
        assert_eq!(decode_volumes(&[FORMAT, 0]), Err(CodecError::Truncated(0)));
        assert_eq!(
            decode_volumes(&[FORMAT, 0xff, 0xff, 0xff, 0xff]),
            Err(CodecError::TooMany(u32::MAX))
        );
        // A count larger than the stream holds.
        let mut more = good.clone();
        more[4] = 200;
        assert_eq!(decode_volumes(&more), Err(CodecError::Truncated(200)));
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0, 0]);
        assert_eq!(decode_volumes(&trailing), Err(CodecError::Trailing(2)));
        // `10` (reuse the window) before any window was opened.
        let forged = [FORMAT, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0b1000_0000];
        assert!(decode_volumes(&forged).is_err());
    }

    proptest! {
        #[test]
        fn any_volumes_round_trip(v in proptest::collection::vec(any::<f64>(), 0..400)) {
            prop_assert!(same(&decode_volumes(&encode_volumes(&v)).unwrap(), &v));
        }

        #[test]
        fn any_timestamps_round_trip(ts in proptest::collection::vec(any::<i64>(), 0..400)) {
            prop_assert_eq!(decode_timestamps(&encode_timestamps(&ts)).unwrap(), ts);
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_volumes(&b);
            let _ = decode_timestamps(&b);
        }
    }
}
