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
//! keeps what it holds, probes until the backend is back, and — in `hold` mode, where records
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
/// pipelines cost Redis far less per record (measured in connections mode: ~11 µs of Redis CPU
/// per record at one record per pipeline, 2.5–5 µs with this linger); the wait stays well inside
/// the latency goal
/// (p99 capture → visible under 10 ms).
const LINGER: Duration = Duration::from_millis(2);

/// The answer to one pipeline, as it arrives.
type Reply = Pin<Box<dyn Future<Output = redis::RedisResult<Vec<Value>>> + Send>>;

/// The outcome of one tick's Redis work (probe and/or trim), as it arrives: whether a probe was
/// made and how it went, whether the work failed, and the connection it made, if any.
struct TickOutcome {
    probe: Option<bool>,
    failed: bool,
    conn: Option<MultiplexedConnection>,
    /// `conn_gen` of the connection the job started with.
    conn_gen: u64,
}
type TickJob = Pin<Box<dyn Future<Output = TickOutcome> + Send>>;

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
    /// Bumped whenever `conn` is replaced, so a tick job that failed on an old connection does
    /// not throw away a newer one.
    conn_gen: u64,
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
    inflight: VecDeque<(u64, usize, Reply)>,
    /// Number of the next chunk sent.
    next_chunk: u64,
    /// A chunk failed: send nothing more until every chunk in flight has settled, so a retry
    /// never overtakes the first attempt.
    draining: bool,
    /// Since when unsent records have been waiting.
    waiting_since: Option<Instant>,
    /// Records in `pending` that are `New` or `Unknown` (kept as a count: the hot path must not
    /// scan a backlog that may hold millions of records while a backend is down).
    unsent: usize,
    /// How many of those are `Unknown`.
    unknown: usize,
    /// The tick's probe/trim, running beside the writes (a hung Redis must not stop this
    /// writer from taking records off its queue).
    tick_job: Option<TickJob>,
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
            conn_gen: 0,
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
            unsent: 0,
            unknown: 0,
            tick_job: None,
        }
    }

    /// Write every batch from `rx` until it closes and all is written or dropped. `abort` (end
    /// of the shutdown grace period) drops what is left, counted as `shutdown`.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<Record>>, abort: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closed = false;
        loop {
            if abort.is_cancelled() && self.unsent > 0 {
                // What is in flight settles first (its answer is at most one timeout away).
                warn!(backend = %self.name, records = self.unsent,
                      "grace period over; records not written");
                self.forget(usize::MAX, DropReason::Shutdown);
            }
            if self.can_launch() {
                self.launch().await;
                continue;
            }
            if closed && self.pending.is_empty() && self.inflight.is_empty() {
                break;
            }
            // Once the grace period is over, take everything (and drop it, counted) so that
            // nothing upstream stays blocked on this writer.
            let take = !closed && (self.has_room() || abort.is_cancelled());
            let launch_at = self.launch_at();
            let waiting = self.tracker.is_up()
                && !self.draining
                && self.inflight.len() < WINDOW
                && self.unsent > 0;
            let answer = async {
                match self.inflight.front_mut() {
                    Some((chunk, len, reply)) => ((*chunk, *len), reply.await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                ((chunk, len), result) = answer => {
                    self.inflight.pop_front();
                    self.settle(chunk, len, result);
                }
                batch = rx.recv(), if take => match batch {
                    Some(batch) => self.accept(batch),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(launch_at), if waiting => {}
                _ = tick.tick() => self.upkeep(),
                outcome = async {
                    match self.tick_job.as_mut() {
                        Some(job) => job.await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.tick_job = None;
                    self.tick_done(outcome);
                }
                _ = abort.cancelled(), if !abort.is_cancelled() => {}
            }
        }
        debug!(backend = %self.name, "writer finished");
    }

    /// Whether to take another batch from the queue now.
    fn has_room(&self) -> bool {
        // (In hold mode with the budget full, this is what makes records wait upstream.)
        if self.tracker.is_up() {
            self.pending.len() < self.ctx.batch_size * WINDOW
        } else {
            self.ctx.on_full == OnFull::DropOldest || self.ctx.budget.has_room(self.ctx.batch_size)
        }
    }

    /// Queue a batch from the balancer. While down, it counts against the buffer budget, and in
    /// drop-oldest mode a full budget evicts this writer's oldest records. (In wait mode
    /// [`has_room`](Self::has_room) already held the batch back, so nothing is evicted.)
    fn accept(&mut self, batch: Vec<Record>) {
        let n = batch.len();
        self.waiting_since.get_or_insert_with(Instant::now);
        self.pending.extend(batch.into_iter().map(|rec| Pending {
            rec,
            state: State::New,
        }));
        self.unsent += n;
        if !self.tracker.is_up() {
            self.ctx.budget.take(n);
            self.budgeted += n;
        }
        if !self.tracker.is_up() && self.ctx.on_full == OnFull::DropOldest {
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

    /// Drop the `n` oldest records that are not in flight, for `reason`. (A record in flight
    /// stays until its answer says whether it was stored.)
    fn forget(&mut self, n: usize, reason: DropReason) {
        let mut gone = 0;
        let mut unknown_gone = 0;
        self.pending.retain(|p| {
            let drop = gone < n && matches!(p.state, State::New | State::Unknown(_));
            gone += usize::from(drop);
            unknown_gone += usize::from(drop && matches!(p.state, State::Unknown(_)));
            !drop
        });
        self.unsent -= gone;
        self.unknown -= unknown_gone;
        if self.unsent == 0 {
            self.waiting_since = None;
        }
        self.ctx.metrics.dropped(reason, gone as u64);
        self.release(gone);
    }

    /// `n` pending records left; give back their share of the budget.
    fn release(&mut self, n: usize) {
        let back = n.min(self.budgeted);
        self.budgeted -= back;
        self.ctx.budget.release(back);
    }

    /// Whether to send another pipeline now.
    fn can_launch(&self) -> bool {
        self.tracker.is_up()
            && !self.draining
            && self.inflight.len() < WINDOW
            && Instant::now() >= self.launch_at()
            && self.unsent > 0
    }

    /// When the unsent records may go: at once when a batch is full, else [`LINGER`] after the
    /// first of them arrived; never before the retry backoff ends.
    fn launch_at(&self) -> Instant {
        let linger = match self.waiting_since {
            Some(t) if self.unsent < self.ctx.batch_size => t + LINGER,
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
        // Records whose earlier attempt may have stored them go first, at their old IDs (which
        // grow in queue order), so that no new ID above them reaches Redis before them: it
        // would make their resend look like a duplicate.
        let mut unknown_left = self.unknown;
        for retry in [true, false] {
            for p in self.pending.iter_mut() {
                if n == self.ctx.batch_size || (retry && unknown_left == 0) {
                    break;
                }
                let slot = match (p.state, retry) {
                    (State::Unknown(slot), true) => {
                        unknown_left -= 1;
                        slot
                    }
                    (State::New, false) => self.layout.next_slot(&p.rec),
                    _ => continue,
                };
                p.state = State::InFlight { slot, retry, chunk };
                self.layout.push_store(&mut pipe, &p.rec, slot);
                newest = newest.max(p.rec.ts_ms());
                n += 1;
            }
        }
        self.unsent -= n;
        let unknown_taken = self.unknown - unknown_left;
        self.unknown = unknown_left;
        if n == 0 {
            return;
        }
        self.waiting_since = (self.unsent > 0).then(Instant::now);
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
        if let Some(result) = crate::poll_once(reply.as_mut()) {
            reply = Box::pin(std::future::ready(result));
        }
        self.inflight.push_back((chunk, n, reply));
        if unknown_taken > 0 {
            // Nothing more goes out until this resend is answered: a pipeline of new IDs
            // stored beside it could make a refused resend look like a duplicate later.
            self.draining = true;
        }
    }

    /// Settle the records of `chunk` from its answer: stored records leave; a record Redis
    /// refused is retried with a new slot on a first attempt, at its old slot on a resend (an
    /// earlier attempt may have stored it); if the answer was lost (connection error, timeout)
    /// the records are retried at the same slot.
    fn settle(&mut self, chunk: u64, len: usize, result: redis::RedisResult<Vec<Value>>) {
        let in_chunk =
            |p: &Pending| matches!(p.state, State::InFlight { chunk: c, .. } if c == chunk);
        let ok = match result {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                let mut refused = None;
                // The chunk's records lie in a prefix of the queue (only in-flight and refused
                // records are ahead of them): find them without walking a long backlog.
                let mut left = len;
                let mut end = 0;
                for (i, p) in self.pending.iter_mut().enumerate() {
                    if left == 0 {
                        break;
                    }
                    if !in_chunk(p) {
                        continue;
                    }
                    left -= 1;
                    end = i + 1;
                    let State::InFlight { retry, .. } = p.state else {
                        unreachable!()
                    };
                    let State::InFlight { slot, .. } = p.state else {
                        unreachable!()
                    };
                    p.state = match replies.next() {
                        Some(Value::ServerError(e)) => {
                            let duplicate = e.details().is_some_and(|d| d.contains(XADD_DUPLICATE));
                            if !duplicate {
                                refused.get_or_insert_with(|| format!("{e:?}"));
                            }
                            match (duplicate, retry) {
                                // An earlier attempt stored it; its answer was lost.
                                (true, true) => State::Stored,
                                // Refused now, but an earlier attempt may have stored it: keep
                                // its ID, where a second copy would be refused.
                                (false, true) => State::Unknown(slot),
                                // Surely not stored (a duplicate on a first attempt means a
                                // later pipeline overtook this one): take a new ID.
                                _ => State::New,
                            }
                        }
                        Some(_) => State::Stored,
                        None => State::New,
                    };
                    if p.state != State::Stored {
                        self.unsent += 1;
                    }
                    if matches!(p.state, State::Unknown(_)) {
                        self.unknown += 1;
                    }
                }
                let mut kept = Vec::new();
                let mut stored = 0;
                for p in self.pending.drain(..end) {
                    if p.state == State::Stored {
                        stored += 1;
                    } else {
                        kept.push(p);
                    }
                }
                for p in kept.into_iter().rev() {
                    self.pending.push_front(p);
                }
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
                for p in self.pending.iter_mut().filter(|p| in_chunk(p)).take(len) {
                    if let State::InFlight { slot, .. } = p.state {
                        p.state = State::Unknown(slot);
                        self.unsent += 1;
                        self.unknown += 1;
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

    /// Periodic work: evict expired records, and start the tick job beside the writes: trim the
    /// stream, PING an idle backend, probe a down one with a small expiring write.
    fn upkeep(&mut self) {
        self.drop_expired();
        if self.tick_job.is_some() {
            return; // the last one is still waiting for Redis
        }
        let idle = self.last_ok.elapsed() >= IDLE_PING;
        let up = self.tracker.is_up();
        let probe = if !up {
            // A Redis that refuses writes (OOM, read-only replica) still answers PING: while
            // down, test with a small expiring write, or it would flap between up and down.
            let mut c = redis::cmd("SET");
            c.arg(&self.layout.probe_key).arg(1).arg("PX").arg(2000);
            Some(c)
        } else if idle && self.pending.is_empty() {
            Some(redis::cmd("PING"))
        } else {
            None
        };
        let trim = (up && self.layout.schema == crate::config::Schema::Stream).then(|| {
            let mut pipe = Pipeline::new();
            self.layout.push_trim(&mut pipe, now_us() / 1000);
            pipe
        });
        if probe.is_none() && (trim.is_none() || self.conn.is_none()) {
            return;
        }
        let conn = self.conn.clone();
        let conn_gen = self.conn_gen;
        let client = self.client.clone();
        let timeout = self.tracker.config().timeout;
        self.tick_job = Some(Box::pin(async move {
            let mut outcome = TickOutcome {
                probe: None,
                failed: false,
                conn: None,
                conn_gen,
            };
            let mut conn = match conn {
                Some(c) => c,
                None => {
                    let cfg = AsyncConnectionConfig::new()
                        .set_connection_timeout(timeout)
                        .set_response_timeout(timeout);
                    match client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await
                    {
                        Ok(c) => {
                            outcome.conn = Some(c.clone());
                            c
                        }
                        Err(_) => {
                            outcome.probe = probe.is_some().then_some(false);
                            outcome.failed = true;
                            return outcome;
                        }
                    }
                }
            };
            if let Some(cmd) = probe {
                let ok = with_timeout(timeout, cmd.query_async::<String>(&mut conn))
                    .await
                    .is_ok();
                outcome.probe = Some(ok);
                outcome.failed |= !ok;
            }
            if let Some(pipe) = trim {
                outcome.failed |= with_timeout(timeout, pipe.exec_async(&mut conn))
                    .await
                    .is_err();
            }
            outcome
        }));
    }

    /// Take in the outcome of a tick's probe and trim.
    fn tick_done(&mut self, outcome: TickOutcome) {
        if outcome.failed {
            if outcome.conn_gen == self.conn_gen {
                self.conn = None;
            }
        } else if self.conn.is_none() && self.resumed && outcome.conn.is_some() {
            // (Before the first write, `connect` makes the connection: it also learns where the
            // stream's IDs stand.)
            self.conn = outcome.conn;
            self.conn_gen += 1;
        }
        if let Some(ok) = outcome.probe {
            if ok {
                self.last_ok = Instant::now();
            }
            if self.judge(ok) == Some(Transition::Up) {
                self.next_try = Instant::now();
                self.backoff = BACKOFF_MIN;
            }
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
            self.conn_gen += 1;
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn drop_expired(&mut self) {
        let now_ms = now_us() / 1000;
        // Records are queued in capture order, so the expired ones are at the front. Those in
        // flight stay until their answer; the others (never sent, or sent with the answer lost —
        // past retention, a stored copy is trimmed anyway) are dropped.
        let n = self
            .pending
            .iter()
            .take_while(|p| self.layout.is_expired(&p.rec, now_ms))
            .filter(|p| matches!(p.state, State::New | State::Unknown(_)))
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
