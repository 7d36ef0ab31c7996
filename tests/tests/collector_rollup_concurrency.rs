//! Late samples folded into an hour that is already rolled up, by several collectors at
//! once (each its own connection pool, as separate processes would be), with redeliveries
//! and the rollup job running alongside: afterwards the hour's per-minute rollup must equal
//! what its samples say, exactly, and every sample must be stored once.
//!
//! What keeps it exact (docs/storage.md, "Rollups"): a writer locks the hour's rollup row
//! before it recomputes the row from a snapshot taken after the lock. Writers of the same
//! resource no longer serialise on anything else (the resource and series rows are upserted
//! in short transactions of their own), so this lock is the guard: without the `for update`
//! this test failed in 4 runs of 5, without the fold in every run.

use chrono::{DateTime, Duration, DurationRound, Utc};
use collector::store::Store;
use collector::store::rollup::{self, Minute};
use vmeter_core::Sample;
use vmeter_e2e::{Names, cpu_util_sample, create_database, drop_database};

/// Rounds of concurrent late writes (the more, the likelier an unsafe interleaving shows).
const ROUNDS: i64 = 180;

fn sample(v: f64, ts: DateTime<Utc>) -> Sample {
    cpu_util_sample("vm-1", v, ts)
}

/// Per-minute aggregates of `(ts, volume)` in the hour starting at `hour`, computed here
/// from the stored samples (not by the collector's code).
fn expected(hour: DateTime<Utc>, rows: &[(DateTime<Utc>, f64)]) -> Vec<Minute> {
    let mut out: Vec<Minute> = Vec::new();
    let mut rows = rows.to_vec();
    rows.sort_by_key(|r| r.0);
    for (ts, v) in rows {
        let us = (ts - hour).num_microseconds().unwrap();
        let minute = (us / 60_000_000) as i16;
        let within = (us % 60_000_000) as i32;
        match out.last_mut() {
            Some(m) if m.minute == minute => {
                m.n += 1;
                m.last_us = within;
                m.sum += v;
                m.min = m.min.min(v);
                m.max = m.max.max(v);
                m.sumsq += v * v;
            }
            _ => out.push(Minute {
                minute,
                n: 1,
                first_us: within,
                last_us: within,
                sum: v,
                min: v,
                max: v,
                sumsq: v * v,
            }),
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_samples_from_several_collectors_at_once_stay_exact() {
    let names = Names::new("rollconc");
    let admin = create_database(&names).await;
    let pool = collector::store::pool(&names.db_url(), 4).unwrap();
    let mut first = Store::new(pool.clone());
    first.migrate().await.unwrap();

    // Hour H, three hours ago: two samples a minute; a sample now closes H for the job.
    let now = Utc::now();
    let hour = (now - Duration::hours(3))
        .duration_trunc(Duration::hours(1))
        .unwrap();
    let mut base = Vec::new();
    for m in 0..60 {
        for k in 0..2 {
            let ts = hour + Duration::seconds(m * 60 + 10 + k * 30);
            base.push(sample((m * 2 + k) as f64 * 0.5, ts));
        }
    }
    base.push(sample(1.0, now));
    first.write(&base).await.unwrap();
    let run = first
        .roll_up(now, Duration::minutes(10), 10_000)
        .await
        .unwrap();
    assert!(run.hours >= 1, "{run:?}");
    let mut conn = pool.acquire().await.unwrap();
    let watermark = rollup::watermark(&mut conn)
        .await
        .unwrap()
        .expect("rolled up");
    drop(conn);
    assert!(watermark > hour + Duration::hours(1));

    // Four collectors, each with its own pool, write late samples into H at once, in
    // several rounds; the second resends the first's batch (a redelivery); the rollup job
    // runs alongside.
    let mut stores = Vec::new();
    for _ in 0..4 {
        let p = collector::store::pool(&names.db_url(), 2).unwrap();
        stores.push(Store::new(p));
    }
    for round in 0..ROUNDS {
        let batch = |w: i64| -> Vec<Sample> {
            (0..5)
                .map(|i| {
                    // Minutes shared between writers, so they fold the same minutes; seconds
                    // 11..30, distinct from the base samples' (a series keeps one sample
                    // per timestamp) and from each other's; the minute repeats every 60 rounds,
                    // the millisecond tells those rounds apart.
                    let sec = ((round * 7 + w * 3 + i * 11) % 60) * 60 + 11 + w * 5 + i;
                    sample(
                        1000.0 + (round * 100 + w * 10 + i) as f64,
                        hour + Duration::seconds(sec) + Duration::milliseconds(round / 60 * 100),
                    )
                })
                .collect()
        };
        let batches: Vec<Vec<Sample>> = (0..4).map(batch).collect();
        let redelivered = batches[0].clone();
        let mut tasks = Vec::new();
        for (w, (mut store, b)) in stores.drain(..).zip(batches).enumerate() {
            let again = (w == 1).then(|| redelivered.clone());
            tasks.push(tokio::spawn(async move {
                let own = store.write(&b).await.unwrap();
                let again = match again {
                    Some(a) => Some(store.write(&a).await.unwrap()),
                    None => None,
                };
                (store, own, again)
            }));
        }
        let job = {
            let s = Store::new(pool.clone());
            tokio::spawn(async move { s.roll_up(Utc::now(), Duration::minutes(10), 100).await })
        };
        let mut first_batch = 0;
        for t in tasks {
            let (store, own, again) = t.await.unwrap();
            if stores.is_empty() {
                // Writer 0's batch, which writer 1 also sends.
                first_batch += own.inserted;
            } else {
                assert_eq!(own.inserted, 5, "writer {}", stores.len());
            }
            if let Some(a) = again {
                first_batch += a.inserted;
                assert_eq!(a.inserted + a.duplicates, 5);
            }
            stores.push(store);
        }
        assert_eq!(
            first_batch, 5,
            "the first batch and its redelivery: stored once"
        );
        job.await.unwrap().unwrap();
    }

    // The rollup of H against the samples of H.
    let (packed,): (Option<Vec<u8>>,) = sqlx::query_as(
        "select ro.minutes from sample_rollup ro
           join meter m on m.id = ro.meter_id join resource r on r.id = ro.resource_id
          where m.name = 'cpu_util' and r.resource_id = 'vm-1' and ro.hour = $1",
    )
    .bind(hour)
    .fetch_one(&pool)
    .await
    .unwrap();
    let packed = packed.expect("a dense hour is packed");
    // Every minute has samples: the full-hour layout, without minute numbers.
    assert_eq!(packed.len(), 60 * rollup::DENSE_RECORD);
    let got: Vec<Minute> = rollup::unpack(&packed).collect();
    let rows: Vec<(DateTime<Utc>, f64)> = sqlx::query_as(
        "select s.ts, s.volume from sample s
           join meter m on m.id = s.meter_id join resource r on r.id = s.resource_id
          where m.name = 'cpu_util' and r.resource_id = 'vm-1'
            and s.ts >= $1 and s.ts < $1 + interval '1 hour'",
    )
    .bind(hour)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows.len() as i64,
        120 + ROUNDS * 4 * 5,
        "every late sample stored once"
    );
    let want = expected(hour, &rows);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            (g.minute, g.n, g.first_us, g.last_us),
            (w.minute, w.n, w.first_us, w.last_us),
            "minute {}",
            w.minute
        );
        assert!(
            close(g.sum, w.sum) && close(g.sumsq, w.sumsq) && g.min == w.min && g.max == w.max,
            "minute {}: {g:?} vs {w:?}",
            w.minute
        );
    }

    for s in stores {
        s.pool().close().await;
    }
    pool.close().await;
    drop_database(&admin, &names).await;
}

/// A write that waits for its turn (the previous batch's insert) must not hold
/// `ROLLUP_LOCK` while it waits: with the rollup job queued for the lock exclusively, the
/// previous batch's shared request queues behind the job, and neither batch ever finishes
/// (PostgreSQL cannot see the wait for the turn). A collector restarted after a crash, with
/// its rollup job starting while two redelivered batches were written, stored nothing more
/// for a minute in CI this way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_its_turn_does_not_block_the_rollup_job() {
    use collector::store::{InsertTurn, locks};

    let names = Names::new("rollturn");
    let admin = create_database(&names).await;
    let pool = collector::store::pool(&names.db_url(), 4).unwrap();
    let mut first = Store::new(pool.clone());
    first.migrate().await.unwrap();
    let now = Utc::now();
    first.write(&[sample(1.0, now)]).await.unwrap();

    // The second batch's write starts first: its turn comes after the first batch's insert.
    let mut last = None;
    let turn1 = InsertTurn::next(&mut last);
    let turn2 = InsertTurn::next(&mut last);
    let mut second = Store::new(pool.clone());
    let write2 = tokio::spawn(async move {
        let mut turn2 = turn2;
        second
            .write_in_turn(&[sample(2.0, now + Duration::seconds(2))], &mut turn2)
            .await
    });
    // Until it waits for its turn: its own rows (meter, series) are committed before that,
    // and (before the fix) it then took ROLLUP_LOCK shared.
    let held = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from pg_locks where locktype = 'advisory' and granted
               and ((classid::bigint << 32) | objid::bigint) = $1",
        )
        .bind(locks::ROLLUP_LOCK)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while held(pool.clone()).await == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!write2.is_finished(), "the second write waits for its turn");

    // The rollup job asks for the lock exclusively, on a connection of its own.
    let job = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            locks::exclusive(&mut tx, locks::ROLLUP_LOCK).await.unwrap();
            tx.commit().await.unwrap();
        })
    };
    // Then the first batch is written; both writes and the job must finish.
    let mut turn1 = turn1;
    let mut store1 = Store::new(pool.clone());
    let within = std::time::Duration::from_secs(20);
    let w1 = tokio::time::timeout(
        within,
        store1.write_in_turn(&[sample(3.0, now + Duration::seconds(1))], &mut turn1),
    )
    .await
    .expect("the first batch's write is not blocked by the second's turn")
    .unwrap();
    assert_eq!(w1.inserted, 1);
    drop(turn1);
    let w2 = tokio::time::timeout(within, write2)
        .await
        .expect("the second batch's write finishes")
        .unwrap()
        .unwrap();
    assert_eq!(w2.inserted, 1);
    tokio::time::timeout(within, job)
        .await
        .expect("the rollup job gets its lock")
        .unwrap();

    pool.close().await;
    drop_database(&admin, &names).await;
}
