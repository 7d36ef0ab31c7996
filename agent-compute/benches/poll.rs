//! Polling cost with 1,000 domains (2 disks, 2 NICs, a balloon and Nova metadata each) on
//! libvirt's test driver, through agent-compute's own code path, next to the raw libvirt
//! calls that path needs, measured in the same run.
//!
//! `cargo bench -p agent-compute --bench poll` prints:
//! - in-process (`test:///node.xml`): µs per domain per cycle for the agent's own cycle,
//!   `Inspector::poll_batches` (what its libvirt thread runs: poll, filter by meter,
//!   encode into batches of 500 ready to sign and publish) and for the raw calls alone
//!   (`virConnectGetAllDomainStats` + per domain `uuid`, `id`, `info`, `memory_stats`, 2×`block_stats`,
//!   2×`block_info`, 2×`interface_stats`: what the test driver needs because it answers
//!   only `state` in bulk), best of `ROUNDS` each, alternated; and the overhead, as the
//!   ratio of the bests and as the median of the rounds' ratios (each round runs both back
//!   to back, so a slow spell of the machine weighs on both sides of a ratio);
//! - the agent binary as a daemon with 1,000 domains behind libvirtd (`test+unix://…`,
//!   so the domains live in libvirtd, as in production): RSS, peak RSS and CPU seconds
//!   per cycle, publishing to the local RabbitMQ. Skipped (said so) without libvirtd.
//!
//! Environment: `VMETER_BENCH_DOMAINS` (1000), `VMETER_BENCH_AMQP` (default: the agent
//! user of deploy/setup.sh's credentials).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_compute::inspector::{Guard, Inspector, Options};
use virt::connect::Connect;

const ROUNDS: usize = 21;

// The agent binary's allocator: the system's (no `#[global_allocator]` in either).

fn node_xml(n: usize) -> String {
    let mut x = String::from(
        "<node><cpu><mhz>2400</mhz><model>x86_64</model><active>64</active><nodes>1</nodes>\
         <sockets>2</sockets><cores>16</cores><threads>2</threads></cpu><memory>536870912</memory>\n",
    );
    for i in 0..n {
        let _ = writeln!(
            x,
            "<domain type='test'><name>instance-{i:08x}</name><uuid>5e1f0000-0000-4000-8000-{i:012x}</uuid>\
             <metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.0'>\
             <nova:name>vm-{i}</nova:name><nova:flavor name='m1.small'><nova:memory>2048</nova:memory>\
             <nova:disk>20</nova:disk><nova:swap>0</nova:swap><nova:ephemeral>0</nova:ephemeral><nova:vcpus>2</nova:vcpus></nova:flavor>\
             <nova:owner><nova:user uuid='u-{u}'>u</nova:user><nova:project uuid='p-{p}'>p</nova:project></nova:owner>\
             <nova:root type='image' uuid='c0ffee00-0000-4000-8000-00000000cafe'/></nova:instance></metadata>\
             <memory unit='MiB'>2048</memory><currentMemory unit='MiB'>2048</currentMemory><vcpu>2</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices>\
             <disk type='file' device='disk'><source file='/var/lib/nova/{i}/disk'/><target dev='vda' bus='virtio'/></disk>\
             <disk type='file' device='disk'><source file='/var/lib/nova/{i}/disk.eph0'/><target dev='vdb' bus='virtio'/></disk>\
             <interface type='network'><mac address='fa:16:3e:{a:02x}:{b:02x}:00'/><source network='default'/><target dev='tap{i:08x}a'/></interface>\
             <interface type='ethernet'><mac address='fa:16:3e:{a:02x}:{b:02x}:01'/><target dev='tap{i:08x}b'/></interface>\
             <memballoon model='virtio'/></devices></domain>",
            u = i % 50,
            p = i % 20,
            a = (i >> 8) & 0xff,
            b = i & 0xff,
        );
    }
    x.push_str("</node>\n");
    x
}

/// The libvirt calls the agent's path makes on this driver, without building samples.
fn raw_cycle(conn: &Connect) -> usize {
    let recs = agent_compute::bulk::all_domain_stats(
        conn,
        agent_compute::bulk::group::STATE,
        agent_compute::bulk::FLAG_NOWAIT,
    )
    .unwrap();
    let mut n = 0;
    for r in &recs {
        let d = &r.domain;
        let uuid = d.uuid_string().unwrap();
        // The agent reads the id to notice a restart (its parsed XML is then stale).
        let _ = d.id();
        let _ = d.info().unwrap();
        n += d.memory_stats(0).unwrap().len();
        for disk in ["vda", "vdb"] {
            let _ = d.block_stats(disk).unwrap();
            let _ = d.block_info(disk, 0).unwrap();
        }
        // The vNICs' names as node_xml gives them (the agent has them from the XML it
        // parsed once; it makes no call for them).
        let i = &uuid[uuid.len() - 8..];
        for nic in ["a", "b"] {
            let dev = format!("tap{i}{nic}");
            let _ = d.interface_stats(&dev).unwrap();
        }
    }
    n + recs.len()
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, seconds.
fn proc_cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let v = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (v(11) + v(12)) / tick
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn main() {
    virt::error::clear_error_callback();
    let n: usize = std::env::var("VMETER_BENCH_DOMAINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let path = std::env::temp_dir().join(format!("vmeter-bench-node-{n}.xml"));
    std::fs::write(&path, node_xml(n)).unwrap();
    let uri = format!("test://{}", path.display());
    println!(
        "agent-compute poll bench: {n} domains × (2 disks, 2 NICs, balloon, Nova metadata), libvirt test driver"
    );

    // In-process: the agent's path and the raw calls, alternated, best of ROUNDS.
    let opts = Options {
        host: "bench-host".into(),
        bulk: true,
        xml_refresh: Duration::from_secs(3600),
        contract: Default::default(),
    };
    let mut insp = Inspector::open(&uri, opts, Arc::new(Guard::default())).unwrap();
    let raw_conn = Connect::open_read_only(Some(&uri)).unwrap();
    let t = Instant::now();
    // The meter filter of the default configuration (one source of every meter), as the
    // agent applies it to every sample.
    let every = agent_compute::sources::every_meter(60.0);
    let keep = |meter: &str| every[0].filter.matches(meter);
    let st = insp.poll_batches(&keep, 500, &mut |_, _| ()).unwrap();
    println!(
        "  first cycle (parses {} domain XMLs): {:.1} ms, {} samples",
        st.xml_reads,
        t.elapsed().as_secs_f64() * 1e3,
        st.samples
    );
    raw_cycle(&raw_conn);
    let (mut best_agent, mut best_raw) = (f64::MAX, f64::MAX);
    let mut ratios = Vec::with_capacity(ROUNDS);
    let (mut cpu_agent, mut samples, mut bytes) = (0.0, 0, 0);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        raw_cycle(&raw_conn);
        let raw = t.elapsed().as_secs_f64();
        best_raw = best_raw.min(raw);
        let c = cpu_secs();
        let t = Instant::now();
        let mut b = 0;
        let st = insp
            .poll_batches(&keep, 500, &mut |body, _| b += body.len())
            .unwrap();
        let e = t.elapsed().as_secs_f64();
        cpu_agent += cpu_secs() - c;
        assert_eq!(st.skipped, 0);
        (samples, bytes) = (st.samples, b);
        best_agent = best_agent.min(e);
        ratios.push(e / raw);
    }
    let per = |s: f64| s * 1e6 / n as f64;
    println!(
        "  raw libvirt calls:   {:7.1} µs/domain/cycle ({:.1} ms per cycle)",
        per(best_raw),
        best_raw * 1e3
    );
    println!(
        "  agent cycle (poll + encode): {:5.1} µs/domain/cycle ({:.1} ms per cycle, {samples} samples in {:.0} B/sample batches, {:.3} CPU s/cycle)   target ≤ 60 µs",
        per(best_agent),
        best_agent * 1e3,
        bytes as f64 / samples as f64,
        cpu_agent / ROUNDS as f64
    );
    ratios.sort_by(f64::total_cmp);
    println!(
        "  agent overhead over the raw calls: {:+.1} % (bests), {:+.1} % (median of {ROUNDS} paired rounds; quartiles {:+.1} / {:+.1} %)   target ≤ 25 %",
        (best_agent / best_raw - 1.0) * 100.0,
        (ratios[ROUNDS / 2] - 1.0) * 100.0,
        (ratios[ROUNDS / 4] - 1.0) * 100.0,
        (ratios[3 * ROUNDS / 4] - 1.0) * 100.0,
    );
    drop(insp);
    drop(raw_conn);

    // The agent binary as a daemon, domains in libvirtd.
    if !std::path::Path::new("/run/libvirt/libvirt-sock").exists() {
        println!(
            "  daemon RSS: SKIPPED — libvirtd is not running (WITH_LIBVIRTD=1 bash deploy/setup.sh)"
        );
        return;
    }
    // The broker's admin: the agent's own user may publish only to the production exchange
    // (deploy/setup.sh), and the bench keeps its samples out of the production queues.
    let amqp = std::env::var("VMETER_BENCH_AMQP")
        .unwrap_or_else(|_| vmeter_core::config::local_amqp_url("ADMIN"));
    // The bench's own exchange and raw queue, declared first (the agent only checks that its
    // exchange is there) and deleted afterwards.
    let topology = vmeter_core::amqp::BrokerConfig {
        url: vmeter_core::config::local_amqp_url("ADMIN"),
        exchange: "bench.agent".into(),
        raw_queue: "bench.agent.raw".into(),
        processed_queue: "bench.agent.processed".into(),
        dead_letter_exchange: "bench.agent.dlx".into(),
        dead_letter_queue: "bench.agent.dead".into(),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin = rt.block_on(async {
        let conn = vmeter_core::amqp::connect(&topology, "vmeter-bench")
            .await
            .expect("RabbitMQ from deploy/setup.sh, as its admin");
        let ch = conn.create_channel().await.unwrap();
        vmeter_core::amqp::declare_topology(&ch, &topology)
            .await
            .unwrap();
        (conn, ch)
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let spool = std::env::temp_dir().join(format!("vmeter-bench-spool-{}", std::process::id()));
    let interval = 3.0;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agent-compute"))
        .env("VMETER_CONFIG", "/dev/null") // defaults, not an installed /etc/vmeter config
        .env(
            "VMETER_LIBVIRT__URI",
            format!("test+unix://{}", path.display()),
        )
        .env("VMETER_POLLING__INTERVAL_SECS", interval.to_string())
        .env("VMETER_POLLING__SHUFFLE_TIME_SECS", "0")
        .env("VMETER_BROKER__URL", &amqp)
        .env("VMETER_BROKER__RAW_QUEUE", &topology.raw_queue)
        .env("VMETER_BROKER__PROCESSED_QUEUE", &topology.processed_queue)
        .env("VMETER_BROKER__EXCHANGE", &topology.exchange)
        .env(
            "VMETER_BROKER__DEAD_LETTER_EXCHANGE",
            &topology.dead_letter_exchange,
        )
        .env(
            "VMETER_BROKER__DEAD_LETTER_QUEUE",
            &topology.dead_letter_queue,
        )
        .env("VMETER_SIGNING__TELEMETRY_SECRET", "\"bench\"")
        .env("VMETER_SPOOL__DIR", &spool)
        .env("VMETER_HTTP__LISTEN", &addr)
        .env("VMETER_LOG__LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Two cycles to settle, then measure over five.
    let cycles = |a: &str| {
        vmeter_core::telemetry::scrape(&http_get(a, "/metrics"), "vmeter_agent_cycles_total")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while cycles(&addr) < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (c0, cpu0) = (cycles(&addr), proc_cpu_secs(pid));
    while cycles(&addr) < c0 + 5.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (c1, cpu1) = (cycles(&addr), proc_cpu_secs(pid));
    let m = http_get(&addr, "/metrics");
    let rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&spool);
    let published = vmeter_core::telemetry::scrape(&m, "vmeter_agent_samples_published_total");
    rt.block_on(async {
        let (conn, ch) = admin;
        for q in [
            &topology.raw_queue,
            &topology.processed_queue,
            &topology.dead_letter_queue,
        ] {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
        for e in [&topology.exchange, &topology.dead_letter_exchange] {
            let _ = ch
                .exchange_delete(e.as_str().into(), Default::default())
                .await;
        }
        let _ = conn.close(200, "bench done".into()).await;
    });
    println!(
        "  daemon (test+unix:// via libvirtd, {n} domains, publishing to RabbitMQ): RSS {:.1} MiB, peak {:.1} MiB   target ≤ 30 MiB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    if c1 > c0 && published == 0.0 {
        println!(
            "  daemon CPU: FAILED — cycles ran but no sample was published (broker permissions?)"
        );
    } else if c1 > c0 {
        println!(
            "  daemon CPU: {:.3} s per cycle over {} cycles (poll over RPC + encode + sign + publish), {:.0} samples published",
            (cpu1 - cpu0) / (c1 - c0),
            c1 - c0,
            published
        );
    } else {
        println!("  daemon CPU: no cycle completed in time (is RabbitMQ up at {amqp}?)");
    }
}
