//! The fleet's weights, kept in a control Redis (`run --control URL`).
//!
//! Owns: the control keys and their Lua scripts (layout in docs/redis-schema.md), the one
//! versioned fleet record ([`FleetWeights`]) and its compare-and-set change ([`set`], used by
//! `redtap weights set --control` and by `PUT /v1/weights` on any agent), the audit stream
//! ([`history`]), the agents' heartbeats ([`Heartbeat`], [`agents`]), and, per agent:
//! - [`follower`]: the pure bookkeeping (version served, last good weights, stale or not);
//! - [`task`]: the thin I/O loop around it (pub/sub nudge, a poll every second, heartbeat).
//!
//! Never: stops capture or the record path. The control Redis being down only makes the
//! weights served stale; weights reach the hot path through the same
//! [`WeightStore`](crate::balance::WeightStore) snapshot as every other change.

pub mod follower;
pub mod task;

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

use crate::balance::{WeightError, MAX_WEIGHT};
use crate::config::is_valid_name;

pub use follower::{Follower, Step};
pub use task::{Control, Status};

/// How often each agent reads the fleet record and writes its heartbeat: a lost nudge costs at
/// most this.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// How long a heartbeat lives: an agent that stopped is gone from the list after this.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(5);

/// How long one control Redis command may take before the control Redis counts as lost.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(750);

/// Entries kept in the audit stream (approximately: `XADD MAXLEN ~`).
pub const AUDIT_MAX: u64 = 10_000;

/// CAS attempts of one [`set`] before it gives up (each conflict means another change won).
const CAS_ATTEMPTS: usize = 32;

/// The fleet's weights: one versioned record, changed only by compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetWeights {
    /// Bumped by one on every change; an agent never applies a lower one after a higher one.
    pub version: u64,
    /// Weight per backend name. Names an agent does not have are an error for that agent unless
    /// their weight is 0; an agent's backends the record does not name keep their weight.
    pub weights: BTreeMap<String, u32>,
}

/// The control keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    /// Hash `version`, `weights` (JSON object): the fleet record.
    pub weights: String,
    /// Stream of every change: `version`, `old`, `new`, `origin`; the entry ID is the time.
    pub audit: String,
    /// Pub/sub channel: the new version, published by the change itself.
    pub nudge: String,
    agent_prefix: String,
}

impl Keys {
    /// The keys under `prefix` (the `--prefix` of the agents).
    pub fn new(prefix: &str) -> Self {
        Keys {
            weights: format!("{prefix}:control:weights"),
            audit: format!("{prefix}:control:audit"),
            nudge: format!("{prefix}:control:nudge"),
            agent_prefix: format!("{prefix}:control:agent:"),
        }
    }

    /// The heartbeat key of `agent`.
    pub fn agent(&self, agent: &str) -> String {
        format!("{}{agent}", self.agent_prefix)
    }
}

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control Redis could not be connected to (why, in words: refused, password, TLS…).
    #[error("control Redis: {0}")]
    Connect(#[from] crate::connect::ConnectError),
    /// The control Redis did not answer or refused.
    #[error("control Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// It did not answer within [`COMMAND_TIMEOUT`].
    #[error("control Redis did not answer within {COMMAND_TIMEOUT:?}")]
    Timeout,
    /// The weights asked for are not valid; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// The fleet record in Redis is not what redtap writes.
    #[error("the fleet record {key} is not valid: {detail}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// Every CAS attempt lost to another change.
    #[error("gave up after {CAS_ATTEMPTS} conflicting changes; try again")]
    Contended,
}

/// Bound one command by [`COMMAND_TIMEOUT`].
async fn timed<T>(
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, ControlError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ControlError::Timeout),
    }
}

/// Compare-and-set: write the new record only if the version is still the expected one; audit
/// and nudge in the same atomic step. Returns `{1, new version}` or `{0, current version}`.
pub const SET_SCRIPT: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
local old = redis.call('HGET', KEYS[1], 'weights') or '{}'
local new = cur + 1
redis.call('HSET', KEYS[1], 'version', new, 'weights', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
           'version', new, 'old', old, 'new', ARGV[2], 'origin', ARGV[3])
redis.call('PUBLISH', ARGV[4], new)
return {1, new}
"#;

/// Raise: put back a record an agent applied, only over an older one or none (the control
/// Redis lost its data). Audited and nudged like a change. Returns 1 if it wrote.
pub const RAISE_SCRIPT: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if cur >= tonumber(ARGV[1]) then return 0 end
local old = redis.call('HGET', KEYS[1], 'weights') or '{}'
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'weights', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
           'version', ARGV[1], 'old', old, 'new', ARGV[2], 'origin', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"#;

/// Read the fleet record; `None` when there is none yet.
pub async fn read(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
) -> Result<Option<FleetWeights>, ControlError> {
    let (version, weights): (Option<u64>, Option<String>) = timed(
        redis::cmd("HMGET")
            .arg(&keys.weights)
            .arg("version")
            .arg("weights")
            .query_async(conn),
    )
    .await?;
    let (Some(version), Some(weights)) = (version, weights) else {
        return Ok(None);
    };
    let weights = serde_json::from_str(&weights).map_err(|e| ControlError::Corrupt {
        key: keys.weights.clone(),
        detail: e.to_string(),
    })?;
    Ok(Some(FleetWeights { version, weights }))
}

/// Change the fleet's weights: `changes` over the current record (or over `base` when there is
/// none yet), checked by `check` (e.g. the agent's backend names) and by the rules every weight
/// follows, then written by compare-and-set, retried while other changes win. Returns the
/// record written.
pub async fn set(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    changes: &BTreeMap<String, u32>,
    base: &BTreeMap<String, u32>,
    origin: &str,
    check: impl Fn(&BTreeMap<String, u32>) -> Result<(), String>,
) -> Result<FleetWeights, ControlError> {
    if changes.is_empty() {
        return Err(ControlError::Invalid("no weights given".into()));
    }
    for _ in 0..CAS_ATTEMPTS {
        let current = read(conn, keys).await?;
        let (version, mut weights) = match current {
            Some(f) => (f.version, f.weights),
            None => (0, base.clone()),
        };
        weights.extend(changes.iter().map(|(n, &w)| (n.clone(), w)));
        validate(&weights).map_err(ControlError::Invalid)?;
        check(&weights).map_err(ControlError::Invalid)?;
        let json = serde_json::to_string(&weights).expect("serializable");
        let (ok, new): (u8, u64) =
            timed(script(SET_SCRIPT, keys, version, &json, origin).query_async(conn)).await?;
        if ok == 1 {
            return Ok(FleetWeights {
                version: new,
                weights,
            });
        }
    }
    Err(ControlError::Contended)
}

/// Put back `fleet` if the control Redis holds an older version or none. True if it wrote.
pub async fn raise(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    fleet: &FleetWeights,
    origin: &str,
) -> Result<bool, ControlError> {
    let json = serde_json::to_string(&fleet.weights).expect("serializable");
    let wrote: u8 =
        timed(script(RAISE_SCRIPT, keys, fleet.version, &json, origin).query_async(conn)).await?;
    Ok(wrote == 1)
}

/// The call of [`SET_SCRIPT`] or [`RAISE_SCRIPT`], which take the same keys and arguments.
/// EVAL, not EVALSHA: a change is rare, and the text is always there after a restart.
fn script(text: &str, keys: &Keys, version: u64, json: &str, origin: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(text)
        .arg(2)
        .arg(&keys.weights)
        .arg(&keys.audit)
        .arg(version)
        .arg(json)
        .arg(origin)
        .arg(&keys.nudge)
        .arg(AUDIT_MAX);
    cmd
}

/// The rules every fleet record follows whatever the agents: weights in range, not all zero,
/// names as a backend name may be written.
fn validate(weights: &BTreeMap<String, u32>) -> Result<(), String> {
    for (name, &w) in weights {
        if !is_valid_name(name) {
            return Err(format!(
                "backend name {name:?} must be letters, digits, '_', '-' or '.'"
            ));
        }
        if w > MAX_WEIGHT {
            return Err(WeightError::OutOfRange(name.clone(), w.to_string()).to_string());
        }
    }
    if weights.values().all(|&w| w == 0) {
        return Err(WeightError::AllZero.to_string());
    }
    Ok(())
}

/// One change in the audit stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, in milliseconds since the Unix epoch (the control Redis's clock: the entry ID).
    pub at_ms: u64,
    /// The version the change made.
    pub version: u64,
    /// The weights before.
    pub old: BTreeMap<String, u32>,
    /// The weights after.
    pub new: BTreeMap<String, u32>,
    /// Who made it (`cli@host`, `admin@agent`, `raise@agent`).
    pub origin: String,
}

/// The last `count` changes, oldest first.
pub async fn history(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    count: usize,
) -> Result<Vec<AuditEntry>, ControlError> {
    let reply: redis::streams::StreamRangeReply = timed(
        redis::cmd("XREVRANGE")
            .arg(&keys.audit)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(conn),
    )
    .await?;
    let corrupt = |detail: String| ControlError::Corrupt {
        key: keys.audit.clone(),
        detail,
    };
    let mut out = Vec::with_capacity(reply.ids.len());
    for id in reply.ids.into_iter().rev() {
        let field = |name: &str| -> Result<String, ControlError> {
            id.get::<String>(name)
                .ok_or_else(|| corrupt(format!("entry {} has no {name}", id.id)))
        };
        let map = |name: &str| -> Result<BTreeMap<String, u32>, ControlError> {
            serde_json::from_str(&field(name)?).map_err(|e| corrupt(e.to_string()))
        };
        out.push(AuditEntry {
            at_ms: id
                .id
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0),
            version: field("version")?
                .parse()
                .map_err(|_| corrupt(format!("entry {} has a bad version", id.id)))?,
            old: map("old")?,
            new: map("new")?,
            origin: field("origin")?,
        });
    }
    Ok(out)
}

/// What each agent publishes every [`POLL_EVERY`], living [`HEARTBEAT_TTL`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The agent's name (`--agent`).
    pub agent: String,
    /// The fleet version it serves (`null`: none yet, its own weights).
    pub version: Option<u64>,
    /// True while it could not read the control Redis (its weights may be behind).
    pub stale: bool,
    /// Why the newest fleet version is refused by this agent, if it is.
    pub error: Option<String>,
    /// Records captured per second over the last interval.
    pub records_per_s: f64,
    /// Its backends: weight, share since the last change, up or not.
    pub backends: Vec<HeartbeatBackend>,
    /// When it was written, milliseconds since the Unix epoch (the agent's clock).
    pub at_ms: u64,
}

/// One backend in a [`Heartbeat`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatBackend {
    /// Backend name.
    pub name: String,
    /// Weight served.
    pub weight: u32,
    /// Share of the records routed since the last weight change.
    pub share_since_change: f64,
    /// Records routed since the last weight change.
    pub routed_since_change: u64,
    /// Whether it takes records now.
    pub up: bool,
}

/// Write `beat` with its TTL.
pub async fn heartbeat(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    beat: &Heartbeat,
) -> Result<(), ControlError> {
    timed(
        redis::cmd("SET")
            .arg(keys.agent(&beat.agent))
            .arg(serde_json::to_string(beat).expect("serializable"))
            .arg("PX")
            .arg(HEARTBEAT_TTL.as_millis() as u64)
            .query_async::<()>(conn),
    )
    .await
}

/// Every live agent's heartbeat, by name. Bounded: at most 100,000 keys scanned.
pub async fn agents(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
) -> Result<Vec<Heartbeat>, ControlError> {
    let pattern = format!("{}*", keys.agent_prefix);
    let mut names = Vec::new();
    let mut cursor: u64 = 0;
    for _ in 0..100 {
        let (next, batch): (u64, Vec<String>) = timed(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn),
        )
        .await?;
        names.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<Option<String>> =
        timed(redis::cmd("MGET").arg(&names).query_async(conn)).await?;
    // A heartbeat that expired between SCAN and MGET is simply gone; one that does not parse
    // is another writer's key and is left out.
    Ok(values
        .into_iter()
        .flatten()
        .filter_map(|v| serde_json::from_str(&v).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_valid_only_in_range_and_not_all_zero() {
        let w = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(n, w)| (n.to_string(), *w)).collect()
        };
        assert!(validate(&w(&[("A", 0), ("B", 1)])).is_ok());
        assert!(validate(&w(&[("A", 0)])).is_err());
        assert!(validate(&w(&[("A", 10_001)])).is_err());
        assert!(validate(&w(&[("A B", 1)])).is_err());
        let k = Keys::new("redtap");
        assert_eq!(k.weights, "redtap:control:weights");
        assert_eq!(k.agent("web1"), "redtap:control:agent:web1");
    }
}
