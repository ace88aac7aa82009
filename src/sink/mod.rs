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
//! While its backend is up a writer takes one batch at a time from its queue, so a slow Redis
//! slows the balancer and, through the record queue, capture (backpressure). While it is down it
//! keeps what it holds, PINGs until the backend is back, and — in `hold` mode, where records
//! keep coming — takes more only within the shared buffer budget.
//!
//! A writer never calls back into capture or the balancer.

pub mod schema;

use std::collections::VecDeque;
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

/// How often upkeep runs: trimming an idle stream, evicting expired records, probing. Retention
/// is promised to ±1 s, so this leaves margin for a round trip.
const TICK: Duration = Duration::from_millis(250);
/// Bounds of the retry backoff while the backend is up.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// An up backend with no writes for this long is PINGed.
const IDLE_PING: Duration = Duration::from_millis(500);

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
    Sent(Slot),
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
            if self.tracker.is_up() && !self.pending.is_empty() && Instant::now() >= self.next_try {
                self.write_batch().await;
                continue;
            }
            if closed && self.pending.is_empty() {
                break;
            }
            let take = !closed && self.has_room();
            let retry_at = self.next_try;
            let retrying = self.tracker.is_up() && !self.pending.is_empty();
            tokio::select! {
                batch = rx.recv(), if take => match batch {
                    Some(batch) => self.accept(batch),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(retry_at), if retrying => {}
                _ = tick.tick() => self.upkeep().await,
                _ = abort.cancelled(), if !abort.is_cancelled() => {}
            }
        }
        debug!(backend = %self.name, "writer finished");
    }

    /// Whether to take another batch from the queue now.
    fn has_room(&self) -> bool {
        if self.tracker.is_up() {
            self.pending.len() < self.ctx.batch_size
        } else {
            self.ctx.on_full == OnFull::DropOldest || self.ctx.budget.has_room(self.ctx.batch_size)
        }
    }

    /// Queue a batch from the balancer. While down, it counts against the buffer budget, and in
    /// drop-oldest mode a full budget evicts this writer's oldest records.
    fn accept(&mut self, batch: Vec<Record>) {
        let n = batch.len();
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

    /// Send the oldest batch as one pipeline and settle each record: stored records leave,
    /// refused ones are retried with a new slot, and when the answer is lost (connection error,
    /// timeout) the whole batch is retried at the same slots.
    async fn write_batch(&mut self) {
        self.drop_expired();
        let n = self.pending.len().min(self.ctx.batch_size);
        if n == 0 {
            return;
        }
        let outcome = self.send(n).await;
        let ok = match outcome {
            Ok(refused) => {
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
            self.next_try = Instant::now() + self.backoff;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
        self.judge(ok);
    }

    /// Pipeline the first `n` pending records plus upkeep. `Ok(Some(err))`: Redis answered but
    /// refused some records (they are `New` again); `Err`: the answer was lost.
    async fn send(&mut self, n: usize) -> redis::RedisResult<Option<String>> {
        let mut conn = self.connect().await?.clone();
        let mut pipe = Pipeline::with_capacity(n + 2);
        let mut newest = self.newest_ms;
        for p in self.pending.iter_mut().take(n) {
            let slot = match p.state {
                State::Sent(slot) => slot,
                _ => self.layout.next_slot(&p.rec),
            };
            p.state = State::Sent(slot);
            self.layout.push_store(&mut pipe, &p.rec, slot);
            newest = newest.max(p.rec.ts_ms());
        }
        self.layout.push_upkeep(&mut pipe, now_us() / 1000, newest);
        self.metrics.batches.inc();
        let replies = self
            .with_timeout(conn.req_packed_commands(&pipe, 0, pipe.len()))
            .await?;
        let mut refused = None;
        for (p, reply) in self.pending.iter_mut().take(n).zip(replies) {
            match reply {
                Value::ServerError(e)
                    if !e.details().is_some_and(|d| d.contains(XADD_DUPLICATE)) =>
                {
                    p.state = State::New;
                    refused.get_or_insert_with(|| format!("{e:?}"));
                }
                _ => p.state = State::Stored,
            }
        }
        self.newest_ms = newest;
        Ok(refused)
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

    async fn ping(&mut self) -> bool {
        let result: redis::RedisResult<()> = async {
            let mut conn = self.connect().await?.clone();
            let pong: String = self
                .with_timeout(redis::cmd("PING").query_async(&mut conn))
                .await?;
            debug!(backend = %self.name, %pong, "ping");
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

    /// Bound a Redis round trip by the health timeout (a hung server never answers).
    async fn with_timeout<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        match tokio::time::timeout(self.tracker.config().timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "timed out waiting for Redis",
            ))),
        }
    }

    /// Trim the stream so entries leave on time even when nothing new arrives.
    async fn trim(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mut conn = conn.clone();
        let mut pipe = Pipeline::new();
        self.layout.push_trim(&mut pipe, now_us() / 1000);
        if let Err(e) = self.with_timeout(pipe.exec_async(&mut conn)).await {
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
