//! The pipeline on a real three-node RabbitMQ cluster (`deploy/cluster.sh`: three nodes on
//! this machine, on their own ports), its queues quorum queues replicated on all three, every
//! service and the load given the three addresses (`broker.url` + `broker.failover_urls`).
//!
//! Under a steady load (the fault tests' generator: `cpu` samples published with confirms,
//! retried on the next node until confirmed) plus the real agent on the demo node, the test
//! `kill -9`s the node that leads the raw queue, brings it back, then kills the node that
//! leads the processed queue (another one if that is the same node). It asserts that every
//! sample published is stored exactly once, that new samples are stored again within a
//! bound while the node is down, and that the agent's `cpu_util` keeps arriving. It prints
//! a table: fault → samples published/stored/duplicated, longest stall, recovery.
//!
//! It starts the cluster itself when it is not running (about 20 s) and leaves it running
//! (`deploy/test.sh` stops it after the suite unless it was up before); it restarts the
//! nodes it killed, also when it fails.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use vmeter_e2e::load::{Generator, stored};
use vmeter_e2e::{Names, Service, create_database, drop_database, listen_addr, repo_root, vhost};

const SECRET: &str = "cluster-secret";

/// `deploy/cluster.sh <args>`; its standard output.
fn cluster(args: &[&str]) -> String {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("deploy/cluster.sh"))
        .args(args)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "deploy/cluster.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn host() -> String {
    let out = std::process::Command::new("hostname")
        .arg("-s")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Node `n` (1–3) as RabbitMQ names it.
fn node(n: usize) -> String {
    format!("vmeter-c{n}@{}", host())
}

/// The node (1–3) that leads quorum queue `queue`, asked of node `ask`.
fn leader(queue: &str, ask: usize) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", &node(ask), "list_queues", "-p", &vhost()])
        .args(["name", "leader", "--formatter", "json"])
        .output()
        .expect("rabbitmqctl");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("list_queues: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let leader = rows
        .iter()
        .find(|r| r["name"] == queue)
        .and_then(|r| r["leader"].as_str())
        .unwrap_or_else(|| panic!("{queue} not on the cluster: {rows:?}"))
        .to_string();
    (1..=3)
        .find(|&n| node(n) == leader)
        .unwrap_or_else(|| panic!("leader {leader} is not a cluster node"))
}

/// Which of our services hold connections to node `n` (by connection name: the services
/// name theirs `vmeter-<service>`; the load generator's has none), asked of node `ask`.
fn connected_to(n: usize, ask: usize) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", &node(ask), "list_connections"])
        .args(["name", "client_properties", "--formatter", "json"])
        .output()
        .expect("rabbitmqctl");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let port = format!(":{}", 5680 + n);
    let mut names: Vec<String> = rows
        .iter()
        .filter(|r| r["name"].as_str().is_some_and(|s| s.ends_with(&port)))
        // client_properties: [[key, type, value], …]
        .filter_map(|r| {
            r["client_properties"]
                .as_array()?
                .iter()
                .find_map(|p| (p[0] == "connection_name").then(|| p[2].as_str())?)
        })
        .filter_map(|s| s.strip_prefix("vmeter-"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Starts every node that is down when dropped: the next tests (and runs) need all three.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(repo_root().join("deploy/cluster.sh"))
            .arg("start")
            .output();
    }
}

struct Row {
    fault: String,
    published: i64,
    stored: i64,
    duplicated: i64,
    longest_stall_s: f64,
    recovery_s: f64,
}

/// Watches storage from a fault on: the longest time without a new sample stored, until
/// every sample of the first `ticks` ticks is there.
async fn watch(
    pool: &sqlx::PgPool,
    t0: DateTime<Utc>,
    ticks: u64,
    resources: usize,
    fault: String,
    services: &[&Service],
) -> Row {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let expected = (ticks * resources as u64) as i64;
    let mut last_count = -1i64;
    let mut last_progress = Instant::now();
    let mut longest = Duration::ZERO;
    loop {
        // Everything stored so far (not only the first ticks): is the pipeline moving?
        let now_count = stored(pool, t0, 1_000_000)
            .await
            .map(|(n, _)| n)
            .unwrap_or(last_count);
        if now_count > last_count {
            longest = longest.max(last_progress.elapsed());
            last_progress = Instant::now();
            last_count = now_count;
        }
        if let Some((n, distinct)) = stored(pool, t0, ticks).await
            && distinct >= expected
        {
            return Row {
                fault,
                published: expected,
                stored: distinct,
                duplicated: n - distinct,
                longest_stall_s: longest.max(last_progress.elapsed()).as_secs_f64(),
                recovery_s: started.elapsed().as_secs_f64(),
            };
        }
        assert!(
            Instant::now() < deadline,
            "{fault}: storage never caught up with {expected} samples\n{}",
            services
                .iter()
                .map(|s| s.log_text())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent's `cpu_util` rows stored so far (the demo node's VMs); 0 before the collector
/// made its tables.
async fn agent_points(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from samples where meter = 'cpu_util' and resource_id not like 'fault-%'",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

async fn agent_points_grow(pool: &sqlx::PgPool, what: &str) {
    let before = agent_points(pool).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent_points(pool).await <= before {
        assert!(
            Instant::now() < deadline,
            "{what}: no new cpu_util from the agent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_cluster_node_loses_and_duplicates_nothing() {
    let _restore = Restore;
    cluster(&["start"]);
    let urls: Vec<String> = cluster(&["urls", "ADMIN"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(urls.len(), 3);
    let names = Names::on_brokers("cl", urls);
    let logs = names.dir("cluster");
    let admin = create_database(&names).await;

    let mut collector_env = names.env(SECRET);
    collector_env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    collector_env.push(("VMETER_HTTP__LISTEN".into(), listen_addr()));
    collector_env.push(("VMETER_DATABASE__BATCH_MAX_WAIT_MS".into(), "100".into()));
    // A dead node's connections are noticed at once (the socket closes); a node that hangs
    // is bounded by the handshake limit.
    collector_env.push(("VMETER_BROKER__RECONNECT_MAX_SECS".into(), "2".into()));
    let collector = Service::start("collector", "collector", &[], &collector_env, &logs);
    let mut notification_env = names.env(SECRET);
    notification_env.push((
        "VMETER_PIPELINE__FILE".into(),
        repo_root().join("pipeline.yaml").display().to_string(),
    ));
    notification_env.push((
        "VMETER_PIPELINE__STATE_FILE".into(),
        logs.join("state.json").display().to_string(),
    ));
    notification_env.push(("VMETER_HTTP__LISTEN".into(), listen_addr()));
    notification_env.push(("VMETER_BROKER__RECONNECT_MAX_SECS".into(), "2".into()));
    let notification = Service::start(
        "notification",
        "notification",
        &[],
        &notification_env,
        &logs,
    );
    let mut agent_env = names.agent_env(SECRET, &logs.join("agent-spool"), &listen_addr());
    agent_env.push(("VMETER_BROKER__RECONNECT_MAX_SECS".into(), "2".into()));
    let agent = Service::start("agent", "agent-compute", &[], &agent_env, &logs);
    let services = [&collector, &notification, &agent];

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&names.db_url())
        .await
        .unwrap();
    // The services declare the queues; wait for them (and the agent's first cpu_util).
    agent_points_grow(&pool, "start").await;

    // Sample time 100× the wall clock (a tick of 10 s every 100 ms), far enough back that
    // the last tick is before now.
    let resources = 100;
    let now_s = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let t0 = now_s - chrono::Duration::seconds(600 * 100);
    let load = Generator::start(&names, SECRET, resources, Duration::from_millis(100), t0);
    let mut rows = Vec::new();
    rows.push(watch(&pool, t0, 20, resources, "steady load".into(), &services).await);

    // 1. kill -9 of the raw queue's leader; 2. of the node most of the services are
    // connected to (after the first fault they have moved). Each node comes back before the
    // next fault. The table says what each victim held.
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let victim = if round == 1 {
            leader(&names.raw_queue, 1)
        } else {
            (1..=3)
                .max_by_key(|&n| connected_to(n, 1).len())
                .expect("three nodes")
        };
        let mut held = connected_to(victim, victim);
        assert!(
            round == 1 || !held.is_empty(),
            "no service is connected to any node: {:?}",
            (1..=3).map(|n| connected_to(n, 1)).collect::<Vec<_>>()
        );
        if leader(&names.raw_queue, victim) == victim {
            held.push("raw leader".into());
        }
        if leader(&names.processed_queue, victim) == victim {
            held.push("processed leader".into());
        }
        cluster(&["kill", &victim.to_string()]);
        let fault = format!("kill -9 node {victim}: {}", held.join(", "));
        // While it is down: everything published so far and 3 s more must be stored.
        let ticks = load.ticks() + 30;
        rows.push(watch(&pool, t0, ticks, resources, fault.clone(), &services).await);
        agent_points_grow(&pool, &fault).await;
        let other = victim % 3 + 1;
        let now_leading = leader(&names.raw_queue, other);
        assert_ne!(
            now_leading, victim,
            "{fault}: the raw queue has no new leader"
        );
        cluster(&["start-node", &victim.to_string()]);
        let back = format!("node {victim} back");
        let ticks = load.ticks() + 30;
        rows.push(watch(&pool, t0, ticks, resources, back.clone(), &services).await);
        agent_points_grow(&pool, &back).await;
    }

    let ticks = load.finish().await;
    let last = watch(&pool, t0, ticks, resources, "end".into(), &services).await;
    let (n, distinct) = stored(&pool, t0, ticks + 1).await.unwrap();
    rows.push(last);

    println!(
        "\n{:<64} {:>10} {:>10} {:>10} {:>14} {:>11}",
        "fault", "published", "stored", "duplicated", "longest stall", "recovery"
    );
    for r in &rows {
        println!(
            "{:<64} {:>10} {:>10} {:>10} {:>12.1} s {:>9.1} s",
            r.fault, r.published, r.stored, r.duplicated, r.longest_stall_s, r.recovery_s
        );
    }
    println!(
        "load: {resources} samples every 100 ms over {ticks} ticks; the agent's cpu_util rows: {}",
        agent_points(&pool).await
    );
    for r in &rows {
        assert_eq!(r.duplicated, 0, "{}: duplicated samples", r.fault);
        assert_eq!(r.stored, r.published, "{}", r.fault);
    }
    assert_eq!(n, distinct, "duplicated samples at the end");
    assert_eq!(distinct, ticks as i64 * resources as i64, "samples lost");
    let stalls = rows.iter().map(|r| r.longest_stall_s).fold(0.0, f64::max);
    assert!(
        stalls < 60.0,
        "storage stalled for {stalls:.1} s while a node was down"
    );

    pool.close().await;
    drop((collector, notification, agent));
    drop_database(&admin, &names).await;
}
