//! Every metric redtap exports, in one place.
//!
//! Code calls the typed methods here, never metric names. Hot paths count per batch, not per
//! record. Gauges derived from other state (weights, shares, queue depth) are computed when
//! `/metrics` is scraped, not maintained on the hot path.
//!
//! Names follow `redtap_<name>_<unit>_total` for counters (the `_total` suffix is added by the
//! encoder).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::balance::Balance;
use crate::buffer::Budget;
use crate::health::{Board, Cause};

/// Why a captured record was not stored. Every captured record is either written or counted
/// under exactly one of these.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum DropReason {
    /// Its retention had passed before it could be written.
    Expired = 0,
    /// Shutdown's grace period ran out before it could be written.
    Shutdown = 1,
    /// It waited in a full buffer and was the oldest when another record arrived.
    Overflow = 2,
    /// The capture → balancer queue was full (packets mode never waits on it: the kernel would
    /// drop instead, unaccounted per record).
    QueueFull = 3,
    /// Its retention passed, the grace period ran out or the buffer overflowed while the
    /// outcome of its last write was unknown (the answer was lost): it may be in Redis, until its
    /// retention ends.
    Unknown = 4,
}

impl DropReason {
    /// Every reason, so each shows in /metrics from the start.
    pub const ALL: [DropReason; 5] = [
        DropReason::Expired,
        DropReason::Shutdown,
        DropReason::Overflow,
        DropReason::QueueFull,
        DropReason::Unknown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Expired => "expired",
            DropReason::Shutdown => "shutdown",
            DropReason::Overflow => "overflow",
            DropReason::QueueFull => "queue_full",
            DropReason::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Per-backend counters, created once so the hot path never hashes a label.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    /// Records stored in this backend.
    pub written: Counter,
    /// Failed write attempts (whole batches or single commands).
    pub write_errors: Counter,
    /// Pipelines sent.
    pub batches: Counter,
}

/// The registry and handles to every metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Records produced by capture.
    pub captured: Counter,
    /// Per backend, in configuration order.
    pub backends: Vec<BackendMetrics>,
    /// Indexed by `DropReason as usize`.
    dropped: Vec<Counter>,
    weight: Vec<Gauge>,
    target_share: Vec<Gauge<f64, AtomicU64>>,
    actual_share: Vec<Gauge<f64, AtomicU64>>,
    queue_depth: Gauge,
    backend_up: Vec<Gauge>,
    buffered: Gauge,
    /// Packets mode: frames the kernel dropped, indexed by [`KernelDrop`].
    kernel_drops: [Counter; 2],
    /// Packets mode: frames that reached redtap but could not be decoded.
    frames_malformed: Counter,
    /// Packets mode: well-formed frames that carry no TCP segment start (e.g. fragments).
    frames_ignored: Counter,
    /// Packets mode: segments the kernel filter passed that are not to the listen address.
    frames_not_to_listen: Counter,
    /// 1 while capture runs, 0 while a failed packet capture is being reopened.
    capture_up: Gauge,
    /// Packets mode: times the capture was reopened after a read error.
    capture_reopens: Counter,
    /// Admin API connections closed at once because the cap was reached.
    admin_refused: Counter,
    /// 1 while the weights served may be behind the fleet's (control Redis not answering).
    control_stale: Gauge,
    /// The fleet version served (0: none).
    control_version: Gauge,
    /// Failed Redis commands redtap relies on (expiry, probe, lease…), by backend, command and
    /// cause. Touched only on failures.
    command_errors: Family<CommandErrorLabels, Counter>,
    /// 1 for the cause a backend is down for, 0 for the causes it was down for before.
    down_cause: Family<DownCauseLabels, Gauge>,
    backend_names: Vec<String>,
    /// The cause label last set to 1 per backend (scrapes only).
    down_cause_shown: std::sync::Mutex<Vec<Option<&'static str>>>,
    /// One-second samples of the counters, for the live page (not exported).
    pub recent: crate::recent::Recent,
    /// The heaviest sources of the last minute, for the live page (not exported).
    pub sources: crate::recent::TopSources,
}

/// Where the kernel dropped frames before redtap could read them (libpcap's statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelDrop {
    /// The capture ring was full (`ps_drop`): redtap did not keep up.
    Ring = 0,
    /// The interface or its driver dropped them (`ps_ifdrop`).
    Interface = 1,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandErrorLabels {
    backend: String,
    command: &'static str,
    cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DownCauseLabels {
    backend: String,
    cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

impl Metrics {
    /// Metrics for the named backends.
    pub fn new(backend_names: &[String]) -> Self {
        let mut registry = Registry::with_prefix("redtap");
        let captured = Counter::default();
        registry.register(
            "records_captured",
            "Records produced by capture",
            captured.clone(),
        );
        let written = Family::<BackendLabel, Counter>::default();
        registry.register(
            "records_written",
            "Records stored in Redis, per backend",
            written.clone(),
        );
        let errors = Family::<BackendLabel, Counter>::default();
        registry.register(
            "write_errors",
            "Failed Redis write attempts, per backend",
            errors.clone(),
        );
        let batches = Family::<BackendLabel, Counter>::default();
        registry.register(
            "write_batches",
            "Pipelined batches sent, per backend",
            batches.clone(),
        );
        let dropped = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "records_dropped",
            "Captured records not stored, by reason",
            dropped.clone(),
        );
        let dropped: Vec<Counter> = DropReason::ALL
            .iter()
            .map(|r| {
                dropped
                    .get_or_create(&ReasonLabel { reason: r.as_str() })
                    .clone()
            })
            .collect();
        let weight_f = Family::<BackendLabel, Gauge>::default();
        registry.register(
            "backend_weight",
            "Configured weight, per backend",
            weight_f.clone(),
        );
        let target_f = Family::<BackendLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "backend_target_share",
            "weight / sum of weights, per backend",
            target_f.clone(),
        );
        let actual_f = Family::<BackendLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "backend_actual_share",
            "Share of records routed since the last weight change, per backend",
            actual_f.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Records waiting between capture and the balancer",
            queue_depth.clone(),
        );

        let up_f = Family::<BackendLabel, Gauge>::default();
        registry.register(
            "backend_up",
            "1 while the backend takes records, 0 while it is down",
            up_f.clone(),
        );
        let buffered = Gauge::default();
        registry.register(
            "buffered_records",
            "Records waiting because their backend (or every backend) is down",
            buffered.clone(),
        );
        let kernel_f = Family::<CauseLabel, Counter>::default();
        registry.register(
            "kernel_drops",
            "Frames dropped by the kernel before redtap read them (packets mode), by cause",
            kernel_f.clone(),
        );
        let kernel_drops = ["ring", "interface"]
            .map(|cause| kernel_f.get_or_create(&CauseLabel { cause }).clone());
        let frames_malformed = Counter::default();
        registry.register(
            "frames_malformed",
            "Captured frames that could not be decoded (packets mode)",
            frames_malformed.clone(),
        );
        let frames_ignored = Counter::default();
        registry.register(
            "frames_ignored",
            "Captured frames that are well formed but start no TCP segment, e.g. IP fragments",
            frames_ignored.clone(),
        );
        let frames_not_to_listen = Counter::default();
        registry.register(
            "frames_not_to_listen",
            "Segments the kernel filter passed that are not TCP to --listen, dropped in user \
             space (IPv6 with extension headers to another port)",
            frames_not_to_listen.clone(),
        );
        let capture_up = Gauge::default();
        capture_up.set(1);
        registry.register(
            "capture_up",
            "1 while capture runs, 0 while a failed packet capture is being reopened",
            capture_up.clone(),
        );
        let capture_reopens = Counter::default();
        registry.register(
            "capture_reopens",
            "Times the packet capture was reopened after a read error",
            capture_reopens.clone(),
        );
        let admin_refused = Counter::default();
        registry.register(
            "admin_connections_refused",
            "Admin API connections closed at once because the connection cap was reached",
            admin_refused.clone(),
        );
        let control_stale = Gauge::default();
        registry.register(
            "control_stale",
            "With --control: 1 while the control Redis has not answered since start or since it \
             was lost, so the weights served may be behind the fleet's",
            control_stale.clone(),
        );
        let control_version = Gauge::default();
        registry.register(
            "control_version",
            "With --control: the fleet weights version served (0: none yet)",
            control_version.clone(),
        );

        let command_errors = Family::<CommandErrorLabels, Counter>::default();
        registry.register(
            "backend_command_errors",
            "Failed Redis commands redtap relies on (expiry, probe, lease, identity), by backend, \
             command and cause",
            command_errors.clone(),
        );
        let down_cause = Family::<DownCauseLabels, Gauge>::default();
        registry.register(
            "backend_down_cause",
            "1 for the cause a backend is down for (refused, timeout, auth, oom, readonly, ...)",
            down_cause.clone(),
        );

        let label = |name: &String| BackendLabel {
            backend: name.clone(),
        };
        Metrics {
            captured,
            backends: backend_names
                .iter()
                .map(|n| BackendMetrics {
                    written: written.get_or_create(&label(n)).clone(),
                    write_errors: errors.get_or_create(&label(n)).clone(),
                    batches: batches.get_or_create(&label(n)).clone(),
                })
                .collect(),
            weight: backend_names
                .iter()
                .map(|n| weight_f.get_or_create(&label(n)).clone())
                .collect(),
            target_share: backend_names
                .iter()
                .map(|n| target_f.get_or_create(&label(n)).clone())
                .collect(),
            actual_share: backend_names
                .iter()
                .map(|n| actual_f.get_or_create(&label(n)).clone())
                .collect(),
            backend_up: backend_names
                .iter()
                .map(|n| up_f.get_or_create(&label(n)).clone())
                .collect(),
            dropped,
            queue_depth,
            buffered,
            kernel_drops,
            frames_malformed,
            frames_ignored,
            frames_not_to_listen,
            capture_up,
            capture_reopens,
            admin_refused,
            control_stale,
            control_version,
            command_errors,
            down_cause,
            backend_names: backend_names.to_vec(),
            down_cause_shown: std::sync::Mutex::new(vec![None; backend_names.len()]),
            recent: Default::default(),
            sources: Default::default(),
            registry,
        }
    }

    /// Count one failed `command` (e.g. `"PEXPIRE"`, `"PING"`, `"EVALSHA"`) on backend number
    /// `backend`, for `cause`.
    pub fn command_error(&self, backend: usize, command: &'static str, cause: &Cause) {
        self.command_errors
            .get_or_create(&CommandErrorLabels {
                backend: self.backend_names[backend].clone(),
                command,
                cause: cause.label(),
            })
            .inc();
    }

    /// Failed `command`s on backend number `backend` so far, every cause.
    pub fn command_errors(&self, backend: usize, command: &'static str) -> u64 {
        Cause::LABELS
            .iter()
            .map(|&cause| {
                self.command_errors
                    .get_or_create(&CommandErrorLabels {
                        backend: self.backend_names[backend].clone(),
                        command,
                        cause,
                    })
                    .get()
            })
            .sum()
    }

    /// Count `n` records dropped for `reason`.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped[reason as usize].inc_by(n);
        }
    }

    /// Records dropped so far for `reason`.
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].get()
    }

    /// Count `n` more frames dropped by the kernel at `cause`.
    pub fn kernel_dropped(&self, cause: KernelDrop, n: u64) {
        if n > 0 {
            self.kernel_drops[cause as usize].inc_by(n);
        }
    }

    /// Frames dropped by the kernel so far at `cause`.
    pub fn kernel_drops(&self, cause: KernelDrop) -> u64 {
        self.kernel_drops[cause as usize].get()
    }

    /// Count a batch of frames that did not decode: `malformed` broken ones and `ignored`
    /// well-formed ones that start no TCP segment.
    pub fn frames_unparsed(&self, malformed: u64, ignored: u64) {
        if malformed > 0 {
            self.frames_malformed.inc_by(malformed);
        }
        if ignored > 0 {
            self.frames_ignored.inc_by(ignored);
        }
    }

    /// Frames that could not be decoded so far.
    pub fn frames_malformed(&self) -> u64 {
        self.frames_malformed.get()
    }

    /// Count `n` segments dropped in user space because they are not to the listen address.
    pub fn frames_not_to_listen(&self, n: u64) {
        if n > 0 {
            self.frames_not_to_listen.inc_by(n);
        }
    }

    /// Say whether capture runs (false while a failed packet capture is being reopened).
    pub fn set_capture_up(&self, up: bool) {
        self.capture_up.set(i64::from(up));
    }

    /// Whether capture runs.
    pub fn capture_up(&self) -> bool {
        self.capture_up.get() == 1
    }

    /// Count one reopening of the packet capture.
    pub fn capture_reopened(&self) {
        self.capture_reopens.inc();
    }

    /// Count one admin API connection refused at the cap.
    pub fn admin_refused(&self) {
        self.admin_refused.inc();
    }

    /// The control plane's state: stale or not, and the fleet version served.
    pub fn set_control(&self, stale: bool, version: u64) {
        self.control_stale.set(i64::from(stale));
        self.control_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// Set the number of records waiting in the capture queue.
    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.set(depth as i64);
    }

    /// Records waiting in the capture queue when the balancer last took a batch.
    pub fn queue_depth(&self) -> i64 {
        self.queue_depth.get()
    }

    /// The Prometheus text exposition, with derived gauges brought up to date first.
    pub fn render(&self, balance: &Balance, board: &Board, budget: &Budget) -> String {
        for (g, up) in self.backend_up.iter().zip(board.snapshot()) {
            g.set(i64::from(up));
        }
        {
            let mut shown = self
                .down_cause_shown
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (i, last) in shown.iter_mut().enumerate() {
                let now = board.cause(i).map(|c| c.label());
                let gauge = |cause: &'static str| {
                    self.down_cause.get_or_create(&DownCauseLabels {
                        backend: self.backend_names[i].clone(),
                        cause,
                    })
                };
                if let Some(old) = *last {
                    if Some(old) != now {
                        gauge(old).set(0);
                    }
                }
                if let Some(c) = now {
                    gauge(c).set(1);
                }
                *last = now;
            }
        }
        self.buffered.set(budget.used() as i64);
        for (i, v) in balance.view().iter().enumerate() {
            self.weight[i].set(i64::from(v.weight));
            self.target_share[i].set(v.target_share);
            self.actual_share[i].set(v.actual_share_since_change);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_is_counted_by_cause() {
        let metrics = Metrics::new(&["A".into(), "B".into()]);
        let oom = redis::RedisError::from((
            redis::ErrorKind::ExtensionError,
            "An error was signalled by the server",
            "OOM command not allowed when used memory > 'maxmemory'.".to_string(),
        ));
        let cause = Cause::from_redis_error(&oom);
        assert_eq!(cause, Cause::Oom);
        metrics.command_error(1, "PEXPIRE", &cause);
        assert_eq!(metrics.command_errors(1, "PEXPIRE"), 1);
        assert_eq!(metrics.command_errors(0, "PEXPIRE"), 0);
        let board = Board::new(2);
        let text = metrics.render(
            &Balance::new(vec!["A".into(), "B".into()], vec![1, 1]),
            &board,
            &Budget::new(1024),
        );
        assert!(text.contains(
            "redtap_backend_command_errors_total{backend=\"B\",command=\"PEXPIRE\",cause=\"oom\"} 1"
        ), "{text}");
    }
}
