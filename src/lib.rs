//! redtap: who has been sending TCP traffic to an address in the last few minutes, kept in
//! Redis, balanced per record across weighted backends.
//!
//! ```text
//!  capture ──Record──▶ [queue] ──▶ balance ──Vec<Record>──▶ sink (one writer per backend) ──▶ Redis
//!  (packets |          bounded     per-record selector      batched, pipelined, retried
//!   connections)                      ▲        ▲
//!  admin (HTTP API, SIGHUP) ──weights─┘        └── health (writers report up/down)
//! ```
//!
//! Layout:
//! - [`config`]: flags + TOML → one validated [`config::Config`], before anything binds.
//! - [`record`]: the [`record::Record`] that flows one way through the pipeline.
//! - [`capture`]: produces records (packets mode: one per TCP segment to the address, from a
//!   libpcap ring; connections mode: one per accepted connection).
//! - [`balance`]: weights, the per-record selector, target vs actual shares, the balancer task.
//! - [`health`]: each backend's up/down verdict and why; [`buffer`]: the bound on waiting records.
//! - [`identity`]: one Redis, one writer — the start-up check of every backend, duplicate servers
//!   refused by `run_id`, this agent's lease on each backend.
//! - [`sink`]: per-backend Redis writers and the data layouts ([`sink::schema`]).
//! - [`admin`]: the HTTP API (`/v1/backends`, `/v1/weights`, `/metrics`, `/healthz`);
//!   [`state`]: run-time weights kept across restarts.
//! - [`metrics`]: every metric, in one place.
//! - [`page`]: the live page at the admin address; [`recent`]: the last minute it shows
//!   (one-second samples, top sources).
//! - [`client`]: `redtap weights`; [`query`]: `redtap query/top/tail/stats`.
//!
//! `unsafe` is denied crate-wide; the only exception is one `setsockopt` fenced in
//! `capture::packets::sys`.
//!
//! One shutdown path: the caller cancels the token passed to [`run`]; capture stops, the queue
//! drains through the balancer into the writers, and the writers finish within the grace
//! period, counting anything left as dropped (`shutdown`).

#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod buffer;
pub mod capture;
pub mod client;
pub mod config;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod page;
pub mod pipeline;
pub mod query;
pub mod recent;
pub mod record;
pub mod sink;
pub mod state;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use balance::{Balance, Router};
use buffer::{Budget, OnFull};
use config::{CaptureMode, Config, ServeMode};
use health::Board;
use metrics::{DropReason, KernelDrop, Metrics};
use pipeline::dispatcher::Dispatcher;
use sink::schema::Layout;
use sink::{Writer, WriterContext};

/// Batches a writer's queue holds before the balancer waits.
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

/// The record path behind capture, running: the balancer and one writer per backend.
pub struct Pipeline {
    /// Where capture sends records. Every clone must be dropped for [`Pipeline::finish`] to
    /// complete.
    pub queue: mpsc::Sender<record::Record>,
    /// Weights and routing counters.
    pub balance: Arc<Balance>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Backend health.
    pub board: Arc<Board>,
    /// Records waiting on down backends.
    pub budget: Arc<Budget>,
    abort: CancellationToken,
    balancer: tokio::task::JoinHandle<()>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Pipeline {
    /// Start the balancer and writers for `config` (weights restored from the state file).
    /// Must be called inside a Tokio runtime. Connects to Redis lazily.
    pub fn start(config: &Config, on_full: OnFull) -> anyhow::Result<Pipeline> {
        let names: Vec<String> = config.backends.iter().map(|b| b.name.clone()).collect();
        let weights: Vec<u32> = config.backends.iter().map(|b| b.weight).collect();
        let balance = Balance::new(names.clone(), weights);
        restore_weights(config, &balance);
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
            );
            let writer = Writer::new(i, b.name.clone(), b.client()?, layout, ctx.clone());
            let (tx, rx) = mpsc::channel(WRITER_QUEUE_BATCHES);
            writer_txs.push(tx);
            writers.push(tokio::spawn(writer.run(rx, abort.clone())));
        }
        let (queue, queue_rx) = mpsc::channel(config.queue_capacity);
        let balancer = Dispatcher {
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
        let balancer = tokio::spawn(balancer.run(abort.clone()));
        Ok(Pipeline {
            queue,
            balance,
            metrics,
            board,
            budget,
            abort,
            balancer,
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
            balancer,
            writers,
            ..
        } = self;
        drop(queue);
        let drain = async {
            capture_done.await;
            let _ = balancer.await;
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

/// Bind the listeners, run the pipeline until `shutdown` is cancelled, then drain.
///
/// `config` must come from [`Config::load`]. Errors are start-up failures (a port in use…);
/// once running, Redis failures are retried and accounted, never returned.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<Summary> {
    // Before anything else: SIGHUP's default action is to kill the process, and `systemctl
    // reload` or a closed terminal sends it; once a handler exists it never kills, with or
    // without a config file to reload.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    // The capture first: a missing privilege or a bad filter is found before anything binds.
    let packets = match config.capture {
        CaptureMode::Packets => {
            Some(capture::packets::PacketCapture::open(&config).map_err(|e| {
                if e.is_usage() {
                    anyhow::Error::new(config::ConfigError(e.to_string()))
                } else {
                    anyhow::Error::new(e)
                }
            })?)
        }
        CaptureMode::Connections => None,
    };
    // Every backend tried once: logged up or why not; the same server twice, or this agent
    // already running on a backend, is refused here (exit 64).
    let guard = identity::check_at_start(&config).await?;
    let listener = match config.serve {
        ServeMode::Sink => Some(
            capture::connections::bind_listener(config.listen)
                .with_context(|| format!("cannot listen on {}", config.listen))?,
        ),
        ServeMode::None => None,
    };
    let admin_listener = match config.admin {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot start the admin API on {addr}"))?,
        ),
        None => None,
    };

    // Connections mode can make clients wait; the kernel will not wait for packets mode. See
    // buffer::OnFull.
    let on_full = match config.capture {
        CaptureMode::Connections => OnFull::Wait,
        CaptureMode::Packets => OnFull::DropOldest,
    };
    let pipeline = Pipeline::start(&config, on_full)?;
    let guard_stop = CancellationToken::new();
    let guard_task = guard.spawn(
        pipeline.board.clone(),
        pipeline.metrics.clone(),
        guard_stop.clone(),
    );

    let stop_capture = shutdown.child_token();
    let conns = capture::connections::ConnCapture {
        max_connections: config.max_connections,
        idle_timeout: config.idle_timeout,
    };
    let metrics = pipeline.metrics.clone();
    let (capture, server) = match packets {
        Some(p) => {
            let server = listener
                .map(|l| tokio::spawn(conns.run(l, None, metrics.clone(), stop_capture.clone())));
            let task = p
                .spawn(pipeline.queue.clone(), metrics.clone(), stop_capture)
                .context("cannot start the capture thread")?;
            (task, server)
        }
        None => {
            let l = listener.expect("connections mode always serves (checked by config)");
            let queue = Some(pipeline.queue.clone());
            let c = tokio::spawn(conns.run(l, queue, metrics.clone(), stop_capture));
            (c, None)
        }
    };

    // Admin API and SIGHUP reloads.
    let admin_task = admin_listener.map(|l| {
        let state = admin::AdminState {
            balance: pipeline.balance.clone(),
            metrics: pipeline.metrics.clone(),
            board: pipeline.board.clone(),
            budget: pipeline.budget.clone(),
            backends: config.backends.clone(),
            state_file: config.state_file.clone(),
            token: config.admin_token.clone(),
        };
        tokio::spawn(admin::serve(l, state, shutdown.clone()))
    });
    tokio::spawn(reload_on_sighup(
        hup,
        config.config_path.clone(),
        pipeline.balance.clone(),
        config.state_file.clone(),
        shutdown.clone(),
    ));

    let in_force = pipeline.balance.weights_by_name();
    let restored = config
        .backends
        .iter()
        .any(|b| in_force.get(&b.name) != Some(&b.weight));
    info!(
        listen = %config.listen,
        capture = %value_name(&config.capture),
        serve = %value_name(&config.serve),
        schema = %value_name(&config.schema),
        agent = %config.agent,
        retention = %humantime::format_duration(config.retention),
        admin = %config.admin.map_or_else(|| "off".to_string(), |a| a.to_string()),
        backends = %config.backends.iter()
            .map(|b| format!("{}={}@{}", b.name, b.redacted_url(), in_force[&b.name]))
            .collect::<Vec<_>>().join(" "),
        weights = %if restored { "restored from the state file" } else { "as configured" },
        "redtap running"
    );

    shutdown.cancelled().await;
    info!(grace = ?config.grace, "shutting down: capture stopped, writing out queued records");
    let summary = pipeline
        .finish(config.grace, async {
            let _ = capture.await;
            if let Some(s) = server {
                let _ = s.await;
            }
        })
        .await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    // The leases go last: until the writers are done, this agent still writes.
    guard_stop.cancel();
    let _ = guard_task.await;
    info!(
        captured = summary.captured,
        written = summary.written,
        dropped_expired = summary.dropped_expired,
        dropped_shutdown = summary.dropped_shutdown,
        dropped_overflow = summary.dropped_overflow,
        dropped_queue_full = summary.dropped_queue_full,
        dropped_unknown = summary.dropped_unknown,
        kernel_drops = summary.kernel_drops,
        frames_malformed = summary.frames_malformed,
        "redtap stopped"
    );
    Ok(summary)
}

/// Re-read the config file on every SIGHUP and apply its weights; a bad file changes nothing.
/// Without a config file, a SIGHUP is logged and changes nothing.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    path: Option<std::path::PathBuf>,
    balance: Arc<Balance>,
    state_file: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(path) = &path else {
            info!("SIGHUP: started without --config, nothing to reload");
            continue;
        };
        let result = config::read_file(path)
            .map_err(|e| e.to_string())
            .and_then(|file| {
                let changes: BTreeMap<String, u32> = file
                    .backends
                    .into_iter()
                    .map(|b| (b.name, b.weight))
                    .collect();
                apply_weights(&balance, &changes, state_file.as_deref()).map_err(|e| e.to_string())
            });
        match result {
            Ok(()) => info!(path = %path.display(), weights = %weights_text(&balance),
                            "SIGHUP: weights reloaded (only the weights: other settings take \
                             effect at the next restart)"),
            Err(e) => error!(path = %path.display(), error = %e,
                             "SIGHUP: config not applied; weights unchanged"),
        }
    }
}

/// A setting's value as it is written on the command line (`connections`, `stream`).
fn value_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

/// The weights in force, `A=30 B=70`, for the log.
fn weights_text(balance: &Balance) -> String {
    balance
        .weights_by_name()
        .iter()
        .map(|(n, w)| format!("{n}={w}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Poll a future once with a no-op waker: `Some(output)` if it completed at once. Used where a
/// future must make its first move now (queue a pipeline, drain the accept backlog) and is
/// awaited properly later, or not at all.
pub(crate) fn poll_once<F: std::future::Future + ?Sized>(
    f: std::pin::Pin<&mut F>,
) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Apply a weight change and record the new weights in the state file. The change stands even
/// if the file cannot be written (that is logged).
pub fn apply_weights(
    balance: &Balance,
    changes: &BTreeMap<String, u32>,
    state_file: Option<&std::path::Path>,
) -> Result<(), balance::WeightError> {
    // One change and its save at a time, so the file always ends with the latest weights.
    static SAVING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = SAVING.lock().unwrap_or_else(|e| e.into_inner());
    balance.set_weights(changes)?;
    if let Some(path) = state_file {
        if let Err(e) = state::save(path, balance.weights_by_name()) {
            error!(path = %path.display(), error = %e, "cannot write the state file; \
                   the new weights apply but will not survive a restart");
        }
    }
    Ok(())
}

/// At start, apply the weights of the state file (see [`state`] for the rule).
fn restore_weights(config: &Config, balance: &Balance) {
    let Some(path) = &config.state_file else {
        return;
    };
    match state::load(path) {
        Ok(None) => {}
        Ok(Some(saved)) => {
            let known: BTreeMap<String, u32> = saved
                .weights
                .into_iter()
                .filter(|(name, _)| balance.names().contains(name))
                .collect();
            if known.is_empty() {
                return;
            }
            match balance.set_weights(&known) {
                Ok(()) => info!(path = %path.display(), weights = ?balance.weights_by_name(),
                                "weights restored from the state file"),
                Err(e) => warn!(path = %path.display(), error = %e,
                                "state file weights not applied; using the configured ones"),
            }
        }
        Err(e) => warn!(error = %e, "using the configured weights"),
    }
}
