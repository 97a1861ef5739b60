//! Zone authentication from a shared token: HMAC-signed, single-use request stamps for the
//! peer service, and the macs that seal gossip (`zone::seal`). The token never crosses the wire.
//!
//! A request stamp is `v2:<unix seconds>:<nonce>:<body>:<member>:<mac>`. `body` is the sha256
//! of the request message's protobuf encoding, `member` the peer address of the member the
//! caller means it for, and the mac (keyed by the token) covers the method, time, nonce, body
//! and member. So a captured stamp is good for one call: the same method, with the same
//! message, at the same member, once, within [`STAMP_WINDOW`] of the server's clock.
//!
//! The server knows which member it is from the zone config, never from the connection:
//! its identity is `Zone::me()`, the `peer.listen` address resolved once at start, which is
//! also the address its listener is bound to and the identity gossip announces for it.
//! Callers only ever address a member by the identity gossip gave them, so both ends name it
//! by the same `SocketAddr`, whatever address translation sits between them.
//!
//! The server hashes the message it decoded, re-encoded: protobuf encoding by prost is
//! canonical for a given message, and whatever a tamperer could add that decoding drops
//! (unknown fields, a different but equivalent encoding) changes nothing the server acts on.
//!
//! The server answers with a proof (a mac over the caller's nonce) so the caller knows it
//! reached a zone member. Version 1 stamps (no body, no member) are refused.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use prost::Message;
use sha2::{Digest as _, Sha256};

use super::replay::ReplayCache;
use super::ZoneError;
use crate::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// Request metadata key carrying the caller's stamp.
pub const STAMP_HEADER: &str = "x-brisk-zone-stamp";
/// Response metadata key carrying the server's proof.
pub const PROOF_HEADER: &str = "x-brisk-zone-proof";
/// How far a stamp's clock may be from the server's.
pub const STAMP_WINDOW: Duration = Duration::from_secs(60);
/// Stamps remembered for replay checks. Why 65,536: a host answering a thousand requests a
/// second for a whole window still fits, in about 4 MiB; past it the oldest are forgotten
/// and stamps that old refused (see `zone::replay`).
const STAMP_MEMORY: usize = 1 << 16;
/// Shortest token accepted: shorter secrets are guessable offline from one captured stamp.
const MIN_TOKEN_BYTES: usize = 16;
/// The stamp format this build writes and accepts.
const STAMP_VERSION: &str = "v2";

/// The zone's shared secret.
#[derive(Clone)]
pub struct ZoneKey(Vec<u8>);

impl std::fmt::Debug for ZoneKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZoneKey(..)")
    }
}

/// Why a stamp or a gossip datagram was refused. Logged (rate-limited); a caller only learns
/// "unauthenticated", and a datagram's sender nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("No stamp")]
    Missing,
    #[error("Malformed")]
    Malformed,
    #[error("Made by an older version of the protocol (upgrade every member)")]
    OldVersion,
    #[error("Not made with the zone token")]
    BadMac,
    #[error("Outside the freshness window (check the hosts' clocks)")]
    Stale,
    #[error("Already used: a replay")]
    Replayed,
    #[error("Made for another member, {0}")]
    WrongMember(SocketAddr),
    #[error("Made for another request body")]
    WrongBody,
    #[error("Too large")]
    TooLarge,
}

impl Refusal {
    /// Short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::OldVersion => "old_version",
            Refusal::BadMac => "bad_mac",
            Refusal::Stale => "stale",
            Refusal::Replayed => "replayed",
            Refusal::WrongMember(_) => "wrong_member",
            Refusal::WrongBody => "wrong_body",
            Refusal::TooLarge => "too_large",
        }
    }
}

/// What a stamp binds its call to, besides the method and the moment.
struct Binding {
    body: [u8; 32],
    member: SocketAddr,
}

/// The sha256 of a request message's protobuf encoding: what a stamp's `body` names.
pub fn body_digest<T: Message>(message: &T) -> [u8; 32] {
    Sha256::digest(message.encode_to_vec()).into()
}

impl ZoneKey {
    pub fn new(token: &[u8]) -> Result<Self> {
        let token = token.trim_ascii();
        if token.len() < MIN_TOKEN_BYTES {
            return Err(ZoneError::ShortToken {
                min: MIN_TOKEN_BYTES,
                len: token.len(),
            }
            .into());
        }
        Ok(Self(token.to_vec()))
    }

    /// Reads the token from a file (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self> {
        let token = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::new(&token).map_err(|e| match e {
            Error::Zone(e) => ZoneError::TokenFile {
                path: path.display().to_string(),
                source: Box::new(e),
            }
            .into(),
            e => e,
        })
    }

    /// An HMAC over `parts`, each length-prefixed so no two lists of parts collide.
    pub(super) fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            mac.update(&(p.len() as u32).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    fn stamp_mac(&self, method: &str, time: &str, nonce: &str, binding: &Binding) -> HmacSha256 {
        self.mac(&[
            b"stamp-v2",
            method.as_bytes(),
            time.as_bytes(),
            nonce.as_bytes(),
            &binding.body,
            binding.member.to_string().as_bytes(),
        ])
    }

    /// A fresh stamp for one call of `method` with `message` at the member `to`.
    pub fn stamp<T: Message>(&self, method: &str, message: &T, to: SocketAddr) -> String {
        let binding = Binding {
            body: body_digest(message),
            member: to,
        };
        self.stamp_at(method, &binding, unix_now())
    }

    fn stamp_at(&self, method: &str, binding: &Binding, now: u64) -> String {
        let time = now.to_string();
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let mac = self.stamp_mac(method, &time, &nonce, binding);
        format!(
            "{STAMP_VERSION}:{time}:{nonce}:{}:{}:{}",
            hex::encode(binding.body),
            binding.member,
            hex::encode(mac.finalize().into_bytes())
        )
    }

    /// Puts a fresh stamp for calling `method` at member `to` on `request`; returns it, to
    /// check the answer's proof. The request's message must not change after this.
    pub fn sign<T: Message>(
        &self,
        request: &mut tonic::Request<T>,
        method: &str,
        to: SocketAddr,
    ) -> String {
        let stamp = self.stamp(method, request.get_ref(), to);
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
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The fields of a v2 stamp, before its mac is checked.
struct Parsed<'a> {
    time: &'a str,
    when: u64,
    nonce: &'a str,
    nonce_bytes: [u8; 16],
    binding: Binding,
    mac: Vec<u8>,
}

fn parse(stamp: &str) -> std::result::Result<Parsed<'_>, Refusal> {
    // The member is an address, which has colons of its own (a port, IPv6): it is what is
    // left between the fixed fields in front and the mac at the end.
    let mut front = stamp.splitn(5, ':');
    let version = front.next().ok_or(Refusal::Malformed)?;
    if version == "v1" {
        return Err(Refusal::OldVersion);
    }
    if version != STAMP_VERSION {
        return Err(Refusal::Malformed);
    }
    let (Some(time), Some(nonce), Some(body), Some(rest)) =
        (front.next(), front.next(), front.next(), front.next())
    else {
        return Err(Refusal::Malformed);
    };
    let (member, mac) = rest.rsplit_once(':').ok_or(Refusal::Malformed)?;
    let bad = |_| Refusal::Malformed;
    let mut nonce_bytes = [0u8; 16];
    hex::decode_to_slice(nonce, &mut nonce_bytes).map_err(bad)?;
    let mut body_bytes = [0u8; 32];
    hex::decode_to_slice(body, &mut body_bytes).map_err(bad)?;
    Ok(Parsed {
        time,
        when: time.parse().map_err(|_| Refusal::Malformed)?,
        nonce,
        nonce_bytes,
        binding: Binding {
            body: body_bytes,
            member: member.parse().map_err(|_| Refusal::Malformed)?,
        },
        mac: hex::decode(mac).map_err(bad)?,
    })
}

/// Checks stamps for the member `me` and remembers the ones it accepted for as long as they
/// could be replayed.
pub struct Verifier {
    key: ZoneKey,
    me: SocketAddr,
    /// A std mutex: held only to look up, insert and prune.
    seen: Mutex<ReplayCache>,
}

impl Verifier {
    /// A verifier for the member whose identity (peer address) is `me`: `Zone::me()`.
    pub fn new(key: ZoneKey, me: SocketAddr) -> Self {
        Self {
            key,
            me,
            seen: Mutex::new(ReplayCache::new(STAMP_WINDOW.as_secs(), STAMP_MEMORY)),
        }
    }

    pub fn key(&self) -> &ZoneKey {
        &self.key
    }

    /// Checks the stamp `request` carries for `method` and its message; the proof to answer
    /// with.
    pub fn authorize<T: Message>(
        &self,
        request: &tonic::Request<T>,
        method: &str,
    ) -> std::result::Result<String, Refusal> {
        let stamp = request
            .metadata()
            .get(STAMP_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or(Refusal::Missing)?;
        self.check_at(method, stamp, &body_digest(request.get_ref()), unix_now())?;
        Ok(self.key.proof(stamp))
    }

    fn check_at(
        &self,
        method: &str,
        stamp: &str,
        body: &[u8; 32],
        now: u64,
    ) -> std::result::Result<(), Refusal> {
        let p = parse(stamp)?;
        // The mac first: only a stamp made with the token earns a more precise refusal.
        self.key
            .stamp_mac(method, p.time, p.nonce, &p.binding)
            .verify_slice(&p.mac)
            .map_err(|_| Refusal::BadMac)?;
        if p.binding.member != self.me {
            return Err(Refusal::WrongMember(p.binding.member));
        }
        if &p.binding.body != body {
            return Err(Refusal::WrongBody);
        }
        self.seen
            .lock()
            .expect("not poisoned")
            .admit(p.when, p.nonce_bytes, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_proto::brisk::v1::HasRequest;

    fn key(s: &str) -> ZoneKey {
        ZoneKey::new(s.as_bytes()).unwrap()
    }

    fn member(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 3, i], 7600))
    }

    fn has(digest: &str) -> HasRequest {
        HasRequest {
            digests: vec![digest.into()],
        }
    }

    /// Checks `stamp` as member `me` would for `message`.
    fn check(
        v: &Verifier,
        method: &str,
        message: &HasRequest,
        stamp: &str,
    ) -> std::result::Result<(), Refusal> {
        v.check_at(method, stamp, &body_digest(message), unix_now())
    }

    #[test]
    fn a_stamp_is_accepted_once_for_its_method_and_only_with_the_same_key() {
        let k = key("zone-secret-0123456789");
        let v = Verifier::new(k.clone(), member(1));
        let m = has("a");
        let s = k.stamp("Has", &m, member(1));
        assert_eq!(check(&v, "Fetch", &m, &s), Err(Refusal::BadMac));
        assert_eq!(check(&v, "Has", &m, &s), Ok(()));
        assert_eq!(check(&v, "Has", &m, &s), Err(Refusal::Replayed));
        let other = key("another-zone-secret-xyz");
        let forged = other.stamp("Has", &m, member(1));
        assert_eq!(check(&v, "Has", &m, &forged), Err(Refusal::BadMac));
        assert_eq!(check(&v, "Has", &m, "v2:1:2"), Err(Refusal::Malformed));
        assert!(!s.contains("zone-secret"), "the token is never in a stamp");
    }

    #[test]
    fn a_stamp_is_good_only_at_its_member_and_with_its_body() {
        let k = key("zone-secret-0123456789");
        let a = Verifier::new(k.clone(), member(1));
        let b = Verifier::new(k.clone(), member(2));
        let m = has("a");
        let s = k.stamp("Has", &m, member(1));
        assert_eq!(
            check(&b, "Has", &m, &s),
            Err(Refusal::WrongMember(member(1)))
        );
        assert_eq!(check(&a, "Has", &has("b"), &s), Err(Refusal::WrongBody));
        assert_eq!(check(&a, "Has", &m, &s), Ok(()), "refusals did not use it");
        // Rewriting the member or the body in the stamp breaks its mac.
        let moved = s.replace("10.0.3.1:7600", "10.0.3.2:7600");
        assert_eq!(check(&b, "Has", &m, &moved), Err(Refusal::BadMac));
        let body = hex::encode(body_digest(&has("b")));
        let rebodied = s.replace(&hex::encode(body_digest(&m)), &body);
        assert_eq!(check(&a, "Has", &has("b"), &rebodied), Err(Refusal::BadMac));
    }

    #[test]
    fn ipv6_members_and_old_stamps() {
        let k = key("zone-secret-0123456789");
        let me: SocketAddr = "[fd00::17]:7600".parse().unwrap();
        let v = Verifier::new(k.clone(), me);
        let m = has("a");
        assert_eq!(check(&v, "Has", &m, &k.stamp("Has", &m, me)), Ok(()));
        let old = format!("v1:{}:{}:{}", unix_now(), "0".repeat(32), "0".repeat(64));
        assert_eq!(check(&v, "Has", &m, &old), Err(Refusal::OldVersion));
    }

    #[test]
    fn stamps_outside_the_window_are_stale() {
        let k = key("zone-secret-0123456789");
        let v = Verifier::new(k.clone(), member(1));
        let m = has("a");
        let s = k.stamp("Has", &m, member(1));
        let later = unix_now() + STAMP_WINDOW.as_secs() + 5;
        assert_eq!(
            v.check_at("Has", &s, &body_digest(&m), later),
            Err(Refusal::Stale)
        );
    }

    #[test]
    fn proofs_need_the_key() {
        let k = key("zone-secret-0123456789");
        let other = key("another-zone-secret-xyz");
        let s = k.stamp("GetTrace", &has("a"), member(1));
        assert!(k.check_proof(&s, &k.proof(&s)));
        assert!(!k.check_proof(&s, &other.proof(&s)));
    }

    #[test]
    fn short_tokens_are_refused() {
        assert!(ZoneKey::new(b"  short  \n").is_err());
    }
}
