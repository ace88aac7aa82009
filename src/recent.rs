//! The last minute, for the live page: per-second counters and the top sources.
//!
//! Owns two small bounded structures kept beside the metrics:
//! - [`Recent`]: a ring of [`RING_SECONDS`] + 1 one-second samples of the routing and write
//!   counters, taken by one task (the live page's sampler, [`crate::admin::page`]), never by the hot
//!   path. Shares of the
//!   last 10 s and records/s per backend are differences of two samples.
//! - [`TopSources`]: the heaviest source addresses of the last [`RING_SECONDS`] seconds, one
//!   space-saving sketch of [`SLOTS`] slots per second.
//!
//! The hot path's only cost is [`TopSources::observe`], called once per batch the dispatcher takes
//! from the capture queue: one uncontended lock and at most [`SAMPLE_PER_BATCH`] sketch updates,
//! whatever the batch size (a larger batch is sampled with a stride, each sampled record
//! standing for `len / SAMPLE_PER_BATCH` records).
//!
//! Accuracy of the top sources, for the page to state: with batches of at most
//! [`SAMPLE_PER_BATCH`] records (under a few thousand records/s) every record is counted;
//! above, counts are estimates from a uniform stride sample. Within one second's sketch a source
//! with more than `1/SLOTS` of that second's records is always present and its count is too high
//! by at most the smallest count in the sketch (space-saving's bound), and a second where it is
//! missing may hide at most that many of its records; the per-source `error` adds those bounds
//! up over the minute: the true count is within `records ± error`.
//!
//! Never: touches Redis, blocks the dispatcher for longer than one batch's updates, or grows.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::record::Record;

/// Seconds of history the ring and the top sources keep.
pub const RING_SECONDS: usize = 60;

/// Slots of one second's space-saving sketch.
pub const SLOTS: usize = 64;

/// Most records of one batch that update the sketch.
pub const SAMPLE_PER_BATCH: usize = 64;

/// Counters read at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Unix time of the read, in milliseconds.
    pub unix_ms: u64,
    /// Records routed to each backend since start.
    pub routed: Vec<u64>,
    /// Records written to each backend since start.
    pub written: Vec<u64>,
    /// Records captured since start.
    pub captured: u64,
    /// Records dropped since start, every reason.
    pub dropped: u64,
}

/// The ring of one-second samples.
#[derive(Debug, Default)]
pub struct Recent {
    ring: Mutex<VecDeque<Sample>>,
    /// Set once a sampler runs, so a second router never starts a second one.
    sampler: std::sync::atomic::AtomicBool,
}

impl Recent {
    /// Add a sample, forgetting the oldest beyond [`RING_SECONDS`] + 1.
    pub fn push(&self, s: Sample) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() > RING_SECONDS {
            ring.pop_front();
        }
        ring.push_back(s);
    }

    /// Every sample kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().cloned().collect()
    }

    /// True for the first caller only: that caller runs the sampler.
    pub fn claim_sampler(&self) -> bool {
        !self.sampler.swap(true, std::sync::atomic::Ordering::AcqRel)
    }
}

/// Sources the page lists.
pub const TOP_N: usize = 10;

/// One source in the top list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopSource {
    /// The sender's IP address.
    pub source: IpAddr,
    /// Records from it in the window (exact when `error` is 0).
    pub records: u64,
    /// The true count is within `records ± error`.
    pub error: u64,
}

/// One slot of a sketch.
#[derive(Debug, Clone, Copy)]
struct Slot {
    source: IpAddr,
    count: u64,
    /// The count the slot inherited when it was taken over (space-saving's overestimate).
    error: u64,
}

/// One second's space-saving sketch: at most [`SLOTS`] sources.
#[derive(Debug, Default)]
struct Sketch {
    second: u64,
    slots: Vec<Slot>,
    index: HashMap<IpAddr, usize>,
}

impl Sketch {
    fn add(&mut self, source: IpAddr, weight: u64) {
        if let Some(&i) = self.index.get(&source) {
            self.slots[i].count += weight;
            return;
        }
        if self.slots.len() < SLOTS {
            self.index.insert(source, self.slots.len());
            self.slots.push(Slot {
                source,
                count: weight,
                error: 0,
            });
            return;
        }
        // Take over the smallest slot: the newcomer may have been counted there all along.
        let (i, min) = self
            .slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.count)
            .map(|(i, s)| (i, s.count))
            .expect("a full sketch has slots");
        self.index.remove(&self.slots[i].source);
        self.index.insert(source, i);
        self.slots[i] = Slot {
            source,
            count: min + weight,
            error: min,
        };
    }

    /// What a source missing from this sketch may still have had.
    fn absent_bound(&self) -> u64 {
        if self.slots.len() < SLOTS {
            0
        } else {
            self.slots.iter().map(|s| s.count).min().unwrap_or(0)
        }
    }
}

/// The heaviest sources of the last [`RING_SECONDS`] seconds.
#[derive(Debug)]
pub struct TopSources {
    start: Instant,
    window: Mutex<Window>,
    /// The last list computed by [`TopSources::refresh`], so page views never merge sketches.
    cached: Mutex<Vec<TopSource>>,
}

#[derive(Debug, Default)]
struct Window {
    /// Newest last; at most [`RING_SECONDS`].
    sketches: VecDeque<Sketch>,
    /// Rotates the sampling stride's start so a repeating pattern in batches is not aliased.
    phase: usize,
}

impl Default for TopSources {
    fn default() -> Self {
        TopSources {
            start: Instant::now(),
            window: Mutex::default(),
            cached: Mutex::default(),
        }
    }
}

impl TopSources {
    /// Count the sources of one batch (see the module doc for the sampling).
    pub fn observe(&self, batch: &[Record]) {
        self.observe_at(batch, self.start.elapsed().as_secs());
    }

    fn observe_at(&self, batch: &[Record], second: u64) {
        if batch.is_empty() {
            return;
        }
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.sketches.back().is_none_or(|s| s.second != second) {
            let mut fresh = if w.sketches.len() >= RING_SECONDS {
                w.sketches.pop_front().expect("full")
            } else {
                Sketch::default()
            };
            fresh.second = second;
            fresh.slots.clear();
            fresh.index.clear();
            w.sketches.push_back(fresh);
        }
        let step = batch.len().div_ceil(SAMPLE_PER_BATCH);
        let start = w.phase % step;
        w.phase = w.phase.wrapping_add(1);
        let sampled = (batch.len() - start).div_ceil(step);
        // Spread the batch over the sampled records so the sums stay exact.
        let base = batch.len() as u64 / sampled as u64;
        let mut extra = batch.len() as u64 % sampled as u64;
        let sketch = w.sketches.back_mut().expect("pushed above");
        for r in batch.iter().skip(start).step_by(step) {
            let weight = base + u64::from(extra > 0);
            extra = extra.saturating_sub(1);
            sketch.add(r.src.ip(), weight);
        }
    }

    /// Recompute the top `n` of the window and keep it for [`TopSources::top`].
    pub fn refresh(&self, n: usize) {
        let list = self.compute(n, self.start.elapsed().as_secs());
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = list;
    }

    /// The list the last [`TopSources::refresh`] computed.
    pub fn top(&self) -> Vec<TopSource> {
        self.cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn compute(&self, n: usize, now: u64) -> Vec<TopSource> {
        let w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let live: Vec<&Sketch> = w
            .sketches
            .iter()
            .filter(|s| s.second + (RING_SECONDS as u64) > now)
            .collect();
        let mut sums: HashMap<IpAddr, (u64, u64)> = HashMap::new();
        for s in &live {
            for slot in &s.slots {
                let e = sums.entry(slot.source).or_default();
                e.0 += slot.count;
                e.1 += slot.error;
            }
        }
        let mut list: Vec<TopSource> = sums
            .into_iter()
            .map(|(source, (records, error))| TopSource {
                source,
                records,
                error,
            })
            .collect();
        list.sort_by(|a, b| b.records.cmp(&a.records).then(a.source.cmp(&b.source)));
        list.truncate(n);
        for t in &mut list {
            // Seconds where it is missing may still hide some of its records.
            t.error += live
                .iter()
                .filter(|s| !s.index.contains_key(&t.source))
                .map(|s| s.absent_bound())
                .sum::<u64>();
        }
        drop(w);
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;

    fn rec(ip: [u8; 4]) -> Record {
        Record {
            ts_us: 0,
            src: (ip, 1000).into(),
            dst: ([127, 0, 0, 1], 80).into(),
            kind: Kind::Conn,
        }
    }

    #[test]
    fn small_batches_are_counted_exactly() {
        let t = TopSources::default();
        let mut batch = vec![rec([10, 0, 0, 1]); 30];
        batch.extend(vec![rec([10, 0, 0, 2]); 20]);
        t.observe_at(&batch, 5);
        t.observe_at(&batch[..10], 6);
        let top = t.compute(5, 6);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].records, top[0].error), (40, 0));
        assert_eq!(top[0].source, IpAddr::from([10, 0, 0, 1]));
        assert_eq!((top[1].records, top[1].error), (20, 0));
    }

    #[test]
    fn large_batches_keep_their_total_and_the_heavy_source() {
        let t = TopSources::default();
        // 1000 records: every third from the heavy hitter, the rest from 600 distinct senders.
        let batch: Vec<Record> = (0..1000u32)
            .map(|i| {
                if i % 3 == 0 {
                    rec([10, 9, 9, 9])
                } else {
                    rec([10, 1, (i / 256) as u8, i as u8])
                }
            })
            .collect();
        for round in 0..5 {
            t.observe_at(&batch, 1);
            let w = t.window.lock().unwrap();
            let total: u64 = w.sketches[0].slots.iter().map(|s| s.count).sum();
            assert_eq!(
                total,
                1000 * (round + 1),
                "weights add up to the records seen"
            );
        }
        let top = t.compute(3, 1);
        assert_eq!(top[0].source, IpAddr::from([10, 9, 9, 9]));
        let truth = 5 * 334;
        // A stride sample: close to the truth, not exact.
        assert!(top[0].records.abs_diff(truth) <= truth / 5, "{:?}", top[0]);
    }

    #[test]
    fn the_window_forgets_after_a_minute_and_never_grows() {
        let t = TopSources::default();
        for s in 0..200u64 {
            t.observe_at(&[rec([10, 0, (s / 256) as u8, s as u8])], s);
        }
        assert_eq!(t.window.lock().unwrap().sketches.len(), RING_SECONDS);
        let top = t.compute(1000, 199);
        assert_eq!(top.len(), RING_SECONDS);
        assert!(top.iter().all(|s| s.source != IpAddr::from([10, 0, 0, 1])));
    }

    #[test]
    fn a_full_sketch_bounds_what_it_missed() {
        let mut s = Sketch::default();
        for i in 0..(SLOTS as u32 * 3) {
            s.add(IpAddr::from([10, 0, (i / 256) as u8, i as u8]), 1);
        }
        assert_eq!(s.slots.len(), SLOTS);
        assert_eq!(
            s.slots.iter().map(|x| x.count).sum::<u64>(),
            SLOTS as u64 * 3
        );
        assert!(s.absent_bound() >= 1);
    }

    #[test]
    fn the_ring_keeps_a_minute_and_one() {
        let r = Recent::default();
        for i in 0..100 {
            r.push(Sample {
                unix_ms: i,
                ..Sample::default()
            });
        }
        let s = r.samples();
        assert_eq!(s.len(), RING_SECONDS + 1);
        assert_eq!(s.last().unwrap().unix_ms, 99);
        assert!(r.claim_sampler() && !r.claim_sampler());
    }
}
