//! libvirt's bulk statistics call (`virConnectGetAllDomainStats`) and the host counters,
//! through `virt::sys`.
//!
//! The safe wrapper of `virt` 0.5 (`Connect::all_domain_stats`) leaks every record (it
//! frees only the array) and exposes no parameters, so this module calls libvirt directly,
//! copies what the meters need into plain Rust values and frees the list with
//! `virDomainStatsRecordListFree` before returning. Each record's domain is re-referenced
//! (`virDomainRef`) into an owned [`Domain`] so per-domain fallback calls stay possible.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

/// Stats groups (`VIR_DOMAIN_STATS_*`) the meters need.
pub mod group {
    pub const STATE: u32 = 1;
    pub const CPU_TOTAL: u32 = 2;
    pub const BALLOON: u32 = 4;
    pub const VCPU: u32 = 8;
    pub const INTERFACE: u32 = 16;
    pub const BLOCK: u32 = 32;
    /// Every group above.
    pub const ALL: u32 = STATE | CPU_TOTAL | BALLOON | VCPU | INTERFACE | BLOCK;
    /// The groups besides `state`, with the names libvirt and `virsh domstats` use.
    pub const NAMED: [(u32, &str); 5] = [
        (CPU_TOTAL, "cpu-total"),
        (BALLOON, "balloon"),
        (VCPU, "vcpu"),
        (INTERFACE, "interface"),
        (BLOCK, "block"),
    ];

    /// Comma-separated names of the groups in `mask` (without `state`).
    pub fn names(mask: u32) -> String {
        let v: Vec<&str> = NAMED
            .iter()
            .filter(|(g, _)| mask & g != 0)
            .map(|(_, n)| *n)
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(",")
        }
    }
}

/// `VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT`: do not wait for a domain's job lock (a
/// migration, a backup or a wedged monitor call holding it); report what can be had now.
pub const FLAG_NOWAIT: u32 = sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT;
/// `VIR_CONNECT_GET_ALL_DOMAINS_STATS_ENFORCE_STATS`: fail instead of silently omitting
/// a group the driver does not support (used to probe support per group).
pub const FLAG_ENFORCE: u32 = sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ENFORCE_STATS;

/// One disk's counters from the `block` group. Absent fields stay `None`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BlockStat {
    /// Target device name (`vda`).
    pub name: String,
    pub rd_reqs: Option<u64>,
    pub rd_bytes: Option<u64>,
    /// Total read time, ns.
    pub rd_times: Option<u64>,
    pub wr_reqs: Option<u64>,
    pub wr_bytes: Option<u64>,
    /// Total write time, ns.
    pub wr_times: Option<u64>,
    /// Bytes.
    pub allocation: Option<u64>,
    /// Bytes.
    pub capacity: Option<u64>,
    /// Bytes.
    pub physical: Option<u64>,
}

/// One vNIC's counters from the `interface` group.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NetStat {
    /// Host-side device name (`vnet3`, `tap…`).
    pub name: String,
    pub rx_bytes: Option<u64>,
    pub rx_pkts: Option<u64>,
    pub rx_errs: Option<u64>,
    pub rx_drop: Option<u64>,
    pub tx_bytes: Option<u64>,
    pub tx_pkts: Option<u64>,
    pub tx_errs: Option<u64>,
    pub tx_drop: Option<u64>,
}

/// One vCPU's times from the `vcpu` group, ns.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct VcpuStat {
    pub time: Option<u64>,
    pub wait: Option<u64>,
}

/// What one bulk record said about one domain. Memory figures are KiB, times ns.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DomStats {
    /// libvirt state code 0–7.
    pub state: Option<u32>,
    /// `cpu.time`, ns.
    pub cpu_time: Option<u64>,
    pub vcpu_current: Option<u64>,
    pub vcpu_maximum: Option<u64>,
    /// Indexed by vCPU number (holes stay default).
    pub vcpus: Vec<VcpuStat>,
    pub balloon_current: Option<u64>,
    pub balloon_maximum: Option<u64>,
    pub balloon_swap_in: Option<u64>,
    pub balloon_swap_out: Option<u64>,
    pub balloon_unused: Option<u64>,
    pub balloon_available: Option<u64>,
    pub balloon_usable: Option<u64>,
    pub balloon_rss: Option<u64>,
    /// Set when the record carried any `block.*` field.
    pub has_block: bool,
    pub blocks: Vec<BlockStat>,
    /// Set when the record carried any `net.*` field.
    pub has_net: bool,
    pub nets: Vec<NetStat>,
}

impl DomStats {
    /// CPU time the way Ceilometer computes it: Σ(vcpu.N.time + vcpu.N.wait) when every
    /// existing vCPU has both and their count equals `vcpu.current`, else `cpu.time`.
    pub fn cpu_ns(&self) -> Option<u64> {
        let present: Vec<&VcpuStat> = self
            .vcpus
            .iter()
            .filter(|v| v.time.is_some() || v.wait.is_some())
            .collect();
        if let Some(cur) = self.vcpu_current
            && cur > 0
            && present.len() as u64 == cur
            && present.iter().all(|v| v.time.is_some() && v.wait.is_some())
        {
            return Some(
                present
                    .iter()
                    .map(|v| v.time.unwrap_or(0) + v.wait.unwrap_or(0))
                    .sum(),
            );
        }
        self.cpu_time
    }

    /// Applies one typed parameter (`field` as libvirt names it).
    pub fn apply(&mut self, field: &str, v: Value<'_>) {
        let num = v.as_u64();
        let (head, rest) = field.split_once('.').unwrap_or((field, ""));
        match head {
            "state" if rest == "state" => self.state = num.map(|n| n as u32),
            "cpu" if rest == "time" => self.cpu_time = num,
            "vcpu" => match rest {
                "current" => self.vcpu_current = num,
                "maximum" => self.vcpu_maximum = num,
                _ => {
                    if let Some((idx, what)) = indexed(rest) {
                        let slot = grow(&mut self.vcpus, idx);
                        match what {
                            "time" => slot.time = num,
                            "wait" => slot.wait = num,
                            _ => {}
                        }
                    }
                }
            },
            "balloon" => {
                let slot = match rest {
                    "current" => &mut self.balloon_current,
                    "maximum" => &mut self.balloon_maximum,
                    "swap_in" => &mut self.balloon_swap_in,
                    "swap_out" => &mut self.balloon_swap_out,
                    "unused" => &mut self.balloon_unused,
                    "available" => &mut self.balloon_available,
                    "usable" => &mut self.balloon_usable,
                    "rss" => &mut self.balloon_rss,
                    _ => return,
                };
                *slot = num;
            }
            "block" => {
                self.has_block = true;
                let Some((idx, what)) = indexed(rest) else {
                    return;
                };
                let b = grow(&mut self.blocks, idx);
                match what {
                    "name" => {
                        if let Value::Str(s) = v {
                            b.name = s.to_string();
                        }
                    }
                    "rd.reqs" => b.rd_reqs = num,
                    "rd.bytes" => b.rd_bytes = num,
                    "rd.times" => b.rd_times = num,
                    "wr.reqs" => b.wr_reqs = num,
                    "wr.bytes" => b.wr_bytes = num,
                    "wr.times" => b.wr_times = num,
                    "allocation" => b.allocation = num,
                    "capacity" => b.capacity = num,
                    "physical" => b.physical = num,
                    _ => {}
                }
            }
            "net" => {
                self.has_net = true;
                let Some((idx, what)) = indexed(rest) else {
                    return;
                };
                let n = grow(&mut self.nets, idx);
                match what {
                    "name" => {
                        if let Value::Str(s) = v {
                            n.name = s.to_string();
                        }
                    }
                    "rx.bytes" => n.rx_bytes = num,
                    "rx.pkts" => n.rx_pkts = num,
                    "rx.errs" => n.rx_errs = num,
                    "rx.drop" => n.rx_drop = num,
                    "tx.bytes" => n.tx_bytes = num,
                    "tx.pkts" => n.tx_pkts = num,
                    "tx.errs" => n.tx_errs = num,
                    "tx.drop" => n.tx_drop = num,
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// `"3.rd.bytes"` → `(3, "rd.bytes")`; `None` for `count` and other non-indexed keys.
/// Indexes above 4096 are ignored (a forged or broken record cannot make us allocate).
fn indexed(rest: &str) -> Option<(usize, &str)> {
    let (i, what) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    (i < 4096).then_some((i, what))
}

fn grow<T: Default>(v: &mut Vec<T>, idx: usize) -> &mut T {
    if v.len() <= idx {
        v.resize_with(idx + 1, T::default);
    }
    &mut v[idx]
}

/// A typed parameter's value.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(&'a str),
}

impl Value<'_> {
    fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Int(i) => u64::try_from(i).ok(),
            Value::Uint(u) => Some(u),
            Value::Double(d) if d >= 0.0 && d.is_finite() => Some(d as u64),
            _ => None,
        }
    }
}

/// One domain's bulk record.
pub struct Record {
    pub domain: Domain,
    pub stats: DomStats,
}

/// Calls `virConnectGetAllDomainStats(stats, flags)` and copies the records out; the list
/// libvirt allocated is freed before returning, also when a record is unusual.
pub fn all_domain_stats(conn: &Connect, stats: u32, flags: u32) -> Result<Vec<Record>, Error> {
    let mut recs: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: the connection pointer is valid for the life of `conn`; libvirt allocates
    // `recs` (NULL-terminated array of records) and we free it below with the matching call.
    let n = unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), stats, &mut recs, flags) };
    if n < 0 {
        return Err(Error::last_error());
    }
    let mut out = Vec::with_capacity(n as usize);
    if recs.is_null() {
        return Ok(out);
    }
    // SAFETY: libvirt returned `n` valid records; each `dom` is a valid domain pointer
    // whose reference we take (virDomainRef) before handing it to `Domain`, which drops it
    // with virDomainFree. Params are read only while the list is alive.
    unsafe {
        for i in 0..n as usize {
            let r = *recs.add(i);
            if r.is_null() || (*r).dom.is_null() {
                continue;
            }
            if sys::virDomainRef((*r).dom) < 0 {
                continue;
            }
            let domain = Domain::from_ptr((*r).dom);
            let mut st = DomStats::default();
            let params = (*r).params;
            for j in 0..(*r).nparams.max(0) as usize {
                let p = &*params.add(j);
                let Some(field) = cstr(p.field.as_ptr()) else {
                    continue;
                };
                let v = match p.type_ as u32 {
                    sys::VIR_TYPED_PARAM_INT => Value::Int(p.value.i as i64),
                    sys::VIR_TYPED_PARAM_UINT => Value::Uint(p.value.ui as u64),
                    sys::VIR_TYPED_PARAM_LLONG => Value::Int(p.value.l),
                    sys::VIR_TYPED_PARAM_ULLONG => Value::Uint(p.value.ul),
                    sys::VIR_TYPED_PARAM_DOUBLE => Value::Double(p.value.d),
                    sys::VIR_TYPED_PARAM_STRING if !p.value.s.is_null() => match cstr(p.value.s) {
                        Some(s) => Value::Str(s),
                        None => continue,
                    },
                    _ => continue,
                };
                st.apply(field, v);
            }
            out.push(Record { domain, stats: st });
        }
        sys::virDomainStatsRecordListFree(recs);
    }
    Ok(out)
}

/// # Safety
/// `p` must point to a NUL-terminated string valid for the returned lifetime.
unsafe fn cstr<'a>(p: *const c_char) -> Option<&'a str> {
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

/// Which of `wanted`'s groups the driver supports, probed one group at a time with
/// `ENFORCE_STATS` (a driver without a group answers "not supported"). `state` is always
/// assumed. Costs one call per group, made once per connection.
pub fn supported_groups(conn: &Connect, wanted: u32) -> u32 {
    let mut ok = group::STATE;
    for (g, _) in group::NAMED {
        if wanted & g != 0 && all_domain_stats(conn, g, FLAG_ENFORCE | FLAG_NOWAIT).is_ok() {
            ok |= g;
        }
    }
    ok
}

/// Host CPU times from `virNodeGetCPUStats(ALL_CPUS)`, ns, by libvirt's field name
/// (`kernel`, `user`, `idle`, `iowait`, …).
pub fn node_cpu_stats(conn: &Connect) -> Result<Vec<(String, u64)>, Error> {
    node_stats(conn, |c, params, n| {
        // SAFETY: libvirt fills at most *n entries of `params`.
        unsafe {
            sys::virNodeGetCPUStats(
                c,
                sys::VIR_NODE_CPU_STATS_ALL_CPUS,
                params as *mut sys::virNodeCPUStats,
                n,
                0,
            )
        }
    })
}

/// Host memory from `virNodeGetMemoryStats(ALL_CELLS)`, KiB, by field name (`total`,
/// `free`, `buffers`, `cached`).
pub fn node_memory_stats(conn: &Connect) -> Result<Vec<(String, u64)>, Error> {
    node_stats(conn, |c, params, n| {
        // SAFETY: libvirt fills at most *n entries of `params`.
        unsafe {
            sys::virNodeGetMemoryStats(
                c,
                sys::VIR_NODE_MEMORY_STATS_ALL_CELLS,
                params as *mut sys::virNodeMemoryStats,
                n,
                0,
            )
        }
    })
}

/// Both node stats structs are `{ field: [c_char; 80], value: u64 }`.
#[repr(C)]
#[derive(Clone, Copy)]
struct NodeStat {
    field: [c_char; 80],
    value: u64,
}

fn node_stats(
    conn: &Connect,
    call: impl Fn(sys::virConnectPtr, *mut NodeStat, *mut c_int) -> c_int,
) -> Result<Vec<(String, u64)>, Error> {
    // SAFETY: `conn` is open; asking with nparams = 0 returns the count.
    let c = unsafe { conn.as_ptr() };
    let mut n: c_int = 0;
    if call(c, std::ptr::null_mut(), &mut n) < 0 {
        return Err(Error::last_error());
    }
    let mut buf = vec![
        NodeStat {
            field: [0; 80],
            value: 0
        };
        n.clamp(0, 64) as usize
    ];
    let mut got = buf.len() as c_int;
    if got == 0 {
        return Ok(Vec::new());
    }
    if call(c, buf.as_mut_ptr(), &mut got) < 0 {
        return Err(Error::last_error());
    }
    Ok(buf[..got.clamp(0, buf.len() as c_int) as usize]
        .iter()
        .filter_map(|s| {
            // SAFETY: libvirt NUL-terminates `field` within its 80 bytes.
            let f = unsafe { cstr(s.field.as_ptr()) }?;
            Some((f.to_string(), s.value))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(kv: &[(&str, Value<'_>)]) -> DomStats {
        let mut s = DomStats::default();
        for (k, v) in kv {
            s.apply(k, *v);
        }
        s
    }

    #[test]
    fn cpu_is_vcpu_time_plus_wait_when_complete() {
        // Ceilometer's own case: maximum 4, current 2, vCPUs 0 and 2 each 10000 + 10000.
        let s = stats(&[
            ("cpu.time", Value::Uint(999_999)),
            ("vcpu.current", Value::Uint(2)),
            ("vcpu.maximum", Value::Uint(4)),
            ("vcpu.0.time", Value::Uint(10_000)),
            ("vcpu.0.wait", Value::Uint(10_000)),
            ("vcpu.2.time", Value::Uint(10_000)),
            ("vcpu.2.wait", Value::Uint(10_000)),
        ]);
        assert_eq!(s.cpu_ns(), Some(40_000));
    }

    #[test]
    fn cpu_falls_back_to_cpu_time_when_waits_are_missing() {
        let s = stats(&[
            ("cpu.time", Value::Uint(999_999)),
            ("vcpu.current", Value::Uint(2)),
            ("vcpu.0.time", Value::Uint(10_000)),
            ("vcpu.2.time", Value::Uint(10_000)),
        ]);
        assert_eq!(s.cpu_ns(), Some(999_999));
        assert_eq!(DomStats::default().cpu_ns(), None);
    }

    #[test]
    fn block_and_net_records_are_indexed() {
        let s = stats(&[
            ("block.count", Value::Uint(2)),
            ("block.1.name", Value::Str("vdb")),
            ("block.1.rd.bytes", Value::Uint(7)),
            ("block.0.name", Value::Str("vda")),
            ("block.0.capacity", Value::Uint(1 << 20)),
            ("net.0.name", Value::Str("vnet0")),
            ("net.0.tx.drop", Value::Uint(3)),
            ("net.99999.rx.bytes", Value::Uint(1)),
            ("state.state", Value::Int(1)),
            ("balloon.rss", Value::Uint(1024)),
            ("balloon.bogus", Value::Uint(1)),
            ("cpu.time", Value::Int(-5)),
        ]);
        assert!(s.has_block && s.has_net);
        assert_eq!(s.blocks.len(), 2);
        assert_eq!(s.blocks[1].name, "vdb");
        assert_eq!(s.blocks[1].rd_bytes, Some(7));
        assert_eq!(s.blocks[0].capacity, Some(1 << 20));
        assert_eq!(s.nets.len(), 1, "an absurd index is ignored");
        assert_eq!(s.nets[0].tx_drop, Some(3));
        assert_eq!(s.state, Some(1));
        assert_eq!(s.balloon_rss, Some(1024));
        assert_eq!(s.cpu_time, None, "a negative counter is not a value");
    }
}
