//! What every consumer checks of a delivery: signature, format, decode; consuming.

use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};

use super::config::BrokerConfig;
use crate::sample::Sample;
use crate::signing::{SignatureError, Signer};
use crate::wire;

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

pub(super) fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}
