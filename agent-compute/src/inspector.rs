//! One polling cycle against libvirt (blocking; run on a dedicated thread).
//!
//! Per domain: `info`, `xml_desc`, then per-device stats. Every sample of one domain in one
//! cycle carries the same timestamp and the host monotonic time of the moment libvirt
//! answered. A domain that disappears or fails mid-cycle is skipped for that cycle; a
//! connection-level failure is returned so the caller reconnects.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::Domain;
use vmeter_core::sample::DEFAULT_SOURCE;
use vmeter_core::{Metadata, Sample, SampleType};

use crate::domain_xml::{self, DomainXml};

/// The embedded demo node (libvirt test driver), selected with `libvirt.uri: demo`.
pub const DEMO_NODE_XML: &str = include_str!("../../deploy/demo-node.xml");

/// libvirt's VIR_DOMAIN_MEMORY_STAT_* tags used here.
mod memtag {
    pub const SWAP_IN: u32 = 0;
    pub const SWAP_OUT: u32 = 1;
    pub const UNUSED: u32 = 4;
    pub const AVAILABLE: u32 = 5;
    pub const ACTUAL: u32 = 6;
    pub const RSS: u32 = 7;
    pub const USABLE: u32 = 8;
}

/// Host monotonic clock, seconds (CLOCK_MONOTONIC: does not jump with NTP or settimeofday).
pub fn monotonic_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The system host name.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Resolves `demo` to a test-driver URI over a file holding the embedded demo node.
pub fn resolve_uri(uri: &str) -> std::io::Result<String> {
    if uri != "demo" {
        return Ok(uri.to_string());
    }
    let path = std::env::temp_dir().join(format!("vmeter-demo-node-{}.xml", std::process::id()));
    std::fs::write(&path, DEMO_NODE_XML)?;
    Ok(format!("test://{}", path.display()))
}

/// Counts of one cycle.
#[derive(Debug, Default, Clone, Copy)]
pub struct CycleStats {
    pub domains: usize,
    pub skipped: usize,
    pub samples: usize,
}

/// A read-only libvirt connection and the per-domain state kept between cycles.
pub struct Inspector {
    conn: Connect,
    host: String,
    no_balloon_warned: HashSet<String>,
}

impl Inspector {
    /// Opens `uri` read-only.
    pub fn open(uri: &str, host: String) -> Result<Self, virt::error::Error> {
        let conn = Connect::open_read_only(Some(uri))?;
        Ok(Inspector {
            conn,
            host,
            no_balloon_warned: HashSet::new(),
        })
    }

    /// Whether the connection is still alive.
    pub fn alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// Polls every domain once. `Err` only when the domain list itself cannot be read.
    pub fn poll(&mut self) -> Result<(Vec<Sample>, CycleStats), virt::error::Error> {
        let domains = self.conn.list_all_domains(0)?;
        let mut out = Vec::new();
        let mut stats = CycleStats {
            domains: domains.len(),
            ..Default::default()
        };
        for d in domains {
            match self.poll_domain(&d, &mut out) {
                Ok(()) => {}
                Err(e) => {
                    stats.skipped += 1;
                    tracing::debug!(domain = d.name().unwrap_or_default(), error = %e, "Domain skipped this cycle (gone or not readable).");
                }
            }
        }
        stats.samples = out.len();
        Ok((out, stats))
    }

    fn poll_domain(&mut self, d: &Domain, out: &mut Vec<Sample>) -> Result<(), virt::error::Error> {
        let name = d.name()?;
        let uuid = d.uuid_string()?;
        let info = d.info()?;
        let xml = d.xml_desc(0)?;
        let parsed = domain_xml::parse(&xml).unwrap_or_else(|e| {
            tracing::warn!(domain = %name, error = %e, "Domain XML does not parse; reporting without devices and metadata.");
            DomainXml::default()
        });
        // libvirt state codes: 0 nostate, 1 running, 2 blocked, 3 paused, 4 shutdown,
        // 5 shutoff, 6 crashed, 7 pmsuspended.
        let state = info.state.to_raw();
        let running = matches!(state, 1..=3);
        let mem_stats = if running {
            d.memory_stats(0).unwrap_or_default()
        } else {
            Vec::new()
        };
        // One instant for the whole domain: the moment libvirt answered.
        let timestamp = Utc::now();
        let mono = monotonic_secs();

        let instance_id = uuid.clone();
        let vcpus = info.nr_virt_cpu as i64;
        let md = Arc::new(self.instance_metadata(
            &name,
            &instance_id,
            &parsed,
            vcpus,
            info.max_mem,
            state,
        ));
        let (user, project) = (parsed.user_id.clone(), parsed.project_id.clone());
        let mk = |name: &str,
                  kind: SampleType,
                  unit: &str,
                  volume: f64,
                  rid: &str,
                  md: Arc<Metadata>| {
            Sample {
                name: name.into(),
                kind,
                unit: unit.into(),
                volume,
                user_id: user.clone(),
                project_id: project.clone(),
                resource_id: rid.into(),
                timestamp,
                resource_metadata: md,
                source: DEFAULT_SOURCE.into(),
                message_id: Uuid::now_v7(),
                monotonic_time: Some(mono),
            }
        };

        out.push(mk(
            "power.state",
            SampleType::Gauge,
            "",
            state as f64,
            &instance_id,
            md.clone(),
        ));
        out.push(mk(
            "vcpus",
            SampleType::Gauge,
            "vcpu",
            vcpus as f64,
            &instance_id,
            md.clone(),
        ));
        let stat = |tag: u32| {
            mem_stats
                .iter()
                .find(|s| s.tag == tag)
                .map(|s| s.val as f64 / 1024.0)
        };
        let memory_mib = stat(memtag::ACTUAL).unwrap_or(info.memory as f64 / 1024.0);
        out.push(mk(
            "memory",
            SampleType::Gauge,
            "MiB",
            memory_mib,
            &instance_id,
            md.clone(),
        ));
        if running {
            out.push(mk(
                "cpu",
                SampleType::Cumulative,
                "ns",
                info.cpu_time as f64,
                &instance_id,
                md.clone(),
            ));
            if let Some(avail) = stat(memtag::AVAILABLE) {
                out.push(mk(
                    "memory.available",
                    SampleType::Gauge,
                    "MiB",
                    avail,
                    &instance_id,
                    md.clone(),
                ));
                if let Some(free) = stat(memtag::USABLE).or(stat(memtag::UNUSED)) {
                    out.push(mk(
                        "memory.usage",
                        SampleType::Gauge,
                        "MiB",
                        avail - free,
                        &instance_id,
                        md.clone(),
                    ));
                }
            } else if self.no_balloon_warned.insert(uuid.clone()) {
                tracing::warn!(domain = %name, "No balloon statistics (no virtio balloon in the guest?): no memory.usage for this domain; polling goes on. Warned once.");
            }
            if let Some(rss) = stat(memtag::RSS) {
                out.push(mk(
                    "memory.resident",
                    SampleType::Gauge,
                    "MiB",
                    rss,
                    &instance_id,
                    md.clone(),
                ));
            }
            if let (Some(i), Some(o)) = (stat(memtag::SWAP_IN), stat(memtag::SWAP_OUT)) {
                out.push(mk(
                    "memory.swap.in",
                    SampleType::Cumulative,
                    "MiB",
                    i,
                    &instance_id,
                    md.clone(),
                ));
                out.push(mk(
                    "memory.swap.out",
                    SampleType::Cumulative,
                    "MiB",
                    o,
                    &instance_id,
                    md.clone(),
                ));
            }
        }

        for disk in &parsed.disks {
            let rid = format!("{instance_id}-{}", disk.target);
            let mut dmd = (*md).clone();
            dmd.insert("disk_name".into(), Value::String(disk.target.clone()));
            let dmd = Arc::new(dmd);
            if running {
                match d.block_stats(&disk.target) {
                    Ok(b) => {
                        for (meter, unit, v) in [
                            ("disk.device.read.bytes", "B", b.rd_bytes),
                            ("disk.device.write.bytes", "B", b.wr_bytes),
                            ("disk.device.read.requests", "request", b.rd_req),
                            ("disk.device.write.requests", "request", b.wr_req),
                        ] {
                            if v >= 0 {
                                out.push(mk(
                                    meter,
                                    SampleType::Cumulative,
                                    unit,
                                    v as f64,
                                    &rid,
                                    dmd.clone(),
                                ));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(domain = %name, disk = %disk.target, error = %e, "Block stats unavailable this cycle.")
                    }
                }
            }
            if let Ok(bi) = d.block_info(&disk.target, 0) {
                out.push(mk(
                    "disk.device.capacity",
                    SampleType::Gauge,
                    "B",
                    bi.capacity.max(bi.physical) as f64,
                    &rid,
                    dmd.clone(),
                ));
                out.push(mk(
                    "disk.device.allocation",
                    SampleType::Gauge,
                    "B",
                    bi.allocation as f64,
                    &rid,
                    dmd.clone(),
                ));
                out.push(mk(
                    "disk.device.usage",
                    SampleType::Gauge,
                    "B",
                    bi.physical as f64,
                    &rid,
                    dmd.clone(),
                ));
            }
        }

        if running {
            for nic in &parsed.nics {
                let rid = nic
                    .filterref
                    .clone()
                    .unwrap_or_else(|| format!("{name}-{instance_id}-{}", nic.target));
                let mut nmd = (*md).clone();
                nmd.insert("mac".into(), json!(nic.mac));
                nmd.insert("fref".into(), json!(nic.filterref));
                nmd.insert(
                    "vnic_name".into(),
                    json!(nic.filterref.clone().unwrap_or_else(|| nic.target.clone())),
                );
                nmd.insert("instance_name".into(), json!(name));
                let nmd = Arc::new(nmd);
                match d.interface_stats(&nic.target) {
                    Ok(s) => {
                        for (meter, unit, v) in [
                            ("network.incoming.bytes", "B", s.rx_bytes),
                            ("network.outgoing.bytes", "B", s.tx_bytes),
                            ("network.incoming.packets", "packet", s.rx_packets),
                            ("network.outgoing.packets", "packet", s.tx_packets),
                            ("network.incoming.packets.drop", "packet", s.rx_drop),
                            ("network.outgoing.packets.drop", "packet", s.tx_drop),
                            ("network.incoming.packets.error", "packet", s.rx_errs),
                            ("network.outgoing.packets.error", "packet", s.tx_errs),
                        ] {
                            if v >= 0 {
                                out.push(mk(
                                    meter,
                                    SampleType::Cumulative,
                                    unit,
                                    v as f64,
                                    &rid,
                                    nmd.clone(),
                                ));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(domain = %name, nic = %nic.target, error = %e, "Interface stats unavailable this cycle.")
                    }
                }
            }
        }
        Ok(())
    }

    fn instance_metadata(
        &self,
        name: &str,
        instance_id: &str,
        x: &DomainXml,
        vcpus: i64,
        max_mem_kib: u64,
        state: u32,
    ) -> Metadata {
        let mut md = Metadata::new();
        md.insert("name".into(), json!(name));
        md.insert("instance_id".into(), json!(instance_id));
        md.insert("host".into(), json!(self.host));
        md.insert("cpu_number".into(), json!(vcpus));
        md.insert("vcpus".into(), json!(vcpus));
        md.insert("memory_mb".into(), json!(max_mem_kib / 1024));
        let (status, st) = match state {
            1 | 2 => ("active", "running"),
            3 => ("paused", "paused"),
            4 | 5 => ("stopped", "stopped"),
            6 => ("error", "error"),
            7 => ("suspended", "suspended"),
            _ => ("building", "pending"),
        };
        md.insert("status".into(), json!(status));
        md.insert("state".into(), json!(st));
        if let Some(n) = &x.display_name {
            md.insert("display_name".into(), json!(n));
        }
        if let Some(f) = &x.flavor {
            let mut fl = serde_json::Map::new();
            if let Some(v) = &f.name {
                fl.insert("name".into(), json!(v));
                md.insert("instance_type".into(), json!(v));
            }
            for (k, v) in [
                ("vcpus", f.vcpus),
                ("ram", f.ram_mb),
                ("disk", f.disk_gb),
                ("ephemeral", f.ephemeral_gb),
                ("swap", f.swap_mb),
            ] {
                if let Some(v) = v {
                    fl.insert(k.into(), json!(v));
                }
            }
            md.insert("flavor".into(), Value::Object(fl));
        }
        if let Some(i) = &x.image_ref {
            md.insert("image_ref".into(), json!(i));
        }
        md
    }
}
