//! Logging of refused peer traffic (bad or replayed stamps and datagrams, over-limit
//! connections and requests) that a flood cannot turn into a full disk.
//!
//! Every refusal is counted (`brisk_zone_refused_total{reason}`), but a source gets at most
//! one log line per [`PERIOD`], which reports how many of its refusals were not logged since
//! its last line. At most [`SOURCES`] sources are tracked at once; refusals from sources past
//! that share one more line per period, so a flood from spoofed UDP addresses writes at most
//! `SOURCES + 1` lines a period too. It decides what to log, never what to refuse.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One line per source per this long. Ten seconds keeps a first refusal visible at once
/// and a steady flood to a line every ten seconds per source.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Sources tracked at once: with [`PERIOD`], at most 3.3 lines a second in the worst case.
pub const SOURCES: usize = 32;

pub struct RefusalLog {
    period: Duration,
    capacity: usize,
    /// A std mutex: held for one map lookup, never across an await or a log write.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    sources: HashMap<Option<IpAddr>, Entry>,
    /// Refusals from sources that found the table full, and from forgotten sources.
    others: Option<Entry>,
}

struct Entry {
    last: Instant,
    suppressed: u64,
}

/// Whether to write a line now, and what it says.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Log for this source; this many of its refusals went unlogged before this one.
    Log(u64),
    /// Log for "other sources"; this many went unlogged.
    LogOthers(u64),
    Quiet,
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self::new(PERIOD, SOURCES)
    }
}

impl Entry {
    fn note(&mut self, now: Instant, period: Duration) -> Option<u64> {
        if now.duration_since(self.last) >= period {
            self.last = now;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

impl RefusalLog {
    pub fn new(period: Duration, sources: usize) -> Self {
        Self {
            period,
            capacity: sources,
            state: Mutex::default(),
        }
    }

    /// Counts a refusal of traffic from `source` (`reason` labels the metric) and logs `why`
    /// unless this source was logged within the period.
    pub fn refuse(&self, source: Option<IpAddr>, reason: &'static str, why: &dyn Display) {
        metrics::counter!("brisk_zone_refused_total", "reason" => reason).increment(1);
        match self.verdict(source, Instant::now()) {
            Verdict::Log(suppressed) => {
                let source = source.map_or_else(|| "unknown".to_owned(), |s| s.to_string());
                tracing::warn!(%source, reason, suppressed, "zone peer traffic refused: {why}");
            }
            Verdict::LogOthers(suppressed) => tracing::warn!(
                source = "other sources",
                reason,
                suppressed,
                "zone peer traffic refused: {why}"
            ),
            Verdict::Quiet => {}
        }
    }

    fn verdict(&self, source: Option<IpAddr>, now: Instant) -> Verdict {
        let period = self.period;
        let mut state = self.state.lock().expect("not poisoned");
        if let Some(entry) = state.sources.get_mut(&source) {
            return entry.note(now, period).map_or(Verdict::Quiet, Verdict::Log);
        }
        if state.sources.len() >= self.capacity {
            // Sources quiet for a whole period make room; what they had not reported yet is
            // reported with the others'.
            let mut carried = 0;
            state.sources.retain(|_, e| {
                let keep = now.duration_since(e.last) < period;
                if !keep {
                    carried += e.suppressed;
                }
                keep
            });
            if carried > 0 {
                let others = state.others.get_or_insert(Entry {
                    last: now,
                    suppressed: 0,
                });
                others.suppressed += carried;
            }
        }
        if state.sources.len() < self.capacity {
            state.sources.insert(
                source,
                Entry {
                    last: now,
                    suppressed: 0,
                },
            );
            return Verdict::Log(0);
        }
        match &mut state.others {
            Some(others) => others
                .note(now, period)
                .map_or(Verdict::Quiet, Verdict::LogOthers),
            None => {
                state.others = Some(Entry {
                    last: now,
                    suppressed: 0,
                });
                Verdict::LogOthers(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, i]))
    }

    #[test]
    fn a_flooding_source_gets_one_line_a_period_with_a_count() {
        let log = RefusalLog::new(Duration::from_secs(10), 4);
        let t0 = Instant::now();
        assert_eq!(log.verdict(ip(1), t0), Verdict::Log(0));
        for i in 1..1000 {
            assert_eq!(
                log.verdict(ip(1), t0 + Duration::from_millis(i)),
                Verdict::Quiet
            );
        }
        assert_eq!(log.verdict(ip(2), t0), Verdict::Log(0), "others still log");
        assert_eq!(
            log.verdict(ip(1), t0 + Duration::from_secs(10)),
            Verdict::Log(999)
        );
        assert_eq!(
            log.verdict(ip(1), t0 + Duration::from_secs(11)),
            Verdict::Quiet
        );
    }

    #[test]
    fn many_sources_share_one_line_once_the_table_is_full() {
        let log = RefusalLog::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        let lines = (1..=200)
            .filter(|i| log.verdict(ip(*i), t0) != Verdict::Quiet)
            .count();
        assert_eq!(lines, 3, "two sources and one line for the others");
        // Later, quiet sources make room again; what the others had unlogged is reported.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(log.verdict(ip(250), later), Verdict::Log(0));
        assert_eq!(log.verdict(ip(251), later), Verdict::Log(0));
        assert_eq!(log.verdict(ip(252), later), Verdict::LogOthers(197));
    }
}
