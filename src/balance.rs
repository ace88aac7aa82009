//! Weights and the per-record choice of a backend.
//!
//! Owns: the backend weights, the smooth weighted round robin ([`Swrr`]) that turns them into a
//! per-record choice, and the counters behind "target vs actual share".
//!
//! The hot path never locks. Weights live in an immutable [`WeightSnapshot`] published with
//! `ArcSwap::store`; the balancer `load()`s it once per record and rebuilds its round-robin state
//! only when the snapshot's generation changes. Writers of weights (admin API, SIGHUP) serialise
//! among themselves on a mutex that the hot path never touches.
//!
//! Guarantee (proved by the property tests below): between two weight changes, after any prefix
//! of N records, every backend's count differs from N·w/Σw by at most 1.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Budget, OnFull};
use crate::health::Board;
use crate::metrics::{DropReason, Metrics};
use crate::record::{now_us, Record};

/// The largest weight a backend may have.
pub const MAX_WEIGHT: u32 = 10_000;

/// Why a set of weights was refused. Nothing changes when one is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WeightError {
    /// A name that is not a configured backend.
    #[error("unknown backend {0:?} (configured: {1})")]
    UnknownBackend(String, String),
    /// A weight outside 0..=10000, or not an integer.
    #[error("weight for {0:?} must be an integer from 0 to 10000, got {1}")]
    OutOfRange(String, String),
    /// Every weight would be zero, so no record could be stored.
    #[error("at least one backend must have a non-zero weight")]
    AllZero,
    /// Nothing to change.
    #[error("no weights given")]
    Empty,
}

/// Smooth weighted round robin with a proved bound: Tijdeman's solution of the "chairman
/// assignment problem", written by hand because no crate offers it.
///
/// The nginx smooth WRR (pick the highest running score) drifts past one record with three or
/// more backends — the property test found 1.04 records at weights
/// [8654, 8994, 1177, 4300, 2422, 279] — so it cannot give the promised bound. This selector
/// keeps, for every backend i with share λ_i = w_i/W and count k_i after t records,
/// |k_i − t·λ_i| ≤ σ = 1 − 1/(2n−2) < 1 (n = backends with non-zero weight): the (k_i+1)-th pick
/// of i is a unit job released at (k_i + 1 − σ)/λ_i and due at (k_i + σ)/λ_i, and each step
/// picks the released job due first (earliest deadline first). Integer arithmetic throughout;
/// backends of weight 0 are never picked. Each step is O(n).
#[derive(Debug, Clone)]
pub struct Swrr {
    weights: Vec<u64>,
    total: u64,
    counts: Vec<u64>,
    /// Records picked so far.
    t: u64,
    /// 2n − 2, so that σ = 1 − 1/d.
    d: u64,
}

impl Swrr {
    /// A fresh selector. At least one weight must be non-zero.
    pub fn new(weights: &[u32]) -> Self {
        let weights: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
        let total = weights.iter().sum();
        assert!(total > 0, "Swrr needs a non-zero weight");
        let active = weights.iter().filter(|&&w| w > 0).count() as u64;
        Swrr {
            counts: vec![0; weights.len()],
            weights,
            total,
            t: 0,
            d: (2 * active).saturating_sub(2).max(2),
        }
    }

    /// The index of the backend for the next record.
    #[inline]
    pub fn pick(&mut self) -> usize {
        self.t += 1;
        let (t, d, total) = (
            u128::from(self.t),
            u128::from(self.d),
            u128::from(self.total),
        );
        // Best so far: (index, deadline numerator k·d + d − 1, weight); deadline = num / w.
        let mut best: Option<(usize, u128, u128)> = None;
        // Fallback, never needed if the theorem holds: the largest deficit t·w − k·W.
        let mut behind = (usize::MAX, i128::MIN);
        for (i, (&w, &k)) in self.weights.iter().zip(&self.counts).enumerate() {
            if w == 0 {
                continue;
            }
            let (w, k) = (u128::from(w), u128::from(k));
            let deficit = (t * w) as i128 - (k * total) as i128;
            if deficit > behind.1 {
                behind = (i, deficit);
            }
            // Released: (k + 1 − σ)·W ≤ t·w, i.e. (k·d + 1)·W ≤ t·w·d.
            if (k * d + 1) * total > t * w * d {
                continue;
            }
            let num = k * d + d - 1;
            let earlier = match best {
                None => true,
                Some((_, bnum, bw)) => num * bw < bnum * w,
            };
            if earlier {
                best = Some((i, num, w));
            }
        }
        let i = best.map_or(behind.0, |b| b.0);
        self.counts[i] += 1;
        i
    }
}

/// One immutable set of weights, as published to the hot path.
#[derive(Debug)]
pub struct WeightSnapshot {
    /// Bumped on every change; the balancer rebuilds its state when it sees a new one.
    pub generation: u64,
    /// Weight per backend, in configuration order.
    pub weights: Vec<u32>,
}

/// Shared weights and routing counters: written by the balancer and the admin API, read by
/// metrics and the admin API.
#[derive(Debug)]
pub struct Balance {
    names: Vec<String>,
    snapshot: ArcSwap<WeightSnapshot>,
    /// Serialises weight changes; never taken on the hot path.
    change: Mutex<()>,
    /// Routing counts, published whole once per batch by the router, so a reader never sees
    /// one backend's count of a batch without the others' (the one-record bound holds for every
    /// view).
    counts: ArcSwap<Counts>,
}

/// Records routed per backend, as of one batch.
#[derive(Debug, Clone)]
struct Counts {
    /// The weight generation `since` counts from.
    generation: u64,
    /// Since start.
    routed: Vec<u64>,
    /// Since weight generation `generation` took effect.
    since: Vec<u64>,
}

/// A read of the routing state for one backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShareView {
    /// Backend name.
    pub name: String,
    /// Current weight.
    pub weight: u32,
    /// weight / Σ weights.
    pub target_share: f64,
    /// Share of all records routed since start.
    pub actual_share: f64,
    /// Share of the records routed since the last weight change.
    pub actual_share_since_change: f64,
    /// Records routed to it since start.
    pub routed: u64,
    /// Records routed to it since the last weight change.
    pub routed_since_change: u64,
}

impl Balance {
    /// Weights for `names`, in the same order. The caller has validated them.
    pub fn new(names: Vec<String>, weights: Vec<u32>) -> Arc<Self> {
        assert_eq!(names.len(), weights.len());
        let n = names.len();
        Arc::new(Balance {
            names,
            snapshot: ArcSwap::from_pointee(WeightSnapshot {
                generation: 0,
                weights,
            }),
            change: Mutex::new(()),
            counts: ArcSwap::from_pointee(Counts {
                generation: 0,
                routed: vec![0; n],
                since: vec![0; n],
            }),
        })
    }

    /// Backend names in configuration order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The weights now in force.
    pub fn current(&self) -> Arc<WeightSnapshot> {
        self.snapshot.load_full()
    }

    /// Validate and apply a change of any subset of weights, atomically: either all of `changes`
    /// apply, from the next record routed, or none does.
    pub fn set_weights(&self, changes: &BTreeMap<String, u32>) -> Result<(), WeightError> {
        if changes.is_empty() {
            return Err(WeightError::Empty);
        }
        let _guard = self.change.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot.load();
        let mut weights = old.weights.clone();
        for (name, &w) in changes {
            let Some(i) = self.names.iter().position(|n| n == name) else {
                return Err(WeightError::UnknownBackend(
                    name.clone(),
                    self.names.join(", "),
                ));
            };
            if w > MAX_WEIGHT {
                return Err(WeightError::OutOfRange(name.clone(), w.to_string()));
            }
            weights[i] = w;
        }
        if weights.iter().all(|&w| w == 0) {
            return Err(WeightError::AllZero);
        }
        self.snapshot.store(Arc::new(WeightSnapshot {
            generation: old.generation + 1,
            weights,
        }));
        Ok(())
    }

    /// The weights now in force, by name.
    pub fn weights_by_name(&self) -> BTreeMap<String, u32> {
        let snap = self.snapshot.load();
        self.names
            .iter()
            .cloned()
            .zip(snap.weights.iter().copied())
            .collect()
    }

    /// Shares and counts per backend.
    pub fn view(&self) -> Vec<ShareView> {
        let snap = self.snapshot.load();
        let total_w: u64 = snap.weights.iter().map(|&w| u64::from(w)).sum();
        let counts = self.counts.load();
        let routed = &counts.routed;
        // Counts of an older generation are stale until the balancer routes its next record.
        let fresh = counts.generation == snap.generation;
        let since: Vec<u64> = counts
            .since
            .iter()
            .map(|&c| if fresh { c } else { 0 })
            .collect();
        let all: u64 = routed.iter().sum();
        let all_since: u64 = since.iter().sum();
        let share = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
        self.names
            .iter()
            .enumerate()
            .map(|(i, name)| ShareView {
                name: name.clone(),
                weight: snap.weights[i],
                target_share: share(u64::from(snap.weights[i]), total_w),
                actual_share: share(routed[i], all),
                actual_share_since_change: share(since[i], all_since),
                routed: routed[i],
                routed_since_change: since[i],
            })
            .collect()
    }
}

/// Where a down backend's share goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// To the backends that are up, in proportion to their weights.
    Redistribute,
    /// Nowhere: its records wait for it (bounded by the buffer).
    Hold,
}

/// The hot-path side: owned by the one balancer task, routes records one by one.
pub struct Router {
    balance: Arc<Balance>,
    board: Arc<Board>,
    on_down: OnDown,
    generation: u64,
    health_generation: u64,
    /// `None` when no backend can take records (all down, `redistribute`).
    swrr: Option<Swrr>,
    /// Per-backend counts not yet published to the shared counters.
    pending: Vec<u64>,
    /// The counts last published (this router is their only writer).
    counts: Counts,
    /// The weights the selector was built for (0 for a down backend in `redistribute`).
    effective: Vec<u32>,
    /// Whether the first rebuild has run.
    started: bool,
}

impl Router {
    /// A router over the weights and health now in force.
    pub fn new(balance: Arc<Balance>, board: Arc<Board>, on_down: OnDown) -> Self {
        let n = balance.names.len();
        let mut r = Router {
            balance,
            board,
            on_down,
            generation: 0,
            health_generation: 0,
            swrr: None,
            pending: vec![0; n],
            counts: Counts {
                generation: 0,
                routed: vec![0; n],
                since: vec![0; n],
            },
            effective: Vec::new(),
            started: false,
        };
        r.rebuild();
        r
    }

    /// Pick up health changes; call once per batch. A change restarts the selector, so the
    /// one-record bound holds again from the next record over the backends that are up.
    pub fn sync_health(&mut self) {
        if self.board.generation() != self.health_generation {
            self.rebuild();
        }
    }

    /// Whether any backend can take a record now.
    pub fn can_route(&self) -> bool {
        self.swrr.is_some()
    }

    /// Bring the selector up to date with the weights and health now in force. A new weight
    /// generation also restarts the "since the last change" counters (also at start, when the
    /// state file has already changed the weights).
    fn rebuild(&mut self) {
        let snap = self.balance.snapshot.load();
        self.health_generation = self.board.generation();
        let new_weights = snap.generation != self.generation || !self.started;
        if new_weights {
            self.flush();
            self.counts.since.iter_mut().for_each(|c| *c = 0);
            self.counts.generation = snap.generation;
            self.balance.counts.store(Arc::new(self.counts.clone()));
            self.generation = snap.generation;
            self.started = true;
        }
        let up = self.board.snapshot();
        let effective: Vec<u32> = snap
            .weights
            .iter()
            .zip(&up)
            .enumerate()
            .map(|(i, (&w, &up))| match self.on_down {
                OnDown::Redistribute if !up => 0,
                // An excluded backend takes nothing, even in hold mode: it will never come back.
                OnDown::Hold if self.board.is_excluded(i) => 0,
                _ => w,
            })
            .collect();
        // Unchanged effective weights after a health change (e.g. in hold mode) keep the
        // selector and its bound. A weight change always restarts it, even to equal weights:
        // the "since change" counts restart too, and the bound must hold for them.
        if new_weights || effective != self.effective || self.swrr.is_none() {
            self.swrr = effective
                .iter()
                .any(|&w| w > 0)
                .then(|| Swrr::new(&effective));
            self.effective = effective;
        }
    }

    /// The backend index for the next record, or `None` if no backend can take it. A weight
    /// change applies from the first call after it was published.
    #[inline]
    pub fn route(&mut self) -> Option<usize> {
        if self.balance.snapshot.load().generation != self.generation {
            self.rebuild();
        }
        let i = self.swrr.as_mut()?.pick();
        self.pending[i] += 1;
        Some(i)
    }

    /// Publish the counts of the records routed since the last flush. Called once per batch so
    /// the shared counters are touched per batch, not per record.
    pub fn flush(&mut self) {
        if self.pending.iter().all(|&n| n == 0) {
            return;
        }
        for (i, n) in self.pending.iter_mut().enumerate() {
            self.counts.routed[i] += *n;
            self.counts.since[i] += *n;
            *n = 0;
        }
        self.balance.counts.store(Arc::new(self.counts.clone()));
    }
}

/// The balancer task: takes records from the capture queue, routes each one, and hands each
/// backend its share as one batch. While no backend can take records they wait here, bounded
/// by the buffer budget. Ends when the capture queue is closed and everything has been handed
/// on (or dropped once `abort` fires); dropping `writers` then lets each writer finish.
pub struct Balancer {
    /// Routes records.
    pub router: Router,
    /// The capture queue.
    pub queue: mpsc::Receiver<Record>,
    /// One sender per writer, in backend order.
    pub writers: Vec<mpsc::Sender<Vec<Record>>>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Backend health, to wake up when a backend returns.
    pub board: Arc<Board>,
    /// Records taken from the queue at once.
    pub batch_size: usize,
    /// Bound on waiting records.
    pub budget: Arc<Budget>,
    /// What to do when the budget is full.
    pub on_full: OnFull,
    /// Retention in ms: waiting records past it are dropped (`expired`).
    pub retention_ms: u64,
}

impl Balancer {
    /// Run until the queue closes and drains (see the type's doc).
    pub async fn run(mut self, abort: CancellationToken) {
        let mut buf = Vec::with_capacity(self.batch_size);
        let mut held: VecDeque<Record> = VecDeque::new();
        let mut over = Overflow::new(self.writers.len());
        let mut closed = false;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.router.sync_health();
            self.send_overflow(&mut over);
            if self.router.can_route() && !held.is_empty() {
                let n = held.len().min(self.batch_size);
                let chunk: Vec<Record> = held.drain(..n).collect();
                self.budget.release(n);
                let mut unrouted = self.dispatch(chunk, &mut over);
                self.hold(&mut held, &mut unrouted);
                // Let the writers run: this loop must not spin while they are full.
                tokio::task::yield_now().await;
                continue;
            }
            if closed && held.is_empty() && over.records == 0 {
                break;
            }
            // After the grace period, take everything so capture is never left blocked. A
            // writer that is behind holds its records in `over` (within the budget), so the
            // others keep receiving.
            let room = (self.router.can_route() && over.records == 0)
                || self.on_full == OnFull::DropOldest
                || self.budget.has_room(self.batch_size)
                || abort.is_cancelled();
            tokio::select! {
                n = self.queue.recv_many(&mut buf, self.batch_size), if !closed && room => {
                    self.metrics.set_queue_depth(self.queue.len());
                    self.metrics.sources.observe(&buf);
                    if n == 0 {
                        closed = true;
                    } else if self.router.can_route() {
                        let mut unrouted = self.dispatch(std::mem::take(&mut buf), &mut over);
                        self.hold(&mut held, &mut unrouted);
                    } else if abort.is_cancelled() {
                        self.metrics.dropped(DropReason::Shutdown, buf.len() as u64);
                        buf.clear();
                    } else {
                        self.hold(&mut held, &mut buf);
                    }
                }
                _ = self.board.changed() => {}
                _ = room_in(&self.writers, &over), if over.records > 0 => {}
                _ = tick.tick() => self.evict_expired(&mut held),
                _ = abort.cancelled(), if !abort.is_cancelled() => {}
            }
            if abort.is_cancelled() && over.records > 0 {
                self.metrics
                    .dropped(DropReason::Shutdown, over.records as u64);
                self.budget.release(over.records);
                over.clear();
            }
            if abort.is_cancelled() && !self.router.can_route() && !held.is_empty() {
                self.metrics
                    .dropped(DropReason::Shutdown, held.len() as u64);
                self.budget.release(held.len());
                held.clear();
            }
        }
        self.metrics.set_queue_depth(0);
    }

    /// Route `records` and send each backend its share without waiting: a writer whose queue is
    /// full gets its share later, from `over` (counted in the budget), so one slow or recovering
    /// backend never holds up the others. Returns the records no backend could take (a weight
    /// change mid-batch left only down backends with weight).
    fn dispatch(&mut self, records: Vec<Record>, over: &mut Overflow) -> Vec<Record> {
        let n = self.writers.len();
        let mut per_backend: Vec<Vec<Record>> = vec![Vec::new(); n];
        let mut unrouted = Vec::new();
        for rec in records {
            match self.router.route() {
                Some(i) => per_backend[i].push(rec),
                None => unrouted.push(rec),
            }
        }
        self.router.flush();
        for (i, batch) in per_backend.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            if over.queues[i].is_empty() {
                match self.writers[i].try_send(batch) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Full(batch)) => {
                        over.push(i, batch, &self.budget)
                    }
                    Err(mpsc::error::TrySendError::Closed(batch)) => {
                        self.writer_gone(i, batch.len())
                    }
                }
            } else {
                // Behind the batches already waiting for this writer, in order.
                over.push(i, batch, &self.budget);
            }
        }
        if self.on_full == OnFull::DropOldest {
            let excess = self.budget.used().saturating_sub(self.budget.max_records());
            let gone = over.evict_oldest(excess);
            if gone > 0 {
                self.budget.release(gone);
                self.metrics.dropped(DropReason::Overflow, gone as u64);
            }
        }
        unrouted
    }

    /// Hand each writer what waits for it in `over`, as far as its queue has room.
    fn send_overflow(&self, over: &mut Overflow) {
        for i in 0..over.queues.len() {
            while let Some(batch) = over.queues[i].pop_front() {
                let n = batch.len();
                match self.writers[i].try_send(batch) {
                    Ok(()) => {
                        over.records -= n;
                        self.budget.release(n);
                    }
                    Err(mpsc::error::TrySendError::Full(batch)) => {
                        over.queues[i].push_front(batch);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        over.records -= n;
                        self.budget.release(n);
                        self.writer_gone(i, n);
                    }
                }
            }
        }
    }

    /// A writer only goes away at shutdown, after its queue has closed.
    fn writer_gone(&self, i: usize, n: usize) {
        tracing::error!(backend = i, records = n, "writer gone; records dropped");
        self.metrics.dropped(DropReason::Shutdown, n as u64);
    }

    /// Keep records while no backend can take them, within the budget.
    fn hold(&self, held: &mut VecDeque<Record>, buf: &mut Vec<Record>) {
        let n = buf.len();
        if n == 0 {
            return;
        }
        held.extend(buf.drain(..));
        self.budget.take(n);
        let over = self.budget.used().saturating_sub(self.budget.max_records());
        let over = over.min(held.len());
        // In wait mode the room check before receiving bounds the buffer (to one batch over);
        // only drop-oldest mode evicts.
        if over > 0 && self.on_full == OnFull::DropOldest {
            held.drain(..over);
            self.budget.release(over);
            self.metrics.dropped(DropReason::Overflow, over as u64);
        }
    }

    fn evict_expired(&self, held: &mut VecDeque<Record>) {
        // (Records in `Overflow` are checked by their writer when it takes them.)
        let cutoff_ms = (now_us() / 1000).saturating_sub(self.retention_ms);
        let before = held.len();
        held.retain(|r| r.ts_ms() > cutoff_ms);
        let gone = before - held.len();
        if gone > 0 {
            self.budget.release(gone);
            self.metrics.dropped(DropReason::Expired, gone as u64);
        }
    }
}

/// Batches routed to writers whose queue was full, oldest first per writer; every record here
/// is counted in the buffer budget.
struct Overflow {
    queues: Vec<VecDeque<Vec<Record>>>,
    records: usize,
}

impl Overflow {
    fn new(writers: usize) -> Self {
        Overflow {
            queues: (0..writers).map(|_| VecDeque::new()).collect(),
            records: 0,
        }
    }

    fn push(&mut self, i: usize, batch: Vec<Record>, budget: &Budget) {
        self.records += batch.len();
        budget.take(batch.len());
        self.queues[i].push_back(batch);
    }

    /// Drop up to `n` of the oldest records, from the writer furthest behind first. Returns how
    /// many went.
    fn evict_oldest(&mut self, mut n: usize) -> usize {
        let mut gone = 0;
        while n > 0 {
            let Some(q) = self
                .queues
                .iter_mut()
                .filter(|q| !q.is_empty())
                .max_by_key(|q| q.iter().map(Vec::len).sum::<usize>())
            else {
                break;
            };
            let front = q.front_mut().expect("not empty");
            let k = n.min(front.len());
            front.drain(..k);
            if front.is_empty() {
                q.pop_front();
            }
            n -= k;
            gone += k;
        }
        self.records -= gone;
        gone
    }

    fn clear(&mut self) {
        self.queues.iter_mut().for_each(VecDeque::clear);
        self.records = 0;
    }
}

/// Resolves when any writer with batches waiting in `over` has room in its queue.
async fn room_in(writers: &[mpsc::Sender<Vec<Record>>], over: &Overflow) {
    let mut waits: Vec<_> = writers
        .iter()
        .zip(&over.queues)
        .filter(|(_, q)| !q.is_empty())
        .map(|(w, _)| Box::pin(w.reserve()))
        .collect();
    std::future::poll_fn(|cx| {
        for w in waits.iter_mut() {
            if std::future::Future::poll(w.as_mut(), cx).is_ready() {
                // The permit is dropped at once: the slot is free for `send_overflow`.
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Largest |count_i − N·w_i/W| over every prefix of `n` picks, in units of records.
    fn worst_prefix_deviation(weights: &[u32], n: usize) -> f64 {
        let mut swrr = Swrr::new(weights);
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut counts = vec![0u64; weights.len()];
        let mut worst: f64 = 0.0;
        for step in 1..=n as u64 {
            counts[swrr.pick()] += 1;
            for (i, &w) in weights.iter().enumerate() {
                // Exact integer arithmetic: |W·count − N·w| / W.
                let lhs = i128::from(total) * i128::from(counts[i]);
                let rhs = i128::from(step) * i128::from(w);
                worst = worst.max((lhs - rhs).abs() as f64 / total as f64);
            }
        }
        worst
    }

    #[test]
    fn thirty_seventy_is_exact_every_ten() {
        let mut swrr = Swrr::new(&[30, 70]);
        let picks: Vec<usize> = (0..10).map(|_| swrr.pick()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 3);
        assert!(worst_prefix_deviation(&[30, 70], 10_000) <= 1.0);
    }

    #[test]
    fn zero_weight_never_picked() {
        let mut swrr = Swrr::new(&[0, 5, 0, 1]);
        for _ in 0..1000 {
            let i = swrr.pick();
            assert!(i == 1 || i == 3);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn every_prefix_within_one_record(
            weights in prop::collection::vec(0u32..=MAX_WEIGHT, 1..8)
                .prop_filter("one non-zero", |w| w.iter().any(|&x| x > 0)),
            n in 1usize..3000,
        ) {
            let dev = worst_prefix_deviation(&weights, n);
            prop_assert!(dev <= 1.0, "weights {:?}: deviation {} after {} records", weights, dev, n);
            // Tijdeman's tighter bound, σ = 1 − 1/(2n−2), holds too (n = non-zero weights).
            let active = weights.iter().filter(|&&w| w > 0).count();
            if active >= 2 {
                let sigma = 1.0 - 1.0 / (2 * active - 2) as f64;
                prop_assert!(dev <= sigma + 1e-9, "weights {:?}: deviation {} > σ {}", weights, dev, sigma);
            }
        }

        #[test]
        fn small_weights_within_one_record(
            weights in prop::collection::vec(0u32..=10, 2..10)
                .prop_filter("one non-zero", |w| w.iter().any(|&x| x > 0)),
        ) {
            let dev = worst_prefix_deviation(&weights, 5000);
            prop_assert!(dev <= 1.0, "weights {:?}: deviation {}", weights, dev);
        }

        #[test]
        fn refused_changes_change_nothing(
            w in prop::collection::vec(0u32..=20_000, 1..4),
        ) {
            let names: Vec<String> = (0..w.len()).map(|i| format!("b{i}")).collect();
            let balance = Balance::new(names.clone(), vec![1; w.len()]);
            let changes: BTreeMap<String, u32> =
                names.iter().cloned().zip(w.iter().copied()).collect();
            let ok = w.iter().all(|&x| x <= MAX_WEIGHT) && w.iter().any(|&x| x > 0);
            let res = balance.set_weights(&changes);
            prop_assert_eq!(res.is_ok(), ok);
            let now = balance.current();
            if ok {
                prop_assert_eq!(&now.weights, &w);
                prop_assert_eq!(now.generation, 1);
            } else {
                prop_assert_eq!(&now.weights, &vec![1; w.len()]);
                prop_assert_eq!(now.generation, 0);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The bound holds for the counts the API shows, after any sequence of weight changes —
        /// including changes that leave the weights (and so the effective weights) equal.
        #[test]
        fn since_change_counts_shown_stay_within_one_record(
            start in prop::collection::vec(1u32..=20, 2..5),
            steps in prop::collection::vec(
                (1usize..300, 1usize..40, any::<bool>(), prop::collection::vec(0u32..=20, 4)),
                1..12,
            ),
        ) {
            let n = start.len();
            let names: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
            let balance = Balance::new(names.clone(), start);
            let board = Arc::new(Board::new(n));
            let mut router = Router::new(balance.clone(), board, OnDown::Hold);
            for (records, batch, same, next) in steps {
                let mut left = records;
                while left > 0 {
                    let k = left.min(batch);
                    for _ in 0..k {
                        prop_assert!(router.route().is_some());
                    }
                    router.flush();
                    left -= k;
                    let view = balance.view();
                    let w: u64 = view.iter().map(|v| u64::from(v.weight)).sum();
                    let total: u64 = view.iter().map(|v| v.routed_since_change).sum();
                    for v in &view {
                        let dev = (i128::from(v.routed_since_change) * i128::from(w)
                            - i128::from(total) * i128::from(v.weight))
                        .abs();
                        prop_assert!(dev <= i128::from(w),
                            "{}: {} of {} since change at weight {}/{}",
                            v.name, v.routed_since_change, total, v.weight, w);
                    }
                }
                let changes: BTreeMap<String, u32> = if same {
                    balance.weights_by_name()
                } else {
                    names.iter().cloned().zip(next.iter().copied()).collect()
                };
                let _ = balance.set_weights(&changes); // all-zero is refused: keep going
            }
        }
    }

    #[test]
    fn unknown_backend_refused() {
        let balance = Balance::new(vec!["A".into(), "B".into()], vec![30, 70]);
        let err = balance
            .set_weights(&BTreeMap::from([("A".into(), 50), ("C".into(), 50)]))
            .unwrap_err();
        assert!(matches!(err, WeightError::UnknownBackend(ref n, _) if n == "C"));
        assert_eq!(balance.current().weights, vec![30, 70]);
    }

    #[test]
    fn router_follows_change_from_next_record() {
        let balance = Balance::new(vec!["A".into(), "B".into()], vec![30, 70]);
        let board = Arc::new(Board::new(2));
        let mut router = Router::new(balance.clone(), board, OnDown::Redistribute);
        for _ in 0..100 {
            router.route();
        }
        router.flush();
        balance
            .set_weights(&BTreeMap::from([("A".into(), 100), ("B".into(), 0)]))
            .unwrap();
        for _ in 0..50 {
            assert_eq!(router.route(), Some(0));
        }
        router.flush();
        let v = balance.view();
        assert_eq!(v[0].routed, 80);
        assert_eq!(v[1].routed, 70);
        assert_eq!(v[0].routed_since_change, 50);
        assert_eq!(v[0].actual_share_since_change, 1.0);
    }
}
