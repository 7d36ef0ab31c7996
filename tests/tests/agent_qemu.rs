//! agent-compute against real QEMU guests through libvirtd (`qemu:///system`): one guest
//! spins its vCPU (boot sector `EB FE`), one halts (`FA F4`). The agent's `cpu` samples,
//! taken from the real RabbitMQ queue, must give ≈100 % of one vCPU for the first and ≈0
//! for the second, and `/metrics` must show that the bulk call produced them. Then the idle
//! guest's QEMU is frozen (SIGSTOP) so libvirt's monitor call on it blocks: the agent must
//! count the timeout and keep reporting the other guest.
//!
//! Needs libvirtd and QEMU as `deploy/setup.sh` starts them with WITH_LIBVIRTD=1 WITH_QEMU=1
//! (the README's test command does). KVM when `/dev/kvm` can start a guest, else TCG; the
//! test skips, loudly, only when neither can.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmeter_core::Sample;
use vmeter_e2e::{Names, Service, broker, http, listen_addr};

const SECRET: &str = "qemu-secret";
const URI: &str = "qemu:///system";

fn emulator() -> PathBuf {
    let root = std::env::var("QEMU_ROOT").unwrap_or_else(|_| "/opt/qemu".into());
    Path::new(&root).join("usr/bin/qemu-system-x86_64")
}

fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .arg("-q")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A 1 MiB raw disk whose boot sector runs `code` forever.
fn boot_disk(path: &Path, code: &[u8]) {
    let mut img = vec![0u8; 1 << 20];
    img[..code.len()].copy_from_slice(code);
    img[510] = 0x55;
    img[511] = 0xaa;
    std::fs::write(path, img).unwrap();
}

fn domain_xml(kind: &str, name: &str, disk: &Path, tap: &str) -> String {
    format!(
        "<domain type='{kind}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices>\
         <emulator>{}</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <interface type='ethernet'><model type='virtio'/><target dev='{tap}' managed='yes'/></interface>\
         <memballoon model='virtio'/></devices></domain>",
        emulator().display(),
        disk.display()
    )
}

/// Transient guests destroyed (and thawed first) when the test ends, pass or fail.
struct Guests {
    names: Vec<String>,
    frozen: Vec<i32>,
}

impl Drop for Guests {
    fn drop(&mut self) {
        for pid in &self.frozen {
            let _ = signal(*pid, "CONT");
        }
        for n in &self.names {
            let _ = virsh(&["destroy", n]);
        }
    }
}

/// `kill -SIG pid`; whether it was delivered.
fn signal(pid: i32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

fn qemu_pid(name: &str) -> i32 {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Per resource, (monotonic s, cpu ns) of the `cpu` samples, in order.
fn cpu_series(samples: &[Sample]) -> HashMap<String, Vec<(f64, f64)>> {
    let mut m: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    for s in samples.iter().filter(|s| s.name == "cpu") {
        m.entry(s.resource_id.clone()).or_default().push((
            s.monotonic_time.expect("agent sets monotonic_time"),
            s.volume,
        ));
    }
    for v in m.values_mut() {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    m
}

/// Utilisation of one vCPU, %, over the last four intervals of the series.
fn util(series: &[(f64, f64)]) -> f64 {
    let (first, last) = (
        series[series.len().saturating_sub(5)],
        series[series.len() - 1],
    );
    (last.1 - first.1) / ((last.0 - first.0) * 1e9) * 100.0
}

/// Whether the series' last four intervals show no CPU time at all spent by the guest's
/// firmware phase any more: the idle guest's SeaBIOS keeps its vCPU busy for a few seconds
/// after start (observed 1–5 s, longer on a loaded CI machine) before the boot sector halts
/// it. The test waits for that phase to end (with a deadline) instead of guessing its length.
fn settled(series: &[(f64, f64)]) -> bool {
    series.len() >= 5 && util(series) < 5.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_guests_spinning_and_idle() {
    if !emulator().exists() || virsh(&["uri"]).is_err() {
        panic!(
            "libvirtd (qemu:///system) or QEMU at {} is missing: run `WITH_LIBVIRTD=1 WITH_QEMU=1 bash deploy/setup.sh` (deploy/test.sh does)",
            emulator().display()
        );
    }
    let names = Names::new("q");
    let dir = names.dir("qemu");
    let suffix = &names.id[names.id.len().saturating_sub(6)..];
    let spin = format!("vmeter-t-spin-{}", names.id);
    let idle = format!("vmeter-t-idle-{}", names.id);
    boot_disk(&dir.join("spin.img"), &[0xeb, 0xfe]); // jmp $
    boot_disk(&dir.join("idle.img"), &[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp back
    let mut guests = Guests {
        names: Vec::new(),
        frozen: Vec::new(),
    };
    // KVM when it can start a guest here, else TCG (VMETER_TEST_ACCEL=tcg forces TCG).
    let kinds: &[&str] = if std::env::var("VMETER_TEST_ACCEL").as_deref() == Ok("tcg") {
        &["qemu"]
    } else {
        &["kvm", "qemu"]
    };
    let mut accel = None;
    for &kind in kinds {
        let xml = dir.join(format!("spin-{kind}.xml"));
        std::fs::write(
            &xml,
            domain_xml(kind, &spin, &dir.join("spin.img"), &format!("vms{suffix}")),
        )
        .unwrap();
        match virsh(&["create", xml.to_str().unwrap()]) {
            Ok(_) => {
                accel = Some(kind);
                break;
            }
            Err(e) => eprintln!("agent_qemu: <domain type='{kind}'> did not start: {e}"),
        }
    }
    let Some(kind) = accel else {
        eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !! SKIPPED agent_qemu: neither KVM nor TCG could start a QEMU guest here. !!\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
        return;
    };
    guests.names.push(spin.clone());
    let xml = dir.join("idle.xml");
    std::fs::write(
        &xml,
        domain_xml(kind, &idle, &dir.join("idle.img"), &format!("vmi{suffix}")),
    )
    .unwrap();
    virsh(&["create", xml.to_str().unwrap()]).expect("idle guest starts like the spinning one");
    guests.names.push(idle.clone());
    eprintln!("agent_qemu: guests run with <domain type='{kind}'>");
    let spin_id = virsh(&["domuuid", &spin]).unwrap();
    let idle_id = virsh(&["domuuid", &idle]).unwrap();

    // The agent as in production: polling every second, publishing to RabbitMQ.
    let http_addr = listen_addr();
    let mut env = names.env(SECRET);
    for (k, v) in [
        ("VMETER_LIBVIRT__URI", URI.to_string()),
        ("VMETER_LIBVIRT__CALL_TIMEOUT_SECS", "2".into()),
        ("VMETER_POLLING__INTERVAL_SECS", "1".into()),
        ("VMETER_POLLING__SHUFFLE_TIME_SECS", "0".into()),
        ("VMETER_SPOOL__DIR", dir.join("spool").display().to_string()),
        ("VMETER_HTTP__LISTEN", http_addr.clone()),
    ] {
        env.push((k.into(), v));
    }
    let conn = broker::connect().await;
    let mut agent = Service::start("agent", "agent-compute", &[], &env, &dir);
    if tokio::time::timeout(
        Duration::from_secs(30),
        broker::wait_for_queue(&conn, &names.raw_queue, Duration::from_secs(60)),
    )
    .await
    .is_err()
    {
        panic!(
            "the agent did not declare its queue within 30 s\n{}",
            agent.log_text()
        );
    }
    // Collect at least 8 s, then on until the idle guest's firmware phase is over (at most
    // 60 s): both guests are measured over the same, last four one-second intervals.
    let mut got = broker::collect_for(&conn, &names.raw_queue, Duration::from_secs(8)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !settled(cpu_series(&got).get(&idle_id).map_or(&[][..], |v| v))
        && Instant::now() < deadline
    {
        got.extend(broker::collect_for(&conn, &names.raw_queue, Duration::from_secs(2)).await);
    }
    let cpu = cpu_series(&got);
    let (s, i) = (
        cpu.get(&spin_id).cloned().unwrap_or_default(),
        cpu.get(&idle_id).cloned().unwrap_or_default(),
    );
    assert!(
        s.len() >= 5 && i.len() >= 5,
        "cpu samples every second for both guests: spin {s:?} idle {i:?}\n{}",
        agent.log_text()
    );
    let (us, ui) = (util(&s), util(&i));
    eprintln!("agent_qemu: cpu utilisation of one vCPU: spinning {us:.1} %, idle {ui:.2} %");
    assert!(
        (80.0..=105.0).contains(&us),
        "spinning guest ≈100 %: {us:.1} % from {s:?}"
    );
    assert!(ui < 5.0, "idle guest ≈0 %: {ui:.2} % from {i:?}");

    // Which meters the real guests gave, and that the bulk call gave them.
    let meters: BTreeSet<&str> = got
        .iter()
        .filter(|x| x.resource_id.starts_with(&spin_id) || x.resource_id.contains(&spin_id))
        .map(|x| x.name.as_str())
        .collect();
    eprintln!("agent_qemu: meters of the spinning guest: {meters:?}");
    for m in [
        "cpu",
        "vcpus",
        "power.state",
        "memory",
        "memory.resident",
        "disk.device.read.bytes",
        "disk.device.read.latency",
        "disk.device.capacity",
        "network.incoming.bytes",
        "network.outgoing.packets.drop",
    ] {
        assert!(meters.contains(m), "{m} missing from {meters:?}");
    }
    let host: BTreeSet<&str> = got
        .iter()
        .filter(|x| x.name.starts_with("compute.node."))
        .map(|x| x.name.as_str())
        .collect();
    eprintln!("agent_qemu: host meters: {host:?}");
    assert!(
        host.contains("compute.node.cpu.idle.time") && host.contains("compute.node.memory.free"),
        "{host:?}"
    );
    let spin_md = &got
        .iter()
        .find(|x| x.name == "cpu" && x.resource_id == spin_id)
        .unwrap()
        .resource_metadata;
    assert_eq!(
        spin_md.get("name").and_then(|v| v.as_str()),
        Some(spin.as_str())
    );
    assert_eq!(spin_md.get("cpu_number").and_then(|v| v.as_u64()), Some(1));
    let (_, metrics) = http::request(&http_addr, "GET", "/metrics", &[], None).await;
    let bulk_cpu = vmeter_core::telemetry::scrape(
        &metrics,
        "vmeter_agent_stats_reads_total{group=\"cpu-total\",path=\"bulk\"}",
    );
    let per_domain = vmeter_core::telemetry::scrape(
        &metrics,
        "vmeter_agent_stats_reads_total{group=\"cpu-total\",path=\"per_domain\"}",
    ) + vmeter_core::telemetry::scrape(
        &metrics,
        "vmeter_agent_stats_reads_total{group=\"vcpu\",path=\"per_domain\"}",
    );
    assert!(
        bulk_cpu >= 8.0 && per_domain == 0.0,
        "cpu from the bulk call only: bulk {bulk_cpu}, per-domain {per_domain}\n{metrics}"
    );
    // Each libvirt call that returned is timed, by call; each cycle too.
    let timed = |call: &str| {
        vmeter_core::telemetry::scrape(
            &metrics,
            &format!("vmeter_agent_libvirt_call_seconds_count{{call=\"{call}\"}}"),
        )
    };
    assert!(
        timed("bulk stats") >= 4.0 && timed("domain xml") >= 2.0,
        "{metrics}"
    );
    assert!(
        vmeter_core::telemetry::scrape(&metrics, "vmeter_agent_cycle_seconds_count ") >= 8.0,
        "{metrics}"
    );

    // Freeze the idle guest's QEMU: libvirt's next monitor call on it blocks. The agent
    // must give up on that cycle after call_timeout (2 s), count it, and go on polling the
    // spinning guest (no-wait bulk call skips what needs the frozen guest's job lock).
    let pid = qemu_pid(&idle);
    assert!(signal(pid, "STOP"), "SIGSTOP to QEMU pid {pid}");
    guests.frozen.push(pid);
    let after = broker::collect_for(&conn, &names.raw_queue, Duration::from_secs(9)).await;
    let (_, metrics) = http::request(&http_addr, "GET", "/metrics", &[], None).await;
    let timeouts = vmeter_core::telemetry::scrape(&metrics, "vmeter_agent_libvirt_timeouts_total");
    let spin_after = cpu_series(&after).remove(&spin_id).unwrap_or_default();
    eprintln!(
        "agent_qemu: frozen idle guest: {timeouts} timed-out cycle(s), {} cpu samples of the spinning guest in 9 s",
        spin_after.len()
    );
    assert!(timeouts >= 1.0, "the blocked call is counted\n{metrics}");
    assert!(
        spin_after.len() >= 4,
        "the other guest is still polled: {spin_after:?}\n{}",
        agent.log_text()
    );
    assert!(
        agent.log_text().contains("libvirt call timed out"),
        "the timeout is logged"
    );
    agent.stop();
    drop(guests);
    broker::cleanup(&conn, &names).await;
    let _ = std::fs::remove_dir_all(&dir);
}
