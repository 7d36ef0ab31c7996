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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::Domain;
use vmeter_core::sample::DEFAULT_SOURCE;
use vmeter_core::wire::{self, BatchWriter, MeterHead, Reading, Shared};
use vmeter_core::{Metadata, Sample};

use crate::bulk::{self, DomStats, group};
use crate::domain_xml::{self, DomainXml};
use crate::meter::Meter;

/// The embedded demo node (libvirt test driver), selected with `libvirt.uri: demo`.
pub const DEMO_NODE_XML: &str = include_str!("../../deploy/demo-node.xml");

/// libvirt's VIR_DOMAIN_MEMORY_STAT_* tags used by the per-domain fallback.
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
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("vmeter-demo-node-{}-{n}.xml", std::process::id()));
    std::fs::write(&path, DEMO_NODE_XML)?;
    Ok(format!("test://{}", path.display()))
}

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

/// What the libvirt thread is doing now, and the domains that a previous, abandoned call
/// is still blocked on. Shared between the libvirt thread and the scheduler, which reads it
/// when a call overruns `call_timeout`.
#[derive(Debug, Default)]
pub struct Guard {
    in_flight: Mutex<Slot>,
    quarantined: Arc<Mutex<HashSet<String>>>,
}

/// The call in progress, kept in place: entering a call copies the domain's name and UUID
/// into buffers that are reused (a call is entered several times per domain per cycle).
#[derive(Debug, Default)]
struct Slot {
    call: Option<&'static str>,
    has_domain: bool,
    name: String,
    uuid: String,
    since: Option<Instant>,
    /// `vmeter_agent_libvirt_call_seconds{call}` handles, made once per call kind.
    timers: Vec<(&'static str, vmeter_core::telemetry::Histogram)>,
}

/// One libvirt call in progress.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// `bulk stats`, `per-domain stats`, `domain xml`, `host stats`, `open connection`.
    pub call: &'static str,
    /// Domain name and UUID, for per-domain calls.
    pub domain: Option<(String, String)>,
    pub since: Instant,
}

impl Guard {
    /// A guard for another libvirt thread: its own call in progress, the same quarantine.
    pub fn sibling(&self) -> Guard {
        Guard {
            in_flight: Mutex::default(),
            quarantined: self.quarantined.clone(),
        }
    }

    /// Records the call about to be made.
    pub fn enter(&self, call: &'static str, domain: Option<(&str, &str)>) {
        let mut g = self.in_flight.lock().expect("guard poisoned");
        g.call = Some(call);
        g.has_domain = domain.is_some();
        if let Some((n, u)) = domain {
            g.name.clear();
            g.name.push_str(n);
            g.uuid.clear();
            g.uuid.push_str(u);
        }
        g.since = Some(Instant::now());
    }

    /// Records that no call is in progress, and how long the call took.
    pub fn leave(&self) {
        let mut g = self.in_flight.lock().expect("guard poisoned");
        let Some(call) = g.call.take() else {
            return;
        };
        let Some(since) = g.since else {
            return;
        };
        let at = match g.timers.iter().position(|(c, _)| *c == call) {
            Some(at) => at,
            None => {
                g.timers.push((
                    call,
                    vmeter_core::telemetry::histogram(
                        "vmeter_agent_libvirt_call_seconds",
                        "Time of each libvirt call that returned, by call.",
                        &[("call", call)],
                        vmeter_core::telemetry::Buckets::Latency,
                    ),
                ));
                g.timers.len() - 1
            }
        };
        g.timers[at].1.observe_since(since);
    }

    /// The call in progress, if any.
    pub fn in_flight(&self) -> Option<InFlight> {
        let g = self.in_flight.lock().expect("guard poisoned");
        Some(InFlight {
            call: g.call?,
            domain: g.has_domain.then(|| (g.name.clone(), g.uuid.clone())),
            since: g.since?,
        })
    }

    /// Skips `uuid`'s per-domain calls until [`Guard::release`].
    pub fn quarantine(&self, uuid: &str) {
        self.quarantined
            .lock()
            .expect("guard poisoned")
            .insert(uuid.to_string());
    }

    /// Ends a quarantine (the blocked call returned).
    pub fn release(&self, uuid: &str) {
        self.quarantined
            .lock()
            .expect("guard poisoned")
            .remove(uuid);
    }

    fn is_quarantined(&self, uuid: &str) -> bool {
        let q = self.quarantined.lock().expect("guard poisoned");
        !q.is_empty() && q.contains(uuid)
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

/// A domain as last seen, with its parsed XML and the metadata built from it.
struct Known {
    id: Option<u32>,
    state: u32,
    vcpus: u64,
    mem_kib: u64,
    name: String,
    /// Owner from the Nova metadata (the rest of the parsed XML lives on in the metadata).
    user_id: Option<Box<str>>,
    project_id: Option<Box<str>>,
    /// Device names the bulk call reported when the XML was read (hot-plug detection).
    bulk_devices: Vec<String>,
    fetched: Instant,
    seen: u64,
    md: MdBlob,
    /// (target, resource id, metadata) per disk with a source.
    disks: Vec<(String, String, MdBlob)>,
    /// (target, resource id, metadata) per vNIC.
    nics: Vec<(String, String, MdBlob)>,
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
    fn new(md: &Metadata) -> MdBlob {
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
        contract: &vmeter_core::contract::Contract,
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
    /// Per-domain fallback readings of one domain's disks and vNICs (reused buffers).
    block_fallback: Vec<(
        Option<virt::domain::BlockStats>,
        Option<virt::domain::BlockInfo>,
    )>,
    net_fallback: Vec<Option<virt::domain::InterfaceStats>>,
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
            block_fallback: Vec::new(),
            net_fallback: Vec::new(),
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
        let host = self.opts.host.clone();
        match cpu {
            Ok(fields) => {
                for (f, v) in fields {
                    let meter = match f.as_str() {
                        "kernel" => Meter::NodeCpuKernel,
                        "idle" => Meter::NodeCpuIdle,
                        "user" => Meter::NodeCpuUser,
                        "iowait" => Meter::NodeCpuIowait,
                        _ => continue,
                    };
                    e.push(meter, v as f64, &host, &self.host_md);
                }
            }
            Err(err) => Self::warn_host_once(&mut self.host_warned, &err),
        }
        match mem {
            Ok(fields) => {
                for (f, v) in fields {
                    let meter = match f.as_str() {
                        "total" => Meter::NodeMemoryTotal,
                        "free" => Meter::NodeMemoryFree,
                        _ => continue,
                    };
                    e.push(meter, v as f64 / 1024.0, &host, &self.host_md);
                }
            }
            Err(err) => Self::warn_host_once(&mut self.host_warned, &err),
        }
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

    fn poll_domain(
        &mut self,
        d: &Domain,
        uuid: &str,
        mut st: DomStats,
        answered: (DateTime<Utc>, f64),
        out: &mut SampleSink<'_>,
        stats: &mut CycleStats,
    ) -> Result<(), virt::error::Error> {
        let (mut ts, mut mono) = answered;
        let have = self.bulk_groups;
        let mut per_domain = false;

        // Groups the bulk call does not give: what `info()` covers (state, cpu time,
        // vCPUs, memory) and the balloon statistics.
        let need_info = st.state.is_none()
            || have & group::CPU_TOTAL == 0
            || have & group::VCPU == 0
            || have & group::BALLOON == 0;
        let mut info_mem_kib = None;
        let mut info_max_kib = None;
        // The guard's record of the call in progress, for the log if it hangs: entered
        // once for this domain's per-domain calls (again after the XML read).
        let mut entered = false;
        // The domain as last seen (one lookup for the whole function until the XML check).
        let prev = self.known.get(uuid);
        if need_info {
            match prev {
                Some(k) => self.guard.enter("per-domain stats", Some((&k.name, uuid))),
                None => {
                    let name = d.name().unwrap_or_default();
                    self.guard.enter("per-domain stats", Some((&name, uuid)));
                }
            }
            entered = true;
            let info = d.info()?;
            per_domain = true;
            st.state.get_or_insert(info.state.to_raw());
            if have & group::CPU_TOTAL == 0 {
                st.cpu_time = Some(info.cpu_time);
                stats.count(group::CPU_TOTAL, Path::PerDomain);
            }
            if have & group::VCPU == 0 {
                st.vcpu_current = Some(info.nr_virt_cpu as u64);
                stats.count(group::VCPU, Path::PerDomain);
            }
            info_mem_kib = Some(info.memory);
            info_max_kib = Some(info.max_mem);
        }
        let state = st.state.unwrap_or(0);
        let running = matches!(state, 1..=3);
        if have & group::CPU_TOTAL != 0 {
            stats.count(group::CPU_TOTAL, Path::Bulk);
        }
        if have & group::VCPU != 0 {
            stats.count(group::VCPU, Path::Bulk);
        }
        if have & group::BALLOON != 0 {
            stats.count(group::BALLOON, Path::Bulk);
        } else {
            if running {
                let ms = d.memory_stats(0).unwrap_or_default();
                let get = |t: u32| ms.iter().find(|s| s.tag == t).map(|s| s.val);
                st.balloon_current = get(memtag::ACTUAL);
                st.balloon_available = get(memtag::AVAILABLE);
                st.balloon_unused = get(memtag::UNUSED);
                st.balloon_usable = get(memtag::USABLE);
                st.balloon_rss = get(memtag::RSS);
                st.balloon_swap_in = get(memtag::SWAP_IN);
                st.balloon_swap_out = get(memtag::SWAP_OUT);
            }
            stats.count(group::BALLOON, Path::PerDomain);
        }
        // A no-wait record of a domain whose job lock is held may lack groups: keep what
        // was known rather than reporting zeros.
        let vcpus_now = st.vcpu_current;
        let vcpus = vcpus_now.or(prev.map(|k| k.vcpus)).unwrap_or(0);
        let mem_now = st.balloon_maximum.or(info_max_kib);
        let mem_kib = mem_now.or(prev.map(|k| k.mem_kib)).unwrap_or(0);

        // Parsed XML and metadata: reused unless something says the domain changed.
        // Device names of the bulk record (compared without allocating; copied only when
        // the XML is re-read).
        let devices = || {
            st.blocks
                .iter()
                .map(|b| b.name.as_str())
                .chain(st.nets.iter().map(|n| n.name.as_str()))
        };
        let has_devices = st.has_block || st.has_net;
        let id = d.id();
        let stale = match prev {
            None => true,
            Some(k) => {
                k.id != id
                    || k.state != state
                    || vcpus_now.is_some_and(|v| v != k.vcpus)
                    || mem_now.is_some_and(|m| m != k.mem_kib)
                    || (has_devices && !k.bulk_devices.iter().map(String::as_str).eq(devices()))
                    || k.fetched.elapsed() >= self.opts.xml_refresh
            }
        };
        if stale {
            let name = d.name()?;
            self.guard.enter("domain xml", Some((&name, uuid)));
            entered = false;
            let xml = d.xml_desc(0)?;
            stats.xml_reads += 1;
            let parsed = domain_xml::parse(&xml).unwrap_or_else(|e| {
                tracing::warn!(domain = %name, error = %e, "Domain XML does not parse; reporting without devices and metadata.");
                DomainXml::default()
            });
            let devices = devices().map(str::to_string).collect();
            let known = self.build_known(name, uuid, id, parsed, state, vcpus, mem_kib, devices);
            self.known.insert(uuid.to_string(), known);
        }
        let k = self.known.get_mut(uuid).expect("inserted above");
        k.seen = self.cycle;

        // Per-device groups the bulk call does not give (buffers reused between domains).
        let mut block_fallback = std::mem::take(&mut self.block_fallback);
        block_fallback.clear();
        let mut net_fallback = std::mem::take(&mut self.net_fallback);
        net_fallback.clear();
        if have & group::BLOCK == 0 {
            if !entered {
                self.guard.enter("per-domain stats", Some((&k.name, uuid)));
                entered = true;
            }
            for (target, _, _) in &k.disks {
                let bs = if running {
                    d.block_stats(target).ok()
                } else {
                    None
                };
                block_fallback.push((bs, d.block_info(target, 0).ok()));
            }
            per_domain = true;
            stats.count(group::BLOCK, Path::PerDomain);
        } else {
            stats.count(group::BLOCK, Path::Bulk);
        }
        if have & group::INTERFACE == 0 {
            if running {
                if !entered {
                    self.guard.enter("per-domain stats", Some((&k.name, uuid)));
                }
                for (target, _, _) in &k.nics {
                    net_fallback.push(d.interface_stats(target).ok());
                }
                per_domain = true;
            }
            stats.count(group::INTERFACE, Path::PerDomain);
        } else {
            stats.count(group::INTERFACE, Path::Bulk);
        }
        if per_domain {
            // The moment libvirt answered this domain's last call.
            ts = Utc::now();
            mono = monotonic_secs();
        }

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
        let md = &k.md;
        e.push(Meter::PowerState, state as f64, uuid, md);
        if vcpus_now.is_some() {
            e.push(Meter::Vcpus, vcpus as f64, uuid, md);
        }
        if let Some(kib) = st.balloon_current.or(info_mem_kib) {
            e.push(Meter::Memory, kib as f64 / 1024.0, uuid, md);
        }
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
            } else if !self.no_balloon_warned.contains(uuid) {
                self.no_balloon_warned.insert(uuid.to_string());
                tracing::warn!(domain = %k.name, "No balloon statistics (no virtio balloon driver in the guest?): no memory.usage for this domain; polling goes on. Warned once.");
            }
            if let Some(rss) = mib(st.balloon_rss) {
                e.push(Meter::MemoryResident, rss, uuid, md);
            }
            if let (Some(i), Some(o)) = (mib(st.balloon_swap_in), mib(st.balloon_swap_out)) {
                e.push(Meter::MemorySwapIn, i, uuid, md);
                e.push(Meter::MemorySwapOut, o, uuid, md);
            }
        }

        for (i, (target, rid, dmd)) in k.disks.iter().enumerate() {
            let b = if have & group::BLOCK != 0 {
                st.blocks
                    .iter_mut()
                    .find(|b| &b.name == target)
                    .map(std::mem::take)
            } else {
                block_fallback.get(i).map(|(bs, bi)| {
                    let pos = |v: i64| u64::try_from(v).ok();
                    bulk::BlockStat {
                        name: String::new(),
                        rd_reqs: bs.as_ref().and_then(|s| pos(s.rd_req)),
                        rd_bytes: bs.as_ref().and_then(|s| pos(s.rd_bytes)),
                        wr_reqs: bs.as_ref().and_then(|s| pos(s.wr_req)),
                        wr_bytes: bs.as_ref().and_then(|s| pos(s.wr_bytes)),
                        capacity: bi.as_ref().map(|i| i.capacity),
                        allocation: bi.as_ref().map(|i| i.allocation),
                        physical: bi.as_ref().map(|i| i.physical),
                        ..Default::default()
                    }
                })
            };
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
            for (i, (target, rid, nmd)) in k.nics.iter().enumerate() {
                let n = if have & group::INTERFACE != 0 {
                    st.nets
                        .iter_mut()
                        .find(|n| &n.name == target)
                        .map(std::mem::take)
                } else {
                    net_fallback.get(i).and_then(|s| s.as_ref()).map(|s| {
                        let pos = |v: i64| u64::try_from(v).ok();
                        bulk::NetStat {
                            name: String::new(),
                            rx_bytes: pos(s.rx_bytes),
                            rx_pkts: pos(s.rx_packets),
                            rx_errs: pos(s.rx_errs),
                            rx_drop: pos(s.rx_drop),
                            tx_bytes: pos(s.tx_bytes),
                            tx_pkts: pos(s.tx_packets),
                            tx_errs: pos(s.tx_errs),
                            tx_drop: pos(s.tx_drop),
                        }
                    })
                };
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
        stats.samples += e.count;
        self.shared = e.into_shared();
        self.block_fallback = block_fallback;
        self.net_fallback = net_fallback;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn build_known(
        &self,
        name: String,
        uuid: &str,
        id: Option<u32>,
        xml: DomainXml,
        state: u32,
        vcpus: u64,
        mem_kib: u64,
        bulk_devices: Vec<String>,
    ) -> Known {
        let md = self.instance_metadata(&name, uuid, &xml, vcpus, mem_kib, state);
        let (user, project) = (xml.user_id.as_deref(), xml.project_id.as_deref());
        let contract = &self.opts.contract;
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
            seen: self.cycle,
            md,
            disks,
            nics,
        }
    }

    fn instance_metadata(
        &self,
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
        md.insert("host".into(), json!(self.opts.host));
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
struct Emit<'a, 'o, 's> {
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
    count: usize,
    /// The resource `shared` was encoded for (address and length of its id: borrowed for
    /// `'a`, so it cannot be freed and reused while this `Emit` lives).
    current: Option<(*const u8, usize)>,
}

impl<'a, 'o, 's> Emit<'a, 'o, 's> {
    #[allow(clippy::too_many_arguments)]
    fn new(
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
    fn into_shared(self) -> Shared {
        self.shared
    }

    /// One sample of `meter`, unless this cycle does not keep the meter.
    fn push(&mut self, meter: Meter, volume: f64, rid: &'a str, md: &MdBlob) {
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
    use super::*;

    fn demo() -> Inspector {
        virt::error::clear_error_callback();
        let uri = resolve_uri("demo").unwrap();
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
        let uri = resolve_uri("demo").unwrap();
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
