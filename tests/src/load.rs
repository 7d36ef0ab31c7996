//! The load of the fault tests ([`Generator`]): `cpu` samples like an agent's, published
//! with confirms and retried until confirmed, so that every sample made is published at
//! least once, whatever the broker does meanwhile; and how to count what was stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use vmeter_core::signing::Signer;
use vmeter_core::{Metadata, Sample, SampleType, wire};

use crate::Names;

/// Seconds of sample time between two ticks of the generator.
pub const STEP_S: i64 = 10;

/// The load: every `period`, one `cpu` sample per resource (a 1-vCPU VM 50 % busy), one
/// signed batch, published with confirms and retried (reconnecting) until confirmed.
pub struct Generator {
    ticks: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

pub fn cpu_sample(r: usize, tick: u64, t0: DateTime<Utc>) -> Sample {
    let mut md = Metadata::new();
    md.insert("cpu_number".into(), 1.into());
    Sample {
        name: "cpu".into(),
        kind: SampleType::Cumulative,
        unit: "ns".into(),
        volume: tick as f64 * STEP_S as f64 * 0.5e9,
        user_id: Some("u".into()),
        project_id: Some("p".into()),
        resource_id: format!("fault-{r:04}"),
        timestamp: t0 + chrono::Duration::seconds(tick as i64 * STEP_S),
        resource_metadata: Arc::new(md),
        source: "openstack".into(),
        message_id: uuid::Uuid::new_v4(),
        monotonic_time: None,
    }
}

impl Generator {
    /// Publishes to the names' exchange, signed with `secret`, through the names' broker
    /// addresses: a failed publish or connection moves on to the next address.
    pub fn start(
        names: &Names,
        secret: &str,
        resources: usize,
        period: Duration,
        t0: DateTime<Utc>,
    ) -> Generator {
        let ticks = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (exchange, tk, st) = (names.exchange.clone(), ticks.clone(), stop.clone());
        let (urls, secret) = (names.broker_urls.clone(), secret.to_string());
        let task = tokio::spawn(async move {
            let signer = Signer::new(&secret);
            let mut at = 0usize;
            let mut ch: Option<(Connection, lapin::Channel)> = None;
            let mut tick = 0u64;
            while !st.load(Ordering::Relaxed) {
                let batch: Vec<Sample> = (0..resources).map(|r| cpu_sample(r, tick, t0)).collect();
                let body = wire::encode(&batch);
                let mut headers = FieldTable::default();
                headers.insert(
                    wire::FORMAT_HEADER.into(),
                    AMQPValue::LongLongInt(wire::FORMAT_VERSION),
                );
                headers.insert(
                    wire::SIGNATURE_HEADER.into(),
                    AMQPValue::LongString(signer.sign(&body).unwrap().into()),
                );
                headers.insert(
                    wire::SAMPLES_HEADER.into(),
                    AMQPValue::LongLongInt(resources as i64),
                );
                // Until confirmed: a batch whose confirm was lost may go twice (the
                // collector's dedup must then store it once).
                loop {
                    if ch.is_none() {
                        let url = &urls[at % urls.len()];
                        ch = async {
                            let c = Connection::connect(url, ConnectionProperties::default())
                                .await
                                .ok()?;
                            let channel = c.create_channel().await.ok()?;
                            channel.confirm_select(Default::default()).await.ok()?;
                            Some((c, channel))
                        }
                        .await;
                    }
                    let ok = match &ch {
                        Some((_, channel)) => {
                            let sent = channel
                                .basic_publish(
                                    exchange.as_str().into(),
                                    "sample.raw".into(),
                                    BasicPublishOptions {
                                        mandatory: true,
                                        ..Default::default()
                                    },
                                    &body,
                                    BasicProperties::default()
                                        .with_delivery_mode(2)
                                        .with_headers(headers.clone()),
                                )
                                .await;
                            match sent {
                                Ok(confirm) => match confirm.await {
                                    Ok(c) => c.is_ack() && c.take_message().is_none(),
                                    Err(_) => false,
                                },
                                Err(_) => false,
                            }
                        }
                        None => false,
                    };
                    if ok {
                        break;
                    }
                    ch = None;
                    at += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tick += 1;
                tk.store(tick, Ordering::Relaxed);
                tokio::time::sleep(period).await;
            }
        });
        Generator { ticks, stop, task }
    }

    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.ticks.load(Ordering::Relaxed)
    }
}

/// Rows and distinct (resource, timestamp) keys of the generator's samples of the first
/// `ticks` ticks (sample time before `t0 + ticks·STEP_S`).
pub async fn stored(pool: &sqlx::PgPool, t0: DateTime<Utc>, ticks: u64) -> Option<(i64, i64)> {
    sqlx::query_as(
        "select count(*), count(distinct (resource_id, timestamp)) from samples
         where meter = 'cpu' and resource_id like 'fault-%' and timestamp < $1",
    )
    .bind(t0 + chrono::Duration::seconds(ticks as i64 * STEP_S))
    .fetch_one(pool)
    .await
    .ok()
}
