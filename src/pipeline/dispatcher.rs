//! The dispatcher: the task between the capture queue and the writers.
//!
//! Owns: taking records from the capture queue in batches, routing each one (through a
//! [`Router`]), handing each writer its share, and the records that wait meanwhile — held while
//! no backend can take them, or queued behind a writer that is full — within the buffer budget
//! and the retention window.
//!
//! Never: waits on one writer while another could take records, or loses a record silently
//! (every record is handed on or counted as dropped with a reason).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::balance::Router;
use crate::buffer::{Budget, OnFull};
use crate::health::Board;
use crate::metrics::{DropReason, Metrics};
use crate::record::{now_us, Record};

/// The dispatcher task: takes records from the capture queue, routes each one, and hands each
/// backend its share as one batch. While no backend can take records they wait here, bounded
/// by the buffer budget. Ends when the capture queue is closed and everything has been handed
/// on (or dropped once `abort` fires); dropping `writers` then lets each writer finish.
pub struct Dispatcher {
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

impl Dispatcher {
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
