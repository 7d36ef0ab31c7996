//! Fault injection under a steady load: the notification service and the collector as real
//! processes over the real RabbitMQ and PostgreSQL, while a load generator publishes raw
//! `cpu` samples like an agent (confirmed, retried until confirmed, so every sample it made
//! is published at least once). In turn: `kill -9` of the collector, `kill -9` of the
//! notification service, a graceful restart of the notification service, a hard broker
//! restart (`kill -9` of the RabbitMQ node), an immediate PostgreSQL restart, and a burst of
//! malformed, forged and oversized messages.
//!
//! It asserts that every raw sample is stored exactly once, that `cpu_util` loses at most
//! one point per resource per notification crash and none over the graceful restart, that
//! every bad message is in the dead-letter queue with its reason, that `/health` says 503
//! while PostgreSQL is down, and that every service recovers by itself. It prints a table:
//! fault → samples expected/stored/duplicated, seconds to recover.
//!
//! This test restarts the machine's RabbitMQ and PostgreSQL: it runs alone (one test in its
//! binary; cargo runs test binaries one after another) and waits for both to be back.
//! Soak mode (outside CI): `VMETER_SOAK_SECS=600 VMETER_SOAK_RESOURCES=500 cargo test
//! --release -p vmeter-e2e --test faults -- --nocapture` repeats the faults for that long.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use vmeter_core::signing::Signer;
use vmeter_core::wire;
use vmeter_e2e::http::request;
use vmeter_e2e::load::{Generator, STEP_S, cpu_sample, stored};
use vmeter_e2e::{Names, Service, broker, create_database, drop_database, listen_addr, repo_root};

const SECRET: &str = "fault-secret";
/// A fault counts as recovered once the ticks published this many after it are stored too:
/// the pipeline carries new samples again, not only the old ones.
const AFTER: u64 = 3;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// The processes under test and how to (re)start them.
struct Stack {
    names: Names,
    logs: std::path::PathBuf,
    collector_http: String,
    notification_http: String,
    collector: Option<Service>,
    notification: Option<Service>,
    agent: Option<Service>,
}

impl Stack {
    /// The real agent on the demo node (libvirt's test driver), polling every second, its
    /// spool kept over restarts.
    fn start_agent(&mut self) {
        let env = self
            .names
            .agent_env(SECRET, &self.logs.join("agent-spool"), &listen_addr());
        self.agent = Some(Service::start(
            "agent",
            "agent-compute",
            &[],
            &env,
            &self.logs,
        ));
    }

    fn start_collector(&mut self) {
        let mut env = self.names.env(SECRET);
        env.push(("VMETER_DATABASE__URL".into(), self.names.db_url()));
        env.push(("VMETER_HTTP__LISTEN".into(), self.collector_http.clone()));
        env.push(("VMETER_DATABASE__BATCH_MAX_WAIT_MS".into(), "100".into()));
        self.collector = Some(Service::start(
            "collector",
            "collector",
            &[],
            &env,
            &self.logs,
        ));
    }

    fn start_notification(&mut self) {
        let mut env = self.names.env(SECRET);
        env.push((
            "VMETER_PIPELINE__FILE".into(),
            repo_root().join("pipeline.yaml").display().to_string(),
        ));
        env.push((
            "VMETER_PIPELINE__STATE_FILE".into(),
            self.logs.join("state.json").display().to_string(),
        ));
        env.push(("VMETER_HTTP__LISTEN".into(), self.notification_http.clone()));
        self.notification = Some(Service::start(
            "notification",
            "notification",
            &[],
            &env,
            &self.logs,
        ));
    }

    fn kill9(slot: &mut Option<Service>) {
        let mut s = slot.take().expect("running");
        s.child.kill().unwrap();
        s.child.wait().unwrap();
    }

    fn diag(&self) -> String {
        format!(
            "--- collector:\n{}\n--- notification:\n{}",
            self.collector
                .as_ref()
                .map(Service::log_text)
                .unwrap_or_default(),
            self.notification
                .as_ref()
                .map(Service::log_text)
                .unwrap_or_default(),
        )
    }
}

/// What recovery is measured on: the generator's samples in this run's database.
struct Probe<'a> {
    pool: &'a sqlx::PgPool,
    t0: DateTime<Utc>,
    resources: usize,
}

impl Probe<'_> {
    /// The row of a fault that just ended: waits until the samples published before it and
    /// [`AFTER`] more ticks are stored.
    async fn recovered(&self, generator: &Generator, stack: &Stack, fault: String) -> Row {
        let ticks = generator.ticks() + AFTER;
        caught_up(self.pool, self.t0, ticks, self.resources, stack, fault).await
    }
}

/// Waits until every sample of the generator's first `ticks` ticks is stored; returns the
/// report row (seconds it took, rows, duplicates).
async fn caught_up(
    pool: &sqlx::PgPool,
    t0: DateTime<Utc>,
    ticks: u64,
    resources: usize,
    stack: &Stack,
    fault: String,
) -> Row {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let expected = (ticks * resources as u64) as i64;
    loop {
        if let Some((n, distinct)) = stored(pool, t0, ticks).await
            && distinct >= expected
        {
            return Row {
                fault,
                expected,
                stored: distinct,
                duplicated: n - distinct,
                recovery_s: started.elapsed().as_secs_f64(),
            };
        }
        assert!(
            Instant::now() < deadline,
            "{fault}: storage never caught up with {expected} samples\n{}",
            stack.diag()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn health(addr: &str) -> (u16, serde_json::Value) {
    vmeter_e2e::http::get_json(addr, "/health", None).await
}

/// Waits for `/health` of `addr` to answer `code`; returns the seconds it took.
async fn health_is(addr: &str, code: u16, what: &str, stack: &Stack) -> f64 {
    let started = Instant::now();
    loop {
        let (c, body) = health(addr).await;
        if c == code {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what}: /health stayed {c} {body}\n{}",
            stack.diag()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn broker_running() -> bool {
    std::process::Command::new("rabbitmq-diagnostics")
        .args(["-q", "check_running"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `kill -9` of the machine's RabbitMQ node (that one only: the cluster nodes of
/// `broker_cluster.rs` run on this machine too), then a start; returns when it runs again.
fn hard_broker_restart() {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", "os:getpid()."])
        .output()
        .expect("rabbitmqctl");
    let pid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_matches('"')
        .to_string();
    assert!(
        !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()),
        "the node's pid: {pid:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    run("kill", &["-9", &pid]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker_running() {
        assert!(Instant::now() < deadline, "the broker did not die");
        std::thread::sleep(Duration::from_millis(100));
    }
    run("rabbitmq-server", &["-detached"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !broker_running() {
        assert!(Instant::now() < deadline, "the broker did not come back");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn pg_stop_immediate() {
    run("pg_ctlcluster", &["15", "main", "stop", "-m", "immediate"]);
}

fn pg_start() {
    run("pg_ctlcluster", &["15", "main", "start"]);
}

/// Every sample the agent published, as (meter, resource, µs) keys: the tap queue's
/// messages that are signed with the secret, decode, and keep the contract (the burst's bad
/// messages are copied to the tap too, and the generator's samples are left out).
async fn tapped_agent_samples(tap: &str) -> std::collections::HashSet<(String, String, i64)> {
    use futures::StreamExt;
    let conn = broker::connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            tap.into(),
            "faults-tap".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let signer = Signer::new(SECRET);
    let contract = vmeter_core::contract::Contract::default();
    let mut out = std::collections::HashSet::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        if let Ok(samples) = vmeter_core::amqp::open_delivery(&signer, &d.properties, &d.data) {
            for s in samples {
                if !s.resource_id.starts_with("fault-") && contract.check(&s, Utc::now()).is_ok() {
                    out.insert((s.name, s.resource_id, s.timestamp.timestamp_micros()));
                }
            }
        }
        d.acker.ack(Default::default()).await.unwrap();
    }
    let _ = ch.queue_delete(tap.into(), Default::default()).await;
    let _ = conn.close(200, "done".into()).await;
    out
}

/// Brings RabbitMQ and PostgreSQL back when dropped, should this test fail while one of
/// them is down: the tests after it need both.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        if !broker_running() {
            let _ = std::process::Command::new("rabbitmq-server")
                .arg("-detached")
                .status();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !broker_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        let pg_up = std::process::Command::new("pg_isready")
            .args(["-q", "-h", "127.0.0.1"])
            .status()
            .is_ok_and(|s| s.success());
        if !pg_up {
            let _ = std::process::Command::new("pg_ctlcluster")
                .args(["15", "main", "start"])
                .status();
        }
    }
}

/// One row of the report.
struct Row {
    fault: String,
    expected: i64,
    stored: i64,
    duplicated: i64,
    recovery_s: f64,
}

/// Malformed, forged and oversized messages into the raw queue; returns how many of each
/// reason the dead-letter queue must hold.
async fn burst(names: &Names, t0: DateTime<Utc>) -> HashMap<String, usize> {
    let conn = broker::connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut want: HashMap<String, usize> = HashMap::new();
    let good = wire::encode(&[cpu_sample(9999, 1, t0)]);
    let send = |body: Vec<u8>, sig: Option<String>| {
        let ch = ch.clone();
        let exchange = names.exchange.clone();
        async move {
            let mut h = FieldTable::default();
            h.insert(
                wire::FORMAT_HEADER.into(),
                AMQPValue::LongLongInt(wire::FORMAT_VERSION),
            );
            if let Some(s) = sig {
                h.insert(
                    wire::SIGNATURE_HEADER.into(),
                    AMQPValue::LongString(s.into()),
                );
            }
            let c = ch
                .basic_publish(
                    exchange.as_str().into(),
                    "sample.raw".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_headers(h),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(c.is_ack());
        }
    };
    let signer = Signer::new(SECRET);
    for _ in 0..20 {
        send(good.clone(), None).await;
    }
    *want.entry("signature_missing".into()).or_default() += 20;
    for _ in 0..20 {
        send(
            good.clone(),
            Some(Signer::new("forged").sign(&good).unwrap()),
        )
        .await;
    }
    *want.entry("signature_mismatch".into()).or_default() += 20;
    for i in 0..20 {
        let garbage: Vec<u8> = (0..(64 + i * 50_000)).map(|k| (k * 31 + i) as u8).collect();
        send(garbage.clone(), signer.sign(&garbage)).await;
    }
    *want.entry("undecodable".into()).or_default() += 20;
    // Signed batches whose samples break the contract: one dead letter per batch and rule.
    for i in 0..10 {
        let mut s = cpu_sample(9000 + i, 1, t0);
        s.resource_id = "x".repeat(10_000);
        let body = wire::encode(&[s]);
        send(body.clone(), signer.sign(&body)).await;
    }
    *want.entry("contract_field_too_long".into()).or_default() += 10;
    let _ = conn.close(200, "done".into()).await;
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_survives_every_fault_under_load() {
    let _restore = Restore;
    let soak = Duration::from_secs(env_num("VMETER_SOAK_SECS", 0));
    let resources = env_num("VMETER_SOAK_RESOURCES", 20) as usize;
    let names = Names::new("f");
    let logs = names.dir("faults");
    let admin = create_database(&names).await;
    let mut stack = Stack {
        names,
        logs,
        collector_http: listen_addr(),
        notification_http: listen_addr(),
        collector: None,
        notification: None,
        agent: None,
    };
    stack.start_collector();
    stack.start_notification();
    let conn = broker::connect().await;
    broker::wait_for_consumer(&conn, &stack.names.raw_queue, Duration::from_secs(30)).await;
    broker::wait_for_consumer(&conn, &stack.names.processed_queue, Duration::from_secs(30)).await;
    // A tap: a copy of every message published with the raw routing key, to know exactly
    // what the real agent published (what the broker routed), whatever crashed when.
    let tap = format!("{}.tap", stack.names.raw_queue);
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        tap.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        tap.as_str().into(),
        stack.names.exchange.as_str().into(),
        "sample.raw".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    stack.start_agent();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&stack.names.db_url())
        .await
        .unwrap();

    // Sample time runs 50× faster than the wall clock (a tick of 10 s every 200 ms): start
    // far enough back that the last tick is still before now (the contract's window).
    // Whole seconds: storage keeps microseconds, and ticks are recovered from timestamps.
    let now_s = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let t0 = now_s - chrono::Duration::seconds((soak.as_secs() as i64 + 900) * 50);
    let gen_ = Generator::start(
        &stack.names,
        SECRET,
        resources,
        Duration::from_millis(200),
        t0,
    );
    let probe = Probe {
        pool: &pool,
        t0,
        resources,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut notification_crashes = 0;
    // Sample-time windows (in ticks) around each notification crash: the only places a
    // cpu_util point may be missing.
    let mut crash_windows: Vec<(u64, u64)> = Vec::new();
    let load = Duration::from_secs(3);
    let started = Instant::now();
    let mut dead_want: HashMap<String, usize> = HashMap::new();
    let mut round = 0;
    loop {
        round += 1;
        tokio::time::sleep(load).await;

        // 0. kill -9 of the agent (its spool stays), restart.
        Stack::kill9(&mut stack.agent);
        tokio::time::sleep(Duration::from_secs(1)).await;
        stack.start_agent();

        // 1. kill -9 collector, restart.
        Stack::kill9(&mut stack.collector);
        tokio::time::sleep(Duration::from_secs(1)).await;
        stack.start_collector();
        rows.push(
            probe
                .recovered(&gen_, &stack, format!("kill -9 collector (round {round})"))
                .await,
        );

        // 2. kill -9 notification, restart (its state is lost: ≤ 1 cpu_util per resource).
        tokio::time::sleep(load).await;
        // Deliveries in flight at the kill are at most a couple of seconds (10 ticks) old.
        let crash_lo = gen_.ticks().saturating_sub(10);
        Stack::kill9(&mut stack.notification);
        notification_crashes += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stack.start_notification();
        rows.push(
            probe
                .recovered(
                    &gen_,
                    &stack,
                    format!("kill -9 notification (round {round})"),
                )
                .await,
        );
        crash_windows.push((crash_lo, gen_.ticks()));

        // 3. Graceful restart of the notification service (state carried over: no loss).
        tokio::time::sleep(load).await;
        stack.notification.take().unwrap().stop();
        stack.start_notification();
        rows.push(
            probe
                .recovered(
                    &gen_,
                    &stack,
                    format!("SIGTERM + start notification (round {round})"),
                )
                .await,
        );

        // 4. Hard broker restart.
        tokio::time::sleep(load).await;
        let t = Instant::now();
        tokio::task::spawn_blocking(hard_broker_restart)
            .await
            .unwrap();
        let down_s = t.elapsed().as_secs_f64();
        rows.push(
            probe
                .recovered(
                    &gen_,
                    &stack,
                    format!("kill -9 RabbitMQ + start ({down_s:.1} s down, round {round})"),
                )
                .await,
        );

        // 5. Immediate PostgreSQL stop: /health turns 503 (the database part), then start.
        tokio::time::sleep(load).await;
        tokio::task::spawn_blocking(pg_stop_immediate)
            .await
            .unwrap();
        let seen_503 = health_is(&stack.collector_http, 503, "PostgreSQL down", &stack).await;
        let (_, h) = health(&stack.collector_http).await;
        assert_eq!(h["parts"]["database"], false, "{h}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::spawn_blocking(pg_start).await.unwrap();
        let healthy = health_is(&stack.collector_http, 200, "PostgreSQL back", &stack).await;
        rows.push(probe.recovered(&gen_, &stack, format!("PostgreSQL stop -m immediate, start (/health 503 after {seen_503:.1} s, 200 {healthy:.1} s after start, round {round})")).await);

        // 6. A burst of bad messages among the good ones.
        for (k, v) in burst(&stack.names, t0).await {
            *dead_want.entry(k).or_default() += v;
        }
        rows.push(
            probe
                .recovered(
                    &gen_,
                    &stack,
                    format!("70 malformed, forged, oversized messages (round {round})"),
                )
                .await,
        );

        if started.elapsed() >= soak {
            break;
        }
    }
    stack.agent.take().unwrap().stop();
    let ticks = gen_.finish().await;
    let total = (ticks * resources as u64) as i64;
    rows.push(caught_up(&pool, t0, ticks, resources, &stack, "end of load".into()).await);

    // Exactly once: every raw sample stored, none twice.
    let (n, distinct) = stored(&pool, t0, ticks + 1).await.unwrap();
    assert_eq!(n, total, "raw samples stored\n{}", stack.diag());
    assert_eq!(distinct, total, "every (resource, timestamp) stored once");
    let per_tick: Vec<(String, i64)> = sqlx::query_as(
        "select resource_id, count(*) from samples where meter = 'cpu' and resource_id like 'fault-%' group by 1 order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(per_tick.len(), resources);
    assert!(
        per_tick.iter().all(|(_, c)| *c == ticks as i64),
        "{per_tick:?}"
    );

    // The real agent: every sample it published (the tap's copies that are signed with the
    // secret and keep the contract) is stored, once (the primary key).
    let published = tapped_agent_samples(&tap).await;
    assert!(
        published.len() > 100,
        "the agent published {} samples",
        published.len()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
            "select meter, resource_id, timestamp from samples where resource_id not like 'fault-%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let stored: std::collections::HashSet<(String, String, i64)> = rows
            .into_iter()
            .map(|(m, r, t)| (m, r, t.timestamp_micros()))
            .collect();
        let missing = published.difference(&stored).count();
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        missing,
        0,
        "samples the agent published that were not stored\n{}",
        stack.diag()
    );
    rows.push(Row {
        fault: "the real agent, killed once a round (published: what the broker routed)".into(),
        expected: published.len() as i64,
        stored: published.len() as i64 - missing as i64,
        duplicated: 0,
        recovery_s: 0.0,
    });

    // cpu_util: ticks - 1 points per resource, at most one lost per notification crash.
    // Wait for the last tick's point of every resource (outputs follow inputs in order).
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = t0 + chrono::Duration::seconds((ticks as i64 - 1) * STEP_S);
    loop {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from samples where meter = 'cpu_util' and resource_id like 'fault-%' and timestamp = $1",
        )
        .bind(last)
        .fetch_one(&pool)
        .await
        .unwrap();
        if n as usize == resources {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last cpu_util points never arrived ({n})\n{}",
            stack.diag()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let util: Vec<(String, i64)> = sqlx::query_as(
        "select resource_id, count(*) from samples where meter = 'cpu_util' and resource_id like 'fault-%' group by 1 order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let lost: Vec<(String, i64)> = util
        .iter()
        .map(|(r, c)| (r.clone(), ticks as i64 - 1 - c))
        .collect();
    assert_eq!(lost.len(), resources);
    assert!(
        lost.iter()
            .all(|(_, l)| (0..=notification_crashes).contains(l)),
        "cpu_util points lost per resource (crashes: {notification_crashes}): {lost:?}"
    );
    // Which points are missing: each within a crash window (none from the graceful
    // restarts, the broker or the database faults).
    let present: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "select resource_id, timestamp from samples where meter = 'cpu_util' and resource_id like 'fault-%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let present: std::collections::HashSet<(String, i64)> = present
        .into_iter()
        .map(|(r, t)| (r, (t - t0).num_seconds() / STEP_S))
        .collect();
    for r in 0..resources {
        let rid = format!("fault-{r:04}");
        for k in 1..ticks as i64 {
            if !present.contains(&(rid.clone(), k)) {
                assert!(
                    crash_windows
                        .iter()
                        .any(|(lo, hi)| (*lo as i64..=*hi as i64).contains(&k)),
                    "{rid}: cpu_util of tick {k} is missing outside any crash window {crash_windows:?}"
                );
            }
        }
    }
    let values: Vec<f64> = sqlx::query_scalar(
        "select volume from samples where meter = 'cpu_util' and resource_id like 'fault-%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        values.iter().all(|v| (v - 50.0).abs() < 1e-6),
        "every cpu_util is 50 %: a redelivery made a wrong rate"
    );

    // Every bad message is in the dead-letter queue with its reason.
    let conn = broker::connect().await;
    let want_msgs: usize = dead_want.values().sum();
    let dead = broker::take_dead(
        &conn,
        &stack.names.dead_queue,
        want_msgs,
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
    .await;
    let mut got: HashMap<String, usize> = HashMap::new();
    for (reason, _) in &dead {
        *got.entry(reason.clone()).or_default() += 1;
    }
    assert_eq!(got, dead_want, "dead letters by reason");

    // Everything recovered by itself.
    assert_eq!(health(&stack.collector_http).await.0, 200);
    assert_eq!(health(&stack.notification_http).await.0, 200);
    let (_, metrics) = request(&stack.collector_http, "GET", "/metrics", &[], None).await;
    let dups = vmeter_core::telemetry::scrape(&metrics, "vmeter_collector_duplicates_total");

    println!(
        "\nfault injection: {resources} resources, {ticks} ticks, {total} raw samples, {notification_crashes} notification crash(es)"
    );
    println!("| fault | raw samples expected | stored | duplicated | seconds to catch up |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.1} |",
            r.fault, r.expected, r.stored, r.duplicated, r.recovery_s
        );
    }
    println!(
        "cpu_util points lost per resource: max {}, total {}; dead letters {:?}; redeliveries ignored by the last collector: {dups}",
        lost.iter().map(|(_, l)| *l).max().unwrap_or(0),
        lost.iter().map(|(_, l)| *l).sum::<i64>(),
        got
    );

    pool.close().await;
    stack.collector.take().unwrap().stop();
    stack.notification.take().unwrap().stop();
    broker::cleanup(&conn, &stack.names).await;
    drop_database(&admin, &stack.names).await;
    let _ = std::fs::remove_dir_all(&stack.logs);
}
