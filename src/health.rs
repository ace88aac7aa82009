//! Backend health: which backends can take records right now.
//!
//! Owns the up/down state of every backend. Each writer judges its own backend from the outcome
//! of its writes and of PING probes ([`Tracker`]) and publishes transitions on the shared
//! [`Board`]; the balancer reads the board (one atomic load per batch) to route around backends
//! that are down, and is woken when something changes. The hot path never locks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Health thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive failures (write errors, timeouts, failed probes) that mark a backend down.
    pub down_after: u32,
    /// Consecutive successful probes that mark a down backend up again.
    pub up_after: u32,
    /// How long a command may take before it counts as a failure.
    pub timeout: Duration,
    /// How often an idle or down backend is PINGed.
    pub probe_every: Duration,
}

impl Default for HealthConfig {
    /// Detects a dead Redis (refused connections) in about 0.1 s and a hung one in
    /// 2 × 750 ms + backoff ≈ 1.6 s.
    fn default() -> Self {
        HealthConfig {
            down_after: 2,
            up_after: 2,
            timeout: Duration::from_millis(750),
            probe_every: Duration::from_millis(250),
        }
    }
}

/// The shared up/down state of every backend.
#[derive(Debug)]
pub struct Board {
    up: Vec<AtomicBool>,
    /// Bumped on every transition.
    generation: AtomicU64,
    changed: Notify,
}

impl Board {
    /// `n` backends, all assumed up until proven otherwise.
    pub fn new(n: usize) -> Self {
        Board {
            up: (0..n).map(|_| AtomicBool::new(true)).collect(),
            generation: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    /// Whether backend `i` is up.
    pub fn is_up(&self, i: usize) -> bool {
        self.up[i].load(Ordering::Acquire)
    }

    /// Up/down of every backend, in order.
    pub fn snapshot(&self) -> Vec<bool> {
        (0..self.up.len()).map(|i| self.is_up(i)).collect()
    }

    /// Changes whenever any backend goes up or down.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Resolves at the next transition.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn set(&self, i: usize, up: bool) {
        if self.up[i].swap(up, Ordering::AcqRel) != up {
            self.generation.fetch_add(1, Ordering::AcqRel);
            // One waiter (the balancer); a stored permit means a change between its check and
            // its wait is not missed.
            self.changed.notify_one();
        }
    }
}

/// What a writer learned from one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The backend just went down.
    Down,
    /// The backend just came back up.
    Up,
}

/// One writer's judge of its backend: counts consecutive outcomes and flips the board.
#[derive(Debug)]
pub struct Tracker {
    cfg: HealthConfig,
    index: usize,
    up: bool,
    failures: u32,
    successes: u32,
}

impl Tracker {
    /// The tracker of backend `index`, starting up.
    pub fn new(cfg: HealthConfig, index: usize) -> Self {
        Tracker {
            cfg,
            index,
            up: true,
            failures: 0,
            successes: 0,
        }
    }

    /// Whether the backend is considered up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The thresholds in force.
    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    /// Record one outcome; publish and return a transition if it caused one. While down, only
    /// probes count towards coming back up.
    pub fn record(&mut self, ok: bool, board: &Board) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes += 1;
            if !self.up && self.successes >= self.cfg.up_after {
                self.up = true;
                board.set(self.index, true);
                return Some(Transition::Up);
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.up && self.failures >= self.cfg.down_after {
                self.up = false;
                board.set(self.index, false);
                return Some(Transition::Down);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_after_consecutive_outcomes() {
        let board = Board::new(2);
        let mut t = Tracker::new(HealthConfig::default(), 1);
        assert_eq!(t.record(false, &board), None);
        assert_eq!(t.record(true, &board), None); // a success resets the count
        assert_eq!(t.record(false, &board), None);
        assert_eq!(t.record(false, &board), Some(Transition::Down));
        assert!(!board.is_up(1) && board.is_up(0));
        assert_eq!(board.generation(), 1);
        assert_eq!(t.record(true, &board), None);
        assert_eq!(t.record(true, &board), Some(Transition::Up));
        assert!(board.is_up(1));
        assert_eq!(board.generation(), 2);
    }
}
