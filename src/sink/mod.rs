//! Redis sink: one writer task per backend that batches, pipelines and retries.
//!
//! Owns: the connection to one backend, the slots (stream IDs / key names) of the records it
//! writes, trimming, and the written / error / dropped accounting of those records.
//!
//! Every record handed to a writer ends in exactly one of: written (counted in
//! `records_written`), or dropped with a reason (`expired`: retention passed before it could be
//! written; `shutdown`: the grace period ran out). A batch is one pipeline; a retry resends only
//! the commands that did not succeed, at the same slots, so nothing is stored twice.
//!
//! A writer never calls back into capture or the balancer.

pub mod schema;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Pipeline, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::{BackendMetrics, DropReason, Metrics};
use crate::record::{now_us, Record};
use schema::{parse_stream_id, Layout, Slot};

/// How often an idle stream is trimmed. Retention is promised to ±1 s, so this leaves margin for
/// a round trip.
const TRIM_EVERY: Duration = Duration::from_millis(250);
/// Time allowed to connect to a backend.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for a pipelined batch's answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of the retry backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The error XADD gives for an ID at or below the stream's top: the entry was stored by an
/// earlier attempt whose answer was lost.
const XADD_DUPLICATE: &str = "equal or smaller than the target stream top item";

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
    all_metrics: Arc<Metrics>,
    batch_size: usize,
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
    /// Sent at this slot with no answer (connection lost): it may be stored, so it is resent at
    /// the same slot, where a second copy is refused.
    Sent(Slot),
    /// Stored.
    Stored,
}

impl Pending {
    fn new(rec: Record) -> Self {
        Pending {
            rec,
            state: State::New,
        }
    }
}

impl Writer {
    /// A writer for backend number `idx`. Connects lazily.
    pub fn new(
        idx: usize,
        name: String,
        client: redis::Client,
        layout: Layout,
        metrics: Arc<Metrics>,
        batch_size: usize,
    ) -> Self {
        Writer {
            name,
            client,
            conn: None,
            layout,
            resumed: false,
            newest_ms: 0,
            metrics: metrics.backends[idx].clone(),
            all_metrics: metrics,
            batch_size,
        }
    }

    /// Write every batch from `rx` until it closes. `abort` cuts retries short at the end of the
    /// shutdown grace period; what is left is counted as dropped (`shutdown`).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<Record>>, abort: CancellationToken) {
        let mut trim = tokio::time::interval(TRIM_EVERY);
        trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Vec<Pending> = Vec::new();
        loop {
            tokio::select! {
                biased;
                batch = rx.recv() => match batch {
                    Some(batch) => {
                        pending.extend(batch.into_iter().map(Pending::new));
                        // Gather what else is already waiting, up to one batch.
                        while pending.len() < self.batch_size {
                            match rx.try_recv() {
                                Ok(more) => pending
                                    .extend(more.into_iter().map(Pending::new)),
                                Err(_) => break,
                            }
                        }
                        self.write_all(&mut pending, &abort).await;
                    }
                    None => break,
                },
                _ = trim.tick() => self.trim().await,
            }
        }
        if !pending.is_empty() {
            self.all_metrics
                .dropped(DropReason::Shutdown, pending.len() as u64);
        }
        debug!(backend = %self.name, "writer finished");
    }

    /// Write `pending` in batches until it is empty: stored, or dropped with a reason.
    async fn write_all(&mut self, pending: &mut Vec<Pending>, abort: &CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        while !pending.is_empty() {
            self.drop_expired(pending);
            if pending.is_empty() {
                break;
            }
            if abort.is_cancelled() {
                warn!(backend = %self.name, records = pending.len(),
                      "grace period over; records not written");
                self.all_metrics
                    .dropped(DropReason::Shutdown, pending.len() as u64);
                pending.clear();
                break;
            }
            let n = pending.len().min(self.batch_size);
            match self.write_batch(&mut pending[..n]).await {
                Ok(()) => {
                    let before = pending.len();
                    pending.retain(|p| p.state != State::Stored);
                    let stored = (before - pending.len()) as u64;
                    self.metrics.written.inc_by(stored);
                    if stored == 0 {
                        self.pause(&mut backoff, abort).await;
                    } else {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(e) => {
                    self.metrics.write_errors.inc();
                    warn!(backend = %self.name, error = %e, "write failed; will retry");
                    self.conn = None;
                    self.pause(&mut backoff, abort).await;
                }
            }
        }
    }

    /// Send one pipelined batch and mark each record `Stored`, or `New` when Redis refused it.
    /// `Err` means the batch's fate is unknown as a whole (connection lost): its records stay
    /// `Sent` and are retried at the same slots.
    async fn write_batch(&mut self, batch: &mut [Pending]) -> redis::RedisResult<()> {
        let mut conn = self.connect().await?.clone();
        let mut pipe = Pipeline::with_capacity(batch.len() + 2);
        let mut newest = self.newest_ms;
        for p in batch.iter_mut() {
            let slot = match p.state {
                State::Sent(slot) => slot,
                _ => self.layout.next_slot(&p.rec),
            };
            p.state = State::Sent(slot);
            self.layout.push_store(&mut pipe, &p.rec, slot);
            newest = newest.max(p.rec.ts_ms());
        }
        self.layout.push_upkeep(&mut pipe, now_us() / 1000, newest);
        let replies = conn.req_packed_commands(&pipe, 0, pipe.len()).await?;
        let mut first_err = None;
        for (p, reply) in batch.iter_mut().zip(replies) {
            match reply {
                Value::ServerError(e)
                    if !e.details().is_some_and(|d| d.contains(XADD_DUPLICATE)) =>
                {
                    p.state = State::New;
                    first_err.get_or_insert(e);
                }
                _ => p.state = State::Stored,
            }
        }
        if let Some(e) = first_err {
            self.metrics.write_errors.inc();
            warn!(backend = %self.name, error = ?e, "Redis refused records; will retry");
        }
        self.newest_ms = newest;
        Ok(())
    }

    /// The connection, made if needed. On a fresh stream connection, learn the newest entry so
    /// new IDs continue after it.
    async fn connect(&mut self) -> redis::RedisResult<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            let cfg = AsyncConnectionConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(RESPONSE_TIMEOUT);
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
            info!(backend = %self.name, "connected");
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// Trim an idle stream so entries leave on time even when nothing new arrives.
    async fn trim(&mut self) {
        if self.layout.schema != crate::config::Schema::Stream || self.conn.is_none() {
            return;
        }
        let mut pipe = Pipeline::new();
        self.layout.push_trim(&mut pipe, now_us() / 1000);
        let conn = self.conn.as_mut().expect("checked");
        if let Err(e) = pipe.exec_async(conn).await {
            debug!(backend = %self.name, error = %e, "trim failed");
            self.conn = None;
        }
    }

    fn drop_expired(&self, pending: &mut Vec<Pending>) {
        let now_ms = now_us() / 1000;
        let before = pending.len();
        pending.retain(|p| !self.layout.is_expired(&p.rec, now_ms));
        let dropped = (before - pending.len()) as u64;
        if dropped > 0 {
            warn!(backend = %self.name, records = dropped, "records past retention dropped");
            self.all_metrics.dropped(DropReason::Expired, dropped);
        }
    }

    async fn pause(&self, backoff: &mut Duration, abort: &CancellationToken) {
        tokio::select! {
            _ = tokio::time::sleep(*backoff) => {}
            _ = abort.cancelled() => {}
        }
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
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
