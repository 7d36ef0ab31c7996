//! The collector's v2 API as a real process over a real PostgreSQL (and RabbitMQ for the
//! non-direct POST): samples posted with `direct=true`, then every read endpoint, the
//! statistics semantics of the reference (its worked example included), metadata filters,
//! bearer-token auth with project scoping, and JSON errors.

use std::time::Duration;

use serde_json::{Value, json};
use vmeter_e2e::http::{get_json, request};
use vmeter_e2e::{Names, Service, broker, create_database, drop_database, listen_addr};

const ADMIN: &str = "admin-token-1";
const P1: &str = "project-1-token";

fn sample(rid: &str, project: &str, ts: &str, v: f64, itype: &str) -> Value {
    json!({
        "counter_name": "cpu_util", "counter_type": "gauge", "counter_unit": "%",
        "counter_volume": v, "resource_id": rid, "project_id": project, "user_id": "u1",
        "timestamp": ts, "source": "openstack",
        "resource_metadata": {"instance_type": itype, "flavor.vcpus": 2, "display_name": rid}
    })
}

async fn post(addr: &str, path: &str, token: &str, body: &Value) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (code, text) = request(
        addr,
        "POST",
        path,
        &[("Authorization", &auth)],
        Some(&body.to_string()),
    )
    .await;
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A fresh database and a collector serving it (with `extra` environment); waits for
/// its API. Returns the admin pool, the API address, the service and its log directory.
async fn start_api(
    names: &Names,
    extra: &[(String, String)],
) -> (sqlx::PgPool, String, Service, std::path::PathBuf) {
    let logs = names.dir("api");
    let admin = create_database(names).await;
    let addr = listen_addr();
    let mut env = names.env("api-secret");
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));
    env.extend_from_slice(extra);
    let collector = Service::start("collector", "collector", &[], &env, &logs);
    let mut up = false;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "API never came up:\n{}", collector.log_text());
    (admin, addr, collector, logs)
}

fn faultstring(v: &Value) -> &str {
    v["error_message"]["faultstring"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_api_reads_statistics_auth_and_errors() {
    let names = Names::new("a");
    let auth = [
        ("VMETER_HTTP__ADMIN_TOKENS".into(), format!("[{ADMIN}]")),
        (
            "VMETER_HTTP__PROJECT_TOKENS".into(),
            format!("{{{P1}: project-1}}"),
        ),
    ];
    let (admin, addr, collector, logs) = start_api(&names, &auth).await;

    // Seed: the reference's worked example on vm-a (8, 9, 10 at 10:30, 11:31, 12:32) and two
    // samples of vm-b in another project.
    let a = json!([
        sample("vm-a", "project-1", "2026-03-01T10:30:00", 8.0, "m1.small"),
        sample("vm-a", "project-1", "2026-03-01T11:31:00", 9.0, "m1.small"),
        sample("vm-a", "project-1", "2026-03-01T12:32:00", 10.0, "m1.small"),
    ]);
    let (code, body) = post(&addr, "/v2/meters/cpu_util?direct=true", ADMIN, &a).await;
    assert_eq!(code, 201, "{body}\n{}", collector.log_text());
    assert_eq!(body.as_array().unwrap().len(), 3);
    assert_eq!(body[0]["source"], "project-1:openstack");
    let b = json!([
        sample("vm-b", "project-2", "2026-03-01T10:00:00", 50.0, "m1.large"),
        sample("vm-b", "project-2", "2026-03-01T10:10:00", 70.0, "m1.large"),
    ]);
    assert_eq!(
        post(&addr, "/v2/meters/cpu_util?direct=true", ADMIN, &b)
            .await
            .0,
        201
    );

    // Meters: one per (meter, resource); unique=true one per meter.
    let (code, m) = get_json(&addr, "/v2/meters", Some(ADMIN)).await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(m.as_array().unwrap().len(), 2, "{m}");
    assert_eq!(m[0]["name"], "cpu_util");
    assert_eq!(m[0]["resource_id"], "vm-a");
    assert_eq!(
        m[0]["meter_id"], "dm0tYStjcHVfdXRpbA==",
        "base64 of 'vm-a+cpu_util'"
    );
    let (_, m) = get_json(&addr, "/v2/meters?unique=true", Some(ADMIN)).await;
    assert_eq!(m.as_array().unwrap().len(), 1, "{m}");
    assert!(m[0]["resource_id"].is_null());

    // Statistics, no period: the reference's numbers.
    let (code, st) = get_json(
        &addr,
        "/v2/meters/cpu_util/statistics?q.field=resource_id&q.value=vm-a",
        Some(ADMIN),
    )
    .await;
    assert_eq!(code, 200, "{st}");
    let s = &st[0];
    assert_eq!(
        (&s["count"], &s["min"], &s["max"], &s["sum"], &s["avg"]),
        (
            &json!(3),
            &json!(8.0),
            &json!(10.0),
            &json!(27.0),
            &json!(9.0)
        )
    );
    assert_eq!(s["duration"], json!(7320.0));
    assert_eq!(s["period"], json!(0.0));
    assert_eq!(s["unit"], "%");
    assert!(s["groupby"].is_null());

    // With start 10:28 and period 7200: buckets [10:28, 12:28) and [12:28, 14:28).
    let (_, st) = get_json(&addr, "/v2/meters/cpu_util/statistics?q.field=resource_id&q.value=vm-a&q.field=timestamp&q.op=ge&q.value=2026-03-01T10:28:00&period=7200", Some(ADMIN)).await;
    assert!(st.is_array(), "{st}");
    assert_eq!(st.as_array().unwrap().len(), 2, "{st}");
    assert_eq!(st[0]["count"], 2);
    assert_eq!(st[0]["avg"], json!(8.5));
    assert_eq!(st[0]["duration"], json!(3660.0));
    assert_eq!(st[0]["period_start"], "2026-03-01T10:28:00.000000");
    assert_eq!(st[0]["period_end"], "2026-03-01T12:28:00.000000");
    assert_eq!(st[1]["count"], 1);
    assert_eq!(st[1]["period_start"], "2026-03-01T12:28:00.000000");

    // Group by resource; selectable aggregates only.
    let (_, st) = get_json(
        &addr,
        "/v2/meters/cpu_util/statistics?groupby=resource_id",
        Some(ADMIN),
    )
    .await;
    assert_eq!(st.as_array().unwrap().len(), 2, "{st}");
    let b_row = st
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["groupby"]["resource_id"] == "vm-b")
        .unwrap();
    assert_eq!(b_row["avg"], json!(60.0));
    let (_, st) = get_json(&addr, "/v2/meters/cpu_util/statistics?aggregate.func=cardinality&aggregate.param=resource_id&aggregate.func=stddev", Some(ADMIN)).await;
    assert_eq!(st[0]["aggregate"]["cardinality/resource_id"], 2, "{st}");
    assert!(
        st[0].get("max").is_none(),
        "only requested aggregates: {st}"
    );
    let sd = st[0]["aggregate"]["stddev"].as_f64().unwrap();
    // Population stddev of 8, 9, 10, 50, 70.
    let xs = [8.0, 9.0, 10.0, 50.0, 70.0];
    let mean = xs.iter().sum::<f64>() / 5.0;
    let want = (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 5.0).sqrt();
    assert!((sd - want).abs() < 1e-9, "{sd} vs {want}");
    let (_, st) = get_json(
        &addr,
        "/v2/meters/cpu_util/statistics?groupby=resource_metadata.instance_type",
        Some(ADMIN),
    )
    .await;
    assert_eq!(st.as_array().unwrap().len(), 2, "{st}");

    // Samples: newest first; by id; metadata filter; OldSample shape.
    let (_, ss) = get_json(
        &addr,
        "/v2/samples?q.field=meter&q.value=cpu_util&limit=2",
        Some(ADMIN),
    )
    .await;
    assert_eq!(ss.as_array().unwrap().len(), 2, "{ss}");
    assert_eq!(ss[0]["timestamp"], "2026-03-01T12:32:00.000000");
    assert_eq!(ss[0]["metadata"]["flavor.vcpus"], "2");
    let id = ss[0]["id"].as_str().unwrap().to_string();
    let (code, one) = get_json(&addr, &format!("/v2/samples/{id}"), Some(ADMIN)).await;
    assert_eq!((code, &one["volume"]), (200, &json!(10.0)));
    assert_eq!(
        get_json(&addr, "/v2/samples/0-0-0", Some(ADMIN)).await.0,
        404
    );
    let (_, ms) = get_json(
        &addr,
        "/v2/meters/cpu_util?q.field=metadata.instance_type&q.value=m1.large",
        Some(ADMIN),
    )
    .await;
    assert_eq!(ms.as_array().unwrap().len(), 2, "{ms}");
    assert_eq!(ms[0]["counter_name"], "cpu_util");
    assert_eq!(ms[0]["resource_id"], "vm-b");
    let (_, ms) = get_json(&addr, "/v2/meters/cpu_util?q.field=timestamp&q.op=gt&q.value=2026-03-01T10:30:00&q.field=timestamp&q.op=lt&q.value=2026-03-01T12:32:00", Some(ADMIN)).await;
    assert_eq!(ms.as_array().unwrap().len(), 1, "strict bounds: {ms}");

    // Resources.
    let (_, rs) = get_json(&addr, "/v2/resources", Some(ADMIN)).await;
    assert_eq!(rs.as_array().unwrap().len(), 2, "{rs}");
    let (code, r) = get_json(&addr, "/v2/resources/vm-a", Some(ADMIN)).await;
    assert_eq!(code, 200);
    assert_eq!(r["first_sample_timestamp"], "2026-03-01T10:30:00.000000");
    assert_eq!(r["last_sample_timestamp"], "2026-03-01T12:32:00.000000");
    assert_eq!(r["links"][1]["rel"], "cpu_util", "{r}");
    assert_eq!(
        get_json(&addr, "/v2/resources/nope", Some(ADMIN)).await.0,
        404
    );

    // Auth: none → 401; a project token sees its project only and cannot ask for another.
    let (code, e) = get_json(&addr, "/v2/samples", None).await;
    assert_eq!(code, 401);
    assert!(faultstring(&e).contains("bearer token"), "{e}");
    assert_eq!(get_json(&addr, "/v2/samples", Some("wrong")).await.0, 401);
    let (code, ss) = get_json(&addr, "/v2/samples", Some(P1)).await;
    assert_eq!(code, 200);
    assert_eq!(ss.as_array().unwrap().len(), 3, "project-1 only: {ss}");
    assert!(
        ss.as_array()
            .unwrap()
            .iter()
            .all(|s| s["project_id"] == "project-1")
    );
    let (code, _) = get_json(
        &addr,
        "/v2/samples?q.field=project_id&q.value=project-2",
        Some(P1),
    )
    .await;
    assert_eq!(code, 401);
    let (_, rs) = get_json(&addr, "/v2/resources", Some(P1)).await;
    assert_eq!(rs.as_array().unwrap().len(), 1);
    let (code, _) = post(
        &addr,
        "/v2/meters/cpu_util?direct=true",
        P1,
        &json!([sample(
            "vm-x",
            "project-2",
            "2026-03-01T10:00:00",
            1.0,
            "m1.small"
        )]),
    )
    .await;
    assert_eq!(code, 400, "a project token cannot post for another project");

    // Errors are JSON with a clear message.
    for (path, needle) in [
        ("/v2/samples?limit=0", "Limit must be positive"),
        (
            "/v2/meters/cpu_util/statistics?period=-5",
            "Period must be positive",
        ),
        ("/v2/samples?q.field=bogus&q.value=1", "unrecognized field"),
        (
            "/v2/meters/cpu_util/statistics?groupby=volume",
            "Invalid groupby",
        ),
        (
            "/v2/meters/cpu_util/statistics?aggregate.func=median",
            "Invalid aggregation function",
        ),
        (
            "/v2/samples?q.field=resource_id&q.op=ne&q.value=x",
            "unimplemented operator",
        ),
        (
            "/v2/samples?q.field=timestamp&q.value=yesterday",
            "not ISO-8601",
        ),
    ] {
        let (code, e) = get_json(&addr, path, Some(ADMIN)).await;
        assert_eq!(code, 400, "{path}: {e}");
        assert!(faultstring(&e).contains(needle), "{path}: {e}");
    }
    let (code, text) = request(
        &addr,
        "POST",
        "/v2/meters/cpu_util",
        &[("Authorization", &format!("Bearer {ADMIN}"))],
        Some("{not json"),
    )
    .await;
    assert_eq!(code, 400, "{text}");

    // Without direct=true, posted samples go to the raw queue for the pipeline.
    let conn = broker::connect().await;
    broker::wait_for_queue(&conn, &names.raw_queue, Duration::from_secs(10)).await;
    let (code, body) = post(
        &addr,
        "/v2/meters/cpu_util",
        ADMIN,
        &json!([sample(
            "vm-c",
            "project-1",
            "2026-03-01T10:00:00",
            5.0,
            "m1.small"
        )]),
    )
    .await;
    assert_eq!(code, 201, "{body}\n{}", collector.log_text());
    let raw = broker::take(
        &conn,
        &names.raw_queue,
        1,
        Duration::from_secs(3),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(raw.len(), 1, "the posted sample is on the raw queue");
    assert_eq!(raw[0].resource_id, "vm-c");
    assert_eq!(
        raw[0].resource_metadata["flavor"]["vcpus"], 2,
        "dotted keys nested again"
    );

    // A long answer (~3 MB: several 256 KiB chunks written as the rows arrive) is one
    // valid JSON array with every sample, newest first, in both shapes.
    let long_name = "x".repeat(600);
    for part in 0..3 {
        let batch: Vec<Value> = (0..1000)
            .map(|i| {
                let k = part * 1000 + i;
                let ts = chrono::DateTime::from_timestamp(1_772_000_000 + k * 10, 0).unwrap();
                let mut s = sample(
                    "vm-big",
                    "project-1",
                    &ts.format("%Y-%m-%dT%H:%M:%S").to_string(),
                    k as f64,
                    "m1.small",
                );
                s["resource_metadata"]["display_name"] = json!(long_name);
                s
            })
            .collect();
        let (code, body) = post(
            &addr,
            "/v2/meters/cpu_util?direct=true",
            ADMIN,
            &json!(batch),
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }
    for (path, volume_key) in [
        (
            "/v2/meters/cpu_util?q.field=resource_id&q.value=vm-big&limit=5000",
            "counter_volume",
        ),
        (
            "/v2/samples?q.field=resource_id&q.value=vm-big&limit=5000",
            "volume",
        ),
    ] {
        let (code, text) = request(
            &addr,
            "GET",
            path,
            &[("Authorization", &format!("Bearer {ADMIN}"))],
            None,
        )
        .await;
        assert_eq!(code, 200);
        assert!(text.len() > 2_000_000, "{} bytes", text.len());
        let v: Vec<Value> = serde_json::from_str(&text).expect("one valid JSON array");
        assert_eq!(v.len(), 3000, "{path}");
        let vols: Vec<f64> = v.iter().map(|s| s[volume_key].as_f64().unwrap()).collect();
        let want: Vec<f64> = (0..3000).rev().map(|k| k as f64).collect();
        assert_eq!(vols, want, "{path}: every sample, newest first");
    }

    // A filter that selects more than 64 resources (a project of 70 VMs) takes the other
    // path (rows read whole, then written): every sample, with its own resource's fields,
    // newest first.
    let many: Vec<Value> = (0..70)
        .flat_map(|r| {
            (0..3).map(move |k| {
                let ts = chrono::DateTime::from_timestamp(1_773_000_000 + k * 60 + r, 0).unwrap();
                sample(
                    &format!("vm-many-{r:02}"),
                    "project-many",
                    &ts.format("%Y-%m-%dT%H:%M:%S").to_string(),
                    (r * 10 + k) as f64,
                    "m1.tiny",
                )
            })
        })
        .collect();
    let (code, body) = post(
        &addr,
        "/v2/meters/cpu_util?direct=true",
        ADMIN,
        &json!(many),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, v) = get_json(
        &addr,
        "/v2/samples?q.field=project_id&q.value=project-many&limit=1000",
        Some(ADMIN),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let v = v.as_array().expect("an array");
    assert_eq!(v.len(), 210);
    let mut prev = String::from("9999");
    for s in v {
        let rid = s["resource_id"].as_str().unwrap();
        let r: i64 = rid.strip_prefix("vm-many-").unwrap().parse().unwrap();
        let ts = s["timestamp"].as_str().unwrap().to_string();
        assert!(ts <= prev, "newest first: {ts} after {prev}");
        prev = ts;
        let k = (s["volume"].as_f64().unwrap() as i64) - r * 10;
        assert!((0..3).contains(&k), "{s}");
        assert_eq!(s["project_id"], "project-many");
        assert_eq!(s["metadata"]["display_name"], rid, "{s}");
    }

    // Health and metrics.
    assert_eq!(request(&addr, "GET", "/health", &[], None).await.0, 200);
    let (_, metrics) = request(&addr, "GET", "/metrics", &[], None).await;
    assert!(metrics.contains("vmeter_"), "{metrics}");
    // API latency by route: the statistics route was asked several times above.
    assert!(
        vmeter_core::telemetry::scrape(
            &metrics,
            "vmeter_api_request_seconds_count{route=\"/v2/meters/{meter}/statistics\",method=\"GET\"}"
        ) >= 3.0,
        "{metrics}"
    );

    drop(collector);
    broker::cleanup(&conn, &names).await;
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}

/// One sample of the differential test, as the test generated it.
struct Gen {
    rid: String,
    project: String,
    user: String,
    /// `resource_metadata.instance_type` of this sample.
    flavor: &'static str,
    unit: &'static str,
    ts: chrono::DateTime<chrono::Utc>,
    v: f64,
}

fn ceilo_ts(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// Statistics as Ceilometer defines them, computed here from the generated samples:
/// buckets `[t0 + kP, t0 + (k+1)P)` for `k < ceil((t1 - t0) / P)` with `t0`/`t1` the query's
/// bounds or else the first/last selected sample; rows ordered by bucket, unit, groupby.
fn expected_stats(
    all: &[Gen],
    start: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
    period_us: Option<i64>,
    groupby: &[&str],
) -> Vec<Value> {
    let sel: Vec<&Gen> = all
        .iter()
        .filter(|s| start.is_none_or(|t| s.ts >= t) && until.is_none_or(|t| s.ts < t))
        .collect();
    let t0 = start.unwrap_or_else(|| sel.iter().map(|s| s.ts).min().unwrap());
    let t1 = until.unwrap_or_else(|| sel.iter().map(|s| s.ts).max().unwrap());
    let end = period_us.map(|p| {
        let n = ((t1 - t0).num_microseconds().unwrap() as f64 / p as f64).ceil() as i64;
        t0 + chrono::Duration::microseconds(n * p)
    });
    type Key = (i64, &'static str, Vec<String>);
    let mut groups: std::collections::BTreeMap<Key, Vec<&Gen>> = Default::default();
    for s in sel {
        if end.is_some_and(|e| s.ts >= e) {
            continue;
        }
        let k = period_us.map_or(0, |p| (s.ts - t0).num_microseconds().unwrap() / p);
        let g = groupby
            .iter()
            .map(|f| match *f {
                "resource_id" => s.rid.clone(),
                "project_id" => s.project.clone(),
                "user_id" => s.user.clone(),
                "resource_metadata.instance_type" => s.flavor.to_string(),
                _ => unreachable!(),
            })
            .collect();
        groups.entry((k, s.unit, g)).or_default().push(s);
    }
    groups
        .into_iter()
        .map(|((k, unit, g), ss)| {
            let n = ss.len() as f64;
            let sum: f64 = ss.iter().map(|s| s.v).sum();
            let first = ss.iter().map(|s| s.ts).min().unwrap();
            let last = ss.iter().map(|s| s.ts).max().unwrap();
            let d0 = start.map_or(first, |t| first.max(t));
            let (ps, pe) = match period_us {
                Some(p) => (
                    t0 + chrono::Duration::microseconds(k * p),
                    t0 + chrono::Duration::microseconds((k + 1) * p),
                ),
                None => (first, last),
            };
            let mut gb = serde_json::Map::new();
            for (f, v) in groupby.iter().zip(g) {
                gb.insert(f.to_string(), json!(v));
            }
            json!({
                "count": ss.len(),
                "min": ss.iter().map(|s| s.v).fold(f64::INFINITY, f64::min),
                "max": ss.iter().map(|s| s.v).fold(f64::NEG_INFINITY, f64::max),
                "sum": sum,
                "avg": sum / n,
                "duration": (last - d0).num_microseconds().unwrap() as f64 / 1e6,
                "duration_start": ceilo_ts(d0),
                "duration_end": ceilo_ts(last),
                "period": period_us.map_or(0.0, |p| p as f64 / 1e6),
                "period_start": ceilo_ts(ps),
                "period_end": ceilo_ts(pe),
                "unit": unit,
                "groupby": if groupby.is_empty() { Value::Null } else { Value::Object(gb) },
            })
        })
        .collect()
}

fn close(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(1.0),
        _ => a == b,
    }
}

type Case<'a> = (
    String,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<i64>,
    Vec<&'a str>,
    bool,
);

/// Every statistics case against [`expected_stats`], field by field.
async fn check_cases(addr: &str, data: &[Gen], cases: &[Case<'_>]) {
    for (query, start, until, period, groupby, _) in cases {
        let (code, got) = get_json(
            addr,
            &format!("/v2/meters/cpu_util/statistics?{query}"),
            None,
        )
        .await;
        assert_eq!(code, 200, "{query}: {got}");
        let got = got.as_array().unwrap();
        let want = expected_stats(data, *start, *until, *period, groupby);
        assert_eq!(got.len(), want.len(), "{query}: row count");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            for (k, wv) in w.as_object().unwrap() {
                assert!(
                    close(&g[k], wv),
                    "{query}: row {i} field {k}: got {} want {wv}\n got {g}\nwant {w}",
                    g[k]
                );
            }
        }
    }
}

/// Stores `samples` of `meter` through `POST /v2/meters/{meter}?direct=true`.
async fn post_direct(addr: &str, meter: &str, samples: &[Gen], collector: &Service) {
    let body: Vec<Value> = samples
        .iter()
        .map(|s| {
            json!({
                "counter_name": meter, "counter_type": "gauge", "counter_unit": s.unit,
                "counter_volume": s.v, "resource_id": s.rid, "project_id": s.project,
                "user_id": s.user, "timestamp": ceilo_ts(s.ts), "source": "openstack",
                "resource_metadata": {"instance_type": s.flavor}
            })
        })
        .collect();
    let (code, _) = request(
        addr,
        "POST",
        &format!("/v2/meters/{meter}?direct=true"),
        &[],
        Some(&Value::Array(body).to_string()),
    )
    .await;
    assert_eq!(code, 201, "{}", collector.log_text());
}

/// The statistics query (one SQL statement, date_bin buckets, ids resolved first, resource
/// names joined afterwards, rows written by the JSON writer) against an independent
/// computation over irregular, microsecond-jittered data: five resources in two projects,
/// one of them with another unit for the same meter name, fractional and unaligned periods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_match_an_independent_computation() {
    let names = Names::new("s");
    // Compaction off: this test follows the rollups; it compacts the hour itself at the end.
    let (admin, addr, collector, logs) = start_api(
        &names,
        &[
            ("VMETER_DATABASE__ROLLUP_INTERVAL_SECS".into(), "1".into()),
            ("VMETER_DATABASE__COMPACTION".into(), "false".into()),
        ],
    )
    .await;

    let base = chrono::DateTime::parse_from_rfc3339("2026-03-02T00:00:03.250000Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let mut data = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for r in 0..5 {
        for i in 0..150i64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Each sample keeps its own attribution: vm-3 moves to another project and user
            // half-way (inside a minute, inside an hour), vm-2 is resized after 100 samples.
            let moved = r == 3 && i >= 75;
            data.push(Gen {
                rid: format!("vm-{r}"),
                project: format!("project-{}", if moved { 0 } else { r % 2 }),
                user: format!("user-{}", if moved { 2 } else { r % 3 }),
                flavor: if r == 2 && i >= 100 {
                    "m1.large"
                } else {
                    "m1.small"
                },
                unit: if r == 4 { "ratio" } else { "%" },
                ts: base
                    + chrono::Duration::microseconds(
                        i * 7_300_000 + r * 1_100_000 + (x % 900_000) as i64,
                    ),
                v: (x % 100_000) as f64 / 1000.0,
            });
        }
    }
    // A sparse series (one sample per 130 s): too few per minute to be rolled up, its hour
    // is read from the samples on the rollup path too.
    for i in 0..9i64 {
        data.push(Gen {
            rid: "vm-sparse".into(),
            project: "project-1".into(),
            user: "user-2".into(),
            flavor: "m1.small",
            unit: "%",
            ts: base + chrono::Duration::microseconds(i * 130_000_000 + 17),
            v: i as f64 * 1.5,
        });
    }
    for chunk in data.chunks(100) {
        post_direct(&addr, "cpu_util", chunk, &collector).await;
    }

    let start = base + chrono::Duration::microseconds(95_123_456);
    let minute =
        |m: i64| base - chrono::Duration::microseconds(3_250_000) + chrono::Duration::minutes(m);
    let ge = |t| format!("q.field=timestamp&q.op=ge&q.value={}", ceilo_ts(t));
    let lt = |t| format!("q.field=timestamp&q.op=lt&q.value={}", ceilo_ts(t));
    // (query, its start, its end, period in µs, groupby fields, whole minutes: the
    // rollups can answer once the hour is rolled up)
    let cases: Vec<Case> = vec![
        (
            "period=60&groupby=resource_id".into(),
            None,
            None,
            Some(60_000_000),
            vec!["resource_id"],
            false,
        ),
        (
            "period=90.5&groupby=project_id".into(),
            None,
            None,
            Some(90_500_000),
            vec!["project_id"],
            false,
        ),
        (
            format!(
                "{}&period=300&groupby=user_id&groupby=resource_id",
                ge(start)
            ),
            Some(start),
            None,
            Some(300_000_000),
            vec!["user_id", "resource_id"],
            false,
        ),
        (
            "groupby=project_id".into(),
            None,
            None,
            None,
            vec!["project_id"],
            true,
        ),
        (
            "period=120".into(),
            None,
            None,
            Some(120_000_000),
            vec![],
            false,
        ),
        (
            format!("{}&period=60&groupby=resource_id", ge(minute(0))),
            Some(minute(0)),
            None,
            Some(60_000_000),
            vec!["resource_id"],
            true,
        ),
        (
            format!(
                "{}&{}&period=300&groupby=project_id&groupby=resource_id",
                ge(minute(1)),
                lt(minute(14))
            ),
            Some(minute(1)),
            Some(minute(14)),
            Some(300_000_000),
            vec!["project_id", "resource_id"],
            true,
        ),
        (
            "period=600&groupby=resource_metadata.instance_type&groupby=project_id".into(),
            None,
            None,
            Some(600_000_000),
            vec!["resource_metadata.instance_type", "project_id"],
            false,
        ),
        (
            format!(
                "{}&period=600&groupby=resource_metadata.instance_type&groupby=resource_id",
                ge(minute(0))
            ),
            Some(minute(0)),
            None,
            Some(600_000_000),
            vec!["resource_metadata.instance_type", "resource_id"],
            true,
        ),
        (
            format!("{}&{}&groupby=user_id", ge(minute(2)), lt(minute(9))),
            Some(minute(2)),
            Some(minute(9)),
            None,
            vec!["user_id"],
            true,
        ),
        (
            format!("{}&period=120", ge(minute(3))),
            Some(minute(3)),
            None,
            Some(120_000_000),
            vec![],
            true,
        ),
    ];
    check_cases(&addr, &data, &cases).await;
    let paths = |m: &str| -> (u64, u64) {
        let get = |p: &str| {
            vmeter_core::telemetry::scrape(
                m,
                &format!("vmeter_api_statistics_total{{path=\"{p}\"}}"),
            ) as u64
        };
        (get("rollup"), get("samples"))
    };
    let whole = cases.iter().filter(|c| c.5).count() as u64;
    let (_, m) = request(&addr, "GET", "/metrics", &[], None).await;
    assert_eq!(
        paths(&m),
        (whole, cases.len() as u64 - whole),
        "whole-minute queries in minutes mode, the others from every sample (nothing is rolled up yet: the newest sample is in the same hour, minutes mode reads samples too): {m}"
    );

    // A sample of another meter three hours later moves data time on: the hour closes and
    // the rollup job (every second here) rolls it up.
    let clock = Gen {
        rid: "clock".into(),
        project: "project-0".into(),
        user: "user-0".into(),
        flavor: "m1.small",
        unit: "s",
        ts: base + chrono::Duration::hours(3),
        v: 1.0,
    };
    post_direct(&addr, "clock", std::slice::from_ref(&clock), &collector).await;
    let db = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let mut rolled = false;
    for _ in 0..100 {
        let wm: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("select watermark from rollup_state")
                .fetch_one(&db)
                .await
                .unwrap();
        if wm.is_some_and(|w| w > base) {
            rolled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        rolled,
        "the hour was not rolled up:\n{}",
        collector.log_text()
    );
    let (rows, sparse): (i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where minutes is null) from sample_rollup",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (rows, sparse),
        (8, 1),
        "5 dense resources (vm-2 and vm-3 with two attributions each) and the sparse one, one hour each"
    );
    let before = paths(&request(&addr, "GET", "/metrics", &[], None).await.1);
    check_cases(&addr, &data, &cases).await;
    let after = paths(&request(&addr, "GET", "/metrics", &[], None).await.1);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (whole, cases.len() as u64 - whole),
        "whole-minute queries answered from the rollups, the others from the samples"
    );

    // A late sample (and its redelivery) in the rolled-up hour is folded into its rollup.
    let late = Gen {
        rid: "vm-1".into(),
        project: "project-1".into(),
        user: "user-1".into(),
        flavor: "m1.small",
        unit: "%",
        ts: minute(4) + chrono::Duration::microseconds(31_000_001),
        v: 1234.5,
    };
    post_direct(&addr, "cpu_util", std::slice::from_ref(&late), &collector).await;
    post_direct(&addr, "cpu_util", std::slice::from_ref(&late), &collector).await;
    data.push(late);
    check_cases(&addr, &data, &cases).await;
    let (_, m) = request(&addr, "GET", "/metrics", &[], None).await;
    assert!(
        m.contains("vmeter_rollup_late_hours_total 1\n"),
        "one late hour recomputed (the redelivery inserts nothing): {m}"
    );

    // Compacted (its rollup rows deleted, the minutes computed from sample_hour): the same
    // independent computation still holds.
    let run = ::collector::store::Store::new(db.clone())
        .compact(100)
        .await
        .unwrap();
    assert!(run.hours >= 1 && run.caught_up, "{run:?}");
    let rollups: i64 = sqlx::query_scalar("select count(*) from sample_rollup where hour < $1")
        .bind(run.watermark)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(rollups, 0);
    check_cases(&addr, &data, &cases).await;

    // Cardinality and stddev through the resource join, per unit.
    let (_, st) = get_json(
        &addr,
        "/v2/meters/cpu_util/statistics?aggregate.func=cardinality&aggregate.param=user_id&aggregate.func=stddev&aggregate.func=count",
        None,
    )
    .await;
    let st = st.as_array().unwrap();
    assert_eq!(st.len(), 2, "one row per unit: {st:?}");
    for row in st {
        let unit = row["unit"].as_str().unwrap();
        let xs: Vec<&Gen> = data.iter().filter(|s| s.unit == unit).collect();
        let users: std::collections::BTreeSet<&str> = xs.iter().map(|s| s.user.as_str()).collect();
        assert_eq!(
            row["aggregate"]["cardinality/user_id"],
            json!(users.len()),
            "{row}"
        );
        assert_eq!(row["aggregate"]["count"], json!(xs.len()), "{row}");
        assert_eq!(row["count"], json!(xs.len()), "{row}");
        let mean = xs.iter().map(|s| s.v).sum::<f64>() / xs.len() as f64;
        let sd = (xs.iter().map(|s| (s.v - mean).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
        let got = row["aggregate"]["stddev"].as_f64().unwrap();
        assert!((got - sd).abs() < 1e-6, "{got} vs {sd}");
        assert!(row.get("max").is_none(), "{row}");
    }

    drop(collector);
    db.close().await;
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}

/// Each sample keeps the user, project, source and metadata it was taken with (storage
/// version 4): a resource resized and then moved to another project answers every read
/// per sample, each project sees its own samples only, `/v2/resources` shows the newest
/// attribution (within the caller's project), and a post into a resource whose newest
/// samples are another project's is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sample_keeps_its_attribution() {
    let names = Names::new("at");
    let p2 = "project-2-token";
    let auth = [
        ("VMETER_HTTP__ADMIN_TOKENS".into(), format!("[{ADMIN}]")),
        (
            "VMETER_HTTP__PROJECT_TOKENS".into(),
            format!("{{{P1}: project-1, {p2}: project-2}}"),
        ),
    ];
    let (admin, addr, collector, logs) = start_api(&names, &auth).await;
    // vm-x: m1.small in project-1 (10:00, 10:10), resized to m1.large (10:20, 10:30), then
    // moved to project-2 (10:40, 10:50). Posted newest first, in one body: the order of
    // arrival must not matter.
    let body = json!([
        sample("vm-x", "project-2", "2026-03-01T10:50:00", 6.0, "m1.large"),
        sample("vm-x", "project-2", "2026-03-01T10:40:00", 5.0, "m1.large"),
        sample("vm-x", "project-1", "2026-03-01T10:30:00", 4.0, "m1.large"),
        sample("vm-x", "project-1", "2026-03-01T10:20:00", 3.0, "m1.large"),
        sample("vm-x", "project-1", "2026-03-01T10:10:00", 2.0, "m1.small"),
        sample("vm-x", "project-1", "2026-03-01T10:00:00", 1.0, "m1.small"),
    ]);
    let (code, b) = post(&addr, "/v2/meters/cpu_util?direct=true", ADMIN, &body).await;
    assert_eq!(code, 201, "{b}\n{}", collector.log_text());

    // Samples, admin: each as it was taken.
    let (_, ss) = get_json(
        &addr,
        "/v2/samples?q.field=resource_id&q.value=vm-x",
        Some(ADMIN),
    )
    .await;
    let got: Vec<(f64, &str, &str)> = ss
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["volume"].as_f64().unwrap(),
                s["project_id"].as_str().unwrap(),
                s["metadata"]["instance_type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (6.0, "project-2", "m1.large"),
            (5.0, "project-2", "m1.large"),
            (4.0, "project-1", "m1.large"),
            (3.0, "project-1", "m1.large"),
            (2.0, "project-1", "m1.small"),
            (1.0, "project-1", "m1.small"),
        ],
        "{ss}"
    );
    // The old Ceilometer form (`/v2/meters/{meter}`) and a metadata filter, per sample.
    let (_, ss) = get_json(
        &addr,
        "/v2/meters/cpu_util?q.field=metadata.instance_type&q.value=m1.small",
        Some(ADMIN),
    )
    .await;
    let vols: Vec<f64> = ss
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["counter_volume"].as_f64().unwrap())
        .collect();
    assert_eq!(vols, vec![2.0, 1.0], "{ss}");

    // Project scope: project-1 sees its four samples, project-2 its two.
    for (token, want) in [(P1, vec![4.0, 3.0, 2.0, 1.0]), (p2, vec![6.0, 5.0])] {
        let (_, ss) = get_json(
            &addr,
            "/v2/samples?q.field=resource_id&q.value=vm-x",
            Some(token),
        )
        .await;
        let vols: Vec<f64> = ss
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["volume"].as_f64().unwrap())
            .collect();
        assert_eq!(vols, want, "{token}: {ss}");
        let (_, st) = get_json(
            &addr,
            "/v2/meters/cpu_util/statistics?groupby=resource_id",
            Some(token),
        )
        .await;
        assert_eq!(st.as_array().unwrap().len(), 1, "{st}");
        assert_eq!(st[0]["count"], json!(want.len()), "{token}: {st}");
        assert_eq!(
            st[0]["sum"],
            json!(want.iter().sum::<f64>()),
            "{token}: {st}"
        );
    }

    // Statistics grouped by the sample's own project and flavor (admin).
    let (_, st) = get_json(
        &addr,
        "/v2/meters/cpu_util/statistics?groupby=project_id&groupby=resource_metadata.instance_type",
        Some(ADMIN),
    )
    .await;
    let rows: Vec<(&str, &str, i64, f64)> = st
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["groupby"]["project_id"].as_str().unwrap(),
                r["groupby"]["resource_metadata.instance_type"]
                    .as_str()
                    .unwrap(),
                r["count"].as_i64().unwrap(),
                r["sum"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("project-1", "m1.large", 2, 7.0),
            ("project-1", "m1.small", 2, 3.0),
            ("project-2", "m1.large", 2, 11.0),
        ],
        "{st}"
    );
    // One resource, however many attributions: one group, counted once.
    let (_, st) = get_json(
        &addr,
        "/v2/meters/cpu_util/statistics?groupby=resource_id&period=3600",
        Some(ADMIN),
    )
    .await;
    assert_eq!(st.as_array().unwrap().len(), 1, "{st}");
    assert_eq!(
        (&st[0]["count"], &st[0]["sum"]),
        (&json!(6), &json!(21.0)),
        "{st}"
    );
    let (_, st) = get_json(&addr, "/v2/meters/cpu_util/statistics?aggregate.func=cardinality&aggregate.param=resource_id&aggregate.func=cardinality&aggregate.param=project_id", Some(ADMIN)).await;
    assert_eq!(st[0]["aggregate"]["cardinality/resource_id"], 1, "{st}");
    assert_eq!(st[0]["aggregate"]["cardinality/project_id"], 2, "{st}");

    // Resources: the newest attribution, within the caller's project; first and last seen
    // over what the caller may see.
    let (_, r) = get_json(&addr, "/v2/resources/vm-x", Some(ADMIN)).await;
    assert_eq!(
        (
            &r["project_id"],
            &r["metadata"]["instance_type"],
            &r["first_sample_timestamp"],
            &r["last_sample_timestamp"]
        ),
        (
            &json!("project-2"),
            &json!("m1.large"),
            &json!("2026-03-01T10:00:00.000000"),
            &json!("2026-03-01T10:50:00.000000")
        ),
        "{r}"
    );
    let (_, r) = get_json(&addr, "/v2/resources", Some(P1)).await;
    assert_eq!(r.as_array().unwrap().len(), 1, "{r}");
    assert_eq!(
        (
            &r[0]["project_id"],
            &r[0]["metadata"]["instance_type"],
            &r[0]["last_sample_timestamp"]
        ),
        (
            &json!("project-1"),
            &json!("m1.large"),
            &json!("2026-03-01T10:30:00.000000")
        ),
        "project-1 sees its own newest, not project-2's metadata: {r}"
    );
    let (_, r) = get_json(
        &addr,
        "/v2/resources?q.field=metadata.instance_type&q.value=m1.small",
        Some(ADMIN),
    )
    .await;
    assert_eq!(r.as_array().unwrap().len(), 1, "{r}");
    assert_eq!(
        r[0]["last_sample_timestamp"], "2026-03-01T10:10:00.000000",
        "{r}"
    );

    // Meters: one entry per owner of the resource.
    let (_, m) = get_json(&addr, "/v2/meters", Some(ADMIN)).await;
    let owners: Vec<&str> = m
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["project_id"].as_str().unwrap())
        .collect();
    assert_eq!(owners, vec!["project-1", "project-2"], "{m}");

    // The newest samples are project-2's: project-1 may no longer post for vm-x, project-2 may.
    let later = json!([sample(
        "vm-x",
        "project-1",
        "2026-03-01T11:00:00",
        7.0,
        "m1.large"
    )]);
    let (code, b) = post(&addr, "/v2/meters/cpu_util?direct=true", P1, &later).await;
    assert_eq!(code, 403, "{b}");
    let later = json!([sample(
        "vm-x",
        "project-2",
        "2026-03-01T11:00:00",
        7.0,
        "m1.large"
    )]);
    let (code, b) = post(&addr, "/v2/meters/cpu_util?direct=true", p2, &later).await;
    assert_eq!(code, 201, "{b}");

    // SQL: the samples view per sample; resource_latest the newest.
    let db = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let rows: Vec<(f64, String, String)> = sqlx::query_as(
        "select volume, project_id, resource_metadata->>'instance_type' from samples
         where resource_id = 'vm-x' order by timestamp",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let projects: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        projects,
        [
            "project-1",
            "project-1",
            "project-1",
            "project-1",
            "project-2",
            "project-2",
            "project-2"
        ]
    );
    let latest: (String, String) = sqlx::query_as(
        "select project_id, metadata->>'instance_type' from resource_latest where resource_id = 'vm-x'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(latest, ("project-2".into(), "m1.large".into()));
    let attributions: i64 =
        sqlx::query_scalar("select count(*) from resource where resource_id = 'vm-x'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        attributions, 3,
        "small, large in project-1; large in project-2"
    );

    drop(collector);
    db.close().await;
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}
