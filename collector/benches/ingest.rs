//! Collector ingest throughput and storage size (issue 5), against the real RabbitMQ and
//! PostgreSQL of `deploy/setup.sh`.
//!
//! 1,000,000 samples = 100 resources × 10,000 points (one every 10 s, `cpu_util`-like gauge
//! with agent metadata) are published to the processed queue as signed batches of 1,000
//! samples (10 consecutive points of each of the 100 resources, metadata shared per
//! resource, as the notification service writes them), plus 100,000 of them a second time
//! (redeliveries, which must be ignored). Every resource is resized twice and every tenth
//! changes project once over the run (agent-style metadata that changes now and then).
//! The release `collector` binary writes them into a fresh database. Figures: samples/s from the first publish until the collector's counters
//! (`/metrics`) account for every message; bytes per stored sample (sample partitions, heap
//! and indexes, and all vmeter tables); then API latency on that data, median of 20: one
//! resource's 10,000 samples of one meter, and `statistics?period=60` over all 1,000,000
//! samples grouped by resource (answered from the per-minute rollups, which the collector's
//! rollup job, every 5 s here, writes while the load runs; the bench waits until every
//! closed hour is rolled up). For comparison in the same run: the same statistics with a
//! start that is not on a minute (answered from the samples), and the rollup job's cost,
//! timed by rolling up all 1,000,000 samples again from scratch.
//!
//! Then issue 18's figures (`ingest/compaction.rs`): ingest of 300,000 more samples while
//! the compaction job runs, the 10,000-sample answer from compacted hours, the job alone and
//! the bytes it stores, and the `samples` view's decoding speed; then everything compacted
//! (the eight answers compared byte for byte with today's layout's), and the size target
//! again on agent-style data in a database of its own (`ingest/agent_mix.rs`).
//!
//! Run: `cargo bench -p collector --bench ingest` (`VMETER_BENCH_KEEP_DB=1` keeps the
//! database for inspection; `VMETER_BENCH_COLLECTOR=/path/to/collector` runs another build
//! of the collector, to compare against a baseline).

use std::time::{Duration, Instant};

use chrono::Utc;
use lapin::{Connection, ConnectionProperties};
use sqlx::PgPool;
use vmeter_core::amqp::{self, BrokerConfig, Publisher};
use vmeter_core::signing::Signer;

#[path = "ingest/agent_data.rs"]
mod agent_data;
#[path = "ingest/agent_mix.rs"]
mod agent_mix;
#[path = "ingest/compaction.rs"]
mod compaction;
#[path = "ingest/data.rs"]
mod data;
#[path = "ingest/harness.rs"]
mod harness;

use data::{all_metadata, changed_attribution, message, t0};
use harness::{
    body_len, counters, http_get, http_get_bytes, paths, publish_all, start_collector, uncompact,
};

const RESOURCES: usize = 100;
const POINTS: usize = 10_000;
const PER_MESSAGE_POINTS: usize = 10;
const DUPLICATE_MESSAGES: usize = 100;
const SECRET: &str = "bench-secret";
const WINDOW: usize = 32;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // VMETER_TEST_AMQP_URL / VMETER_TEST_PG_URL, else deploy/setup.sh's credentials.
    let amqp_url = vmeter_core::config::local_amqp_url("ADMIN");
    let admin_url = vmeter_core::config::local_pg_url();
    let id = format!("bench_ingest_{}", std::process::id());
    let db_url = format!("{}/{id}", admin_url.rsplit_once('/').unwrap().0);
    let admin = PgPool::connect(&admin_url)
        .await
        .expect("PostgreSQL from deploy/setup.sh");
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {id}")))
        .execute(&admin)
        .await
        .unwrap();

    let cfg = BrokerConfig {
        url: amqp_url.clone(),
        exchange: format!("bench.{id}"),
        raw_queue: format!("bench.{id}.raw"),
        processed_queue: format!("bench.{id}.processed"),
        dead_letter_exchange: format!("bench.{id}.dlx"),
        dead_letter_queue: format!("bench.{id}.dead"),
        ..BrokerConfig::default()
    };
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ from deploy/setup.sh");
    let publisher = Publisher::open(&conn, Signer::new(SECRET)).await.unwrap();
    amqp::declare_topology(publisher.channel(), &cfg)
        .await
        .unwrap();

    // Encode everything first (untimed).
    let ids: Vec<String> = (0..RESOURCES)
        .map(|r| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &r.to_le_bytes()).to_string())
        .collect();
    let mds = all_metadata();
    let messages = POINTS / PER_MESSAGE_POINTS;
    let mut bodies: Vec<Vec<u8>> = (0..messages)
        .map(|k| vmeter_core::wire::encode(&message(k, &mds, &ids)))
        .collect();
    // Redeliveries: the same samples again (same natural keys), interleaved.
    for k in 0..DUPLICATE_MESSAGES {
        let at = (k * 10 + 5).min(bodies.len());
        let dup = bodies[k * 10].clone();
        bodies.insert(at, dup);
    }
    let total = (bodies.len() * RESOURCES * PER_MESSAGE_POINTS) as u64;
    let unique = (RESOURCES * POINTS) as u64;
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "collector ingest: {} messages, {total} samples ({unique} distinct + {} redelivered), {:.0} B/sample on the wire",
        bodies.len(),
        total - unique,
        bytes as f64 / total as f64
    );

    let http = format!("127.0.0.1:{}", 20000 + std::process::id() % 20000);
    let mut child = start_collector(&cfg, &db_url, &http, true);
    // Ready once its API answers (migrations done, consuming).
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(&http).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let start = Instant::now();
    publish_all(&publisher, &cfg, &bodies, RESOURCES * PER_MESSAGE_POINTS).await;
    let published = start.elapsed().as_secs_f64();
    let mut last = (0, Instant::now());
    let (stored, dups) = loop {
        let (s, d) = counters(&http).await;
        if s + d >= total {
            break (s, d);
        }
        if s + d != last.0 {
            last = (s + d, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(60),
            "collector stalled at {} of {total}",
            s + d
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ingest: {:.0} samples/s ({total} in {secs:.2} s, publishing took {published:.2} s); stored {stored}, duplicates ignored {dups}; target ≥ 100000/s: {}",
        total as f64 / secs,
        if total as f64 / secs >= 100_000.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    assert_eq!(stored, unique, "every distinct sample stored exactly once");

    let pool = PgPool::connect(&db_url).await.unwrap();
    // Every closed hour rolled up: data time is the newest sample, the lag the default.
    let newest = t0() + chrono::Duration::seconds((POINTS as i64 - 1) * 10);
    let want = collector::store::rollup::floor_hour(newest - chrono::Duration::seconds(600));
    let waited = Instant::now();
    loop {
        let wm: Option<chrono::DateTime<Utc>> =
            sqlx::query_scalar("select watermark from rollup_state")
                .fetch_one(&pool)
                .await
                .unwrap();
        if wm == Some(want) {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(300),
            "rollups stuck at {wm:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "rollups: every closed hour (up to {want}) rolled up {:.1} s after the last sample was stored (job every 5 s)",
        waited.elapsed().as_secs_f64()
    );
    sqlx::query("vacuum analyze").execute(&pool).await.unwrap();
    let rows: i64 = sqlx::query_scalar("select count(*) from sample")
        .fetch_one(&pool)
        .await
        .unwrap();
    let sample_bytes: i64 = sqlx::query_scalar(
        "select sum(pg_total_relation_size(inhrelid))::bigint from pg_inherits where inhparent = 'sample'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let all_bytes: i64 = sqlx::query_scalar(
        "select (sum(pg_total_relation_size(inhrelid)) + pg_total_relation_size('resource') + pg_total_relation_size('meter') + pg_total_relation_size('series') + pg_total_relation_size('sample_rollup') + pg_total_relation_size('rollup_state'))::bigint from pg_inherits where inhparent = 'sample'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let rollup_bytes: i64 =
        sqlx::query_scalar("select pg_total_relation_size('sample_rollup')::bigint")
            .fetch_one(&pool)
            .await
            .unwrap();
    println!(
        "size: {rows} rows; sample partitions (heap + primary key) {:.1} B/sample; rollups {:.1} B/sample; all tables (meter/resource/series/rollups) {:.1} B/sample; target ≤ 100 B: {}",
        sample_bytes as f64 / rows as f64,
        rollup_bytes as f64 / rows as f64,
        all_bytes as f64 / rows as f64,
        if (all_bytes as f64 / rows as f64) <= 100.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );

    // Attribution: samples whose stored user/project/source/metadata differ from their
    // resource's newest (a schema that keeps only the newest stores none).
    let (attributions, changed): (i64, i64) = sqlx::query_as(
        "select (select count(*) from resource),
                (select count(*) from sample s join resource r on r.id = s.resource_id
                 join (select distinct on (resource_id) resource_id, id from resource
                       order by resource_id, last_seen desc, id desc) n on n.resource_id = r.resource_id
                 where n.id <> r.id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!(
        "attribution: {attributions} resource rows for {RESOURCES} resources; samples stored with an attribution other than their resource's newest: {changed} (the data has {})",
        changed_attribution()
    );

    // API latency on that data, median of 20 (after one warm-up request each).
    let rid = &ids[0];
    let one_resource =
        format!("/v2/meters/cpu_util?q.field=resource_id&q.value={rid}&limit={POINTS}");
    // The first load's whole minutes (999,600 samples): the same samples when more arrive.
    let stats = format!(
        "/v2/meters/cpu_util/statistics?period=60&groupby=resource_id&q.field=timestamp&q.op=lt&q.value={}",
        (t0() + chrono::Duration::seconds((POINTS as i64 * 10) / 60 * 60))
            .format("%Y-%m-%dT%H:%M:%S")
    );
    let unaligned = format!(
        "{stats}&q.field=timestamp&q.op=ge&q.value={}",
        (t0() + chrono::Duration::seconds(7)).format("%Y-%m-%dT%H:%M:%S")
    );
    for (label, path, target_ms, expect) in [
        ("one resource's 10,000 samples", &one_resource, 20.0, POINTS),
        (
            "statistics?period=60 over 1,000,000 samples grouped by resource",
            &stats,
            200.0,
            RESOURCES * POINTS * 10 / 60,
        ),
        (
            "the same statistics, start 7 s past a minute (every sample, narrow rows; no target)",
            &unaligned,
            f64::INFINITY,
            RESOURCES * POINTS * 10 / 60,
        ),
    ] {
        let paths_before = paths(&http).await;
        let body = http_get(&http, path).await;
        let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let n = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
        assert!(
            n + RESOURCES >= expect && n <= expect + RESOURCES,
            "{label}: {n} rows, expected about {expect}"
        );
        let mut ms = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let body = http_get_bytes(&http, path).await;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(body.starts_with(b"HTTP/1.1 200") || body.starts_with(b"HTTP/1.0 200"));
        }
        ms.sort_by(f64::total_cmp);
        let median = ms[ms.len() / 2];
        let paths_after = paths(&http).await;
        println!(
            "API {label}: median {median:.1} ms of 20 ({n} rows, {} KiB; min {:.1}, max {:.1}; statistics answered from rollups {}, from samples {}); target ≤ {target_ms} ms: {}",
            body_len(&http, path).await / 1024,
            ms[0],
            ms[ms.len() - 1],
            paths_after.0 - paths_before.0,
            paths_after.1 - paths_before.1,
            if median <= target_ms {
                "MET"
            } else {
                "NOT MET"
            }
        );
    }

    // Issue 18: answers to compare once everything is compacted; today's layout's size.
    let probes = compaction::probes(t0(), rid);
    let before = compaction::Before {
        answers: compaction::answers(&http, &probes).await,
        ms: compaction::probe_latencies(&http, &probes).await,
        bytes: (compaction::all_tables(&pool).await, rows),
    };

    // Ingest while the compaction job runs, then the compacted answer.
    const SECOND: usize = 300;
    let second: Vec<Vec<u8>> = (messages..messages + SECOND)
        .map(|k| vmeter_core::wire::encode(&message(k, &mds, &ids)))
        .collect();
    compaction::during_ingest(&pool, &http, &publisher, &cfg, &second).await;
    compaction::compacted_answer(&http, &one_resource).await;

    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();

    // The rollup job's cost: every hour again, from scratch, with nothing else running.
    sqlx::query("truncate sample_rollup")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("update rollup_state set watermark = null")
        .execute(&pool)
        .await
        .unwrap();
    let store = collector::store::Store::new(pool.clone());
    let t = Instant::now();
    let run = store
        .roll_up(Utc::now(), chrono::Duration::seconds(600), u32::MAX)
        .await
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let covered: i64 = sqlx::query_scalar("select count(*) from sample where ts < $1")
        .bind(run.watermark)
        .fetch_one(&pool)
        .await
        .unwrap();
    println!(
        "rollup job from scratch: {} hours, {} rows, {covered} samples in {secs:.2} s ({:.2} µs/sample)",
        run.hours,
        run.rows,
        secs * 1e6 / covered as f64
    );
    compaction::alone(&store, &pool, sample_bytes as f64 / rows as f64).await;
    // Everything compacted, the compacted days' partitions dropped: size, answers, latency.
    let mut child = start_collector(&cfg, &db_url, &http, false);
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(&http).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    compaction::final_layout(
        &store,
        &pool,
        &http,
        &probes,
        &before,
        &[
            ("one resource's 10,000 samples", one_resource.clone(), 20.0),
            (
                "statistics?period=60 over 999,600 samples grouped by resource",
                stats.clone(),
                200.0,
            ),
            (
                "the same statistics, start 7 s past a minute",
                unaligned.clone(),
                300.0,
            ),
        ],
    )
    .await;
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    pool.close().await;

    // The size target again, on agent-style data (many meters, counters and rates), in a
    // database of its own.
    let agent_db = format!("{id}_agent");
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {agent_db}")))
        .execute(&admin)
        .await
        .unwrap();
    let agent_url = format!("{}/{agent_db}", admin_url.rsplit_once('/').unwrap().0);
    agent_mix::run(&publisher, &cfg, &agent_url, &http).await;

    let ch = conn.create_channel().await.unwrap();
    for q in [&cfg.raw_queue, &cfg.processed_queue, &cfg.dead_letter_queue] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for e in [&cfg.exchange, &cfg.dead_letter_exchange] {
        let _ = ch
            .exchange_delete(e.as_str().into(), Default::default())
            .await;
    }
    if std::env::var_os("VMETER_BENCH_KEEP_DB").is_some() {
        println!("databases kept (VMETER_BENCH_KEEP_DB): {db_url}, {agent_url}");
    } else {
        for db in [&id, &agent_db] {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "drop database if exists {db} with (force)"
            )))
            .execute(&admin)
            .await;
        }
    }
}
