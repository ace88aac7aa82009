//! The memory budget for records that wait because no backend can take them.
//!
//! Owns one count shared by every place that holds records beyond a write in flight: the
//! dispatcher's buffer (no backend up) and each writer's backlog (its backend down, `hold` mode).
//! The count is in records; `--buffer-max` is converted from bytes with [`RECORD_COST`].

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes one waiting record costs: the `Record` itself plus its queue slot and bookkeeping.
pub const RECORD_COST: usize = 96;

/// What a full buffer does with the next record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Stop taking records, so the wait reaches capture (connections mode: accepting slows).
    Wait,
    /// Keep taking records and drop the oldest waiting one, counted as `overflow` (packets mode,
    /// where the kernel will not wait).
    DropOldest,
}

/// A shared count of waiting records with a maximum.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Budget {
            used: AtomicUsize::new(0),
            max: (max_bytes / RECORD_COST).max(1),
        }
    }

    /// Records the budget holds at most.
    pub fn max_records(&self) -> usize {
        self.max
    }

    /// Records waiting now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether there is room for `n` more.
    pub fn has_room(&self, n: usize) -> bool {
        self.used() + n <= self.max
    }

    /// Count `n` records as waiting (the caller checked [`has_room`](Self::has_room) or is about
    /// to drop as many).
    pub fn take(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` waiting records left (written, dropped or handed on).
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}
