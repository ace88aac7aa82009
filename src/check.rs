//! `redtap check`: will `redtap run` with this configuration work on this host?
//!
//! Owns the pre-flight: every backend connected to as the writers connect ([`crate::connect`]:
//! AUTH, TLS; a Redis Cluster through each of its primaries, which are listed), asked who it is (`INFO`: version, role, `maxmemory-policy`, `run_id`), and given
//! one small expiring write under the prefix (`SET <prefix>:check:<agent> 1 PX 10000`, then
//! `DEL`); the capture opened and closed (packets mode: libpcap on each device, which needs
//! CAP_NET_RAW) and the listen and admin addresses bound and released; the state file's
//! directory written to. The configuration itself is validated by the caller with the same
//! [`Config::load`] as `run`, so a bad setting reads the same in both.
//!
//! Never: keeps anything it opened, or leaves a key behind longer than 10 s (the write expires
//! even if the `DEL` never arrives). It does not take this agent's lease, so it can run beside
//! a live daemon — whose ports, then, are reported in use.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::capture::connections::bind_listener;
use crate::capture::packets::{OpenError, PacketCapture};
use crate::config::{BackendConfig, CaptureMode, Config, ServeMode};
use crate::connect::{connect_backend, Conn, ConnectError, Timeouts};
use crate::daemon::{EX_FAILURE, EX_USAGE};
use crate::health::Cause;
use crate::identity::lease_key;

/// The bounds of each backend's connection: as lenient as the readers', since a slow but
/// working backend is not what `check` should fail on.
const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    response: Duration::from_secs(5),
};

/// How long the check's key lives if its `DEL` never arrives.
const CHECK_KEY_TTL_MS: u64 = 10_000;

/// How one item came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Works.
    Ok,
    /// Works, but the operator should know (eviction policy, a held lease…).
    Warn,
    /// Will not work: the configuration must change (exit 64).
    Usage,
    /// Will not work: the host or a backend is in the way (exit 1).
    Failure,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// What was checked: `backend A`, `listen`, `admin`, `capture`, `state file`.
    pub what: String,
    /// How it came out.
    pub verdict: Verdict,
    /// What was found, in plain words (`redis 7.2.4, master`, `authentication failed: …`).
    pub detail: String,
}

impl Item {
    fn new(what: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Item {
        // One line per item, whatever a server or library put in its message.
        let detail: String = detail.into();
        Item {
            what: what.into(),
            verdict,
            detail: detail.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    }
}

/// Everything `check` found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One line per item, in the order they were checked.
    pub items: Vec<Item>,
}

impl Report {
    /// 0 when every item is ok (warnings included); 64 when the configuration must change; 1
    /// otherwise.
    pub fn exit_code(&self) -> u8 {
        if self.items.iter().any(|i| i.verdict == Verdict::Usage) {
            EX_USAGE
        } else if self.items.iter().any(|i| i.verdict == Verdict::Failure) {
            EX_FAILURE
        } else {
            0
        }
    }

    /// The report for a terminal: one line per item, then the verdict.
    pub fn text(&self) -> String {
        let width = self.items.iter().map(|i| i.what.len()).max().unwrap_or(0);
        let mut out = String::new();
        for i in &self.items {
            let tag = match i.verdict {
                Verdict::Ok => "ok",
                Verdict::Warn => "WARN",
                Verdict::Usage | Verdict::Failure => "FAIL",
            };
            out += &format!("{:<width$}  {tag:<4}  {}\n", i.what, i.detail);
        }
        let failed = self
            .items
            .iter()
            .filter(|i| matches!(i.verdict, Verdict::Usage | Verdict::Failure))
            .count();
        out += &match failed {
            0 => "all ok: `redtap run` with this configuration should start and write\n".into(),
            1 => "1 problem: `redtap run` would not work as configured\n".into(),
            n => format!("{n} problems: `redtap run` would not work as configured\n"),
        };
        out
    }
}

/// Check everything `run` needs. `config` comes from [`Config::load`].
pub async fn run(config: &Config) -> Report {
    let mut report = Report::default();
    report.items.extend(backends(config).await);
    report.items.push(capture(config));
    if let Some(item) = listen(config) {
        report.items.push(item);
    }
    if let Some(item) = admin(config).await {
        report.items.push(item);
    }
    if let Some(item) = state_file(config) {
        report.items.push(item);
    }
    report
}

/// What one backend said, kept for the same-server check across backends.
struct Reached {
    run_id: String,
    db: i64,
}

/// Every backend at once; then two that are one server and database are refused, as `run`
/// refuses them.
async fn backends(config: &Config) -> Vec<Item> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, b) in config.backends.iter().enumerate() {
        let (b, prefix, agent) = (b.clone(), config.prefix.clone(), config.agent.clone());
        tasks.spawn(async move { (i, backend(&b, &prefix, &agent).await) });
    }
    let mut results: Vec<Option<(Item, Option<Reached>)>> =
        (0..config.backends.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((i, r)) => results[i] = Some(r),
            Err(e) => {
                return vec![Item::new(
                    "backends",
                    Verdict::Failure,
                    format!("check failed: {e}"),
                )]
            }
        }
    }
    let mut seen: BTreeMap<(String, i64), String> = BTreeMap::new();
    let mut items = Vec::new();
    for (b, r) in config.backends.iter().zip(results) {
        let (mut item, reached) = r.expect("every task answered");
        if let Some(id) = reached {
            if let Some(first) = seen.get(&(id.run_id.clone(), id.db)) {
                item = Item::new(
                    item.what,
                    Verdict::Usage,
                    format!(
                        "{}: the same Redis server (run_id {}) and database {} as backend \
                         {first}: remove one of them",
                        b.redacted_url(),
                        id.run_id,
                        id.db,
                    ),
                );
            } else {
                seen.insert((id.run_id, id.db), b.name.clone());
            }
        }
        items.push(item);
    }
    items
}

/// Connect, identify, write and delete one expiring key.
async fn backend(b: &BackendConfig, prefix: &str, agent: &str) -> (Item, Option<Reached>) {
    let what = format!("backend {}", b.name);
    let url = b.redacted_url();
    let mut conn = match connect_backend(b, TIMEOUTS).await {
        Ok(c) => c,
        Err(e) => {
            let verdict = match e {
                ConnectError::Config(_) => Verdict::Usage,
                _ => Verdict::Failure,
            };
            return (Item::new(what, verdict, format!("{url}: {e}")), None);
        }
    };
    let info = match command::<String>(&mut conn, redis::cmd("INFO")).await {
        Ok(i) => i,
        Err(e) => {
            return (
                Item::new(what, Verdict::Failure, format!("{url}: INFO failed: {e}")),
                None,
            )
        }
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    };
    let db = b
        .client()
        .map(|c| c.get_connection_info().redis.db)
        .unwrap_or(0);
    let reached = field("run_id").map(|run_id| Reached { run_id, db });
    let version = field("redis_version").unwrap_or_else(|| "?".into());
    let role = field("role").unwrap_or_else(|| "?".into());
    let policy = field("maxmemory_policy").unwrap_or_else(|| "?".into());
    let maxmemory: u64 = field("maxmemory").and_then(|m| m.parse().ok()).unwrap_or(0);
    let mut about = format!("redis {version}, {role}, maxmemory-policy {policy}");
    if matches!(conn, Conn::Single(_)) && field("cluster_enabled").as_deref() == Some("1") {
        // As one server it would answer MOVED for every key another node owns: a backend that
        // is down for ever, not a configuration error, unless said here.
        return (
            Item::new(
                what,
                Verdict::Usage,
                format!(
                    "{url} ({about}) is a node of a Redis Cluster: name it as \
                     redis+cluster://HOST:PORT[,HOST:PORT…] so records spread over every primary"
                ),
            ),
            reached,
        );
    }
    if let Conn::Cluster(c) = &conn {
        // Connecting reached every primary (it fails otherwise): name them, with their slots.
        let t = c.topology();
        let each: Vec<String> = t
            .primaries
            .iter()
            .zip(t.slot_counts())
            .map(|((h, p), n)| format!("{h}:{p} ({n} slots)"))
            .collect();
        about.push_str(&format!(
            "; cluster of {} primaries: {}",
            each.len(),
            each.join(", ")
        ));
    }

    let key = format!("{prefix}:check:{agent}");
    let mut set = redis::cmd("SET");
    set.arg(&key).arg(1).arg("PX").arg(CHECK_KEY_TTL_MS);
    let written = match command::<()>(&mut conn, set).await {
        Ok(()) => command::<()>(&mut conn, redis::cmd("DEL").arg(&key).clone()).await,
        Err(e) => Err(e),
    };
    if let Err(cause) = written {
        let hint = match cause {
            Cause::ReadOnly => "; point the URL at the primary",
            Cause::NoPerm => "; the ACL user needs SET, DEL and the stream commands on the prefix",
            Cause::Oom => "; raise maxmemory or shorten the retention",
            _ => "",
        };
        return (
            Item::new(
                what,
                Verdict::Failure,
                format!("{url} ({about}): cannot write {key}: {cause}{hint}"),
            ),
            reached,
        );
    }

    let mut warnings = Vec::new();
    if maxmemory > 0 && policy != "noeviction" && policy != "?" {
        warnings.push(format!(
            "maxmemory-policy {policy} may evict records before their retention ends \
             (noeviction makes Redis refuse writes instead, which redtap counts)"
        ));
    }
    let lease = lease_key(prefix, agent);
    if let Ok(Some(holder)) =
        command::<Option<String>>(&mut conn, redis::cmd("GET").arg(&lease).clone()).await
    {
        warnings.push(format!(
            "agent {agent:?} is running against it now ({lease} held by {holder}); a second \
             `run` with this agent name would be refused"
        ));
    }
    let item = if warnings.is_empty() {
        Item::new(what, Verdict::Ok, format!("{about} ({url})"))
    } else {
        Item::new(
            what,
            Verdict::Warn,
            format!("{about} ({url}); {}", warnings.join("; ")),
        )
    };
    (item, reached)
}

/// One command, its failure as the health [`Cause`] it counts as.
async fn command<T: redis::FromRedisValue>(conn: &mut Conn, cmd: redis::Cmd) -> Result<T, Cause> {
    cmd.query_async(conn)
        .await
        .map_err(|e| Cause::from_redis_error(&e))
}

/// Packets mode: open the libpcap capture as `run` does, then close it.
fn capture(config: &Config) -> Item {
    match config.capture {
        CaptureMode::Connections => Item::new(
            "capture",
            Verdict::Ok,
            "connections mode: no privileges needed",
        ),
        CaptureMode::Packets => match PacketCapture::open(config) {
            Ok(_) => Item::new(
                "capture",
                Verdict::Ok,
                format!("packets mode: libpcap opens for {}", config.listen),
            ),
            Err(e @ OpenError::NoPermission { .. }) => Item::new(
                "capture",
                Verdict::Usage,
                format!("CAP_NET_RAW is missing: {e}"),
            ),
            Err(e) => Item::new(
                "capture",
                if e.is_usage() {
                    Verdict::Usage
                } else {
                    Verdict::Failure
                },
                e.to_string(),
            ),
        },
    }
}

/// The listen address, when redtap serves it: bound and released at once.
fn listen(config: &Config) -> Option<Item> {
    if config.serve == ServeMode::None {
        return None;
    }
    Some(match bind_listener(config.listen) {
        Ok(l) => {
            drop(l);
            Item::new(
                "listen",
                Verdict::Ok,
                format!("{} can be bound", config.listen),
            )
        }
        Err(e) => Item::new(
            "listen",
            Verdict::Failure,
            format!("cannot listen on {}: {e}", config.listen),
        ),
    })
}

/// The admin address, unless `off`: bound and released at once.
async fn admin(config: &Config) -> Option<Item> {
    let addr = config.admin?;
    Some(match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            drop(l);
            Item::new("admin", Verdict::Ok, format!("{addr} is free"))
        }
        Err(e) => Item::new(
            "admin",
            Verdict::Failure,
            format!("{}", crate::daemon::StartError::Admin { addr, source: e }),
        ),
    })
}

/// The state file's directory takes a new file (run-time weight changes would otherwise
/// apply but not survive a restart).
fn state_file(config: &Config) -> Option<Item> {
    let path = config.state_file.as_ref()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    Some(match tempfile::NamedTempFile::new_in(dir) {
        Ok(_) => Item::new(
            "state file",
            Verdict::Ok,
            format!("{} can be written", path.display()),
        ),
        Err(e) => Item::new(
            "state file",
            Verdict::Warn,
            format!(
                "cannot write in {}: {e}; weight changes will apply but not survive a restart",
                dir.display()
            ),
        ),
    })
}
