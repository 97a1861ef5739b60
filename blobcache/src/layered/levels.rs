//! The walk down the levels: for a group's chunks, each level in turn (fastest first, for as
//! many passes as configured) is asked for what is still missing, within its deadline, and
//! each answer is taken as it arrives.

use std::time::Instant;

use tokio::sync::mpsc;

use super::failure::ReadFailure;
use super::fill::Taken;
use super::flight::Group;
use super::{Layered, Level, Reader, Role};
use crate::chunk::ChunkRef;
use crate::source::{Answer, Priority};

impl Layered {
    /// Tries the levels for a group's chunks; hands each chunk to its readers as soon as one
    /// level's verified answer arrives, and the failures once every pass is done.
    pub(super) async fn read_through(&self, group: &Group<'_>) {
        let mut failures: Vec<ReadFailure> = vec![ReadFailure::NowhereFound; group.chunks.len()];
        let mut remaining: Vec<usize> = (0..group.chunks.len()).collect();
        'passes: for _ in 0..self.passes {
            for (li, level) in self.levels.iter().enumerate() {
                if remaining.is_empty() {
                    break 'passes;
                }
                if level.role == Role::Peer && group.reader == Reader::Peer {
                    continue;
                }
                remaining = if level.role == Role::Origin {
                    let admission = self.gate.admit(group).await;
                    self.ask(
                        li,
                        level,
                        group,
                        remaining,
                        &mut failures,
                        admission.priority,
                    )
                    .await
                } else {
                    let priority = match group.urgency.is_raised() {
                        true => Priority::OnDemand,
                        false => group.priority,
                    };
                    self.ask(li, level, group, remaining, &mut failures, priority)
                        .await
                };
            }
        }
        for i in remaining {
            group.handoff.deliver(i, Err(failures[i].clone()));
        }
    }

    /// Asks level `li` for the `remaining` chunks of `group`, taking each answer as it
    /// arrives; returns the chunks it did not serve, with why in `failures`.
    async fn ask(
        &self,
        li: usize,
        level: &Level,
        group: &Group<'_>,
        remaining: Vec<usize>,
        failures: &mut [ReadFailure],
        priority: Priority,
    ) -> Vec<usize> {
        let name = level.source.name();
        let refs: Vec<ChunkRef> = remaining.iter().map(|&i| group.chunks[i].clone()).collect();
        let started = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Answer)>();
        let fetch = tokio::time::timeout(level.deadline, async {
            // Owned by this future, so the channel closes when the level is done.
            let tx = tx;
            let each = move |k: usize, answer: Answer| {
                let _ = tx.send((k, answer));
            };
            level.source.fetch(&refs, priority, &each).await;
        });
        tokio::pin!(fetch);
        let mut answered = vec![false; refs.len()];
        let mut missed = Vec::new();
        let mut take = async |k: usize, answer: Answer, missed: &mut Vec<usize>| {
            let Some(done) = answered.get_mut(k).filter(|done| !**done) else {
                return;
            };
            *done = true;
            let i = remaining[k];
            match self.take(li, level, group, i, answer).await {
                Taken::Delivered => {}
                Taken::Missed => missed.push(i),
                Taken::Failed(why) => {
                    failures[i] = why;
                    missed.push(i);
                }
            }
        };
        let timed_out = loop {
            tokio::select! {
                Some((k, answer)) = rx.recv() => take(k, answer, &mut missed).await,
                result = &mut fetch => {
                    while let Ok((k, answer)) = rx.try_recv() {
                        take(k, answer, &mut missed).await;
                    }
                    break result.is_err();
                }
            }
        };
        level.stats.latency(name, started.elapsed().as_secs_f64());
        let unanswered: Vec<usize> = (0..refs.len()).filter(|&k| !answered[k]).collect();
        if timed_out && !unanswered.is_empty() {
            level.stats.timeout(name);
            tracing::warn!(level = name, "level too slow, skipping");
            for &k in &unanswered {
                failures[remaining[k]] = ReadFailure::TooSlow {
                    level: name,
                    deadline: level.deadline,
                };
            }
        } else if !unanswered.is_empty() {
            // A level that says nothing about a chunk does not have it.
            level.stats.misses(name, unanswered.len() as u64);
        }
        missed.extend(unanswered.into_iter().map(|k| remaining[k]));
        missed
    }
}
