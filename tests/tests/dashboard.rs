//! The collector's built-in dashboard in real headless Chromium, over real data in
//! PostgreSQL: the fleet view (top VMs by CPU, the busiest VMs' CPU, CPU per project) and the
//! VM view (CPU, memory, disk and NIC rates per device), as an admin token and as a project
//! token, without a token, and its auto-refresh. What each chart drew (the page states it in
//! `data-series`) is compared with what the test computes from the samples it stored.
//!
//! `VMETER_SCREENSHOTS=<dir>` also writes the screenshots of docs/dashboard.md there.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use serde_json::{Value, json};
use vmeter_e2e::browser;
use vmeter_e2e::http::request;
use vmeter_e2e::{Names, Service, create_database, drop_database, listen_addr};

const ADMIN: &str = "dash-admin-token";
const P1: &str = "dash-p1-token";
/// Minutes of data, one sample a minute per meter and resource, ending at the last minute.
const MINUTES: i64 = 60;

/// A VM of the test data: cpu_util `cpu(i)` at minute i.
struct Vm {
    id: &'static str,
    name: &'static str,
    project: &'static str,
    cpu: fn(i64) -> f64,
}

const VMS: [Vm; 4] = [
    Vm {
        id: "11111111-aaaa-4000-8000-000000000001",
        name: "web-1",
        project: "p1",
        cpu: |i| 80.0 + (i % 5) as f64,
    },
    Vm {
        id: "22222222-aaaa-4000-8000-000000000002",
        name: "db-1",
        project: "p1",
        cpu: |i| 20.0 + (i % 3) as f64 * 0.5,
    },
    Vm {
        id: "33333333-aaaa-4000-8000-000000000003",
        name: "batch-7",
        project: "p2",
        cpu: |i| if i < 30 { 95.0 } else { 10.0 },
    },
    Vm {
        id: "44444444-aaaa-4000-8000-000000000004",
        // A tenant names its VM: the page must show it as text, never as markup.
        name: "<img src=x onerror=alert(1)>idle-3",
        project: "p2",
        cpu: |_| 1.25,
    },
];

fn gauge(meter: &str, unit: &str, rid: &str, vm: &Vm, t: DateTime<Utc>, v: f64) -> Value {
    json!({
        "counter_name": meter, "counter_type": "gauge", "counter_unit": unit,
        "counter_volume": v, "resource_id": rid, "project_id": vm.project, "user_id": "u",
        "timestamp": t.format("%Y-%m-%dT%H:%M:%S").to_string(), "source": "openstack",
        "resource_metadata": {"display_name": vm.name, "name": format!("instance-{}", &vm.id[..8]),
                              "instance_id": vm.id, "disk_name": "vda"}
    })
}

/// The disk and NIC devices of VMS[0], and their rates at minute i.
fn web1_devices(i: i64) -> [(&'static str, &'static str, f64); 4] {
    [
        (
            "disk.device.read.bytes.rate",
            "-vda",
            1000.0 * (i + 1) as f64,
        ),
        ("disk.device.write.bytes.rate", "-vda", 500.0),
        ("network.incoming.bytes.rate", "tap0", 2.0e6 + i as f64),
        ("network.outgoing.bytes.rate", "tap0", 3.0e5),
    ]
}

fn device_rid(vm: &Vm, suffix: &str) -> String {
    if suffix.starts_with('-') {
        format!("{}{suffix}", vm.id)
    } else {
        format!("instance-{}-{}-{suffix}", &vm.id[..8], vm.id)
    }
}

async fn post(addr: &str, meter: &str, body: Vec<Value>) {
    let auth = format!("Bearer {ADMIN}");
    let (code, text) = request(
        addr,
        "POST",
        &format!("/v2/meters/{meter}?direct=true"),
        &[("Authorization", &auth)],
        Some(&Value::Array(body).to_string()),
    )
    .await;
    assert_eq!(code, 201, "{text}");
}

/// (label, points, sum, last) of each series a chart drew.
fn series(dom: &str, chart: &str) -> Vec<(String, u64, f64, f64)> {
    let json = browser::attr(dom, &format!("data-chart=\"{chart}\""), "data-series")
        .unwrap_or_else(|| panic!("no chart {chart} in the page:\n{dom}"));
    let v: Vec<Value> = serde_json::from_str(&json).unwrap();
    v.iter()
        .map(|s| {
            (
                s["label"].as_str().unwrap().to_string(),
                s["points"].as_u64().unwrap_or(0),
                s["sum"].as_f64().unwrap_or(0.0),
                s["last"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

fn assert_series(dom: &str, chart: &str, want: &[(String, Vec<f64>)]) {
    let got = series(dom, chart);
    assert_eq!(
        got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(),
        want.iter().map(|w| w.0.clone()).collect::<Vec<_>>(),
        "{chart}: series"
    );
    for ((label, points, sum, last), (_, values)) in got.iter().zip(want) {
        assert_eq!(*points, values.len() as u64, "{chart} {label}: points");
        assert!(
            close(*sum, values.iter().sum()),
            "{chart} {label}: sum {sum} vs {}",
            values.iter().sum::<f64>()
        );
        assert!(
            close(*last, *values.last().unwrap()),
            "{chart} {label}: last {last}"
        );
    }
}

fn state(dom: &str) -> (String, u64) {
    let s = browser::attr(dom, "<body", "data-state").unwrap_or_default();
    let draws = browser::attr(dom, "<body", "data-draws")
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    (s, draws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_draws_the_right_series_in_chromium() {
    let names = Names::new("dash");
    let logs = names.dir("dashboard");
    let profile = names.dir("chromium");
    let admin = create_database(&names).await;
    let addr = listen_addr();
    let mut env = names.env("dash-secret");
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));
    env.push(("VMETER_HTTP__ADMIN_TOKENS".into(), format!("[{ADMIN}]")));
    env.push((
        "VMETER_HTTP__PROJECT_TOKENS".into(),
        format!("{{{P1}: p1}}"),
    ));
    let collector = Service::start("collector", "collector", &[], &env, &logs);
    let mut up = false;
    for _ in 0..300 {
        if vmeter_e2e::http::get_json(&addr, "/dashboard/", None)
            .await
            .0
            == 200
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "no dashboard:\n{}", collector.log_text());

    // The data: the last MINUTES whole minutes (the page's default range, the last 6 hours,
    // has 60 s buckets, so each bucket holds one sample per resource).
    let end = Utc::now()
        .duration_trunc(chrono::Duration::minutes(1))
        .unwrap();
    let minute = |i: i64| end - chrono::Duration::minutes(MINUTES - i);
    let mut by_meter: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for vm in &VMS {
        for i in 0..MINUTES {
            by_meter.entry("cpu_util").or_default().push(gauge(
                "cpu_util",
                "%",
                vm.id,
                vm,
                minute(i),
                (vm.cpu)(i),
            ));
        }
    }
    let web1 = &VMS[0];
    for i in 0..MINUTES {
        by_meter.entry("memory.usage").or_default().push(gauge(
            "memory.usage",
            "MB",
            web1.id,
            web1,
            minute(i),
            1024.0 + i as f64,
        ));
        for (meter, suffix, v) in web1_devices(i) {
            by_meter.entry(meter).or_default().push(gauge(
                meter,
                "B/s",
                &device_rid(web1, suffix),
                web1,
                minute(i),
                v,
            ));
        }
    }
    for (meter, body) in by_meter {
        post(&addr, meter, body).await;
    }

    let page = format!("http://{addr}/dashboard/");
    let budget = Duration::from_secs(20);
    let cpu = |vm: &Vm| (0..MINUTES).map(|i| (vm.cpu)(i)).collect::<Vec<f64>>();
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;

    // 1. Fleet view, admin: every VM, busiest first; the busiest five's CPU; per project.
    let dom = browser::dom(
        &format!("{page}#view=fleet&range=6h&refresh=0&token={ADMIN}"),
        &profile,
        budget,
    );
    assert_eq!(state(&dom).0, "drawn", "{dom}");
    let mut ranked: Vec<&Vm> = VMS.iter().collect();
    ranked.sort_by(|a, b| avg(&cpu(b)).total_cmp(&avg(&cpu(a))));
    let top: Vec<Value> =
        serde_json::from_str(&browser::attr(&dom, "data-chart=\"top\"", "data-series").unwrap())
            .unwrap();
    assert_eq!(top.len(), VMS.len());
    for (row, vm) in top.iter().zip(&ranked) {
        assert_eq!(row["id"], vm.id);
        assert_eq!(row["label"], vm.name);
        assert!(close(row["avg"].as_f64().unwrap(), avg(&cpu(vm))), "{row}");
        let max = cpu(vm).into_iter().fold(f64::MIN, f64::max);
        assert!(close(row["max"].as_f64().unwrap(), max), "{row}");
    }
    let want: Vec<(String, Vec<f64>)> = ranked
        .iter()
        .map(|vm| (vm.name.to_string(), cpu(vm)))
        .collect();
    assert_series(&dom, "top-cpu", &want);
    let per_project = |p: &str| {
        let mine: Vec<&Vm> = VMS.iter().filter(|v| v.project == p).collect();
        (0..MINUTES)
            .map(|i| mine.iter().map(|v| (v.cpu)(i)).sum::<f64>() / mine.len() as f64)
            .collect::<Vec<f64>>()
    };
    assert_series(
        &dom,
        "project-cpu",
        &[
            ("p1".into(), per_project("p1")),
            ("p2".into(), per_project("p2")),
        ],
    );
    assert!(
        dom.contains(&format!("data-resource=\"{}\"", VMS[2].id)),
        "the table links each VM"
    );
    // The hostile name is text in the table, the VM list and the legend: no element made.
    assert!(
        dom.contains("&lt;img src=x onerror=alert(1)&gt;idle-3"),
        "{dom}"
    );
    assert!(
        !dom.contains("<img src=\"x\""),
        "markup from a VM name: {dom}"
    );

    // 2. VM view of web-1: CPU (avg and max of one sample: the same), memory, the disk's
    // read and write, the NIC's in and out.
    let dom = browser::dom(
        &format!(
            "{page}#view=vm&vm={}&range=6h&refresh=0&token={ADMIN}",
            web1.id
        ),
        &profile,
        budget,
    );
    assert_eq!(state(&dom).0, "drawn", "{dom}");
    assert_series(
        &dom,
        "cpu",
        &[("avg".into(), cpu(web1)), ("max".into(), cpu(web1))],
    );
    let mem: Vec<f64> = (0..MINUTES).map(|i| 1024.0 + i as f64).collect();
    assert_series(&dom, "memory", &[("avg".into(), mem)]);
    let dev = |k: usize| {
        (0..MINUTES)
            .map(|i| web1_devices(i)[k].2)
            .collect::<Vec<f64>>()
    };
    assert_series(
        &dom,
        "disk",
        &[("read vda".into(), dev(0)), ("write vda".into(), dev(1))],
    );
    assert_series(
        &dom,
        "network",
        &[("in tap0".into(), dev(2)), ("out tap0".into(), dev(3))],
    );
    assert!(dom.contains("web-1 (p1)"), "the VM list names the VM");

    // 3. A project token sees its project's VMs only.
    let dom = browser::dom(
        &format!("{page}#view=fleet&range=6h&refresh=0&token={P1}"),
        &profile,
        budget,
    );
    assert_eq!(state(&dom).0, "drawn", "{dom}");
    let labels: Vec<String> = series(&dom, "top-cpu").into_iter().map(|s| s.0).collect();
    assert_eq!(labels, ["web-1", "db-1"]);
    assert_series(&dom, "project-cpu", &[("p1".into(), per_project("p1"))]);
    assert!(!dom.contains(VMS[2].id) && !dom.contains("batch-7"));

    // 4. No token (a fresh profile: the token stays in the tab's sessionStorage): the page
    // says a token is needed, and shows no data.
    let fresh = names.dir("chromium-fresh");
    let dom = browser::dom(&format!("{page}#view=fleet&range=6h"), &fresh, budget);
    assert_eq!(state(&dom).0, "error", "{dom}");
    assert!(dom.contains("needs a token"), "{dom}");
    assert!(!dom.contains("web-1"));

    // 5. Auto-refresh: every second, for 12 s of the page's (virtual) time.
    let dom = browser::dom(
        &format!("{page}#view=fleet&range=6h&refresh=1&token={ADMIN}"),
        &profile,
        Duration::from_secs(12),
    );
    let (s, draws) = state(&dom);
    assert_eq!(s, "drawn");
    assert!(draws >= 3, "drew {draws} times in 12 s with refresh=1");

    if let Ok(dir) = std::env::var("VMETER_SCREENSHOTS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        browser::screenshot(
            &format!("{page}#view=fleet&range=6h&refresh=0&token={ADMIN}"),
            &profile,
            budget,
            &dir.join("dashboard-fleet.png"),
        );
        browser::screenshot(
            &format!(
                "{page}#view=vm&vm={}&range=6h&refresh=0&token={ADMIN}",
                web1.id
            ),
            &profile,
            budget,
            &dir.join("dashboard-vm.png"),
        );
    }

    drop(collector);
    drop_database(&admin, &names).await;
}
