//! agent-compute's polling sources (Ceilometer's polling.yaml shape): each source's meters
//! at its own interval, nothing else; a bad file is refused naming file and line. libvirt
//! test driver and a real RabbitMQ.

use std::collections::HashMap;
use std::time::Duration;

use vmeter_e2e::{Names, Service, bin_dir, broker, listen_addr, repo_root};

const SECRET: &str = "sources-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_poll_their_meters_at_their_intervals() {
    let names = Names::new("o");
    let dir = names.dir("sources");
    let polling = dir.join("polling.yaml");
    std::fs::write(
        &polling,
        "sources:\n  - name: fast\n    interval: 1\n    meters: [cpu]\n  - name: slow\n    interval: 3\n    meters: ['disk.device.*']\n",
    )
    .unwrap();
    let node = repo_root().join("deploy/demo-node.xml");
    let mut env = names.env(SECRET);
    env.push((
        "VMETER_LIBVIRT__URI".into(),
        format!("test://{}", node.display()),
    ));
    env.push((
        "VMETER_POLLING__SOURCES_FILE".into(),
        polling.display().to_string(),
    ));
    env.push(("VMETER_POLLING__SHUFFLE_TIME_SECS".into(), "0".into()));
    env.push((
        "VMETER_SPOOL__DIR".into(),
        dir.join("spool").display().to_string(),
    ));
    env.push(("VMETER_HTTP__LISTEN".into(), listen_addr()));

    // A bad file is refused with file and line.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "sources:\n  - name: x\n    interval: -1\n    meters: [cpu]\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin_dir().join("agent-compute"))
        .arg("check-config")
        .envs(env.iter().cloned())
        .env("VMETER_POLLING__SOURCES_FILE", &bad)
        // Defaults, not the installed /etc/vmeter/agent-compute.yaml.
        .env("VMETER_CONFIG", "/dev/null")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.yaml:2: source x: interval must be > 0"),
        "{err}"
    );

    let conn = broker::connect().await;
    let agent = Service::start("agent", "agent-compute", &[], &env, &dir);
    broker::wait_for_queue(&conn, &names.raw_queue, Duration::from_secs(30)).await;
    let got = broker::collect_for(&conn, &names.raw_queue, Duration::from_secs(8)).await;
    drop(agent);
    let mut by_meter: HashMap<&str, Vec<i64>> = HashMap::new();
    for s in &got {
        assert!(
            s.name == "cpu" || s.name.starts_with("disk.device."),
            "only the sources' meters are polled, got {}",
            s.name
        );
        if s.resource_id.ends_with("00000001") || s.resource_id.ends_with("00000001-vda") {
            by_meter
                .entry(s.name.as_str())
                .or_default()
                .push(s.timestamp.timestamp_millis());
        }
    }
    let gaps = |m: &str| -> Vec<i64> {
        let mut t = by_meter.get(m).cloned().unwrap_or_default();
        t.sort();
        t.windows(2).map(|w| w[1] - w[0]).collect()
    };
    let cpu = gaps("cpu");
    let disk = gaps("disk.device.read.bytes");
    assert!(
        cpu.len() >= 5,
        "cpu every second: {cpu:?} ({} samples)",
        got.len()
    );
    assert!(
        cpu.iter().all(|g| (800..=1300).contains(g)),
        "cpu gaps ≈ 1 s: {cpu:?}"
    );
    assert!(!disk.is_empty(), "disk every 3 s: {disk:?}");
    assert!(
        disk.iter().all(|g| (2700..=3300).contains(g)),
        "disk gaps ≈ 3 s: {disk:?}"
    );
    broker::cleanup(&conn, &names).await;
    let _ = std::fs::remove_dir_all(&dir);
}
