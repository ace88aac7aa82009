//! Backend health: which backends can take records right now.
//!
//! Owns the up/down state of every backend and *why* a backend is down ([`Cause`]). Each writer
//! judges its own backend from the outcome of its writes and of PING probes ([`Tracker`]) and
//! publishes transitions on the shared [`Board`]; the router reads the board (one atomic load
//! per batch) to route around backends that are down, and is woken when something changes. The
//! hot path never locks: causes are kept beside the verdicts in `ArcSwapOption`s, written only on
//! failures and read only by the admin API, metrics and logs.
//!
//! A backend can also be *excluded* for the rest of the run ([`Board::exclude`]): it turned out
//! to be the same Redis as another backend, or another live redtap holds this agent's lease on
//! it (see [`crate::identity`]). An excluded backend is down whatever its writer sees, and takes
//! no new records in either `on_backend_down` mode.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

/// Why a backend (or one command on it) failed, precisely enough for an operator to act:
/// a wrong port and a wrong password never look alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Nothing listens at the address (TCP RST).
    Refused,
    /// No answer within the health timeout (host unreachable, server stopped or hung).
    Timeout,
    /// The name in the URL does not resolve.
    Dns,
    /// WRONGPASS, NOAUTH or another authentication failure.
    Auth,
    /// The ACL user may not run a command redtap needs (NOPERM).
    NoPerm,
    /// Redis is out of memory under its `maxmemory` policy (OOM).
    Oom,
    /// A read-only replica (READONLY).
    ReadOnly,
    /// Redis is loading its data set (LOADING).
    Loading,
    /// The TLS handshake failed (certificate, CA, protocol).
    Tls,
    /// The connection broke (reset, closed) or another I/O error.
    Io(String),
    /// The same Redis server and database as this other backend (found by `run_id`).
    SameServer(String),
    /// Another live redtap holds this agent's lease on the backend (`host pid start`).
    LeaseHeld(String),
    /// Any other error reply or failure, with its text.
    Other(String),
}

impl Cause {
    /// Every metric label, so dashboards can list them.
    pub const LABELS: [&'static str; 13] = [
        "refused",
        "timeout",
        "dns",
        "auth",
        "noperm",
        "oom",
        "readonly",
        "loading",
        "tls",
        "io",
        "same_server",
        "lease_held",
        "other",
    ];

    /// Classify a Redis client error.
    pub fn from_redis_error(e: &redis::RedisError) -> Cause {
        use redis::ErrorKind as K;
        let text = e.to_string();
        let code = e.code().unwrap_or("");
        if e.is_connection_refusal() {
            return Cause::Refused;
        }
        if e.is_timeout() || text.contains("timed out") || text.contains("deadline has elapsed") {
            return Cause::Timeout;
        }
        if e.kind() == K::AuthenticationFailed
            || matches!(code, "WRONGPASS" | "NOAUTH")
            || text.contains("WRONGPASS")
            || text.contains("NOAUTH")
        {
            return Cause::Auth;
        }
        if code == "NOPERM" || text.contains("NOPERM") {
            return Cause::NoPerm;
        }
        if code == "OOM" || text.contains("OOM command not allowed") {
            return Cause::Oom;
        }
        if e.kind() == K::ReadOnly || code == "READONLY" {
            return Cause::ReadOnly;
        }
        if e.kind() == K::BusyLoadingError {
            return Cause::Loading;
        }
        let lower = text.to_ascii_lowercase();
        if lower.contains("failed to lookup address")
            || lower.contains("name or service not known")
            || lower.contains("no address associated")
            || lower.contains("temporary failure in name resolution")
        {
            return Cause::Dns;
        }
        if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
            return Cause::Tls;
        }
        if e.is_io_error() {
            return Cause::Io(text);
        }
        Cause::Other(text)
    }

    /// Classify an error reply by its code, the first word Redis wrote (`OOM command not
    /// allowed…`, `READONLY You can't write…`).
    pub fn from_reply(text: &str) -> Cause {
        // Redis < 7 wraps an error inside a script: `ERR Error running script … -OOM …`.
        if text.contains("OOM command not allowed") {
            return Cause::Oom;
        }
        match text.split_whitespace().next().unwrap_or("") {
            "OOM" => Cause::Oom,
            "READONLY" => Cause::ReadOnly,
            "LOADING" => Cause::Loading,
            "NOPERM" => Cause::NoPerm,
            "WRONGPASS" | "NOAUTH" => Cause::Auth,
            _ => Cause::Other(text.to_string()),
        }
    }

    /// The metric label: one of [`Cause::LABELS`].
    pub fn label(&self) -> &'static str {
        match self {
            Cause::Refused => "refused",
            Cause::Timeout => "timeout",
            Cause::Dns => "dns",
            Cause::Auth => "auth",
            Cause::NoPerm => "noperm",
            Cause::Oom => "oom",
            Cause::ReadOnly => "readonly",
            Cause::Loading => "loading",
            Cause::Tls => "tls",
            Cause::Io(_) => "io",
            Cause::SameServer(_) => "same_server",
            Cause::LeaseHeld(_) => "lease_held",
            Cause::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for Cause {
    /// One phrase, as shown in `down_cause` and logs (never a password: Redis does not echo it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Refused => f.write_str("connection refused"),
            Cause::Timeout => f.write_str("timeout"),
            Cause::Dns => f.write_str("host name does not resolve"),
            Cause::Auth => f.write_str("authentication failed (WRONGPASS/NOAUTH)"),
            Cause::NoPerm => f.write_str("permission denied by ACL (NOPERM)"),
            Cause::Oom => f.write_str("out of memory (OOM)"),
            Cause::ReadOnly => f.write_str("read-only replica (READONLY)"),
            Cause::Loading => f.write_str("loading its data set (LOADING)"),
            Cause::Tls => f.write_str("TLS handshake failed"),
            Cause::Io(e) => write!(f, "connection error: {e}"),
            Cause::SameServer(other) => write!(f, "same server as backend {other}"),
            Cause::LeaseHeld(holder) => write!(f, "agent lease held by {holder}"),
            Cause::Other(e) => write!(f, "error: {e}"),
        }
    }
}

/// Health thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive failures (write errors, timeouts, failed probes) that mark a backend down.
    pub down_after: u32,
    /// Consecutive successful probes that mark a down backend up again.
    pub up_after: u32,
    /// How long a command may take before it counts as a failure.
    pub timeout: Duration,
    /// How often an idle or down backend is PINGed.
    pub probe_every: Duration,
}

impl Default for HealthConfig {
    /// Detects a dead Redis (refused connections) in about 0.1 s under traffic, 0.75–1 s when
    /// idle (PINGs), and a hung one in 2 × 750 ms + backoff ≈ 1.6 s.
    fn default() -> Self {
        HealthConfig {
            down_after: 2,
            up_after: 2,
            timeout: Duration::from_millis(750),
            probe_every: Duration::from_millis(250),
        }
    }
}

/// The shared up/down state of every backend.
#[derive(Debug)]
pub struct Board {
    up: Vec<AtomicBool>,
    /// Why each backend last failed; kept while it is down, cleared when it comes back.
    causes: Vec<ArcSwapOption<Cause>>,
    /// Set once, for the rest of the run (see the module doc).
    excluded: Vec<ArcSwapOption<Cause>>,
    /// Until when (ms since the epoch) each writer may write: the identity guard's lease,
    /// renewed, less a margin. `u64::MAX` where no guard runs.
    cleared_until: Vec<AtomicU64>,
    /// Bumped on every transition.
    generation: AtomicU64,
    changed: Notify,
}

impl Board {
    /// `n` backends, all assumed up until proven otherwise.
    pub fn new(n: usize) -> Self {
        Board {
            up: (0..n).map(|_| AtomicBool::new(true)).collect(),
            causes: (0..n).map(|_| ArcSwapOption::empty()).collect(),
            excluded: (0..n).map(|_| ArcSwapOption::empty()).collect(),
            cleared_until: (0..n).map(|_| AtomicU64::new(u64::MAX)).collect(),
            generation: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    /// Whether backend `i` is up (and not excluded).
    pub fn is_up(&self, i: usize) -> bool {
        self.up[i].load(Ordering::Acquire) && !self.is_excluded(i)
    }

    /// Whether backend `i` was excluded for the rest of the run.
    pub fn is_excluded(&self, i: usize) -> bool {
        self.excluded[i].load().is_some()
    }

    /// Let backend `i`'s writer write until `until_ms` (ms since the epoch; 0: not now). Set by
    /// the identity guard from the lease it holds there, so that a writer whose lease may have
    /// passed to another agent (a long pause, renewals failing) stops before the lease expires.
    pub fn clear_until(&self, i: usize, until_ms: u64) {
        self.cleared_until[i].store(until_ms, Ordering::Release);
    }

    /// Whether backend `i`'s writer may write at `now_ms`: not excluded, and cleared.
    pub fn may_write(&self, i: usize, now_ms: u64) -> bool {
        !self.is_excluded(i) && now_ms < self.cleared_until[i].load(Ordering::Acquire)
    }

    /// Why backend `i` is down: its exclusion, else the last failure while down; `None` while up.
    pub fn cause(&self, i: usize) -> Option<Cause> {
        if let Some(c) = self.excluded[i].load_full() {
            return Some((*c).clone());
        }
        if !self.up[i].load(Ordering::Acquire) {
            return self.causes[i].load_full().map(|c| (*c).clone());
        }
        None
    }

    /// Record why backend `i` failed (shown while it is down).
    pub fn set_cause(&self, i: usize, cause: Cause) {
        self.causes[i].store(Some(Arc::new(cause)));
    }

    /// Take backend `i` out of service for the rest of the run, for `cause`. Returns false if
    /// it already was.
    pub fn exclude(&self, i: usize, cause: Cause) -> bool {
        let was = self.excluded[i].swap(Some(Arc::new(cause)));
        if was.is_none() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
        was.is_none()
    }

    /// Up/down of every backend, in order.
    pub fn snapshot(&self) -> Vec<bool> {
        (0..self.up.len()).map(|i| self.is_up(i)).collect()
    }

    /// Changes whenever any backend goes up or down.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Resolves at the next transition.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn set(&self, i: usize, up: bool) {
        if up {
            // The next outage gets its own cause, not this one's.
            self.causes[i].store(None);
        }
        if self.up[i].swap(up, Ordering::AcqRel) != up {
            self.generation.fetch_add(1, Ordering::AcqRel);
            // One waiter (the dispatcher); a stored permit means a change between its check and
            // its wait is not missed.
            self.changed.notify_one();
        }
    }
}

/// What a writer learned from one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The backend just went down.
    Down,
    /// The backend just came back up.
    Up,
}

/// One writer's judge of its backend: counts consecutive outcomes and flips the board.
#[derive(Debug)]
pub struct Tracker {
    cfg: HealthConfig,
    index: usize,
    up: bool,
    failures: u32,
    successes: u32,
    /// Why the last failure happened, when the caller said.
    last_cause: Option<Cause>,
}

impl Tracker {
    /// The tracker of backend `index`, starting up.
    pub fn new(cfg: HealthConfig, index: usize) -> Self {
        Tracker {
            cfg,
            index,
            up: true,
            failures: 0,
            successes: 0,
            last_cause: None,
        }
    }

    /// Whether the backend is considered up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The thresholds in force.
    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    /// Why the last failure happened, if it was recorded with [`record_failure`](Self::record_failure).
    pub fn cause(&self) -> Option<&Cause> {
        self.last_cause.as_ref()
    }

    /// Record a failure and why it happened: the cause is published on the board (so `down_cause`
    /// in the API says it) and returned by [`cause`](Self::cause) for the writer's log line.
    pub fn record_failure(&mut self, cause: Cause, board: &Board) -> Option<Transition> {
        board.set_cause(self.index, cause.clone());
        self.last_cause = Some(cause);
        self.record(false, board)
    }

    /// Record one outcome; publish and return a transition if it caused one. While down, only
    /// probes count towards coming back up.
    pub fn record(&mut self, ok: bool, board: &Board) -> Option<Transition> {
        if ok {
            if self.last_cause.take().is_some() && self.up {
                // A failure that did not bring it down is forgotten with its cause.
                board.causes[self.index].store(None);
            }
            self.failures = 0;
            self.successes += 1;
            if !self.up && self.successes >= self.cfg.up_after {
                self.up = true;
                self.last_cause = None;
                board.set(self.index, true);
                return Some(Transition::Up);
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.up && self.failures >= self.cfg.down_after {
                self.up = false;
                board.set(self.index, false);
                return Some(Transition::Down);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_after_consecutive_outcomes() {
        let board = Board::new(2);
        let mut t = Tracker::new(HealthConfig::default(), 1);
        assert_eq!(t.record(false, &board), None);
        assert_eq!(t.record(true, &board), None); // a success resets the count
        assert_eq!(t.record(false, &board), None);
        assert_eq!(t.record(false, &board), Some(Transition::Down));
        assert!(!board.is_up(1) && board.is_up(0));
        assert_eq!(board.generation(), 1);
        assert_eq!(t.record(true, &board), None);
        assert_eq!(t.record(true, &board), Some(Transition::Up));
        assert!(board.is_up(1));
        assert_eq!(board.generation(), 2);
    }

    #[test]
    fn cause_is_shown_while_down_and_exclusion_wins() {
        let board = Board::new(2);
        let mut t = Tracker::new(HealthConfig::default(), 0);
        t.record_failure(Cause::Auth, &board);
        assert_eq!(board.cause(0), None, "still up after one failure");
        t.record_failure(Cause::Refused, &board);
        assert_eq!(board.cause(0), Some(Cause::Refused));
        assert_eq!(t.cause(), Some(&Cause::Refused));
        t.record(true, &board);
        t.record(true, &board);
        assert_eq!(board.cause(0), None);
        assert!(board.exclude(1, Cause::SameServer("A".into())));
        assert!(!board.exclude(1, Cause::SameServer("A".into())));
        assert!(!board.is_up(1));
        assert_eq!(board.snapshot(), vec![true, false]);
        assert_eq!(
            board.cause(1).unwrap().to_string(),
            "same server as backend A"
        );
    }

    #[test]
    fn error_replies_are_told_apart_by_their_code() {
        assert_eq!(
            Cause::from_reply("OOM command not allowed when used memory > 'maxmemory'."),
            Cause::Oom
        );
        assert_eq!(
            Cause::from_reply("READONLY You can't write"),
            Cause::ReadOnly
        );
        assert_eq!(
            Cause::from_reply("LOADING Redis is loading"),
            Cause::Loading
        );
        assert_eq!(Cause::from_reply("NOPERM no permissions"), Cause::NoPerm);
        assert_eq!(
            Cause::from_reply("MISCONF snapshots failing"),
            Cause::Other("MISCONF snapshots failing".into())
        );
    }

    #[test]
    fn redis_errors_are_told_apart() {
        let refused =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(Cause::from_redis_error(&refused), Cause::Refused);
        let oom = redis::RedisError::from((
            redis::ErrorKind::ExtensionError,
            "An error was signalled by the server",
            "OOM command not allowed when used memory > 'maxmemory'.".to_string(),
        ));
        assert_eq!(Cause::from_redis_error(&oom).label(), "oom");
        let ro = redis::RedisError::from((redis::ErrorKind::ReadOnly, "read only"));
        assert_eq!(Cause::from_redis_error(&ro), Cause::ReadOnly);
        let auth = redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert_eq!(Cause::from_redis_error(&auth), Cause::Auth);
        let timeout =
            redis::RedisError::from((redis::ErrorKind::IoError, "timed out waiting for Redis"));
        assert_eq!(Cause::from_redis_error(&timeout), Cause::Timeout);
    }
}
