//! Redis sink: one writer task per backend that batches, pipelines, retries and watches health.
//!
//! Owns: the connection to one backend, its health verdict ([`health::Tracker`]), the slots
//! (stream IDs / key names) of the records it writes, trimming, and the written / error /
//! dropped accounting of those records.
//!
//! Every record handed to a writer ends in exactly one of: written (`records_written`), or
//! dropped with a reason — `expired` (retention passed before it could be written), `overflow`
//! (it waited in a full buffer), `shutdown` (the grace period ran out). A batch is one pipeline;
//! a retry resends only what did not succeed, so nothing is stored twice (see [`State`]).
//!
//! Up to [`WINDOW`] pipelines are in flight at once on the backend's one connection, so Redis
//! works on one batch while the writer builds the next.
//!
//! While its backend is up a writer takes a few batches at a time from its queue, so a slow Redis
//! slows the balancer and, through the record queue, capture (backpressure). While it is down it
//! keeps what it holds, PINGs until the backend is back, and — in `hold` mode, where records
//! keep coming — takes more only within the shared buffer budget.
//!
//! A writer never calls back into capture or the balancer.

pub mod schema;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Pipeline, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::buffer::{Budget, OnFull};
use crate::health::{self, Board, Transition};
use crate::metrics::{BackendMetrics, DropReason, Metrics};
use crate::record::{now_us, Record};
use schema::{parse_stream_id, Layout, Slot};

/// How often upkeep runs: trimming the stream, evicting expired records, probing. Retention is
/// promised to ±1 s, so this leaves margin for a round trip.
const TICK: Duration = Duration::from_millis(250);
/// Bounds of the retry backoff while the backend is up.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// An up backend with no writes for this long is PINGed.
const IDLE_PING: Duration = Duration::from_millis(500);

/// Pipelines in flight at once per backend.
pub const WINDOW: usize = 2;
/// A partial batch waits at most this long for more records before it is sent. Fewer, fuller
/// pipelines cost Redis far less per record (measured: ~11 µs of Redis CPU per record at one
/// record per pipeline, ~2 µs at hundreds); the wait stays well inside the latency goal
/// (p99 capture → visible under 10 ms).
const LINGER: Duration = Duration::from_millis(2);

/// The answer to one pipeline, as it arrives.
type Reply = Pin<Box<dyn Future<Output = redis::RedisResult<Vec<Value>>> + Send>>;

/// The error XADD gives for an ID at or below the stream's top: the entry was stored by an
/// earlier attempt whose answer was lost.
const XADD_DUPLICATE: &str = "equal or smaller than the target stream top item";

/// What a writer shares with the rest of the daemon.
#[derive(Clone)]
pub struct WriterContext {
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Up/down of every backend.
    pub board: Arc<Board>,
    /// The bound on waiting records.
    pub budget: Arc<Budget>,
    /// What to do when the budget is full.
    pub on_full: OnFull,
    /// Health thresholds.
    pub health: health::HealthConfig,
    /// Most records per pipelined batch.
    pub batch_size: usize,
}

/// One backend's writer.
pub struct Writer {
    name: String,
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    layout: Layout,
    /// Whether `layout` has been told the newest slot already in Redis.
    resumed: bool,
    /// Newest capture (ms) stored by this writer: the stream expires with it.
    newest_ms: u64,
    metrics: BackendMetrics,
    ctx: WriterContext,
    tracker: health::Tracker,
    /// Records waiting here, oldest first.
    pending: VecDeque<Pending>,
    /// How many of `pending` are counted in the shared budget.
    budgeted: usize,
    /// No write attempt before this (backoff).
    next_try: Instant,
    backoff: Duration,
    /// Last time the backend answered anything.
    last_ok: Instant,
    /// Pipelines sent and not yet answered, oldest first, with their chunk number.
    inflight: VecDeque<(u64, Reply)>,
    /// Number of the next chunk sent.
    next_chunk: u64,
    /// A chunk failed: send nothing more until every chunk in flight has settled, so a retry
    /// never overtakes the first attempt.
    draining: bool,
    /// Since when unsent records have been waiting.
    waiting_since: Option<Instant>,
}

/// A record waiting to be written.
struct Pending {
    rec: Record,
    state: State,
}

/// Where a pending record stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Never sent, or refused by Redis (so surely not stored): takes a new slot when sent.
    New,
    /// Sent at this slot with no answer (connection lost, timeout): it may be stored, so it is
    /// resent at the same slot, where a second copy is refused.
    Unknown(Slot),
    /// In the pipeline of chunk `chunk`; `retry` if an earlier attempt may have stored it.
    InFlight { slot: Slot, retry: bool, chunk: u64 },
    /// Stored.
    Stored,
}

impl Writer {
    /// A writer for backend number `idx`. Connects lazily.
    pub fn new(
        idx: usize,
        name: String,
        client: redis::Client,
        layout: Layout,
        ctx: WriterContext,
    ) -> Self {
        let now = Instant::now();
        Writer {
            name,
            client,
            conn: None,
            layout,
            resumed: false,
            newest_ms: 0,
            metrics: ctx.metrics.backends[idx].clone(),
            tracker: health::Tracker::new(ctx.health, idx),
            ctx,
            pending: VecDeque::new(),
            budgeted: 0,
            next_try: now,
            backoff: BACKOFF_MIN,
            last_ok: now,
            inflight: VecDeque::new(),
            next_chunk: 0,
            draining: false,
            waiting_since: None,
        }
    }

    /// Write every batch from `rx` until it closes and all is written or dropped. `abort` (end
    /// of the shutdown grace period) drops what is left, counted as `shutdown`.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<Record>>, abort: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closed = false;
        loop {
            if abort.is_cancelled() && !self.pending.is_empty() {
                warn!(backend = %self.name, records = self.pending.len(),
                      "grace period over; records not written");
                let n = self.pending.len();
                self.forget(n, DropReason::Shutdown);
            }
            if self.can_launch() {
                self.launch().await;
                continue;
            }
            if closed && self.pending.is_empty() && self.inflight.is_empty() {
                break;
            }
            let take = !closed && self.has_room();
            let launch_at = self.launch_at();
            let waiting = self.tracker.is_up()
                && !self.draining
                && self.inflight.len() < WINDOW
                && self.unsent() > 0;
            let answer = async {
                match self.inflight.front_mut() {
                    Some((chunk, reply)) => (*chunk, reply.await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                (chunk, result) = answer => {
                    self.inflight.pop_front();
                    self.settle(chunk, result);
                }
                batch = rx.recv(), if take => match batch {
                    Some(batch) => self.accept(batch),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(launch_at), if waiting => {}
                _ = tick.tick() => self.upkeep().await,
                _ = abort.cancelled(), if !abort.is_cancelled() => {}
            }
        }
        debug!(backend = %self.name, "writer finished");
    }

    /// Whether to take another batch from the queue now.
    fn has_room(&self) -> bool {
        if self.tracker.is_up() {
            self.pending.len() < self.ctx.batch_size * WINDOW
        } else {
            self.ctx.on_full == OnFull::DropOldest || self.ctx.budget.has_room(self.ctx.batch_size)
        }
    }

    /// Queue a batch from the balancer. While down, it counts against the buffer budget, and in
    /// drop-oldest mode a full budget evicts this writer's oldest records.
    fn accept(&mut self, batch: Vec<Record>) {
        let n = batch.len();
        self.waiting_since.get_or_insert_with(Instant::now);
        self.pending.extend(batch.into_iter().map(|rec| Pending {
            rec,
            state: State::New,
        }));
        if !self.tracker.is_up() {
            self.ctx.budget.take(n);
            self.budgeted += n;
            let over = self
                .ctx
                .budget
                .used()
                .saturating_sub(self.ctx.budget.max_records())
                .min(self.pending.len());
            if over > 0 {
                self.forget(over, DropReason::Overflow);
            }
        }
    }

    /// Drop the `n` oldest pending records for `reason`.
    fn forget(&mut self, n: usize, reason: DropReason) {
        self.pending.drain(..n);
        self.ctx.metrics.dropped(reason, n as u64);
        self.release(n);
    }

    /// `n` pending records left; give back their share of the budget.
    fn release(&mut self, n: usize) {
        let back = n.min(self.budgeted);
        self.budgeted -= back;
        self.ctx.budget.release(back);
    }

    /// Records waiting for a pipeline (not in flight).
    fn unsent(&self) -> usize {
        self.pending
            .iter()
            .filter(|p| matches!(p.state, State::New | State::Unknown(_)))
            .count()
    }

    /// Whether to send another pipeline now.
    fn can_launch(&self) -> bool {
        self.tracker.is_up()
            && !self.draining
            && self.inflight.len() < WINDOW
            && Instant::now() >= self.launch_at()
            && self.unsent() > 0
    }

    /// When the unsent records may go: at once when a batch is full, else [`LINGER`] after the
    /// first of them arrived; never before the retry backoff ends.
    fn launch_at(&self) -> Instant {
        let linger = match self.waiting_since {
            Some(t) if self.unsent() < self.ctx.batch_size => t + LINGER,
            _ => self.next_try,
        };
        linger.max(self.next_try)
    }

    /// Build and send a pipeline of the oldest unsent records (at most one batch) and, now and
    /// then, the stream key's expiry.
    /// Its answer is settled later, in order, by [`settle`](Self::settle).
    async fn launch(&mut self) {
        self.drop_expired();
        let mut conn = match self.connect().await {
            Ok(c) => c.clone(),
            Err(e) => {
                self.metrics.write_errors.inc();
                warn!(backend = %self.name, error = %e, "cannot connect; will retry");
                self.conn = None;
                self.failed();
                self.judge(false);
                return;
            }
        };
        let chunk = self.next_chunk;
        self.next_chunk += 1;
        let mut pipe = Pipeline::with_capacity(self.ctx.batch_size + 2);
        let mut newest = self.newest_ms;
        let mut n = 0;
        for p in self.pending.iter_mut() {
            if n == self.ctx.batch_size {
                break;
            }
            let (slot, retry) = match p.state {
                State::New => (self.layout.next_slot(&p.rec), false),
                State::Unknown(slot) => (slot, true),
                _ => continue,
            };
            p.state = State::InFlight { slot, retry, chunk };
            self.layout.push_store(&mut pipe, &p.rec, slot);
            newest = newest.max(p.rec.ts_ms());
            n += 1;
        }
        if n == 0 {
            return;
        }
        self.waiting_since = (self.unsent() > 0).then(Instant::now);
        self.layout.push_expiry(&mut pipe, newest);
        self.newest_ms = newest;
        self.metrics.batches.inc();
        let timeout = self.tracker.config().timeout;
        let mut reply: Reply = Box::pin(async move {
            let len = pipe.len();
            with_timeout(timeout, conn.req_packed_commands(&pipe, 0, len)).await
        });
        // Poll once now: that queues the pipeline on the connection, so pipelines go out in the
        // order they were built even though their answers are awaited later.
        let waker = std::task::Waker::noop();
        if let std::task::Poll::Ready(result) = reply
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
        {
            reply = Box::pin(std::future::ready(result));
        }
        self.inflight.push_back((chunk, reply));
    }

    /// Settle the records of `chunk` from its answer: stored records leave; records Redis
    /// refused are retried with a new slot; if the answer was lost (connection error, timeout)
    /// they are retried at the same slot.
    fn settle(&mut self, chunk: u64, result: redis::RedisResult<Vec<Value>>) {
        let in_chunk =
            |p: &Pending| matches!(p.state, State::InFlight { chunk: c, .. } if c == chunk);
        let ok = match result {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                let mut refused = None;
                for p in self.pending.iter_mut().filter(|p| in_chunk(p)) {
                    let State::InFlight { retry, .. } = p.state else {
                        unreachable!()
                    };
                    p.state = match replies.next() {
                        Some(Value::ServerError(e)) => {
                            let duplicate = e.details().is_some_and(|d| d.contains(XADD_DUPLICATE));
                            if duplicate && retry {
                                // An earlier attempt stored it; its answer was lost.
                                State::Stored
                            } else {
                                // Refused: surely not stored. (A duplicate on a first attempt
                                // means a later pipeline overtook this one: take a new ID.)
                                if !duplicate {
                                    refused.get_or_insert_with(|| format!("{e:?}"));
                                }
                                State::New
                            }
                        }
                        Some(_) => State::Stored,
                        None => State::New,
                    };
                }
                let before = self.pending.len();
                self.pending.retain(|p| p.state != State::Stored);
                let stored = before - self.pending.len();
                self.release(stored);
                self.metrics.written.inc_by(stored as u64);
                let clean = refused.is_none();
                if let Some(e) = refused {
                    self.metrics.write_errors.inc();
                    warn!(backend = %self.name, error = %e, "Redis refused records; will retry");
                }
                stored > 0 || clean
            }
            Err(e) => {
                self.layout.expiry_unknown();
                for p in self.pending.iter_mut().filter(|p| in_chunk(p)) {
                    if let State::InFlight { slot, .. } = p.state {
                        p.state = State::Unknown(slot);
                    }
                }
                self.metrics.write_errors.inc();
                warn!(backend = %self.name, error = %e, "write failed; will retry");
                self.conn = None;
                false
            }
        };
        if ok {
            self.last_ok = Instant::now();
            self.backoff = BACKOFF_MIN;
        } else {
            self.failed();
        }
        if self.inflight.is_empty() {
            self.draining = false;
        }
        self.judge(ok);
    }

    /// After a failure: back off, and send nothing until what is in flight has settled.
    fn failed(&mut self) {
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.draining = !self.inflight.is_empty();
    }

    /// Periodic work: evict expired records, trim an idle stream, PING an idle or down backend.
    async fn upkeep(&mut self) {
        self.drop_expired();
        let idle = self.last_ok.elapsed() >= IDLE_PING;
        if !self.tracker.is_up() || (idle && self.pending.is_empty()) {
            let ok = self.ping().await;
            if ok {
                self.last_ok = Instant::now();
            }
            if self.judge(ok) == Some(Transition::Up) {
                self.next_try = Instant::now();
                self.backoff = BACKOFF_MIN;
            }
        }
        if self.tracker.is_up() && self.layout.schema == crate::config::Schema::Stream {
            self.trim().await;
        }
    }

    /// Record an outcome with the health tracker and log a transition.
    fn judge(&mut self, ok: bool) -> Option<Transition> {
        let t = self.tracker.record(ok, &self.ctx.board);
        if t == Some(Transition::Down) {
            // What it holds now waits for it: count it against the buffer budget.
            let extra = self.pending.len().saturating_sub(self.budgeted);
            self.ctx.budget.take(extra);
            self.budgeted += extra;
        }
        match t {
            Some(Transition::Down) => error!(
                backend = %self.name, waiting = self.pending.len(),
                "backend DOWN: routing around it until it answers again"
            ),
            Some(Transition::Up) => info!(
                backend = %self.name, waiting = self.pending.len(),
                "backend UP again"
            ),
            None => {}
        }
        t
    }

    /// Probe the backend: PING while it is up; while it is down, a small expiring write, since a
    /// Redis that refuses writes (OOM, read-only replica) still answers PING and would otherwise
    /// flap between up and down.
    async fn ping(&mut self) -> bool {
        let probe = if self.tracker.is_up() {
            redis::cmd("PING")
        } else {
            let mut c = redis::cmd("SET");
            c.arg(&self.layout.probe_key).arg(1).arg("PX").arg(2000);
            c
        };
        let result: redis::RedisResult<()> = async {
            let mut conn = self.connect().await?.clone();
            let answer: String =
                with_timeout(self.tracker.config().timeout, probe.query_async(&mut conn)).await?;
            debug!(backend = %self.name, %answer, "probe");
            Ok(())
        }
        .await;
        if let Err(e) = &result {
            debug!(backend = %self.name, error = %e, "ping failed");
            self.conn = None;
        }
        result.is_ok()
    }

    /// The connection, made if needed. On a fresh stream connection, learn the newest entry so
    /// new IDs continue after it.
    async fn connect(&mut self) -> redis::RedisResult<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            let t = self.tracker.config().timeout;
            let cfg = AsyncConnectionConfig::new()
                .set_connection_timeout(t)
                .set_response_timeout(t);
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?;
            if !self.resumed && self.layout.schema == crate::config::Schema::Stream {
                let newest: Value = redis::cmd("XREVRANGE")
                    .arg(&self.layout.key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await?;
                if let Some(slot) = newest_stream_id(&newest) {
                    self.layout.resume_after(slot);
                }
            }
            self.resumed = true;
            debug!(backend = %self.name, "connected");
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// Trim the stream so entries leave on time — the only trim, every tick: a trim per batch
    /// cost Redis as much as a few XADDs for nothing.
    async fn trim(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mut conn = conn.clone();
        let mut pipe = Pipeline::new();
        self.layout.push_trim(&mut pipe, now_us() / 1000);
        if let Err(e) =
            with_timeout(self.tracker.config().timeout, pipe.exec_async(&mut conn)).await
        {
            debug!(backend = %self.name, error = %e, "trim failed");
            self.conn = None;
        }
    }

    fn drop_expired(&mut self) {
        let now_ms = now_us() / 1000;
        // Records are queued in capture order, so the expired ones are at the front; a record
        // that may already be stored (`Sent`) is kept until its fate is known.
        let n = self
            .pending
            .iter()
            .take_while(|p| p.state == State::New && self.layout.is_expired(&p.rec, now_ms))
            .count();
        if n > 0 {
            warn!(backend = %self.name, records = n, "records past retention dropped");
            self.forget(n, DropReason::Expired);
        }
    }
}

/// Bound a Redis round trip by the health timeout (a hung server never answers).
async fn with_timeout<T>(
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "timed out waiting for Redis",
        ))),
    }
}

/// The ID of the single entry in an `XREVRANGE … COUNT 1` answer.
fn newest_stream_id(v: &Value) -> Option<Slot> {
    let Value::Array(entries) = v else {
        return None;
    };
    let Value::Array(entry) = entries.first()? else {
        return None;
    };
    match entry.first()? {
        Value::BulkString(id) => parse_stream_id(std::str::from_utf8(id).ok()?),
        Value::SimpleString(id) => parse_stream_id(id),
        _ => None,
    }
}
