//! Zone authentication from a shared token: HMAC-signed, single-use request stamps for the
//! peer service and sealed gossip packets. The token itself never crosses the wire.
//!
//! A request stamp is `v1:<unix seconds>:<nonce>:<mac>` with the mac over the method, time
//! and nonce. The server refuses stamps older or newer than [`STAMP_WINDOW`] and nonces it
//! has seen within that window, so a captured stamp cannot be replayed. The server answers
//! with a proof (a mac over the caller's nonce) so the caller knows it reached a zone member.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// Request metadata key carrying the caller's stamp.
pub const STAMP_HEADER: &str = "x-brisk-zone-stamp";
/// Response metadata key carrying the server's proof.
pub const PROOF_HEADER: &str = "x-brisk-zone-proof";
/// How far a stamp's clock may be from the server's.
pub const STAMP_WINDOW: Duration = Duration::from_secs(60);
/// Bytes of mac appended to each gossip packet.
const SEAL_LEN: usize = 16;
/// Shortest token accepted: shorter secrets are guessable offline from one captured stamp.
const MIN_TOKEN_BYTES: usize = 16;

/// The zone's shared secret.
#[derive(Clone)]
pub struct ZoneKey(Vec<u8>);

impl std::fmt::Debug for ZoneKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZoneKey(..)")
    }
}

impl ZoneKey {
    pub fn new(token: &[u8]) -> Result<Self> {
        let token = token.trim_ascii();
        if token.len() < MIN_TOKEN_BYTES {
            return Err(Error::Zone(format!(
                "the zone token must be at least {MIN_TOKEN_BYTES} bytes (it has {})",
                token.len()
            )));
        }
        Ok(Self(token.to_vec()))
    }

    /// Reads the token from a file (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self> {
        let token = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::new(&token).map_err(|e| Error::Zone(format!("{}: {e}", path.display())))
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            mac.update(&(p.len() as u32).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    /// A fresh stamp for one call of `method`.
    pub fn stamp(&self, method: &str) -> String {
        let now = unix_now();
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let mac = self.mac(&[
            b"stamp",
            method.as_bytes(),
            now.to_string().as_bytes(),
            nonce.as_bytes(),
        ]);
        format!(
            "v1:{now}:{nonce}:{}",
            hex::encode(mac.finalize().into_bytes())
        )
    }

    /// Puts a fresh stamp for `method` on `request`; returns it, to check the answer's proof.
    pub fn sign<T>(&self, request: &mut tonic::Request<T>, method: &str) -> String {
        let stamp = self.stamp(method);
        request
            .metadata_mut()
            .insert(STAMP_HEADER, stamp.parse().expect("a stamp is ASCII"));
        stamp
    }

    /// Whether `response` carries the proof for `stamp`: the peer holds the zone's token.
    pub fn proven<T>(&self, response: &tonic::Response<T>, stamp: &str) -> bool {
        let proof = response
            .metadata()
            .get(PROOF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        self.check_proof(stamp, proof)
    }

    /// The proof a server returns for a stamp it accepted.
    pub fn proof(&self, stamp: &str) -> String {
        let nonce = stamp.split(':').nth(2).unwrap_or_default();
        let mac = self.mac(&[b"proof", nonce.as_bytes()]);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `proof` answers `stamp` (constant time).
    pub fn check_proof(&self, stamp: &str, proof: &str) -> bool {
        let nonce = stamp.split(':').nth(2).unwrap_or_default();
        let Ok(proof) = hex::decode(proof) else {
            return false;
        };
        self.mac(&[b"proof", nonce.as_bytes()])
            .verify_slice(&proof)
            .is_ok()
    }

    /// Appends a mac to a gossip packet.
    pub fn seal(&self, packet: &[u8]) -> Vec<u8> {
        let mac = self.mac(&[b"gossip", packet]).finalize().into_bytes();
        let mut out = Vec::with_capacity(packet.len() + SEAL_LEN);
        out.extend_from_slice(packet);
        out.extend_from_slice(&mac[..SEAL_LEN]);
        out
    }

    /// The packet inside a sealed datagram, or `None` if it was not sealed with this key.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        let split = datagram.len().checked_sub(SEAL_LEN)?;
        let (packet, tag) = datagram.split_at(split);
        self.mac(&[b"gossip", packet])
            .verify_truncated_left(tag)
            .ok()
            .map(|_| packet)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a stamp was refused; logged, and the caller only learns "unauthenticated".
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    Stale,
    Replayed,
    BadMac,
}

/// Checks stamps and remembers the nonces it accepted for as long as they could be replayed.
pub struct Verifier {
    key: ZoneKey,
    /// Nonce → stamp time. A std mutex: held only to look up, insert and prune.
    seen: Mutex<HashMap<String, u64>>,
}

impl Verifier {
    pub fn new(key: ZoneKey) -> Self {
        Self {
            key,
            seen: Mutex::default(),
        }
    }

    pub fn key(&self) -> &ZoneKey {
        &self.key
    }

    /// Checks the stamp `request` carries for `method`; the proof to answer with.
    pub fn authorize<T>(
        &self,
        request: &tonic::Request<T>,
        method: &str,
    ) -> std::result::Result<String, Refusal> {
        let stamp = request
            .metadata()
            .get(STAMP_HEADER)
            .and_then(|v| v.to_str().ok());
        self.check(method, stamp)?;
        Ok(self.key.proof(stamp.expect("a checked stamp is present")))
    }

    pub fn check(&self, method: &str, stamp: Option<&str>) -> std::result::Result<(), Refusal> {
        self.check_at(method, stamp, unix_now())
    }

    fn check_at(
        &self,
        method: &str,
        stamp: Option<&str>,
        now: u64,
    ) -> std::result::Result<(), Refusal> {
        let stamp = stamp.ok_or(Refusal::Missing)?;
        let mut parts = stamp.split(':');
        let (Some("v1"), Some(time), Some(nonce), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Refusal::Malformed);
        };
        let when: u64 = time.parse().map_err(|_| Refusal::Malformed)?;
        let mac = hex::decode(mac).map_err(|_| Refusal::Malformed)?;
        if nonce.len() != 32 {
            return Err(Refusal::Malformed);
        }
        if when.abs_diff(now) > STAMP_WINDOW.as_secs() {
            return Err(Refusal::Stale);
        }
        self.key
            .mac(&[
                b"stamp",
                method.as_bytes(),
                time.as_bytes(),
                nonce.as_bytes(),
            ])
            .verify_slice(&mac)
            .map_err(|_| Refusal::BadMac)?;
        let mut seen = self.seen.lock().expect("not poisoned");
        let window = STAMP_WINDOW.as_secs();
        seen.retain(|_, t| t.abs_diff(now) <= window);
        if seen.insert(nonce.to_owned(), when).is_some() {
            return Err(Refusal::Replayed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ZoneKey {
        ZoneKey::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_stamp_is_accepted_once_for_its_method_and_only_with_the_same_key() {
        let k = key("zone-secret-0123456789");
        let v = Verifier::new(k.clone());
        let s = k.stamp("Fetch");
        assert_eq!(v.check("Has", Some(&s)), Err(Refusal::BadMac));
        assert_eq!(v.check("Fetch", Some(&s)), Ok(()));
        assert_eq!(v.check("Fetch", Some(&s)), Err(Refusal::Replayed));
        let other = key("another-zone-secret-xyz");
        assert_eq!(
            v.check("Fetch", Some(&other.stamp("Fetch"))),
            Err(Refusal::BadMac)
        );
        assert_eq!(v.check("Fetch", None), Err(Refusal::Missing));
        assert_eq!(v.check("Fetch", Some("v1:1:2")), Err(Refusal::Malformed));
        assert!(!s.contains("zone-secret"), "the token is never in a stamp");
    }

    #[test]
    fn stamps_outside_the_window_are_stale() {
        let k = key("zone-secret-0123456789");
        let v = Verifier::new(k.clone());
        let s = k.stamp("Fetch");
        let later = unix_now() + STAMP_WINDOW.as_secs() + 5;
        assert_eq!(v.check_at("Fetch", Some(&s), later), Err(Refusal::Stale));
    }

    #[test]
    fn proofs_and_seals_need_the_key() {
        let k = key("zone-secret-0123456789");
        let other = key("another-zone-secret-xyz");
        let s = k.stamp("GetTrace");
        assert!(k.check_proof(&s, &k.proof(&s)));
        assert!(!k.check_proof(&s, &other.proof(&s)));
        let sealed = k.seal(b"ping");
        assert_eq!(k.open(&sealed), Some(&b"ping"[..]));
        assert_eq!(other.open(&sealed), None);
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(k.open(&flipped), None);
        assert_eq!(k.open(b"short"), None);
    }

    #[test]
    fn short_tokens_are_refused() {
        assert!(ZoneKey::new(b"  short  \n").is_err());
    }
}
