//! Idempotent ingest against the real PostgreSQL and RabbitMQ.
//!
//! 1. `Store::write` drops keys repeated within a batch (the first wins), ignores keys
//!    already stored, and survives a concurrent writer that has not committed the same key
//!    yet: its per-row probe cannot see that row, the insert waits and fails with a unique
//!    violation, and the batch is written again with `on conflict do nothing`.
//! 2. The collector binary with several batches in flight: redeliveries close behind their
//!    originals (so they fall into the next batch, which must wait for the one in flight)
//!    are stored once, every message is acked, and the counters add up.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use collector::store::Store;
use vmeter_core::Sample;
use vmeter_e2e::http::request;
use vmeter_e2e::{
    Names, Service, broker, cpu_util_sample, create_database, drop_database, listen_addr,
};

const SECRET: &str = "e2e-ingest-secret";

fn t(sec: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap() + chrono::Duration::seconds(sec)
}

async fn volumes(pool: &sqlx::PgPool, rid: &str) -> Vec<(DateTime<Utc>, f64)> {
    sqlx::query_as(
        "select timestamp, volume from samples where resource_id = $1 order by timestamp",
    )
    .bind(rid)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_stored_and_concurrently_inserted_keys_are_stored_once() {
    let names = Names::new("ingst");
    let admin = create_database(&names).await;
    let pool = collector::store::pool(&names.db_url(), 4).unwrap();
    let mut store = Store::new(pool.clone());
    store.migrate().await.unwrap();

    // Repeated within one batch: the first wins.
    let w = store
        .write(&[
            cpu_util_sample("vm-a", 1.0, t(0)),
            cpu_util_sample("vm-a", 2.0, t(10)),
            cpu_util_sample("vm-a", 9.0, t(0)),
        ])
        .await
        .unwrap();
    assert_eq!((w.inserted, w.duplicates), (2, 1));
    assert_eq!(
        volumes(&pool, "vm-a").await,
        vec![(t(0), 1.0), (t(10), 2.0)]
    );

    // Already stored (a redelivery), mixed with a new one.
    let w = store
        .write(&[
            cpu_util_sample("vm-a", 5.0, t(10)),
            cpu_util_sample("vm-a", 3.0, t(20)),
        ])
        .await
        .unwrap();
    assert_eq!((w.inserted, w.duplicates), (1, 1));

    // Another writer inserted t(30) and has not committed: the probe cannot see its row.
    let (meter_id, resource_id): (i32, i32) = sqlx::query_as(
        "select m.id, r.id from meter m, resource r where m.name = 'cpu_util' and r.resource_id = 'vm-a'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut other = pool.begin().await.unwrap();
    sqlx::query("insert into sample (ts, meter_id, resource_id, volume) values ($1, $2, $3, 7.0)")
        .bind(t(30))
        .bind(meter_id)
        .bind(resource_id)
        .execute(&mut *other)
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        let w = store
            .write(&[
                cpu_util_sample("vm-a", 4.0, t(30)),
                cpu_util_sample("vm-a", 6.0, t(40)),
            ])
            .await;
        (store, w)
    });
    // The write waits on the other writer's row until it commits: PostgreSQL shows a
    // backend of this database waiting for a lock (the data, not a guess of how long).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            !writer.is_finished(),
            "the write did not wait for the uncommitted row"
        );
        assert!(Instant::now() < deadline, "no write waits on the row");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !writer.is_finished(),
        "a write waiting on a lock cannot have finished"
    );
    other.commit().await.unwrap();
    let (_store, w) = writer.await.unwrap();
    let w = w.expect("written again with on conflict do nothing");
    assert_eq!((w.inserted, w.duplicates), (1, 1));
    assert_eq!(
        volumes(&pool, "vm-a").await,
        vec![
            (t(0), 1.0),
            (t(10), 2.0),
            (t(20), 3.0),
            (t(30), 7.0),
            (t(40), 6.0)
        ]
    );
    // The series spans every stored sample.
    let (first, last): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "select first_ts, last_ts from series where meter_id = $1 and resource_id = $2",
    )
    .bind(meter_id)
    .bind(resource_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((first, last), (t(0), t(40)));

    pool.close().await;
    drop_database(&admin, &names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_flight_store_redeliveries_once_and_ack_everything() {
    let names = Names::new("ingfl");
    let admin = create_database(&names).await;
    let logs = names.dir("e2e");
    let addr = listen_addr();
    let mut env = names.env(SECRET);
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));
    // Small batches: many in flight, redeliveries in the batch right after their original.
    env.push(("VMETER_DATABASE__BATCH_MAX_MESSAGES".into(), "3".into()));
    env.push(("VMETER_DATABASE__BATCH_MAX_WAIT_MS".into(), "20".into()));
    let mut collector = Service::start("collector", "collector", &[], &env, &logs);
    let conn = broker::connect().await;
    broker::wait_for_queue(&conn, &names.processed_queue, Duration::from_secs(30)).await;
    // Healthy once consuming, after its queue bindings exist.
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(&addr, "GET", "/health", &[], None).await.0 != 200 {
        assert!(Instant::now() < deadline, "{}", collector.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 60 messages of 5 resources × 20 points; every fourth is sent again two messages later.
    let mut bodies: Vec<Vec<Sample>> = Vec::new();
    for k in 0..60i64 {
        let mut b = Vec::new();
        for r in 0..5 {
            for p in 0..20 {
                let sec = (k * 20 + p) * 10;
                b.push(cpu_util_sample(
                    &format!("vm-{r}"),
                    (sec % 97) as f64,
                    t(sec),
                ));
            }
        }
        bodies.push(b);
    }
    let mut order: Vec<usize> = Vec::new();
    for k in 0..60 {
        order.push(k);
        if k >= 2 && (k - 2) % 4 == 0 {
            order.push(k - 2);
        }
    }
    let total: u64 = order.iter().map(|&k| bodies[k].len() as u64).sum();
    for &k in &order {
        broker::publish(&conn, &names, "sample.processed", &bodies[k], SECRET).await;
    }

    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (stored, dups) = loop {
        let (_, text) = request(&addr, "GET", "/metrics", &[], None).await;
        let get = |n| vmeter_core::telemetry::scrape(&text, n) as u64;
        let (s, d) = (
            get("vmeter_collector_samples_stored_total"),
            get("vmeter_collector_duplicates_total"),
        );
        if s + d >= total {
            break (s, d);
        }
        assert!(
            Instant::now() < deadline,
            "only {s} stored + {d} duplicates of {total}\n{}",
            collector.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((stored, dups), (60 * 100, total - 60 * 100));
    // Latency histograms: one write time and one sample age per committed batch.
    let (_, text) = request(&addr, "GET", "/metrics", &[], None).await;
    let get = |n| vmeter_core::telemetry::scrape(&text, n);
    let batches = get("vmeter_collector_batches_total");
    assert!(batches >= 1.0, "{text}");
    assert_eq!(
        get("vmeter_collector_write_seconds_count "),
        batches,
        "{text}"
    );
    assert_eq!(
        get("vmeter_collector_sample_age_seconds_count "),
        batches,
        "{text}"
    );
    assert!(get("vmeter_collector_write_seconds_sum ") > 0.0, "{text}");
    let rows: i64 = sqlx::query_scalar("select count(*) from samples")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 60 * 100);
    // Every message acked: nothing waits or is unacked once the collector has stopped.
    collector.stop();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            names.processed_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0, "{}", collector.log_text());

    pool.close().await;
    broker::cleanup(&conn, &names).await;
    drop_database(&admin, &names).await;
}
