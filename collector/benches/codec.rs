//! How small can a closed hour of agent-style samples be? A measurement for the storage
//! compaction issue (18), before its layout is chosen: candidate encodings of one series-hour
//! (timestamps and volumes), sizes in bytes per sample on generated data shaped like what
//! reaches the collector from an agent polling every 10 s through the default pipeline.
//!
//! The data (`Fleet`): per VM, one polling cycle every 10 s whose timestamp (µs) all its
//! samples share, with the cycle's jitter (a few ms); per cycle the agent's meters (power
//! state, vCPUs, memory and balloon gauges, CPU time, two disks' and two vNICs' cumulative
//! counters, disk sizes) and the notification's derived ones (`cpu_util` and byte rates,
//! full-precision floats). Counters of idle devices stay flat, busy ones grow by integer
//! steps; gauges change now and then.
//!
//! Encodings, each lossless (every one is decoded and compared with its input):
//! - `raw`: 8-byte µs timestamp and 8-byte float per sample (what an array pair holds
//!   before compression);
//! - `gorilla`: Facebook Gorilla's bit-level scheme per series: timestamps as
//!   delta-of-delta, volumes as XOR with the previous one;
//! - `gorilla + shared ts`: the same volumes, the timestamps stored once per VM-hour (every
//!   meter of a VM shares the cycle's timestamp) and counted over all its series;
//! - `ints`: volumes that are whole numbers as zigzag varint deltas, other volumes as
//!   Gorilla XOR (a flag per sample), timestamps shared.
//!
//! Run: `cargo bench -p collector --bench codec`. Prints B/sample per encoding, overall and
//! per kind of meter, and the decode speed of the smallest.

use std::time::Instant;

/// Samples per series-hour at a 10 s interval.
const PER_HOUR: usize = 360;
const VMS: usize = 200;
const HOURS: usize = 6;

/// What a meter's volumes look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// Constant for hours (vCPUs, power state, disk capacity).
    Flat,
    /// A gauge that changes now and then (memory usage, allocation).
    Gauge,
    /// A cumulative counter (CPU ns, bytes, packets): whole numbers that grow or stay.
    Counter,
    /// A derived rate at full float precision (`cpu_util`, bytes/s).
    Rate,
}

/// One series-hour: its kind, µs timestamps, volumes.
struct Series {
    kind: Kind,
    vm: usize,
    ts: Vec<i64>,
    v: Vec<f64>,
}

/// The generated hours of the fleet.
fn fleet() -> Vec<Series> {
    let mut rng = fastrand::Rng::with_seed(18);
    let mut out = Vec::new();
    let hour0: i64 = 1_800_000_000_000_000;
    for vm in 0..VMS {
        let busy = rng.f64();
        let mut cpu_ns = rng.u64(0..1 << 40) as f64;
        let mut counters: Vec<(f64, f64)> = (0..12)
            .map(|i| {
                (
                    rng.u64(0..1 << 32) as f64,
                    if i % 3 == 0 { 0.0 } else { busy },
                )
            })
            .collect();
        let mut mem = 512.0 + rng.u32(0..3500) as f64;
        let mut alloc = (rng.u64(1..20) << 30) as f64;
        for h in 0..HOURS {
            let start = hour0 + h as i64 * 3_600_000_000;
            // The VM's cycles: every 10 s from a random phase, a few ms of jitter.
            let phase = rng.i64(0..10_000_000);
            let ts: Vec<i64> = (0..PER_HOUR as i64)
                .map(|k| start + phase / 10 + k * 10_000_000 + rng.i64(-4_000..4_000))
                .collect();
            let mut push = |kind: Kind, v: Vec<f64>| {
                out.push(Series {
                    kind,
                    vm,
                    ts: ts.clone(),
                    v,
                })
            };
            for flat in [1.0, 4.0, 20.0 * (1u64 << 30) as f64, 4096.0] {
                push(Kind::Flat, vec![flat; PER_HOUR]);
            }
            let mut prev_cpu = cpu_ns;
            let mut cpu = Vec::with_capacity(PER_HOUR);
            let mut util = Vec::with_capacity(PER_HOUR);
            for k in 0..PER_HOUR {
                let step = (busy * rng.f64() * 2.0e10).round();
                cpu_ns += step;
                cpu.push(cpu_ns);
                let dt = if k == 0 {
                    10.0
                } else {
                    (ts[k] - ts[k - 1]) as f64 / 1e6
                };
                util.push((cpu_ns - prev_cpu) / (dt * 1e9 * 2.0) * 100.0);
                prev_cpu = cpu_ns;
            }
            push(Kind::Counter, cpu);
            push(Kind::Rate, util);
            for g in [&mut mem, &mut alloc] {
                let mut v = Vec::with_capacity(PER_HOUR);
                for _ in 0..PER_HOUR {
                    if rng.u32(0..30) == 0 {
                        *g += rng.i32(-64..64) as f64 * if *g > 1e9 { 4096.0 } else { 1.0 };
                    }
                    v.push(*g);
                }
                push(Kind::Gauge, v);
            }
            for (c, rate) in counters.iter_mut() {
                let mut v = Vec::with_capacity(PER_HOUR);
                let mut r = Vec::with_capacity(PER_HOUR);
                for k in 0..PER_HOUR {
                    let step = if *rate > 0.0 && rng.f64() < *rate {
                        (rng.u32(1..4000) as f64 * 512.0).round()
                    } else {
                        0.0
                    };
                    *c += step;
                    v.push(*c);
                    let dt = if k == 0 {
                        10.0
                    } else {
                        (ts[k] - ts[k - 1]) as f64 / 1e6
                    };
                    r.push(step / dt);
                }
                push(Kind::Counter, v);
                if *rate > 0.0 {
                    push(Kind::Rate, r);
                }
            }
        }
    }
    out
}

/// A bit writer (most significant bit first).
#[derive(Default)]
struct Bits {
    bytes: Vec<u8>,
    used: u32,
}

impl Bits {
    fn put(&mut self, value: u64, n: u32) {
        for i in (0..n).rev() {
            if self.used.is_multiple_of(8) {
                self.bytes.push(0);
            }
            let bit = (value >> i) & 1;
            let last = self.bytes.last_mut().expect("pushed");
            *last |= (bit as u8) << (7 - self.used % 8);
            self.used += 1;
        }
    }
}

/// A bit reader over [`Bits`]' output.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn get(&mut self, n: u32) -> u64 {
        let mut v = 0;
        for _ in 0..n {
            let bit = (self.bytes[self.at / 8] >> (7 - self.at % 8)) & 1;
            v = (v << 1) | bit as u64;
            self.at += 1;
        }
        v
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Timestamps as Gorilla's delta-of-delta buckets (the first as 64 bits).
fn put_ts(b: &mut Bits, ts: &[i64]) {
    b.put(ts[0] as u64, 64);
    let (mut prev, mut delta) = (ts[0], 0i64);
    for &t in &ts[1..] {
        let d = t - prev;
        let dod = d - delta;
        match zigzag(dod) {
            0 => b.put(0, 1),
            z if z < 1 << 12 => b.put((0b10 << 12) | z, 14),
            z if z < 1 << 17 => b.put((0b110 << 17) | z, 20),
            z if z < 1 << 26 => b.put((0b1110 << 26) | z, 30),
            z => {
                b.put(0b1111, 4);
                b.put(z, 64);
            }
        }
        prev = t;
        delta = d;
    }
}

fn get_ts(r: &mut Reader<'_>, n: usize) -> Vec<i64> {
    let mut out = vec![r.get(64) as i64];
    let mut delta = 0i64;
    for _ in 1..n {
        let dod = if r.get(1) == 0 {
            0
        } else if r.get(1) == 0 {
            unzigzag(r.get(12))
        } else if r.get(1) == 0 {
            unzigzag(r.get(17))
        } else if r.get(1) == 0 {
            unzigzag(r.get(26))
        } else {
            unzigzag(r.get(64))
        };
        delta += dod;
        out.push(out.last().expect("first") + delta);
    }
    out
}

/// One volume as Gorilla's XOR with `prev` (control bits, leading zeros, meaningful bits).
fn put_xor(b: &mut Bits, prev: f64, v: f64, window: &mut (u32, u32)) {
    let x = prev.to_bits() ^ v.to_bits();
    if x == 0 {
        b.put(0, 1);
        return;
    }
    let lead = x.leading_zeros().min(31);
    let trail = x.trailing_zeros();
    if window.0 != u32::MAX && lead >= window.0 && trail >= window.1 {
        b.put(0b10, 2);
        let bits = 64 - window.0 - window.1;
        b.put(x >> window.1, bits);
    } else {
        let bits = 64 - lead - trail;
        b.put(0b11, 2);
        b.put(lead as u64, 5);
        b.put((bits - 1) as u64, 6);
        b.put(x >> trail, bits);
        *window = (lead, trail);
    }
}

fn get_xor(r: &mut Reader<'_>, prev: f64, window: &mut (u32, u32)) -> f64 {
    if r.get(1) == 0 {
        return prev;
    }
    let x = if r.get(1) == 0 {
        let bits = 64 - window.0 - window.1;
        r.get(bits) << window.1
    } else {
        let lead = r.get(5) as u32;
        let bits = r.get(6) as u32 + 1;
        let trail = 64 - lead - bits;
        *window = (lead, trail);
        r.get(bits) << trail
    };
    f64::from_bits(prev.to_bits() ^ x)
}

fn put_values_gorilla(b: &mut Bits, v: &[f64]) {
    b.put(v[0].to_bits(), 64);
    let mut w = (u32::MAX, 0);
    for k in 1..v.len() {
        put_xor(b, v[k - 1], v[k], &mut w);
    }
}

fn get_values_gorilla(r: &mut Reader<'_>, n: usize) -> Vec<f64> {
    let mut out = vec![f64::from_bits(r.get(64))];
    let mut w = (u32::MAX, 0);
    for _ in 1..n {
        let p = *out.last().expect("first");
        out.push(get_xor(r, p, &mut w));
    }
    out
}

/// Whole numbers (up to 2^53) as zigzag deltas in Gorilla-like buckets; others XOR-coded.
fn put_values_ints(b: &mut Bits, v: &[f64]) {
    b.put(v[0].to_bits(), 64);
    let mut w = (u32::MAX, 0);
    let whole = |x: f64| x.fract() == 0.0 && x.abs() < 9.0e15;
    for k in 1..v.len() {
        let (p, x) = (v[k - 1], v[k]);
        if whole(p) && whole(x) {
            match zigzag((x - p) as i64) {
                0 => b.put(0, 1),
                z if z < 1 << 8 => b.put((0b10 << 8) | z, 10),
                z if z < 1 << 24 => b.put((0b110 << 24) | z, 27),
                z => {
                    b.put(0b1110, 4);
                    b.put(z, 64);
                }
            }
        } else {
            b.put(0b1111, 4);
            put_xor(b, p, x, &mut w);
        }
    }
}

fn get_values_ints(r: &mut Reader<'_>, n: usize) -> Vec<f64> {
    let mut out = vec![f64::from_bits(r.get(64))];
    let mut w = (u32::MAX, 0);
    for _ in 1..n {
        let p = *out.last().expect("first");
        let x = if r.get(1) == 0 {
            p
        } else if r.get(1) == 0 {
            p + unzigzag(r.get(8)) as f64
        } else if r.get(1) == 0 {
            p + unzigzag(r.get(24)) as f64
        } else if r.get(1) == 0 {
            p + unzigzag(r.get(64)) as f64
        } else {
            get_xor(r, p, &mut w)
        };
        out.push(x);
    }
    out
}

fn main() {
    let series = fleet();
    let samples: usize = series.iter().map(|s| s.v.len()).sum();
    println!(
        "codec bench: {} series-hours, {samples} samples ({VMS} VMs × {HOURS} h, one cycle per 10 s)",
        series.len()
    );
    let mut by_kind: std::collections::BTreeMap<Kind, [usize; 4]> = Default::default();
    let (mut gorilla, mut shared, mut ints) = (0usize, 0usize, 0usize);
    // Timestamps shared per VM-hour: counted once per (vm, first timestamp).
    let mut shared_ts = std::collections::HashMap::new();
    let started = Instant::now();
    let mut blobs = Vec::with_capacity(series.len());
    for s in &series {
        let mut t = Bits::default();
        put_ts(&mut t, &s.ts);
        let mut g = Bits::default();
        put_values_gorilla(&mut g, &s.v);
        let mut i = Bits::default();
        put_values_ints(&mut i, &s.v);
        // Lossless, checked.
        assert_eq!(
            get_ts(
                &mut Reader {
                    bytes: &t.bytes,
                    at: 0
                },
                s.ts.len()
            ),
            s.ts
        );
        let gv = get_values_gorilla(
            &mut Reader {
                bytes: &g.bytes,
                at: 0,
            },
            s.v.len(),
        );
        assert!(gv.iter().zip(&s.v).all(|(a, b)| a.to_bits() == b.to_bits()));
        let iv = get_values_ints(
            &mut Reader {
                bytes: &i.bytes,
                at: 0,
            },
            s.v.len(),
        );
        assert!(iv.iter().zip(&s.v).all(|(a, b)| a.to_bits() == b.to_bits()));
        gorilla += t.bytes.len() + g.bytes.len();
        shared_ts.entry((s.vm, s.ts[0])).or_insert(t.bytes.len());
        shared += g.bytes.len();
        ints += i.bytes.len();
        let e = by_kind.entry(s.kind).or_default();
        e[0] += s.v.len();
        e[1] += g.bytes.len();
        e[2] += i.bytes.len();
        e[3] += t.bytes.len();
        blobs.push(i.bytes);
    }
    let encode_s = started.elapsed().as_secs_f64();
    let ts_total: usize = shared_ts.values().sum();
    shared += ts_total;
    ints += ts_total;
    let per = |b: usize| b as f64 / samples as f64;
    println!("  raw (8 B timestamp + 8 B float):        16.00 B/sample");
    println!(
        "  gorilla per series:                     {:5.2} B/sample",
        per(gorilla)
    );
    println!(
        "  gorilla, timestamps once per VM-hour:   {:5.2} B/sample",
        per(shared)
    );
    println!(
        "  ints + xor, timestamps once per VM-hour: {:5.2} B/sample (timestamps {:.2})",
        per(ints),
        per(ts_total)
    );
    for (k, [n, g, i, t]) in &by_kind {
        println!(
            "    {k:?}: {n} samples; values gorilla {:.2}, ints {:.2} B/sample; timestamps per series {:.2}",
            *g as f64 / *n as f64,
            *i as f64 / *n as f64,
            *t as f64 / *n as f64
        );
    }
    let started = Instant::now();
    let mut check = 0.0;
    for (s, b) in series.iter().zip(&blobs) {
        let v = get_values_ints(&mut Reader { bytes: b, at: 0 }, s.v.len());
        check += v[v.len() - 1];
    }
    let decode = started.elapsed().as_secs_f64();
    println!(
        "  decode (ints + xor values, bit by bit, unoptimised): {:.1} ns/sample; all encodings and checks: {:.2} s (checksum {check:e})",
        decode * 1e9 / samples as f64,
        encode_s
    );
}
