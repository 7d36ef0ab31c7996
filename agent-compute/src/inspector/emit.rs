//! The pure emit step: samples from what libvirt answered and what the cache knows, with
//! no libvirt call, so unit tests drive it with hand-made answers.

use chrono::{DateTime, Utc};
use uuid::Uuid;
use vmeter_core::sample::DEFAULT_SOURCE;
use vmeter_core::wire::{MeterHead, Reading, Shared};

use super::SampleSink;
use super::known::{Known, MdBlob};
use crate::bulk::{BlockStat, DomStats, NetStat};
use crate::meter::Meter;

/// One domain's samples: its power state, vCPUs and memory; CPU time, balloon memory and
/// vNIC counters while it runs; each disk's counters (while it runs) and sizes. `disks`
/// and `nics` hold the counters of `k.disks` and `k.nics`, in their order (a missing entry
/// emits nothing for that device). Returns whether the domain has balloon statistics (a
/// running domain without them has no `memory.usage`; the caller warns once).
pub fn domain<'a>(
    e: &mut Emit<'a, '_, '_>,
    uuid: &'a str,
    k: &'a Known,
    st: &DomStats,
    disks: &[Option<BlockStat>],
    nics: &[Option<NetStat>],
) -> bool {
    let state = st.state.unwrap_or(0);
    let running = matches!(state, 1..=3);
    let md = &k.md;
    e.push(Meter::PowerState, state as f64, uuid, md);
    if let Some(v) = st.vcpu_current {
        e.push(Meter::Vcpus, v as f64, uuid, md);
    }
    if let Some(kib) = st.balloon_current {
        e.push(Meter::Memory, kib as f64 / 1024.0, uuid, md);
    }
    let mut balloon = true;
    if running {
        if let Some(ns) = st.cpu_ns() {
            e.push(Meter::Cpu, ns as f64, uuid, md);
        }
        let mib = |v: Option<u64>| v.map(|k| k as f64 / 1024.0);
        if let Some(avail) = mib(st.balloon_available) {
            e.push(Meter::MemoryAvailable, avail, uuid, md);
            if let Some(free) = mib(st.balloon_usable).or(mib(st.balloon_unused)) {
                e.push(Meter::MemoryUsage, avail - free, uuid, md);
            }
        } else {
            balloon = false;
        }
        if let Some(rss) = mib(st.balloon_rss) {
            e.push(Meter::MemoryResident, rss, uuid, md);
        }
        if let (Some(i), Some(o)) = (mib(st.balloon_swap_in), mib(st.balloon_swap_out)) {
            e.push(Meter::MemorySwapIn, i, uuid, md);
            e.push(Meter::MemorySwapOut, o, uuid, md);
        }
    }
    for ((_, rid, dmd), b) in k.disks.iter().zip(disks) {
        let Some(b) = b else { continue };
        if running {
            for (meter, v) in [
                (Meter::DiskReadBytes, b.rd_bytes),
                (Meter::DiskWriteBytes, b.wr_bytes),
                (Meter::DiskReadRequests, b.rd_reqs),
                (Meter::DiskWriteRequests, b.wr_reqs),
                (Meter::DiskReadLatency, b.rd_times),
                (Meter::DiskWriteLatency, b.wr_times),
            ] {
                if let Some(v) = v {
                    e.push(meter, v as f64, rid, dmd);
                }
            }
        }
        if let Some(cap) = b.capacity.or(b.physical) {
            let cap = cap.max(b.physical.unwrap_or(0));
            e.push(Meter::DiskCapacity, cap as f64, rid, dmd);
        }
        if let Some(a) = b.allocation {
            e.push(Meter::DiskAllocation, a as f64, rid, dmd);
        }
        if let Some(p) = b.physical {
            e.push(Meter::DiskUsage, p as f64, rid, dmd);
        }
    }
    if running {
        for ((_, rid, nmd), n) in k.nics.iter().zip(nics) {
            let Some(n) = n else { continue };
            for (meter, v) in [
                (Meter::NetInBytes, n.rx_bytes),
                (Meter::NetOutBytes, n.tx_bytes),
                (Meter::NetInPackets, n.rx_pkts),
                (Meter::NetOutPackets, n.tx_pkts),
                (Meter::NetInDrop, n.rx_drop),
                (Meter::NetOutDrop, n.tx_drop),
                (Meter::NetInError, n.rx_errs),
                (Meter::NetOutError, n.tx_errs),
            ] {
                if let Some(v) = v {
                    e.push(meter, v as f64, rid, nmd);
                }
            }
        }
    }
    balloon
}

/// The host's samples from libvirt's node CPU counters (ns) and memory fields (KiB).
pub fn host<'a>(
    e: &mut Emit<'a, '_, '_>,
    host: &'a str,
    md: &MdBlob,
    cpu: &[(String, u64)],
    mem: &[(String, u64)],
) {
    for (f, v) in cpu {
        let meter = match f.as_str() {
            "kernel" => Meter::NodeCpuKernel,
            "idle" => Meter::NodeCpuIdle,
            "user" => Meter::NodeCpuUser,
            "iowait" => Meter::NodeCpuIowait,
            _ => continue,
        };
        e.push(meter, *v as f64, host, md);
    }
    for (f, v) in mem {
        let meter = match f.as_str() {
            "total" => Meter::NodeMemoryTotal,
            "free" => Meter::NodeMemoryFree,
            _ => continue,
        };
        e.push(meter, *v as f64 / 1024.0, host, md);
    }
}

/// A UUID v7 for `ts` with 74 random bits from the thread's fast generator (seeded from
/// the OS once). `Uuid::now_v7` asks the OS for randomness on every call: a system call per
/// sample, most of the agent's cost per domain.
fn fast_v7(ts: DateTime<Utc>) -> Uuid {
    let mut r = [0u8; 10];
    r[..8].copy_from_slice(&fastrand::u64(..).to_le_bytes());
    r[8..].copy_from_slice(&fastrand::u16(..).to_le_bytes());
    uuid::Builder::from_unix_timestamp_millis(ts.timestamp_millis().max(0) as u64, &r).into_uuid()
}

/// Builds the samples of one domain (or the host) that share timestamp, owner and clock,
/// as borrowed parts (nothing is allocated per sample). The fields a resource's samples
/// share are encoded once per resource ([`Shared`]).
pub struct Emit<'a, 'o, 's> {
    out: &'o mut SampleSink<'s>,
    /// Per [`Meter`]: its encoded head, and whether this cycle keeps it.
    heads: &'a [MeterHead],
    kept: &'a [bool],
    ts: DateTime<Utc>,
    ts_us: i64,
    mono: f64,
    user: Option<&'a str>,
    project: Option<&'a str>,
    shared: Shared,
    /// Samples handed to `out`.
    pub count: usize,
    /// The resource `shared` was encoded for (address and length of its id: borrowed for
    /// `'a`, so it cannot be freed and reused while this `Emit` lives).
    current: Option<(*const u8, usize)>,
}

impl<'a, 'o, 's> Emit<'a, 'o, 's> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        out: &'o mut SampleSink<'s>,
        heads: &'a [MeterHead],
        kept: &'a [bool],
        shared: Shared,
        ts: DateTime<Utc>,
        mono: f64,
        user: Option<&'a str>,
        project: Option<&'a str>,
    ) -> Self {
        Emit {
            out,
            heads,
            kept,
            ts,
            ts_us: ts.timestamp_micros(),
            mono,
            user,
            project,
            shared,
            count: 0,
            current: None,
        }
    }

    /// The buffer of the shared fields, for the next `Emit`.
    pub fn into_shared(self) -> Shared {
        self.shared
    }

    /// One sample of `meter`, unless this cycle does not keep the meter.
    pub fn push(&mut self, meter: Meter, volume: f64, rid: &'a str, md: &MdBlob) {
        let m = meter as usize;
        if !self.kept[m] {
            return;
        }
        if let Some(rule) = md.refused {
            let reason = vmeter_core::telemetry::DropReason::Contract(rule);
            vmeter_core::telemetry::dropped("agent-compute", reason).inc();
            return;
        }
        let this = Some((rid.as_ptr(), rid.len()));
        if self.current != this {
            self.shared.set(
                self.user,
                self.project,
                rid,
                self.ts_us,
                DEFAULT_SOURCE,
                Some(self.mono),
            );
            self.current = this;
        }
        let r = Reading {
            meter: &self.heads[m],
            volume,
            message_id: fast_v7(self.ts),
        };
        self.count += 1;
        (self.out)(&r, &self.shared, md)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use chrono::TimeZone;
    use vmeter_core::Sample;
    use vmeter_core::wire::{self, BatchWriter};

    use super::*;
    use crate::bulk::VcpuStat;
    use crate::domain_xml;
    use crate::inspector::Options;

    const UUID: &str = "ff91d2dc-69a1-43ef-abde-c9e4e9a0305b";

    /// The cache entry of the domain Nova 1.1 describes (testdata), as the cycle builds it.
    fn nova_domain(state: u32) -> Known {
        let xml = domain_xml::parse(include_str!("../../testdata/nova-1.1-domain.xml")).unwrap();
        let opts = Options {
            host: "hv1".into(),
            bulk: true,
            xml_refresh: std::time::Duration::from_secs(300),
            contract: Default::default(),
        };
        Known::build(
            &opts,
            1,
            "instance-0000000e".into(),
            UUID,
            Some(7),
            xml,
            state,
            2,
            2_097_152,
            Vec::new(),
        )
    }

    /// Runs the emit step and returns its samples as the wire carries them.
    fn emitted(
        k: &Known,
        st: &DomStats,
        disks: &[Option<BlockStat>],
        nics: &[Option<NetStat>],
    ) -> (Vec<Sample>, bool) {
        let heads: Vec<MeterHead> = Meter::ALL
            .iter()
            .map(|m| {
                let (name, kind, unit) = m.def();
                MeterHead::new(name, kind, unit)
            })
            .collect();
        let kept = vec![true; Meter::ALL.len()];
        let mut w = BatchWriter::with_capacity(64);
        let mut sink = |r: &Reading<'_>, shared: &Shared, md: &MdBlob| {
            let i = w.metadata(md.id as usize, |o| o.extend_from_slice(&md.bytes));
            w.push_shared(r, shared, i);
        };
        let ts = Utc.with_ymd_and_hms(2026, 12, 5, 10, 0, 0).unwrap();
        let mut e = Emit::new(
            &mut sink,
            &heads,
            &kept,
            Shared::default(),
            ts,
            123.5,
            k.user_id.as_deref(),
            k.project_id.as_deref(),
        );
        let balloon = domain(&mut e, UUID, k, st, disks, nics);
        let n = e.count;
        drop(e);
        let samples = wire::decode(&w.finish(), Some(wire::FORMAT_VERSION)).unwrap();
        assert_eq!(samples.len(), n);
        (samples, balloon)
    }

    /// (meter, resource id) → volume.
    fn by_meter(samples: &[Sample]) -> HashMap<(String, String), f64> {
        samples
            .iter()
            .map(|s| ((s.name.clone(), s.resource_id.clone()), s.volume))
            .collect()
    }

    fn running_stats() -> DomStats {
        DomStats {
            state: Some(1),
            cpu_time: Some(9_000),
            vcpu_current: Some(2),
            vcpus: vec![
                VcpuStat {
                    time: Some(1_000),
                    wait: Some(10),
                },
                VcpuStat {
                    time: Some(2_000),
                    wait: Some(20),
                },
            ],
            balloon_current: Some(2_097_152),
            balloon_maximum: Some(2_097_152),
            balloon_available: Some(2_000_000),
            balloon_usable: Some(1_500_000),
            balloon_unused: Some(1_400_000),
            balloon_rss: Some(300_000),
            balloon_swap_in: Some(1024),
            balloon_swap_out: Some(2048),
            ..Default::default()
        }
    }

    fn disk() -> BlockStat {
        BlockStat {
            rd_bytes: Some(4096),
            wr_bytes: Some(8192),
            rd_reqs: Some(3),
            wr_reqs: Some(5),
            capacity: Some(10 << 30),
            allocation: Some(1 << 30),
            physical: Some(2 << 30),
            ..Default::default()
        }
    }

    fn nic(rx: u64) -> NetStat {
        NetStat {
            rx_bytes: Some(rx),
            tx_bytes: Some(rx * 2),
            rx_pkts: Some(10),
            tx_pkts: Some(20),
            rx_drop: Some(0),
            tx_drop: Some(1),
            rx_errs: Some(2),
            tx_errs: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn a_running_nova_domain_emits_every_meter_with_its_owner() {
        let k = nova_domain(1);
        assert_eq!(k.disks.len(), 2, "vda and the config drive");
        assert_eq!(k.nics.len(), 2);
        let disks = [Some(disk()), None];
        let nics = [Some(nic(100)), Some(nic(500))];
        let (samples, balloon) = emitted(&k, &running_stats(), &disks, &nics);
        assert!(balloon);
        let m = by_meter(&samples);
        let at = |meter: &str, rid: &str| {
            *m.get(&(meter.to_string(), rid.to_string()))
                .unwrap_or_else(|| panic!("no {meter} for {rid}: {m:?}"))
        };
        assert_eq!(at("power.state", UUID), 1.0);
        assert_eq!(at("vcpus", UUID), 2.0);
        assert_eq!(at("memory", UUID), 2048.0);
        // Σ(vcpu time + wait), not cpu.time, since every vCPU has both.
        assert_eq!(at("cpu", UUID), 3_030.0);
        assert_eq!(
            at("memory.usage", UUID),
            (2_000_000.0 - 1_500_000.0) / 1024.0
        );
        assert_eq!(at("memory.resident", UUID), 300_000.0 / 1024.0);
        assert_eq!(at("memory.swap.in", UUID), 1.0);
        let vda = format!("{UUID}-vda");
        assert_eq!(at("disk.device.read.bytes", &vda), 4096.0);
        assert_eq!(at("disk.device.write.requests", &vda), 5.0);
        assert_eq!(at("disk.device.capacity", &vda), (10u64 << 30) as f64);
        assert_eq!(at("disk.device.usage", &vda), (2u64 << 30) as f64);
        // The device without an answer emits nothing.
        let hda = format!("{UUID}-hda");
        assert!(!samples.iter().any(|s| s.resource_id == hda));
        let tap = format!("instance-0000000e-{UUID}-tap77c1dc00-af");
        assert_eq!(at("network.incoming.bytes", &tap), 100.0);
        assert_eq!(at("network.outgoing.bytes", &tap), 200.0);
        assert_eq!(at("network.outgoing.packets.error", &tap), 3.0);
        // Every sample carries the Nova owner, the timestamp and clock of the answer.
        for s in &samples {
            assert_eq!(
                s.user_id.as_deref(),
                Some("ff627ad39ed94479b9c5033bc462cf78")
            );
            assert_eq!(
                s.project_id.as_deref(),
                Some("512866f9994f4ad8916d8539a7cdeec9")
            );
            assert_eq!(s.timestamp.timestamp(), 1_796_464_800);
            assert_eq!(s.monotonic_time, Some(123.5));
        }
        let vnic = samples
            .iter()
            .find(|s| s.resource_id == tap)
            .expect("a vNIC sample");
        assert_eq!(vnic.resource_metadata["mac"], "fa:16:3e:aa:d9:23");
        assert_eq!(vnic.resource_metadata["instance_name"], "instance-0000000e");
    }

    #[test]
    fn a_stopped_domain_reports_state_and_sizes_but_no_counters() {
        let k = nova_domain(5);
        let st = DomStats {
            state: Some(5),
            vcpu_current: Some(2),
            balloon_current: Some(2_097_152),
            ..running_stats()
        };
        let (samples, _) = emitted(&k, &st, &[Some(disk()), None], &[Some(nic(1)), None]);
        let mut names: Vec<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "disk.device.allocation",
                "disk.device.capacity",
                "disk.device.usage",
                "memory",
                "power.state",
                "vcpus"
            ]
        );
    }

    #[test]
    fn a_running_domain_without_balloon_statistics_says_so() {
        let k = nova_domain(1);
        let st = DomStats {
            balloon_available: None,
            balloon_usable: None,
            balloon_unused: None,
            ..running_stats()
        };
        let (samples, balloon) = emitted(&k, &st, &[], &[]);
        assert!(!balloon, "the caller warns once");
        assert!(!samples.iter().any(|s| s.name == "memory.usage"));
        assert!(samples.iter().any(|s| s.name == "cpu"));
    }
}
