//! RabbitMQ: topology, connection with back-off, a confirming publisher, and the checks every
//! consumer applies to a delivery (signature, format, decode).
//!
//! Topology (names configurable, see [`BrokerConfig`]):
//! - `vmeter` durable topic exchange;
//! - `vmeter.samples.raw` (bound `sample.raw`, single active consumer) and
//!   `vmeter.samples.processed` (bound `sample.processed`), quorum queues by default, both
//!   dead-lettering into `vmeter.dlx`;
//! - `vmeter.dlx` topic exchange → `vmeter.dead` (bound `#`): messages that can never be
//!   processed, kept for inspection with an [`DEAD_REASON_HEADER`](crate::wire::DEAD_REASON_HEADER).
//!
//! Every service declares the whole topology at start-up; declarations are idempotent.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};
use serde::{Deserialize, Serialize};

use crate::sample::Sample;
use crate::shutdown::Shutdown;
use crate::signing::{SignatureError, Signer};
use crate::wire;

/// Queue implementation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Raft-replicated; faster than classic for persistent messages on RabbitMQ 3.10 (measured).
    #[default]
    Quorum,
    /// Classic mirrored-less queues, for brokers without quorum support.
    Classic,
}

/// `broker:` section shared by every service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// AMQP URL; the vhost is percent-encoded (`%2fvmeter` is the vhost `/vmeter`).
    pub url: String,
    /// Topic exchange carrying all sample traffic.
    pub exchange: String,
    /// Queue from the agents to the notification service (single active consumer).
    pub raw_queue: String,
    /// Routing key of raw batches.
    pub raw_routing_key: String,
    /// Queue from the notification service to the collectors.
    pub processed_queue: String,
    /// Routing key of processed batches.
    pub processed_routing_key: String,
    /// Dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Queue that keeps dead-lettered messages for inspection.
    pub dead_letter_queue: String,
    /// `quorum` (default) or `classic`. Changing it for an existing queue requires deleting
    /// the queue first: RabbitMQ refuses a redeclaration with other arguments.
    pub queue_type: QueueType,
    /// Unacknowledged deliveries a consumer may hold (bounds consumer memory).
    pub prefetch: u16,
    /// Upper bound of the reconnect back-off, seconds.
    pub reconnect_max_secs: u64,
    /// Largest AMQP frame this client accepts, bytes (the broker may lower it). The client
    /// keeps two I/O buffers of 32 frames each, so this bounds them: 128 KiB (RabbitMQ's
    /// default) costs 8 MiB per connection, 16 KiB 1 MiB. Unset: the service's default
    /// (agent-compute 16 KiB, where memory counts on every hypervisor; the broker's value
    /// for the others). A `frame_max` in `url` wins.
    pub frame_max: Option<u32>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2fvmeter".into(),
            exchange: "vmeter".into(),
            raw_queue: "vmeter.samples.raw".into(),
            raw_routing_key: "sample.raw".into(),
            processed_queue: "vmeter.samples.processed".into(),
            processed_routing_key: "sample.processed".into(),
            dead_letter_exchange: "vmeter.dlx".into(),
            dead_letter_queue: "vmeter.dead".into(),
            queue_type: QueueType::Quorum,
            prefetch: 200,
            reconnect_max_secs: 30,
            frame_max: None,
        }
    }
}

impl BrokerConfig {
    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `signing:` section shared by every service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// Shared HMAC-SHA256 secret; must be the same on every agent, notification and collector.
    /// Empty (and no `telemetry_secret_file`) disables signing and verification (logged
    /// loudly at start-up).
    pub telemetry_secret: String,
    /// A file holding the secret (surrounding whitespace ignored), read at start: keeps the
    /// secret out of the config file. The shipped configs point at
    /// `/etc/vmeter/telemetry_secret`, which deploy/setup.sh makes. A file that cannot be
    /// read, or is empty, is a config error.
    pub telemetry_secret_file: Option<std::path::PathBuf>,
}

impl SigningConfig {
    /// Reads `telemetry_secret_file` into `telemetry_secret` (a config error if it cannot
    /// be read, is empty, or both keys are set).
    pub fn resolve(&mut self) -> Result<(), crate::config::ConfigError> {
        let Some(path) = &self.telemetry_secret_file else {
            return Ok(());
        };
        let invalid = |message: String| crate::config::ConfigError::Invalid {
            origin: path.display().to_string(),
            key: "signing.telemetry_secret_file".into(),
            message,
        };
        if !self.telemetry_secret.is_empty() {
            return Err(invalid(
                "set either telemetry_secret or telemetry_secret_file, not both".into(),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(invalid("the file is empty".into()));
        }
        self.telemetry_secret = secret.to_string();
        Ok(())
    }

    /// Builds the signer and warns when signing is off.
    pub fn signer(&self, service: &str) -> Signer {
        let s = Signer::new(&self.telemetry_secret);
        if !s.enabled() {
            tracing::warn!(
                service,
                "signing.telemetry_secret is empty: messages are NOT signed and signatures are NOT verified."
            );
        }
        s
    }
}

/// Errors of one publish.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Connection or channel failure; retry after reconnecting.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused to take responsibility for the message.
    #[error("broker nacked the message")]
    Nacked,
    /// The message was unroutable (no queue bound) and came back.
    #[error("message returned by the broker: {code} {text}")]
    Returned { code: u16, text: String },
    /// Confirms were not enabled on the channel (a programming error).
    #[error("publisher confirms are not enabled on this channel")]
    NotConfirmed,
}

/// Opens a connection named `name` (visible in `rabbitmqctl list_connections`).
pub async fn connect(cfg: &BrokerConfig, name: &str) -> Result<Connection, lapin::Error> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    let parsed = cfg.url.parse::<lapin::uri::AMQPUri>();
    match (cfg.frame_max, parsed) {
        (Some(frame_max), Ok(mut uri)) => {
            uri.query.frame_max.get_or_insert(frame_max);
            Connection::connect_uri(uri, props).await
        }
        // Unset, or a URL that does not parse (lapin says why).
        _ => Connection::connect(&cfg.url, props).await,
    }
}

/// Connects, retrying with exponential back-off (0.5 s doubling up to `reconnect_max_secs`,
/// ±20 % jitter) and logging each failure. `None` if shutdown was requested meanwhile.
pub async fn connect_retrying(
    cfg: &BrokerConfig,
    name: &str,
    shutdown: &mut Shutdown,
) -> Option<Connection> {
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(cfg.reconnect_max_secs.max(1)),
    );
    loop {
        if *shutdown.borrow() {
            return None;
        }
        match connect(cfg, name).await {
            Ok(c) => {
                tracing::info!(url = %cfg.redacted_url(), "Connected to the broker.");
                return Some(c);
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(url = %cfg.redacted_url(), error = %e, retry_in_ms = wait.as_millis() as u64, "Broker unreachable; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::shutdown::wait(shutdown) => return None,
                }
            }
        }
    }
}

/// Exponential back-off with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            next: initial,
            initial,
            max,
        }
    }
    /// The delay to wait now (with ±20 % jitter); the following one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.8 + 0.4 * fastrand::f64())
    }
    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

fn queue_args(cfg: &BrokerConfig, single_active: bool, dead_letter: bool) -> FieldTable {
    let mut args = FieldTable::default();
    if cfg.queue_type == QueueType::Quorum {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
    }
    if single_active {
        args.insert(
            ShortString::from("x-single-active-consumer"),
            AMQPValue::Boolean(true),
        );
    }
    if dead_letter {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(cfg.dead_letter_exchange.clone().into()),
        );
    }
    args
}

/// Declares exchanges, queues and bindings (idempotent).
pub async fn declare_topology(ch: &Channel, cfg: &BrokerConfig) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        cfg.exchange.as_str().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        cfg.dead_letter_exchange.as_str().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    let q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(
        cfg.raw_queue.as_str().into(),
        q,
        queue_args(cfg, true, true),
    )
    .await?;
    ch.queue_declare(
        cfg.processed_queue.as_str().into(),
        q,
        queue_args(cfg, false, true),
    )
    .await?;
    ch.queue_declare(
        cfg.dead_letter_queue.as_str().into(),
        q,
        queue_args(cfg, false, false),
    )
    .await?;
    let bind = |queue: &str, exchange: &str, key: &str| {
        let (queue, exchange, key) = (
            ShortString::from(queue),
            ShortString::from(exchange),
            ShortString::from(key),
        );
        async move {
            ch.queue_bind(
                queue,
                exchange,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
    };
    bind(&cfg.raw_queue, &cfg.exchange, &cfg.raw_routing_key).await?;
    bind(
        &cfg.processed_queue,
        &cfg.exchange,
        &cfg.processed_routing_key,
    )
    .await?;
    bind(&cfg.dead_letter_queue, &cfg.dead_letter_exchange, "#").await?;
    Ok(())
}

/// Opens a publisher for a producer that may lack the right to declare (an agent's broker
/// user can publish raw samples and nothing else): declares the topology when the broker
/// allows it, else checks passively, on a fresh channel, that the exchange exists. A
/// producer then publishes into the topology the control host's services declared; until
/// they did, its mandatory publishes come back unroutable and it spools.
pub async fn open_producer(
    conn: &Connection,
    signer: Signer,
    cfg: &BrokerConfig,
) -> Result<Publisher, lapin::Error> {
    let p = Publisher::open(conn, signer.clone()).await?;
    match declare_topology(p.channel(), cfg).await {
        Ok(()) => Ok(p),
        Err(e) => {
            tracing::debug!(error = %e, "Not allowed to declare the topology; checking that the exchange exists.");
            let p = Publisher::open(conn, signer).await?;
            p.channel()
                .exchange_declare(
                    cfg.exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok(p)
        }
    }
}

/// A channel in confirm mode that signs what it sends. Every publish is `mandatory`, so an
/// unroutable message is an error, not a silent loss.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    signer: Signer,
}

/// A publish whose confirm has not arrived yet. Await it with [`Pending::confirmed`].
pub struct Pending(PublisherConfirm);

impl Pending {
    /// Waits for the broker's confirm; `Ok` only for an ack of a routed message.
    pub async fn confirmed(self) -> Result<(), PublishError> {
        match self.0.await? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => {
                Err(PublishError::Returned {
                    code: ret.reply_code,
                    text: ret.reply_text.to_string(),
                })
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked),
            Confirmation::NotRequested => Err(PublishError::NotConfirmed),
        }
    }
}

/// A batch encoded and signed, ready to send (see [`prepare`]).
pub struct Prepared {
    pub body: Vec<u8>,
    pub headers: FieldTable,
}

/// Encodes and signs the samples `samples` points at: the CPU-heavy part of publishing,
/// separate from the channel so that it can run on several threads.
pub fn prepare(signer: &Signer, samples: &[&Sample]) -> Prepared {
    let body = wire::encode_refs(samples);
    let mut headers = count_header(samples.len());
    headers.insert(
        ShortString::from(wire::FORMAT_HEADER),
        AMQPValue::LongLongInt(wire::FORMAT_VERSION),
    );
    if let Some(sig) = signer.sign(&body) {
        headers.insert(
            ShortString::from(wire::SIGNATURE_HEADER),
            AMQPValue::LongString(sig.into()),
        );
    }
    Prepared { body, headers }
}

/// Headers carrying the batch's sample count ([`wire::SAMPLES_HEADER`]); the publisher
/// adds format and signature.
pub fn count_header(n: usize) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(
        ShortString::from(wire::SAMPLES_HEADER),
        AMQPValue::LongLongInt(n as i64),
    );
    h
}

impl Publisher {
    /// Opens a channel on `conn` and enables publisher confirms.
    pub async fn open(conn: &Connection, signer: Signer) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel, signer })
    }

    /// The underlying channel (for declarations).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Encodes, signs and sends a batch; returns the pending confirm. Sending many and then
    /// awaiting their confirms pipelines the round trips.
    pub async fn send_batch(
        &self,
        exchange: &str,
        routing_key: &str,
        samples: &[Sample],
    ) -> Result<Pending, PublishError> {
        let body = wire::encode(samples);
        self.send_body(exchange, routing_key, &body, count_header(samples.len()))
            .await
    }

    /// Sends a batch encoded and signed beforehand with [`prepare`] (possibly on another
    /// thread).
    pub async fn send_prepared(
        &self,
        exchange: &str,
        routing_key: &str,
        batch: &Prepared,
    ) -> Result<Pending, PublishError> {
        self.send_raw(exchange, routing_key, &batch.body, batch.headers.clone())
            .await
    }

    /// [`send_batch`](Self::send_batch) of the samples `samples` points at, in that order.
    pub async fn send_refs(
        &self,
        exchange: &str,
        routing_key: &str,
        samples: &[&Sample],
    ) -> Result<Pending, PublishError> {
        let body = wire::encode_refs(samples);
        self.send_body(exchange, routing_key, &body, count_header(samples.len()))
            .await
    }

    /// Sends an already encoded body, adding the format and signature headers.
    pub async fn send_body(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        mut headers: FieldTable,
    ) -> Result<Pending, PublishError> {
        headers.insert(
            ShortString::from(wire::FORMAT_HEADER),
            AMQPValue::LongLongInt(wire::FORMAT_VERSION),
        );
        if let Some(sig) = self.signer.sign(body) {
            headers.insert(
                ShortString::from(wire::SIGNATURE_HEADER),
                AMQPValue::LongString(sig.into()),
            );
        }
        self.send_raw(exchange, routing_key, body, headers).await
    }

    /// Sends `body` with exactly `headers` (no signing); used for dead-lettering, which must
    /// keep the original headers intact.
    pub async fn send_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<Pending, PublishError> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from(wire::CONTENT_TYPE))
            .with_headers(headers);
        let pc = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?;
        Ok(Pending(pc))
    }

    /// Sends a batch and waits for its confirm.
    pub async fn publish_batch(
        &self,
        exchange: &str,
        routing_key: &str,
        samples: &[Sample],
    ) -> Result<(), PublishError> {
        self.send_batch(exchange, routing_key, samples)
            .await?
            .confirmed()
            .await
    }

    /// Copies a message that can never be processed to the dead-letter exchange with its
    /// original headers plus the reason, and waits for the confirm. The caller acks the
    /// original only after this returns `Ok`.
    pub async fn dead_letter(
        &self,
        cfg: &BrokerConfig,
        routing_key: &str,
        body: &[u8],
        props: &BasicProperties,
        reason: &str,
    ) -> Result<(), PublishError> {
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from(wire::DEAD_REASON_HEADER),
            AMQPValue::LongString(reason.to_string().into()),
        );
        self.send_raw(&cfg.dead_letter_exchange, routing_key, body, headers)
            .await?
            .confirmed()
            .await
    }

    /// Dead-letters a consumed delivery as [`Publisher::dead_letter`] does (confirmed before
    /// returning) and counts it in `vmeter_dead_lettered_total{service, reason}`. The caller
    /// still acks the delivery, after this returns.
    pub async fn dead_letter_delivery(
        &self,
        cfg: &BrokerConfig,
        d: &lapin::message::Delivery,
        service: &str,
        reason: &str,
    ) -> Result<(), PublishError> {
        self.dead_letter(cfg, d.routing_key.as_str(), &d.data, &d.properties, reason)
            .await?;
        crate::telemetry::dead_lettered(service, reason);
        Ok(())
    }
}

impl Publisher {
    /// Dead-letters some samples of an otherwise good message: they travel as a batch of
    /// their own (signed like any batch, so a fixed copy can be replayed), with the reason,
    /// an optional detail (e.g. the SQLSTATE) and the service in the headers; waits for the
    /// confirm, then counts each sample in `vmeter_samples_dropped_total{service, reason}`
    /// and the message in `vmeter_dead_lettered_total`. The caller acks the original
    /// message only after this returns `Ok`.
    pub async fn dead_letter_samples(
        &self,
        cfg: &BrokerConfig,
        routing_key: &str,
        samples: &[&Sample],
        service: &str,
        why: crate::telemetry::DropReason,
        detail: &str,
    ) -> Result<(), PublishError> {
        if samples.is_empty() {
            return Ok(());
        }
        let reason = why.label();
        let batch = prepare(&self.signer, samples);
        let mut headers = batch.headers;
        headers.insert(
            ShortString::from(wire::DEAD_REASON_HEADER),
            AMQPValue::LongString(reason.to_string().into()),
        );
        headers.insert(
            ShortString::from(wire::DEAD_DETAIL_HEADER),
            AMQPValue::LongString(detail.to_string().into()),
        );
        headers.insert(
            ShortString::from(wire::DEAD_SERVICE_HEADER),
            AMQPValue::LongString(service.to_string().into()),
        );
        self.send_raw(&cfg.dead_letter_exchange, routing_key, &batch.body, headers)
            .await?
            .confirmed()
            .await?;
        crate::telemetry::dropped(service, why).add(samples.len() as u64);
        crate::telemetry::dead_lettered(service, &reason);
        tracing::warn!(
            service,
            reason = %reason,
            detail,
            samples = samples.len(),
            "Samples dead-lettered; the rest of their message goes on."
        );
        Ok(())
    }

    /// Dead-letters contract violators ([`crate::contract`]) with
    /// [`dead_letter_samples`](Self::dead_letter_samples), one message per rule broken (the
    /// detail is the wording of the first violation).
    pub async fn dead_letter_violations(
        &self,
        cfg: &BrokerConfig,
        routing_key: &str,
        bad: &[(Sample, crate::contract::Violation)],
        service: &str,
    ) -> Result<(), PublishError> {
        let mut rules: Vec<crate::contract::Rule> = bad.iter().map(|(_, v)| v.rule()).collect();
        rules.sort_unstable();
        rules.dedup();
        for rule in rules {
            let mut samples = Vec::new();
            let mut detail = String::new();
            for (s, v) in bad.iter().filter(|(_, v)| v.rule() == rule) {
                if samples.is_empty() {
                    detail = v.to_string();
                }
                samples.push(s);
            }
            let why = crate::telemetry::DropReason::Contract(rule);
            self.dead_letter_samples(cfg, routing_key, &samples, service, why, &detail)
                .await?;
        }
        Ok(())
    }
}

/// Why a delivery can never be processed (it goes to the dead-letter queue).
#[derive(Debug, thiserror::Error)]
pub enum Undeliverable {
    /// Missing, malformed or wrong signature.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// Not a vmeter batch.
    #[error(transparent)]
    Decode(#[from] wire::DecodeError),
}

impl Undeliverable {
    /// Short label for metrics and the dead-letter reason header.
    pub fn reason(&self) -> &'static str {
        match self {
            Undeliverable::Signature(e) => e.reason(),
            Undeliverable::Decode(wire::DecodeError::Version(_)) => "unsupported_format",
            Undeliverable::Decode(
                wire::DecodeError::Msgpack(_) | wire::DecodeError::Metadata(_),
            ) => "undecodable",
        }
    }
}

/// The sample count a vmeter publisher put in the headers, if any (lets a consumer size
/// batches or count samples without decoding bodies).
pub fn sample_count(props: &BasicProperties) -> Option<usize> {
    match header(props, wire::SAMPLES_HEADER)? {
        AMQPValue::LongLongInt(n) if *n >= 0 => Some(*n as usize),
        _ => None,
    }
}

/// Opens a channel with `prefetch` and consumes `queue` (manual acks).
pub async fn consume(
    conn: &Connection,
    cfg: &BrokerConfig,
    queue: &str,
    tag: &str,
) -> Result<lapin::Consumer, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(cfg.prefetch, lapin::options::BasicQosOptions::default())
        .await?;
    ch.basic_consume(
        queue.into(),
        tag.into(),
        lapin::options::BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Verifies the signature of a delivery, then decodes its batch (with a throw-away
/// decoder; services use [`open_delivery_with`]).
pub fn open_delivery(
    signer: &Signer,
    props: &BasicProperties,
    body: &[u8],
) -> Result<Vec<Sample>, Undeliverable> {
    open_delivery_with(signer, &mut wire::Decoder::default(), props, body)
}

/// Verifies the signature of a delivery, then decodes its batch with `decoder` (which
/// remembers metadata it has parsed before).
pub fn open_delivery_with(
    signer: &Signer,
    decoder: &mut wire::Decoder,
    props: &BasicProperties,
    body: &[u8],
) -> Result<Vec<Sample>, Undeliverable> {
    let sig = header(props, wire::SIGNATURE_HEADER).map(|v| match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        _ => Vec::new(),
    });
    signer.verify(body, sig.as_deref())?;
    let version = header(props, wire::FORMAT_HEADER).map(|v| match v {
        AMQPValue::LongLongInt(i) => *i,
        AMQPValue::LongInt(i) => i64::from(*i),
        AMQPValue::ShortInt(i) => i64::from(*i),
        AMQPValue::ShortShortInt(i) => i64::from(*i),
        AMQPValue::LongUInt(i) => i64::from(*i),
        AMQPValue::ShortUInt(i) => i64::from(*i),
        AMQPValue::ShortShortUInt(i) => i64::from(*i),
        _ => -1,
    });
    Ok(decoder.decode(body, version)?)
}

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2fvmeter"),
            "amqp://guest:***@127.0.0.1:5672/%2fvmeter"
        );
        assert_eq!(
            redact_url("postgres://vmeter@h/db"),
            "postgres://vmeter@h/db"
        );
        assert_eq!(redact_url("amqp://h"), "amqp://h");
    }

    #[test]
    fn backoff_doubles_to_max_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert!((80..=120).contains(&d[0]), "{d:?}");
        assert!((160..=240).contains(&d[1]), "{d:?}");
        assert!(
            (320..=480).contains(&d[2]) && (320..=480).contains(&d[4]),
            "{d:?}"
        );
        b.reset();
        assert!(b.next_delay().as_millis() <= 120);
    }

    #[test]
    fn open_delivery_checks_signature_then_format() {
        let signer = Signer::new("s");
        let body = wire::encode(&[]);
        let mut h = FieldTable::default();
        h.insert(
            "x-vmeter-signature".into(),
            AMQPValue::LongString(signer.sign(&body).unwrap().into()),
        );
        h.insert("x-vmeter-format".into(), AMQPValue::LongLongInt(1));
        let props = BasicProperties::default().with_headers(h.clone());
        assert!(open_delivery(&signer, &props, &body).unwrap().is_empty());
        let e = open_delivery(&Signer::new("other"), &props, &body).unwrap_err();
        assert_eq!(e.reason(), "signature_mismatch");
        let e = open_delivery(&signer, &BasicProperties::default(), &body).unwrap_err();
        assert_eq!(e.reason(), "signature_missing");
        h.insert("x-vmeter-format".into(), AMQPValue::LongLongInt(9));
        let e =
            open_delivery(&signer, &BasicProperties::default().with_headers(h), &body).unwrap_err();
        assert_eq!(e.reason(), "unsupported_format");
        let e = open_delivery(&Signer::new(""), &BasicProperties::default(), b"\xc1").unwrap_err();
        assert_eq!(e.reason(), "undecodable");
    }
}
