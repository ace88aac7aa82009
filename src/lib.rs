//! redtap: who has been sending TCP traffic to an address in the last few minutes, kept in
//! Redis, balanced per record across weighted backends.
//!
//! ```text
//!  capture ──Record──▶ [queue] ──▶ balance ──Vec<Record>──▶ sink (one writer per backend) ──▶ Redis
//!  (packets|           bounded     per-record SWRR          batched, pipelined, retried
//!   connections)
//!                                     ▲
//!  admin (HTTP API, SIGHUP) ──weights─┘ (immutable snapshot, swapped atomically)
//! ```
//!
//! Layout:
//! - [`config`]: flags + TOML → one validated [`config::Config`], before anything binds.
//! - [`record`]: the [`record::Record`] that flows one way through the pipeline.
//! - [`capture`]: produces records (packets mode: one per TCP segment to the address, from a
//!   libpcap ring; connections mode: one per accepted connection).
//! - [`balance`]: weights, the smooth weighted round robin, target vs actual shares.
//! - [`sink`]: per-backend Redis writers and the data layouts ([`sink::schema`]).
//! - [`admin`]: the HTTP API (`/v1/backends`, `/v1/weights`, `/metrics`, `/healthz`).
//! - [`metrics`]: every metric, in one place.
//! - [`client`]: the `redtap weights` command-line client of the admin API.
//!
//! `unsafe` is denied crate-wide; the only exception is one `setsockopt` fenced in
//! `capture::packets::sys`.
//!
//! One shutdown path: the caller cancels the token passed to [`run`]; capture stops accepting,
//! the queue drains through the balancer into the writers, and the writers finish within the
//! grace period, counting anything left as dropped (`shutdown`).

#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod capture;
pub mod client;
pub mod config;
pub mod metrics;
pub mod record;
pub mod sink;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use balance::{Balance, Router};
use config::{CaptureMode, Config, ServeMode};
use metrics::{DropReason, KernelDrop, Metrics};
use sink::schema::Layout;
use sink::Writer;

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
    /// Records dropped because the capture queue was full (packets mode).
    pub dropped_queue_full: u64,
    /// Frames the kernel dropped before redtap read them (packets mode).
    pub kernel_drops: u64,
    /// Frames that could not be decoded (packets mode).
    pub frames_malformed: u64,
}

/// Bind the listeners, run the pipeline until `shutdown` is cancelled, then drain.
///
/// `config` must come from [`Config::load`]. Errors are start-up failures (a port in use…);
/// one the operator must fix in the command line or privileges carries a
/// [`config::ConfigError`] (the binary exits 64). Once running, Redis failures are retried and
/// accounted, never returned.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<Summary> {
    let names: Vec<String> = config.backends.iter().map(|b| b.name.clone()).collect();
    let weights: Vec<u32> = config.backends.iter().map(|b| b.weight).collect();
    let balance = Balance::new(names.clone(), weights);
    let metrics = Arc::new(Metrics::new(&names));

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

    // Writers, one per backend.
    let abort = CancellationToken::new();
    let mut writer_txs = Vec::new();
    let mut writer_tasks = Vec::new();
    for (i, b) in config.backends.iter().enumerate() {
        let client = redis::Client::open(b.url.as_str())
            .with_context(|| format!("backend {}: bad URL", b.name))?;
        let layout = Layout::new(
            config.schema,
            &config.prefix,
            &config.agent,
            config.retention.as_millis() as u64,
        );
        let writer = Writer::new(
            i,
            b.name.clone(),
            client,
            layout,
            metrics.clone(),
            config.batch_size,
        );
        let (tx, rx) = mpsc::channel(WRITER_QUEUE_BATCHES);
        writer_txs.push(tx);
        writer_tasks.push(tokio::spawn(writer.run(rx, abort.clone())));
    }

    // Balancer.
    let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity);
    let balancer = tokio::spawn(balance::run_balancer(
        Router::new(balance.clone()),
        queue_rx,
        writer_txs,
        metrics.clone(),
        config.batch_size,
    ));

    // Capture.
    let stop_capture = shutdown.child_token();
    let conns = capture::connections::ConnCapture {
        max_connections: config.max_connections,
        idle_timeout: config.idle_timeout,
    };
    let (capture, server) = match packets {
        Some(p) => {
            let server = listener
                .map(|l| tokio::spawn(conns.run(l, None, metrics.clone(), stop_capture.clone())));
            let task = p
                .spawn(queue_tx, metrics.clone(), stop_capture)
                .context("cannot start the capture thread")?;
            (task, server)
        }
        None => {
            let l = listener.expect("connections mode always serves (checked by config)");
            let c = tokio::spawn(conns.run(l, Some(queue_tx), metrics.clone(), stop_capture));
            (c, None)
        }
    };

    // Admin API and SIGHUP reloads.
    let admin_task = admin_listener.map(|l| {
        let state = admin::AdminState {
            balance: balance.clone(),
            metrics: metrics.clone(),
            backends: config.backends.clone(),
        };
        tokio::spawn(admin::serve(l, state, shutdown.clone()))
    });
    if let Some(path) = config.config_path.clone() {
        tokio::spawn(reload_on_sighup(path, balance.clone(), shutdown.clone()));
    }

    info!(
        listen = %config.listen,
        capture = ?config.capture,
        serve = ?config.serve,
        schema = ?config.schema,
        agent = %config.agent,
        retention = ?config.retention,
        admin = ?config.admin,
        backends = %config.backends.iter()
            .map(|b| format!("{}={}@{}", b.name, b.redacted_url(), b.weight))
            .collect::<Vec<_>>().join(" "),
        "redtap running"
    );

    shutdown.cancelled().await;
    info!(grace = ?config.grace, "shutting down: capture stopped, writing out queued records");
    let drain = async {
        let _ = capture.await;
        if let Some(s) = server {
            let _ = s.await;
        }
        let _ = balancer.await;
        for t in writer_tasks {
            let _ = t.await;
        }
    };
    tokio::pin!(drain);
    if tokio::time::timeout(config.grace, &mut drain)
        .await
        .is_err()
    {
        warn!("grace period over; dropping what is left");
        abort.cancel();
        drain.await;
    }
    if let Some(t) = admin_task {
        let _ = t.await;
    }

    let summary = Summary {
        captured: metrics.captured.get(),
        written: metrics.backends.iter().map(|b| b.written.get()).sum(),
        dropped_expired: metrics.dropped_count(DropReason::Expired),
        dropped_shutdown: metrics.dropped_count(DropReason::Shutdown),
        dropped_queue_full: metrics.dropped_count(DropReason::QueueFull),
        kernel_drops: metrics.kernel_drops(KernelDrop::Ring)
            + metrics.kernel_drops(KernelDrop::Interface),
        frames_malformed: metrics.frames_malformed(),
    };
    info!(
        captured = summary.captured,
        written = summary.written,
        dropped_expired = summary.dropped_expired,
        dropped_shutdown = summary.dropped_shutdown,
        dropped_queue_full = summary.dropped_queue_full,
        kernel_drops = summary.kernel_drops,
        frames_malformed = summary.frames_malformed,
        "redtap stopped"
    );
    Ok(summary)
}

/// Re-read the config file on every SIGHUP and apply its weights; a bad file changes nothing.
async fn reload_on_sighup(
    path: std::path::PathBuf,
    balance: Arc<Balance>,
    shutdown: CancellationToken,
) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        let result = config::read_file(&path)
            .map_err(|e| e.to_string())
            .and_then(|file| {
                let changes: BTreeMap<String, u32> = file
                    .backends
                    .into_iter()
                    .map(|b| (b.name, b.weight))
                    .collect();
                balance.set_weights(&changes).map_err(|e| e.to_string())
            });
        match result {
            Ok(()) => info!(path = %path.display(), weights = ?balance.current().weights,
                            "SIGHUP: weights reloaded"),
            Err(e) => error!(path = %path.display(), error = %e,
                             "SIGHUP: config not applied; weights unchanged"),
        }
    }
}
