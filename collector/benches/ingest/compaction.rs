//! The ingest bench's compaction figures (issue 18, docs/design-compaction.md), on the data
//! the bench loaded: ingest while the job runs, the API's answer from compacted hours, the
//! job alone and what it stores.

use std::time::{Duration, Instant};

use collector::store::Store;
use sqlx::PgPool;
use vmeter_core::amqp::{BrokerConfig, Publisher};

use super::{
    PER_MESSAGE_POINTS, POINTS, RESOURCES, counters, http_get, http_get_bytes, publish_all,
    uncompact,
};

/// Ingest (target ≥ 100,000 samples/s) of `second` (processed-queue messages of hours not
/// rolled up yet) while this process compacts every rolled-up hour from scratch.
pub async fn during_ingest(
    pool: &PgPool,
    http: &str,
    publisher: &Publisher,
    cfg: &BrokerConfig,
    second: &[Vec<u8>],
) {
    uncompact(pool).await;
    let (stored_before, dups_before) = counters(http).await;
    let compactor = Store::new(pool.clone());
    let compaction = tokio::spawn(async move {
        let t = Instant::now();
        let run = compactor.compact(u32::MAX).await.unwrap();
        (run, t.elapsed().as_secs_f64())
    });
    let start = Instant::now();
    publish_all(publisher, cfg, second).await;
    let want = (second.len() * RESOURCES * PER_MESSAGE_POINTS) as u64;
    loop {
        let (s, d) = counters(http).await;
        if s + d - stored_before - dups_before >= want {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the second load stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingest_secs = start.elapsed().as_secs_f64();
    let (run, compact_secs) = compaction.await.unwrap();
    let rate = want as f64 / ingest_secs;
    println!(
        "ingest while compacting: {rate:.0} samples/s ({want} in {ingest_secs:.2} s), target ≥ 100000: {}; the compaction meanwhile: {} samples of {} hours in {compact_secs:.2} s ({:.0} samples/s)",
        if rate >= 100_000.0 { "MET" } else { "NOT MET" },
        run.samples,
        run.hours,
        run.samples as f64 / compact_secs
    );
}

/// The 10,000-sample answer of `one_resource` (target ≤ 20 ms) with the resource's hours
/// compacted: the API reads the hours before the compaction watermark from sample_hour (the
/// narrow rows are kept, not read; tests/tests/collector_compaction.rs checks the answers
/// without them).
pub async fn compacted_answer(http: &str, one_resource: &str) {
    let body = http_get(http, one_resource).await;
    let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let n = serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0);
    assert_eq!(n, POINTS, "the compacted answer has every sample");
    let mut ms = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let body = http_get_bytes(http, one_resource).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(body.starts_with(b"HTTP/1.1 200") || body.starts_with(b"HTTP/1.0 200"));
    }
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    println!(
        "API one resource's 10,000 samples, its hours compacted (decoded from sample_hour): median {median:.1} ms of 20 (min {:.1}, max {:.1}); target ≤ 20 ms: {}",
        ms[0],
        ms[ms.len() - 1],
        if median <= 20.0 { "MET" } else { "NOT MET" }
    );
}

/// The job alone from scratch (target ≥ 500,000 samples/s), the bytes it stores against
/// `narrow` (the narrow partitions' B/sample), and the `samples` view's decoding speed.
pub async fn alone(store: &Store, pool: &PgPool, narrow: f64) {
    uncompact(pool).await;
    let t = Instant::now();
    let run = store.compact(u32::MAX).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    sqlx::query("vacuum analyze sample_hour")
        .execute(pool)
        .await
        .unwrap();
    let hour_bytes: i64 =
        sqlx::query_scalar("select pg_total_relation_size('sample_hour')::bigint")
            .fetch_one(pool)
            .await
            .unwrap();
    let per = |b: f64| b / run.samples.max(1) as f64;
    let rate = run.samples as f64 / secs;
    println!(
        "compaction: {} hours, {} samples in {secs:.2} s: {rate:.0} samples/s, target ≥ 500000: {}; sample_hour {:.2} B/sample (streams {:.2}) against the narrow partitions' {:.1}",
        run.hours,
        run.samples,
        if rate >= 500_000.0 { "MET" } else { "NOT MET" },
        per(hour_bytes as f64),
        per(run.bytes as f64),
        narrow,
    );
    let other: i64 = sqlx::query_scalar(
        "select (pg_total_relation_size('resource') + pg_total_relation_size('meter') + pg_total_relation_size('series') + pg_total_relation_size('sample_rollup'))::bigint",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    println!(
        "if the narrow rows of compacted hours were dropped (not yet: the API's statistics read them): all tables {:.1} B/sample (sample_hour, rollups, meter/resource/series); target ≤ 12 B: {}",
        per((hour_bytes + other) as f64),
        if per((hour_bytes + other) as f64) <= 12.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    // The samples view over compacted hours: the PL/pgSQL decoders' speed.
    let t = Instant::now();
    let (n, _sum): (i64, Option<f64>) = sqlx::query_as(
        "select count(*), sum(volume) from samples where timestamp < (select watermark from compaction_state)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "samples view over the compacted hours: {n} rows in {secs:.2} s ({:.2} µs/sample, PL/pgSQL decoding)",
        secs * 1e6 / n.max(1) as f64
    );
}
