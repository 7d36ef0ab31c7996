//! The built-in dashboard's load time over a day of data for 100 VMs, in real headless
//! Chromium against the release collector on the real RabbitMQ and PostgreSQL.
//!
//! Data: 100 VMs in 10 projects, each with `cpu_util`, `memory.usage`, one disk's read and
//! write byte rates and one NIC's in and out byte rates every 10 s for the last 24 hours
//! (agent-style polling): 6 × 8,640 × 100 = 5,184,000 samples, published to the processed
//! queue as signed batches and stored by the collector, whose rollup job then rolls up every
//! closed hour. Figures: the page's own `data-load-ms` (navigation start → every chart of the
//! view drawn), median and range of 5 loads of each view over the last 24 hours: the fleet
//! view (top VMs, the 5 busiest VMs' CPU, CPU per project: 8 API requests) and one VM's view
//! (CPU, memory, disk, NIC: 7 requests).
//!
//! Run: `cargo build --release -p collector && cargo bench -p vmeter-e2e --bench dashboard`
//! (after `deploy/setup.sh`, with `chromium` installed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DurationRound, Utc};
use vmeter_core::amqp::{self, Publisher};
use vmeter_core::signing::Signer;
use vmeter_core::telemetry::scrape;
use vmeter_core::{Metadata, Sample, SampleType};
use vmeter_e2e::{Names, Service, browser, create_database, drop_database, listen_addr};

const SECRET: &str = "bench-secret";
const VMS: usize = 100;
const STEP_S: i64 = 10;
const POINTS: i64 = 86_400 / STEP_S;
/// Points of every series per message: 100 VMs × 6 series × 2 = 1,200 samples.
const PER_MESSAGE: i64 = 2;
const LOADS: usize = 5;

fn vm_id(v: usize) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("vm-{v}").as_bytes()).to_string()
}

fn metadata(v: usize, disk: bool) -> Arc<Metadata> {
    let mut md = Metadata::new();
    md.insert("display_name".into(), format!("vm-{v:03}").into());
    md.insert("name".into(), format!("instance-{v:08x}").into());
    md.insert("instance_id".into(), vm_id(v).into());
    md.insert("instance_type".into(), "m1.small".into());
    md.insert("host".into(), format!("compute-{}", v % 8).into());
    if disk {
        md.insert("disk_name".into(), "vda".into());
    }
    Arc::new(md)
}

#[allow(clippy::too_many_arguments)]
fn sample(
    name: &str,
    unit: &str,
    v: usize,
    rid: &str,
    md: &Arc<Metadata>,
    t: chrono::DateTime<Utc>,
    x: f64,
) -> Sample {
    Sample {
        name: name.into(),
        kind: SampleType::Gauge,
        unit: unit.into(),
        volume: x,
        user_id: Some(format!("user-{}", v % 25)),
        project_id: Some(format!("project-{}", v % 10)),
        resource_id: rid.into(),
        timestamp: t,
        resource_metadata: md.clone(),
        source: "openstack".into(),
        message_id: uuid::Uuid::new_v4(),
        monotonic_time: None,
    }
}

fn median_range(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let names = Names::new("dashbench");
    let logs = names.dir("dashbench");
    let profile = names.dir("dashbench-chromium");
    let admin = create_database(&names).await;
    let http = listen_addr();
    let mut env = names.env(SECRET);
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), http.clone()));
    env.push(("VMETER_DATABASE__ROLLUP_INTERVAL_SECS".into(), "5".into()));
    env.push(("VMETER_LOG__LEVEL".into(), "warn".into()));
    let collector = Service::start("collector", "collector", &[], &env, &logs);
    let conn = vmeter_e2e::broker::connect().await;
    vmeter_e2e::broker::wait_for_consumer(&conn, &names.processed_queue, Duration::from_secs(60))
        .await;
    let publisher = Publisher::open(&conn, Signer::new(SECRET)).await.unwrap();

    let end = Utc::now()
        .duration_trunc(chrono::Duration::seconds(STEP_S))
        .unwrap();
    let t0 = end - chrono::Duration::seconds(POINTS * STEP_S);
    let ids: Vec<String> = (0..VMS).map(vm_id).collect();
    let mds: Vec<(Arc<Metadata>, Arc<Metadata>)> = (0..VMS)
        .map(|v| (metadata(v, false), metadata(v, true)))
        .collect();
    let started = Instant::now();
    let mut total = 0u64;
    let mut inflight = Vec::new();
    for k in 0..POINTS / PER_MESSAGE {
        let mut batch = Vec::with_capacity(VMS * 6 * PER_MESSAGE as usize);
        for p in k * PER_MESSAGE..(k + 1) * PER_MESSAGE {
            let t = t0 + chrono::Duration::seconds(p * STEP_S);
            for v in 0..VMS {
                let (md, dmd) = &mds[v];
                let id = &ids[v];
                // A day-long wave per VM around its own level, phase-shifted: some VMs
                // busy, some idle, no two alike.
                let phase =
                    (p as f64 / POINTS as f64 + v as f64 / VMS as f64) * std::f64::consts::TAU;
                let level = 5.0 + ((v * 37) % 80) as f64;
                let swing = 4.0 + (v % 7) as f64 * 2.0;
                let cpu = (level + swing * phase.sin()).clamp(0.0, 100.0);
                let disk = format!("{id}-vda");
                let nic = format!("instance-{v:08x}-{id}-tap0");
                batch.push(sample("cpu_util", "%", v, id, md, t, cpu));
                batch.push(sample(
                    "memory.usage",
                    "MB",
                    v,
                    id,
                    md,
                    t,
                    1024.0 + cpu * 10.0,
                ));
                batch.push(sample(
                    "disk.device.read.bytes.rate",
                    "B/s",
                    v,
                    &disk,
                    dmd,
                    t,
                    cpu * 1e4,
                ));
                batch.push(sample(
                    "disk.device.write.bytes.rate",
                    "B/s",
                    v,
                    &disk,
                    dmd,
                    t,
                    cpu * 3e3,
                ));
                batch.push(sample(
                    "network.incoming.bytes.rate",
                    "B/s",
                    v,
                    &nic,
                    md,
                    t,
                    cpu * 2e4,
                ));
                batch.push(sample(
                    "network.outgoing.bytes.rate",
                    "B/s",
                    v,
                    &nic,
                    md,
                    t,
                    cpu * 5e3,
                ));
            }
        }
        total += batch.len() as u64;
        let body = vmeter_core::wire::encode(&batch);
        inflight.push(
            publisher
                .send_body(
                    &names.exchange,
                    "sample.processed",
                    &body,
                    amqp::count_header(batch.len()),
                )
                .await
                .unwrap(),
        );
        if inflight.len() == 32 {
            for c in inflight.drain(..) {
                c.confirmed().await.unwrap();
            }
        }
    }
    for c in inflight {
        c.confirmed().await.unwrap();
    }
    loop {
        let (_, m) = vmeter_e2e::http::request(&http, "GET", "/metrics", &[], None).await;
        let stored = scrape(&m, "vmeter_collector_samples_stored_total") as u64;
        if stored >= total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "stored {stored} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored_s = started.elapsed().as_secs_f64();
    // Every closed hour rolled up (the watermark lags the newest sample by 10 min).
    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let want = collector::store::rollup::floor_hour(end - chrono::Duration::seconds(600 + STEP_S));
    loop {
        let wm: Option<chrono::DateTime<Utc>> =
            sqlx::query_scalar("select watermark from rollup_state")
                .fetch_one(&pool)
                .await
                .unwrap();
        if wm >= Some(want) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "rollups at {wm:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sqlx::query("vacuum analyze").execute(&pool).await.unwrap();
    pool.close().await;
    println!(
        "dashboard: {total} samples (100 VMs × 6 series × {POINTS} points, the last 24 h) stored and rolled up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _ = stored_s;

    // ADMIN: the API is open here (no tokens configured), as a fresh install's.
    let page = format!("http://{http}/dashboard/");
    let views = [
        (
            "fleet view, last 24 h",
            format!("{page}#view=fleet&range=24h&refresh=0"),
        ),
        (
            "VM view, last 24 h",
            format!("{page}#view=vm&vm={}&range=24h&refresh=0", ids[42]),
        ),
    ];
    for (what, url) in &views {
        let mut ms = Vec::new();
        for _ in 0..LOADS {
            let dom = browser::dom(url, &profile, Duration::from_secs(60));
            let state = browser::attr(&dom, "<body", "data-state").unwrap_or_default();
            assert_eq!(state, "drawn", "{what}: {dom}");
            let load: f64 = browser::attr(&dom, "<body", "data-load-ms")
                .and_then(|v| v.parse().ok())
                .expect("data-load-ms");
            ms.push(load);
        }
        let (med, lo, hi) = median_range(ms);
        println!("{what}: load {med:.0} ms (median of {LOADS}; {lo:.0}–{hi:.0} ms)");
    }
    if let Ok(dir) = std::env::var("VMETER_SCREENSHOTS") {
        let dir = std::path::PathBuf::from(dir);
        for (file, (_, url)) in ["dashboard-fleet-day.png", "dashboard-vm-day.png"]
            .iter()
            .zip(&views)
        {
            browser::screenshot(url, &profile, Duration::from_secs(60), &dir.join(file));
        }
    }
    drop(collector);
    drop_database(&admin, &names).await;
}
