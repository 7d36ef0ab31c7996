//! Crashes aimed from inside, where no outside `kill -9` can reliably land, with fail points
//! (the `fail` crate, compiled in by the README's test command through the services'
//! `failpoints` feature, set per process with `FAILPOINTS`):
//!
//! - the collector dies between its commit and its ack: the redelivery is stored once;
//! - the notification service dies between its outputs' confirm and its input's ack: the
//!   outputs come again and are stored once, no `cpu_util` point is lost;
//! - the agent dies in the middle of writing a spool file: the next start removes the half
//!   file and sends every complete batch;
//! - the agent's spool cannot be written (a full disk): the batches are counted as dropped,
//!   the agent keeps polling and answering.
//!
//! A binary built without the feature does not die where told: the tests fail saying so.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use vmeter_core::telemetry::scrape;
use vmeter_e2e::http::request;
use vmeter_e2e::{
    Names, Service, broker, cpu_util_sample, create_database, drop_database, free_port,
    listen_addr, repo_root,
};

const SECRET: &str = "failpoint-secret";
const NOT_BUILT: &str = "the binary did not stop at its fail point: build with the services' `failpoints` feature (deploy/test.sh does)";

/// Waits for the process to end by itself (a fail point's abort); its status.
fn ended(s: &mut Service, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(st)) = s.child.try_wait() {
            return st;
        }
        assert!(Instant::now() < deadline, "{NOT_BUILT}\n{}", s.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn aborted(st: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    st.signal() == Some(6)
}

async fn count(pool: &sqlx::PgPool, meter: &str) -> i64 {
    sqlx::query_scalar("select count(*) from samples where meter = $1")
        .bind(meter)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_count(pool: &sqlx::PgPool, meter: &str, want: i64, diag: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = count(pool, meter).await;
        if n >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{meter}: {n} of {want} stored\n{}",
            diag()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn collector_env(names: &Names, http: &str) -> Vec<(String, String)> {
    let mut env = names.env(SECRET);
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), http.to_string()));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_dies_between_commit_and_ack() {
    let names = Names::new("fpc");
    let logs = names.dir("fp");
    let admin = create_database(&names).await;
    let http = listen_addr();
    let mut env = collector_env(&names, &http);
    env.push(("VMETER_DATABASE__BATCH_MAX_MESSAGES".into(), "1".into()));
    let mut crashing = env.clone();
    crashing.push(("FAILPOINTS".into(), "collector-before-ack=return".into()));
    let mut collector = Service::start("collector-crash", "collector", &[], &crashing, &logs);
    let conn = broker::connect().await;
    broker::wait_for_consumer(&conn, &names.processed_queue, Duration::from_secs(30)).await;
    let t0 = chrono::Utc::now() - chrono::Duration::hours(1);
    for m in 0..5 {
        let batch: Vec<_> = (0..10)
            .map(|k| cpu_util_sample("fp-vm", 1.0, t0 + chrono::Duration::seconds(m * 10 + k)))
            .collect();
        broker::publish(&conn, &names, "sample.processed", &batch, SECRET).await;
    }
    let st = ended(&mut collector, Duration::from_secs(30));
    assert!(aborted(st), "{st:?}\n{}", collector.log_text());
    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let committed = count(&pool, "cpu_util").await;
    assert!(
        committed >= 10,
        "the first batch was committed before the crash ({committed})"
    );

    let collector = Service::start("collector", "collector", &[], &env, &logs);
    wait_count(&pool, "cpu_util", 50, &|| collector.log_text()).await;
    // Everything committed before the crash came again (nothing was acked) and was ignored.
    let (_, metrics) = request(&http, "GET", "/metrics", &[], None).await;
    assert_eq!(
        scrape(&metrics, "vmeter_collector_duplicates_total"),
        committed as f64,
        "{metrics}"
    );
    assert_eq!(count(&pool, "cpu_util").await, 50);
    let left = broker::take(
        &conn,
        &names.processed_queue,
        1,
        Duration::from_secs(1),
        Duration::from_secs(3),
    )
    .await;
    assert!(left.is_empty(), "messages left unacked");

    pool.close().await;
    drop(collector);
    broker::cleanup(&conn, &names).await;
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_dies_between_confirm_and_ack() {
    let names = Names::new("fpn");
    let logs = names.dir("fp");
    let admin = create_database(&names).await;
    let http = listen_addr();
    let collector = Service::start(
        "collector",
        "collector",
        &[],
        &collector_env(&names, &http),
        &logs,
    );
    let mut env = names.env(SECRET);
    env.push((
        "VMETER_PIPELINE__FILE".into(),
        repo_root().join("pipeline.yaml").display().to_string(),
    ));
    env.push(("VMETER_PIPELINE__STATE_FILE".into(), "\"\"".into()));
    env.push(("VMETER_HTTP__LISTEN".into(), listen_addr()));
    let mut crashing = env.clone();
    crashing.push(("FAILPOINTS".into(), "notification-before-ack=return".into()));
    let conn = broker::connect().await;
    broker::wait_for_queue(&conn, &names.processed_queue, Duration::from_secs(30)).await;
    // Three cycles of five VMs' cpu time, 50 % of one vCPU, published before the service
    // starts: its first chunk holds all three.
    let t0 = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut notification =
        Service::start("notification-crash", "notification", &[], &crashing, &logs);
    // Consumed, hence bound: a queue that merely exists may not be bound yet, and the
    // mandatory publishes below would come back unroutable.
    broker::wait_for_consumer(&conn, &names.raw_queue, Duration::from_secs(30)).await;
    for tick in 0..3i64 {
        let batch: Vec<_> = (0..5)
            .map(|r| {
                let mut s = cpu_util_sample(
                    &format!("fpn-vm-{r}"),
                    tick as f64 * 5e9,
                    t0 + chrono::Duration::seconds(tick * 10),
                );
                s.name = "cpu".into();
                s.kind = vmeter_core::SampleType::Cumulative;
                s.unit = "ns".into();
                let mut md = vmeter_core::Metadata::new();
                md.insert("cpu_number".into(), 1.into());
                s.resource_metadata = std::sync::Arc::new(md);
                s
            })
            .collect();
        broker::publish(&conn, &names, "sample.raw", &batch, SECRET).await;
    }
    let st = ended(&mut notification, Duration::from_secs(30));
    assert!(aborted(st), "{st:?}\n{}", notification.log_text());

    let notification = Service::start("notification", "notification", &[], &env, &logs);
    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let diag = || format!("{}\n{}", collector.log_text(), notification.log_text());
    wait_count(&pool, "cpu", 15, &diag).await;
    wait_count(&pool, "cpu_util", 10, &diag).await;
    // The redelivered inputs' outputs came twice and were stored once; no point lost.
    let (_, metrics) = request(&http, "GET", "/metrics", &[], None).await;
    assert!(
        scrape(&metrics, "vmeter_collector_duplicates_total") >= 5.0,
        "{metrics}"
    );
    assert_eq!(count(&pool, "cpu").await, 15);
    assert_eq!(count(&pool, "cpu_util").await, 10);
    let util: Vec<f64> = sqlx::query_scalar("select volume from samples where meter = 'cpu_util'")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(util.iter().all(|v| (v - 50.0).abs() < 1e-9), "{util:?}");

    pool.close().await;
    drop(notification);
    drop(collector);
    broker::cleanup(&conn, &names).await;
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}

fn spool_files(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == ext));
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dies_mid_spool_write_and_survives_a_full_disk() {
    let names = Names::new("fpa");
    let logs = names.dir("fp");
    let spool = logs.join("spool");
    std::fs::create_dir_all(&logs).unwrap();
    let http = listen_addr();
    let env = |broker_url: &str, failpoints: Option<&str>| {
        let mut env = names.agent_env(SECRET, &spool, &http);
        env.retain(|(k, _)| k != "VMETER_BROKER__URL");
        env.push(("VMETER_BROKER__URL".into(), broker_url.to_string()));
        if let Some(f) = failpoints {
            env.push(("FAILPOINTS".into(), f.to_string()));
        }
        env
    };
    // No broker listens there: every batch goes to the spool; the third write dies halfway.
    let nowhere = format!("amqp://u:p@127.0.0.1:{}/%2fvmeter", free_port());
    let mut agent = Service::start(
        "agent-crash",
        "agent-compute",
        &[],
        &env(&nowhere, Some("agent-spool-mid-write=2*off->return")),
        &logs,
    );
    let st = ended(&mut agent, Duration::from_secs(60));
    assert!(aborted(st), "{st:?}\n{}", agent.log_text());
    let complete = spool_files(&spool, "batch");
    assert_eq!(complete.len(), 2, "two whole batches before the crash");
    let half = spool_files(&spool, "tmp");
    assert_eq!(half.len(), 1, "the crash left half a file");
    let mut spooled = std::collections::HashSet::new();
    for f in &complete {
        for s in vmeter_core::wire::decode(&std::fs::read(f).unwrap(), None).unwrap() {
            spooled.insert(s.message_id);
        }
    }

    // Restart with the broker: the half file is gone, the whole ones are sent.
    let conn = broker::connect().await;
    let agent = Service::start(
        "agent",
        "agent-compute",
        &[],
        &env(&vmeter_e2e::amqp_url(), None),
        &logs,
    );
    broker::wait_for_queue(&conn, &names.raw_queue, Duration::from_secs(30)).await;
    let mut got = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !spooled.is_subset(&got) && Instant::now() < deadline {
        for s in broker::take(
            &conn,
            &names.raw_queue,
            usize::MAX,
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .await
        {
            got.insert(s.message_id);
        }
    }
    assert!(
        spooled.is_subset(&got),
        "every complete spooled batch was sent\n{}",
        agent.log_text()
    );
    assert!(!half[0].exists(), "the half-written file was removed");
    drop(agent);

    // A full disk: the spool cannot be written; batches are counted as dropped and the
    // agent goes on polling and answering.
    let agent = Service::start(
        "agent-disk-full",
        "agent-compute",
        &[],
        &env(&nowhere, Some("agent-spool-write-error=return")),
        &logs,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(&http).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the agent's HTTP endpoint never came up\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dropped = loop {
        let (_, metrics) = request(&http, "GET", "/metrics", &[], None).await;
        let n = scrape(
            &metrics,
            "vmeter_samples_dropped_total{service=\"agent-compute\",reason=\"spool_write_error\"}",
        );
        let cycles = scrape(&metrics, "vmeter_agent_cycles_total");
        if n > 0.0 && cycles >= 3.0 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no spool_write_error drops counted\n{metrics}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(dropped > 0.0);
    assert!(spool_files(&spool, "batch").is_empty() && spool_files(&spool, "tmp").is_empty());
    let (code, _) = vmeter_e2e::http::get_json(&http, "/health", None).await;
    assert!(code == 200 || code == 503, "the agent answers /health");
    drop(agent);
    broker::cleanup(&conn, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}
