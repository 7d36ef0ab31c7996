//! agent-compute keeps its batches on disk while the broker is unreachable, keeps them
//! over a restart, and sends them oldest first once the broker is back — with the libvirt
//! test driver and a real RabbitMQ.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use vmeter_e2e::{Names, Service, broker, free_port, listen_addr, repo_root};

const SECRET: &str = "spool-secret";

fn spooled(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "batch"));
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_keeps_batches_over_a_restart_and_sends_them_first() {
    let names = Names::new("s");
    let logs = names.dir("spool-e2e");
    let spool = logs.join("spool");
    let node = repo_root().join("deploy/demo-node.xml");
    let env = |broker_url: &str| {
        let mut env = names.env(SECRET);
        env.retain(|(k, _)| k != "VMETER_BROKER__URL");
        env.push(("VMETER_BROKER__URL".into(), broker_url.to_string()));
        env.push((
            "VMETER_LIBVIRT__URI".into(),
            format!("test://{}", node.display()),
        ));
        env.push(("VMETER_POLLING__INTERVAL_SECS".into(), "1".into()));
        env.push(("VMETER_POLLING__SHUFFLE_TIME_SECS".into(), "0".into()));
        env.push(("VMETER_SPOOL__DIR".into(), spool.display().to_string()));
        env.push(("VMETER_HTTP__LISTEN".into(), listen_addr()));
        env
    };

    // 1. No broker (nothing listens on that port): batches pile up on disk.
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/%2fvmeter", free_port());
    let mut agent = Service::start("agent-offline", "agent-compute", &[], &env(&dead), &logs);
    let deadline = Instant::now() + Duration::from_secs(30);
    while spooled(&spool).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "no spool files appeared:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop();
    let files = spooled(&spool);
    let mut spooled_ids = HashSet::new();
    let mut oldest = None;
    for f in &files {
        let samples = vmeter_core::wire::decode(&std::fs::read(f).unwrap(), None)
            .expect("a spool file is a wire-format batch");
        for s in samples {
            oldest = Some(
                oldest.map_or(s.timestamp, |o: chrono::DateTime<chrono::Utc>| {
                    o.min(s.timestamp)
                }),
            );
            spooled_ids.insert(s.message_id);
        }
    }
    assert!(!spooled_ids.is_empty());

    // 2. Restart with the broker: the spool is sent first, then fresh cycles follow.
    let conn = broker::connect().await;
    let agent = Service::start(
        "agent-online",
        "agent-compute",
        &[],
        &env(&vmeter_e2e::amqp_url()),
        &logs,
    );
    broker::wait_for_queue(&conn, &names.raw_queue, Duration::from_secs(30)).await;
    let want = spooled_ids.len() + 1;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < want && Instant::now() < deadline {
        got.extend(
            broker::take(
                &conn,
                &names.raw_queue,
                want,
                Duration::from_secs(2),
                Duration::from_secs(10),
            )
            .await,
        );
    }
    let got_ids: HashSet<_> = got.iter().map(|s| s.message_id).collect();
    assert!(
        spooled_ids.is_subset(&got_ids),
        "every spooled sample arrived ({} of {}):\n{}",
        spooled_ids.intersection(&got_ids).count(),
        spooled_ids.len(),
        agent.log_text()
    );
    assert!(
        got.iter()
            .take(spooled_ids.len())
            .all(|s| spooled_ids.contains(&s.message_id)),
        "the spooled batches were sent before fresh ones"
    );
    assert_eq!(got[0].timestamp, oldest.unwrap(), "oldest first");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !spooled(&spool).is_empty() {
        assert!(Instant::now() < deadline, "the spool was not emptied");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent
            .log_text()
            .contains("Spooled batches from before the restart")
    );
    drop(agent);
    broker::cleanup(&conn, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}
