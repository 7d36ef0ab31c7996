//! One polling cycle against libvirt (blocking; run on a dedicated thread).
//!
//! A cycle is one `virConnectGetAllDomainStats` call (no-wait flag) for the stats groups
//! the driver supports (probed per group when the connection opens), per-domain calls only
//! for the groups it does not support (libvirt's test driver supports only `state`), and
//! the host counters. Every sample of one domain in one cycle carries the same timestamp
//! and the host monotonic time of the moment libvirt answered for that domain.
//!
//! The domain XML (devices, Nova metadata) is parsed once per domain and kept with the
//! metadata built from it; it is re-read when the domain restarts (new id), changes state,
//! vCPUs or memory, when the bulk call reports a different device list, and at least every
//! `xml_refresh`. A domain that disappears or fails mid-cycle is skipped for that cycle; a
//! connection-level failure is returned so the caller reconnects.

mod emit;
mod fetch;
mod guard;
mod host;
mod known;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use virt::connect::Connect;
use virt::domain::Domain;
use vmeter_core::wire::{self, BatchWriter, MeterHead, Reading, Shared};
use vmeter_core::{Metadata, Sample};

use crate::bulk::{self, BlockStat, DomStats, NetStat, group};
use crate::domain_xml::{self, DomainXml};
use crate::meter::Meter;
use emit::Emit;
use fetch::Fetch;
pub use guard::{Guard, InFlight};
pub use host::{DEMO_NODE_XML, monotonic_secs, resolve_uri, system_hostname};
use known::Known;
pub use known::MdBlob;

/// How a stats group's values were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// From the one bulk call of the cycle.
    Bulk,
    /// From per-domain calls (the driver does not support the group in bulk).
    PerDomain,
}

/// Counts of one cycle.
#[derive(Debug, Default, Clone)]
pub struct CycleStats {
    pub domains: usize,
    pub skipped: usize,
    pub samples: usize,
    /// Domains whose XML was (re-)read this cycle.
    pub xml_reads: usize,
    /// Domains skipped because an abandoned call on them has not returned yet.
    pub quarantined: usize,
    /// Per stats group (index into [`group::NAMED`]): domains read in bulk, per domain.
    pub reads: [[u64; 2]; 5],
}

impl CycleStats {
    fn count(&mut self, g: u32, path: Path) {
        if let Some(i) = group::NAMED.iter().position(|(x, _)| *x == g) {
            self.reads[i][(path == Path::PerDomain) as usize] += 1;
        }
    }
}

/// Options of an [`Inspector`].
#[derive(Debug, Clone)]
pub struct Options {
    /// `resource_metadata.host` and the host meters' resource id.
    pub host: String,
    /// Use the bulk call for the groups the driver supports.
    pub bulk: bool,
    /// Longest time a domain's parsed XML is reused.
    pub xml_refresh: Duration,
    /// The sample contract: a resource whose id, owner or metadata breaks it (a domain name
    /// hundreds of characters long makes a vNIC id too long) publishes nothing; its samples
    /// are counted as dropped with the rule as reason.
    pub contract: vmeter_core::contract::Contract,
}

/// Where a cycle's samples go: each as its own fields, the fields it shares with the other
/// samples of its resource (encoded once), and its resource's metadata.
pub type SampleSink<'o> = dyn FnMut(&Reading<'_>, &Shared, &MdBlob) + 'o;

/// A read-only libvirt connection and the per-domain state kept between cycles.
pub struct Inspector {
    conn: Connect,
    opts: Options,
    guard: Arc<Guard>,
    /// Groups the bulk call answers on this connection (always includes `state`).
    bulk_groups: u32,
    bulk_flags: u32,
    known: HashMap<String, Known, foldhash::fast::RandomState>,
    cycle: u64,
    no_balloon_warned: HashSet<String, foldhash::fast::RandomState>,
    host_md: MdBlob,
    host_warned: bool,
    /// The counters of the domain being emitted, per known disk and vNIC (reused buffers).
    disks: Vec<Option<BlockStat>>,
    nics: Vec<Option<NetStat>>,
    /// The encoding buffer of the fields a resource's samples share (reused).
    shared: Shared,
    /// Per [`Meter`] (its index): name, type and unit encoded once.
    heads: Vec<MeterHead>,
    /// Per [`Meter`]: whether the cycle in progress keeps it (the polling sources due).
    kept: Vec<bool>,
}

impl Inspector {
    /// Opens `uri` read-only and probes which stats groups the bulk call supports.
    pub fn open(uri: &str, opts: Options, guard: Arc<Guard>) -> Result<Self, virt::error::Error> {
        let conn = Connect::open_read_only(Some(uri))?;
        let (bulk_groups, bulk_flags) = if opts.bulk {
            let flags = if bulk::all_domain_stats(&conn, group::STATE, bulk::FLAG_NOWAIT).is_ok() {
                bulk::FLAG_NOWAIT
            } else {
                tracing::warn!(%uri, "libvirt does not accept the no-wait flag; a domain whose job lock is held can delay a cycle up to libvirt.call_timeout_secs.");
                0
            };
            (bulk::supported_groups(&conn, group::ALL), flags)
        } else {
            (group::STATE, 0)
        };
        let fallback = group::ALL & !bulk_groups;
        tracing::info!(
            %uri,
            bulk = %group::names(bulk_groups),
            per_domain = %group::names(fallback),
            "Stats groups: read in one bulk call / per domain."
        );
        let mut host_md = Metadata::new();
        host_md.insert("host".into(), json!(opts.host));
        Ok(Inspector {
            conn,
            host_md: MdBlob::new(&host_md),
            opts,
            guard,
            bulk_groups,
            bulk_flags,
            known: HashMap::default(),
            cycle: 0,
            no_balloon_warned: HashSet::default(),
            host_warned: false,
            disks: Vec::new(),
            nics: Vec::new(),
            shared: Shared::default(),
            heads: Meter::ALL
                .iter()
                .map(|m| {
                    let (name, kind, unit) = m.def();
                    MeterHead::new(name, kind, unit)
                })
                .collect(),
            kept: vec![true; Meter::ALL.len()],
        })
    }

    /// The stats groups read in bulk (bit mask of [`group`]).
    pub fn bulk_groups(&self) -> u32 {
        self.bulk_groups
    }

    /// Whether the connection is still alive.
    pub fn alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// Polls the host and every domain once and returns the samples exactly as the agent
    /// would send them: encoded in batches ([`Inspector::poll_batches`]) and decoded again.
    /// For `poll-once` and tests; the agent itself never builds [`Sample`]s.
    pub fn poll(&mut self) -> Result<(Vec<Sample>, CycleStats), virt::error::Error> {
        let mut bodies = Vec::new();
        let stats = self.poll_batches(&|_| true, 500, &mut |body, _| bodies.push(body))?;
        let mut dec = wire::Decoder::default();
        let mut v = Vec::with_capacity(stats.samples);
        for b in bodies {
            v.extend(
                dec.decode(&b, Some(wire::FORMAT_VERSION))
                    .expect("the agent's own batches decode"),
            );
        }
        Ok((v, stats))
    }

    /// One cycle as the agent runs it: polls, keeps the samples whose meter `keep` accepts,
    /// encodes them as they are built into batches of `batch_size` and hands each batch
    /// (body, sample count) to `out`. A cycle's samples are never all in memory.
    pub fn poll_batches(
        &mut self,
        keep: &dyn Fn(&str) -> bool,
        batch_size: usize,
        out: &mut dyn FnMut(Vec<u8>, u64),
    ) -> Result<CycleStats, virt::error::Error> {
        let batch_size = batch_size.max(1);
        let mut w = BatchWriter::with_capacity(batch_size);
        // The sources' selection, once per meter (not per sample).
        let kept = Meter::ALL.iter().map(|m| keep(m.def().0)).collect();
        let stats = self.poll_cycle(kept, &mut |r, shared, md| {
            let i = w.metadata(md.id as usize, |o| o.extend_from_slice(&md.bytes));
            w.push_shared(r, shared, i);
            if w.len() >= batch_size {
                let n = w.len() as u64;
                out(w.finish(), n);
            }
        });
        if !w.is_empty() {
            let n = w.len() as u64;
            out(w.finish(), n);
        }
        stats
    }

    /// Polls the host and every domain once, handing each sample to `out` as it is built,
    /// borrowed from the libvirt answer and the domain's cached state.
    /// `Err` only when the domain list itself cannot be read (the caller then reconnects).
    pub fn poll_each(
        &mut self,
        out: &mut SampleSink<'_>,
    ) -> Result<CycleStats, virt::error::Error> {
        self.poll_cycle(vec![true; Meter::ALL.len()], out)
    }

    /// One cycle of the meters `kept` selects (indexed by [`Meter`]).
    fn poll_cycle(
        &mut self,
        kept: Vec<bool>,
        out: &mut SampleSink<'_>,
    ) -> Result<CycleStats, virt::error::Error> {
        self.kept = kept;
        self.cycle += 1;
        let mut stats = CycleStats {
            samples: self.poll_host(out),
            ..Default::default()
        };

        self.guard.enter("bulk stats", None);
        let recs = bulk::all_domain_stats(&self.conn, self.bulk_groups, self.bulk_flags);
        self.guard.leave();
        let recs = recs?;
        let answered = (Utc::now(), monotonic_secs());
        stats.domains = recs.len();
        for rec in recs {
            let uuid = match rec.domain.uuid_string() {
                Ok(u) => u,
                Err(_) => {
                    stats.skipped += 1;
                    continue;
                }
            };
            if self.guard.is_quarantined(&uuid) {
                stats.quarantined += 1;
                stats.skipped += 1;
                continue;
            }
            if let Err(e) =
                self.poll_domain(&rec.domain, &uuid, rec.stats, answered, out, &mut stats)
            {
                stats.skipped += 1;
                tracing::debug!(domain = %uuid, error = %e, "Domain skipped this cycle (gone or not readable).");
            }
            self.guard.leave();
        }
        // Forget domains not seen for a while (deleted, migrated away).
        let cycle = self.cycle;
        self.known.retain(|_, k| cycle - k.seen < 10);
        self.no_balloon_warned
            .retain(|u| self.known.contains_key(u));
        Ok(stats)
    }

    /// Returns the number of samples.
    fn poll_host(&mut self, out: &mut SampleSink<'_>) -> usize {
        self.guard.enter("host stats", None);
        let cpu = bulk::node_cpu_stats(&self.conn);
        let mem = bulk::node_memory_stats(&self.conn);
        self.guard.leave();
        let cpu = cpu.unwrap_or_else(|err| {
            Self::warn_host_once(&mut self.host_warned, &err);
            Vec::new()
        });
        let mem = mem.unwrap_or_else(|err| {
            Self::warn_host_once(&mut self.host_warned, &err);
            Vec::new()
        });
        let shared = std::mem::take(&mut self.shared);
        let mut e = Emit::new(
            out,
            &self.heads,
            &self.kept,
            shared,
            Utc::now(),
            monotonic_secs(),
            None,
            None,
        );
        emit::host(&mut e, &self.opts.host, &self.host_md, &cpu, &mem);
        let n = e.count;
        self.shared = e.into_shared();
        n
    }

    fn warn_host_once(warned: &mut bool, err: &virt::error::Error) {
        if !*warned {
            *warned = true;
            tracing::warn!(error = %err, "Host statistics unavailable from this libvirt driver; no compute.node.* samples (warned once).");
        }
    }

    /// One domain: fetch what the bulk record lacks, refresh the cache if the domain
    /// changed, fetch its devices' counters, emit.
    fn poll_domain(
        &mut self,
        d: &Domain,
        uuid: &str,
        mut st: DomStats,
        answered: (DateTime<Utc>, f64),
        out: &mut SampleSink<'_>,
        stats: &mut CycleStats,
    ) -> Result<(), virt::error::Error> {
        let mut fetch = Fetch::new(d, uuid, &self.guard, self.bulk_groups);
        let prev = self.known.get(uuid);
        fetch.domain(&mut st, prev.map(|k| k.name.as_str()), stats)?;
        let state = st.state.unwrap_or(0);
        // A no-wait record of a domain whose job lock is held may lack groups: keep what
        // was known rather than reporting zeros.
        let (vcpus_now, mem_now) = (st.vcpu_current, st.balloon_maximum);
        let vcpus = vcpus_now.or(prev.map(|k| k.vcpus)).unwrap_or(0);
        let mem_kib = mem_now.or(prev.map(|k| k.mem_kib)).unwrap_or(0);

        // Parsed XML and metadata: reused unless something says the domain changed. The
        // bulk record's device names are compared without allocating, and copied only
        // when the XML is read again.
        let devices = || {
            st.blocks
                .iter()
                .map(|b| b.name.as_str())
                .chain(st.nets.iter().map(|n| n.name.as_str()))
        };
        let id = d.id();
        let stale = prev.is_none_or(|k| {
            k.is_stale(
                known::Seen {
                    id,
                    state,
                    vcpus: vcpus_now,
                    mem_kib: mem_now,
                    devices: (st.has_block || st.has_net).then(devices),
                },
                self.opts.xml_refresh,
            )
        });
        if stale {
            let (name, xml) = fetch.xml(stats)?;
            let parsed = domain_xml::parse(&xml).unwrap_or_else(|e| {
                tracing::warn!(domain = %name, error = %e, "Domain XML does not parse; reporting without devices and metadata.");
                DomainXml::default()
            });
            let devices = devices().map(str::to_string).collect();
            let known = Known::build(
                &self.opts, self.cycle, name, uuid, id, parsed, state, vcpus, mem_kib, devices,
            );
            self.known.insert(uuid.to_string(), known);
        }
        let k = self.known.get_mut(uuid).expect("inserted above");
        k.seen = self.cycle;
        let k = &*k;
        fetch.devices(&mut st, k, &mut self.disks, &mut self.nics, stats);
        let (ts, mono) = if fetch.per_domain {
            // The moment libvirt answered this domain's last call.
            (Utc::now(), monotonic_secs())
        } else {
            answered
        };

        let mut e = Emit::new(
            out,
            &self.heads,
            &self.kept,
            std::mem::take(&mut self.shared),
            ts,
            mono,
            k.user_id.as_deref(),
            k.project_id.as_deref(),
        );
        let balloon = emit::domain(&mut e, uuid, k, &st, &self.disks, &self.nics);
        stats.samples += e.count;
        self.shared = e.into_shared();
        if !balloon && !self.no_balloon_warned.contains(uuid) {
            self.no_balloon_warned.insert(uuid.to_string());
            tracing::warn!(domain = %k.name, "No balloon statistics (no virtio balloon driver in the guest?): no memory.usage for this domain; polling goes on. Warned once.");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo node in the repository, for libvirt's test driver (no temporary copy).
    fn demo_uri() -> String {
        format!(
            "test://{}/../deploy/demo-node.xml",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    fn demo() -> Inspector {
        virt::error::clear_error_callback();
        let uri = demo_uri();
        let opts = Options {
            host: "h1".into(),
            bulk: true,
            xml_refresh: Duration::from_secs(300),
            contract: Default::default(),
        };
        Inspector::open(&uri, opts, Arc::new(Guard::default())).unwrap()
    }

    #[test]
    fn resources_breaking_the_contract_publish_nothing_and_are_counted() {
        // The demo node with one domain renamed to 300 characters: its vNIC's resource id
        // (`<name>-<uuid>-<target>`) is then longer than the contract allows; the domain's
        // own and its disk's ids are not.
        let node = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/demo-node.xml"
        ))
        .unwrap();
        let long = "x".repeat(300);
        let node = node.replace(
            "<name>i-376-1733-VM</name>",
            &format!("<name>{long}</name>"),
        );
        let path =
            std::env::temp_dir().join(format!("vmeter-contract-node-{}.xml", std::process::id()));
        std::fs::write(&path, node).unwrap();
        virt::error::clear_error_callback();
        let opts = Options {
            host: "h1".into(),
            bulk: true,
            xml_refresh: Duration::from_secs(300),
            contract: Default::default(),
        };
        let mut insp = Inspector::open(
            &format!("test://{}", path.display()),
            opts,
            Arc::new(Guard::default()),
        )
        .unwrap();
        let dropped = || {
            vmeter_core::telemetry::scrape(
                &vmeter_core::telemetry::render(),
                "vmeter_samples_dropped_total{service=\"agent-compute\",reason=\"contract_field_too_long\"}",
            )
        };
        let before = dropped();
        let (samples, _) = insp.poll().unwrap();
        let _ = std::fs::remove_file(&path);
        let uuid = "9b3e4f5a-0004-4c2d-8e1f-000000000004";
        assert!(
            samples
                .iter()
                .any(|s| s.resource_id == uuid && s.name == "cpu"),
            "the instance's samples go on"
        );
        assert!(
            samples
                .iter()
                .any(|s| s.resource_id == format!("{uuid}-vda")),
            "the disk's samples go on"
        );
        assert!(
            !samples.iter().any(|s| s.resource_id.contains(&long)),
            "the vNIC with a too-long id published nothing"
        );
        let contract = vmeter_core::contract::Contract::default();
        assert!(
            samples
                .iter()
                .all(|s| contract.check(s, Utc::now()).is_ok())
        );
        // Each of the vNIC's samples is counted (the test driver reports interface stats).
        assert!(dropped() - before >= 1.0, "drops counted");
    }

    #[test]
    fn test_driver_falls_back_per_group_and_caches_the_xml() {
        let mut insp = demo();
        // The test driver answers only `state` in bulk.
        assert_eq!(insp.bulk_groups(), group::STATE);
        let (first, s1) = insp.poll().unwrap();
        assert_eq!(s1.domains, 4);
        assert_eq!(s1.xml_reads, 4);
        // cpu-total read per domain for all four, never in bulk.
        assert_eq!(s1.reads[0], [0, 4]);
        let (second, s2) = insp.poll().unwrap();
        assert_eq!(s2.xml_reads, 0, "unchanged domains reuse their parsed XML");
        assert_eq!(first.len(), second.len());
        // One timestamp and one monotonic time per domain per cycle.
        let mut per_domain: HashMap<String, (DateTime<Utc>, Option<f64>)> = HashMap::new();
        for s in second
            .iter()
            .filter(|s| !s.name.starts_with("compute.node."))
        {
            let inst = s.resource_metadata["instance_id"].to_string();
            let t = (s.timestamp, s.monotonic_time);
            let prev = per_domain.entry(inst).or_insert(t);
            assert_eq!(*prev, t, "{}", s.name);
        }
        assert_eq!(per_domain.len(), 4);
        // Metadata is kept encoded between cycles, not rebuilt: the same blobs again.
        let blobs = |insp: &mut Inspector| {
            let mut ids = Vec::new();
            insp.poll_each(&mut |r, _, md| {
                if r.meter.name() == "cpu" {
                    ids.push((md.id, md.bytes.as_ptr()));
                }
            })
            .unwrap();
            ids
        };
        let a = blobs(&mut insp);
        assert_eq!(a.len(), 4);
        assert_eq!(a, blobs(&mut insp));
        // ... and it is the metadata the decoded samples carry.
        let cpu = second
            .iter()
            .find(|s| s.name == "cpu" && s.resource_id == "9b3e4f5a-0001-4c2d-8e1f-000000000001")
            .unwrap();
        assert_eq!(cpu.resource_metadata["host"], "h1");
        assert_eq!(cpu.resource_metadata["flavor"]["name"], "m1.small");
        assert_eq!(
            cpu.project_id.as_deref(),
            Some("7e1b6c2a-0000-4000-8000-000000000011")
        );
        // That domain's metadata is in the nova/1.1 namespace (current Nova), with a port:
        // its vNIC's samples carry the port and its fixed address.
        let nic = second
            .iter()
            .find(|s| {
                s.name == "network.incoming.bytes" && s.resource_id.contains("-000000000001-")
            })
            .expect("the vNIC's samples");
        assert_eq!(
            nic.resource_metadata["port_id"],
            "0a1b2c30-0001-4000-8000-000000000001"
        );
        assert_eq!(
            nic.resource_metadata["fixed_ips"],
            serde_json::json!(["10.0.0.11"])
        );
        assert_eq!(nic.resource_metadata["display_name"], "web-1");
    }

    #[test]
    fn forced_per_domain_polling_gives_the_same_meters() {
        let mut insp = demo();
        let (a, _) = insp.poll().unwrap();
        let mut opts = insp.opts.clone();
        opts.bulk = false;
        let uri = demo_uri();
        let mut per = Inspector::open(&uri, opts, Arc::new(Guard::default())).unwrap();
        let (b, _) = per.poll().unwrap();
        let names = |v: &[Sample]| {
            let mut n: Vec<(String, String)> = v
                .iter()
                .map(|s| (s.name.clone(), s.resource_id.clone()))
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&a), names(&b));
    }

    #[test]
    fn a_cycle_keeps_only_the_selected_meters() {
        let mut insp = demo();
        let mut bodies = Vec::new();
        let keep = |m: &str| m == "cpu" || m.starts_with("disk.device.read.");
        let st = insp
            .poll_batches(&keep, 5, &mut |b, n| bodies.push((b, n)))
            .unwrap();
        let mut names = std::collections::BTreeMap::new();
        let mut n_sum = 0;
        for (b, n) in &bodies {
            let v = wire::decode(b, Some(wire::FORMAT_VERSION)).unwrap();
            assert_eq!(v.len() as u64, *n);
            assert!(v.len() <= 5, "batches of at most batch_size");
            n_sum += n;
            for s in v {
                *names.entry(s.name).or_insert(0) += 1;
            }
        }
        assert_eq!(n_sum as usize, st.samples);
        assert_eq!(names.get("cpu"), Some(&4));
        assert!(names.contains_key("disk.device.read.bytes"));
        assert!(names.keys().all(|n| keep(n)), "{names:?}");
    }

    #[test]
    fn quarantined_domains_are_skipped() {
        let mut insp = demo();
        insp.guard
            .quarantine("9b3e4f5a-0001-4c2d-8e1f-000000000001");
        let (samples, st) = insp.poll().unwrap();
        assert_eq!(st.quarantined, 1);
        assert!(
            !samples
                .iter()
                .any(|s| s.resource_id.contains("-000000000001"))
        );
        insp.guard.release("9b3e4f5a-0001-4c2d-8e1f-000000000001");
        let (_, st) = insp.poll().unwrap();
        assert_eq!(st.quarantined, 0);
    }
}
