//! The compacted-hour codec (issue 18, `collector::store::hourcodec`; not used by the storage
//! yet) decoded by its PL/pgSQL decoders in a real PostgreSQL: what SQL users will read must
//! be, bit for bit, what the collector encoded. Streams that are not the codec's raise an
//! error (SQLSTATE XX001), never a wrong answer. Prints the decoders' speed.

use std::time::Instant;

use collector::store::hourcodec::{SQL_DECODERS, encode_timestamps, encode_volumes};
use vmeter_e2e::{Names, create_database, drop_database};

/// Series shaped as an agent's hour and edge cases: (timestamps µs, volumes).
fn series() -> Vec<(Vec<i64>, Vec<f64>)> {
    let mut rng = fastrand::Rng::with_seed(18);
    let hour = 1_800_000_000_000_000i64;
    let jittered: Vec<i64> = (0..360)
        .map(|k| hour + k * 10_000_000 + rng.i64(-4_000..4_000))
        .collect();
    let mut c = 1e12;
    let counter: Vec<f64> = (0..360)
        .map(|_| {
            c += (rng.u32(0..4000) * 512) as f64;
            c
        })
        .collect();
    let rate: Vec<f64> = (0..360).map(|_| rng.f64() * 100.0).collect();
    let mut out = vec![
        (jittered.clone(), counter),
        (jittered.clone(), rate),
        (jittered, vec![4096.0; 360]),
        (vec![hour], vec![-0.0]),
        (vec![], vec![]),
        // Irregular gaps (a delta-of-delta in every bucket) and extreme finite volumes.
        (
            vec![
                hour,
                hour + 1,
                hour + 200,
                hour + 20_000,
                hour + 2_000_000,
                hour + 3_599_999_999,
                -5,
                0,
            ],
            vec![
                0.0,
                5e-324,
                f64::MIN_POSITIVE,
                f64::MAX,
                f64::MIN,
                1.0 / 3.0,
                -1e-300,
                123456789.125,
            ],
        ),
    ];
    // Random finite doubles of every exponent.
    let random: Vec<f64> = (0..2000)
        .map(|_| f64::from_bits(rng.u64(..)))
        .filter(|v| v.is_finite())
        .collect();
    let ts: Vec<i64> = (0..random.len() as i64).map(|k| hour + k * 997).collect();
    out.push((ts, random));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_decoders_read_what_the_collector_encodes() {
    let names = Names::new("hcodec");
    let admin = create_database(&names).await;
    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(SQL_DECODERS))
        .execute(&pool)
        .await
        .unwrap();

    // Warm-up: the session compiles the functions at their first call.
    sqlx::query("select vmeter_hour_timestamps($1), vmeter_hour_volumes($2)")
        .bind(encode_timestamps(&[1, 2, 3]))
        .bind(encode_volumes(&[1.0, 2.5, 3.0]))
        .execute(&pool)
        .await
        .unwrap();
    let (mut samples, mut spent) = (0usize, 0f64);
    let mut agent = (0usize, 0f64);
    for (i, (ts, v)) in series().into_iter().enumerate() {
        let (tb, vb) = (encode_timestamps(&ts), encode_volumes(&v));
        let started = Instant::now();
        let (got_ts, got_v): (Vec<i64>, Vec<f64>) =
            sqlx::query_as("select vmeter_hour_timestamps($1), vmeter_hour_volumes($2)")
                .bind(&tb)
                .bind(&vb)
                .fetch_one(&pool)
                .await
                .unwrap();
        let took = started.elapsed().as_secs_f64();
        spent += took;
        samples += v.len();
        if i < 3 {
            // The agent-shaped hours: a counter, a rate, a flat gauge.
            agent = (agent.0 + v.len(), agent.1 + took);
        }
        assert_eq!(got_ts, ts);
        assert_eq!(got_v.len(), v.len());
        for (i, (g, w)) in got_v.iter().zip(&v).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "volume {i}: {g:e} for {w:e}");
        }
    }
    println!(
        "PL/pgSQL decoding (timestamps and volumes, one query per series-hour): agent-shaped hours {:.1} µs/sample; all {samples} samples (with 2,000 random doubles) {:.1} µs/sample",
        agent.1 * 1e6 / agent.0 as f64,
        spent * 1e6 / samples as f64
    );

    // Streams that are not the codec's: an error with SQLSTATE XX001, never rows.
    let good = encode_volumes(&[1.0, 2.0, 3.0]);
    let mut short = good.clone();
    short[4] = 200;
    let forged: Vec<u8> = vec![1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0b1000_0000];
    for bad in [vec![7u8, 0, 0, 0, 0], vec![1u8, 0], short, forged] {
        let e = sqlx::query("select vmeter_hour_volumes($1)")
            .bind(&bad)
            .execute(&pool)
            .await
            .expect_err("a broken stream is an error");
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .unwrap_or_default();
        assert_eq!(code, "XX001", "{bad:?}: {e}");
    }

    pool.close().await;
    drop_database(&admin, &names).await;
}

/// A compacted hour replaces its rollup row only if the per-minute aggregates computed from
/// its decoded samples are the rollup job's, bit for bit. They are when both add in time
/// order: the samples are written in shuffled batches (their rows' physical order is not
/// time order), rolled up by the job, and each minute is compared with
/// `rollup::minutes_of` over the same samples in time order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollup_jobs_minutes_are_the_samples_minutes_in_time_order() {
    use chrono::{DurationRound, TimeZone, Utc};
    use collector::store::Store;
    use collector::store::rollup::{self, minutes_of};
    use vmeter_core::Sample;

    let names = Names::new("hminutes");
    let admin = create_database(&names).await;
    // Sequential scans only: the job then meets the rows in their physical order, as it may
    // on any plan; an index scan would hand them over in time order by chance.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "alter database {} set enable_indexscan = off",
        names.database
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "alter database {} set enable_bitmapscan = off",
        names.database
    )))
    .execute(&admin)
    .await
    .unwrap();
    let pool = collector::store::pool(&names.db_url(), 2).unwrap();
    let mut store = Store::new(pool.clone());
    store.migrate().await.unwrap();

    let now = Utc::now();
    let hour = (now - chrono::Duration::hours(3))
        .duration_trunc(chrono::Duration::hours(1))
        .unwrap();
    let hour_us = hour.timestamp_micros();
    let mut rng = fastrand::Rng::with_seed(42);
    // Three series: a full-precision rate, a counter, values with equal and signed zeros.
    let mut all: Vec<Sample> = Vec::new();
    let mut expected: Vec<(String, Vec<(i64, f64)>)> = Vec::new();
    for (r, rid) in ["rate-vm", "counter-vm", "zeros-vm"]
        .into_iter()
        .enumerate()
    {
        let mut c = 1e15;
        let points: Vec<(i64, f64)> = (0..360)
            .map(|k| {
                let ts = hour_us + k * 10_000_000 + rng.i64(0..5_000);
                let v = match r {
                    0 => rng.f64() * 100.0 / 3.0,
                    1 => {
                        c += (rng.u32(0..4000) * 512) as f64 + 0.1;
                        c
                    }
                    _ => [0.0, -0.0, 1.5, -1.5][rng.usize(0..4)],
                };
                (ts, v)
            })
            .collect();
        for &(ts, v) in &points {
            let mut s = vmeter_e2e::cpu_util_sample(rid, v, Utc.timestamp_micros(ts).unwrap());
            s.name = "hm".into();
            all.push(s);
        }
        expected.push((rid.to_string(), points));
    }
    // Shuffled batches: rows land in an order unrelated to time.
    rng.shuffle(&mut all);
    for batch in all.chunks(97) {
        store.write(batch).await.unwrap();
    }
    store
        .write(&[vmeter_e2e::cpu_util_sample("rate-vm", 1.0, now)])
        .await
        .unwrap();
    let run = store
        .roll_up(now, chrono::Duration::minutes(10), 10_000)
        .await
        .unwrap();
    assert!(run.hours >= 1, "{run:?}");

    for (rid, points) in expected {
        let (packed,): (Option<Vec<u8>>,) = sqlx::query_as(
            "select ro.minutes from sample_rollup ro
               join meter m on m.id = ro.meter_id join resource r on r.id = ro.resource_id
              where m.name = 'hm' and r.resource_id = $1 and ro.hour = $2",
        )
        .bind(&rid)
        .bind(hour)
        .fetch_one(&pool)
        .await
        .unwrap();
        let job: Vec<rollup::Minute> = rollup::unpack(&packed.expect("a dense hour")).collect();
        let ours = minutes_of(hour_us, &points);
        assert_eq!(job.len(), ours.len(), "{rid}");
        for (j, o) in job.iter().zip(&ours) {
            assert_eq!(
                (j.minute, j.n, j.first_us, j.last_us),
                (o.minute, o.n, o.first_us, o.last_us),
                "{rid}"
            );
            for (what, a, b) in [
                ("sum", j.sum, o.sum),
                ("min", j.min, o.min),
                ("max", j.max, o.max),
                ("sumsq", j.sumsq, o.sumsq),
            ] {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{rid} minute {}: {what} {a:e} (job) vs {b:e}",
                    j.minute
                );
            }
        }
    }
    pool.close().await;
    drop_database(&admin, &names).await;
}
