//! The SQL of docs/sql.md, run against real data in a real PostgreSQL (so the documentation
//! cannot rot), and retention (`retention_days`) dropping whole expired partitions and
//! pruning what has no samples left.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, DurationRound, Utc};
use collector::store::Store;
use serde_json::{Value, json};
use vmeter_core::{Sample, SampleType};
use vmeter_e2e::{Names, create_database, drop_database};

const DOC: &str = include_str!("../../docs/sql.md");
const DASHBOARD: &str = include_str!("../../deploy/grafana/vmeter-dashboard.json");

async fn fresh_db(tag: &str) -> (Names, sqlx::PgPool, sqlx::PgPool) {
    let names = Names::new(tag);
    let admin = create_database(&names).await;
    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    (names, admin, pool)
}

async fn drop_db(names: &Names, admin: &sqlx::PgPool, pool: sqlx::PgPool) {
    pool.close().await;
    drop_database(admin, names).await;
}

fn sample(
    name: &str,
    kind: SampleType,
    unit: &str,
    v: f64,
    rid: &str,
    ts: DateTime<Utc>,
    md: &Value,
) -> Sample {
    Sample {
        name: name.into(),
        kind,
        unit: unit.into(),
        volume: v,
        user_id: Some("u".into()),
        project_id: Some("p".into()),
        resource_id: rid.into(),
        timestamp: ts,
        resource_metadata: Arc::new(md.as_object().unwrap().clone()),
        source: "openstack".into(),
        message_id: uuid::Uuid::new_v4(),
        monotonic_time: None,
    }
}

/// The `-- name:` blocks of docs/sql.md.
fn doc_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = DOC.lines();
    while let Some(l) = lines.next() {
        if l.trim() != "```sql" {
            continue;
        }
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        let name = body
            .first()
            .and_then(|l| l.strip_prefix("-- name: "))
            .expect("every sql block starts with -- name:")
            .trim()
            .to_string();
        out.push((name, body[1..].join("\n")));
    }
    out
}

/// Two VMs over the last 20 minutes, one sample a minute (see the body); returns the
/// minute the data ends at.
async fn seed(store: &mut Store) -> DateTime<Utc> {
    // Two VMs over the last 20 minutes, one sample a minute: vm-a 1 vCPU at 25 %, vm-b
    // 2 vCPUs at 50 %; RSS growing 1 MiB a minute; one disk and one NIC with fixed rates.
    // vm-b is resized (flavor m1.small → m1.medium, same vCPUs) after 8 minutes.
    let now = Utc::now().duration_trunc(Duration::minutes(1)).unwrap();
    let mut batch = Vec::new();
    for (vm, vcpus, util, rss0) in [("vm-a", 1, 0.25, 100.0), ("vm-b", 2, 0.5, 200.0)] {
        let md = json!({"name": vm, "host": "compute-1", "cpu_number": vcpus});
        let disk_md =
            json!({"name": vm, "host": "compute-1", "cpu_number": vcpus, "disk_name": "vda"});
        let nic_md =
            json!({"name": vm, "instance_name": vm, "vnic_name": "tap0", "cpu_number": vcpus});
        for k in 0..20 {
            let ts = now - Duration::minutes(20 - k);
            let mut md = md.clone();
            if vm == "vm-b" {
                md["flavor"] = json!(if k < 8 { "m1.small" } else { "m1.medium" });
            }
            let ns = k as f64 * 60e9 * util * vcpus as f64;
            batch.push(sample("cpu", SampleType::Cumulative, "ns", ns, vm, ts, &md));
            batch.push(sample(
                "cpu_util",
                SampleType::Gauge,
                "%",
                util * 100.0,
                vm,
                ts,
                &md,
            ));
            batch.push(sample(
                "memory.resident",
                SampleType::Gauge,
                "MiB",
                rss0 + k as f64,
                vm,
                ts,
                &md,
            ));
            let disk = format!("{vm}-vda");
            batch.push(sample(
                "disk.device.read.bytes.rate",
                SampleType::Gauge,
                "B/s",
                1000.0,
                &disk,
                ts,
                &disk_md,
            ));
            batch.push(sample(
                "disk.device.write.bytes.rate",
                SampleType::Gauge,
                "B/s",
                2000.0,
                &disk,
                ts,
                &disk_md,
            ));
            let nic = format!("{vm}-tap0");
            batch.push(sample(
                "network.incoming.bytes.rate",
                SampleType::Gauge,
                "B/s",
                300.0,
                &nic,
                ts,
                &nic_md,
            ));
            batch.push(sample(
                "network.outgoing.bytes.rate",
                SampleType::Gauge,
                "B/s",
                400.0,
                &nic,
                ts,
                &nic_md,
            ));
        }
    }
    store.write(&batch).await.unwrap();
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_sql_answers_the_dashboard_questions() {
    let (names, admin, pool) = fresh_db("q").await;
    let mut store = Store::new(pool.clone());
    store.migrate().await.unwrap();

    seed(&mut store).await;

    let queries = doc_queries();
    assert_eq!(queries.len(), 8, "the eight documented queries");
    let mut results: HashMap<String, Vec<Value>> = HashMap::new();
    for (name, sql) in &queries {
        let wrapped = format!(
            "select to_jsonb(t) from ({}) t",
            sql.trim().trim_end_matches(';')
        );
        let rows: Vec<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(wrapped))
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!rows.is_empty(), "{name} returned nothing");
        results.insert(name.clone(), rows);
    }
    let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    for name in [
        "cpu_per_minute",
        "cpu_per_minute_from_counter",
        "cpu_per_5_minutes",
    ] {
        for r in &results[name] {
            let want = if r["vm"] == "vm-a" { 25.0 } else { 50.0 };
            assert_eq!(num(&r["cpu_percent"]), want, "{name}: {r}");
        }
    }
    for r in &results["cpu_all_vms"] {
        assert_eq!(
            num(&r["busy_vcpus"]),
            1.25,
            "0.25 × 1 + 0.5 × 2 vCPUs busy: {r}"
        );
        assert_eq!(r["vms"], 2);
    }
    let rss_a = results["memory_rss_max_5_minutes"]
        .iter()
        .filter(|r| r["vm"] == "vm-a")
        .map(|r| num(&r["rss_mib_max"]))
        .fold(0.0, f64::max);
    assert_eq!(rss_a, 119.0);
    for r in &results["disk_bytes_per_second"] {
        assert_eq!(
            (num(&r["read_bps"]), num(&r["write_bps"])),
            (1000.0, 2000.0),
            "{r}"
        );
        assert_eq!(r["disk"], "vda");
    }
    for r in &results["nic_bytes_per_second"] {
        assert_eq!(
            (num(&r["rx_bps"]), num(&r["tx_bps"])),
            (300.0, 400.0),
            "{r}"
        );
    }
    let changed: Vec<(&Value, f64)> = results["attribution_changes"]
        .iter()
        .map(|r| (&r["resource_id"], num(&r["samples"])))
        .collect();
    assert_eq!(
        changed,
        vec![(&json!("vm-b"), 24.0)],
        "vm-b's first 8 minutes of cpu, cpu_util and memory.resident"
    );
    drop_db(&names, &admin, pool).await;
}

/// A panel's SQL as Grafana's PostgreSQL data source sends it: `$__timeFrom()`,
/// `$__timeTo()`, `$__timeFilter(col)` and `$__timeGroupAlias(col, interval)` expanded as
/// its macros do, `$__interval` as `1m`, and
/// a multi-value variable as its quoted values (`${vm:sqlstring}`).
fn render(sql: &str, from: DateTime<Utc>, to: DateTime<Utc>, vms: &[&str]) -> String {
    let mut s = sql.replace("$__interval", "'1m'");
    s = s.replace(
        "${vm:sqlstring}",
        &vms.iter()
            .map(|v| format!("'{v}'"))
            .collect::<Vec<_>>()
            .join(","),
    );
    s = s.replace("$__timeFrom()", &format!("'{}'", from.to_rfc3339()));
    s = s.replace("$__timeTo()", &format!("'{}'", to.to_rfc3339()));
    while let Some(at) = s.find("$__timeFilter(") {
        let end = at + s[at..].find(')').expect("closed");
        let col = &s[at + "$__timeFilter(".len()..end];
        let expanded = format!(
            "{col} BETWEEN '{}' AND '{}'",
            from.to_rfc3339(),
            to.to_rfc3339()
        );
        s.replace_range(at..=end, &expanded);
    }
    while let Some(at) = s.find("$__timeGroupAlias(") {
        let end = at + s[at..].find(')').expect("closed");
        let args = &s[at + "$__timeGroupAlias(".len()..end];
        let (col, interval) = args.split_once(',').expect("column, interval");
        let secs = match interval.trim().trim_matches('\'') {
            "1m" => 60,
            "5m" => 300,
            other => panic!("interval {other}"),
        };
        let expanded = format!(
            "floor(extract(epoch from {})/{secs})*{secs} AS \"time\"",
            col.trim()
        );
        s.replace_range(at..=end, &expanded);
    }
    assert!(!s.contains('$'), "a macro or variable left: {s}");
    s
}

/// The Grafana dashboard (deploy/grafana): every panel's SQL, rendered as Grafana renders it,
/// answers on real data with the columns its format needs, and the values the data holds.
/// No Grafana runs here: the JSON is checked for what the panels need (a query per panel on
/// the dashboard's data source variable), not rendered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboards_panels_answer_on_real_data() {
    let (names, admin, pool) = fresh_db("graf").await;
    let mut store = Store::new(pool.clone());
    store.migrate().await.unwrap();
    let now = seed(&mut store).await;

    let dash: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let vars = dash["templating"]["list"].as_array().expect("variables");
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS" && v["type"] == "datasource")
    );
    // The VM variable's query lists the VMs.
    let vm_var = vars
        .iter()
        .find(|v| v["name"] == "vm")
        .expect("a vm variable");
    let listed: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(
        vm_var["query"].as_str().expect("a query").to_string(),
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(listed, ["vm-a", "vm-b"]);

    let (from, to) = (now - Duration::hours(1), now + Duration::minutes(1));
    let answers = panel_answers(&pool, &dash, from, to).await;
    check_panels(&answers);

    // The same panels once those hours are compacted (data time moved on by a sample of
    // another meter three hours later), their narrow rows deleted: the same answers, from
    // the compacted rows (samples_between decodes them).
    let clock = sample(
        "clock",
        SampleType::Gauge,
        "s",
        1.0,
        "clock",
        now + Duration::hours(3),
        &json!({}),
    );
    store.write(&[clock]).await.unwrap();
    store
        .roll_up(now + Duration::hours(4), Duration::minutes(10), 100)
        .await
        .unwrap();
    let run = store.compact(100).await.unwrap();
    let wm = run.watermark.expect("compacted");
    assert!(wm > to, "{run:?}");
    let deleted = sqlx::query("delete from sample where ts < $1")
        .bind(wm)
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert!(deleted >= 20 * 2 * 2, "{deleted}");
    assert_eq!(
        panel_answers(&pool, &dash, from, to).await,
        answers,
        "the panels over compacted hours"
    );
    drop_db(&names, &admin, pool).await;
}

/// Every panel's rows (as JSON), by title, over `[from, to]`.
async fn panel_answers(
    pool: &sqlx::PgPool,
    dash: &Value,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> HashMap<String, Vec<Value>> {
    let mut answers: HashMap<String, Vec<Value>> = HashMap::new();
    let panels = dash["panels"].as_array().expect("panels");
    assert_eq!(panels.len(), 7);
    for panel in panels {
        let title = panel["title"].as_str().expect("a title").to_string();
        let target = &panel["targets"][0];
        assert_eq!(target["datasource"]["uid"], "${DS}", "{title}");
        let sql = render(
            target["rawSql"].as_str().expect("rawSql"),
            from,
            to,
            &["vm-a", "vm-b"],
        );
        let rows: Vec<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select to_jsonb(t) from ({sql}) t"
        )))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
        assert!(!rows.is_empty(), "{title} answered nothing");
        if target["format"] == "time_series" {
            for r in &rows {
                assert!(
                    r["time"].is_number() && r["metric"].is_string() && r["value"].is_number(),
                    "{title}: a time series row needs time, metric, value: {r}"
                );
            }
        }
        answers.insert(title, rows);
    }
    answers
}

/// The values the seeded data holds, in each panel.
fn check_panels(answers: &HashMap<String, Vec<Value>>) {
    let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    let values = |title: &str, metric: &str| -> Vec<f64> {
        answers[title]
            .iter()
            .filter(|r| r["metric"] == metric)
            .map(|r| num(&r["value"]))
            .collect()
    };
    let all_equal = |v: Vec<f64>, want: f64, what: &str| {
        assert!(
            !v.is_empty() && v.iter().all(|x| (x - want).abs() < 1e-9),
            "{what}: {v:?}"
        );
    };
    all_equal(values("CPU % per VM", "vm-a"), 25.0, "vm-a CPU");
    all_equal(values("CPU % per VM", "vm-b"), 50.0, "vm-b CPU");
    let rss = values("Memory used per VM (MiB)", "vm-a");
    assert_eq!(rss.iter().copied().fold(0.0, f64::max), 119.0);
    all_equal(
        values("Disk bytes/s per VM and device", "vm-a vda read"),
        1000.0,
        "disk read",
    );
    all_equal(
        values("Disk bytes/s per VM and device", "vm-b vda write"),
        2000.0,
        "disk write",
    );
    all_equal(
        values("NIC bytes/s per VM and interface", "vm-a tap0 rx"),
        300.0,
        "rx",
    );
    all_equal(
        values("NIC bytes/s per VM and interface", "vm-b tap0 tx"),
        400.0,
        "tx",
    );
    all_equal(
        values("Fleet: busy vCPUs per host", "compute-1"),
        1.25,
        "busy vCPUs per host",
    );
    all_equal(
        values("Fleet: busy vCPUs per project", "p"),
        1.25,
        "busy vCPUs per project",
    );
    let top = &answers["Fleet: top 10 VMs by CPU"];
    assert_eq!(top[0]["vm"], "vm-b", "{top:?}");
    assert_eq!(num(&top[0]["cpu_percent_avg"]), 50.0);
    assert_eq!(top.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_expired_days_and_prunes() {
    let (names, admin, pool) = fresh_db("t").await;
    let mut store = Store::new(pool.clone());
    store.migrate().await.unwrap();
    let now = Utc::now();
    let md = json!({"name": "x"});
    let day = |d: i64| now - Duration::days(d);
    store
        .write(&[
            sample(
                "old.meter",
                SampleType::Gauge,
                "B",
                1.0,
                "r-old",
                day(5),
                &md,
            ),
            sample(
                "cpu_util",
                SampleType::Gauge,
                "%",
                1.0,
                "r-old",
                day(5),
                &md,
            ),
            sample(
                "cpu_util",
                SampleType::Gauge,
                "%",
                2.0,
                "r-both",
                day(5),
                &json!({"name": "x", "flavor": "before a resize"}),
            ),
            sample(
                "cpu_util",
                SampleType::Gauge,
                "%",
                3.0,
                "r-both",
                day(0),
                &md,
            ),
        ])
        .await
        .unwrap();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("select count(*) from sample").await, 4);
    // Rollups of the closed hours: the three series of 5 days ago (the newest sample's
    // hour is not closed).
    let run = store
        .roll_up(now, Duration::minutes(10), 10_000)
        .await
        .unwrap();
    assert!(run.caught_up, "{run:?}");
    assert_eq!(count("select count(*) from sample_rollup").await, 3);

    let r = store.apply_retention(now, 2).await.unwrap();
    assert_eq!(r.rollup_rows, 3, "the rollups of the dropped day: {r:?}");
    assert_eq!(count("select count(*) from sample_rollup").await, 0);
    assert_eq!(r.partitions.len(), 1, "the day of 5 days ago: {r:?}");
    assert_eq!(
        (r.resources, r.meters),
        (2, 1),
        "r-old, r-both's attribution before its resize and old.meter pruned: {r:?}"
    );
    assert_eq!(count("select count(*) from sample").await, 1);
    assert_eq!(count("select count(*) from resource").await, 1);
    assert_eq!(count("select count(*) from meter").await, 1);
    assert_eq!(count("select count(*) from series").await, 1);
    // Today's partition and the ones ahead stay; a second run finds nothing.
    assert!(
        store
            .apply_retention(now, 2)
            .await
            .unwrap()
            .partitions
            .is_empty()
    );
    // Data arriving later for a pruned meter recreates it.
    store
        .write(&[sample(
            "old.meter",
            SampleType::Gauge,
            "B",
            1.0,
            "r-old",
            now,
            &md,
        )])
        .await
        .unwrap();
    assert_eq!(count("select count(*) from meter").await, 2);
    drop_db(&names, &admin, pool).await;
}
