//! Who each backend is, and who writes to it: one Redis, one writer.
//!
//! Owns: the start-up check of every backend (one bounded attempt each, logged as "up" or the
//! precise [`Cause`]), the refusal of two backends that are the same Redis server and database
//! (`INFO server` → `run_id`, plus the db number), and this agent's **lease** on each backend —
//! `<prefix>:lease:<agent>` = `host pid start-time pid-namespace`, taken with `SET NX PX`, renewed every third
//! of its TTL by a compare-and-renew script, released on clean shutdown — so that two live redtap
//! processes with the same agent name never write one stream.
//!
//! At start a duplicate or a lease held by a live process is refused (a [`ConfigError`], exit
//! 64). A backend unreachable at start is checked by its [`Guard`] task when first reached; a
//! duplicate or a held lease found then *excludes* it for the rest of the run
//! ([`Board::exclude`]): marked down with cause `same server as backend X` or `agent lease held
//! by …`, it takes no new records, and the operator is told in the log, the API and metrics.
//!
//! While a backend is down (and not excluded) the guard also diagnoses it — one connection and a
//! small expiring `SET` per second — so `down_cause` says *why* even when the writer only saw a
//! failure.
//!
//! A lease left by a process that died without releasing it (SIGKILL) is taken over at once
//! when its holder ran on this host and that pid is gone or started at another time; otherwise
//! it expires after [`LEASE_TTL`]. This module never touches records.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::connect::Conn;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{BackendConfig, Config, ConfigError};
use crate::connect::Timeouts;
use crate::health::{Board, Cause};
use crate::metrics::Metrics;

/// How long a lease lives without renewal: how long a crashed agent on another host blocks a
/// new one with its name.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often a held lease is renewed: a third of its TTL, so two renewals may fail in a row.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often an unidentified backend is retried and a down backend diagnosed.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// A writer stops this long before its lease could expire (clocks and round trips).
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// Until when (ms since the epoch) a lease set or renewed by a command sent at `sent_ms` lets
/// its writer write: Redis ran the command after it was sent, so the lease lives at least until
/// `sent_ms + LEASE_TTL`. The margin covers clock drift and a pipeline still on its way (one
/// health timeout).
fn cleared_until(sent_ms: u64, timeout: Duration) -> u64 {
    let margin = LEASE_MARGIN.max(timeout).min(LEASE_TTL / 2);
    sent_ms + (LEASE_TTL - margin).as_millis() as u64
}

fn now_ms() -> u64 {
    crate::record::now_us() / 1000
}

/// Extend the lease only if it is still ours.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                     return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Delete the lease only if it is still ours.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";
/// Replace a stale lease, only if it is still the stale value we saw.
const TAKE_OVER: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                         redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 \
                         else return 0 end";

/// `EVAL script 1 key` (plain EVAL: a script this small costs nothing to resend).
fn eval(script: &str, key: &str) -> redis::Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(script).arg(1).arg(key);
    c
}

/// A Redis server and database: equal ids mean one keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerId {
    /// `run_id` from `INFO server` (changes when the server restarts).
    pub run_id: String,
    /// The database number of the URL.
    pub db: i64,
}

/// This process, as written in its leases: `host pid start-time pid-namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Process start time, clock ticks since boot (`/proc/<pid>/stat` field 22), so a reused pid
    /// is not mistaken for the holder.
    pub start: u64,
    /// The pid namespace (`/proc/self/ns/pid`), so that containers sharing the host's name
    /// never judge each other's pids.
    pub pidns: String,
}

impl Holder {
    /// This process.
    pub fn me() -> Holder {
        let pid = std::process::id();
        Holder {
            host: hostname(),
            pid,
            start: start_time(pid).unwrap_or(0),
            pidns: pid_namespace(),
        }
    }

    /// The lease value.
    pub fn value(&self) -> String {
        format!("{} {} {} {}", self.host, self.pid, self.start, self.pidns)
    }

    /// Parse a lease value.
    pub fn parse(v: &str) -> Option<Holder> {
        let mut it = v.split(' ');
        let (host, pid, start) = (it.next()?, it.next()?, it.next()?);
        Some(Holder {
            host: host.to_string(),
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
            pidns: it.next().unwrap_or("").to_string(),
        })
    }

    /// Whether this holder is certainly dead: it ran on this host in this pid namespace, and its
    /// pid is gone, or now belongs to a process started at another time. (A holder elsewhere is
    /// never judged: it may be alive. Nor is one whose start time is unknown, or whose process
    /// we cannot see — `/proc` mounted `hidepid`, another user: `kill(pid, 0)` says whether the
    /// pid exists even then.)
    pub fn is_dead_here(&self) -> bool {
        if self.host != hostname() || self.pidns != pid_namespace() || self.start == 0 {
            return false;
        }
        match start_time(self.pid) {
            Some(start) => start != self.start,
            None => pid_is_gone(self.pid),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host {} pid {}", self.host, self.pid)
    }
}

fn hostname() -> String {
    let h = gethostname::gethostname().to_string_lossy().into_owned();
    let h: String = h.chars().filter(|c| !c.is_whitespace()).collect();
    if h.is_empty() {
        "unknown".into()
    } else {
        h
    }
}

/// Whether no process has this pid (`kill(pid, 0)` fails with ESRCH; EPERM means it exists).
fn pid_is_gone(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH)
}

/// This process's pid namespace, e.g. `pid:[4026531836]`.
fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.to_string_lossy().replace(' ', "_"))
        .unwrap_or_else(|_| "?".into())
}

/// Start time of process `pid` in clock ticks since boot, or `None` if there is no such process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The lease key of `agent`.
pub fn lease_key(prefix: &str, agent: &str) -> String {
    format!("{prefix}:lease:{agent}")
}

/// A connection to `b` with connect and answer times bounded by `timeout`; a failure as the
/// health [`Cause`] it counts as.
async fn connect(b: &BackendConfig, timeout: Duration) -> Result<Conn, Cause> {
    crate::connect::connect_backend(b, Timeouts::both(timeout))
        .await
        .map_err(|e| e.cause())
}

/// Ask the server who it is. The error names the failed command.
async fn identify(b: &BackendConfig, conn: &mut Conn) -> Result<ServerId, (&'static str, Cause)> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .map_err(|e| ("INFO", Cause::from_redis_error(&e)))?;
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|s| s.trim().to_string())
        .ok_or_else(|| ("INFO", Cause::Other("INFO server has no run_id".into())))?;
    let db = b
        .client()
        .map(|c| c.get_connection_info().redis.db)
        .unwrap_or(0);
    warn_on_clock_skew(b, &info, crate::record::now_us());
    Ok(ServerId { run_id, db })
}

/// Retention is an absolute expiry computed from this host's clock and enforced by Redis's:
/// say so when the two differ by more than [`CLOCK_SKEW_WARN`] (records would then vanish early,
/// or stay late, by the skew). `INFO server`'s `server_time_usec` is Redis's clock.
fn warn_on_clock_skew(b: &BackendConfig, info: &str, now_us: u64) -> Option<i64> {
    let redis_us: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("server_time_usec:"))?
        .trim()
        .parse()
        .ok()?;
    let skew_ms = i64::try_from((i128::from(redis_us) - i128::from(now_us)) / 1000).ok()?;
    if skew_ms.unsigned_abs() > CLOCK_SKEW_WARN.as_millis() as u64 {
        warn!(backend = %b.name, skew_ms,
              "this host's clock and the backend's differ by {skew_ms} ms (Redis ahead if \
               positive): records expire that much early (or late); synchronise the clocks (NTP)");
    }
    Some(skew_ms)
}

/// Clock difference with a backend above which redtap warns (retention is promised to ±1 s).
const CLOCK_SKEW_WARN: Duration = Duration::from_millis(250);

/// What a lease attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Lease {
    /// Ours now.
    Held,
    /// A live (or not provably dead) other process holds it.
    Busy(String),
}

async fn acquire(conn: &mut Conn, key: &str, me: &str) -> Result<Lease, (&'static str, Cause)> {
    let ttl = LEASE_TTL.as_millis() as u64;
    // A lease that expires or is taken over between our commands needs another round; a few
    // are plenty (each round either sees a holder or finds the key free).
    let mut current = String::new();
    for _ in 0..3 {
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(me)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .query_async(conn)
            .await
            .map_err(|e| ("SET", Cause::from_redis_error(&e)))?;
        if set.is_some() {
            return Ok(Lease::Held);
        }
        let Some(now) = redis::cmd("GET")
            .arg(key)
            .query_async::<Option<String>>(conn)
            .await
            .map_err(|e| ("GET", Cause::from_redis_error(&e)))?
        else {
            continue; // it expired between the two commands
        };
        if now == me {
            return Ok(Lease::Held);
        }
        current = now;
        if !Holder::parse(&current).is_some_and(|h| h.is_dead_here()) {
            break;
        }
        let took: i64 = eval(TAKE_OVER, key)
            .arg(&current)
            .arg(me)
            .arg(ttl)
            .query_async(conn)
            .await
            .map_err(|e| ("EVAL", Cause::from_redis_error(&e)))?;
        if took == 1 {
            info!(key, stale = %current, "took over the lease of a redtap that is gone");
            return Ok(Lease::Held);
        }
    }
    let holder = Holder::parse(&current).map_or(current, |h| h.to_string());
    Ok(Lease::Busy(holder))
}

/// One backend at start: its connection and identity, or the failed command and why.
type Reached = Result<(Conn, ServerId), (&'static str, Cause)>;

/// What the start-up check learned of one backend.
struct Found {
    conn: Option<Conn>,
    /// Why it could not be reached at start, and by which command.
    failed: Option<(&'static str, Cause)>,
    id: Option<ServerId>,
    lease: bool,
    /// When the command that took the lease was sent (ms since the epoch).
    lease_sent_ms: u64,
    /// The lease was refused by an ACL (NOPERM).
    lease_denied: bool,
}

/// The per-backend guards, created by [`check_at_start`] and run by [`Guard::spawn`].
pub struct Guard {
    backends: Vec<BackendConfig>,
    key: String,
    me: String,
    timeout: Duration,
    probe_key: String,
    found: Vec<Found>,
    ids: Arc<Mutex<Vec<Option<ServerId>>>>,
}

/// Try each backend once (bounded by the health timeout), log "up" or the precise cause, refuse
/// two backends that are one server and database, and take this agent's lease on each reached
/// backend. A backend that cannot be reached is not an error: redtap buffers and retries.
pub async fn check_at_start(config: &Config) -> Result<Guard, ConfigError> {
    let timeout = config.health.timeout;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, b) in config.backends.iter().enumerate() {
        let b = b.clone();
        tasks.spawn(async move {
            let r = async {
                let mut conn = connect(&b, timeout).await.map_err(|c| ("connect", c))?;
                let id = tokio::time::timeout(timeout, identify(&b, &mut conn))
                    .await
                    .unwrap_or(Err(("INFO", Cause::Timeout)))?;
                Ok::<_, (&'static str, Cause)>((conn, id))
            }
            .await;
            (i, r)
        });
    }
    let mut results: Vec<Option<Reached>> = (0..config.backends.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, r) =
            joined.map_err(|e| ConfigError::Usage(format!("start-up check failed: {e}")))?;
        results[i] = Some(r);
    }
    let mut guard = Guard {
        backends: config.backends.clone(),
        key: lease_key(&config.prefix, &config.agent),
        me: Holder::me().value(),
        timeout,
        probe_key: format!("{}:probe:{}", config.prefix, config.agent),
        found: Vec::new(),
        ids: Arc::new(Mutex::new(vec![None; config.backends.len()])),
    };
    for (b, r) in config.backends.iter().zip(results) {
        match r.expect("every task answered") {
            Ok((conn, id)) => {
                info!(backend = %b.name, url = %b.redacted_url(), run_id = %id.run_id,
                      db = id.db, "backend up at start");
                guard.found.push(Found {
                    conn: Some(conn),
                    failed: None,
                    id: Some(id),
                    lease: false,
                    lease_sent_ms: 0,
                    lease_denied: false,
                });
            }
            Err((command, cause)) => {
                warn!(backend = %b.name, url = %b.redacted_url(), %cause, command,
                      "backend not reachable at start; its records wait and it is retried \
                       (its identity and lease are checked when it is first reached)");
                guard.found.push(Found {
                    conn: None,
                    failed: Some((command, cause)),
                    id: None,
                    lease: false,
                    lease_sent_ms: 0,
                    lease_denied: false,
                });
            }
        }
    }
    for i in 0..guard.found.len() {
        let Some(id) = guard.found[i].id.clone() else {
            continue;
        };
        if let Some(j) = (0..i).find(|&j| guard.found[j].id.as_ref() == Some(&id)) {
            return Err(ConfigError::Usage(format!(
                "backends {:?} and {:?} are the same Redis server (run_id {}) and database {}: \
                 two writers would share one stream and every record would be read twice; \
                 remove one of them",
                guard.backends[j].name, guard.backends[i].name, id.run_id, id.db
            )));
        }
        guard.ids.lock().expect("not poisoned")[i] = Some(id);
    }
    for i in 0..guard.found.len() {
        let Some(conn) = guard.found[i].conn.as_mut() else {
            continue;
        };
        let sent = now_ms();
        match tokio::time::timeout(timeout * 2, acquire(conn, &guard.key, &guard.me))
            .await
            .unwrap_or(Err(("SET", Cause::Timeout)))
        {
            Ok(Lease::Held) => {
                guard.found[i].lease = true;
                guard.found[i].lease_sent_ms = sent;
            }
            Ok(Lease::Busy(holder)) => {
                let name = guard.backends[i].name.clone();
                guard.release_all().await;
                return Err(ConfigError::Usage(format!(
                    "agent {:?} already runs on backend {name:?}: its lease {} is held by \
                     {holder} (another live redtap with the same --agent); stop that one or \
                     give this one another --agent",
                    config.agent, guard.key
                )));
            }
            Err((command, cause)) => {
                warn!(backend = %guard.backends[i].name, command, %cause,
                      "cannot take this agent's lease now (another redtap with the same \
                       --agent would not be detected on this backend until it is taken)");
                guard.found[i].lease_denied = cause == Cause::NoPerm;
            }
        }
    }
    Ok(guard)
}

impl Guard {
    /// Release every lease this process holds (compare-and-delete), each bounded by the health
    /// timeout.
    async fn release_all(&mut self) {
        for (i, f) in self.found.iter_mut().enumerate() {
            if !f.lease {
                continue;
            }
            let Some(conn) = f.conn.as_mut() else {
                continue;
            };
            let released = tokio::time::timeout(
                self.timeout,
                eval(RELEASE, &self.key)
                    .arg(&self.me)
                    .query_async::<i64>(conn),
            )
            .await;
            match released {
                Ok(Ok(_)) => f.lease = false,
                _ => warn!(backend = %self.backends[i].name,
                           "could not release the lease; it expires by itself"),
            }
        }
    }

    /// Run one guard task per backend until `stop` fires, then release the leases. Await the
    /// handle after the writers have finished.
    pub fn spawn(
        self,
        board: Arc<Board>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let Guard {
            backends,
            key,
            me,
            timeout,
            probe_key,
            found,
            ids,
        } = self;
        let shared = Arc::new(Shared {
            names: backends.iter().map(|b| b.name.clone()).collect(),
            key,
            me,
            timeout,
            probe_key,
            ids,
            board,
            metrics,
        });
        let mut set = tokio::task::JoinSet::new();
        for (i, (b, f)) in backends.into_iter().zip(found).enumerate() {
            // What the start-up check learned shows as soon as the writer marks it down.
            if let Some((command, cause)) = f.failed {
                shared.metrics.command_error(i, command, &cause);
                shared.board.set_cause(i, cause);
            }
            // The writer writes only while this agent's lease there is held: from the start-up
            // check's lease, or once the guard has checked the backend and taken it. Where an
            // ACL forbids the lease, it runs without.
            shared.board.clear_until(
                i,
                match (f.lease, f.lease_denied) {
                    (true, _) => cleared_until(f.lease_sent_ms, shared.timeout),
                    (false, true) if f.id.is_some() => u64::MAX,
                    _ => 0,
                },
            );
            let task = One {
                i,
                b,
                conn: f.conn,
                identified: f.id.is_some(),
                lease: f.lease,
                lease_wanted: !f.lease_denied,
                shared: shared.clone(),
            };
            set.spawn(task.run(stop.clone()));
        }
        tokio::spawn(async move { while set.join_next().await.is_some() {} })
    }
}

struct Shared {
    names: Vec<String>,
    key: String,
    me: String,
    timeout: Duration,
    probe_key: String,
    ids: Arc<Mutex<Vec<Option<ServerId>>>>,
    board: Arc<Board>,
    metrics: Arc<Metrics>,
}

/// One backend's guard.
struct One {
    i: usize,
    b: BackendConfig,
    conn: Option<Conn>,
    identified: bool,
    lease: bool,
    /// False once the lease was refused by an ACL (NOPERM): retrying would only repeat it.
    lease_wanted: bool,
    shared: Arc<Shared>,
}

impl One {
    async fn run(mut self, stop: CancellationToken) {
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew = tokio::time::interval(RENEW_EVERY);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_cause: Option<Cause> = None;
        loop {
            // Each round trip races `stop`, so shutdown never waits on a slow Redis here.
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = retry.tick() => tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.check(&mut last_cause) => {}
                },
                _ = renew.tick(), if self.lease => tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.renew() => {}
                },
            }
        }
        // Compare-and-delete even when no lease is recorded: shutdown may have cut a lease
        // attempt short after Redis ran it. (It deletes only a lease that is ours.)
        if let Some(conn) = self.conn.as_mut() {
            let r = tokio::time::timeout(
                self.shared.timeout,
                eval(RELEASE, &self.shared.key)
                    .arg(&self.shared.me)
                    .query_async::<i64>(conn),
            )
            .await;
            if self.lease && !matches!(r, Ok(Ok(_))) {
                warn!(backend = %self.b.name, "could not release the lease; it expires by itself");
            }
        }
    }

    /// Once a second: first contact with a backend not reached yet, the lease not taken yet,
    /// or why a down backend fails.
    async fn check(&mut self, last_cause: &mut Option<Cause>) {
        if self.shared.board.is_excluded(self.i) {
            return;
        }
        if self.lease && !self.shared.board.may_write(self.i, now_ms()) {
            // Cleared no longer (renewals failed, e.g. an outage): renew now, not at the next
            // renewal tick, so the writer resumes as soon as the backend answers.
            self.renew().await;
            return;
        }
        if !self.identified {
            self.first_contact().await;
        } else if !self.lease && self.lease_wanted && self.shared.board.is_up(self.i) {
            // Not taken at start (e.g. Redis out of memory then): take it now.
            self.take_lease().await;
        } else if !self.shared.board.is_up(self.i) {
            let cause = self.diagnose().await;
            if cause.is_some() && cause != *last_cause {
                let c = cause.clone().expect("checked");
                error!(backend = %self.b.name, cause = %c, "backend DOWN: {c}");
                self.shared.board.set_cause(self.i, c);
            }
            *last_cause = cause;
        } else {
            *last_cause = None;
        }
    }

    fn failed(&mut self, command: &'static str, cause: &Cause) {
        self.shared.metrics.command_error(self.i, command, cause);
        if !matches!(
            cause,
            Cause::NoPerm | Cause::Oom | Cause::ReadOnly | Cause::Other(_)
        ) {
            self.conn = None;
        }
    }

    async fn conn(&mut self) -> Result<&mut Conn, Cause> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.b, self.shared.timeout).await?);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// A backend unreachable at start answers: check its identity and take the lease.
    async fn first_contact(&mut self) {
        let t = self.shared.timeout;
        let b = self.b.clone();
        let id = match self.conn().await {
            Ok(conn) => tokio::time::timeout(t, identify(&b, conn))
                .await
                .unwrap_or(Err(("INFO", Cause::Timeout))),
            Err(_) => return, // still unreachable; the writer and diagnosis say why
        };
        let id = match id {
            Ok(id) => id,
            // INFO refused by an ACL, or a server without a run_id: that will not change, and
            // the backend works; run without the duplicate check rather than never writing.
            Err((command, cause @ (Cause::NoPerm | Cause::Other(_)))) => {
                warn!(backend = %self.b.name, command, %cause,
                      "cannot tell which Redis server this is; running without the check for \
                       two backends on one server");
                self.failed(command, &cause);
                self.identified = true;
                self.take_lease().await;
                return;
            }
            Err((command, cause)) => {
                self.failed(command, &cause);
                return;
            }
        };
        {
            let mut ids = self.shared.ids.lock().expect("not poisoned");
            if let Some(j) = ids.iter().position(|o| o.as_ref() == Some(&id)) {
                let other = self.shared.names[j].clone();
                drop(ids);
                error!(backend = %self.b.name, other = %other, run_id = %id.run_id, db = id.db,
                       "backend {} is the same Redis server and database as backend {other}: \
                        excluded for the rest of this run (no new records); remove one of them",
                       self.b.name);
                self.shared.board.exclude(self.i, Cause::SameServer(other));
                return;
            }
            ids[self.i] = Some(id.clone());
        }
        self.identified = true;
        info!(backend = %self.b.name, run_id = %id.run_id, db = id.db, "backend reached");
        self.take_lease().await;
    }

    async fn take_lease(&mut self) {
        let t = self.shared.timeout;
        let shared = self.shared.clone();
        let sent = now_ms();
        let r = match self.conn().await {
            Ok(conn) => tokio::time::timeout(t * 2, acquire(conn, &shared.key, &shared.me))
                .await
                .unwrap_or(Err(("SET", Cause::Timeout))),
            Err(cause) => Err(("connect", cause)),
        };
        match r {
            Ok(Lease::Held) => {
                self.lease = true;
                shared.board.clear_until(self.i, cleared_until(sent, t));
            }
            Ok(Lease::Busy(holder)) => {
                error!(backend = %self.b.name, key = %shared.key, %holder,
                       "another live redtap with this agent name writes to this backend: \
                        excluded for the rest of this run (no new records)");
                self.lease = false;
                shared.board.exclude(self.i, Cause::LeaseHeld(holder));
            }
            Err((command, cause)) => {
                if cause == Cause::NoPerm {
                    warn!(backend = %self.b.name, command, %cause,
                          "the ACL forbids this agent's lease; running without it");
                    self.lease_wanted = false;
                    shared.board.clear_until(self.i, u64::MAX);
                } else {
                    debug!(backend = %self.b.name, command, %cause,
                           "cannot take the lease; will retry");
                }
                self.failed(command, &cause);
            }
        }
    }

    async fn renew(&mut self) {
        let t = self.shared.timeout;
        let shared = self.shared.clone();
        let sent = now_ms();
        let r = match self.conn().await {
            Ok(conn) => tokio::time::timeout(
                t,
                eval(RENEW, &shared.key)
                    .arg(&shared.me)
                    .arg(LEASE_TTL.as_millis() as u64)
                    .query_async::<i64>(conn),
            )
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::IoError,
                    "timed out waiting for Redis",
                )))
            }),
            Err(_) => return, // unreachable: the lease outlives short outages; renewed after
        };
        match r {
            Ok(1) => shared.board.clear_until(self.i, cleared_until(sent, t)),
            Ok(_) => {
                warn!(backend = %self.b.name, key = %shared.key,
                      "the lease had expired (backend unreachable for a while?); taking it again");
                self.lease = false;
                shared.board.clear_until(self.i, 0);
                self.take_lease().await;
            }
            Err(e) => {
                let cause = Cause::from_redis_error(&e);
                if cause == Cause::NoPerm {
                    warn!(backend = %self.b.name, %cause,
                          "the ACL forbids renewing this agent's lease (EVAL); running without it");
                    self.lease = false;
                    self.lease_wanted = false;
                    shared.board.clear_until(self.i, u64::MAX);
                } else {
                    warn!(backend = %self.b.name, %cause, "lease renewal failed; will retry");
                }
                self.failed("EVAL", &cause);
            }
        }
    }

    /// Why the backend fails now, by one connection and a small expiring write; `None` if it
    /// works (the writer will bring it back up).
    async fn diagnose(&mut self) -> Option<Cause> {
        let t = self.shared.timeout;
        let key = self.shared.probe_key.clone();
        let conn = match self.conn().await {
            Ok(c) => c,
            Err(cause) => return Some(cause),
        };
        let r = tokio::time::timeout(
            t,
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(2000)
                .query_async::<()>(conn),
        )
        .await;
        match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                let cause = Cause::from_redis_error(&e);
                self.failed("SET", &cause);
                Some(cause)
            }
            Err(_) => {
                self.failed("SET", &Cause::Timeout);
                Some(Cause::Timeout)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_is_read_from_info_server() {
        let b = crate::config::parse_backend_flag("A=redis://127.0.0.1:6379@1").unwrap();
        let info = "# Server\r\nrun_id:x\r\nserver_time_usec:1000000000\r\n";
        assert_eq!(warn_on_clock_skew(&b, info, 1_000_000_000), Some(0));
        assert_eq!(warn_on_clock_skew(&b, info, 999_000_000), Some(1000));
        assert_eq!(
            warn_on_clock_skew(&b, info, 3_000_000_000),
            Some(-2_000_000)
        );
        assert_eq!(warn_on_clock_skew(&b, "run_id:x", 1), None);
    }

    #[test]
    fn holder_round_trips_and_judges_only_this_host() {
        let me = Holder::me();
        assert_eq!(Holder::parse(&me.value()), Some(me.clone()));
        assert!(!me.is_dead_here(), "this process is alive");
        let reused = Holder {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(reused.is_dead_here(), "same pid, another start time");
        let elsewhere = Holder {
            host: format!("{}-elsewhere", me.host),
            pid: u32::MAX,
            ..me.clone()
        };
        assert!(
            !elsewhere.is_dead_here(),
            "another host's holder is never judged"
        );
        let container = Holder {
            pidns: "pid:[1]".into(),
            pid: u32::MAX,
            ..me
        };
        assert!(
            !container.is_dead_here(),
            "another pid namespace is never judged"
        );
        assert_eq!(Holder::parse("garbage"), None);
        let unknown_start = Holder {
            start: 0,
            pid: u32::MAX - 1,
            ..Holder::me()
        };
        assert!(
            !unknown_start.is_dead_here(),
            "a holder whose start time was unknown is never judged"
        );
        let gone = Holder {
            pid: 0x3fff_fff0, // above pid_max: no such process
            ..Holder::me()
        };
        assert!(gone.is_dead_here(), "a pid that does not exist is dead");
    }
}
