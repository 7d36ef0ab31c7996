//! End-to-end notification throughput through a real RabbitMQ (issue 4).
//!
//! The release `notification` binary runs the repository's `pipeline.yaml` (Ceilometer's
//! five default pipelines) against queues unique to this run. This bench publishes signed
//! raw batches (1,000 cumulative `cpu` samples of 1,000 instances per message, agent
//! metadata) with publisher confirms, and counts the processed samples arriving on the
//! processed queue. Figure: input samples/s from the first publish until the last expected
//! output arrived (3 outputs per input — the stored copy, `cpu_util`, `cpu.delta` — except
//! for the first round, which has no predecessors).
//!
//! Baseline in the same run: the same bodies through the same kind of queue with no
//! processing at all (publish → consume), i.e. the broker's own ceiling on this machine.
//!
//! Needs RabbitMQ as `deploy/setup.sh` leaves it. Run:
//! `cargo bench -p notification --bench e2e` (`VMETER_BENCH_NOTIFICATION=/path/to/notification`
//! runs another build, to compare against a baseline; env `VMETER_BENCH_ROUNDS`, default 300 →
//! 300,000 input samples; `VMETER_TEST_AMQP_URL` to point elsewhere).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde::Deserialize;
use vmeter_core::amqp::{self, BrokerConfig, Publisher};
use vmeter_core::signing::Signer;

mod common;
use common::Input;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RESOURCES: usize = 1_000;
const SECRET: &str = "bench-secret";
/// Publishes in flight before waiting for their confirms.
const WINDOW: usize = 32;
/// Measured runs (fresh process and queues each); the median is the figure.
const RUNS: usize = 5;

/// `VMETER_TEST_AMQP_URL`, else the vhost's admin user from deploy/setup.sh's credentials.
fn amqp_url() -> String {
    vmeter_core::config::local_amqp_url("ADMIN")
}

fn broker_config(tag: &str) -> BrokerConfig {
    let id = format!("bench.{tag}.{}", std::process::id());
    BrokerConfig {
        url: amqp_url(),
        exchange: id.clone(),
        raw_queue: format!("{id}.raw"),
        processed_queue: format!("{id}.processed"),
        dead_letter_exchange: format!("{id}.dlx"),
        dead_letter_queue: format!("{id}.dead"),
        ..BrokerConfig::default()
    }
}

/// Counts samples in a batch without building them.
#[derive(Deserialize)]
struct CountOnly {
    samples: Vec<serde::de::IgnoredAny>,
}

/// Consumes `queue` (auto-ack) and adds the number of samples of each message to `count`.
async fn count_samples(conn: &Connection, queue: &str, count: Arc<AtomicU64>) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench-counter".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            // The sample-count header when present (vmeter publishers set it), else parse.
            let n = amqp::sample_count(&d.properties).unwrap_or_else(|| {
                rmp_serde::from_slice::<CountOnly>(&d.data)
                    .map(|c| c.samples.len())
                    .unwrap_or(0)
            });
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
}

/// Publishes all bodies with confirms, `WINDOW` in flight.
async fn publish_all(p: &Publisher, cfg: &BrokerConfig, bodies: &[Vec<u8>]) {
    let mut inflight = Vec::with_capacity(WINDOW);
    for body in bodies {
        let h = amqp::count_header(RESOURCES);
        inflight.push(
            p.send_body(&cfg.exchange, &cfg.raw_routing_key, body, h)
                .await
                .expect("publish"),
        );
        if inflight.len() == WINDOW {
            for c in inflight.drain(..) {
                c.confirmed().await.expect("confirmed");
            }
        }
    }
    for c in inflight {
        c.confirmed().await.expect("confirmed");
    }
}

/// Waits until `count` reaches `want`; gives up after 30 s without progress.
async fn wait_count(count: &AtomicU64, want: u64) -> Instant {
    let mut last = (0, Instant::now());
    loop {
        let n = count.load(Ordering::Relaxed);
        if n >= want {
            return Instant::now();
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(30),
            "stalled at {n} of {want} samples"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn cleanup(conn: &Connection, cfg: &BrokerConfig) {
    let ch = conn.create_channel().await.unwrap();
    for q in [&cfg.raw_queue, &cfg.processed_queue, &cfg.dead_letter_queue] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [&cfg.exchange, &cfg.dead_letter_exchange] {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// CPU seconds (user + system) a process used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command name: state is field 0, utime 11, stime 12.
    let hz = 100.0; // USER_HZ on Linux
    (ticks(11) + ticks(12)) / hz
}

fn start_notification(cfg: &BrokerConfig) -> Child {
    let pipeline = concat!(env!("CARGO_MANIFEST_DIR"), "/../pipeline.yaml");
    // `VMETER_BENCH_NOTIFICATION`: another build of the service (A/B against a baseline).
    let bin = std::env::var("VMETER_BENCH_NOTIFICATION")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_notification").to_string());
    Command::new(bin)
        .env("VMETER_CONFIG", "/dev/null") // defaults, not an installed /etc/vmeter config
        .env("VMETER_BROKER__URL", &cfg.url)
        .env("VMETER_BROKER__EXCHANGE", &cfg.exchange)
        .env("VMETER_BROKER__RAW_QUEUE", &cfg.raw_queue)
        .env("VMETER_BROKER__PROCESSED_QUEUE", &cfg.processed_queue)
        .env(
            "VMETER_BROKER__DEAD_LETTER_EXCHANGE",
            &cfg.dead_letter_exchange,
        )
        .env("VMETER_BROKER__DEAD_LETTER_QUEUE", &cfg.dead_letter_queue)
        // Fixed 2026 timestamps: no age window (the contract is still checked).
        .env("VMETER_CONTRACT__MAX_AGE_DAYS", "")
        .env("VMETER_SIGNING__TELEMETRY_SECRET", SECRET)
        .env("VMETER_PIPELINE__FILE", pipeline)
        .env("VMETER_PIPELINE__STATE_FILE", "\"\"")
        .env("VMETER_LOG__LEVEL", "warn")
        .env("VMETER_HTTP__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the notification binary")
}

async fn wait_queue(conn: &Connection, queue: &str) {
    for _ in 0..300 {
        let ch = conn.create_channel().await.unwrap();
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if ch
            .queue_declare(queue.into(), opts, FieldTable::default())
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("queue {queue} never appeared");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("VMETER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let n_in = (RESOURCES * rounds) as u64;
    let input = Input::new(RESOURCES);
    let bodies: Vec<Vec<u8>> = (0..rounds)
        .map(|r| vmeter_core::wire::encode(&input.context(r)))
        .collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "notification end to end through RabbitMQ: {rounds} messages × {RESOURCES} cpu samples = {n_in} samples, {:.0} B/sample on the wire",
        bytes as f64 / n_in as f64
    );
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ from deploy/setup.sh must be running");

    // Baseline: the same bodies through a queue of the same kind, nothing in between.
    let base = broker_config("baseline");
    let publisher = Publisher::open(&conn, Signer::new(SECRET)).await.unwrap();
    amqp::declare_topology(publisher.channel(), &base)
        .await
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    count_samples(&conn, &base.raw_queue, count.clone()).await;
    let start = Instant::now();
    publish_all(&publisher, &base, &bodies).await;
    let done = wait_count(&count, n_in).await;
    let base_secs = (done - start).as_secs_f64();
    println!(
        "baseline: broker only (publish + consume, no processing) {:>9.0} samples/s ({base_secs:.2} s)",
        n_in as f64 / base_secs
    );
    cleanup(&conn, &base).await;

    // The notification service with the default pipeline: RUNS runs, each with a fresh
    // process and fresh queues (the broker's fsync timing varies run to run).
    let mut rates = Vec::new();
    for run in 0..RUNS {
        let cfg = broker_config(&format!("notification{run}"));
        let mut child = start_notification(&cfg);
        wait_queue(&conn, &cfg.raw_queue).await;
        wait_queue(&conn, &cfg.processed_queue).await;
        let want_out = 3 * n_in - 2 * RESOURCES as u64;
        let count = Arc::new(AtomicU64::new(0));
        count_samples(&conn, &cfg.processed_queue, count.clone()).await;
        let cpu0 = cpu_seconds(child.id());
        let start = Instant::now();
        publish_all(&publisher, &cfg, &bodies).await;
        let published = start.elapsed().as_secs_f64();
        let done = wait_count(&count, want_out).await;
        let secs = (done - start).as_secs_f64();
        let cpu = cpu_seconds(child.id()) - cpu0;
        let rate = n_in as f64 / secs;
        rates.push(rate);
        println!(
            "run {run}: notification (default pipeline.yaml) {:>9.0} input samples/s = {:.0} processed samples/s out ({secs:.2} s; publishing took {published:.2} s); notification CPU {cpu:.2} s = {:.2} µs/input sample",
            rate,
            want_out as f64 / secs,
            cpu * 1e6 / n_in as f64,
        );
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let _ = child.wait();
        cleanup(&conn, &cfg).await;
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "notification end to end: median {median:.0} input samples/s of {RUNS} runs (min {:.0}, max {:.0}); target ≥ 150000/s: {}",
        rates[0],
        rates[rates.len() - 1],
        if median >= 150_000.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );
}
