//! Single flight: concurrent reads of one chunk reference make one fetch. A read joins the
//! fetch in flight for the same whole reference, or starts a group of its own; the group runs
//! in a task of its own and hands each chunk to its readers the moment it is verified.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{oneshot, Notify};

use super::failure::ReadFailure;
use super::{Layered, Reader, Role};
use crate::chunk::{ChunkRef, VerifiedChunk};
use crate::source::Priority;

/// A chunk's fate in one read: verified bytes and the level that served them, or why no
/// level could provide them.
pub(super) type Outcome = Result<Served, ReadFailure>;

/// A chunk as its readers receive it: every reader of one fetch learns the same level, so a
/// reader that joined a registry fetch knows it waited on the network too.
#[derive(Clone)]
pub(super) struct Served {
    pub chunk: VerifiedChunk,
    pub from: Role,
}

pub(super) type Flight = Shared<BoxFuture<'static, Outcome>>;

/// Raised when an on-demand reader joins a prefetch fetch, so that fetch stops waiting behind
/// other prefetch work and on-demand reads: it has become one.
#[derive(Default)]
pub(super) struct Urgency {
    raised: AtomicBool,
    notify: Notify,
}

impl Urgency {
    fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(super) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    pub(super) async fn raised(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

pub(super) struct InFlight {
    flight: Flight,
    urgency: Arc<Urgency>,
    /// An on-demand reader asked for this chunk before it arrived: it counts as fetched on
    /// demand even when prefetch started the fetch.
    pub(super) wanted: Arc<AtomicBool>,
    /// This host fetches the chunk through a zone peer. A peer's request for such a chunk
    /// is declined rather than joined: two hosts with different views of the zone could
    /// otherwise each wait for the other.
    forwarded: bool,
}

/// Chunks fetched together by one spawned task, and what their readers are waiting on.
#[derive(Clone, Copy)]
pub(super) struct Group<'a> {
    pub chunks: &'a [ChunkRef],
    pub priority: Priority,
    pub urgency: &'a Urgency,
    /// Per chunk: an on-demand reader joined before it arrived.
    pub wanted: &'a [Arc<AtomicBool>],
    pub reader: Reader,
    pub handoff: &'a Handoff,
}

/// Hands each chunk of a group to its waiting readers once, and takes it out of the
/// in-flight table so later readers find it in the cache. A group that ends without
/// handing a chunk over (a panic) fails its readers instead of leaving them waiting.
pub(super) struct Handoff {
    layered: Arc<Layered>,
    chunks: Vec<ChunkRef>,
    senders: Mutex<Vec<Option<oneshot::Sender<Outcome>>>>,
}

impl Handoff {
    pub(super) fn deliver(&self, i: usize, outcome: Outcome) {
        let sender = self.senders.lock().expect("not poisoned")[i].take();
        if let Some(sender) = sender {
            tracing::debug!(digest = %self.chunks[i].digest, ok = outcome.is_ok(), "chunk fetch done");
            self.layered
                .inflight
                .lock()
                .expect("not poisoned")
                .remove(&self.chunks[i]);
            let _ = sender.send(outcome);
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        for i in 0..self.chunks.len() {
            self.deliver(i, Err(ReadFailure::Abandoned));
        }
    }
}

/// Where one requested chunk's answer will come from.
enum Slot {
    Joined(Flight),
    /// Started by this call: index among the chunks it fetches.
    Mine(usize),
    /// A peer asked for a chunk this host is itself fetching through a peer.
    Declined,
    Refused(Flight),
}

impl Layered {
    /// A flight per chunk (`None`: declined for a peer), joining fetches in flight and
    /// starting groups for the rest.
    pub(super) fn join_or_start(
        self: &Arc<Self>,
        chunks: &[ChunkRef],
        priority: Priority,
        reader: Reader,
    ) -> Vec<Option<Flight>> {
        let mut inflight = self.inflight.lock().expect("not poisoned");
        let mut mine: Vec<ChunkRef> = Vec::new();
        let mut mine_index: HashMap<&ChunkRef, usize> = HashMap::new();
        let slots: Vec<Slot> = chunks
            .iter()
            .map(|c| {
                // Refused here too, so that no reference outside the limits reaches a level
                // whichever way it came in (prefetch, a zone peer).
                if let Err(err) = c.check() {
                    let outcome: Outcome = Err(ReadFailure::Refused(Arc::new(err)));
                    return Slot::Refused(futures::future::ready(outcome).boxed().shared());
                }
                match inflight.get(c) {
                    Some(f) if reader == Reader::Peer && f.forwarded => Slot::Declined,
                    Some(f) => {
                        if priority == Priority::OnDemand {
                            tracing::debug!(digest = %c.digest, "on-demand read joins a fetch in flight");
                            f.wanted.store(true, Ordering::SeqCst);
                            f.urgency.raise();
                        }
                        Slot::Joined(f.flight.clone())
                    }
                    None => Slot::Mine(*mine_index.entry(c).or_insert_with(|| {
                        mine.push(c.clone());
                        mine.len() - 1
                    })),
                }
            })
            .collect();
        // Chunks fetched through a peer and chunks fetched here go in separate groups, so a
        // chunk this host is home for never waits on another host's answer: two homes
        // serving each other would otherwise wait on each other.
        let forwarded: Vec<bool> = mine
            .iter()
            .map(|c| {
                reader == Reader::Local
                    && self
                        .levels
                        .iter()
                        .any(|l| l.role == Role::Peer && l.source.forwards(c))
            })
            .collect();
        let mut started: Vec<Option<Flight>> = vec![None; mine.len()];
        for group_forwarded in [false, true] {
            let members: Vec<usize> = (0..mine.len())
                .filter(|&j| forwarded[j] == group_forwarded)
                .collect();
            if members.is_empty() {
                continue;
            }
            let batch: Vec<ChunkRef> = members.iter().map(|&j| mine[j].clone()).collect();
            let urgency = Arc::new(Urgency::default());
            let wanted: Vec<Arc<AtomicBool>> = batch
                .iter()
                .map(|_| Arc::new(AtomicBool::new(false)))
                .collect();
            let mut senders = Vec::with_capacity(batch.len());
            for (k, &j) in members.iter().enumerate() {
                let (tx, rx) = oneshot::channel::<Outcome>();
                senders.push(Some(tx));
                let flight: Flight = rx
                    .map(|r| r.unwrap_or(Err(ReadFailure::Abandoned)))
                    .boxed()
                    .shared();
                inflight.insert(
                    mine[j].clone(),
                    InFlight {
                        flight: flight.clone(),
                        urgency: urgency.clone(),
                        wanted: wanted[k].clone(),
                        forwarded: group_forwarded,
                    },
                );
                started[j] = Some(flight);
            }
            let handoff = Handoff {
                layered: self.clone(),
                chunks: batch.clone(),
                senders: Mutex::new(senders),
            };
            tracing::debug!(
                chunks = batch.len(),
                ?priority,
                first = %batch[0].digest,
                "fetch started"
            );
            let this = self.clone();
            // Spawned, not polled by its readers: the group hands each chunk over as soon as
            // it is verified, and runs to the end (filling the cache) even if they go away.
            tokio::spawn(async move {
                let group = Group {
                    chunks: &batch,
                    priority,
                    urgency: &urgency,
                    wanted: &wanted,
                    reader,
                    handoff: &handoff,
                };
                this.read_through(&group).await;
            });
        }
        slots
            .into_iter()
            .map(|s| match s {
                Slot::Joined(f) => Some(f),
                Slot::Mine(j) => started[j].clone(),
                Slot::Declined => None,
                Slot::Refused(f) => Some(f),
            })
            .collect()
    }
}
