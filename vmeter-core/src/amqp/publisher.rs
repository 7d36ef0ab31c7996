//! The confirming publisher: every publish waits for the broker's confirm; returns and nacks are errors; dead-lettering of messages and samples.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

use super::PublishError;
use super::config::BrokerConfig;
use crate::sample::Sample;
use crate::signing::Signer;
use crate::wire;

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
