//! Agent-style data for the ingest bench (`agent_mix.rs`): what the notification service
//! publishes for a fleet of VMs polled every 10 s (the meters of docs/METERS.md and the
//! default pipeline's derived rates).
//!
//! The data: [`VMS`] VMs × [`HOURS`] hours, one polling cycle every 10 s per VM from a random
//! phase, whose µs timestamp (a few ms of jitter) all its samples share. Per VM and cycle
//! [`PER_VM`] samples on three resources, with Ceilometer's resource ids and metadata
//! (instance; disk `<uuid>-vda` with `disk_name`; vNIC `instance-…-<uuid>-tap…` with `mac`,
//! `vnic_name`): flat meters (vCPUs, power state, memory, capacity, drop and error counters of
//! a healthy NIC), gauges that change now and then (memory usage and resident, disk
//! allocation and usage), cumulative counters growing by whole steps (CPU ns, disk bytes and
//! requests, vNIC bytes and packets; idle devices flat), and derived rates at full float
//! precision (`cpu_util`, bytes/s, from the real timestamps). Every tenth VM is resized in
//! hour 3 (its three resources' metadata change: new attributions).

use std::sync::Arc;

use serde_json::json;
use vmeter_core::{Sample, SampleType};

/// VMs of the fleet.
pub const VMS: usize = 40;
/// Hours of data.
pub const HOURS: usize = 6;
/// Polling cycles per VM (one every 10 s).
pub const CYCLES: usize = HOURS * 360;
/// Samples per VM and cycle: 7 of the instance, 9 of its disk, 10 of its vNIC.
pub const PER_VM: usize = 26;

/// What a meter's volumes look like, for the streams' breakdown.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Flat,
    Gauge,
    Counter,
    Rate,
}

/// `(name, type, unit, kind)` of the meters, in the order a VM's cycle emits them:
/// instance, disk, vNIC.
pub const METERS: [(&str, SampleType, &str, Kind); PER_VM] = [
    ("cpu", SampleType::Cumulative, "ns", Kind::Counter),
    ("cpu_util", SampleType::Gauge, "%", Kind::Rate),
    ("vcpus", SampleType::Gauge, "vcpu", Kind::Flat),
    ("power.state", SampleType::Gauge, "state", Kind::Flat),
    ("memory", SampleType::Gauge, "MiB", Kind::Flat),
    ("memory.usage", SampleType::Gauge, "MiB", Kind::Gauge),
    ("memory.resident", SampleType::Gauge, "MiB", Kind::Gauge),
    (
        "disk.device.read.bytes",
        SampleType::Cumulative,
        "B",
        Kind::Counter,
    ),
    (
        "disk.device.write.bytes",
        SampleType::Cumulative,
        "B",
        Kind::Counter,
    ),
    (
        "disk.device.read.requests",
        SampleType::Cumulative,
        "request",
        Kind::Counter,
    ),
    (
        "disk.device.write.requests",
        SampleType::Cumulative,
        "request",
        Kind::Counter,
    ),
    ("disk.device.capacity", SampleType::Gauge, "B", Kind::Flat),
    (
        "disk.device.allocation",
        SampleType::Gauge,
        "B",
        Kind::Gauge,
    ),
    ("disk.device.usage", SampleType::Gauge, "B", Kind::Gauge),
    (
        "disk.device.read.bytes.rate",
        SampleType::Gauge,
        "B/s",
        Kind::Rate,
    ),
    (
        "disk.device.write.bytes.rate",
        SampleType::Gauge,
        "B/s",
        Kind::Rate,
    ),
    (
        "network.incoming.bytes",
        SampleType::Cumulative,
        "B",
        Kind::Counter,
    ),
    (
        "network.outgoing.bytes",
        SampleType::Cumulative,
        "B",
        Kind::Counter,
    ),
    (
        "network.incoming.packets",
        SampleType::Cumulative,
        "packet",
        Kind::Counter,
    ),
    (
        "network.outgoing.packets",
        SampleType::Cumulative,
        "packet",
        Kind::Counter,
    ),
    (
        "network.incoming.packets.drop",
        SampleType::Cumulative,
        "packet",
        Kind::Flat,
    ),
    (
        "network.outgoing.packets.drop",
        SampleType::Cumulative,
        "packet",
        Kind::Flat,
    ),
    (
        "network.incoming.packets.error",
        SampleType::Cumulative,
        "packet",
        Kind::Flat,
    ),
    (
        "network.outgoing.packets.error",
        SampleType::Cumulative,
        "packet",
        Kind::Flat,
    ),
    (
        "network.incoming.bytes.rate",
        SampleType::Gauge,
        "B/s",
        Kind::Rate,
    ),
    (
        "network.outgoing.bytes.rate",
        SampleType::Gauge,
        "B/s",
        Kind::Rate,
    ),
];

/// The cycle at which every tenth VM is resized (hour 3).
const RESIZE_AT: usize = 3 * 360;

/// One VM's identity and the state of its counters and gauges between cycles.
struct Vm {
    uuid: String,
    name: String,
    project: String,
    /// µs past the cycle's 10 s boundary at which this VM is polled.
    phase: i64,
    /// Share of cycles its devices move data in, and the scale of its CPU use.
    busy: f64,
    cpu_ns: f64,
    mem_usage: f64,
    resident: f64,
    /// Disk read/write bytes and requests.
    disk: [f64; 4],
    alloc: f64,
    /// vNIC rx/tx bytes and packets.
    nic: [f64; 4],
    prev_ts: Option<i64>,
    /// Resized at [`RESIZE_AT`] (every tenth VM).
    resizes: bool,
    /// Metadata of the instance, the disk and the vNIC before and after a resize.
    md: [[Arc<vmeter_core::Metadata>; 3]; 2],
}

fn flavor(resized: bool) -> (&'static str, u32, u32) {
    if resized {
        ("m1.large", 4, 8192)
    } else {
        ("m1.medium", 2, 4096)
    }
}

impl Vm {
    fn new(k: usize, rng: &mut fastrand::Rng) -> Vm {
        let uuid = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("agent-{k}").as_bytes())
            .to_string();
        let name = format!("instance-{k:08x}");
        let md = [false, true].map(|resized| {
            let (flavor, vcpus, ram) = flavor(resized);
            let base = json!({
                "name": name, "host": "compute-07", "cpu_number": vcpus, "vcpus": vcpus,
                "memory_mb": ram, "status": "active", "state": "running",
                "display_name": format!("app-{k}"), "instance_type": flavor,
                "flavor": {"name": flavor, "vcpus": vcpus, "ram": ram, "disk": 20},
                "image_ref": "5c1a0f5e-6b8a-4c8e-9d0f-2a4b6c8d0e1f",
            });
            let base = base.as_object().unwrap().clone();
            let mut disk = base.clone();
            disk.insert("disk_name".into(), json!("vda"));
            let mut nic = base.clone();
            nic.insert(
                "mac".into(),
                json!(format!("fa:16:3e:00:{:02x}:{:02x}", k / 256, k % 256)),
            );
            nic.insert("vnic_name".into(), json!(format!("tap{}", &uuid[..11])));
            nic.insert("instance_name".into(), json!(name));
            [Arc::new(base), Arc::new(disk), Arc::new(nic)]
        });
        Vm {
            project: format!("project-{}", k % 5),
            phase: rng.i64(0..10_000_000),
            busy: rng.f64(),
            cpu_ns: rng.u64(0..1 << 40) as f64,
            mem_usage: 512.0 + rng.u32(0..3000) as f64,
            resident: 300.0 + rng.u32(0..3000) as f64,
            disk: [0; 4].map(|_| rng.u64(0..1 << 32) as f64),
            alloc: (rng.u64(1..20) << 30) as f64,
            nic: [0; 4].map(|_| rng.u64(0..1 << 32) as f64),
            prev_ts: None,
            resizes: k.is_multiple_of(10),
            md,
            uuid,
            name,
        }
    }

    /// The resource ids of the instance, its disk and its vNIC.
    fn resource_ids(&self) -> [String; 3] {
        [
            self.uuid.clone(),
            format!("{}-vda", self.uuid),
            format!("{}-{}-tap{}", self.name, self.uuid, &self.uuid[..11]),
        ]
    }

    /// This VM's [`PER_VM`] volumes at cycle `c`, polled at `ts` (µs since the epoch).
    fn cycle(&mut self, c: usize, ts: i64, rng: &mut fastrand::Rng) -> [f64; PER_VM] {
        let (_, vcpus, ram) = flavor(self.resized(c));
        let dt = self.prev_ts.map_or(10.0, |p| (ts - p) as f64 / 1e6);
        self.prev_ts = Some(ts);
        let cpu_step = (self.busy * rng.f64() * 1e10 * vcpus as f64).round();
        self.cpu_ns += cpu_step;
        let cpu_util = cpu_step / (dt * 1e9 * vcpus as f64) * 100.0;
        if rng.u32(0..30) == 0 {
            self.mem_usage += rng.i32(-64..64) as f64;
        }
        if rng.u32(0..5) == 0 {
            self.resident += rng.i32(-8..8) as f64;
        }
        // Bytes a device moved this cycle: whole 512-byte blocks, in a share `busy` of cycles.
        let moved = |busy: f64, rng: &mut fastrand::Rng| {
            if rng.f64() < busy {
                rng.u32(1..4000) as f64 * 512.0
            } else {
                0.0
            }
        };
        let rd = moved(self.busy * 0.5, rng);
        let wr = moved(self.busy, rng);
        self.disk[0] += rd;
        self.disk[1] += wr;
        self.disk[2] += (rd / 4096.0).ceil();
        self.disk[3] += (wr / 4096.0).ceil();
        if wr > 0.0 && rng.u32(0..20) == 0 {
            self.alloc += 1_048_576.0;
        }
        let rx = moved(self.busy, rng);
        let tx = moved(self.busy, rng);
        self.nic[0] += rx;
        self.nic[1] += tx;
        self.nic[2] += (rx / 1400.0).ceil();
        self.nic[3] += (tx / 1400.0).ceil();
        [
            self.cpu_ns,
            cpu_util,
            vcpus as f64,
            1.0,
            ram as f64,
            self.mem_usage,
            self.resident,
            self.disk[0],
            self.disk[1],
            self.disk[2],
            self.disk[3],
            21_474_836_480.0,
            self.alloc,
            self.alloc,
            rd / dt,
            wr / dt,
            self.nic[0],
            self.nic[1],
            self.nic[2],
            self.nic[3],
            0.0,
            0.0,
            0.0,
            0.0,
            rx / dt,
            tx / dt,
        ]
    }

    fn resized(&self, c: usize) -> bool {
        self.resizes && c >= RESIZE_AT
    }
}

/// The fleet's processed-queue messages: one per cycle, every VM's samples of that cycle.
pub fn messages(t0: chrono::DateTime<chrono::Utc>) -> (Vec<Vec<u8>>, Vec<[String; 3]>) {
    let mut rng = fastrand::Rng::with_seed(18);
    let mut vms: Vec<Vm> = (0..VMS).map(|k| Vm::new(k, &mut rng)).collect();
    let ids: Vec<[String; 3]> = vms.iter().map(Vm::resource_ids).collect();
    let t0_us = t0.timestamp_micros();
    let bodies = (0..CYCLES)
        .map(|c| {
            let mut out = Vec::with_capacity(VMS * PER_VM);
            for (vm, rids) in vms.iter_mut().zip(&ids) {
                let ts = t0_us + vm.phase + c as i64 * 10_000_000 + rng.i64(-4_000..4_000);
                let resized = usize::from(vm.resized(c));
                let volumes = vm.cycle(c, ts, &mut rng);
                for (m, ((name, kind, unit, _), volume)) in METERS.iter().zip(volumes).enumerate() {
                    // Meters 0..7 are the instance's, 7..16 the disk's, the rest the vNIC's.
                    let r = match m {
                        0..7 => 0,
                        7..16 => 1,
                        _ => 2,
                    };
                    out.push(Sample {
                        name: (*name).into(),
                        kind: *kind,
                        unit: (*unit).into(),
                        volume,
                        user_id: Some("0f0e0d0c0b0a09080706050403020100".into()),
                        project_id: Some(vm.project.clone()),
                        resource_id: rids[r].clone(),
                        timestamp: chrono::DateTime::from_timestamp_micros(ts).unwrap(),
                        resource_metadata: vm.md[resized][r].clone(),
                        source: "openstack".into(),
                        message_id: uuid::Uuid::new_v4(),
                        monotonic_time: None,
                    });
                }
            }
            vmeter_core::wire::encode(&out)
        })
        .collect();
    (bodies, ids)
}
