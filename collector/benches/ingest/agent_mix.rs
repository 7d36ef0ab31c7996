//! Issue 18's size target on agent-style data, end to end: what the main phase measures on
//! its one regular gauge, measured again on samples shaped like what the notification
//! service publishes for a fleet of VMs polled every 10 s (the meters of docs/METERS.md and
//! the default pipeline's derived rates), through the real collector into its own database.
//!
//! The data: `agent_data.rs`.
//!
//! Figures: bytes of every table per sample in today's layout (narrow rows and rollups) and
//! once compacted (the compacted days' partitions dropped), where the compacted streams'
//! bytes go (timestamps; volumes by kind of meter), and a check that six API answers are
//! byte for byte the same before and after compaction.

use std::time::Duration;

use collector::store::Store;
use sqlx::PgPool;
use vmeter_core::amqp::{BrokerConfig, Publisher};

use super::agent_data::{HOURS, Kind, METERS, PER_VM, VMS, messages};
use super::compaction::{self, Probe};

/// The answers compared before and after compaction, over the whole data range.
fn probes(t0: chrono::DateTime<chrono::Utc>, ids: &[[String; 3]]) -> Vec<Probe> {
    let iso = |s: i64| {
        (t0 + chrono::Duration::seconds(s))
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string()
    };
    let end = HOURS as i64 * 3600 + 60;
    let range = format!(
        "q.field=timestamp&q.op=ge&q.value={}&q.field=timestamp&q.op=lt&q.value={}",
        iso(0),
        iso(end)
    );
    let unaligned = format!(
        "q.field=timestamp&q.op=ge&q.value={}&q.field=timestamp&q.op=lt&q.value={}",
        iso(7),
        iso(end)
    );
    let [vm, disk, nic] = &ids[1];
    vec![
        Probe::get(
            "one VM's cpu_util",
            format!("/v2/meters/cpu_util?q.field=resource_id&q.value={vm}&{range}&limit=10000"),
        ),
        Probe::get(
            "one disk's read bytes",
            format!(
                "/v2/meters/disk.device.read.bytes?q.field=resource_id&q.value={disk}&{range}&limit=10000"
            ),
        ),
        Probe::get(
            "every meter of one vNIC",
            format!("/v2/samples?q.field=resource_id&q.value={nic}&{range}&limit=100000"),
        ),
        Probe::get(
            "cpu_util statistics period=60 by resource",
            format!("/v2/meters/cpu_util/statistics?period=60&groupby=resource_id&{range}"),
        ),
        Probe::get(
            "vNIC rx rate statistics period=60, start 7 s past a minute",
            format!("/v2/meters/network.incoming.bytes.rate/statistics?period=60&{unaligned}"),
        ),
        Probe::get(
            "memory.usage statistics period=600 by flavor with project cardinality",
            format!(
                "/v2/meters/memory.usage/statistics?period=600&groupby=resource_metadata.instance_type&aggregate.func=cardinality&aggregate.param=project_id&aggregate.func=avg&{range}"
            ),
        ),
    ]
}

/// Loads the agent-style fleet into the fresh database `db_url` through a collector on
/// `http` (started and stopped here), measures today's layout, compacts, measures again.
pub async fn run(publisher: &Publisher, cfg: &BrokerConfig, db_url: &str, http: &str) {
    let t0 = super::t0();
    let (bodies, ids) = messages(t0);
    let total = (bodies.len() * VMS * PER_VM) as u64;
    let wire: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "agent-style data: {VMS} VMs × {HOURS} h, {PER_VM} samples per VM every 10 s on 3 resources each: {total} samples, {:.0} B/sample on the wire",
        wire as f64 / total as f64
    );
    let mut child = super::start_collector(cfg, db_url, http, false);
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(http).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    super::publish_all(publisher, cfg, &bodies, VMS * PER_VM).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let (stored, dups) = super::counters(http).await;
        assert_eq!(dups, 0, "agent-style data has no redeliveries");
        if stored >= total {
            assert_eq!(stored, total, "every sample stored exactly once");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {stored} of {total} samples stored after 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Today's layout: narrow rows and the closed hours' rollups.
    let pool = PgPool::connect(db_url).await.unwrap();
    let store = Store::new(pool.clone());
    store
        .roll_up(chrono::Utc::now(), chrono::Duration::seconds(600), u32::MAX)
        .await
        .unwrap();
    let narrow_bytes = compaction::all_tables(&pool).await;
    let probes = probes(t0, &ids);
    let before = compaction::answers(http, &probes).await;

    // Data time four days on: every hour compacted, both days' partitions dropped.
    let (_, dropped) = compaction::advance_and_compact(&store, &pool, t0).await;
    let samples: i64 = sqlx::query_scalar(
        "select (select coalesce(sum(n), 0) from sample_hour) + (select count(*) from sample)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(samples as u64, total + 1, "every sample, and the clock's");
    let bytes = compaction::all_tables(&pool).await;
    let per = bytes as f64 / samples as f64;
    println!(
        "agent-style data, all tables: today's layout {:.2} B/sample ({:.1} MB); compacted {per:.2} B/sample ({:.1} MB, partitions dropped {dropped:?}), target ≤ 12: {}",
        narrow_bytes as f64 / total as f64,
        narrow_bytes as f64 / 1e6,
        bytes as f64 / 1e6,
        if per <= 12.0 { "MET" } else { "NOT MET" }
    );
    let tables = compaction::by_table(&pool, samples).await;
    println!("agent-style data, compacted, by table, B/sample: {tables}");
    println!("agent-style data: {}", compaction::hot_updates(&pool).await);

    // Where the streams' bytes go: timestamps, and volumes by kind of meter.
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "select m.name, sum(h.n)::bigint, sum(octet_length(h.ts))::bigint, sum(octet_length(h.v))::bigint
           from sample_hour h join meter m on m.id = h.meter_id group by m.name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut ts = (0, 0);
    let mut by_kind = [(Kind::Flat, "flat", 0, 0), (Kind::Gauge, "gauges", 0, 0)]
        .into_iter()
        .chain([
            (Kind::Counter, "counters", 0, 0),
            (Kind::Rate, "rates", 0, 0),
        ])
        .collect::<Vec<(Kind, &str, i64, i64)>>();
    for (name, n, t, v) in rows {
        let Some(kind) = METERS.iter().find(|m| m.0 == name).map(|m| m.3) else {
            continue; // the clock
        };
        ts = (ts.0 + n, ts.1 + t);
        let k = by_kind.iter_mut().find(|k| k.0 == kind).unwrap();
        k.2 += n;
        k.3 += v;
    }
    println!(
        "agent-style data, compacted streams, B/sample: timestamps {:.2}; volumes {}",
        ts.1 as f64 / ts.0 as f64,
        by_kind
            .iter()
            .map(|(_, label, n, v)| format!("{label} {:.2}", *v as f64 / *n as f64))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let after = compaction::answers(http, &probes).await;
    for ((p, b), a) in probes.iter().zip(&before).zip(&after) {
        assert!(
            a == b,
            "agent-style data, {}: the answer changed after compaction ({} bytes before, {} after)",
            p.label,
            b.len(),
            a.len()
        );
    }
    println!(
        "agent-style data, answers before and after compaction: {} of {} byte for byte the same ({} KiB)",
        after.len(),
        probes.len(),
        after.iter().map(Vec::len).sum::<usize>() / 1024
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    pool.close().await;
}
