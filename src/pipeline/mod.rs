//! The record path behind capture: one [`Dispatcher`] task and one [`Writer`] per backend.
//!
//! Owns: starting that path for a configuration ([`Pipeline::start`]: weights restored from the
//! state file, lazy Redis clients, the queues between the stages) and draining it at shutdown
//! under the grace period ([`Pipeline::finish`], which accounts for every record in a
//! [`Summary`]).
//!
//! Never: captures, binds a socket, or decides policy of its own — the capture mode's choices
//! (e.g. [`OnFull`]) come from the caller.

pub mod dispatcher;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::balance::{Balance, Router, WeightStore};
use crate::buffer::{Budget, OnFull};
use crate::config::{Config, ConfigError};
use crate::connect::Target;
use crate::health::Board;
use crate::layout::Layout;
use crate::metrics::{DropReason, KernelDrop, Metrics};
use crate::record::Record;
use crate::sink::{Writer, WriterContext};
pub use dispatcher::Dispatcher;

/// Batches a writer's queue holds before the dispatcher keeps the rest in its overflow.
const WRITER_QUEUE_BATCHES: usize = 16;

/// What happened to the records of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Records produced by capture.
    pub captured: u64,
    /// Records stored in Redis, all backends.
    pub written: u64,
    /// Records dropped past retention.
    pub dropped_expired: u64,
    /// Records dropped because the grace period ran out.
    pub dropped_shutdown: u64,
    /// Records dropped from a full buffer.
    pub dropped_overflow: u64,
    /// Records dropped because the capture queue was full (packets mode).
    pub dropped_queue_full: u64,
    /// Records dropped while the outcome of their last write was unknown (may be in Redis).
    pub dropped_unknown: u64,
    /// Frames the kernel dropped before redtap read them (packets mode).
    pub kernel_drops: u64,
    /// Frames that could not be decoded (packets mode).
    pub frames_malformed: u64,
}

/// The record path behind capture, running: the dispatcher and one writer per backend.
pub struct Pipeline {
    /// Where capture sends records. Every clone must be dropped for [`Pipeline::finish`] to
    /// complete.
    pub queue: mpsc::Sender<Record>,
    /// Weights and routing counters.
    pub balance: Arc<Balance>,
    /// The one way weights change at run time (admin API, SIGHUP), persisted.
    pub weights: Arc<WeightStore>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Backend health.
    pub board: Arc<Board>,
    /// Records waiting on down backends.
    pub budget: Arc<Budget>,
    abort: CancellationToken,
    dispatcher: tokio::task::JoinHandle<()>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Pipeline {
    /// Start the dispatcher and writers for `config` (weights restored from the state file).
    /// Must be called inside a Tokio runtime. Connects to Redis lazily.
    pub fn start(config: &Config, on_full: OnFull) -> Result<Pipeline, ConfigError> {
        let names: Vec<String> = config.backends.iter().map(|b| b.name.clone()).collect();
        let weights: Vec<u32> = config.backends.iter().map(|b| b.weight).collect();
        let balance = Balance::new(names.clone(), weights);
        let weights = Arc::new(WeightStore::new(balance.clone(), config.state_file.clone()));
        weights.restore();
        let metrics = Arc::new(Metrics::new(&names));
        let board = Arc::new(Board::new(names.len()));
        let budget = Arc::new(Budget::new(config.buffer_max));
        let abort = CancellationToken::new();
        let ctx = WriterContext {
            metrics: metrics.clone(),
            board: board.clone(),
            budget: budget.clone(),
            on_full,
            health: config.health,
            batch_size: config.batch_size,
        };
        let mut writer_txs = Vec::new();
        let mut writers = Vec::new();
        for (i, b) in config.backends.iter().enumerate() {
            let layout = Layout::new(
                config.schema,
                &config.prefix,
                &config.agent,
                config.retention.as_millis() as u64,
            )
            .with_listen(config.listen);
            let layout = if b.is_cluster() {
                layout.for_cluster(&config.prefix, &config.agent)
            } else {
                layout
            };
            let writer = Writer::new(i, b.name.clone(), Target::of(b)?, layout, ctx.clone());
            let (tx, rx) = mpsc::channel(WRITER_QUEUE_BATCHES);
            writer_txs.push(tx);
            writers.push(tokio::spawn(writer.run(rx, abort.clone())));
        }
        let (queue, queue_rx) = mpsc::channel(config.queue_capacity);
        let dispatcher = Dispatcher {
            router: Router::new(balance.clone(), board.clone(), config.on_backend_down),
            queue: queue_rx,
            writers: writer_txs,
            metrics: metrics.clone(),
            board: board.clone(),
            batch_size: config.batch_size,
            budget: budget.clone(),
            on_full,
            retention_ms: config.retention.as_millis() as u64,
        };
        let dispatcher = tokio::spawn(dispatcher.run(abort.clone()));
        Ok(Pipeline {
            queue,
            balance,
            weights,
            metrics,
            board,
            budget,
            abort,
            dispatcher,
            writers,
        })
    }

    /// Drop this handle's queue sender, wait for `capture_done` (which must drop the other
    /// senders), then for every queued record to be written; after `grace`, drop what is left
    /// (counted as `shutdown`). Returns what happened to every record.
    pub async fn finish(
        self,
        grace: std::time::Duration,
        capture_done: impl std::future::Future<Output = ()>,
    ) -> Summary {
        let Pipeline {
            queue,
            metrics,
            abort,
            dispatcher,
            writers,
            ..
        } = self;
        drop(queue);
        let drain = async {
            capture_done.await;
            let _ = dispatcher.await;
            for t in writers {
                let _ = t.await;
            }
        };
        tokio::pin!(drain);
        if tokio::time::timeout(grace, &mut drain).await.is_err() {
            warn!("grace period over; dropping what is left");
            abort.cancel();
            drain.await;
        }
        Summary {
            captured: metrics.captured.get(),
            written: metrics.backends.iter().map(|b| b.written.get()).sum(),
            dropped_expired: metrics.dropped_count(DropReason::Expired),
            dropped_shutdown: metrics.dropped_count(DropReason::Shutdown),
            dropped_overflow: metrics.dropped_count(DropReason::Overflow),
            dropped_queue_full: metrics.dropped_count(DropReason::QueueFull),
            dropped_unknown: metrics.dropped_count(DropReason::Unknown),
            kernel_drops: metrics.kernel_drops(KernelDrop::Ring)
                + metrics.kernel_drops(KernelDrop::Interface),
            frames_malformed: metrics.frames_malformed(),
        }
    }
}
