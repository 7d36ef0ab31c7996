//! HMAC-SHA256 signing of message bodies with the shared `telemetry_secret`.
//!
//! The signature covers the exact body bytes (not a canonicalised dict as in Ceilometer), so
//! there is no float or key-order ambiguity; it travels hex-encoded in the
//! [`SIGNATURE_HEADER`](crate::wire::SIGNATURE_HEADER) header. An empty secret disables both
//! signing and verification.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a body failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Signing is enabled but the message carries no signature header.
    #[error("message is not signed")]
    Missing,
    /// The header is not 64 hex characters.
    #[error("signature is not hex-encoded HMAC-SHA256")]
    Malformed,
    /// The signature does not match the body under our secret.
    #[error("signature does not match")]
    Mismatch,
}

impl SignatureError {
    /// Short label for metrics and dead-letter reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::Mismatch => "signature_mismatch",
        }
    }
}

/// Signs and verifies bodies. Cheap to clone.
#[derive(Clone)]
pub struct Signer {
    key: Option<HmacSha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl Signer {
    /// A signer for `secret`; an empty secret disables signing and verification.
    pub fn new(secret: &str) -> Self {
        let key = if secret.is_empty() {
            None
        } else {
            Some(
                HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length"),
            )
        };
        Signer { key }
    }

    /// Whether a secret is configured.
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Hex HMAC-SHA256 of `body`, or `None` when signing is disabled.
    pub fn sign(&self, body: &[u8]) -> Option<String> {
        let mut mac = self.key.clone()?;
        mac.update(body);
        Some(hex::encode(mac.finalize().into_bytes()))
    }

    /// Checks `signature` (the header value) against `body` in constant time.
    /// Always `Ok` when signing is disabled.
    pub fn verify(&self, body: &[u8], signature: Option<&[u8]>) -> Result<(), SignatureError> {
        let Some(key) = &self.key else { return Ok(()) };
        let sig = signature.ok_or(SignatureError::Missing)?;
        if sig.len() != 64 {
            return Err(SignatureError::Malformed);
        }
        let raw = hex::decode(sig).map_err(|_| SignatureError::Malformed)?;
        let mut mac = key.clone();
        mac.update(body);
        mac.verify_slice(&raw).map_err(|_| SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // RFC 4231 test case 2.
        let s = Signer::new("Jefe");
        assert_eq!(
            s.sign(b"what do ya want for nothing?").unwrap(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verify_accepts_own_and_rejects_others() {
        let s = Signer::new("secret");
        let sig = s.sign(b"body").unwrap();
        assert_eq!(s.verify(b"body", Some(sig.as_bytes())), Ok(()));
        assert_eq!(
            s.verify(b"bodY", Some(sig.as_bytes())),
            Err(SignatureError::Mismatch)
        );
        let other = Signer::new("other").sign(b"body").unwrap();
        assert_eq!(
            s.verify(b"body", Some(other.as_bytes())),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(s.verify(b"body", None), Err(SignatureError::Missing));
        assert_eq!(
            s.verify(b"body", Some(b"zz")),
            Err(SignatureError::Malformed)
        );
        let bad_hex = "g".repeat(64);
        assert_eq!(
            s.verify(b"body", Some(bad_hex.as_bytes())),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn empty_secret_disables() {
        let s = Signer::new("");
        assert!(!s.enabled());
        assert_eq!(s.sign(b"x"), None);
        assert_eq!(s.verify(b"x", None), Ok(()));
    }
}
