//! The ingest bench's compaction figures (issue 18, docs/design-compaction.md), on the data
//! the bench loaded: ingest while the job runs, the API's answer from compacted hours, the
//! job alone and what it stores.

use std::time::{Duration, Instant};

use collector::store::Store;
use sqlx::PgPool;
use vmeter_core::amqp::{BrokerConfig, Publisher};

use super::{PER_MESSAGE_POINTS, POINTS, RESOURCES, counters, publish_all, uncompact};

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
    publish_all(publisher, cfg, second, RESOURCES * PER_MESSAGE_POINTS).await;
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
    let (rows, [median, min, max]) = latency(http, one_resource).await;
    assert_eq!(rows, POINTS, "the compacted answer has every sample");
    println!(
        "API one resource's 10,000 samples, its hours compacted (decoded from sample_hour): median {median:.1} ms of 20 (min {min:.1}, max {max:.1}); target ≤ 20 ms: {}",
        if median <= 20.0 { "MET" } else { "NOT MET" }
    );
}

/// The rows of `path`'s answer, then its latency over 20 requests: median, min, max (ms).
async fn latency(http: &str, path: &str) -> (usize, [f64; 3]) {
    let probe = Probe {
        label: "timed",
        path: path.to_string(),
        body: None,
    };
    latency_of(http, &probe).await
}

/// The median latency of each probe, ms (20 requests after a warm-up).
pub async fn probe_latencies(http: &str, probes: &[Probe]) -> Vec<f64> {
    let mut out = Vec::new();
    for p in probes {
        out.push(latency_of(http, p).await.1[0]);
    }
    out
}

async fn latency_of(http: &str, probe: &Probe) -> (usize, [f64; 3]) {
    let rows = serde_json::from_slice::<serde_json::Value>(
        &answers(http, std::slice::from_ref(probe)).await[0],
    )
    .ok()
    .and_then(|v| v.as_array().map(Vec::len))
    .unwrap_or(0);
    let mut ms = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let raw = request(http, probe).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(raw.starts_with(b"HTTP/1.1 200") || raw.starts_with(b"HTTP/1.0 200"));
    }
    ms.sort_by(f64::total_cmp);
    (rows, [ms[ms.len() / 2], ms[0], ms[ms.len() - 1]])
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

/// One request whose answer must not change when its hours are compacted: a path, and for
/// a complex query the body to POST.
pub struct Probe {
    pub label: &'static str,
    path: String,
    body: Option<String>,
}

impl Probe {
    /// A `GET` of `path`.
    pub fn get(label: &'static str, path: String) -> Probe {
        Probe {
            label,
            path,
            body: None,
        }
    }
}

/// The probes over the first load's hours `[t0, t0 + 27 h)` (the second load comes later):
/// a listing, statistics by whole minutes and unaligned, with groups and a cardinality, a
/// project's samples, a complex query.
pub fn probes(t0: chrono::DateTime<chrono::Utc>, rid: &str) -> Vec<Probe> {
    let iso = |h: i64, s: i64| {
        (t0 + chrono::Duration::hours(h) + chrono::Duration::seconds(s))
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string()
    };
    let range = format!(
        "q.field=timestamp&q.op=ge&q.value={}&q.field=timestamp&q.op=lt&q.value={}",
        iso(0, 0),
        iso(27, 0)
    );
    let unaligned = format!(
        "q.field=timestamp&q.op=ge&q.value={}&q.field=timestamp&q.op=lt&q.value={}",
        iso(0, 7),
        iso(27, 0)
    );
    let complex = serde_json::json!({
        "filter": format!(
            r#"{{"and": [{{"=": {{"resource_id": "{rid}"}}}}, {{">=": {{"timestamp": "{}"}}}}, {{"<": {{"timestamp": "{}"}}}}]}}"#,
            iso(3, 0),
            iso(9, 0)
        ),
        "orderby": r#"[{"counter_volume": "asc"}]"#,
        "limit": 500,
    });
    let p = |label, path: String| Probe {
        label,
        path,
        body: None,
    };
    vec![
        p(
            "one resource's samples",
            format!("/v2/meters/cpu_util?q.field=resource_id&q.value={rid}&{range}&limit=10000"),
        ),
        p(
            "statistics period=60 by resource",
            format!("/v2/meters/cpu_util/statistics?period=60&groupby=resource_id&{range}"),
        ),
        p(
            "statistics period=3600",
            format!("/v2/meters/cpu_util/statistics?period=3600&{range}"),
        ),
        p(
            "statistics period=60, start 7 s past a minute, by resource",
            format!("/v2/meters/cpu_util/statistics?period=60&groupby=resource_id&{unaligned}"),
        ),
        p(
            "statistics period=600 by flavor with project cardinality and stddev",
            format!(
                "/v2/meters/cpu_util/statistics?period=600&groupby=resource_metadata.instance_type&aggregate.func=cardinality&aggregate.param=project_id&aggregate.func=stddev&aggregate.func=sum&{range}"
            ),
        ),
        p(
            "statistics without a period",
            format!("/v2/meters/cpu_util/statistics?{range}"),
        ),
        p(
            "a project's samples",
            format!("/v2/samples?q.field=project_id&q.value=project-3&{range}&limit=2000"),
        ),
        Probe {
            label: "complex query, one resource, 6 hours, by volume",
            path: "/v2/query/samples".into(),
            body: Some(complex.to_string()),
        },
    ]
}

/// The answers' bodies (status line and headers cut off: the `Date` header changes).
pub async fn answers(http: &str, probes: &[Probe]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for p in probes {
        let raw = request(http, p).await;
        let at = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(raw.len(), |i| i + 4);
        assert!(
            raw.starts_with(b"HTTP/1.1 200") || raw.starts_with(b"HTTP/1.0 200"),
            "{}: {}",
            p.label,
            String::from_utf8_lossy(&raw[..raw.len().min(300)])
        );
        assert!(raw.len() > at + 2, "{}: an empty answer", p.label);
        out.push(raw[at..].to_vec());
    }
    out
}

async fn request(addr: &str, p: &Probe) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = match &p.body {
        None => format!("GET {} HTTP/1.0\r\nHost: {addr}\r\n\r\n", p.path),
        Some(b) => format!(
            "POST {} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            p.path,
            b.len()
        ),
    };
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::with_capacity(64 * 1024);
    s.read_to_end(&mut buf).await.unwrap();
    buf
}

/// Today's layout, measured before compaction: the probes' answers and median latencies,
/// and (bytes of every table, samples).
pub struct Before {
    pub answers: Vec<Vec<u8>>,
    pub bytes: (i64, i64),
    pub ms: Vec<f64>,
}

/// Moves data time four days past `t0` (one `bench.clock` sample), rolls up and compacts
/// every closed hour and drops the compacted days' narrow partitions, as the collector's
/// jobs would: the job's run and the partitions dropped.
pub async fn advance_and_compact(
    store: &Store,
    pool: &PgPool,
    t0: chrono::DateTime<chrono::Utc>,
) -> (collector::store::compact::CompactRun, Vec<String>) {
    let mut clock = super::message(
        0,
        &super::all_metadata(),
        &vec!["clock".to_string(); RESOURCES],
    );
    clock.truncate(1);
    clock[0].name = "bench.clock".into();
    clock[0].timestamp = t0 + chrono::Duration::days(4);
    let mut writer = Store::new(pool.clone());
    writer.write(&clock).await.unwrap();
    store
        .roll_up(chrono::Utc::now(), chrono::Duration::seconds(600), u32::MAX)
        .await
        .unwrap();
    let run = store.compact(u32::MAX).await.unwrap();
    let dropped = store.drop_compacted_days().await.unwrap();
    (run, dropped)
}

/// How many updates of the attribution and series rows (every batch moves their first and
/// last times) stayed on their page (HOT: no new index entries; schema versions 7 and 8).
pub async fn hot_updates(pool: &PgPool) -> String {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "select relname::text, n_tup_upd, n_tup_hot_upd from pg_stat_user_tables
          where relname in ('resource', 'series') order by relname",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.iter()
        .map(|(t, upd, hot)| format!("{t} rows updated {upd} times, {hot} of them in place (HOT)"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The largest tables' bytes per sample (of `samples`) by name, the rest together.
pub async fn by_table(pool: &PgPool, samples: i64) -> String {
    let parts: Vec<(String, i64)> = sqlx::query_as(
        "select c.relname::text, pg_total_relation_size(c.oid)::bigint from pg_class c
           join pg_namespace n on n.oid = c.relnamespace
          where n.nspname = 'public' and c.relkind = 'r' order by 2 desc",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut shown: Vec<String> = parts
        .iter()
        .take(5)
        .map(|(name, b)| format!("{name} {:.2}", *b as f64 / samples as f64))
        .collect();
    let rest: i64 = parts.iter().skip(5).map(|p| p.1).sum();
    shown.push(format!(
        "{} others {:.2}",
        parts.len().saturating_sub(5),
        rest as f64 / samples as f64
    ));
    shown.join(", ")
}

/// Bytes of every table of the database (heap, indexes, TOAST), after `vacuum analyze`.
pub async fn all_tables(pool: &PgPool) -> i64 {
    sqlx::query("vacuum analyze").execute(pool).await.unwrap();
    sqlx::query_scalar(
        "select sum(pg_total_relation_size(c.oid))::bigint from pg_class c
           join pg_namespace n on n.oid = c.relnamespace
          where n.nspname = 'public' and c.relkind = 'r'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The final layout: data time moved on (a sample three days later), every closed hour
/// rolled up and compacted, the narrow partitions of the compacted days dropped. Then what
/// it costs against `before_bytes` (the same data in today's layout, measured earlier in
/// this run), whether `probes` answer `before` byte for byte, and the API's latency on it.
pub async fn final_layout(
    store: &Store,
    pool: &PgPool,
    http: &str,
    probes: &[Probe],
    before: &Before,
    timed: &[(&str, String, f64)],
) {
    let Before {
        answers: before,
        bytes: before_bytes,
        ms: before_ms,
    } = before;
    let (run, dropped) = advance_and_compact(store, pool, super::t0()).await;
    let samples: i64 = sqlx::query_scalar(
        "select (select coalesce(sum(n), 0) from sample_hour) + (select count(*) from sample)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let bytes = all_tables(pool).await;
    let narrow_left: i64 = sqlx::query_scalar("select count(*) from sample")
        .fetch_one(pool)
        .await
        .unwrap();
    let per = bytes as f64 / samples as f64;
    println!(
        "compacted layout by table, B/sample: {}",
        by_table(pool, samples).await
    );
    println!("{}", hot_updates(pool).await);
    println!(
        "compacted layout: watermark {:?}, partitions dropped {dropped:?}, {narrow_left} narrow rows left; all tables {:.1} MB for {samples} samples = {per:.2} B/sample, target ≤ 12: {}; today's layout in this run: {:.1} MB for {} samples = {:.2} B/sample",
        run.watermark,
        bytes as f64 / 1e6,
        if per <= 12.0 { "MET" } else { "NOT MET" },
        before_bytes.0 as f64 / 1e6,
        before_bytes.1,
        before_bytes.0 as f64 / before_bytes.1 as f64,
    );

    // The same answers, byte for byte.
    let after = answers(http, probes).await;
    for ((p, b), a) in probes.iter().zip(before).zip(&after) {
        assert!(
            a == b,
            "{}: the answer changed after compaction ({} bytes before, {} after)",
            p.label,
            b.len(),
            a.len()
        );
    }
    println!(
        "answers before and after compaction: {} of {} byte for byte the same ({} KiB): {}",
        after.len(),
        probes.len(),
        after.iter().map(Vec::len).sum::<usize>() / 1024,
        probes
            .iter()
            .map(|p| p.label)
            .collect::<Vec<_>>()
            .join("; ")
    );

    let after_ms = probe_latencies(http, probes).await;
    for ((p, b), a) in probes.iter().zip(before_ms).zip(&after_ms) {
        println!(
            "probe {}: median {b:.1} ms in today's layout, {a:.1} ms compacted",
            p.label
        );
    }

    // Latency with everything compacted, median of 20 after a warm-up.
    for (label, path, target_ms) in timed {
        let (rows, [median, min, max]) = latency(http, path).await;
        println!(
            "API {label}, everything compacted: median {median:.1} ms of 20 ({rows} rows; min {min:.1}, max {max:.1}); target ≤ {target_ms} ms: {}",
            if median <= *target_ms {
                "MET"
            } else {
                "NOT MET"
            }
        );
    }
}
