//! The collector's v2 API as a real process over a real PostgreSQL (and RabbitMQ for the
//! non-direct POST): samples posted with `direct=true`, then every read endpoint, the
//! statistics semantics of the reference (its worked example included), metadata filters,
//! bearer-token auth with project scoping, and JSON errors.

use std::time::Duration;

use serde_json::{Value, json};
use vmeter_e2e::http::{get_json, request};
use vmeter_e2e::{Names, Service, broker, create_database, drop_database, free_port};

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

fn faultstring(v: &Value) -> &str {
    v["error_message"]["faultstring"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_api_reads_statistics_auth_and_errors() {
    let names = Names::new("a");
    let logs = std::env::temp_dir().join(format!("vmeter-api-{}", names.id));
    std::fs::create_dir_all(&logs).unwrap();
    let admin = create_database(&names).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut env = names.env("api-secret");
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));
    env.push(("VMETER_HTTP__ADMIN_TOKENS".into(), format!("[{ADMIN}]")));
    env.push((
        "VMETER_HTTP__PROJECT_TOKENS".into(),
        format!("{{{P1}: project-1}}"),
    ));
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

    // Health and metrics.
    assert_eq!(request(&addr, "GET", "/health", &[], None).await.0, 200);
    let (_, metrics) = request(&addr, "GET", "/metrics", &[], None).await;
    assert!(metrics.contains("vmeter_"), "{metrics}");

    drop(collector);
    broker::cleanup(&conn, &names).await;
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}
