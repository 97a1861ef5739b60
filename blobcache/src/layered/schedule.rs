//! Priorities at the origin: on-demand reads go ahead of prefetch. A prefetch group waits
//! for a prefetch slot and for every on-demand origin fetch to end before it asks the origin,
//! unless an on-demand reader joins it meanwhile (then it is one).

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use super::flight::Group;
use crate::source::Priority;

/// On-demand fetches running at the origin, and the prefetch slots.
pub(super) struct Gate {
    ondemand: AtomicUsize,
    ondemand_idle: Notify,
    prefetch_slots: Semaphore,
}

/// What a group holds while it asks the origin: a prefetch slot, or its place among the
/// on-demand fetches; and the priority it asks with.
pub(super) struct Admission<'a> {
    _slot: Option<SemaphorePermit<'a>>,
    _ondemand: Option<OnDemand<'a>>,
    pub priority: Priority,
}

/// Counts an on-demand origin fetch until it ends, however it ends.
struct OnDemand<'a>(&'a Gate);

impl Drop for OnDemand<'_> {
    fn drop(&mut self) {
        if self.0.ondemand.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.ondemand_idle.notify_waiters();
        }
    }
}

impl Gate {
    pub(super) fn new(prefetch_concurrency: usize) -> Self {
        Self {
            ondemand: AtomicUsize::new(0),
            ondemand_idle: Notify::new(),
            prefetch_slots: Semaphore::new(prefetch_concurrency.max(1)),
        }
    }

    /// Waits until `group` may ask the origin.
    pub(super) async fn admit(&self, group: &Group<'_>) -> Admission<'_> {
        let mut slot = None;
        if group.priority == Priority::Prefetch && !group.urgency.is_raised() {
            tokio::select! {
                permit = async {
                    let permit = self.prefetch_slots.acquire().await.expect("semaphore is never closed");
                    self.wait_for_ondemand().await;
                    permit
                } => slot = Some(permit),
                _ = group.urgency.raised() => {}
            }
        }
        let urgent = group.priority == Priority::OnDemand || group.urgency.is_raised();
        let ondemand = urgent.then(|| {
            self.ondemand.fetch_add(1, Ordering::SeqCst);
            OnDemand(self)
        });
        Admission {
            _slot: slot,
            _ondemand: ondemand,
            priority: if urgent {
                Priority::OnDemand
            } else {
                Priority::Prefetch
            },
        }
    }

    async fn wait_for_ondemand(&self) {
        loop {
            let idle = self.ondemand_idle.notified();
            if self.ondemand.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}
