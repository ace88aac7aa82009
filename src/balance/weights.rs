//! The shared weights: one immutable snapshot per change, and the routing counts beside it.
//!
//! Owns: the backend weights in force ([`WeightSnapshot`], published with `ArcSwap::store`),
//! their validation ([`WeightError`]), the counters behind "target vs actual share", and the one
//! way weights change at run time ([`WeightStore`]: apply, persist to the state file, restore at
//! start — for the admin API, SIGHUP and start-up alike).
//!
//! Never: locks on the hot path. The router only `load()`s the snapshot; writers of weights
//! serialise among themselves on a mutex that the hot path never touches.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use tracing::{error, info, warn};

use crate::state;

/// The largest weight a backend may have.
pub const MAX_WEIGHT: u32 = 10_000;

/// Why a set of weights was refused. Nothing changes when one is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WeightError {
    /// A name that is not a configured backend.
    #[error("unknown backend {0:?} (configured: {1})")]
    UnknownBackend(String, String),
    /// A weight outside 0..=[`MAX_WEIGHT`], or not an integer.
    #[error("weight for {0:?} must be an integer from 0 to {MAX_WEIGHT}, got {1}")]
    OutOfRange(String, String),
    /// Every weight would be zero, so no record could be stored.
    #[error("at least one backend must have a non-zero weight")]
    AllZero,
    /// Nothing to change.
    #[error("no weights given")]
    Empty,
}

/// Why the weights in force are not in the state file: they apply now, and a restart would
/// return to the previous ones.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("not saved to the state file {}: {reason}; the new weights apply now but a restart \
         would lose them", path.display())]
pub struct Unsaved {
    /// The state file.
    pub path: PathBuf,
    /// Why it could not be written.
    pub reason: String,
}

/// One immutable set of weights, as published to the hot path.
#[derive(Debug)]
pub struct WeightSnapshot {
    /// Bumped on every change; the router rebuilds its state when it sees a new one.
    pub generation: u64,
    /// Weight per backend, in configuration order.
    pub weights: Vec<u32>,
}

/// Shared weights and routing counters: written by the router and the weight store, read by
/// metrics and the admin API.
#[derive(Debug)]
pub struct Balance {
    names: Vec<String>,
    pub(super) snapshot: ArcSwap<WeightSnapshot>,
    /// Serialises weight changes; never taken on the hot path.
    change: Mutex<()>,
    /// Routing counts, published whole once per batch by the router, so a reader never sees
    /// one backend's count of a batch without the others' (the one-record bound holds for every
    /// view).
    pub(super) counts: ArcSwap<Counts>,
}

/// Records routed per backend, as of one batch.
#[derive(Debug, Clone)]
pub(super) struct Counts {
    /// The weight generation `since` counts from.
    pub(super) generation: u64,
    /// Since start.
    pub(super) routed: Vec<u64>,
    /// Since weight generation `generation` took effect.
    pub(super) since: Vec<u64>,
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
        let weights = merged(&self.names, &old.weights, changes)?;
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
        // Counts of an older generation are stale until the router routes its next record.
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

/// `changes` applied over `weights` (one per name in `names`), validated by the one rule every
/// change follows: known names, weights in 0..=[`MAX_WEIGHT`], not all zero. Pure, so the
/// control plane's bookkeeping checks a fleet version with exactly the rule that applies it.
pub fn merged(
    names: &[String],
    weights: &[u32],
    changes: &BTreeMap<String, u32>,
) -> Result<Vec<u32>, WeightError> {
    if changes.is_empty() {
        return Err(WeightError::Empty);
    }
    let mut weights = weights.to_vec();
    for (name, &w) in changes {
        let Some(i) = names.iter().position(|n| n == name) else {
            return Err(WeightError::UnknownBackend(name.clone(), names.join(", ")));
        };
        if w > MAX_WEIGHT {
            return Err(WeightError::OutOfRange(name.clone(), w.to_string()));
        }
        weights[i] = w;
    }
    if weights.iter().all(|&w| w == 0) {
        return Err(WeightError::AllZero);
    }
    Ok(weights)
}

/// Who asked for a weight change, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `PUT /v1/weights`.
    AdminApi,
    /// A SIGHUP reload of the config file.
    Sighup,
    /// A fleet version read from the control Redis.
    Control,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::AdminApi => "admin API",
            Origin::Sighup => "SIGHUP",
            Origin::Control => "control Redis",
        })
    }
}

/// The weights and where run-time changes to them are kept: every change goes through
/// [`WeightStore::apply`], which also records it in the state file (see [`crate::state`] for the
/// rule).
#[derive(Debug)]
pub struct WeightStore {
    balance: Arc<Balance>,
    state_file: Option<PathBuf>,
    /// One change and its save at a time, so the file always ends with the latest weights.
    /// Never taken on the hot path.
    saving: Mutex<()>,
    /// Why the last save failed (`None` once one succeeds): read by the admin API without
    /// waiting on a save in progress.
    unsaved: ArcSwapOption<Unsaved>,
}

impl WeightStore {
    /// A store over `balance`, recording changes in `state_file` if there is one.
    pub fn new(balance: Arc<Balance>, state_file: Option<PathBuf>) -> Self {
        WeightStore {
            balance,
            state_file,
            saving: Mutex::new(()),
            unsaved: ArcSwapOption::empty(),
        }
    }

    /// The weights and routing counts.
    pub fn balance(&self) -> &Arc<Balance> {
        &self.balance
    }

    /// Apply a weight change and record the new weights in the state file. The change stands
    /// even if the file cannot be written: that is logged and returned as `Ok(Some(Unsaved))`,
    /// so the caller can tell whoever asked.
    pub fn apply(
        &self,
        changes: &BTreeMap<String, u32>,
        origin: Origin,
    ) -> Result<Option<Unsaved>, WeightError> {
        let _one_at_a_time = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        self.balance.set_weights(changes)?;
        let Some(path) = &self.state_file else {
            return Ok(None);
        };
        let unsaved = match state::save(path, self.balance.weights_by_name()) {
            Ok(()) => None,
            Err(e) => {
                error!(path = %path.display(), error = %e, %origin, "cannot write the state \
                       file; the new weights apply but will not survive a restart");
                Some(Unsaved {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            }
        };
        self.unsaved.store(unsaved.clone().map(Arc::new));
        Ok(unsaved)
    }

    /// Why the weights in force are not in the state file, if the last save failed.
    pub fn unsaved(&self) -> Option<Unsaved> {
        self.unsaved.load_full().map(|u| (*u).clone())
    }

    /// Serve fleet version `fleet` as `weights` (one per backend, already checked by the
    /// control plane's bookkeeping), and keep both in the state file so a restart without the
    /// control Redis starts from this version (marked stale). The change stands even if the file
    /// cannot be written (that is logged).
    pub fn apply_fleet(
        &self,
        fleet: &crate::control::FleetWeights,
        weights: &[u32],
    ) -> Result<(), WeightError> {
        let _one_at_a_time = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let changes: BTreeMap<String, u32> = self
            .balance
            .names()
            .iter()
            .cloned()
            .zip(weights.iter().copied())
            .collect();
        self.balance.set_weights(&changes)?;
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let saved = state::SavedState {
            weights: self.balance.weights_by_name(),
            control: Some(fleet.clone()),
        };
        // Reported like any other change that could not be saved (`unsaved`).
        let unsaved = match state::save_state(path, &saved) {
            Ok(()) => None,
            Err(e) => {
                error!(path = %path.display(), error = %e, origin = %Origin::Control,
                       "cannot write the state file; the new weights apply but will not \
                        survive a restart");
                Some(Unsaved {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            }
        };
        self.unsaved.store(unsaved.map(Arc::new));
        Ok(())
    }

    /// The fleet version last applied, as kept in the state file (none without a file, or if
    /// it cannot be read: [`restore`](Self::restore) logs that).
    pub fn saved_fleet(&self) -> Option<crate::control::FleetWeights> {
        let path = self.state_file.as_ref()?;
        state::load(path).ok().flatten()?.control
    }

    /// At start, apply the weights of the state file for every backend it names that is
    /// configured; anything unreadable or refused is logged and leaves the configured weights.
    pub fn restore(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let balance = &self.balance;
        match state::load(path) {
            Ok(None) => {}
            Ok(Some(saved)) => {
                let known: BTreeMap<String, u32> = saved
                    .weights
                    .into_iter()
                    .filter(|(name, _)| balance.names().contains(name))
                    .collect();
                if known.is_empty() {
                    return;
                }
                match balance.set_weights(&known) {
                    Ok(()) => info!(path = %path.display(), weights = ?balance.weights_by_name(),
                                    "weights restored from the state file"),
                    Err(e) => warn!(path = %path.display(), error = %e,
                                    "state file weights not applied; using the configured ones"),
                }
            }
            Err(e) => warn!(error = %e, "using the configured weights"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

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
    fn a_change_is_kept_in_the_state_file_and_restored_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let names: Vec<String> = vec!["A".into(), "B".into()];
        let store = WeightStore::new(
            Balance::new(names.clone(), vec![30, 70]),
            Some(path.clone()),
        );
        store
            .apply(&BTreeMap::from([("A".into(), 5)]), Origin::AdminApi)
            .unwrap();
        // A refused change leaves the weights and the file as they were.
        assert!(store
            .apply(&BTreeMap::from([("B".into(), 20_000)]), Origin::Sighup)
            .is_err());
        assert_eq!(store.balance().current().weights, vec![5, 70]);

        // The next start: the file wins for every backend it names that is still configured.
        let names = vec!["A".into(), "B".into(), "C".into()];
        let next = WeightStore::new(Balance::new(names, vec![30, 70, 1]), Some(path));
        next.restore();
        assert_eq!(next.balance().current().weights, vec![5, 70, 1]);
    }

    #[test]
    fn an_unreadable_state_file_leaves_the_configured_weights() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{").unwrap();
        let store = WeightStore::new(Balance::new(vec!["A".into()], vec![3]), Some(path));
        store.restore();
        assert_eq!(store.balance().current().weights, vec![3]);
        assert_eq!(store.balance().current().generation, 0);
    }
}
