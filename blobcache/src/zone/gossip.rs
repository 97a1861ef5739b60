//! Membership by SWIM gossip (the `foca` crate) over UDP on the peer address's port: foca
//! decides who is alive; this module moves its packets, runs its timers, keeps knocking on
//! seeds that are not members yet, and tells the [`Zone`] what changed.
//!
//! Every datagram is sealed with the zone key and carries the sender's clock and a nonce
//! (`zone::seal`); datagrams that do not open, are stale, were seen before or are larger
//! than gossip sends are dropped, so a host without the token can neither join nor spread
//! false news about members, and a captured datagram cannot be played again. Members a
//! packet names are bounded by the packet's size; the zone view by `limits::MAX_MEMBERS`.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::auth::ZoneKey;
use super::refusals::RefusalLog;
use super::seal::{self, Gate};
use super::Zone;
use crate::{Error, Result};

/// How often seeds that are not members yet are asked to let this host in.
const KNOCK_EVERY: Duration = Duration::from_secs(1);
/// The receive buffer: larger than any datagram accepted, so an oversized one is seen whole
/// (and dropped as such) rather than cut to a size that might pass.
const RECEIVE_BUFFER: usize = 64 * 1024;

/// A member as gossip knows it: its peer address and when it booted, so a restarted host
/// is a new identity that wins over its old, possibly declared-down one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberId {
    pub addr: SocketAddr,
    pub boot: u64,
}

impl foca::Identity for MemberId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            addr: self.addr,
            boot: self.boot.wrapping_add(1),
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.boot > adversary.boot
    }
}

type Swim = Foca<MemberId, PostcardCodec, StdRng, foca::NoCustomBroadcast>;

/// Binds the gossip socket and runs membership until `cancel` fires, then leaves the zone
/// politely so the others notice at once rather than by timeout.
pub async fn start(
    zone: Arc<Zone>,
    key: ZoneKey,
    seeds: Vec<SocketAddr>,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let me = zone.me();
    let socket = UdpSocket::bind(me)
        .await
        .map_err(|e| Error::io(format!("udp {me}"), e))?;
    let boot = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let seeds: Vec<SocketAddr> = seeds.into_iter().filter(|s| *s != me).collect();
    let size = NonZeroU32::new(seeds.len() as u32 + 1).expect("at least this host");
    let config = foca::Config {
        probe_period: Duration::from_millis(500),
        probe_rtt: Duration::from_millis(250),
        max_packet_size: NonZeroUsize::new(seal::MAX_PACKET).expect("not zero"),
        ..foca::Config::new_lan(size)
    };
    let swim: Swim = Foca::new(
        MemberId { addr: me, boot },
        config,
        rand::make_rng(),
        PostcardCodec,
    );
    let driver = Driver {
        zone,
        gate: Gate::new(key.clone()),
        key,
        refusals: RefusalLog::default(),
        socket,
        swim,
        runtime: AccumulatingRuntime::new(),
        seeds,
    };
    Ok(tokio::spawn(driver.run(cancel)))
}

struct Driver {
    zone: Arc<Zone>,
    key: ZoneKey,
    /// Opens incoming datagrams, once each.
    gate: Gate,
    refusals: RefusalLog,
    socket: UdpSocket,
    swim: Swim,
    runtime: AccumulatingRuntime<MemberId>,
    seeds: Vec<SocketAddr>,
}

impl Driver {
    async fn run(mut self, cancel: CancellationToken) {
        let (timer_tx, mut timers) = mpsc::unbounded_channel::<Timer<MemberId>>();
        let mut knock = tokio::time::interval(KNOCK_EVERY);
        let mut buf = vec![0u8; RECEIVE_BUFFER];
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = knock.tick() => self.knock(),
                Some(timer) = timers.recv() => {
                    if let Err(err) = self.swim.handle_timer(timer, &mut self.runtime) {
                        tracing::debug!(%err, "gossip timer");
                    }
                }
                got = self.socket.recv_from(&mut buf) => match got {
                    Ok((n, from)) => match self.gate.admit(&buf[..n]) {
                        Ok(packet) => {
                            if let Err(err) = self.swim.handle_data(packet, &mut self.runtime) {
                                tracing::debug!(%from, %err, "bad gossip packet");
                            }
                        }
                        Err(dropped) => {
                            self.refusals.refuse(Some(from.ip()), dropped.reason(), &dropped);
                        }
                    },
                    Err(err) => tracing::debug!(%err, "gossip receive"),
                },
            }
            self.drain(&timer_tx).await;
        }
        if let Err(err) = self.swim.leave_cluster(&mut self.runtime) {
            tracing::debug!(%err, "leaving the zone");
        }
        self.drain(&timer_tx).await;
    }

    /// Announces this host to every seed that is not a live member.
    fn knock(&mut self) {
        let live = self.zone.members();
        for seed in &self.seeds {
            if !live.contains(seed) {
                let dst = MemberId {
                    addr: *seed,
                    boot: 0,
                };
                if let Err(err) = self.swim.announce(dst, &mut self.runtime) {
                    tracing::debug!(%seed, %err, "announce");
                }
            }
        }
    }

    /// Carries out what foca asked for: packets out, timers set, membership news applied.
    async fn drain(&mut self, timers: &mpsc::UnboundedSender<Timer<MemberId>>) {
        while let Some((to, packet)) = self.runtime.to_send() {
            let sealed = self.key.seal(&packet);
            if let Err(err) = self.socket.send_to(&sealed, to.addr).await {
                tracing::debug!(peer = %to.addr, %err, "gossip send");
            }
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            let tx = timers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(timer);
            });
        }
        while let Some(news) = self.runtime.to_notify() {
            let (addr, alive) = match news {
                OwnedNotification::MemberUp(m) => (m.addr, true),
                OwnedNotification::MemberDown(m) => (m.addr, false),
                OwnedNotification::Rename(_, m) => {
                    let alive = self.swim.iter_members().any(|x| x.id() == &m);
                    (m.addr, alive)
                }
                _ => continue,
            };
            if let Err(over) = self.zone.set_alive(addr, alive) {
                self.refusals.refuse(Some(addr.ip()), "over_limit", &over);
            }
        }
    }
}
