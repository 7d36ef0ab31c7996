//! The whole pipeline as real processes: agent-compute (libvirt test driver, demo node) →
//! RabbitMQ → notification (the repository's pipeline.yaml) → RabbitMQ → collector →
//! PostgreSQL, plus the HTTP API.
//!
//! What the test driver implies: its CPU time is the host's wall clock in ns, for every
//! domain, so the cumulative `cpu` counter advances 1e9 ns per second and
//! `cpu_util = 100 / vcpus %`. Tolerance: ±2 % relative. The agent reads libvirt's counter
//! and its own monotonic clock a few microseconds apart; with a 2 s interval even a 20 ms
//! scheduling hiccup between the two reads is 1 %, and the wall and monotonic clocks can
//! differ in rate by at most NTP's 500 ppm slew (0.05 %). A wrong formula (no vCPU
//! normalisation, wall vs monotonic mix-up, ms vs ns) is off by 2× or more and fails.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use sqlx::Row;
use vmeter_core::{Sample, SampleType};
use vmeter_e2e::http::get_json;
use vmeter_e2e::{Names, Service, broker, create_database, drop_database, listen_addr, repo_root};

const SECRET: &str = "e2e-shared-secret";

fn forged_sample(rid: &str) -> Sample {
    Sample {
        name: "cpu".into(),
        kind: SampleType::Cumulative,
        unit: "ns".into(),
        volume: 1.0,
        user_id: None,
        project_id: Some("attacker".into()),
        resource_id: rid.into(),
        timestamp: chrono::Utc::now(),
        resource_metadata: Default::default(),
        source: "openstack".into(),
        message_id: uuid::Uuid::now_v7(),
        monotonic_time: None,
    }
}

async fn count(pool: &sqlx::PgPool, sql: &'static str, arg: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(arg)
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_util_reaches_postgres_and_forged_messages_are_dead_lettered() {
    let names = Names::new("p");
    let logs = names.dir("e2e");

    // Fresh database for this run.
    let admin = create_database(&names).await;

    let mut env = names.env(SECRET);
    let node = repo_root().join("deploy/demo-node.xml");
    let collector_addr = listen_addr();
    let common = env.clone();
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), collector_addr.clone()));
    let collector = Service::start("collector", "collector", &[], &env, &logs);

    let mut env = common.clone();
    env.push((
        "VMETER_PIPELINE__FILE".into(),
        repo_root().join("pipeline.yaml").display().to_string(),
    ));
    env.push(("VMETER_HTTP__LISTEN".into(), listen_addr()));
    let notification = Service::start("notification", "notification", &[], &env, &logs);

    let mut env = common.clone();
    env.push((
        "VMETER_LIBVIRT__URI".into(),
        format!("test://{}", node.display()),
    ));
    env.push(("VMETER_POLLING__INTERVAL_SECS".into(), "2".into()));
    env.push(("VMETER_POLLING__SHUFFLE_TIME_SECS".into(), "0".into()));
    env.push((
        "VMETER_SPOOL__DIR".into(),
        logs.join("agent-spool").display().to_string(),
    ));
    env.push(("VMETER_HTTP__LISTEN".into(), listen_addr()));
    let agent = Service::start("agent", "agent-compute", &[], &env, &logs);
    let started = Instant::now();

    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let diag = |msg: &str| {
        format!(
            "{msg}\n--- collector:\n{}\n--- notification:\n{}\n--- agent:\n{}",
            collector.log_text(),
            notification.log_text(),
            agent.log_text()
        )
    };

    // Wait until every demo VM has at least 3 cpu_util points.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = sqlx::query("select resource_id, count(*) as n from samples where meter = 'cpu_util' group by resource_id").fetch_all(&pool).await.unwrap_or_default();
        if rows.len() == 4 && rows.iter().all(|r| r.get::<i64, _>("n") >= 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            diag(&format!(
                "cpu_util rows did not appear in time: {} resources",
                rows.len()
            ))
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every cpu_util value is 100 / vcpus within the tolerance justified above.
    let rows = sqlx::query("select resource_id, volume, (resource_metadata->>'cpu_number')::int as vcpus, unit, type from samples where meter = 'cpu_util'").fetch_all(&pool).await.unwrap();
    let mut per_vm: HashMap<String, (i32, usize)> = HashMap::new();
    for r in &rows {
        let (rid, v, vcpus): (String, f64, i32) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(
            (
                r.get::<String, _>(3).as_str(),
                r.get::<String, _>(4).as_str()
            ),
            ("%", "gauge")
        );
        let expected = 100.0 / vcpus as f64;
        assert!(
            (v - expected).abs() <= 0.02 * expected,
            "cpu_util of {rid} = {v}, expected {expected} ± 2 %"
        );
        per_vm.entry(rid).or_insert((vcpus, 0)).1 += 1;
    }
    let mut vcpu_counts: Vec<i32> = per_vm.values().map(|v| v.0).collect();
    vcpu_counts.sort();
    assert_eq!(
        vcpu_counts,
        vec![1, 2, 2, 4],
        "the demo node's four VMs, with 1, 2, 4 and 2 vCPUs"
    );

    // Raw meters flowed through the pass-through sink, and the rate sinks produced rates.
    for meter in [
        "cpu",
        "vcpus",
        "memory",
        "disk.device.read.bytes",
        "network.incoming.bytes",
        "disk.device.read.bytes.rate",
        "network.incoming.bytes.rate",
        "cpu.delta",
    ] {
        assert!(
            count(
                &pool,
                "select count(*) from samples where meter = $1",
                meter
            )
            .await
                > 0,
            "{}",
            diag(&format!("no {meter} rows"))
        );
    }

    // The API answers with the same data.
    let addr = collector_addr.clone();
    let (code, json) = get_json(&addr, "/v2/meters/cpu_util?limit=5", None).await;
    assert_eq!(code, 200, "{json}");
    let arr = json.as_array().expect("a JSON list");
    assert_eq!(arr.len(), 5);
    assert_eq!(arr[0]["counter_name"], "cpu_util");
    assert!(arr[0]["counter_volume"].as_f64().unwrap() > 0.0);

    // A forged message (wrong secret) goes to the dead-letter queue, never to the database.
    let conn = broker::connect().await;
    let forged_rid = format!("forged-{}", names.id);
    broker::publish(
        &conn,
        &names,
        "sample.raw",
        &[forged_sample(&forged_rid)],
        "not-the-secret",
    )
    .await;
    let ch = conn.create_channel().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        if let Some(m) = ch
            .basic_get(
                names.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            diag("forged message did not reach the dead-letter queue")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = dead
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-vmeter-dead-reason").cloned());
    assert_eq!(
        reason,
        Some(AMQPValue::LongString("signature_mismatch".into()))
    );
    let n_before = count(
        &pool,
        "select count(*) from samples where meter = $1",
        "cpu_util",
    )
    .await;

    // Idempotent storage: the same processed batch twice stores its samples once.
    let dup_rid = format!("dup-{}", names.id);
    let mut dup = vec![forged_sample(&dup_rid), forged_sample(&dup_rid)];
    dup[0].name = "e2e.gauge".into();
    dup[0].kind = SampleType::Gauge;
    dup[1].name = "e2e.gauge".into();
    dup[1].kind = SampleType::Gauge;
    dup[1].timestamp += chrono::Duration::seconds(1);
    broker::publish(&conn, &names, "sample.processed", &dup, SECRET).await;
    broker::publish(&conn, &names, "sample.processed", &dup, SECRET).await;

    // Let more cycles flow, so that the forged message would have been processed by now.
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(
        &pool,
        "select count(*) from samples where meter = $1",
        "cpu_util",
    )
    .await
        < n_before + 8
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            diag("pipeline stalled after the forged message")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        count(
            &pool,
            "select count(*) from samples where resource_id = $1",
            &forged_rid
        )
        .await,
        0,
        "forged sample reached the database"
    );
    assert_eq!(
        count(
            &pool,
            "select count(*) from samples where resource_id = $1",
            &dup_rid
        )
        .await,
        2,
        "a redelivered batch must not duplicate rows"
    );

    // Throughput of this run (informational; the pipeline is paced by the agent interval).
    let total: i64 = sqlx::query_scalar("select count(*) from sample")
        .fetch_one(&pool)
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "e2e: {total} samples stored end to end in {secs:.1} s = {:.0} samples/s (agent interval 2 s, 4 demo VMs)",
        total as f64 / secs
    );

    // Clean shutdown, then remove this run's broker objects and database.
    drop(agent);
    drop(notification);
    drop(collector);
    broker::cleanup(&conn, &names).await;
    pool.close().await;
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}
