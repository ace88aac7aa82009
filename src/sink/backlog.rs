//! The writer's exactly-once bookkeeping, free of I/O: which records wait, where each stands,
//! what the next pipeline sends, and what its answers mean.
//!
//! Its unit is an *entry*: what one store command writes at one slot — one record in the stream
//! and keys layouts, a batch of records of one capture second (up to the pipeline's limit) in
//! the packed layout. An entry's records and value are fixed when it is formed (from records
//! never sent, in arrival order), so a resend sends the identical bytes at the same slot; an
//! entry that takes a new slot is encoded again for it. Counts stay per record: an entry's
//! records are written, or dropped for one reason, together.
//!
//! On a Redis Cluster an entry also has a *stripe* (the hash tag of its bucket's key), fixed
//! for its life when it is formed: the new entries of one pipeline share one stripe — the one
//! that has taken the fewest records so far, the first in [`Layout::stripe_after`] order after
//! the last pipeline's on a tie — so pipelines rotate over the primaries, records spread evenly
//! over the stripes whatever the pipelines' sizes, and every resend and read-back of an entry
//! goes to the same key. Its bucket is then (capture second, stripe) — [`Bucket`] — and
//! everything said of a bucket below (created once, IDs grow in it, its top) is said of that
//! stream.
//!
//! Owns: the records a writer holds (never sent, in flight, answer lost, to be read back), their
//! entries and slots, the pipelines in flight with the exact commands each carries, the share of the buffer
//! budget the records hold, and the written / dropped tally. It never touches a socket, a clock
//! or a metric: the writer ([`super::Writer`]) passes the time in, sends what [`Backlog::plan`]
//! returns, hands each answer back to [`Backlog::settle`] and publishes [`Backlog::take_tally`].
//! That is what lets `tests/exactly_once.rs` run it against a seeded model of Redis.
//!
//! The rules that keep a record from being stored twice or counted as stored when it is not
//! (docs/redis-schema.md explains them for users). They say "record"; read "entry" for the
//! packed layout, which follows the stream rules, and whose read-back compares the capture time
//! and source port of its first record.
//!
//! - A pipeline remembers the commands it sent, in order; its answers are matched against that
//!   list and nothing else. Answers may come back in any order across pipelines.
//! - A record whose answer was lost keeps its slot and is resent there: whichever attempt runs
//!   first stores it, the others are refused (XADD: ID not above the top; SET … NX: nil).
//! - Stream: a *first* attempt refused as "not above the top" is surely not stored and never will
//!   be (IDs only grow in a key): it takes a new slot, and the bucket's top is read so the new
//!   slot jumps past it. A *resend* refused that way is read back (`XRANGE key id id`) — present
//!   with its capture time and source port: stored; absent (or someone else's entry): never will
//!   be (the top is already past it), so a new slot.
//! - Stream: a nil from `XADD … NOMKSTREAM` means the bucket is missing: on a first attempt,
//!   not stored; on a resend, still unknown (an earlier attempt in flight on a lost connection
//!   may yet create it), so resent at the same slot.
//! - Keys: a nil from `SET … NX` on a first attempt means someone else's key (an earlier run,
//!   after the clock went back): not stored, a new slot. On a resend it is read back (`GET`):
//!   our value (same `ts` and `sport`): stored; else a new slot.
//! - A refusal (OOM, READONLY, LOADING, MISCONF) writes nothing; a resend so refused stays
//!   unknown, a first attempt so refused takes a new slot.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use redis::Pipeline;

use super::WINDOW;
use crate::buffer::{Budget, OnFull};
use crate::config::Schema;
use crate::layout::{bucket_of, Answer, Ask, Bucket, Layout, Slot};
use crate::metrics::DropReason;
use crate::record::Record;

/// An entry held by a backlog, numbered in the order entries were formed.
pub type Handle = u64;

/// One command of a pipeline, as the backlog matches its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// Store entry `h` at `slot`; `create`: a bucket stream's first entry in this pipeline,
    /// sent with the script that creates the bucket with its expiry.
    Store {
        /// The entry.
        h: Handle,
        /// Its slot.
        slot: Slot,
        /// Whether this may create the bucket.
        create: bool,
        /// Whether an earlier attempt of this entry at `slot` may have stored it.
        resend: bool,
    },
    /// Read back whether entry `h` is stored at `slot`.
    Check {
        /// The entry.
        h: Handle,
        /// The slot read.
        slot: Slot,
    },
    /// Learn the newest ID of bucket `bucket`.
    Top {
        /// The bucket (capture second and stripe).
        bucket: Bucket,
    },
}

impl Cmd {
    /// What the command asks, for reading its answer.
    pub fn ask(&self) -> Ask {
        match self {
            Cmd::Store { .. } => Ask::Store,
            Cmd::Check { .. } => Ask::Check,
            Cmd::Top { .. } => Ask::Top,
        }
    }
}

/// A pipeline to send: its number (for [`Backlog::settle`]) and its commands in send order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Its number.
    pub id: u64,
    /// Its commands, in send order.
    pub cmds: Vec<Cmd>,
}

/// What settling one pipeline found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Records now known stored.
    pub stored: usize,
    /// The first refusal, if Redis refused a command.
    pub refused: Option<String>,
    /// Part or all of the answer was lost (connection error, timeout).
    pub lost: bool,
}

impl Settled {
    /// Whether this counts as a success for health: answered, and stored something or refused
    /// nothing.
    pub fn ok(&self) -> bool {
        !self.lost && (self.stored > 0 || self.refused.is_none())
    }
}

/// Records written and dropped (by [`DropReason`] index).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Records stored.
    pub written: u64,
    /// Records dropped, indexed by `DropReason as usize`.
    pub dropped: [u64; DropReason::ALL.len()],
}

impl Tally {
    /// Every record dropped, for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

/// What became of a record, as kept by [`Backlog::keep_journal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Stored.
    Written,
    /// Dropped, counted under this reason.
    Dropped(DropReason),
}

/// Where a held record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// In a pipeline in flight, storing at `slot`.
    Sending { slot: Slot, resend: bool },
    /// In a pipeline in flight, read back at `slot`.
    Checking { slot: Slot },
    /// Surely not stored, and no attempt in flight can store it: takes a new slot.
    Retry,
    /// May be stored at `slot`, or may still be (an attempt may be pending on a lost
    /// connection): resent at `slot`.
    Unknown(Slot),
    /// Stored if and only if its entry at `slot` is there: read back.
    Check(Slot),
}

impl St {
    fn in_flight(self) -> bool {
        matches!(self, St::Sending { .. } | St::Checking { .. })
    }

    /// Whether a copy may be in Redis.
    fn maybe_stored(self) -> bool {
        matches!(self, St::Unknown(_) | St::Check(_)) || self.in_flight()
    }
}

/// An entry sent at least once and not settled.
#[derive(Debug)]
struct Held {
    /// Its records (one, except in the packed layout), fixed when it was formed.
    recs: Vec<Record>,
    /// Packed layout: its value at its current slot (empty in the other layouts).
    value: Vec<u8>,
    /// Its stripe, fixed when it was formed (always 0 outside a cluster).
    stripe: u8,
    st: St,
    /// A read-back found it absent, which may also mean its bucket expired with it: if it is
    /// dropped before it is stored again, it counts as `unknown`.
    doubt: bool,
}

/// One backend's records on their way to Redis.
#[derive(Debug)]
pub struct Backlog {
    layout: Layout,
    batch_size: usize,
    /// Most stores in the next pipeline: halved when an answer is lost, doubled back up to
    /// `batch_size` when one arrives whole — a connection that dies part way through long
    /// pipelines still lets short ones through.
    limit: usize,
    on_full: OnFull,
    budget: Arc<Budget>,
    /// How many held records are counted in `budget`.
    budgeted: usize,
    /// Whether the backend is judged up.
    up: bool,
    /// Records never sent, in arrival order.
    fresh: VecDeque<Record>,
    /// Entries sent at least once and not settled, by arrival. Small: at most what went out in
    /// the pipelines since the last success.
    held: BTreeMap<Handle, Held>,
    next_handle: Handle,
    /// Records in `held`.
    held_recs: usize,
    /// Records of held entries not in flight.
    held_idle: usize,
    /// Pipelines in flight: number and commands, oldest first.
    inflight: Vec<(u64, Vec<Cmd>)>,
    next_plan: u64,
    /// Buckets whose newest ID to learn.
    tops: Vec<Bucket>,
    /// The stripe of the last pipeline that formed new entries.
    stripe: u8,
    /// Records formed into entries on each stripe (one, outside a cluster).
    stripe_load: Vec<u64>,
    /// Send nothing new until every pipeline in flight has settled (after a failure, or while a
    /// resend or read-back is out).
    draining: bool,
    /// Since the last [`take_tally`](Self::take_tally).
    tally: Tally,
    /// Since the start.
    totals: Tally,
    /// Every record's fate, when kept (tests only: it grows without bound).
    journal: Option<Vec<(Record, Fate)>>,
}

impl Backlog {
    /// An empty backlog writing with `layout`, at most `batch_size` records per pipeline.
    pub fn new(layout: Layout, batch_size: usize, on_full: OnFull, budget: Arc<Budget>) -> Self {
        let stripes = layout.stripes();
        Backlog {
            layout,
            batch_size: batch_size.max(1),
            limit: batch_size.max(1),
            on_full,
            budget,
            budgeted: 0,
            up: true,
            fresh: VecDeque::new(),
            held: BTreeMap::new(),
            next_handle: 0,
            held_recs: 0,
            held_idle: 0,
            inflight: Vec::new(),
            next_plan: 0,
            tops: Vec::new(),
            stripe: 0,
            stripe_load: vec![0; stripes],
            draining: false,
            tally: Tally::default(),
            totals: Tally::default(),
            journal: None,
        }
    }

    /// The layout (names and commands).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Records held, in any state.
    pub fn len(&self) -> usize {
        self.fresh.len() + self.held_recs
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records waiting to be sent (not in flight).
    pub fn unsent(&self) -> usize {
        self.fresh.len() + self.held_idle
    }

    /// Pipelines in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether sending is held back until what is in flight settles.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Whether the backend is judged up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Whether a pipeline may go now (timing aside: linger and backoff are the writer's).
    pub fn can_send(&self) -> bool {
        self.up && !self.draining && self.inflight.len() < WINDOW && self.unsent() > 0
    }

    /// Whether to take another batch from the queue now. While up, a few batches at most (so a
    /// slow Redis slows capture); while down, within the shared budget (or always, in
    /// drop-oldest mode, which evicts instead).
    pub fn has_room(&self) -> bool {
        if self.up {
            self.len() < self.batch_size * WINDOW
        } else {
            self.on_full == OnFull::DropOldest || self.budget.has_room(self.batch_size)
        }
    }

    /// The first (in the stream and keys layouts: the only) record of entry `h` (held).
    pub fn record(&self, h: Handle) -> &Record {
        &self.held[&h].recs[0]
    }

    /// The records of entry `h` (held).
    pub fn entry(&self, h: Handle) -> &[Record] {
        &self.held[&h].recs
    }

    /// The stripe of entry `h` (held): 0 outside a cluster.
    pub fn stripe(&self, h: Handle) -> u8 {
        self.held[&h].stripe
    }

    /// The packed value of entry `h` (held) at its current slot; empty in the other layouts.
    pub fn value(&self, h: Handle) -> &[u8] {
        &self.held[&h].value
    }

    /// Queue records from the balancer. While down they count against the budget, and in
    /// drop-oldest mode a full budget evicts this backlog's oldest records.
    pub fn accept(&mut self, recs: impl IntoIterator<Item = Record>) {
        let before = self.fresh.len();
        self.fresh.extend(recs);
        let n = self.fresh.len() - before;
        if !self.up {
            self.budget.take(n);
            self.budgeted += n;
            if self.on_full == OnFull::DropOldest {
                let over = self.budget.used().saturating_sub(self.budget.max_records());
                if over > 0 {
                    self.evict(over, DropReason::Overflow);
                }
            }
        }
    }

    /// The backend was judged up or down. Going down, everything held starts to count against
    /// the buffer budget: it waits for this backend.
    pub fn set_up(&mut self, up: bool) {
        if self.up && !up {
            let extra = self.len().saturating_sub(self.budgeted);
            self.budget.take(extra);
            self.budgeted += extra;
        }
        self.up = up;
    }

    /// A send failed before anything went out (no connection): hold back new pipelines until
    /// those in flight settle.
    pub fn failed(&mut self) {
        self.draining = !self.inflight.is_empty();
    }

    /// The next pipeline: read-backs, bucket tops, resends at their slots (in slot order), then
    /// entries that need a new slot, oldest first, then new entries formed from fresh records —
    /// stores of at most one batch of records. `None` if nothing is to be sent.
    pub fn plan(&mut self) -> Option<Plan> {
        let stream = self.layout.is_stream();
        let packed = self.layout.schema == Schema::Packed;
        let mut cmds = Vec::new();
        let mut careful = false;
        for (&h, held) in self.held.iter_mut() {
            if let St::Check(slot) = held.st {
                held.st = St::Checking { slot };
                self.held_idle -= held.recs.len();
                cmds.push(Cmd::Check { h, slot });
                careful = true;
            }
        }
        // New slots wait for the tops they should jump past.
        let new_slots = self.tops.is_empty();
        for bucket in self.tops.drain(..) {
            cmds.push(Cmd::Top { bucket });
            careful = true;
        }
        let mut created: Vec<Bucket> = Vec::new();
        let mut create = |rec: &Record, stripe: u8| {
            let b = Bucket::of(rec, stripe);
            let first = stream && !created.contains(&b);
            if first {
                created.push(b);
            }
            first
        };
        // Records in this pipeline's stores.
        let mut stores = 0;
        let mut resends: Vec<(Slot, Handle)> = self
            .held
            .iter()
            .filter_map(|(&h, held)| match held.st {
                St::Unknown(slot) => Some((slot, h)),
                _ => None,
            })
            .collect();
        resends.sort_unstable();
        for (slot, h) in resends {
            if stores >= self.limit {
                break;
            }
            let held = self.held.get_mut(&h).expect("held");
            held.st = St::Sending { slot, resend: true };
            self.held_idle -= held.recs.len();
            cmds.push(Cmd::Store {
                h,
                slot,
                create: create(&held.recs[0], held.stripe),
                resend: true,
            });
            stores += held.recs.len();
            careful = true;
        }
        if new_slots {
            for (&h, held) in self.held.iter_mut() {
                if stores >= self.limit {
                    break;
                }
                if held.st == St::Retry {
                    let slot = self.layout.next_slot(&held.recs[0]);
                    // A new slot is a new entry as far as Redis knows: encoded for its ID.
                    held.value = self.layout.pack(&held.recs, slot);
                    held.st = St::Sending {
                        slot,
                        resend: false,
                    };
                    self.held_idle -= held.recs.len();
                    cmds.push(Cmd::Store {
                        h,
                        slot,
                        create: create(&held.recs[0], held.stripe),
                        resend: false,
                    });
                    stores += held.recs.len();
                }
            }
            if stores < self.limit && !self.fresh.is_empty() {
                self.stripe = self.next_stripe();
            }
            let stripe = self.stripe;
            while stores < self.limit {
                let Some(first) = self.fresh.pop_front() else {
                    break;
                };
                let mut recs = vec![first];
                if packed {
                    // One second's records of one kind (the format's kind byte is per value),
                    // consecutive in arrival order.
                    while stores + recs.len() < self.limit {
                        let Some(next) = self.fresh.front() else {
                            break;
                        };
                        let conn = |r: &Record| r.kind == crate::record::Kind::Conn;
                        if bucket_of(next) != bucket_of(&recs[0]) || conn(next) != conn(&recs[0]) {
                            break;
                        }
                        recs.push(self.fresh.pop_front().expect("front"));
                    }
                }
                let h = self.next_handle;
                self.next_handle += 1;
                let slot = self.layout.next_slot(&recs[0]);
                let value = self.layout.pack(&recs, slot);
                cmds.push(Cmd::Store {
                    h,
                    slot,
                    create: create(&recs[0], stripe),
                    resend: false,
                });
                stores += recs.len();
                self.held_recs += recs.len();
                self.stripe_load[usize::from(stripe)] += recs.len() as u64;
                self.held.insert(
                    h,
                    Held {
                        recs,
                        value,
                        stripe,
                        st: St::Sending {
                            slot,
                            resend: false,
                        },
                        doubt: false,
                    },
                );
            }
        }
        if cmds.is_empty() {
            return None;
        }
        if careful {
            // Nothing new goes out beside a resend or read-back: new IDs stored in the same
            // bucket first would only turn the resend into a read-back.
            self.draining = true;
        }
        let id = self.next_plan;
        self.next_plan += 1;
        self.inflight.push((id, cmds.clone()));
        Some(Plan { id, cmds })
    }

    /// The stripe for the next pipeline's new entries: the least loaded, in
    /// [`Layout::stripe_after`] order from the last one.
    fn next_stripe(&self) -> u8 {
        let mut best = self.layout.stripe_after(self.stripe);
        let mut s = best;
        for _ in 1..self.stripe_load.len() {
            s = self.layout.stripe_after(s);
            if self.stripe_load[usize::from(s)] < self.stripe_load[usize::from(best)] {
                best = s;
            }
        }
        best
    }

    /// The Redis pipeline of `plan`.
    pub fn pipeline(&self, plan: &Plan) -> Pipeline {
        let mut pipe = Pipeline::with_capacity(plan.cmds.len());
        for cmd in &plan.cmds {
            match *cmd {
                Cmd::Store {
                    h, slot, create, ..
                } => {
                    let held = &self.held[&h];
                    self.layout.push_store(
                        &mut pipe,
                        &held.recs,
                        &held.value,
                        slot,
                        held.stripe,
                        create,
                    )
                }
                Cmd::Check { h, slot } => {
                    let held = &self.held[&h];
                    self.layout
                        .push_check(&mut pipe, &held.recs[0], slot, held.stripe)
                }
                Cmd::Top { bucket } => self.layout.push_top(&mut pipe, bucket),
            }
        }
        pipe
    }

    /// What each command of pipeline `id` (in flight) asks, in send order.
    pub fn asks(&self, id: u64) -> Vec<Ask> {
        self.inflight
            .iter()
            .find(|(p, _)| *p == id)
            .map(|(_, cmds)| cmds.iter().map(Cmd::ask).collect())
            .unwrap_or_default()
    }

    /// Take in the answers to pipeline `id`, one per command in send order; `Err` if the answer
    /// was lost (a missing answer counts as lost too).
    pub fn settle(&mut self, id: u64, answers: Result<Vec<Answer>, ()>) -> Settled {
        let Some(pos) = self.inflight.iter().position(|(p, _)| *p == id) else {
            return Settled::default();
        };
        let (_, cmds) = self.inflight.remove(pos);
        let stream = self.layout.is_stream();
        let mut out = Settled::default();
        let answers = answers.unwrap_or_else(|_| {
            out.lost = true;
            Vec::new()
        });
        for (i, cmd) in cmds.iter().enumerate() {
            let answer = answers.get(i);
            out.lost |= answer.is_none();
            if let Some(Answer::Refused(e)) = answer {
                out.refused.get_or_insert_with(|| e.clone());
            }
            let (h, next) = match *cmd {
                Cmd::Top { bucket: _ } => {
                    if let Some(Answer::Top(Some(top))) = answer {
                        self.layout.resume_after(*top);
                    }
                    continue;
                }
                Cmd::Store {
                    h, slot, resend, ..
                } => {
                    let next = match answer {
                        Some(Answer::Done) => None,
                        // Keys: ours from an earlier attempt, or someone else's: read back.
                        Some(Answer::Nil) if !stream && resend => Some(St::Check(slot)),
                        Some(Answer::Nil) if stream && resend => Some(St::Unknown(slot)),
                        Some(Answer::NotAbove) if stream && resend => Some(St::Check(slot)),
                        Some(Answer::NotAbove) if stream => {
                            let held = &self.held[&h];
                            let b = Bucket::of(&held.recs[0], held.stripe);
                            if !self.tops.contains(&b) {
                                self.tops.push(b);
                            }
                            Some(St::Retry)
                        }
                        Some(Answer::Nil | Answer::NotAbove | Answer::Refused(_)) if !resend => {
                            Some(St::Retry)
                        }
                        // A refused resend, a lost answer, or an answer of the wrong shape.
                        _ => Some(St::Unknown(slot)),
                    };
                    (h, next)
                }
                Cmd::Check { h, slot } => {
                    let rec = &self.held[&h].recs[0];
                    let ours = Some((rec.ts_us, rec.src.port()));
                    let next = match answer {
                        Some(Answer::Found(e)) if *e == ours => None,
                        // Absent, or another entry (an earlier run's) at that ID.
                        Some(Answer::Found(_)) => Some(St::Retry),
                        _ => Some(St::Check(slot)),
                    };
                    (h, next)
                }
            };
            match next {
                None => {
                    let held = self.held.remove(&h).expect("held");
                    self.held_recs -= held.recs.len();
                    out.stored += held.recs.len();
                    for rec in held.recs {
                        self.note(rec, Fate::Written);
                    }
                }
                Some(st) => {
                    let held = self.held.get_mut(&h).expect("held");
                    held.doubt |= matches!(cmd, Cmd::Check { .. }) && st == St::Retry;
                    held.st = st;
                    self.held_idle += held.recs.len();
                }
            }
        }
        self.limit = if out.lost {
            (self.limit / 2).max(1)
        } else {
            (self.limit * 2).min(self.batch_size)
        };
        self.tally.written += out.stored as u64;
        self.totals.written += out.stored as u64;
        self.release(out.stored);
        if self.inflight.is_empty() {
            self.draining = false;
        } else if !out.ok() {
            self.draining = true;
        }
        out
    }

    /// Drop the records past retention at `now_ms` that are not in flight — an entry once its
    /// newest record is (until then its bucket outlives it, so what it stores is readable).
    /// Returns how many records.
    pub fn drop_expired(&mut self, now_ms: u64) -> usize {
        // Fresh records are in arrival (≈ capture) order: the expired ones are at the front.
        let mut n = 0;
        while self
            .fresh
            .front()
            .is_some_and(|r| self.layout.is_expired(r, now_ms))
        {
            let rec = self.fresh.pop_front().expect("front");
            self.note(rec, Fate::Dropped(DropReason::Expired));
            n += 1;
        }
        self.count_drop(DropReason::Expired, n);
        let gone: Vec<Handle> = self
            .held
            .iter()
            .filter(|(_, held)| {
                !held.st.in_flight() && held.recs.iter().all(|r| self.layout.is_expired(r, now_ms))
            })
            .map(|(&h, _)| h)
            .collect();
        for &h in &gone {
            n += self.drop_held(h, DropReason::Expired);
        }
        n
    }

    /// Drop everything not in flight (the grace period is over). Returns how many.
    pub fn abort(&mut self) -> usize {
        self.evict(usize::MAX, DropReason::Shutdown)
    }

    /// Drop the `n` oldest records not in flight for `reason` (whole entries: a few more when
    /// the last one is larger; a record whose copy may be in Redis is counted as
    /// [`DropReason::Unknown`] instead).
    fn evict(&mut self, n: usize, reason: DropReason) -> usize {
        let mut gone = Vec::new();
        let mut left = n;
        for (&h, held) in &self.held {
            if left == 0 {
                break;
            }
            if !held.st.in_flight() {
                gone.push(h);
                left = left.saturating_sub(held.recs.len());
            }
        }
        let mut dropped = 0;
        for &h in &gone {
            dropped += self.drop_held(h, reason);
        }
        let fresh = left.min(self.fresh.len());
        for rec in self.fresh.drain(..fresh) {
            if let Some(j) = self.journal.as_mut() {
                j.push((rec, Fate::Dropped(reason)));
            }
        }
        self.count_drop(reason, fresh);
        dropped + fresh
    }

    /// Drop entry `h` (not in flight) for `reason`; returns how many records it held.
    fn drop_held(&mut self, h: Handle, reason: DropReason) -> usize {
        let held = self.held.remove(&h).expect("held");
        debug_assert!(!held.st.in_flight());
        let n = held.recs.len();
        self.held_idle -= n;
        self.held_recs -= n;
        let reason = if held.st.maybe_stored() || held.doubt {
            DropReason::Unknown
        } else {
            reason
        };
        for rec in held.recs {
            self.note(rec, Fate::Dropped(reason));
        }
        self.count_drop(reason, n);
        n
    }

    fn note(&mut self, rec: Record, fate: Fate) {
        if let Some(j) = self.journal.as_mut() {
            j.push((rec, fate));
        }
    }

    /// Keep every record's fate from now on, for [`take_journal`](Self::take_journal) (tests).
    pub fn keep_journal(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// The fates kept since the last call.
    pub fn take_journal(&mut self) -> Vec<(Record, Fate)> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn count_drop(&mut self, reason: DropReason, n: usize) {
        if n == 0 {
            return;
        }
        self.tally.dropped[reason as usize] += n as u64;
        self.totals.dropped[reason as usize] += n as u64;
        self.release(n);
    }

    /// `n` records left; give back their share of the budget.
    fn release(&mut self, n: usize) {
        let back = n.min(self.budgeted);
        self.budgeted -= back;
        self.budget.release(back);
    }

    /// What was written and dropped since the last call.
    pub fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    /// What was written and dropped since the start.
    pub fn totals(&self) -> Tally {
        self.totals
    }

    /// Records held that may be in Redis already (answer lost, or to be read back).
    pub fn unknown(&self) -> usize {
        self.held
            .values()
            .filter(|h| matches!(h.st, St::Unknown(_) | St::Check(_)))
            .map(|h| h.recs.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;

    fn rec(ts_us: u64, port: u16) -> Record {
        Record {
            ts_us,
            src: format!("10.0.0.1:{port}").parse().unwrap(),
            dst: "10.0.0.2:9000".parse().unwrap(),
            kind: Kind::Conn,
        }
    }

    fn backlog(schema: Schema, batch: usize) -> Backlog {
        let layout = Layout::new(schema, "t", "a", 10_000);
        Backlog::new(
            layout,
            batch,
            OnFull::DropOldest,
            Arc::new(Budget::new(1 << 20)),
        )
    }

    fn stores(p: &Plan) -> Vec<(Handle, Slot, bool, bool)> {
        p.cmds
            .iter()
            .filter_map(|c| match *c {
                Cmd::Store {
                    h,
                    slot,
                    create,
                    resend,
                } => Some((h, slot, create, resend)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn answers_are_matched_to_the_records_each_pipeline_sent() {
        let mut b = backlog(Schema::Stream, 2);
        b.accept([rec(1_000_000, 1), rec(1_000_001, 2), rec(1_000_002, 3)]);
        let p1 = b.plan().unwrap();
        let p2 = b.plan().unwrap();
        assert_eq!(stores(&p1).len(), 2);
        assert_eq!(stores(&p2).len(), 1);
        // Each pipeline's first record of a bucket creates it.
        assert!(stores(&p1)[0].2 && !stores(&p1)[1].2 && stores(&p2)[0].2);
        // The second pipeline answers first; the first one's answer is lost.
        let s2 = b.settle(p2.id, Ok(vec![Answer::Done]));
        assert_eq!(s2.stored, 1);
        let s1 = b.settle(p1.id, Err(()));
        assert!(s1.lost);
        assert_eq!(b.totals().written, 1);
        assert_eq!(b.unknown(), 2);
        // They are resent at their slots, in shorter pipelines while answers get lost.
        let mut again = Vec::new();
        while let Some(p) = b.plan() {
            again.extend(stores(&p).iter().map(|s| (s.1, s.3)));
            let n = p.cmds.len();
            b.settle(p.id, Ok(vec![Answer::Done; n]));
        }
        let first: Vec<_> = stores(&p1).iter().map(|s| (s.1, true)).collect();
        assert_eq!(again, first);
        assert_eq!(b.totals().written, 3);
    }

    #[test]
    fn a_refused_resend_is_read_back_before_it_counts() {
        let mut b = backlog(Schema::Stream, 10);
        b.accept([rec(1_000_000, 1), rec(1_000_000, 2)]);
        let p = b.plan().unwrap();
        let highest = stores(&p)[1].1;
        b.settle(p.id, Err(()));
        let p = b.plan().unwrap();
        b.settle(p.id, Ok(vec![Answer::NotAbove, Answer::NotAbove]));
        assert_eq!(b.totals().written, 0, "a refusal is not a store");
        let p = b.plan().unwrap();
        assert!(matches!(p.cmds[0], Cmd::Check { .. }));
        let ours = Some((1_000_000, 1));
        let s = b.settle(p.id, Ok(vec![Answer::Found(ours), Answer::Found(None)]));
        assert_eq!(s.stored, 1);
        // The absent one takes a new slot above every slot handed out.
        let p = b.plan().unwrap();
        let st = stores(&p);
        assert_eq!(st.len(), 1);
        assert!(!st[0].3 && st[0].1 > highest);
        b.settle(p.id, Ok(vec![Answer::Done]));
        assert_eq!(b.totals().written, 2);
        assert!(b.is_empty());
    }

    #[test]
    fn a_first_attempt_below_the_top_learns_the_top_and_jumps_past_it() {
        let mut b = backlog(Schema::Stream, 10);
        b.accept([rec(1_000_000, 1)]);
        let p = b.plan().unwrap();
        b.settle(p.id, Ok(vec![Answer::NotAbove]));
        let p = b.plan().unwrap();
        assert_eq!(
            p.cmds,
            vec![Cmd::Top {
                bucket: Bucket { sec: 1, stripe: 0 }
            }]
        );
        let top = Slot {
            major: 1500,
            seq: 7,
        };
        b.settle(p.id, Ok(vec![Answer::Top(Some(top))]));
        let p = b.plan().unwrap();
        assert!(stores(&p)[0].1 > top);
    }

    #[test]
    fn keys_nil_on_a_resend_is_read_back_and_on_a_first_attempt_is_not_ours() {
        let mut b = backlog(Schema::Keys, 10);
        b.accept([rec(1_000_000, 1)]);
        let p = b.plan().unwrap();
        let first = stores(&p)[0].1;
        b.settle(p.id, Ok(vec![Answer::Nil]));
        assert_eq!(b.totals().written, 0, "someone else's key");
        let p = b.plan().unwrap();
        let second = stores(&p)[0].1;
        assert!(second > first);
        b.settle(p.id, Err(()));
        let p = b.plan().unwrap();
        assert_eq!(stores(&p)[0].1, second);
        b.settle(p.id, Ok(vec![Answer::Nil]));
        assert_eq!(b.totals().written, 0, "not without reading it back");
        let p = b.plan().unwrap();
        assert_eq!(p.cmds, vec![Cmd::Check { h: 0, slot: second }]);
        b.settle(p.id, Ok(vec![Answer::Found(Some((1_000_000, 1)))]));
        assert_eq!(b.totals().written, 1, "our earlier attempt stored it");
    }

    #[test]
    fn packed_entries_hold_one_second_each_and_a_resend_is_the_same_bytes() {
        let mut b = backlog(Schema::Packed, 10);
        b.accept([
            rec(1_000_000, 1),
            rec(1_000_500, 2),
            rec(1_999_999, 3),
            rec(2_000_000, 4),
        ]);
        let p = b.plan().unwrap();
        let st = stores(&p);
        assert_eq!(st.len(), 2, "one entry per second");
        assert_eq!(b.entry(st[0].0).len(), 3);
        assert_eq!(b.entry(st[1].0).len(), 1);
        assert!(st[0].2 && st[1].2, "each creates its bucket");
        let sent = b.pipeline(&p).get_packed_pipeline();
        b.settle(p.id, Err(()));
        assert_eq!(b.unknown(), 4, "counted per record");
        let again = b.plan().unwrap();
        assert_eq!(b.pipeline(&again).get_packed_pipeline(), sent);
        b.settle(again.id, Ok(vec![Answer::Done, Answer::NotAbove]));
        assert_eq!(b.totals().written, 3);
        // The refused resend is read back by its first record, then written at a new slot.
        let p = b.plan().unwrap();
        b.settle(p.id, Ok(vec![Answer::Found(None)]));
        let p = b.plan().unwrap();
        let n = p.cmds.len();
        b.settle(p.id, Ok(vec![Answer::Done; n]));
        assert_eq!(b.totals().written, 4);
        assert!(b.is_empty());
    }

    #[test]
    fn on_a_cluster_each_pipeline_takes_the_next_stripe_and_an_entry_keeps_its_own() {
        for schema in [Schema::Stream, Schema::Packed] {
            let layout = Layout::new(schema, "t", "a", 10_000).for_cluster("t", "a");
            let mut b = Backlog::new(
                layout,
                2,
                OnFull::DropOldest,
                Arc::new(Budget::new(1 << 20)),
            );
            // Two records a second, so a packed pipeline also holds two entries.
            b.accept((0..32u16).map(|i| rec(1_000_000 + u64::from(i / 2) * 1_000_000, i + 1)));
            let keys = |b: &Backlog, p: &Plan| -> Vec<(Handle, Slot, Vec<u8>)> {
                let args = crate::layout::tests::args(&b.pipeline(p));
                stores(p)
                    .iter()
                    .zip(args)
                    .map(|(s, a)| (s.0, s.1, a[if a[0] == b"EVAL" { 3 } else { 1 }].clone()))
                    .collect()
            };
            let mut seen = Vec::new();
            let mut lost: Vec<(Handle, Slot, Vec<u8>)> = Vec::new();
            let mut resent = Vec::new();
            while let Some(p) = b.plan() {
                let sent = keys(&b, &p);
                if stores(&p).iter().any(|s| s.3) {
                    // A resend goes with the entries it was formed with (and may share its
                    // pipeline with new entries, on the next stripe).
                    resent.extend(sent.into_iter().filter(|k| lost.iter().any(|l| l.0 == k.0)));
                    if let Some(new) = stores(&p).iter().find(|s| !s.3) {
                        seen.push(b.stripe(new.0));
                    }
                } else {
                    let slot = crate::connect::cluster::hash_slot(&sent[0].2);
                    assert!(
                        sent.iter()
                            .all(|k| crate::connect::cluster::hash_slot(&k.2) == slot),
                        "one hash slot a pipeline"
                    );
                    seen.push(b.stripe(stores(&p)[0].0));
                }
                let n = p.cmds.len();
                // The fourth pipeline's answer is lost: it is resent to the same keys.
                if seen.len() == 4 && lost.is_empty() {
                    lost = keys(&b, &p);
                    b.settle(p.id, Err(()));
                } else {
                    b.settle(p.id, Ok(vec![Answer::Done; n]));
                }
            }
            assert_eq!(resent, lost, "resent at the same slots and keys");
            assert_eq!(b.totals().written, 32);
            // Every stripe in turn, consecutive pipelines far apart.
            let mut all = seen.clone();
            all.sort_unstable();
            all.dedup();
            assert_eq!(
                all.len(),
                crate::connect::cluster::STRIPES,
                "{schema:?} {seen:?}"
            );
            assert!(seen.windows(2).all(|w| w[0] != w[1]));
        }
    }

    #[test]
    fn on_a_cluster_records_spread_evenly_over_the_stripes_whatever_the_pipeline_sizes() {
        let layout = Layout::new(Schema::Stream, "t", "a", 10_000).for_cluster("t", "a");
        let mut b = Backlog::new(
            layout,
            8,
            OnFull::DropOldest,
            Arc::new(Budget::new(1 << 20)),
        );
        let stripes = crate::connect::cluster::STRIPES;
        let mut per = vec![0u64; stripes];
        let mut port = 0u16;
        // Pipelines of 8 and 1 records in turn: a plain rotation would give every other stripe
        // eight times the records of the rest.
        for i in 0..256 {
            let n = if i % 2 == 0 { 8 } else { 1 };
            b.accept((0..n).map(|_| {
                port += 1;
                rec(1_000_000 + u64::from(port), port)
            }));
            let p = b.plan().unwrap();
            for s in stores(&p) {
                per[usize::from(b.stripe(s.0))] += 1;
            }
            let n = p.cmds.len();
            b.settle(p.id, Ok(vec![Answer::Done; n]));
        }
        let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
        assert!(hi - lo <= 8, "records per stripe {per:?}");
    }

    #[test]
    fn drops_say_whether_a_copy_may_be_in_redis() {
        let mut b = backlog(Schema::Stream, 1);
        b.accept([rec(1_000_000, 1), rec(1_000_000, 2)]);
        let p = b.plan().unwrap();
        b.settle(p.id, Err(()));
        assert_eq!(b.drop_expired(1_000 + 10_000), 2);
        let t = b.totals();
        assert_eq!(t.dropped[DropReason::Unknown as usize], 1);
        assert_eq!(t.dropped[DropReason::Expired as usize], 1);
        assert!(b.is_empty());
    }

    #[test]
    fn a_down_backlog_holds_its_records_in_the_budget() {
        let budget = Arc::new(Budget::new(4 * crate::buffer::RECORD_COST));
        let layout = Layout::new(Schema::Stream, "t", "a", 10_000);
        let mut b = Backlog::new(layout, 2, OnFull::DropOldest, budget.clone());
        b.accept([rec(1_000_000, 1)]);
        b.set_up(false);
        assert_eq!(budget.used(), 1);
        b.accept((2..=6).map(|p| rec(1_000_000 + p as u64, p)));
        assert_eq!(budget.used(), 4);
        assert_eq!(b.totals().dropped[DropReason::Overflow as usize], 2);
        b.set_up(true);
        while let Some(p) = b.plan() {
            let n = p.cmds.len();
            b.settle(p.id, Ok(vec![Answer::Done; n]));
        }
        assert_eq!(budget.used(), 0);
        assert_eq!(b.totals().written, 4);
    }
}
