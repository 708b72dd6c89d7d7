//! HMAC-SHA256 capability tokens for the URLs the API serves itself
//! (uploads, result files, ZIP downloads): `base64url(json) "." base64url(mac)`.
//! A token names what it grants and until when; nothing is stored server-side.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Capability {
    /// One `PUT` of the bytes of `file_id`, with exactly this content type.
    Upload {
        file_id: String,
        content_type: String,
    },
    /// `GET` of one stored object.
    Get { key: String, content_type: String },
    /// `GET` of an uploaded asset, wherever its bytes are stored.
    File { file_id: String },
    /// `POST` of a trainer's webhook events for one attempt of a training
    /// output.
    TrainingEvents { output_id: i64, attempt: i64 },
    /// A ZIP of the results of these jobs.
    Zip {
        job_ids: Vec<String>,
        account_id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("malformed or forged token")]
    Invalid,
    #[error("token expired")]
    Expired,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    #[serde(flatten)]
    cap: Capability,
    /// Expiry, epoch ms.
    exp: i64,
}

#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

impl Signer {
    pub fn new(key: &[u8]) -> Signer {
        Signer { key: key.to_vec() }
    }

    fn mac(&self, data: &[u8]) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC accepts any key length");
        m.update(data);
        m
    }

    pub fn sign(&self, cap: &Capability, exp_ms: i64) -> String {
        let body = serde_json::to_vec(&Claims {
            cap: cap.clone(),
            exp: exp_ms,
        })
        .unwrap_or_default();
        let tag = self.mac(&body).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Verifies signature (constant time) and expiry against `now_ms`.
    /// Returns the capability and its expiry.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<(Capability, i64), SignError> {
        let (body, tag) = token.split_once('.').ok_or(SignError::Invalid)?;
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SignError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| SignError::Invalid)?;
        self.mac(&body)
            .verify_slice(&tag)
            .map_err(|_| SignError::Invalid)?;
        let claims: Claims = serde_json::from_slice(&body).map_err(|_| SignError::Invalid)?;
        if claims.exp <= now_ms {
            return Err(SignError::Expired);
        }
        Ok((claims.cap, claims.exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_tamper_and_expiry() {
        let s = Signer::new(b"0123456789abcdef0123456789abcdef");
        let cap = Capability::Get {
            key: "results/a.jpg".into(),
            content_type: "image/jpeg".into(),
        };
        let t = s.sign(&cap, 2_000);
        assert_eq!(s.verify(&t, 1_000), Ok((cap.clone(), 2_000)));
        assert_eq!(s.verify(&t, 2_000), Err(SignError::Expired));
        let other = Signer::new(b"another key, also 32 bytes long!");
        assert_eq!(other.verify(&t, 1_000), Err(SignError::Invalid));
        let mut forged = t.clone();
        forged.replace_range(0..1, if t.starts_with('A') { "B" } else { "A" });
        assert_eq!(s.verify(&forged, 1_000), Err(SignError::Invalid));
        assert_eq!(s.verify("garbage", 1_000), Err(SignError::Invalid));
    }
}
