//! Compacted closed hours (issue 18, migration 0005) on a real PostgreSQL:
//!
//! - the `samples` view returns the same rows, bit for bit, before and after compaction
//!   (after it, the hours before the compaction watermark come from `sample_hour`, decoded
//!   by the PL/pgSQL decoders), with attributions that change within an hour;
//! - the job is resumable: cancelled at arbitrary points (a dropped transaction, as a
//!   crash leaves it), then run again, it ends in the same state;
//! - late samples for compacted hours, from several collectors at once with redeliveries
//!   and the job running alongside, are merged exactly once (the first sample of a time
//!   wins, as in the narrow table);
//! - retention removes the compacted hours of the days it drops.
//!
//! The narrow rows of compacted hours are kept in this version, so the test compares the
//! view with what the narrow table says.

use chrono::{DateTime, Duration, TimeZone, Utc};
use collector::store::Store;
use collector::store::compact::{self, CompactRun};
use vmeter_core::{Metadata, Sample, SampleType};
use vmeter_e2e::{Names, create_database, drop_database};

/// The view's rows: (timestamp µs, meter, type, unit, volume bits, resource, user,
/// project, source, metadata text).
type Row = (
    i64,
    String,
    String,
    String,
    u64,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

/// A row as fetched: the volume as a float.
type Fetched = (
    i64,
    String,
    String,
    String,
    f64,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

/// `select … from <relation>` in one order, volumes as their bits.
async fn rows(pool: &sqlx::PgPool, relation: &str) -> Vec<Row> {
    let q = format!(
        "select (extract(epoch from timestamp) * 1000000)::int8, meter, type, unit, volume,
                resource_id, user_id, project_id, source, resource_metadata::text
           from {relation}
          order by resource_id, meter, timestamp, project_id"
    );
    let raw: Vec<Fetched> = sqlx::query_as(sqlx::AssertSqlSafe(q))
        .fetch_all(pool)
        .await
        .unwrap();
    raw.into_iter()
        .map(|r| (r.0, r.1, r.2, r.3, r.4.to_bits(), r.5, r.6, r.7, r.8, r.9))
        .collect()
}

/// The narrow table alone, joined as the view joins it: what the view must show.
const NARROW: &str = "(select s.ts as timestamp, m.name as meter, m.type, m.unit, s.volume,
                               r.resource_id, r.user_id, r.project_id, r.source,
                               r.metadata as resource_metadata
                          from sample s join meter m on m.id = s.meter_id
                          join resource r on r.id = s.resource_id) n";

fn sample(
    meter: &str,
    kind: SampleType,
    rid: &str,
    project: &str,
    flavor: &str,
    ts: DateTime<Utc>,
    v: f64,
) -> Sample {
    let mut md = Metadata::new();
    md.insert("instance_type".into(), flavor.into());
    md.insert("host".into(), "compute-1".into());
    Sample {
        name: meter.into(),
        kind,
        unit: if kind == SampleType::Gauge {
            "%".into()
        } else {
            "ns".into()
        },
        volume: v,
        user_id: Some("u".into()),
        project_id: Some(project.into()),
        resource_id: rid.into(),
        timestamp: ts,
        resource_metadata: std::sync::Arc::new(md),
        source: "openstack".into(),
        message_id: uuid::Uuid::new_v4(),
        monotonic_time: None,
    }
}

/// Three hours of agent-like data from `t0`: per VM a cycle every 10 s with µs jitter,
/// `cpu_util` (noisy floats) and `cpu` (a counter); vm-2 moves to another project and is
/// resized in the middle of the second hour.
fn data(t0: DateTime<Utc>) -> Vec<Sample> {
    let mut out = Vec::new();
    for vm in 0..4 {
        let rid = format!("vm-{vm}");
        for k in 0..(3 * 360) {
            let ts =
                t0 + Duration::seconds(k * 10) + Duration::microseconds((k * 7919 + vm) % 4000);
            let (project, flavor) = if vm == 2 && k >= 540 {
                ("p-new", "m1.large")
            } else {
                ("p", "m1.small")
            };
            let util = 37.5 + (k as f64 * 0.37 + vm as f64).sin() * 21.123_456_789;
            out.push(sample(
                "cpu_util",
                SampleType::Gauge,
                &rid,
                project,
                flavor,
                ts,
                util,
            ));
            out.push(sample(
                "cpu",
                SampleType::Cumulative,
                &rid,
                project,
                flavor,
                ts,
                (k * 4_250_000_000 + vm * 17) as f64,
            ));
        }
    }
    out
}

async fn watermark(pool: &sqlx::PgPool) -> Option<DateTime<Utc>> {
    let mut c = pool.acquire().await.unwrap();
    compact::watermark(&mut c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_hours_read_the_same_resume_and_take_late_samples_once() {
    let names = Names::new("compact");
    let admin = create_database(&names).await;
    let pool = collector::store::pool(&names.db_url(), 6).unwrap();
    let mut store = Store::new(pool.clone());
    store.migrate().await.unwrap();

    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap();
    let all = data(t0);
    for chunk in all.chunks(1000) {
        store.write(chunk).await.unwrap();
    }
    let before = rows(&pool, "samples").await;
    assert_eq!(before.len(), all.len());
    assert_eq!(before, rows(&pool, NARROW).await);

    // Rolled up: 10:00 and 11:00 (the newest sample is 12:59:50; 10 min of lag).
    let run = store
        .roll_up(Utc::now(), Duration::minutes(10), 100)
        .await
        .unwrap();
    assert!(run.caught_up, "{run:?}");
    assert_eq!(run.watermark, Some(t0 + Duration::hours(2)));

    // Cancelled at arbitrary points (a crash mid-transaction), then run to the end.
    for cut_us in [300, 1_000, 3_000, 10_000, 30_000] {
        let s = Store::new(pool.clone());
        let _ = tokio::time::timeout(std::time::Duration::from_micros(cut_us), async move {
            s.compact(1).await
        })
        .await;
        let wm = watermark(&pool).await;
        assert!(
            wm.is_none()
                || wm == Some(t0 + Duration::hours(1))
                || wm == Some(t0 + Duration::hours(2)),
            "the watermark is on an hour: {wm:?}"
        );
        assert_eq!(
            rows(&pool, "samples").await,
            before,
            "after a cut at {cut_us} µs"
        );
    }
    let run: CompactRun = store.compact(1).await.unwrap();
    let run2 = store.compact(100).await.unwrap();
    assert!(run2.caught_up, "{run:?} {run2:?}");
    assert_eq!(watermark(&pool).await, Some(t0 + Duration::hours(2)));
    let (hours, n): (i64, i64) =
        sqlx::query_as("select count(distinct hour), coalesce(sum(n), 0)::int8 from sample_hour")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(hours, 2);
    // Two hours of 4 VMs × 2 meters × 360 cycles.
    assert_eq!(n, 2 * 4 * 2 * 360);
    // The view now decodes those two hours: the same rows, bit for bit.
    assert_eq!(rows(&pool, "samples").await, before);
    // samples_between: the view's rows in a range (both ends included), across the
    // watermark, from a range that starts mid-hour and ends on a sample's time.
    for (from, to) in [
        ("2026-03-01 10:30:00+00", "2026-03-01 12:30:00.004+00"),
        ("2026-03-01 09:00:00+00", "2026-03-01 10:00:10.003919+00"),
        ("2026-03-01 11:59:59+00", "2026-03-01 13:00:00+00"),
    ] {
        let range = format!("'{from}'::timestamptz and '{to}'::timestamptz");
        let want = rows(
            &pool,
            &format!("(select * from samples where timestamp between {range}) v"),
        )
        .await;
        assert!(!want.is_empty());
        assert_eq!(
            rows(&pool, &format!("samples_between('{from}', '{to}') f")).await,
            want,
            "{from} .. {to}"
        );
    }

    // Late samples for the compacted hours, from four collectors at once, each batch also
    // delivered twice, while the job runs: a new time in an existing series, a redelivery
    // of a stored time with another value (ignored: the first wins), and a new series.
    let mut tasks = Vec::new();
    for w in 0..4i64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Store::new(pool);
            for round in 0..10i64 {
                let at =
                    t0 + Duration::seconds(5 + round * 10 + w * 600) + Duration::hours(round % 2);
                let batch = vec![
                    sample(
                        "cpu_util",
                        SampleType::Gauge,
                        "vm-1",
                        "p",
                        "m1.small",
                        at,
                        99.0 + w as f64,
                    ),
                    // vm-1's first stored time (jitter 1 µs), another value.
                    sample(
                        "cpu_util",
                        SampleType::Gauge,
                        "vm-1",
                        "p",
                        "m1.small",
                        t0 + Duration::microseconds(1),
                        -1.0,
                    ),
                    sample(
                        "cpu_util",
                        SampleType::Gauge,
                        &format!("late-{w}"),
                        "p",
                        "m1.small",
                        at,
                        1.5,
                    ),
                ];
                s.write(&batch).await.unwrap();
                s.write(&batch).await.unwrap();
            }
        }));
    }
    let job = {
        let s = Store::new(pool.clone());
        tokio::spawn(async move { s.compact(100).await })
    };
    for t in tasks {
        t.await.unwrap();
    }
    job.await.unwrap().unwrap();
    // Late samples of compacted hours are stored in their compacted rows only: the view
    // shows what was there plus each new time once.
    let after = rows(&pool, "samples").await;
    let like = before
        .iter()
        .find(|r| r.5 == "vm-1" && r.1 == "cpu_util")
        .unwrap()
        .clone();
    let mut want = before.clone();
    for w in 0..4i64 {
        for round in 0..10i64 {
            let at = t0 + Duration::seconds(5 + round * 10 + w * 600) + Duration::hours(round % 2);
            let mut r = like.clone();
            (r.0, r.4) = (at.timestamp_micros(), (99.0 + w as f64).to_bits());
            want.push(r.clone());
            (r.4, r.5) = (1.5f64.to_bits(), format!("late-{w}"));
            want.push(r);
        }
    }
    want.sort_by(|a, b| (&a.5, &a.1, a.0, &a.7).cmp(&(&b.5, &b.1, b.0, &b.7)));
    assert_eq!(
        after, want,
        "the compacted rows took every late sample once"
    );
    assert_eq!(
        rows(&pool, NARROW).await,
        before,
        "late samples of compacted hours are not written to the narrow table"
    );
    // The redelivered first sample kept its first value.
    let first: f64 = sqlx::query_scalar(
        "select volume from samples where resource_id = 'vm-1' and meter = 'cpu_util' and timestamp = $1",
    )
    .bind(t0 + Duration::microseconds(1))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_ne!(first, -1.0);
    let n: i64 = sqlx::query_scalar("select sum(n)::int8 from sample_hour")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 2 * 4 * 2 * 360 + 4 * 10 * 2);

    // Retention of the day drops its compacted hours with its partition.
    let compacted_rows: i64 = sqlx::query_scalar("select count(*) from sample_hour")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(compacted_rows >= 8 + 8, "{compacted_rows}");
    let gone = store
        .apply_retention(t0 + Duration::days(3), 1)
        .await
        .unwrap();
    assert_eq!(gone.compacted_rows as i64, compacted_rows);
    let left: i64 = sqlx::query_scalar("select count(*) from sample_hour")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert!(rows(&pool, "samples").await.is_empty());

    drop_database(&admin, &names).await;
}

/// The API's sample listings read compacted hours (before the watermark) from
/// `sample_hour`: their answers are byte for byte the same before compaction, after it, and
/// after the narrow rows of the compacted hours are deleted (what a later version does), so
/// they cannot have come from those rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_the_same_from_compacted_hours() {
    use vmeter_e2e::http::request;
    use vmeter_e2e::{Service, listen_addr};

    let names = Names::new("compapi");
    let logs = names.dir("compapi");
    let admin = create_database(&names).await;
    let pool = collector::store::pool(&names.db_url(), 4).unwrap();
    let mut store = Store::new(pool.clone());
    store.migrate().await.unwrap();
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap();
    for chunk in data(t0).chunks(1000) {
        store.write(chunk).await.unwrap();
    }
    // A sparse series (every 5 minutes one sample, every third time two in the same
    // minute: fewer than two per minute, so its rollup rows have no minutes and the
    // statistics read its samples; a minute's pair added first would round differently).
    let sparse: Vec<Sample> = (0..36)
        .flat_map(|k| {
            let ts = t0 + Duration::seconds(k * 300 + 17) + Duration::microseconds(k * 31);
            // Chosen so that (sum + a) + b != sum + (a + b) in every half hour.
            let v = 0.7 * (k % 6 + 1) as f64;
            let pair = (k % 3 == 0).then(|| (ts + Duration::seconds(20), 0.1 * (k % 6 + 1) as f64));
            [(ts, v)].into_iter().chain(pair).map(|(ts, v)| {
                sample(
                    "disk.usage",
                    SampleType::Gauge,
                    "vm-1",
                    "p",
                    "m1.small",
                    ts,
                    v,
                )
            })
        })
        .collect();
    store.write(&sparse).await.unwrap();
    store
        .roll_up(Utc::now(), Duration::minutes(10), 100)
        .await
        .unwrap();

    // The collector's API on this database; its own jobs off (the test compacts).
    let addr = listen_addr();
    let mut env = names.env("compapi-secret");
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));
    env.push(("VMETER_DATABASE__ROLLUP_INTERVAL_SECS".into(), "0".into()));
    let mut collector = Service::start("collector", "collector", &[], &env, &logs);
    // A path, or `POST <path> <body>` (a complex query).
    let get = |path: String| {
        let addr = addr.clone();
        async move {
            for _ in 0..300 {
                if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let (code, body) = match path.strip_prefix("POST ") {
                Some(rest) => {
                    let (p, body) = rest.split_once(' ').unwrap();
                    request(&addr, "POST", p, &[], Some(body)).await
                }
                None => request(&addr, "GET", &path, &[], None).await,
            };
            assert_eq!(code, 200, "{path}: {body}");
            body
        }
    };
    let paths = [
        // One series, all of it (two compacted hours, one narrow).
        "/v2/meters/cpu_util?q.field=resource_id&q.value=vm-1&limit=100000".to_string(),
        // A resource with two attributions, cut by the limit inside the compacted hours.
        "/v2/meters/cpu_util?q.field=resource_id&q.value=vm-2&limit=500".to_string(),
        // Every resource (read whole, not streamed), a range inside the compacted hours.
        "/v2/meters/cpu?q.field=timestamp&q.op=ge&q.value=2026-03-01T10:30:00&q.field=timestamp&q.op=lt&q.value=2026-03-01T11:15:00&limit=100000".to_string(),
        // Every meter, up to a time, with a limit.
        "/v2/samples?q.field=timestamp&q.op=le&q.value=2026-03-01T11:30:00.5&limit=3000".to_string(),
        // A project (the attribution vm-2 moved to), and a metadata filter.
        "/v2/samples?q.field=project_id&q.value=p-new&limit=100000".to_string(),
        "/v2/meters/cpu_util?q.field=metadata.instance_type&q.value=m1.large&limit=100000".to_string(),
        // A range across the watermark (12:00).
        "/v2/meters/cpu_util?q.field=timestamp&q.op=gt&q.value=2026-03-01T11:58:00&q.field=timestamp&q.op=le&q.value=2026-03-01T12:02:00&limit=100000".to_string(),
    ];
    // Statistics: whole minutes (per-minute aggregates: rollups, then compacted hours),
    // unaligned (every sample), groups, cardinalities, the sparse series, across the
    // watermark. Their sums are compared as the same bytes.
    let stats = [
        "/v2/meters/cpu_util/statistics?period=60",
        "/v2/meters/cpu_util/statistics?period=60&groupby=resource_id&groupby=project_id",
        "/v2/meters/cpu/statistics?period=300&q.field=timestamp&q.op=ge&q.value=2026-03-01T10:05:00&q.field=timestamp&q.op=lt&q.value=2026-03-01T12:40:00",
        "/v2/meters/cpu_util/statistics?period=60&q.field=timestamp&q.op=ge&q.value=2026-03-01T10:00:07",
        "/v2/meters/cpu_util/statistics?period=7.5&groupby=resource_metadata.instance_type",
        "/v2/meters/cpu_util/statistics?period=600&aggregate.func=cardinality&aggregate.param=project_id&aggregate.func=stddev&aggregate.func=avg",
        "/v2/meters/cpu_util/statistics?groupby=user_id",
        "/v2/meters/disk.usage/statistics?period=60",
        "/v2/meters/disk.usage/statistics?period=1800&groupby=resource_id&q.field=timestamp&q.op=ge&q.value=2026-03-01T10:00:00",
        "/v2/meters/disk.usage/statistics?period=13&q.field=timestamp&q.op=gt&q.value=2026-03-01T10:20:00",
        "/v2/meters/cpu/statistics?period=60&q.field=timestamp&q.op=gt&q.value=2026-03-01T11:58:00&q.field=timestamp&q.op=le&q.value=2026-03-01T12:02:00&groupby=resource_id",
        "/v2/meters/cpu_util/statistics?q.field=resource_id&q.value=vm-2&q.field=timestamp&q.op=le&q.value=2026-03-01T11:30:00.5",
    ];
    // Complex queries (the filter and order as JSON in strings, as Ceilometer's client
    // sends them): series-level and sample-level conditions, orders with ties.
    let complex = |filter: &str, orderby: &str, limit: u32| {
        format!(
            "POST /v2/query/samples {}",
            serde_json::json!({"filter": filter, "orderby": orderby, "limit": limit})
        )
    };
    let complex = [
        complex(
            r#"{"and": [{"=": {"counter_name": "cpu_util"}}, {"=": {"resource_id": "vm-2"}}]}"#,
            r#"[{"counter_volume": "asc"}]"#,
            50,
        ),
        complex(
            r#"{"or": [{"=": {"project_id": "p-new"}}, {">": {"counter_volume": 58.5}}]}"#,
            r#"[{"project_id": "desc"}, {"timestamp": "asc"}]"#,
            5000,
        ),
        complex(
            r#"{"and": [{">": {"timestamp": "2026-03-01T11:50:00"}}, {"<=": {"timestamp": "2026-03-01T12:10:00"}}, {"=": {"resource_metadata.instance_type": "m1.small"}}]}"#,
            "",
            100000,
        ),
        complex(
            r#"{"not": {"in": {"counter_name": ["cpu", "disk.usage"]}}}"#,
            r#"[{"resource_id": "asc"}]"#,
            700,
        ),
    ];
    let paths: Vec<String> = paths
        .into_iter()
        .chain(stats.iter().map(|s| s.to_string()))
        .chain(complex)
        .collect();
    let mut before = Vec::new();
    for p in &paths {
        before.push(get(p.clone()).await);
    }
    // One compacted sample by its id.
    let listed: serde_json::Value = serde_json::from_str(&before[2]).unwrap();
    let id = listed[17]["message_id"].as_str().unwrap().to_string();
    let one = format!("/v2/samples/{id}");
    before.push(get(one.clone()).await);
    let all_paths: Vec<String> = paths.iter().cloned().chain([one]).collect();
    assert!(
        before.iter().all(|b| b.len() > 2),
        "every answer has samples"
    );

    let rollups = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from sample_rollup where hour < $1")
            .bind(t0 + Duration::hours(2))
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(
        rollups().await,
        2 * (4 * 2 + 1) + 2,
        "vm-2's two attributions, the sparse series"
    );
    store.compact(100).await.unwrap();
    assert_eq!(watermark(&pool).await, Some(t0 + Duration::hours(2)));
    // The compacted hours' rollups are gone: their minutes come from sample_hour.
    assert_eq!(rollups().await, 0);
    for (p, b) in all_paths.iter().zip(&before) {
        assert_eq!(&get(p.clone()).await, b, "after compaction: {p}");
    }
    // Without the narrow rows of the compacted hours: still the same answers.
    let deleted = sqlx::query("delete from sample where ts < $1")
        .bind(t0 + Duration::hours(2))
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 2 * 4 * 2 * 360 + 24 + 8);
    for (p, b) in all_paths.iter().zip(&before) {
        assert_eq!(&get(p.clone()).await, b, "from sample_hour alone: {p}");
    }

    // The next day: a sample two hours in (another resource and project, outside every
    // query above) closes the whole first day; rolled up and compacted, its narrow
    // partition is dropped (an hour after the watermark passed its end).
    let clock = sample(
        "cpu",
        SampleType::Cumulative,
        "clock",
        "p-clock",
        "m1.small",
        t0 + Duration::hours(16),
        0.0,
    );
    store.write(std::slice::from_ref(&clock)).await.unwrap();
    store
        .roll_up(Utc::now(), Duration::minutes(10), 100)
        .await
        .unwrap();
    let run = store.compact(100).await.unwrap();
    assert_eq!(run.watermark, Some(t0 + Duration::hours(15)));
    assert_eq!(
        store.drop_compacted_days().await.unwrap(),
        vec!["sample_p20260301".to_string()]
    );
    for (p, b) in all_paths.iter().zip(&before) {
        assert_eq!(&get(p.clone()).await, b, "the day's partition dropped: {p}");
    }
    // A late sample for that day, from a collector that never saw its partition: merged into
    // its compacted row; no partition is made again.
    let late = sample(
        "disk.usage",
        SampleType::Gauge,
        "vm-1",
        "p",
        "m1.small",
        t0 + Duration::minutes(150) + Duration::microseconds(3),
        42.0,
    );
    let mut fresh = Store::new(pool.clone());
    let written = fresh.write(std::slice::from_ref(&late)).await.unwrap();
    assert_eq!(written.inserted, 1);
    assert_eq!(
        fresh
            .write(std::slice::from_ref(&late))
            .await
            .unwrap()
            .inserted,
        0,
        "a redelivery"
    );
    let partitions: Vec<String> =
        collector::store::partition_days(&mut pool.acquire().await.unwrap())
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.0)
            .collect();
    assert!(
        !partitions.contains(&"sample_p20260301".to_string()),
        "{partitions:?}"
    );
    let (code, body) = request(
        &addr,
        "GET",
        "/v2/meters/disk.usage?q.field=timestamp&q.op=ge&q.value=2026-03-01T12:30:00&q.field=timestamp&q.op=lt&q.value=2026-03-01T12:30:01",
        &[],
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(listed[0]["counter_volume"], 42.0, "{body}");

    // A compacted row that does not decode (a forged or damaged stream): the listings that
    // need it answer 500 and say which row, the others still answer, nothing panics.
    sqlx::query(
        "update sample_hour set v = '\\x01ffffffff'::bytea
          where hour = $1 and resource_id in (select id from resource where resource_id = 'vm-1')",
    )
    .bind(t0)
    .execute(&pool)
    .await
    .unwrap();
    let (code, body) = request(&addr, "GET", &paths[2], &[], None).await;
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("internal error"), "{body}");
    assert_eq!(
        &get(paths[4].clone()).await,
        &before[4],
        "another project's listing"
    );
    assert!(
        matches!(collector.child.try_wait(), Ok(None)),
        "{}",
        collector.log_text()
    );
    assert!(
        collector.log_text().contains("does not decode"),
        "the log names the row: {}",
        collector.log_text()
    );

    drop(collector);
    drop_database(&admin, &names).await;
}
