//! The ingest bench's plumbing: the collector as a process, HTTP requests to it, its
//! counters, publishing with confirms.

use std::process::{Child, Command, Stdio};

use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmeter_core::amqp::{self, BrokerConfig, Publisher};
use vmeter_core::telemetry::scrape;

use super::{SECRET, WINDOW};

pub async fn http_get(addr: &str, path: &str) -> String {
    String::from_utf8(http_get_bytes(addr, path).await).expect("UTF-8 answer")
}

/// The whole answer, as bytes: what a client that stores or forwards the body does (the
/// latency figures do not include checking 7 MB of UTF-8 or growing a `String`).
pub async fn http_get_bytes(addr: &str, path: &str) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::with_capacity(64 * 1024);
    s.read_to_end(&mut buf).await.unwrap();
    buf
}

pub async fn body_len(addr: &str, path: &str) -> usize {
    http_get(addr, path).await.len()
}

/// `(stored, duplicates)` from the collector's `/metrics`.
pub async fn counters(addr: &str) -> (u64, u64) {
    let text = http_get(addr, "/metrics").await;
    let get = |name| scrape(&text, name) as u64;
    (
        get("vmeter_collector_samples_stored_total"),
        get("vmeter_collector_duplicates_total"),
    )
}

/// The collector on `db`; `jobs`: its rollup job every 5 s (compaction off: the bench
/// compacts itself), else no background job.
pub fn start_collector(cfg: &BrokerConfig, db: &str, http: &str, jobs: bool) -> Child {
    // `VMETER_BENCH_COLLECTOR`: another build of the collector (A/B against a baseline).
    let bin = std::env::var("VMETER_BENCH_COLLECTOR")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_collector").to_string());
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
        .env("VMETER_SIGNING__TELEMETRY_SECRET", SECRET)
        // Fixed timestamps: no age window (the contract is still checked).
        .env("VMETER_CONTRACT__MAX_AGE_DAYS", "")
        .env("VMETER_DATABASE__URL", db)
        .env("VMETER_HTTP__LISTEN", http)
        .env(
            "VMETER_DATABASE__ROLLUP_INTERVAL_SECS",
            if jobs { "5" } else { "0" },
        )
        .env("VMETER_DATABASE__COMPACTION", "false")
        .env("VMETER_LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the collector binary")
}

/// Forgets every compacted hour (the next compaction starts from scratch).
pub async fn uncompact(pool: &PgPool) {
    sqlx::query("truncate sample_hour")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("update compaction_state set watermark = null")
        .execute(pool)
        .await
        .unwrap();
}

/// Publishes `bodies` (messages of the processed queue, `per_message` samples each) with
/// [`WINDOW`] confirms in flight; returns once the broker confirmed every one.
pub async fn publish_all(
    publisher: &Publisher,
    cfg: &BrokerConfig,
    bodies: &[Vec<u8>],
    per_message: usize,
) {
    let mut inflight = Vec::new();
    for body in bodies {
        let h = amqp::count_header(per_message);
        inflight.push(
            publisher
                .send_body(&cfg.exchange, &cfg.processed_routing_key, body, h)
                .await
                .unwrap(),
        );
        if inflight.len() == WINDOW {
            for c in inflight.drain(..) {
                c.confirmed().await.unwrap();
            }
        }
    }
    for c in inflight {
        c.confirmed().await.unwrap();
    }
}

/// Statistics requests answered so far (from rollups, from samples), from `/metrics`.
pub async fn paths(http: &str) -> (u64, u64) {
    let m = http_get(http, "/metrics").await;
    let get = |p: &str| scrape(&m, &format!("vmeter_api_statistics_total{{path=\"{p}\"}}")) as u64;
    (get("rollup"), get("samples"))
}
