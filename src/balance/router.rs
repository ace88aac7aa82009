//! The router: the hot-path side of balancing, owned by the one dispatcher task.
//!
//! Owns: the selector ([`Swrr`]) rebuilt from the weights and the backends' health, and the
//! per-batch publication of the routing counts into [`Balance`].
//!
//! Never: locks, or touches the shared counters per record (once per batch, in `flush`).

use std::sync::Arc;

use super::swrr::Swrr;
use super::weights::{Balance, Counts};
use crate::health::Board;

/// Where a down backend's share goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// To the backends that are up, in proportion to their weights.
    Redistribute,
    /// Nowhere: its records wait for it (bounded by the buffer).
    Hold,
}

/// The hot-path side: owned by the one dispatcher task, routes records one by one.
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
        let n = balance.names().len();
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

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
