//! Broker-side helpers: publish signed batches like an agent, read what a service published.

use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use vmeter_core::{Sample, signing::Signer, wire};

use crate::{Names, amqp_url};

pub async fn connect() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ from deploy/setup.sh must be running")
}

/// Waits until no message of `queue` is delivered and unacknowledged (asked of the
/// machine's node with `rabbitmqctl`): the consumer acked all it took. Before a crash
/// that must not redeliver anything.
pub async fn wait_all_acked(queue: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "-p", &super::vhost()])
            .args(["name", "messages_unacknowledged", "--formatter", "json"])
            .output()
            .expect("rabbitmqctl");
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let unacked = rows
            .iter()
            .find(|r| r["name"] == queue)
            .and_then(|r| r["messages_unacknowledged"].as_u64());
        if unacked == Some(0) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{queue}: {unacked:?} messages still unacknowledged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The consumer count of `queue`, `None` while it does not exist.
async fn consumers(conn: &Connection, queue: &str) -> Option<u32> {
    // A failed passive declare closes the channel: use a fresh one per try.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .ok()
    .map(|q| q.consumer_count())
}

/// Waits until `queue` exists (a service declares its topology at start).
pub async fn wait_for_queue(conn: &Connection, queue: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while consumers(conn, queue).await.is_none() {
        assert!(Instant::now() < deadline, "queue {queue} never appeared");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `queue` has a consumer: the service that consumes it has declared and
/// bound it (a queue that merely exists may not be bound yet, and a mandatory publish
/// to it would come back unroutable).
pub async fn wait_for_consumer(conn: &Connection, queue: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while consumers(conn, queue).await.unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "nobody consumes queue {queue}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes one signed batch (persistent, mandatory, confirmed) as an agent would.
pub async fn publish(
    conn: &Connection,
    names: &Names,
    routing_key: &str,
    samples: &[Sample],
    secret: &str,
) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let c = publish_on(&ch, names, routing_key, &wire::encode(samples), secret)
        .await
        .await
        .unwrap();
    assert!(
        c.is_ack() && c.take_message().is_none(),
        "a test message was not routed to a queue"
    );
    let _ = ch.close(200, "done".into()).await;
}

/// Publishes an encoded body on a confirm channel; returns the pending confirmation.
pub async fn publish_on(
    ch: &lapin::Channel,
    names: &Names,
    routing_key: &str,
    body: &[u8],
    secret: &str,
) -> lapin::PublisherConfirm {
    let mut h = FieldTable::default();
    h.insert(
        wire::FORMAT_HEADER.into(),
        AMQPValue::LongLongInt(wire::FORMAT_VERSION),
    );
    h.insert(
        wire::SIGNATURE_HEADER.into(),
        AMQPValue::LongString(Signer::new(secret).sign(body).unwrap().into()),
    );
    ch.basic_publish(
        names.exchange.as_str().into(),
        routing_key.into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        body,
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(h),
    )
    .await
    .unwrap()
}

/// Takes every message from `queue` until it stayed empty for `quiet` or `want`
/// samples arrived (whichever first, bounded by `timeout`); returns their samples.
/// Uses a consumer (basic.get is refused on single-active-consumer quorum queues).
pub async fn take(
    conn: &Connection,
    queue: &str,
    want: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Sample> {
    let mut n = 0;
    let mut out = Vec::new();
    consume(conn, queue, quiet, timeout, |d| {
        let samples = wire::decode(&d.data, None).expect("vmeter batch");
        n += samples.len();
        out.extend(samples);
        n < want
    })
    .await;
    out
}

/// Like [`take`], message by message, with each message's dead-letter reason header
/// ([`wire::DEAD_REASON_HEADER`], empty when absent). Bodies that are not vmeter batches
/// give no samples.
pub async fn take_dead(
    conn: &Connection,
    queue: &str,
    want_messages: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<(String, Vec<Sample>)> {
    let mut out = Vec::new();
    consume(conn, queue, quiet, timeout, |d| {
        let reason = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(wire::DEAD_REASON_HEADER).cloned())
            .map(|v| match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        out.push((reason, wire::decode(&d.data, None).unwrap_or_default()));
        out.len() < want_messages
    })
    .await;
    out
}

/// Consumes `queue`, acking each delivery after `each` saw it, until `each` says
/// enough, the queue stayed empty for `quiet`, or `timeout` passed. Closing the channel
/// returns anything delivered but not acked to the queue.
async fn consume(
    conn: &Connection,
    queue: &str,
    quiet: Duration,
    timeout: Duration,
    mut each: impl FnMut(&lapin::message::Delivery) -> bool,
) {
    use futures::StreamExt;
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "e2e-take".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let wait = quiet.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let more = each(&d);
                d.acker.ack(BasicAckOptions::default()).await.unwrap();
                if !more {
                    break;
                }
            }
            Ok(_) | Err(_) => break,
        }
    }
    let _ = ch.close(200, "done".into()).await;
}

/// Every sample arriving on `queue` during `period` (for a producer that keeps going).
pub async fn collect_for(conn: &Connection, queue: &str, period: Duration) -> Vec<Sample> {
    let started = Instant::now();
    let mut got = Vec::new();
    while started.elapsed() < period {
        got.extend(
            take(
                conn,
                queue,
                usize::MAX,
                Duration::from_millis(500),
                Duration::from_secs(2),
            )
            .await,
        );
    }
    got
}

/// Deletes this run's queues and exchanges.
pub async fn cleanup(conn: &Connection, names: &Names) {
    let ch = conn.create_channel().await.unwrap();
    for q in [&names.raw_queue, &names.processed_queue, &names.dead_queue] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [&names.exchange, &names.dlx] {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
