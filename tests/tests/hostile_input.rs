//! Hostile input against the real binaries over real RabbitMQ and PostgreSQL: what a tenant
//! can post, what a forged or poisoned batch does to the collector and the notification
//! service. Each case here once stopped storage, killed a service, panicked a handler or let
//! one project write into another's data (issue 14); now each must be refused cleanly,
//! isolated to the offending sample, and counted, while every good sample is stored.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmeter_core::telemetry::scrape;
use vmeter_e2e::http::{get_json, request};
use vmeter_e2e::{
    Names, Service, broker, cpu_util_sample, create_database, drop_database, listen_addr, repo_root,
};

const SECRET: &str = "hostile-secret";
const ADMIN: &str = "hostile-admin-token";
const P1: &str = "hostile-project-1-token";
const P2: &str = "hostile-project-2-token";

/// A collector on a fresh database, with `extra` environment; waits for its API.
async fn start_collector(
    names: &Names,
    extra: &[(String, String)],
) -> (sqlx::PgPool, String, Service, std::path::PathBuf) {
    let logs = names.dir("hostile");
    let admin = create_database(names).await;
    let addr = listen_addr();
    let mut env = names.env(SECRET);
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));
    env.extend_from_slice(extra);
    let collector = Service::start("collector", "collector", &[], &env, &logs);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "API never came up:\n{}",
            collector.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (admin, addr, collector, logs)
}

async fn post(addr: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (code, text) = request(addr, "POST", path, &[("Authorization", &auth)], Some(body)).await;
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn faultstring(v: &Value) -> String {
    v["error_message"]["faultstring"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn now_iso(offset_secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(offset_secs))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string()
}

fn posted(rid: &str, project: Option<&str>, ts: &str, md: Value) -> Value {
    let mut s = json!({
        "counter_name": "cpu_util", "counter_type": "gauge", "counter_unit": "%",
        "counter_volume": 12.5, "resource_id": rid, "user_id": "u1",
        "timestamp": ts, "resource_metadata": md,
    });
    if let Some(p) = project {
        s["project_id"] = json!(p);
    }
    s
}

fn random_hex(n: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).unwrap()
        })
        .collect()
}

/// Whether the service process is still running.
fn alive(s: &mut Service) -> bool {
    matches!(s.child.try_wait(), Ok(None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_hostile_posts_and_queries_and_keeps_tenants_apart() {
    let names = Names::new("h");
    let env = [
        ("VMETER_HTTP__ADMIN_TOKENS".into(), format!("[{ADMIN}]")),
        (
            "VMETER_HTTP__PROJECT_TOKENS".into(),
            format!("{{{P1}: project-1, {P2}: project-2}}"),
        ),
        // The default window, whatever the shared test environment says.
        ("VMETER_CONTRACT__MAX_AGE_DAYS".into(), "90".into()),
    ];
    let (admin, addr, mut collector, logs) = start_collector(&names, &env).await;
    let direct = "/v2/meters/cpu_util?direct=true";
    let one = |s: Value| json!([s]).to_string();

    // --- The sample contract at the API door: each is a 400 naming the rule.
    let ts = now_iso(0);
    let long_id = random_hex(4000);
    let mut deep_key = vec!["a"; 10_000].join(".");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "4,000-character resource_id",
            one(posted(&long_id, None, &ts, json!({}))),
            "resource_id",
        ),
        (
            "NUL in resource_id",
            one(posted("a\u{0}b", None, &ts, json!({}))),
            "control character",
        ),
        (
            "year 10000",
            one(posted("vm-x", None, "+10000-01-01T00:00:00", json!({}))),
            "timestamp",
        ),
        (
            "far past",
            one(posted("vm-x", None, "2001-01-01T00:00:00", json!({}))),
            "older",
        ),
        (
            "one hour ahead",
            one(posted("vm-x", None, &now_iso(3600), json!({}))),
            "future",
        ),
        (
            "10,000 dotted key parts",
            one(posted("vm-x", None, &ts, json!({ deep_key.clone(): 1 }))),
            "dotted",
        ),
        (
            "200 dotted key parts",
            one(posted(
                "vm-x",
                None,
                &ts,
                json!({ vec!["b"; 200].join("."): 1 }),
            )),
            "dotted",
        ),
        (
            "nested 20 deep",
            one(posted(
                "vm-x",
                None,
                &ts,
                (0..20).fold(json!(1), |v, _| json!({"n": v})),
            )),
            "deeper",
        ),
        (
            "NUL in metadata",
            one(posted("vm-x", None, &ts, json!({"k": "a\u{0}"}))),
            "NUL",
        ),
        (
            "100 kB of metadata",
            one(posted("vm-x", None, &ts, json!({"k": "x".repeat(100_000)}))),
            "larger",
        ),
    ];
    for (what, body, says) in &cases {
        for path in [direct, "/v2/meters/cpu_util"] {
            let (code, v) = post(&addr, path, ADMIN, body).await;
            assert_eq!(code, 400, "{what} via {path}: {v}");
            assert!(
                faultstring(&v).contains(says),
                "{what}: the error should name the rule ({says}): {v}"
            );
        }
    }
    let nan = json!([{"counter_name": "cpu_util", "counter_type": "gauge", "counter_unit": "%",
        "counter_volume": "NaN", "resource_id": "vm-x", "timestamp": ts}]);
    assert_eq!(post(&addr, direct, ADMIN, &nan.to_string()).await.0, 400);
    deep_key.clear();
    assert!(
        alive(&mut collector),
        "the collector died:\n{}",
        collector.log_text()
    );

    // --- Tenants: project-1 owns vm-a; project-2 can neither take it nor read it.
    let (code, v) = post(
        &addr,
        direct,
        P1,
        &one(posted("vm-a", None, &ts, json!({"owner": "p1"}))),
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let (code, v) = post(
        &addr,
        direct,
        P2,
        &one(posted("vm-b", None, &ts, json!({}))),
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let later = now_iso(300);
    for (what, body, want) in [
        (
            "into another project's resource",
            one(posted("vm-a", None, &later, json!({}))),
            403,
        ),
        (
            "naming the other project",
            one(posted("vm-a", Some("project-1"), &later, json!({}))),
            400,
        ),
        (
            "naming the other project for a new resource",
            one(posted("vm-new", Some("project-1"), &later, json!({}))),
            400,
        ),
        (
            "pinned in the future",
            one(posted("vm-a", None, "2100-01-01T00:00:00", json!({}))),
            400,
        ),
    ] {
        for path in [direct, "/v2/meters/cpu_util"] {
            let (code, v) = post(&addr, path, P2, &body).await;
            assert_eq!(code, want, "project-2 posting {what} via {path}: {v}");
        }
    }
    // What each project reads, through every endpoint.
    for (token, mine, theirs) in [(P1, "vm-a", "vm-b"), (P2, "vm-b", "vm-a")] {
        let (code, samples) = get_json(&addr, "/v2/meters/cpu_util", Some(token)).await;
        assert_eq!(code, 200);
        // One sample by its id: its own project's, never the other's.
        let id_of = |rid: &str| {
            let rid = rid.to_string();
            let addr = addr.clone();
            async move {
                let (_, v) = get_json(
                    &addr,
                    &format!("/v2/samples?q.field=resource_id&q.value={rid}"),
                    Some(ADMIN),
                )
                .await;
                v[0]["id"].as_str().expect("a sample id").to_string()
            }
        };
        let (own, other) = (id_of(mine).await, id_of(theirs).await);
        assert_eq!(
            get_json(&addr, &format!("/v2/samples/{own}"), Some(token))
                .await
                .0,
            200
        );
        assert_eq!(
            get_json(&addr, &format!("/v2/samples/{other}"), Some(token))
                .await
                .0,
            404,
            "a project token read another project's sample by id"
        );
        let rids: Vec<&str> = samples
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["resource_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            rids,
            vec![mine],
            "samples seen by the token of {mine}'s project"
        );
        let (_, samples) = get_json(&addr, "/v2/samples", Some(token)).await;
        assert_eq!(samples.as_array().unwrap().len(), 1);
        let (_, res) = get_json(&addr, "/v2/resources", Some(token)).await;
        let rids: Vec<&str> = res
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["resource_id"].as_str().unwrap())
            .collect();
        assert_eq!(rids, vec![mine]);
        assert_eq!(
            get_json(&addr, &format!("/v2/resources/{theirs}"), Some(token))
                .await
                .0,
            404
        );
        assert_eq!(
            get_json(&addr, &format!("/v2/resources/{mine}"), Some(token))
                .await
                .0,
            200
        );
        let (_, meters) = get_json(&addr, "/v2/meters", Some(token)).await;
        assert!(
            meters
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["resource_id"] == mine),
            "{meters}"
        );
        let (_, st) = get_json(
            &addr,
            "/v2/meters/cpu_util/statistics?groupby=project_id&groupby=resource_id",
            Some(token),
        )
        .await;
        let groups: Vec<&Value> = st
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["groupby"])
            .collect();
        assert_eq!(groups.len(), 1, "{st}");
        assert_eq!(groups[0]["resource_id"], mine);
        // Asking for the other project explicitly is refused or empty, never their data.
        let other = if token == P1 {
            "project-2"
        } else {
            "project-1"
        };
        let (code, v) = get_json(
            &addr,
            &format!("/v2/meters/cpu_util?q.field=project_id&q.value={other}"),
            Some(token),
        )
        .await;
        assert!(
            code == 401 || code == 403 || (code == 200 && v == json!([])),
            "{code} {v}"
        );
        let (code, v) = get_json(
            &addr,
            &format!("/v2/meters/cpu_util/statistics?q.field=resource_id&q.value={theirs}"),
            Some(token),
        )
        .await;
        assert!(code >= 400 || v == json!([]), "{code} {v}");
    }
    // The admin sees both; vm-a still belongs to project-1 with its own metadata.
    let (_, r) = get_json(&addr, "/v2/resources/vm-a", Some(ADMIN)).await;
    assert_eq!(r["project_id"], "project-1", "{r}");
    assert_eq!(r["metadata"]["owner"], "p1", "{r}");
    // An empty or wrong token is refused.
    for bad in ["", "hostile-project-1-toke", "hostile-project-1-tokenX"] {
        let (code, _) = get_json(&addr, "/v2/meters", Some(bad)).await;
        assert_eq!(code, 401, "token {bad:?}");
    }

    // --- Queries that used to panic or build unbounded answers.
    let range = "q.field=timestamp&q.op=ge&q.value=2026-01-01T00:00:00&q.field=timestamp&q.op=lt&q.value=2027-01-01T00:00:00";
    for (what, q) in [
        ("period=1e13", "period=1e13".to_string()),
        ("period=1e300", "period=1e300".to_string()),
        ("period=0.001", "period=0.001".to_string()),
        (
            "a bucket per second for a year",
            format!("period=1&{range}"),
        ),
        ("period=-5", "period=-5".to_string()),
        ("period=NaN", "period=NaN".to_string()),
    ] {
        let (code, v) = get_json(
            &addr,
            &format!("/v2/meters/cpu_util/statistics?{q}"),
            Some(ADMIN),
        )
        .await;
        assert_eq!(code, 400, "{what}: {v}");
    }
    let (code, st) = get_json(
        &addr,
        &format!("/v2/meters/cpu_util/statistics?period=3600&{range}"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(
        st.as_array()
            .unwrap()
            .iter()
            .map(|r| r["count"].as_u64().unwrap())
            .sum::<u64>(),
        2
    );
    for path in [
        "/v2/meters/cpu_util?limit=100000000",
        "/v2/samples?limit=100000000",
        "/v2/resources?limit=100000000",
        "/v2/meters?limit=100000000",
    ] {
        let (code, v) = get_json(&addr, path, Some(ADMIN)).await;
        assert_eq!(code, 400, "{path}: {v}");
        assert!(faultstring(&v).contains("limit"), "{v}");
    }
    assert_eq!(
        get_json(&addr, "/v2/samples?limit=100000", Some(ADMIN))
            .await
            .0,
        200
    );
    // Lists are streamed in chunks as rows arrive: 600 resources make answers of several
    // chunks (64 KiB each), which must still parse as one array with every row.
    let many: Vec<Value> = (0..600)
        .map(|i| {
            posted(
                &format!("bulk-{i:04}"),
                None,
                &ts,
                json!({"display_name": "x".repeat(100)}),
            )
        })
        .collect();
    let (code, v) = post(&addr, direct, ADMIN, &Value::Array(many).to_string()).await;
    assert_eq!(code, 201, "{v}");
    let (code, res) = get_json(&addr, "/v2/resources?limit=100000", Some(ADMIN)).await;
    assert_eq!(code, 200);
    let res = res.as_array().expect("one JSON array");
    assert_eq!(
        res.iter()
            .filter(|r| r["resource_id"].as_str().unwrap().starts_with("bulk-"))
            .count(),
        600
    );
    let (code, meters) = get_json(&addr, "/v2/meters?limit=100000", Some(ADMIN)).await;
    assert_eq!(code, 200);
    assert_eq!(meters.as_array().expect("one JSON array").len(), 602);

    // No day outside the window made a partition: yesterday..today+2 and the posts' day.
    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let parts: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_inherits i join pg_class c on c.oid = i.inhrelid
         where i.inhparent = 'sample'::regclass order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(parts.len() <= 5, "partitions: {parts:?}");
    assert!(
        parts.iter().all(|p| p.starts_with("sample_p20")),
        "{parts:?}"
    );
    let (code, health) = get_json(&addr, "/health", None).await;
    assert_eq!(code, 200, "{health}");
    assert!(alive(&mut collector), "{}", collector.log_text());

    pool.close().await;
    collector.stop();
    let conn = broker::connect().await;
    broker::cleanup(&conn, &names).await;
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}

/// 30 correctly signed batches of 34 samples, each with one poison sample among 33 good
/// ones. Half the poisons break the contract (NUL in the resource id: dead-lettered before
/// the write); the other half pass a contract opened up for this test and are refused by
/// PostgreSQL itself (a resource id too long for a btree index entry, SQLSTATE 54000): the
/// collector bisects each batch down to that sample. Every good sample is stored, each poison
/// is dead-lettered alone with its reason and counted as dropped, and `/health` never blames
/// the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_isolates_poison_to_the_sample() {
    let names = Names::new("p");
    let env = [
        // Let over-long ids through the contract: PostgreSQL must be the one refusing.
        ("VMETER_CONTRACT__MAX_ID_BYTES".into(), "100000".into()),
        ("VMETER_DATABASE__BATCH_MAX_MESSAGES".into(), "10".into()),
    ];
    let (admin, addr, mut collector, logs) = start_collector(&names, &env).await;
    let conn = broker::connect().await;
    broker::wait_for_consumer(&conn, &names.processed_queue, Duration::from_secs(30)).await;

    let t0 = chrono::Utc::now() - chrono::Duration::hours(1);
    let (mut good, mut poison_db, mut poison_contract) = (0usize, 0usize, 0usize);
    for m in 0..30 {
        let mut batch = Vec::new();
        for k in 0..34 {
            let ts = t0 + chrono::Duration::seconds((m * 34 + k) as i64);
            if k == 17 {
                let rid = if m % 2 == 0 {
                    poison_db += 1;
                    format!("{}-{m}", random_hex(6000))
                } else {
                    poison_contract += 1;
                    format!("vm-\u{0}-{m}")
                };
                batch.push(cpu_util_sample(&rid, 1.0, ts));
            } else {
                good += 1;
                batch.push(cpu_util_sample(&format!("vm-{}", k % 5), k as f64, ts));
            }
        }
        broker::publish(&conn, &names, "sample.processed", &batch, SECRET).await;
    }

    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let stored = loop {
        let n: i64 = sqlx::query_scalar("select count(*) from samples")
            .fetch_one(&pool)
            .await
            .unwrap();
        if n as usize >= good || Instant::now() > deadline {
            break n as usize;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        stored,
        good,
        "good samples stored:\n{}",
        collector.log_text()
    );

    let dead = broker::take_dead(
        &conn,
        &names.dead_queue,
        30,
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
    .await;
    let by_reason = |r: &str| dead.iter().filter(|(reason, _)| reason == r).count();
    assert_eq!(
        dead.len(),
        30,
        "dead-lettered messages: {:?}",
        dead.iter().map(|d| &d.0).collect::<Vec<_>>()
    );
    assert_eq!(by_reason("rejected_by_database:54000"), poison_db);
    assert_eq!(by_reason("contract_control_character"), poison_contract);
    assert!(
        dead.iter().all(|(_, s)| s.len() == 1),
        "each poison dead-lettered alone, its neighbours stored"
    );
    assert!(dead.iter().all(|(_, s)| s[0].volume == 1.0));

    // Counted among dropped samples with their reasons; the database is not blamed.
    let (_, metrics) = request(&addr, "GET", "/metrics", &[], None).await;
    let dropped = |reason: &str| {
        scrape(
            &metrics,
            &format!("vmeter_samples_dropped_total{{reason=\"{reason}\",service=\"collector\"}}"),
        ) + scrape(
            &metrics,
            &format!("vmeter_samples_dropped_total{{service=\"collector\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(
        dropped("rejected_by_database:54000"),
        poison_db as f64,
        "{metrics}"
    );
    assert_eq!(
        dropped("contract_control_character"),
        poison_contract as f64,
        "{metrics}"
    );
    let (code, health) = get_json(&addr, "/health", None).await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["parts"]["database"], true);
    // Everything was acked: a restart would find nothing to redeliver.
    let leftover = broker::take(
        &conn,
        &names.processed_queue,
        1,
        Duration::from_secs(1),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        leftover.is_empty(),
        "{} samples left unacked",
        leftover.len()
    );
    assert!(alive(&mut collector));

    pool.close().await;
    collector.stop();
    broker::cleanup(&conn, &names).await;
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}

/// The notification service takes contract violators out of a raw message and dead-letters
/// them (one message per rule, with the reason), and processes the rest of that message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_dead_letters_violators_and_keeps_their_neighbours() {
    let names = Names::new("n");
    let logs = names.dir("hostile");
    let mut env = names.env(SECRET);
    env.push((
        "VMETER_PIPELINE__FILE".into(),
        repo_root().join("pipeline.yaml").display().to_string(),
    ));
    env.push(("VMETER_PIPELINE__STATE_FILE".into(), "\"\"".into()));
    env.push(("VMETER_CONTRACT__MAX_AGE_DAYS".into(), "90".into()));
    let metrics_addr = listen_addr();
    env.push(("VMETER_HTTP__LISTEN".into(), metrics_addr.clone()));
    let mut notification = Service::start("notification", "notification", &[], &env, &logs);
    let conn = broker::connect().await;
    broker::wait_for_consumer(&conn, &names.raw_queue, Duration::from_secs(30)).await;
    broker::wait_for_queue(&conn, &names.processed_queue, Duration::from_secs(30)).await;

    let now = chrono::Utc::now();
    let mut batch = Vec::new();
    for k in 0..10 {
        let mut s = cpu_util_sample(&format!("vm-{k}"), 5.0, now);
        s.name = "memory".into();
        s.unit = "MiB".into();
        batch.push(s);
    }
    let mut long = batch[0].clone();
    long.resource_id = "r".repeat(300);
    let mut old = batch[1].clone();
    old.timestamp = now - chrono::Duration::days(400);
    let mut old2 = batch[2].clone();
    old2.timestamp = now - chrono::Duration::days(401);
    batch.extend([long, old, old2]);
    broker::publish(&conn, &names, "sample.raw", &batch, SECRET).await;

    let dead = broker::take_dead(
        &conn,
        &names.dead_queue,
        2,
        Duration::from_secs(10),
        Duration::from_secs(60),
    )
    .await;
    let mut reasons: Vec<(String, usize)> =
        dead.iter().map(|(r, s)| (r.clone(), s.len())).collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            ("contract_field_too_long".to_string(), 1),
            ("contract_timestamp_too_old".to_string(), 2)
        ],
        "{}",
        notification.log_text()
    );
    // The default pipeline passes `memory` through: the ten good samples reach the processed queue.
    let out = broker::take(
        &conn,
        &names.processed_queue,
        10,
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(out.iter().filter(|s| s.name == "memory").count(), 10);
    let (_, metrics) = request(&metrics_addr, "GET", "/metrics", &[], None).await;
    assert_eq!(
        scrape(
            &metrics,
            "vmeter_samples_dropped_total{reason=\"contract_timestamp_too_old\",service=\"notification\"}"
        ) + scrape(
            &metrics,
            "vmeter_samples_dropped_total{service=\"notification\",reason=\"contract_timestamp_too_old\"}"
        ),
        2.0,
        "{metrics}"
    );
    assert!(alive(&mut notification));
    notification.stop();
    broker::cleanup(&conn, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}
