//! Sealed gossip datagrams: each carries its version, the sender's clock and a nonce, and a
//! truncated HMAC (keyed by the zone token) over all of that and the packet.
//!
//! [`Gate`] lets a datagram through once: only if its seal opens, it is no larger than gossip
//! ever sends, its time is within [`GOSSIP_WINDOW`] of this host's clock, and its (time,
//! nonce) was not seen before (a bounded `ReplayCache`). A captured datagram replayed later,
//! or again at once, is dropped. Where a datagram is meant for is foca's business: it drops
//! packets addressed to another member's identity, so a datagram replayed to another member
//! within the window is dropped there. Sealing authenticates; it does not hide.
//!
//! Layout: `[version = 2][time: u64 ms, big-endian][nonce: 16 bytes][packet][mac: 16 bytes]`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::Mac;

use super::auth::{Refusal, ZoneKey};
use super::limits::{self, Bound, OverBound};
use super::replay::ReplayCache;

const VERSION: u8 = 2;
const HEADER_LEN: usize = 1 + 8 + 16;
/// Bytes of mac appended to each datagram.
const SEAL_LEN: usize = 16;

/// The largest packet gossip sends (foca's `max_packet_size`): foca's LAN default, under a
/// 1500-byte Ethernet MTU with room for IP and UDP headers and the seal.
pub const MAX_PACKET: usize = 1400;

/// Largest datagram accepted: a sealed [`MAX_PACKET`].
pub const MAX_DATAGRAM: usize = HEADER_LEN + MAX_PACKET + SEAL_LEN;

/// How far a datagram's clock may be from this host's: the same allowance as request stamps
/// (the hosts' clocks are kept in sync).
pub const GOSSIP_WINDOW: Duration = Duration::from_secs(60);

/// Datagrams remembered for replay checks. Why 16,384: a member receives a few tens of
/// datagrams a second (probes every 500 ms, gossip every 200 ms to three members, their
/// acks) whatever the zone's size, so a window's worth is a few thousand; this is several
/// times that, in about 1 MiB.
const GOSSIP_MEMORY: usize = 1 << 14;

impl ZoneKey {
    /// Seals a gossip packet, stamped with this host's clock and a fresh nonce.
    pub fn seal(&self, packet: &[u8]) -> Vec<u8> {
        self.seal_at(packet, unix_ms(), rand::random())
    }

    fn seal_at(&self, packet: &[u8], time_ms: u64, nonce: [u8; 16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + packet.len() + SEAL_LEN);
        out.push(VERSION);
        out.extend_from_slice(&time_ms.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(packet);
        let mac = self.mac(&[b"gossip-v2", &out]).finalize().into_bytes();
        out.extend_from_slice(&mac[..SEAL_LEN]);
        out
    }

    /// The datagram's time, nonce and packet, if it was sealed with this key. Checks
    /// nothing about freshness: that is [`Gate::admit`]'s job.
    fn open<'a>(&self, datagram: &'a [u8]) -> Result<Opened<'a>, Refusal> {
        let split = datagram
            .len()
            .checked_sub(SEAL_LEN)
            .filter(|n| *n >= HEADER_LEN)
            .ok_or(Refusal::Malformed)?;
        let (sealed, tag) = datagram.split_at(split);
        if sealed[0] != VERSION {
            return Err(Refusal::OldVersion);
        }
        self.mac(&[b"gossip-v2", sealed])
            .verify_truncated_left(tag)
            .map_err(|_| Refusal::BadMac)?;
        let (header, packet) = sealed.split_at(HEADER_LEN);
        Ok(Opened {
            time_ms: u64::from_be_bytes(header[1..9].try_into().expect("8 bytes")),
            nonce: header[9..].try_into().expect("16 bytes"),
            packet,
        })
    }
}

struct Opened<'a> {
    time_ms: u64,
    nonce: [u8; 16],
    packet: &'a [u8],
}

/// Why a datagram was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error("Gossip datagram refused: {0}")]
    Refused(Refusal),
    #[error("Gossip datagram refused: {0}")]
    Over(OverBound),
}

impl Dropped {
    /// Short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Dropped::Refused(r) => r.reason(),
            Dropped::Over(_) => "over_limit",
        }
    }
}

/// The receiving side: opens datagrams and lets each through once while it is fresh.
pub struct Gate {
    key: ZoneKey,
    seen: ReplayCache,
}

impl Gate {
    pub fn new(key: ZoneKey) -> Self {
        Self {
            key,
            seen: ReplayCache::new(GOSSIP_WINDOW.as_millis() as u64, GOSSIP_MEMORY),
        }
    }

    /// The packet inside `datagram`, if it is sealed, fresh and new.
    pub fn admit<'a>(&mut self, datagram: &'a [u8]) -> Result<&'a [u8], Dropped> {
        self.admit_at(datagram, unix_ms())
    }

    fn admit_at<'a>(&mut self, datagram: &'a [u8], now_ms: u64) -> Result<&'a [u8], Dropped> {
        // Before the mac: the size is free to check.
        limits::check(
            Bound::GossipDatagram,
            datagram.len() as u64,
            MAX_DATAGRAM as u64,
        )
        .map_err(Dropped::Over)?;
        let opened = self.key.open(datagram).map_err(Dropped::Refused)?;
        self.seen
            .admit(opened.time_ms, opened.nonce, now_ms)
            .map_err(Dropped::Refused)?;
        Ok(opened.packet)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ZoneKey {
        ZoneKey::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn seals_need_the_key_and_an_intact_datagram() {
        let k = key("zone-secret-0123456789");
        let other = key("another-zone-secret-xyz");
        let sealed = k.seal(b"ping");
        assert_eq!(Gate::new(k.clone()).admit(&sealed), Ok(&b"ping"[..]));
        assert_eq!(
            Gate::new(other).admit(&sealed),
            Err(Dropped::Refused(Refusal::BadMac))
        );
        for at in [1, HEADER_LEN, sealed.len() - 1] {
            let mut flipped = sealed.clone();
            flipped[at] ^= 1;
            assert_eq!(
                Gate::new(k.clone()).admit(&flipped),
                Err(Dropped::Refused(Refusal::BadMac)),
                "byte {at}"
            );
        }
        let mut old = sealed.clone();
        old[0] = 1;
        assert_eq!(
            Gate::new(k.clone()).admit(&old),
            Err(Dropped::Refused(Refusal::OldVersion))
        );
        assert_eq!(
            Gate::new(k.clone()).admit(b"short"),
            Err(Dropped::Refused(Refusal::Malformed))
        );
    }

    #[test]
    fn a_datagram_replayed_within_or_after_the_window_is_dropped() {
        let k = key("zone-secret-0123456789");
        let mut gate = Gate::new(k.clone());
        let now = unix_ms();
        let sealed = k.seal_at(b"ping", now, rand::random());
        assert_eq!(gate.admit_at(&sealed, now), Ok(&b"ping"[..]));
        assert_eq!(
            gate.admit_at(&sealed, now + 1_000),
            Err(Dropped::Refused(Refusal::Replayed)),
            "replayed within the window"
        );
        let after = now + GOSSIP_WINDOW.as_millis() as u64 + 1;
        assert_eq!(
            gate.admit_at(&sealed, after),
            Err(Dropped::Refused(Refusal::Stale)),
            "replayed after the window"
        );
        // A fresh gate (a restarted host) still drops the late copy.
        assert_eq!(
            Gate::new(k.clone()).admit_at(&sealed, after),
            Err(Dropped::Refused(Refusal::Stale))
        );
        let fresh = k.seal_at(b"ping", after, rand::random());
        assert_eq!(gate.admit_at(&fresh, after), Ok(&b"ping"[..]));
    }

    #[test]
    fn oversized_datagrams_are_dropped_before_the_mac() {
        let k = key("zone-secret-0123456789");
        let largest = k.seal(&[0u8; MAX_PACKET]);
        assert_eq!(largest.len(), MAX_DATAGRAM);
        assert!(Gate::new(k.clone()).admit(&largest).is_ok());
        let over = k.seal(&[0u8; MAX_PACKET + 1]);
        assert!(matches!(
            Gate::new(k).admit(&over),
            Err(Dropped::Over(OverBound {
                bound: Bound::GossipDatagram,
                ..
            }))
        ));
    }
}
