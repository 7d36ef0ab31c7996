//! The notification service's consistency guarantees as real processes over a real
//! RabbitMQ: state carried over a planned restart (and not over a crash), hot reload that
//! keeps the state of unchanged sinks and refuses a bad file, and a hot standby that takes
//! over when the active instance dies.
//!
//! Inputs are hand-made `cpu` samples (1 vCPU) published like an agent does; outputs are
//! read from the processed queue (no collector runs in these tests).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use lapin::Connection;
use vmeter_core::{Sample, SampleType};
use vmeter_e2e::{Names, Service, broker, listen_addr};

const SECRET: &str = "state-test-secret";

const CPU_AND_MEMORY: &str = r#"
sources:
  - {name: cpu_source, meters: [cpu], sinks: [cpu_sink]}
  - {name: memory_source, meters: [memory], sinks: [held_sink]}
sinks:
  - name: cpu_sink
    transformers:
      - name: rate_of_change
        parameters:
          target: {name: cpu_util, unit: "%", type: gauge,
                   scale: "100.0 / (10**9 * (resource_metadata.cpu_number or 1))"}
    publishers: [notifier://]
  - name: held_sink
    transformers:
      - name: accumulator
        parameters: {size: 2}
    publishers: [notifier://]
"#;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

/// Cumulative CPU time of a 1-vCPU VM that is 50 % busy, `k` minutes after t0.
fn cpu(rid: &str, k: i64) -> Sample {
    let mut md = vmeter_core::Metadata::new();
    md.insert("cpu_number".into(), 1.into());
    Sample {
        name: "cpu".into(),
        kind: SampleType::Cumulative,
        unit: "ns".into(),
        volume: k as f64 * 30e9,
        user_id: Some("u".into()),
        project_id: Some("p".into()),
        resource_id: rid.into(),
        timestamp: t0() + chrono::Duration::minutes(k),
        resource_metadata: md.into(),
        source: "openstack".into(),
        message_id: uuid::Uuid::now_v7(),
        monotonic_time: None,
    }
}

fn gauge(name: &str, rid: &str, v: f64) -> Sample {
    Sample {
        name: name.into(),
        kind: SampleType::Gauge,
        unit: "MiB".into(),
        volume: v,
        ..cpu(rid, 0)
    }
}

struct Setup {
    names: Names,
    dir: PathBuf,
    pipeline: PathBuf,
    state: PathBuf,
    conn: Connection,
}

impl Setup {
    async fn new(tag: &str, pipeline_text: &str) -> Self {
        let names = Names::new(tag);
        let dir = names.dir("state-e2e");
        let pipeline = dir.join("pipeline.yaml");
        std::fs::write(&pipeline, pipeline_text).unwrap();
        Setup {
            state: dir.join("state/notification-state.json"),
            names,
            pipeline,
            dir,
            conn: broker::connect().await,
        }
    }

    /// An instance and the address of its `/metrics`.
    fn start(&self, name: &'static str) -> (Service, String) {
        self.start_with_state(name, &self.state)
    }

    /// An instance with its own state file (a standby on another host has its own).
    fn start_with_state(&self, name: &'static str, state: &Path) -> (Service, String) {
        let http = listen_addr();
        let mut env = self.names.env(SECRET);
        env.push((
            "VMETER_PIPELINE__FILE".into(),
            self.pipeline.display().to_string(),
        ));
        env.push((
            "VMETER_PIPELINE__STATE_FILE".into(),
            state.display().to_string(),
        ));
        env.push(("VMETER_PIPELINE__RELOAD_CHECK_SECS".into(), "1".into()));
        env.push(("VMETER_HTTP__LISTEN".into(), http.clone()));
        (
            Service::start(name, "notification", &[], &env, &self.dir),
            http,
        )
    }

    async fn publish(&self, samples: &[Sample]) {
        broker::publish(&self.conn, &self.names, "sample.raw", samples, SECRET).await;
    }

    /// Outputs until `want` arrived or nothing came for 3 s.
    async fn outputs(&self, want: usize) -> Vec<Sample> {
        broker::take(
            &self.conn,
            &self.names.processed_queue,
            want,
            Duration::from_secs(3),
            Duration::from_secs(30),
        )
        .await
    }

    async fn finish(self) {
        broker::cleanup(&self.conn, &self.names).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until the counter `series` on `http`'s `/metrics` reaches `at_least` (what the
/// process did, not how it worded its log).
async fn wait_metric(s: &Service, http: &str, series: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Not listening yet: the process is still starting.
        let m = if tokio::net::TcpStream::connect(http).await.is_ok() {
            vmeter_e2e::http::request(http, "GET", "/metrics", &[], None)
                .await
                .1
        } else {
            String::new()
        };
        if vmeter_core::telemetry::scrape(&m, series) >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached {at_least}\n{m}\n{}",
            s.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn named<'a>(out: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    out.iter().filter(|s| s.name == name).collect()
}

fn exists(p: &Path) -> bool {
    p.try_exists().unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_restart_keeps_state_and_a_crash_does_not() {
    let st = Setup::new("r", CPU_AND_MEMORY).await;
    let (mut n1, _) = st.start("notification-1");
    broker::wait_for_queue(&st.conn, &st.names.raw_queue, Duration::from_secs(30)).await;
    broker::wait_for_consumer(&st.conn, &st.names.raw_queue, Duration::from_secs(30)).await;

    st.publish(&[cpu("vm-a", 0), gauge("memory", "vm-a", 512.0)])
        .await;
    let out = st.outputs(1).await;
    assert!(
        out.is_empty(),
        "first cpu sample has no predecessor and the accumulator holds: {out:?}"
    );

    // Planned restart: SIGTERM, the state file appears, a new process restores it.
    n1.stop();
    assert!(
        exists(&st.state),
        "state file written on graceful shutdown:\n{}",
        n1.log_text()
    );
    let (mut n2, n2_http) = st.start("notification-2");
    wait_metric(
        &n2,
        &n2_http,
        "vmeter_notification_state_loads_total{result=\"restored\"}",
        1.0,
    )
    .await;
    assert!(!exists(&st.state), "the state file is consumed at start");

    st.publish(&[cpu("vm-a", 1), gauge("memory", "vm-a", 600.0)])
        .await;
    let out = st.outputs(3).await;
    let util = named(&out, "cpu_util");
    assert_eq!(
        util.len(),
        1,
        "the restart lost no cpu_util point: {out:?}\n{}",
        n2.log_text()
    );
    assert!((util[0].volume - 50.0).abs() < 1e-9, "{:?}", util[0]);
    let mut mem: Vec<f64> = named(&out, "memory").iter().map(|s| s.volume).collect();
    mem.sort_by(f64::total_cmp);
    assert_eq!(
        mem,
        vec![512.0, 600.0],
        "the sample held by the accumulator survived the restart"
    );

    // A crash (SIGKILL) saves nothing: the next process starts without predecessors. Only
    // once n2 acked its input: a delivery in flight would go to n3 again and give it the
    // predecessor (seen once in CI).
    broker::wait_all_acked(&st.names.raw_queue, Duration::from_secs(30)).await;
    n2.child.kill().unwrap();
    n2.child.wait().unwrap();
    assert!(!exists(&st.state));
    let (n3, n3_http) = st.start("notification-3");
    wait_metric(
        &n3,
        &n3_http,
        "vmeter_notification_state_loads_total{result=\"fresh\"}",
        1.0,
    )
    .await;
    st.publish(&[cpu("vm-a", 2)]).await;
    let out = st.outputs(1).await;
    assert!(
        named(&out, "cpu_util").is_empty(),
        "after a crash the first sample per resource has no predecessor: {out:?}"
    );
    st.publish(&[cpu("vm-a", 3)]).await;
    let out = st.outputs(1).await;
    assert_eq!(named(&out, "cpu_util").len(), 1, "{out:?}");
    drop(n3);
    st.finish().await;
}

const RELOAD_V1: &str = r#"
sources:
  - {name: cpu_source, meters: [cpu], sinks: [cpu_sink, delta_sink]}
sinks:
  - name: cpu_sink
    transformers:
      - name: rate_of_change
        parameters:
          target: {name: cpu_util, unit: "%", type: gauge,
                   scale: "100.0 / (10**9 * (resource_metadata.cpu_number or 1))"}
    publishers: [notifier://]
  - name: delta_sink
    transformers:
      - name: delta
        parameters: {target: {name: cpu.delta}}
    publishers: [notifier://]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_keeps_unchanged_sinks_and_refuses_bad_files() {
    let st = Setup::new("h", RELOAD_V1).await;
    let (n, n_http) = st.start("notification");
    broker::wait_for_queue(&st.conn, &st.names.raw_queue, Duration::from_secs(30)).await;
    broker::wait_for_consumer(&st.conn, &st.names.raw_queue, Duration::from_secs(30)).await;

    st.publish(&[cpu("vm-b", 0)]).await;
    st.publish(&[cpu("vm-b", 1)]).await;
    let out = st.outputs(2).await;
    assert_eq!(named(&out, "cpu_util").len(), 1, "{out:?}");
    assert_eq!(named(&out, "cpu.delta").len(), 1, "{out:?}");

    // v2: cpu_sink unchanged, delta_sink changed (new target name, growth_only).
    let v2 = RELOAD_V1.replace(
        "{target: {name: cpu.delta}}",
        "{target: {name: cpu.delta2}, growth_only: true}",
    );
    std::fs::write(&st.pipeline, &v2).unwrap();
    wait_metric(
        &n,
        &n_http,
        "vmeter_notification_reloads_applied_total",
        1.0,
    )
    .await;
    st.publish(&[cpu("vm-b", 2)]).await;
    let out = st.outputs(2).await;
    assert_eq!(
        named(&out, "cpu_util").len(),
        1,
        "cpu_sink kept its predecessors over the reload: {out:?}\n{}",
        n.log_text()
    );
    assert!(
        named(&out, "cpu.delta2").is_empty() && named(&out, "cpu.delta").is_empty(),
        "the changed sink starts fresh (first sample primes it): {out:?}"
    );
    st.publish(&[cpu("vm-b", 3)]).await;
    let out = st.outputs(2).await;
    assert_eq!(named(&out, "cpu.delta2").len(), 1, "{out:?}");

    // A file that does not validate is refused; the running pipeline goes on.
    std::fs::write(
        &st.pipeline,
        v2.replace("name: delta\n", "name: no_such_transformer\n"),
    )
    .unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        std::process::Command::new("kill")
            .args(["-HUP", &n.child.id().to_string()])
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    wait_metric(
        &n,
        &n_http,
        "vmeter_notification_reloads_total{result=\"refused\"}",
        1.0,
    )
    .await;
    assert!(
        n.log_text()
            .contains("No transformer named no_such_transformer"),
        "the refusal names the problem:\n{}",
        n.log_text()
    );
    st.publish(&[cpu("vm-b", 4)]).await;
    let out = st.outputs(2).await;
    assert_eq!(named(&out, "cpu_util").len(), 1, "{out:?}");
    assert_eq!(named(&out, "cpu.delta2").len(), 1, "{out:?}");
    drop(n);
    st.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_standby_takes_over_within_seconds() {
    let st = Setup::new("f", RELOAD_V1).await;
    let (mut active, _) = st.start("notification-active");
    broker::wait_for_queue(&st.conn, &st.names.raw_queue, Duration::from_secs(30)).await;
    broker::wait_for_consumer(&st.conn, &st.names.raw_queue, Duration::from_secs(30)).await;
    // The standby has its own state file: it must not pick up the active one's.
    let (standby, standby_http) =
        st.start_with_state("notification-standby", &st.dir.join("standby-state.json"));
    // The standby's consumer is registered (its broker part turns up once basic.consume
    // is accepted, active or waiting): /health answers 200.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = tokio::net::TcpStream::connect(&standby_http).await.is_ok()
            && vmeter_e2e::http::request(&standby_http, "GET", "/health", &[], None)
                .await
                .0
                == 200;
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "{}", standby.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    st.publish(&[cpu("vm-c", 0)]).await;
    st.publish(&[cpu("vm-c", 1)]).await;
    assert_eq!(named(&st.outputs(2).await, "cpu_util").len(), 1);

    // The active instance dies hard. From then on, publish one sample every 250 ms until
    // a cpu_util comes out: only the standby can have produced it.
    active.child.kill().unwrap();
    active.child.wait().unwrap();
    let killed = Instant::now();
    let mut k = 2;
    let takeover = loop {
        st.publish(&[cpu("vm-c", k)]).await;
        k += 1;
        let out = broker::take(
            &st.conn,
            &st.names.processed_queue,
            1,
            Duration::from_millis(250),
            Duration::from_millis(250),
        )
        .await;
        if !named(&out, "cpu_util").is_empty() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the standby did not take over within 20 s:\n{}",
            standby.log_text()
        );
    };
    println!(
        "failover: standby produced its first cpu_util {:.2} s after the active instance was killed",
        takeover.as_secs_f64()
    );
    assert!(takeover < Duration::from_secs(10), "{takeover:?}");
    drop(standby);
    st.finish().await;
}
