//! The wire format: one AMQP message carries one msgpack batch of samples.
//!
//! Body: msgpack map `{"samples": [Sample…]}` with named fields (`rmp_serde::to_vec_named`) so
//! that the schema can grow without breaking old readers. Headers: [`FORMAT_HEADER`] (integer
//! format version) and, when signing is on, [`SIGNATURE_HEADER`] (hex HMAC-SHA256 of the body).

use serde::{Deserialize, Serialize};

use crate::sample::Sample;

/// MIME type of every vmeter message body.
pub const CONTENT_TYPE: &str = "application/msgpack";
/// Header carrying the body format version (integer).
pub const FORMAT_HEADER: &str = "x-vmeter-format";
/// Header carrying the hex HMAC-SHA256 of the body.
pub const SIGNATURE_HEADER: &str = "x-vmeter-signature";
/// Header set on dead-lettered messages: why the message could never be processed.
pub const DEAD_REASON_HEADER: &str = "x-vmeter-dead-reason";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: i64 = 1;

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The format header names a version this build does not read.
    #[error("unsupported format version {0}")]
    Version(i64),
    /// Not msgpack, or not a batch of samples.
    #[error("undecodable batch: {0}")]
    Msgpack(#[from] rmp_serde::decode::Error),
}

#[derive(Serialize)]
struct BatchRef<'a> {
    samples: &'a [Sample],
}

#[derive(Deserialize)]
struct BatchOwned {
    samples: Vec<Sample>,
}

/// Encodes a batch. Infallible for vmeter's own `Sample`s (all fields are msgpack-representable).
pub fn encode(samples: &[Sample]) -> Vec<u8> {
    rmp_serde::to_vec_named(&BatchRef { samples }).expect("a Sample always serialises to msgpack")
}

/// Decodes a batch written by [`encode`]. `version` is the value of [`FORMAT_HEADER`], if any
/// (absent means the current version).
pub fn decode(body: &[u8], version: Option<i64>) -> Result<Vec<Sample>, DecodeError> {
    if let Some(v) = version
        && v != FORMAT_VERSION
    {
        return Err(DecodeError::Version(v));
    }
    let b: BatchOwned = rmp_serde::from_slice(body)?;
    Ok(b.samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::SampleType;
    use chrono::{TimeZone, Utc};

    fn sample() -> Sample {
        let mut md = crate::Metadata::new();
        md.insert("cpu_number".into(), 2.into());
        md.insert(
            "flavor".into(),
            serde_json::json!({"name": "m1.small", "vcpus": 2}),
        );
        Sample {
            name: "cpu".into(),
            kind: SampleType::Cumulative,
            unit: "ns".into(),
            volume: 1.5e12,
            user_id: Some("u".into()),
            project_id: None,
            resource_id: "r".into(),
            timestamp: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
                + chrono::Duration::microseconds(7),
            resource_metadata: md.into(),
            source: "openstack".into(),
            message_id: uuid::Uuid::now_v7(),
            monotonic_time: Some(12345.678),
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let s = vec![sample(), sample()];
        let body = encode(&s);
        assert_eq!(decode(&body, Some(FORMAT_VERSION)).unwrap(), s);
        assert_eq!(decode(&body, None).unwrap(), s);
    }

    #[test]
    fn rejects_garbage_and_unknown_version() {
        assert!(matches!(
            decode(b"\x93garbage", None),
            Err(DecodeError::Msgpack(_))
        ));
        assert!(matches!(
            decode(&encode(&[sample()]), Some(99)),
            Err(DecodeError::Version(99))
        ));
        // A valid msgpack map that is not a batch.
        let other = rmp_serde::to_vec_named(&serde_json::json!({"x": 1})).unwrap();
        assert!(decode(&other, None).is_err());
    }
}
