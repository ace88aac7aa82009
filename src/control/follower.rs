//! The agent's control-plane bookkeeping, as a pure type: no I/O, no clock.
//!
//! Owns: which fleet version this agent serves, the fleet record it came from (its last good
//! weights), whether that is stale (the control Redis has not answered since start or since it
//! was lost), and which version was refused and why. Every input — a nudge, a poll answer, a
//! lost connection — goes in as a method call; what the I/O task must do comes out as a
//! [`Step`].
//!
//! Never: applies a version older than one it applied, stops serving weights, or talks to Redis.
//! The I/O task in [`super::task`] is a thin loop around it; the seeded simulation below drives
//! it through reordered, lost and duplicated nudges, late polls and control restarts.

use std::collections::BTreeMap;

use crate::balance::weights::merged;

use super::FleetWeights;

/// What the I/O task must do after an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing.
    Nothing,
    /// Read the fleet record now (a nudge named a version newer than the one served).
    Poll,
    /// Apply these weights (one per configured backend, in configuration order) from the next
    /// record, as fleet version `fleet.version`, and keep `fleet` in the state file.
    Apply {
        /// The fleet record being applied.
        fleet: FleetWeights,
        /// The weights to serve, one per backend.
        weights: Vec<u32>,
    },
    /// Fleet version `version` is refused for this agent (logged once, shown in its
    /// heartbeat); it keeps serving its last good weights.
    Refused {
        /// The refused version.
        version: u64,
        /// Why, for the log and the heartbeat.
        error: String,
    },
    /// The control Redis holds an older version than this agent applied, or none (it was
    /// restarted without its data): write back the record this agent applied, if the control
    /// Redis still holds an older one, so the fleet converges on the newest version any agent
    /// has seen.
    Raise(FleetWeights),
}

/// One agent's view of the fleet's weights.
#[derive(Debug, Clone)]
pub struct Follower {
    names: Vec<String>,
    serving: Vec<u32>,
    applied: Option<FleetWeights>,
    stale: bool,
    refused: Option<(u64, String, BTreeMap<String, u32>)>,
}

impl Follower {
    /// An agent with backends `names` serving `serving` (configured or restored weights), which
    /// last applied fleet record `saved` (from the state file) if any. Stale until the control
    /// Redis answers.
    pub fn new(names: Vec<String>, serving: Vec<u32>, saved: Option<FleetWeights>) -> Self {
        assert_eq!(names.len(), serving.len());
        Follower {
            names,
            serving,
            applied: saved,
            stale: true,
            refused: None,
        }
    }

    /// The weights served now, one per backend.
    pub fn serving(&self) -> &[u32] {
        &self.serving
    }

    /// The fleet version served, if any.
    pub fn version(&self) -> Option<u64> {
        self.applied.as_ref().map(|f| f.version)
    }

    /// The fleet record served, if any.
    pub fn applied(&self) -> Option<&FleetWeights> {
        self.applied.as_ref()
    }

    /// True while the control Redis has not answered since start or since it was lost.
    pub fn stale(&self) -> bool {
        self.stale
    }

    /// The newest version refused and why, until a newer one applies.
    pub fn refused(&self) -> Option<(u64, &str)> {
        self.refused.as_ref().map(|r| (r.0, r.1.as_str()))
    }

    /// A pub/sub nudge said version `version` exists. Nudges may come late, twice or never; they
    /// only ever lead to a poll.
    pub fn on_nudge(&mut self, version: u64) -> Step {
        let known = self
            .version()
            .unwrap_or(0)
            .max(self.refused.as_ref().map_or(0, |r| r.0));
        if version > known {
            Step::Poll
        } else {
            Step::Nothing
        }
    }

    /// The control Redis answered a read of the fleet record (`None`: there is none). The answer
    /// may be late: a newer version may have been applied since it was read.
    pub fn on_answer(&mut self, answer: Option<FleetWeights>) -> Step {
        self.stale = false;
        let applied = self.version();
        match answer {
            None => match &self.applied {
                Some(a) => Step::Raise(a.clone()),
                None => Step::Nothing,
            },
            Some(r) if applied.is_some_and(|a| r.version < a) => {
                Step::Raise(self.applied.clone().expect("checked"))
            }
            // The same version with other weights: the control Redis lost its data and a change
            // made after that reused the number. The control Redis's record is what the fleet
            // converges on, so it applies like a newer one.
            Some(r) if self.applied.as_ref() == Some(&r) => Step::Nothing,
            Some(r) => {
                // Refused once is logged once.
                if self
                    .refused
                    .as_ref()
                    .is_some_and(|x| x.0 == r.version && x.2 == r.weights)
                {
                    return Step::Nothing;
                }
                match self.check(&r.weights) {
                    Ok(weights) => {
                        self.serving = weights.clone();
                        self.refused = None;
                        self.applied = Some(r.clone());
                        Step::Apply { fleet: r, weights }
                    }
                    Err(error) => {
                        self.refused = Some((r.version, error.clone(), r.weights));
                        Step::Refused {
                            version: r.version,
                            error,
                        }
                    }
                }
            }
        }
    }

    /// A read or the connection failed: the weights served are stale until the next answer.
    pub fn on_lost(&mut self) {
        self.stale = true;
    }

    /// The fleet's weights applied over this agent's: every name must be one of its backends,
    /// except that a weight of 0 for a backend it does not have asks nothing of it.
    fn check(&self, fleet: &BTreeMap<String, u32>) -> Result<Vec<u32>, String> {
        let changes: BTreeMap<String, u32> = fleet
            .iter()
            .filter(|(n, &w)| w > 0 || self.names.contains(n))
            .map(|(n, &w)| (n.clone(), w))
            .collect();
        merged(&self.names, &self.serving, &changes).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(version: u64, w: &[(&str, u32)]) -> FleetWeights {
        FleetWeights {
            version,
            weights: w.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
        }
    }

    fn ab() -> Follower {
        Follower::new(vec!["A".into(), "B".into()], vec![30, 70], None)
    }

    #[test]
    fn a_newer_version_applies_and_an_older_one_never_does() {
        let mut f = ab();
        assert!(f.stale());
        assert_eq!(f.on_nudge(2), Step::Poll);
        let s = f.on_answer(Some(fleet(2, &[("A", 50), ("B", 50)])));
        assert!(matches!(s, Step::Apply { ref weights, .. } if weights == &vec![50, 50]));
        assert!(!f.stale());
        assert_eq!(f.on_nudge(2), Step::Nothing);
        assert_eq!(f.on_nudge(1), Step::Nothing);
        // A late answer holding version 1: the control Redis is asked to keep version 2.
        let s = f.on_answer(Some(fleet(1, &[("A", 1), ("B", 0)])));
        assert_eq!(s, Step::Raise(fleet(2, &[("A", 50), ("B", 50)])));
        assert_eq!(f.serving(), &[50, 50]);
        assert_eq!(f.version(), Some(2));
    }

    #[test]
    fn an_unknown_name_is_refused_once_and_the_last_good_weights_stay() {
        let mut f = ab();
        f.on_answer(Some(fleet(1, &[("A", 10)])));
        let s = f.on_answer(Some(fleet(2, &[("A", 10), ("C", 5)])));
        assert!(matches!(s, Step::Refused { version: 2, ref error } if error.contains("\"C\"")));
        assert_eq!(
            f.on_answer(Some(fleet(2, &[("A", 10), ("C", 5)]))),
            Step::Nothing
        );
        assert_eq!(f.on_nudge(2), Step::Nothing);
        assert_eq!(f.serving(), &[10, 70]);
        assert_eq!(f.version(), Some(1));
        // Weight 0 for a backend this agent lacks asks nothing of it.
        let s = f.on_answer(Some(fleet(3, &[("A", 10), ("C", 0)])));
        assert!(matches!(s, Step::Apply { .. }));
        assert_eq!(f.refused(), None);
    }

    #[test]
    fn a_lost_record_is_raised_back_and_no_record_without_a_version_changes_nothing() {
        let mut f = ab();
        assert_eq!(f.on_answer(None), Step::Nothing);
        f.on_answer(Some(fleet(4, &[("A", 1)])));
        f.on_lost();
        assert!(f.stale());
        assert_eq!(f.on_answer(None), Step::Raise(fleet(4, &[("A", 1)])));
        assert!(!f.stale());
    }

    /// A tiny deterministic generator (SplitMix64) so every schedule replays from its seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The control Redis as the scripts see it: one record, CAS writers, restarts that may lose
    /// the record (no persistence) or keep it.
    struct Control {
        record: Option<FleetWeights>,
        up: bool,
    }

    impl Control {
        /// `weights set`: CAS from the current version.
        fn write(&mut self, rng: &mut Rng) -> Option<u64> {
            if !self.up {
                return None;
            }
            let v = self.record.as_ref().map_or(0, |r| r.version) + 1;
            let mut w = BTreeMap::new();
            for name in ["A", "B", "C"] {
                if rng.below(3) > 0 {
                    w.insert(name.to_string(), rng.below(4) as u32);
                }
            }
            // Now and then a name no agent has.
            if rng.below(10) == 0 {
                w.insert("Z".into(), 1 + rng.below(3) as u32);
            }
            self.record = Some(FleetWeights {
                version: v,
                weights: w,
            });
            Some(v)
        }

        /// The raise script: only over an older record, or none.
        fn raise(&mut self, f: FleetWeights) {
            if self.up && self.record.as_ref().is_none_or(|r| r.version < f.version) {
                self.record = Some(f);
            }
        }
    }

    #[test]
    fn seeded_schedules_never_go_back_never_stop_serving_and_converge() {
        let names: Vec<String> = ["A", "B", "C"].iter().map(|s| s.to_string()).collect();
        let seeds = 20_000u64;
        for seed in 0..seeds {
            let mut rng = Rng(seed);
            let mut control = Control {
                record: None,
                up: true,
            };
            let mut agent = Follower::new(names.clone(), vec![1, 1, 1], None);
            // Nudges and poll answers in flight, delivered in any order, any number of times.
            let mut nudges: Vec<u64> = Vec::new();
            let mut answers: Vec<Option<FleetWeights>> = Vec::new();
            let mut last_applied = FleetWeights {
                version: 0,
                weights: BTreeMap::new(),
            };
            let steps = 50 + rng.below(150);
            for _ in 0..steps {
                let step = match rng.below(10) {
                    0 | 1 => {
                        if let Some(v) = control.write(&mut rng) {
                            // The nudge may be lost.
                            if rng.below(4) > 0 {
                                nudges.push(v);
                            }
                        }
                        Step::Nothing
                    }
                    2 | 3 if !nudges.is_empty() => {
                        let i = rng.below(nudges.len() as u64) as usize;
                        // Duplicated now and then: the same nudge stays in flight.
                        let v = if rng.below(3) == 0 {
                            nudges[i]
                        } else {
                            nudges.swap_remove(i)
                        };
                        let s = agent.on_nudge(v);
                        if s == Step::Poll && control.up {
                            answers.push(control.record.clone());
                        }
                        s
                    }
                    4 => {
                        // The every-second poll: its answer may come back late.
                        if control.up {
                            answers.push(control.record.clone());
                        } else {
                            agent.on_lost();
                        }
                        Step::Nothing
                    }
                    5 | 6 if !answers.is_empty() => {
                        let i = rng.below(answers.len() as u64) as usize;
                        agent.on_answer(answers.swap_remove(i))
                    }
                    7 => {
                        // The control Redis restarts; without persistence its record is gone.
                        control.up = !control.up;
                        if control.up && rng.below(2) == 0 {
                            control.record = None;
                        }
                        if !control.up {
                            agent.on_lost();
                        }
                        Step::Nothing
                    }
                    _ => Step::Nothing,
                };
                match step {
                    Step::Apply { fleet, weights } => {
                        // Never an older version; the same number only for other weights (a
                        // version reused after the control Redis lost its data).
                        assert!(
                            fleet.version > last_applied.version
                                || (fleet.version == last_applied.version && fleet != last_applied),
                            "seed {seed}: applied {fleet:?} after {last_applied:?}"
                        );
                        last_applied = fleet;
                        assert_eq!(weights, agent.serving());
                    }
                    Step::Raise(f) => control.raise(f),
                    _ => {}
                }
                // Weights are always served, and always valid.
                assert_eq!(agent.serving().len(), 3, "seed {seed}");
                assert!(agent.serving().iter().any(|&w| w > 0), "seed {seed}");
            }
            // The control Redis comes back and answers: the agent converges on its latest
            // version (or refuses exactly that one, keeping its last good weights).
            control.up = true;
            for _ in 0..3 {
                match agent.on_answer(control.record.clone()) {
                    Step::Raise(f) => control.raise(f),
                    Step::Apply { fleet, .. } => {
                        assert!(fleet.version >= last_applied.version, "seed {seed}");
                        last_applied = fleet;
                    }
                    _ => {}
                }
            }
            assert!(!agent.stale(), "seed {seed}");
            let latest = control.record.as_ref().map(|r| r.version);
            let refused = agent.refused().map(|r| r.0);
            assert!(
                agent.version() == latest || (latest.is_some() && refused == latest),
                "seed {seed}: agent at {:?} (refused {refused:?}), control at {latest:?}",
                agent.version()
            );
            if let (Some(r), Some(a)) = (&control.record, agent.applied()) {
                if refused.is_none() {
                    assert_eq!(r, a, "seed {seed}");
                }
            }
        }
    }
}
