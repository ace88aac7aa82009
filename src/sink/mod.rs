//! Redis sink: one writer task per backend that batches, pipelines, retries and watches health.
//!
//! Owns: the connection to one backend, its health verdict ([`health::Tracker`]), the timing of
//! sends (linger, backoff), probes, and the publishing of the written / error / dropped counts
//! of its records. The exactly-once bookkeeping — which records wait, their slots, what each
//! pipeline carried and what its answers mean — is the pure [`backlog::Backlog`]; the writer is
//! the I/O loop around it: connect, send what the backlog plans, await, hand the answers back,
//! tick.
//!
//! Every record handed to a writer ends in exactly one of: written (`records_written`), or
//! dropped with a reason — `expired` (retention passed before it could be written), `overflow`
//! (it waited in a full buffer), `shutdown` (the grace period ran out), `unknown` (one of those,
//! while the answer to its last write was lost: it may be in Redis until its retention ends).
//!
//! Up to [`WINDOW`] pipelines are in flight at once on the backend's one connection, so Redis
//! works on one batch while the writer builds the next.
//!
//! While its backend is up a writer takes a few batches at a time from its queue, so a slow Redis
//! slows the dispatcher and, through the record queue, capture (backpressure). While it is down it
//! keeps what it holds, probes until the backend is back, and — in `hold` mode, where records
//! keep coming — takes more only within the shared buffer budget. It writes only while the board
//! clears it ([`Board::may_write`]: this agent's lease there is held, and the backend is not
//! excluded); until then it probes, and counts as down.
//!
//! A writer never calls back into capture or the dispatcher.

pub mod backlog;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::buffer::{Budget, OnFull};
use crate::connect::{connect_target, Conn, ConnectError, Target, Timeouts};
use crate::health::{self, Board, Cause, Transition};
use crate::layout::{Answer, Layout};
use crate::metrics::{BackendMetrics, DropReason, Metrics};
use crate::record::{now_us, Record};
use backlog::{Backlog, Plan};

/// How often upkeep runs: evicting expired records, probing. Retention is promised to ±1 s, so
/// this leaves margin for a round trip.
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

/// The outcome of one tick's Redis work (a probe or PING), as it arrives: how it went, and the
/// connection it made, if any.
struct TickOutcome {
    /// The probe's command and how it went.
    probe: Option<(&'static str, Result<(), Cause>)>,
    failed: bool,
    conn: Option<Conn>,
    /// `conn_gen` of the connection the job started with.
    conn_gen: u64,
}
type TickJob = Pin<Box<dyn Future<Output = TickOutcome> + Send>>;

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
    /// Its backend's number (metrics, board).
    idx: usize,
    name: String,
    /// The server or cluster it writes to (a cluster backend routes each command by key:
    /// `connect::cluster`).
    target: Target,
    conn: Option<Conn>,
    /// Bumped whenever `conn` is replaced, so a tick job that failed on an old connection does
    /// not throw away a newer one.
    conn_gen: u64,
    metrics: BackendMetrics,
    ctx: WriterContext,
    tracker: health::Tracker,
    /// The records, their states, and the pipelines in flight.
    backlog: Backlog,
    /// No write attempt before this (backoff).
    next_try: Instant,
    backoff: Duration,
    /// Last time the backend answered anything.
    last_ok: Instant,
    /// Pipelines sent and not yet answered, oldest first, with their plan number.
    inflight: VecDeque<(u64, Reply)>,
    /// Since when unsent records have been waiting.
    waiting_since: Option<Instant>,
    /// The tick's probe, running beside the writes (a hung Redis must not stop this writer from
    /// taking records off its queue).
    tick_job: Option<TickJob>,
}

impl Writer {
    /// A writer for backend number `idx` (a `redis::Client`, or a [`Target`]). Connects lazily.
    pub fn new(
        idx: usize,
        name: String,
        target: impl Into<Target>,
        layout: Layout,
        ctx: WriterContext,
    ) -> Self {
        let now = Instant::now();
        Writer {
            idx,
            name,
            target: target.into(),
            conn: None,
            conn_gen: 0,
            metrics: ctx.metrics.backends[idx].clone(),
            tracker: health::Tracker::new(ctx.health, idx),
            backlog: Backlog::new(layout, ctx.batch_size, ctx.on_full, ctx.budget.clone()),
            ctx,
            next_try: now,
            backoff: BACKOFF_MIN,
            last_ok: now,
            inflight: VecDeque::new(),
            waiting_since: None,
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
            if abort.is_cancelled() && self.backlog.unsent() > 0 {
                // What is in flight settles first (its answer is at most one timeout away).
                warn!(backend = %self.name, records = self.backlog.unsent(),
                      "grace period over; records not written");
                self.backlog.abort();
                self.publish();
            }
            if self.can_launch() {
                self.launch().await;
                continue;
            }
            if closed && self.backlog.is_empty() && self.inflight.is_empty() {
                break;
            }
            // Once the grace period is over, take everything (and drop it, counted) so that
            // nothing upstream stays blocked on this writer.
            let take = !closed && (self.backlog.has_room() || abort.is_cancelled());
            let launch_at = self.launch_at();
            // (Not while it may not write: the tick re-checks, instead of a loop that spins.)
            let waiting = self.backlog.can_send() && self.may_write();
            let answer = async {
                match self.inflight.front_mut() {
                    Some((id, reply)) => (*id, reply.await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                (id, result) = answer => {
                    self.inflight.pop_front();
                    self.settle(id, result);
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

    /// Queue a batch from the balancer (see [`Backlog::accept`]).
    fn accept(&mut self, batch: Vec<Record>) {
        self.waiting_since.get_or_insert_with(Instant::now);
        self.backlog.accept(batch);
        self.publish();
    }

    /// Count what the backlog wrote and dropped since the last call.
    fn publish(&mut self) {
        let t = self.backlog.take_tally();
        if t.written > 0 {
            self.metrics.written.inc_by(t.written);
        }
        for r in DropReason::ALL {
            let n = t.dropped[r as usize];
            if n > 0 {
                self.ctx.metrics.dropped(r, n);
            }
        }
        if self.backlog.unsent() == 0 {
            self.waiting_since = None;
        }
    }

    /// Whether to send another pipeline now.
    fn can_launch(&self) -> bool {
        // An excluded backend (the same server as another, or another redtap's lease) is never
        // written to: its records wait and end as `expired`.
        self.backlog.can_send() && self.may_write() && Instant::now() >= self.launch_at()
    }

    /// Whether this writer may write now: not excluded (the same server as another backend,
    /// or another redtap's lease), and cleared by the identity guard (this agent's lease there
    /// is held, with time to spare). Records wait otherwise, and end as `expired`.
    fn may_write(&self) -> bool {
        self.ctx.board.may_write(self.idx, now_us() / 1000)
    }

    /// When the unsent records may go: at once when a batch is full, else [`LINGER`] after the
    /// first of them arrived; never before the retry backoff ends.
    fn launch_at(&self) -> Instant {
        let linger = match self.waiting_since {
            Some(t) if self.backlog.unsent() < self.ctx.batch_size => t + LINGER,
            _ => self.next_try,
        };
        linger.max(self.next_try)
    }

    /// Send the pipeline the backlog plans. Its answer is settled later by
    /// [`settle`](Self::settle).
    async fn launch(&mut self) {
        let mut conn = match self.connect().await {
            Ok(c) => c.clone(),
            Err(e) => {
                self.metrics.write_errors.inc();
                warn!(backend = %self.name, error = %e, "cannot connect; will retry");
                self.conn = None;
                self.failed();
                self.judge(Err(e.cause()));
                return;
            }
        };
        // The connect may have waited up to the health timeout: still cleared to write?
        if !self.may_write() {
            return;
        }
        // After the connect, so that no record already past retention is sent: Redis would accept it into a key that expires
        // at once, and it would count as written though no one could read it.
        self.drop_expired();
        let Some(plan) = self.backlog.plan() else {
            return;
        };
        let pipe = self.backlog.pipeline(&plan);
        let Plan { id, .. } = plan;
        self.waiting_since = (self.backlog.unsent() > 0).then(Instant::now);
        self.metrics.batches.inc();
        let timeout = self.tracker.config().timeout;
        let mut reply: Reply = Box::pin(async move {
            let len = pipe.len();
            with_timeout(timeout, conn.req_packed_commands(&pipe, 0, len)).await
        });
        // Poll once now: that queues the pipeline on the connection, so pipelines go out in the
        // order they were built even though their answers are awaited later.
        if let Some(result) = crate::util::poll_once(reply.as_mut()) {
            reply = Box::pin(std::future::ready(result));
        }
        self.inflight.push_back((id, reply));
    }

    /// Hand pipeline `id`'s answer to the backlog, and judge health by it.
    fn settle(&mut self, id: u64, result: redis::RedisResult<Vec<Value>>) {
        let answers = match &result {
            Ok(values) => {
                let asks = self.backlog.asks(id);
                Ok(asks
                    .iter()
                    .zip(values)
                    .map(|(ask, v)| Answer::from_value(*ask, v))
                    .collect())
            }
            Err(_) => Err(()),
        };
        let settled = self.backlog.settle(id, answers);
        self.publish();
        let mut cause = None;
        if let Err(e) = &result {
            self.metrics.write_errors.inc();
            cause = Some(Cause::from_redis_error(e));
            warn!(backend = %self.name, error = %e, "write failed; will retry");
            self.conn = None;
        } else if let Some(e) = &settled.refused {
            self.metrics.write_errors.inc();
            cause = Some(Cause::from_reply(e));
            warn!(backend = %self.name, error = %e, "Redis refused records; will retry");
        }
        let ok = settled.ok();
        if ok {
            self.last_ok = Instant::now();
            self.backoff = BACKOFF_MIN;
            self.judge(Ok(()));
        } else {
            self.failed();
            let cause = cause.unwrap_or_else(|| Cause::Io("the answer was cut short".into()));
            self.judge(Err(cause));
        }
    }

    /// After a failure: back off, and send nothing until what is in flight has settled.
    fn failed(&mut self) {
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.backlog.failed();
    }

    /// Periodic work: evict expired records, and start the tick job beside the writes: PING an
    /// idle backend, probe a down one with a small expiring write.
    fn upkeep(&mut self) {
        self.drop_expired();
        if self.tick_job.is_some() {
            return; // the last one is still waiting for Redis
        }
        let idle = self.last_ok.elapsed() >= IDLE_PING;
        let up = self.tracker.is_up();
        if self.ctx.board.is_excluded(self.idx) {
            return; // never probed, never written: its identity guard says why
        }
        // Not cleared to write yet (identity and lease not checked, or the lease not renewed):
        // probe, so an unreachable backend is still found down and routed around.
        let probe = if !up || !self.may_write() {
            // A Redis that refuses writes (OOM, read-only replica) still answers PING: while
            // down, test with a small expiring write, or it would flap between up and down.
            let mut c = redis::cmd("SET");
            c.arg(&self.backlog.layout().probe_key)
                .arg(1)
                .arg("PX")
                .arg(2000);
            Some(("SET", c))
        } else if idle && self.backlog.is_empty() {
            Some(("PING", redis::cmd("PING")))
        } else {
            None
        };
        let Some((name, cmd)) = probe else {
            return;
        };
        let conn = self.conn.clone();
        let conn_gen = self.conn_gen;
        let target = self.target.clone();
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
                None => match connect_target(&target, Timeouts::both(timeout)).await {
                    Ok(c) => {
                        outcome.conn = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        outcome.probe = Some((name, Err(e.cause())));
                        outcome.failed = true;
                        return outcome;
                    }
                },
            };
            let answer = with_timeout(timeout, cmd.query_async::<String>(&mut conn))
                .await
                .map(drop)
                .map_err(|e| Cause::from_redis_error(&e));
            outcome.failed |= answer.is_err();
            outcome.probe = Some((name, answer));
            outcome
        }));
    }

    /// Take in the outcome of a tick's probe.
    fn tick_done(&mut self, outcome: TickOutcome) {
        if outcome.failed {
            if outcome.conn_gen == self.conn_gen {
                self.conn = None;
            }
        } else if self.conn.is_none() && outcome.conn.is_some() {
            self.conn = outcome.conn;
            self.conn_gen += 1;
        }
        if let Some((command, answer)) = outcome.probe {
            let verdict = match answer {
                // It answers, but this writer may not write there yet (the identity guard has
                // not taken this agent's lease, or its renewals failed): down, so records are
                // routed around it instead of waiting here, and the API says why.
                Ok(()) if !self.may_write() => Err(Cause::Other(
                    "waiting for this agent's lease on it (identity and lease checks)".into(),
                )),
                Ok(()) => {
                    self.last_ok = Instant::now();
                    Ok(())
                }
                Err(cause) => {
                    // Counted every time; logged only by the DOWN transition (a probe fails
                    // four times a second while a backend is down).
                    self.ctx.metrics.command_error(self.idx, command, &cause);
                    Err(cause)
                }
            };
            if self.judge(verdict) == Some(Transition::Up) {
                self.next_try = Instant::now();
                self.backoff = BACKOFF_MIN;
            }
        }
    }

    /// Record an outcome (a failure with its cause) with the health tracker and log a
    /// transition with the cause.
    fn judge(&mut self, outcome: Result<(), Cause>) -> Option<Transition> {
        let t = match outcome {
            Ok(()) => self.tracker.record(true, &self.ctx.board),
            Err(cause) => self.tracker.record_failure(cause, &self.ctx.board),
        };
        // What it holds while down waits for it: the backlog counts it against the budget.
        self.backlog.set_up(self.tracker.is_up());
        match t {
            Some(Transition::Down) => error!(
                backend = %self.name, waiting = self.backlog.len(),
                cause = %self.tracker.cause().map_or_else(|| "unknown".to_string(), |c| c.to_string()),
                "backend DOWN: routing around it until it answers again"
            ),
            Some(Transition::Up) => info!(
                backend = %self.name, waiting = self.backlog.len(),
                "backend UP again"
            ),
            None => {}
        }
        t
    }

    /// The connection, made if needed.
    async fn connect(&mut self) -> Result<&mut Conn, ConnectError> {
        if self.conn.is_none() {
            let conn =
                connect_target(&self.target, Timeouts::both(self.tracker.config().timeout)).await?;
            debug!(backend = %self.name, "connected");
            self.conn = Some(conn);
            self.conn_gen += 1;
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn drop_expired(&mut self) {
        let n = self.backlog.drop_expired(now_us() / 1000);
        if n > 0 {
            warn!(backend = %self.name, records = n, "records past retention dropped");
            self.publish();
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
