//! What a child measures: the timed window (first message to last), the
//! allocations inside it, the per-id success counts, the peak RSS; and the
//! one JSON line it reports.

use crate::alloc;
use crate::scenario::{Contender, Work};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A consumer that settles nothing for this long has stalled.
pub(crate) const STALL: Duration = Duration::from_secs(60);

/// The timed window: opened by the first message a consumer receives (raw)
/// or its handler is called with (Backstop), so connecting and the group join
/// stay outside it for both; closed after the last one is settled.
#[derive(Debug, Default)]
pub(crate) struct Window {
    first: OnceLock<(Instant, u64)>,
}

/// The closed window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Measured {
    pub(crate) elapsed: Duration,
    pub(crate) allocs: u64,
}

impl Window {
    /// Opens the window if this is the first message (cheap afterwards).
    pub(crate) fn open(&self) {
        if self.first.get().is_none() {
            let _ = self.first.set((Instant::now(), alloc::count()));
        }
    }

    /// Closes it now; `None` if no message ever came.
    pub(crate) fn close(&self) -> Option<Measured> {
        let (start, allocs) = *self.first.get()?;
        Some(Measured {
            elapsed: start.elapsed(),
            allocs: alloc::count().saturating_sub(allocs),
        })
    }
}

/// Successful handlings per id, to check "each id exactly once".
#[derive(Debug)]
pub(crate) struct Tally {
    counts: Vec<AtomicU32>,
    unknown: AtomicU64,
}

impl Tally {
    /// Room for ids `0..n`, allocated before the window opens.
    pub(crate) fn new(n: u64) -> Self {
        Self {
            counts: (0..n).map(|_| AtomicU32::new(0)).collect(),
            unknown: AtomicU64::new(0),
        }
    }

    /// One successful handling of `id` (`None`: the payload had no id).
    pub(crate) fn record(&self, id: Option<u64>) {
        match id
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.counts.get(i))
        {
            Some(c) => {
                c.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.unknown.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// What is wrong, if anything: ids never handled, handled more than once,
    /// handled although they always fail, or messages with no known id.
    /// `work` = None: every id must succeed once (raw contenders on S2/S3
    /// data run the no-op loop).
    pub(crate) fn problems(&self, work: Option<Work>) -> Vec<String> {
        let (mut missing, mut dup, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
        for (id, c) in self.counts.iter().enumerate() {
            let id = id as u64;
            let c = c.load(Ordering::Relaxed);
            let fails = work.is_some_and(|w| w.always_fails(id));
            match (fails, c) {
                (false, 0) => missing.push(id),
                (false, 1) | (true, 0) => {}
                (false, _) => dup.push(id),
                (true, _) => wrong.push(id),
            }
        }
        let mut out = Vec::new();
        for (what, ids) in [
            ("never handled", missing),
            ("handled more than once", dup),
            ("handled although they always fail", wrong),
        ] {
            if !ids.is_empty() {
                out.push(format!(
                    "{} ids {what} (first {:?})",
                    ids.len(),
                    &ids[..ids.len().min(5)]
                ));
            }
        }
        let unknown = self.unknown.load(Ordering::Relaxed);
        if unknown > 0 {
            out.push(format!("{unknown} messages without a known id"));
        }
        out
    }
}

/// `VmHWM` (peak resident set) of this process in MiB.
pub(crate) fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0);
    kib as f64 / 1024.0
}

/// The line a child prints: one run of one contender.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RunResult {
    pub(crate) scenario: String,
    pub(crate) contender: Contender,
    pub(crate) messages: u64,
    /// From the first message to the last one settled.
    pub(crate) seconds: f64,
    /// `(messages - 1) / seconds`: the window holds `messages - 1` gaps.
    pub(crate) rate: f64,
    pub(crate) allocs: u64,
    pub(crate) allocs_per_msg: f64,
    pub(crate) peak_rss_mib: f64,
    /// `correct`, or every reason it is not.
    pub(crate) correct: String,
    /// Backstop's final counters (null for raw).
    pub(crate) stats: serde_json::Value,
}

impl RunResult {
    pub(crate) fn new(
        scenario: &str,
        contender: Contender,
        messages: u64,
        measured: Measured,
        problems: &[String],
        stats: serde_json::Value,
    ) -> Self {
        let seconds = measured.elapsed.as_secs_f64();
        Self {
            scenario: scenario.to_owned(),
            contender,
            messages,
            seconds,
            rate: messages.saturating_sub(1) as f64 / seconds.max(1e-9),
            allocs: measured.allocs,
            allocs_per_msg: measured.allocs as f64 / messages.max(1) as f64,
            peak_rss_mib: peak_rss_mib(),
            correct: if problems.is_empty() {
                "correct".to_owned()
            } else {
                problems.join("; ")
            },
            stats,
        }
    }

    pub(crate) fn is_correct(&self) -> bool {
        self.correct == "correct"
    }
}
