//! The cache of the agent's per-domain work: what a domain looked like when its XML was
//! last read (owner, devices, the resources' metadata, encoded once), and when to read the
//! XML again.

use std::time::Instant;

use serde_json::{Value, json};
use vmeter_core::sample::DEFAULT_SOURCE;
use vmeter_core::{Metadata, contract::Contract, wire};

use super::Options;
use crate::domain_xml::DomainXml;

/// A domain as last seen, with its parsed XML and the metadata built from it.
pub struct Known {
    pub id: Option<u32>,
    pub state: u32,
    pub vcpus: u64,
    pub mem_kib: u64,
    pub name: String,
    /// Owner from the Nova metadata (the rest of the parsed XML lives on in the metadata).
    pub user_id: Option<Box<str>>,
    pub project_id: Option<Box<str>>,
    /// Device names the bulk call reported when the XML was read (hot-plug detection).
    pub bulk_devices: Vec<String>,
    pub fetched: Instant,
    /// The cycle that last saw the domain (domains unseen for a while are forgotten).
    pub seen: u64,
    pub md: MdBlob,
    /// (target, resource id, metadata) per disk with a source.
    pub disks: Vec<(String, String, MdBlob)>,
    /// (target, resource id, metadata) per vNIC.
    pub nics: Vec<(String, String, MdBlob)>,
}

/// What this cycle's answer says of a domain, compared with its cached XML.
pub struct Seen<'a, D: Iterator<Item = &'a str>> {
    /// The domain id (changes when the domain restarts).
    pub id: Option<u32>,
    pub state: u32,
    /// vCPUs and maximum memory (KiB), when this cycle's answer has them.
    pub vcpus: Option<u64>,
    pub mem_kib: Option<u64>,
    /// The device names of the bulk record, if it carried any `block.*`/`net.*` field.
    pub devices: Option<D>,
}

impl Known {
    /// Whether the domain's XML must be read again: it restarted, changed state, vCPUs,
    /// memory or devices, or was read `refresh` ago or longer.
    pub fn is_stale<'a, D: Iterator<Item = &'a str>>(
        &self,
        now: Seen<'a, D>,
        refresh: std::time::Duration,
    ) -> bool {
        self.id != now.id
            || self.state != now.state
            || now.vcpus.is_some_and(|v| v != self.vcpus)
            || now.mem_kib.is_some_and(|m| m != self.mem_kib)
            || now
                .devices
                .is_some_and(|d| !self.bulk_devices.iter().map(String::as_str).eq(d))
            || self.fetched.elapsed() >= refresh
    }

    /// The domain's cache entry from its freshly read XML: the instance's, each disk's and
    /// each vNIC's resource id and metadata, each checked against the sample contract.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        opts: &Options,
        cycle: u64,
        name: String,
        uuid: &str,
        id: Option<u32>,
        xml: DomainXml,
        state: u32,
        vcpus: u64,
        mem_kib: u64,
        bulk_devices: Vec<String>,
    ) -> Known {
        let md = instance_metadata(&opts.host, &name, uuid, &xml, vcpus, mem_kib, state);
        let (user, project) = (xml.user_id.as_deref(), xml.project_id.as_deref());
        let contract = &opts.contract;
        let disks = xml
            .disks
            .iter()
            .map(|disk| {
                let mut dmd = md.clone();
                dmd.insert("disk_name".into(), Value::String(disk.target.clone()));
                let rid = format!("{uuid}-{}", disk.target);
                let blob = MdBlob::checked(&dmd, contract, &rid, user, project, &name);
                (disk.target.clone(), rid, blob)
            })
            .collect();
        let nics = xml
            .nics
            .iter()
            .map(|nic| {
                let rid = nic
                    .filterref
                    .clone()
                    .unwrap_or_else(|| format!("{name}-{uuid}-{}", nic.target));
                let mut nmd = md.clone();
                nmd.insert("mac".into(), json!(nic.mac));
                nmd.insert("fref".into(), json!(nic.filterref));
                nmd.insert(
                    "vnic_name".into(),
                    json!(nic.filterref.clone().unwrap_or_else(|| nic.target.clone())),
                );
                nmd.insert("instance_name".into(), json!(name));
                // Nova 1.1 metadata: the Neutron port behind this vNIC and its addresses.
                if let Some(port) = xml.port_of(&nic.target) {
                    nmd.insert("port_id".into(), json!(port.uuid));
                    nmd.insert("fixed_ips".into(), json!(port.fixed_ips));
                }
                let blob = MdBlob::checked(&nmd, contract, &rid, user, project, &name);
                (nic.target.clone(), rid, blob)
            })
            .collect();
        let md = MdBlob::checked(&md, contract, uuid, user, project, &name);
        Known {
            id,
            state,
            vcpus,
            mem_kib,
            name,
            user_id: xml.user_id.map(String::into_boxed_str),
            project_id: xml.project_id.map(String::into_boxed_str),
            bulk_devices,
            fetched: Instant::now(),
            seen: cycle,
            md,
            disks,
            nics,
        }
    }
}

/// The instance's metadata, as Ceilometer's compute pollsters build it.
fn instance_metadata(
    host: &str,
    name: &str,
    instance_id: &str,
    x: &DomainXml,
    vcpus: u64,
    max_mem_kib: u64,
    state: u32,
) -> Metadata {
    let mut md = Metadata::new();
    md.insert("name".into(), json!(name));
    md.insert("instance_id".into(), json!(instance_id));
    md.insert("host".into(), json!(host));
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

/// A resource's metadata, kept encoded as it goes on the wire ([`wire::encode_metadata`]):
/// built when the domain XML is read, then copied into each batch that carries one of the
/// resource's samples. Encoded, it is a fifth of the map's memory and costs nothing to
/// send again.
pub struct MdBlob {
    /// Unique in this process (never reused), the blob's identity within a batch.
    pub id: u64,
    /// One msgpack map.
    pub bytes: Box<[u8]>,
    /// The contract rule the resource breaks, if any: its samples are not published.
    pub refused: Option<vmeter_core::contract::Rule>,
}

impl MdBlob {
    pub fn new(md: &Metadata) -> MdBlob {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        MdBlob {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            bytes: wire::encode_metadata(md).into_boxed_slice(),
            refused: None,
        }
    }

    /// The blob of a resource's metadata, checked with its id and owner against the contract
    /// (once per XML read); a refusal is logged here and counted per sample when emitted.
    fn checked(
        md: &Metadata,
        contract: &Contract,
        rid: &str,
        user: Option<&str>,
        project: Option<&str>,
        domain: &str,
    ) -> MdBlob {
        let mut blob = MdBlob::new(md);
        let verdict = contract
            .check_owner(rid, user, project, DEFAULT_SOURCE)
            .and_then(|()| contract.check_metadata(md));
        if let Err(v) = verdict {
            tracing::warn!(domain, resource = %rid.chars().take(80).collect::<String>(), reason = v.reason(), error = %v, "Resource breaks the sample contract: its samples are dropped and counted until its XML changes.");
            blob.refused = Some(v.rule());
        }
        blob
    }
}
