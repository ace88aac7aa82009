//! The daemon: `redtap run` from a validated configuration to a clean exit.
//!
//! Owns the order of start-up and shutdown: open the capture once (a missing privilege or a
//! bad filter is found before anything binds) → check every backend → bind the listeners →
//! start the pipeline → with `--control`, read the fleet's weights once and start following them
//! (a control Redis that does not answer never stops the start) → admin API and SIGHUP reloads
//! → wait for the shutdown token → stop capture, drain, release the leases. Start-up failures are a typed [`StartError`] that knows
//! its exit code.
//!
//! Never: parses arguments or installs the SIGTERM/SIGINT handlers (the binary does), or
//! touches records itself — once running, Redis failures are retried and accounted by the
//! pipeline, never returned from here.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::balance::{Origin, WeightError, WeightStore};
use crate::buffer::OnFull;
use crate::capture::connections::{self, ConnCapture};
use crate::capture::packets::{OpenError, PacketCapture};
use crate::config::{self, CaptureMode, Config, ConfigError, ServeMode};
use crate::control::Control;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Summary};
use crate::record::Record;
use crate::{admin, identity};

/// Exit code for a usage or configuration error (EX_USAGE).
pub const EX_USAGE: u8 = 64;

/// Exit code for a failure of the host rather than of the command (a port in use…).
pub const EX_FAILURE: u8 = 1;

/// Why the daemon could not start. Each variant knows its exit code: 64 when the operator must
/// change the command, its configuration or its privileges; 1 when the host is in the way.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is wrong, or a backend check refused it (same server twice, lease held).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Packet capture could not open (privilege, filter, interface, or the device itself).
    #[error(transparent)]
    Capture(#[from] OpenError),
    /// The SIGHUP handler could not be installed.
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    /// The capture listener could not bind (a port in use…).
    #[error("cannot listen on {addr}: {source}{}", listen_hint(source))]
    Listen {
        /// The listen address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The admin API could not bind.
    #[error("cannot start the admin API on {addr}: {source}{}", admin_hint(source))]
    Admin {
        /// The admin address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The packet capture thread could not start.
    #[error("cannot start the capture thread: {0}")]
    CaptureThread(std::io::Error),
}

/// What to do about a listen address in use.
fn listen_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "; another program (or another redtap) listens there: stop it, choose another \
             --listen, or use --capture packets --serve none to tap a port another program serves"
        }
        _ => "",
    }
}

/// What to do about an admin address in use.
fn admin_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "; another program (or another redtap) listens there: pick another address with \
             --admin ADDR (admin = \"ADDR\" in the file), or turn the admin API off with \
             --admin off"
        }
        _ => "",
    }
}

impl StartError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) => EX_USAGE,
            StartError::Capture(e) if e.is_usage() => EX_USAGE,
            StartError::Capture(_)
            | StartError::Signal(_)
            | StartError::Listen { .. }
            | StartError::Admin { .. }
            | StartError::CaptureThread(_) => EX_FAILURE,
        }
    }
}

/// The capture mode and what it needs, decided once from the configuration.
enum Capture {
    /// One record per TCP segment, from the opened libpcap ring.
    Packets(PacketCapture),
    /// One record per accepted connection on the listen address.
    Connections,
}

impl Capture {
    /// Open the capture the configuration asks for (packets mode needs privileges and a valid
    /// filter; connections mode needs nothing yet).
    fn open(config: &Config) -> Result<Capture, StartError> {
        Ok(match config.capture {
            CaptureMode::Packets => Capture::Packets(PacketCapture::open(config)?),
            CaptureMode::Connections => Capture::Connections,
        })
    }

    /// Connections mode can make clients wait; the kernel will not wait for packets mode. See
    /// [`OnFull`].
    fn on_full(&self) -> OnFull {
        match self {
            Capture::Packets(_) => OnFull::DropOldest,
            Capture::Connections => OnFull::Wait,
        }
    }

    /// Start capturing into `queue`. `listener` is the listen socket if redtap serves it: in
    /// packets mode it only accepts (and counts) connections; in connections mode it is the
    /// capture. Returns the capture task and, in packets mode, the server task.
    fn start(
        self,
        listener: Option<TcpListener>,
        conns: ConnCapture,
        queue: tokio::sync::mpsc::Sender<Record>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Result<(JoinHandle<()>, Option<JoinHandle<()>>), StartError> {
        match self {
            Capture::Packets(p) => {
                let server = listener
                    .map(|l| tokio::spawn(conns.run(l, None, metrics.clone(), stop.clone())));
                let task = p
                    .spawn(queue, metrics, stop)
                    .map_err(StartError::CaptureThread)?;
                Ok((task, server))
            }
            Capture::Connections => {
                let l = listener.expect("connections mode always serves (checked by config)");
                Ok((tokio::spawn(conns.run(l, Some(queue), metrics, stop)), None))
            }
        }
    }
}

/// Bind the listeners, run the pipeline until `shutdown` is cancelled, then drain.
///
/// `config` must come from [`Config::load`]. Errors are start-up failures (a port in use…);
/// once running, Redis failures are retried and accounted, never returned.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Summary, StartError> {
    // Before anything else: SIGHUP's default action is to kill the process, and `systemctl
    // reload` or a closed terminal sends it; once a handler exists it never kills, with or
    // without a config file to reload.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(StartError::Signal)?;
    // The capture first: a missing privilege or a bad filter is found before anything binds.
    let capture = Capture::open(&config)?;
    // Every backend tried once: logged up or why not; the same server twice, or this agent
    // already running on a backend, is refused here (exit 64).
    let guard = identity::check_at_start(&config).await?;
    let listener = match config.serve {
        ServeMode::Sink => Some(connections::bind_listener(config.listen).map_err(|source| {
            StartError::Listen {
                addr: config.listen,
                source,
            }
        })?),
        ServeMode::None => None,
    };
    let admin_listener = match config.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Admin { addr, source })?,
        ),
        None => None,
    };

    let pipeline = Pipeline::start(&config, capture.on_full())?;
    let guard_stop = CancellationToken::new();
    let guard_task = guard.spawn(
        pipeline.board.clone(),
        pipeline.metrics.clone(),
        guard_stop.clone(),
    );

    // Before the first record: the control Redis's weights win when it answers.
    let control = match &config.control {
        Some(target) => Some(Control::new(target, &config.prefix, &config.agent)?),
        None => None,
    };
    let control_task = match &control {
        Some(c) => Some(
            c.clone()
                .start(
                    pipeline.weights.clone(),
                    pipeline.board.clone(),
                    pipeline.metrics.clone(),
                    shutdown.child_token(),
                )
                .await,
        ),
        None => None,
    };

    let conns = ConnCapture {
        max_connections: config.max_connections,
        idle_timeout: config.idle_timeout,
    };
    let (capture, server) = capture.start(
        listener,
        conns,
        pipeline.queue.clone(),
        pipeline.metrics.clone(),
        shutdown.child_token(),
    )?;

    // Admin API and SIGHUP reloads.
    let admin_task = admin_listener.map(|l| {
        let state = admin::AdminState {
            balance: pipeline.balance.clone(),
            weights: pipeline.weights.clone(),
            metrics: pipeline.metrics.clone(),
            board: pipeline.board.clone(),
            budget: pipeline.budget.clone(),
            backends: config.backends.clone(),
            token: config.admin_token.clone(),
            control: control.clone(),
        };
        tokio::spawn(admin::serve(l, state, shutdown.clone()))
    });
    tokio::spawn(reload_on_sighup(
        hup,
        config.config_path.clone(),
        pipeline.weights.clone(),
        control.is_some(),
        shutdown.clone(),
    ));

    log_running(&config, &pipeline, control.as_deref());

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
    if let Some(t) = control_task {
        // It stops at its next step; one stuck on an unreachable control Redis is not waited
        // for beyond its command bound.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), t).await;
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

/// The one line that says what is running and with which weights.
fn log_running(config: &Config, pipeline: &Pipeline, control: Option<&Control>) {
    if let (Some(old), Some(new)) = (&config.state_file, &config.state_file_moved_to) {
        warn!(
            state_file = %old.display(),
            "the state file is in the working directory, the default of earlier versions: \
             weights are restored from and saved to it until it is moved to {}",
            new.display()
        );
    }
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
        weights = %match control.map(|c| c.status()).and_then(|s| Some((s.version?, s.stale))) {
            Some((v, stale)) => format!(
                "fleet version {v}{}",
                if stale { " (stale: control Redis not answering)" } else { "" }
            ),
            None if restored => "restored from the state file".to_string(),
            None => "as configured".to_string(),
        },
        control = %config.control.as_ref().map_or_else(|| "off".to_string(), |c| c.redacted_url()),
        "redtap running"
    );
}

/// Why a SIGHUP changed nothing.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    /// The file could not be read or parsed.
    #[error(transparent)]
    File(ConfigError),
    /// Its weights were refused.
    #[error(transparent)]
    Weights(WeightError),
    /// The reload task itself failed.
    #[error("reload failed: {0}")]
    Task(String),
}

/// Re-read the config file on every SIGHUP and apply its weights; a bad file changes nothing.
/// Without a config file, or with `--control` (the fleet's weights rule), a SIGHUP is logged
/// and changes nothing.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    path: Option<std::path::PathBuf>,
    weights: Arc<WeightStore>,
    controlled: bool,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        if controlled {
            info!(
                "SIGHUP: weights come from the control Redis (--control); use `redtap weights \
                   set --control URL` to change them"
            );
            continue;
        }
        let Some(path) = &path else {
            info!("SIGHUP: started without --config, nothing to reload");
            continue;
        };
        // Reading the file and writing the state file (fsync) block: off the async workers.
        let (path_b, store) = (path.clone(), weights.clone());
        let result = tokio::task::spawn_blocking(move || {
            config::read_file(&path_b)
                .map_err(ReloadError::File)
                .and_then(|file| {
                    let changes: BTreeMap<String, u32> = file
                        .backend
                        .into_iter()
                        .map(|b| (b.name, b.weight))
                        .collect();
                    store
                        .apply(&changes, Origin::Sighup)
                        .map(drop) // a failed save is logged by the store
                        .map_err(ReloadError::Weights)
                })
        })
        .await
        .unwrap_or_else(|e| Err(ReloadError::Task(e.to_string())));
        match result {
            Ok(()) => info!(path = %path.display(), weights = %weights_text(&weights),
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
fn weights_text(weights: &WeightStore) -> String {
    weights
        .balance()
        .weights_by_name()
        .iter()
        .map(|(n, w)| format!("{n}={w}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_exit_64_and_failures_of_the_host_exit_1() {
        let io = || std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let filter = OpenError::BadFilter {
            expr: "x".into(),
            detail: "y".into(),
        };
        let device = OpenError::Device {
            device: "eth9".into(),
            detail: "gone".into(),
        };
        let cases = [
            (
                StartError::Config(ConfigError::Usage("bad".into())),
                EX_USAGE,
            ),
            (StartError::Capture(filter), EX_USAGE),
            (StartError::Capture(device), EX_FAILURE),
            (StartError::Signal(io()), EX_FAILURE),
            (StartError::Listen { addr, source: io() }, EX_FAILURE),
            (StartError::Admin { addr, source: io() }, EX_FAILURE),
            (StartError::CaptureThread(io()), EX_FAILURE),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e}");
        }
    }
}
