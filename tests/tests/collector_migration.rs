//! Storage migration 0004 (per-sample attribution) on a database written by the previous
//! schema, against the real PostgreSQL.
//!
//! The database is migrated to version 3 and filled the way the version-3 collector wrote
//! it (one `resource` row per resource with its newest sample's owner and metadata, daily
//! partitions, series, a rolled-up hour). Migrating to the current version must keep every
//! row of the `samples` view and every rollup as it was, rewrite no sample, and from then
//! on give new samples their own attribution while old ones keep the one they had; a new
//! sample with exactly a migrated attribution reuses its row.

use chrono::{DateTime, TimeZone, Utc};
use collector::store::{MIGRATOR, Store};
use vmeter_e2e::{Names, cpu_util_sample, create_database, drop_database};

fn t(sec: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap() + chrono::Duration::seconds(sec)
}

/// Every row of the `samples` view as text, in a fixed order.
async fn view(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "select row_to_json(s)::text from samples s order by resource_id, meter, timestamp",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_keeps_old_rows_and_attributes_new_samples_per_sample() {
    let names = Names::new("mig");
    let admin = create_database(&names).await;
    let pool = collector::store::pool(&names.db_url(), 4).unwrap();
    MIGRATOR.run_to(3, &pool).await.unwrap();

    // What the version-3 collector wrote.
    for sql in [
        "insert into meter (name, type, unit) values ('cpu_util', 'gauge', '%'), ('memory', 'gauge', 'MB')",
        r#"insert into resource (resource_id, user_id, project_id, source, metadata, first_seen, last_seen) values
           ('vm-a', 'u1', 'p2', 'openstack', '{"flavor": {"name": "m1.large", "vcpus": 4}, "host": "h1", "ratio": 0.5}', '2026-03-01 10:00:00+00', '2026-03-01 11:59:50+00'),
           ('vm-b', null, 'p1', 'openstack', '{}', '2026-03-01 10:00:00+00', '2026-03-01 10:00:20+00')"#,
        "create table sample_p20260301 partition of sample for values from ('2026-03-01 00:00:00+00') to ('2026-03-02 00:00:00+00')",
        "insert into sample (ts, meter_id, resource_id, volume)
         select '2026-03-01 10:00:00+00'::timestamptz + make_interval(secs => 10 * i), m.id, r.id, i
         from generate_series(0, 719) i, meter m, resource r
         where m.name = 'cpu_util' and r.resource_id = 'vm-a'",
        "insert into sample (ts, meter_id, resource_id, volume)
         select '2026-03-01 10:00:00+00'::timestamptz + make_interval(secs => 10 * i), m.id, r.id, 100 + i
         from generate_series(0, 2) i, meter m, resource r
         where m.name = 'memory' and r.resource_id = 'vm-b'",
        "insert into series (meter_id, resource_id, first_ts, last_ts)
         select meter_id, resource_id, min(ts), max(ts) from sample group by 1, 2",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    // The rollup job of version 3 rolls up the first hour.
    Store::new(pool.clone())
        .roll_up(Utc::now(), chrono::Duration::zero(), 100)
        .await
        .unwrap();
    let before = view(&pool).await;
    let rollups_before: Vec<String> =
        sqlx::query_scalar("select row_to_json(x)::text from sample_rollup x order by 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    let ctids_before: Vec<String> =
        sqlx::query_scalar("select ctid::text from sample order by meter_id, resource_id, ts")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(before.len(), 723);
    assert_eq!(
        rollups_before.len(),
        2,
        "10:00 of vm-a and vm-b (11:00 is still open)"
    );

    // Migrate (what the collector does at start-up).
    let mut store = Store::new(pool.clone());
    store.migrate().await.unwrap();
    let version: i64 = sqlx::query_scalar("select max(version) from _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(version >= 4, "{version}");
    assert_eq!(view(&pool).await, before, "the samples view is unchanged");
    let rollups_after: Vec<String> =
        sqlx::query_scalar("select row_to_json(x)::text from sample_rollup x order by 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rollups_after, rollups_before);
    let ctids_after: Vec<String> =
        sqlx::query_scalar("select ctid::text from sample order by meter_id, resource_id, ts")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(ctids_after, ctids_before, "no sample row rewritten");

    // vm-a moves to project p3 with another flavor: new samples get a new attribution.
    let mut moved = Vec::new();
    for i in 0..3 {
        let mut s = cpu_util_sample("vm-a", 50.0 + i as f64, t(7200 + 10 * i));
        s.user_id = Some("u1".into());
        s.project_id = Some("p3".into());
        s.resource_metadata = std::sync::Arc::new(
            serde_json::json!({"flavor": {"name": "m1.xlarge", "vcpus": 8}, "host": "h2"})
                .as_object()
                .unwrap()
                .clone(),
        );
        moved.push(s);
    }
    // And one more sample exactly as the migrated attribution (same metadata, keys in
    // another order): it reuses the migrated row.
    let mut same = cpu_util_sample("vm-a", 99.0, t(7230));
    same.user_id = Some("u1".into());
    same.project_id = Some("p2".into());
    same.resource_metadata = std::sync::Arc::new(
        serde_json::json!({"ratio": 0.5, "host": "h1", "flavor": {"vcpus": 4, "name": "m1.large"}})
            .as_object()
            .unwrap()
            .clone(),
    );
    moved.push(same);
    let w = store.write(&moved).await.unwrap();
    assert_eq!(w.inserted, 4);
    let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(
        "select project_id, count(*), min(resource_metadata #>> '{flavor,name}') from samples
         where resource_id = 'vm-a' group by 1 order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("p2".into(), 721, Some("m1.large".into())),
            ("p3".into(), 3, Some("m1.xlarge".into()))
        ]
    );
    let attributions: i64 =
        sqlx::query_scalar("select count(*) from resource where resource_id = 'vm-a'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attributions, 2, "the p2 sample reused the migrated row");
    let latest: (String, DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "select project_id, first_seen, last_seen from resource_latest where resource_id = 'vm-a'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        latest,
        ("p2".into(), t(0), t(7230)),
        "the newest sample is p2's"
    );
    // The old samples, as they were.
    let old: Vec<String> = view(&pool)
        .await
        .into_iter()
        .filter(|r| before.contains(r))
        .collect();
    assert_eq!(old.len(), before.len());

    pool.close().await;
    drop_database(&admin, &names).await;
}
