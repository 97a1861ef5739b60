//! L3, the zone: which hosts are alive (SWIM gossip), which of them is each chunk's home
//! (rendezvous hashing), and the peer service hosts use to serve each other chunks.
//!
//! A chunk's home is the live member with the highest weight for its digest, so a change of
//! membership moves only the chunks whose home joined or left. Every member computes the same
//! home from the same view; the home fetches from the registry once and keeps the chunk, so
//! a zone reads each chunk from the registry about once however many hosts start the image.

pub mod auth;
pub mod client;
mod error;
pub mod gossip;
pub mod limits;
pub mod listen;
pub mod refusals;
mod replay;
pub mod seal;
pub mod server;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

pub use error::ZoneError;
use limits::{Bound, OverBound};

/// Mutual TLS for the peer service: the zone's CA and this host's certificate and key (PEM).
/// Every member presents a certificate the CA signed, and a host's certificate names its peer
/// address (an IP subject alternative name), which is what callers check.
#[derive(Clone)]
pub struct ZoneTls {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ZoneTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZoneTls(..)")
    }
}

impl ZoneTls {
    pub fn load(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> crate::Result<Self> {
        let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| crate::Error::io(p, e));
        Ok(Self {
            ca: read(ca)?,
            cert: read(cert)?,
            key: read(key)?,
        })
    }

    /// What the peer service serves with: this host's identity, and client certificates
    /// required and checked against the zone CA.
    pub fn server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca))
    }

    /// What a caller connects to `peer` with.
    pub fn client(&self, peer: &SocketAddr) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .domain_name(peer.ip().to_string())
    }
}

/// This host's view of its zone.
pub struct Zone {
    me: SocketAddr,
    /// Other members gossip says are alive. A std lock: held only to copy or update.
    live: RwLock<BTreeSet<SocketAddr>>,
    /// Members that lied or failed lately, and until when they are passed over.
    avoided: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Zone {
    pub fn new(me: SocketAddr) -> Self {
        Self {
            me,
            live: RwLock::default(),
            avoided: Mutex::default(),
        }
    }

    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// Other members believed alive, in address order.
    pub fn members(&self) -> Vec<SocketAddr> {
        self.live
            .read()
            .expect("not poisoned")
            .iter()
            .copied()
            .collect()
    }

    /// Records what gossip says about `addr`. A new member past [`limits::MAX_MEMBERS`] is
    /// not added (gossip keeps probing it; the view just stops growing).
    pub(crate) fn set_alive(&self, addr: SocketAddr, alive: bool) -> Result<(), OverBound> {
        if addr == self.me {
            return Ok(());
        }
        let mut live = self.live.write().expect("not poisoned");
        if alive && !live.contains(&addr) {
            // This host counts as a member too.
            limits::check(
                Bound::Members,
                live.len() as u64 + 2,
                limits::MAX_MEMBERS as u64,
            )?;
        }
        let changed = if alive {
            live.insert(addr)
        } else {
            live.remove(&addr)
        };
        if changed {
            tracing::info!(peer = %addr, alive, members = live.len() + 1, "zone membership changed");
            metrics::gauge!("brisk_zone_members").set((live.len() + 1) as f64);
        }
        Ok(())
    }

    /// Passes `addr` over for `period` (it served wrong bytes or stopped answering).
    pub fn avoid(&self, addr: SocketAddr, period: Duration) {
        self.avoided
            .lock()
            .expect("not poisoned")
            .insert(addr, Instant::now() + period);
    }

    pub fn is_avoided(&self, addr: &SocketAddr) -> bool {
        let mut avoided = self.avoided.lock().expect("not poisoned");
        match avoided.get(addr) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                avoided.remove(addr);
                false
            }
            None => false,
        }
    }

    /// Every member (this host included) ranked for `key`, home first. Avoided members are
    /// left out, but only after ranking, so avoiding one member moves no other chunk.
    pub fn ranked(&self, key: &[u8]) -> Vec<SocketAddr> {
        let mut all: Vec<(u64, SocketAddr)> = self
            .members()
            .into_iter()
            .chain(std::iter::once(self.me))
            .map(|a| (weight(&a, key), a))
            .collect();
        all.sort_by(|a, b| b.cmp(a));
        all.into_iter()
            .map(|(_, a)| a)
            .filter(|a| *a == self.me || !self.is_avoided(a))
            .collect()
    }
}

/// The rendezvous weight of member `addr` for `key`.
fn weight(addr: &SocketAddr, key: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update(addr.to_string().as_bytes());
    h.update([0]);
    h.update(key);
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("sha256 has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7600))
    }

    #[test]
    fn a_member_leaving_moves_only_the_keys_it_was_home_for() {
        let zone = Zone::new(addr(1));
        for i in 2..=5 {
            zone.set_alive(addr(i), true).unwrap();
        }
        let keys: Vec<[u8; 4]> = (0u32..2000).map(|k| k.to_be_bytes()).collect();
        let before: Vec<SocketAddr> = keys.iter().map(|k| zone.ranked(k)[0]).collect();
        let homes: BTreeSet<SocketAddr> = before.iter().copied().collect();
        assert_eq!(homes.len(), 5, "every member is home for some keys");
        zone.set_alive(addr(3), false).unwrap();
        for (k, old) in keys.iter().zip(&before) {
            let new = zone.ranked(k)[0];
            if *old == addr(3) {
                assert_ne!(new, addr(3));
            } else {
                assert_eq!(new, *old, "a key whose home stayed did not move");
            }
        }
    }

    #[test]
    fn avoided_members_are_passed_over_without_reshuffling_the_rest() {
        let zone = Zone::new(addr(1));
        zone.set_alive(addr(2), true).unwrap();
        zone.set_alive(addr(3), true).unwrap();
        let key = (0u32..)
            .map(|k| k.to_be_bytes())
            .find(|k| zone.ranked(k)[0] == addr(2))
            .unwrap();
        let full = zone.ranked(&key);
        zone.avoid(addr(2), Duration::from_secs(60));
        assert_eq!(zone.ranked(&key), full[1..].to_vec());
        zone.avoid(addr(2), Duration::ZERO);
        assert_eq!(zone.ranked(&key), full);
        zone.avoid(addr(1), Duration::from_secs(60));
        assert!(
            zone.ranked(&key).contains(&addr(1)),
            "this host is never avoided"
        );
    }

    #[test]
    fn the_view_stops_growing_at_its_bound() {
        let zone = Zone::new(addr(1));
        let member = |i: usize| SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 7600));
        for i in 0..limits::MAX_MEMBERS - 1 {
            zone.set_alive(member(i), true).unwrap();
        }
        let over = zone.set_alive(member(5000), true).unwrap_err();
        assert_eq!(over.bound, Bound::Members);
        assert_eq!(zone.members().len(), limits::MAX_MEMBERS - 1);
        zone.set_alive(member(0), true).unwrap();
        zone.set_alive(member(0), false).unwrap();
        zone.set_alive(member(5000), true).unwrap();
    }
}
