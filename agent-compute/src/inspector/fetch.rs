//! Fetching: the per-domain libvirt calls of one cycle, for what the bulk call did not give
//! (libvirt's test driver answers only `state` in bulk). What they answer is merged into the
//! domain's [`DomStats`], so the emit step reads one shape whatever the path.

use virt::domain::Domain;

use super::known::Known;
use super::{CycleStats, Guard, Path};
use crate::bulk::{BlockStat, DomStats, NetStat, group};

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

/// The per-domain calls of one domain in one cycle, recorded in the [`Guard`] (for the log
/// if one hangs) once per run of calls.
pub struct Fetch<'a> {
    d: &'a Domain,
    uuid: &'a str,
    guard: &'a Guard,
    /// The bulk call's groups on this connection.
    have: u32,
    /// The guard records a run of per-domain calls on this domain.
    entered: bool,
    /// Whether any per-domain call answered (the samples then take the time of the last).
    pub per_domain: bool,
}

impl<'a> Fetch<'a> {
    pub fn new(d: &'a Domain, uuid: &'a str, guard: &'a Guard, have: u32) -> Self {
        Fetch {
            d,
            uuid,
            guard,
            have,
            entered: false,
            per_domain: false,
        }
    }

    fn enter(&mut self, name: &str) {
        if !self.entered {
            self.guard
                .enter("per-domain stats", Some((name, self.uuid)));
            self.entered = true;
        }
    }

    /// Fills in what `info()` covers (state, CPU time, vCPUs, current and maximum memory)
    /// and the balloon statistics, where the bulk call did not give them. `name` is the
    /// domain's known name (asked of libvirt when unknown).
    pub fn domain(
        &mut self,
        st: &mut DomStats,
        name: Option<&str>,
        stats: &mut CycleStats,
    ) -> Result<(), virt::error::Error> {
        let have = self.have;
        let need_info = st.state.is_none()
            || have & group::CPU_TOTAL == 0
            || have & group::VCPU == 0
            || have & group::BALLOON == 0;
        let (mut info_mem_kib, mut info_max_kib) = (None, None);
        if need_info {
            match name {
                Some(n) => self.enter(n),
                None => self.enter(&self.d.name().unwrap_or_default()),
            }
            let info = self.d.info()?;
            self.per_domain = true;
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
        if have & group::CPU_TOTAL != 0 {
            stats.count(group::CPU_TOTAL, Path::Bulk);
        }
        if have & group::VCPU != 0 {
            stats.count(group::VCPU, Path::Bulk);
        }
        if have & group::BALLOON != 0 {
            stats.count(group::BALLOON, Path::Bulk);
        } else {
            if is_running(st) {
                let ms = self.d.memory_stats(0).unwrap_or_default();
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
        // `info()`'s memory where the balloon gives none.
        st.balloon_current = st.balloon_current.or(info_mem_kib);
        st.balloon_maximum = st.balloon_maximum.or(info_max_kib);
        Ok(())
    }

    /// The domain's name and XML description (the XML read the guard records on its own).
    pub fn xml(&mut self, stats: &mut CycleStats) -> Result<(String, String), virt::error::Error> {
        let name = self.d.name()?;
        self.guard.enter("domain xml", Some((&name, self.uuid)));
        self.entered = false;
        let xml = self.d.xml_desc(0)?;
        stats.xml_reads += 1;
        Ok((name, xml))
    }

    /// Each known disk's and vNIC's counters, in the order of `k.disks` and `k.nics`: taken
    /// from the bulk record, or asked per device where the bulk call does not give them.
    /// vNIC counters only for a running domain.
    pub fn devices(
        &mut self,
        st: &mut DomStats,
        k: &Known,
        disks: &mut Vec<Option<BlockStat>>,
        nics: &mut Vec<Option<NetStat>>,
        stats: &mut CycleStats,
    ) {
        disks.clear();
        nics.clear();
        let running = is_running(st);
        let pos = |v: i64| u64::try_from(v).ok();
        if self.have & group::BLOCK != 0 {
            for (target, _, _) in &k.disks {
                disks.push(take_named(&mut st.blocks, target, |b| &b.name));
            }
            stats.count(group::BLOCK, Path::Bulk);
        } else {
            self.enter(&k.name);
            for (target, _, _) in &k.disks {
                let bs = if running {
                    self.d.block_stats(target).ok()
                } else {
                    None
                };
                let bi = self.d.block_info(target, 0).ok();
                disks.push(Some(BlockStat {
                    name: String::new(),
                    rd_reqs: bs.as_ref().and_then(|s| pos(s.rd_req)),
                    rd_bytes: bs.as_ref().and_then(|s| pos(s.rd_bytes)),
                    wr_reqs: bs.as_ref().and_then(|s| pos(s.wr_req)),
                    wr_bytes: bs.as_ref().and_then(|s| pos(s.wr_bytes)),
                    capacity: bi.as_ref().map(|i| i.capacity),
                    allocation: bi.as_ref().map(|i| i.allocation),
                    physical: bi.as_ref().map(|i| i.physical),
                    ..Default::default()
                }));
            }
            self.per_domain = true;
            stats.count(group::BLOCK, Path::PerDomain);
        }
        if self.have & group::INTERFACE != 0 {
            if running {
                for (target, _, _) in &k.nics {
                    nics.push(take_named(&mut st.nets, target, |n| &n.name));
                }
            }
            stats.count(group::INTERFACE, Path::Bulk);
        } else {
            if running {
                self.enter(&k.name);
                for (target, _, _) in &k.nics {
                    nics.push(self.d.interface_stats(target).ok().map(|s| NetStat {
                        name: String::new(),
                        rx_bytes: pos(s.rx_bytes),
                        rx_pkts: pos(s.rx_packets),
                        rx_errs: pos(s.rx_errs),
                        rx_drop: pos(s.rx_drop),
                        tx_bytes: pos(s.tx_bytes),
                        tx_pkts: pos(s.tx_packets),
                        tx_errs: pos(s.tx_errs),
                        tx_drop: pos(s.tx_drop),
                    }));
                }
                self.per_domain = true;
            }
            stats.count(group::INTERFACE, Path::PerDomain);
        }
    }
}

/// Whether libvirt's state code is running, blocked or paused (a domain with counters).
pub fn is_running(st: &DomStats) -> bool {
    matches!(st.state.unwrap_or(0), 1..=3)
}

/// Moves the entry named `target` out of `v` (its place keeps an empty default).
fn take_named<T: Default>(v: &mut [T], target: &str, name: impl Fn(&T) -> &String) -> Option<T> {
    v.iter_mut().find(|x| name(x) == target).map(std::mem::take)
}
