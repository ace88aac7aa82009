//! A Redis Cluster backend (`redis+cluster://h1:p1,h2:p2`): its topology, and the commands and
//! pipelines of every caller routed by redtap to the primary that owns each key's hash slot.
//!
//! Owns: the hash slot of a key ([`hash_slot`]), the stripe tags that spread one agent's
//! buckets over the slot space ([`stripe_tags`]), the topology read from `CLUSTER SLOTS`, and
//! [`ClusterConn`] — one multiplexed connection per primary, behind the same
//! `ConnectionLike` as a single server's connection, so the writer, the identity guard and
//! `redtap check` use a cluster as they use one server.
//!
//! Why per-node connections routed here, not redis-rs's `cluster_async::ClusterConnection`:
//! redis-rs sends a whole pipeline to the node of its first key, refuses a pipeline whose keys
//! cross slots, and turns the pipeline's answers into one error as soon as any command failed
//! (then resends the whole pipeline on MOVED). The writer's exactly-once rules read each
//! command's own answer — an XADD "not above the top" is an answer, not a failure — so a
//! pipeline here is split by owning primary, each part sent to its node on that node's own
//! connection (order kept within a node, hence within a key), and the answers put back in the
//! order the commands were written. A part that fails (node down, connection cut) fails the
//! whole pipeline: the writer then resends everything at the same keys and IDs, and its rules
//! tell a stored record from a lost one.
//!
//! Redirects: a `-MOVED` or `-ASK` answer to one command is a refusal (nothing was written
//! there), handed back like any other; the connection marks itself stale and its next use fails,
//! so the writer reconnects and reads the topology again. The key and ID of a record never
//! depend on the topology (see [`stripe_tags`]), so a resend after a redirect goes to the same
//! key and ID, on whichever node now owns it.
//!
//! Never: retries, logs or counts (as [`super`]); never changes a key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, ConnectionAddr, ConnectionInfo, Pipeline, RedisFuture, Value};

use super::{connect_client, ConnectError, Timeouts};

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// How many stripes one agent's buckets rotate over in a cluster, one tag each: stripe `i`'s tag
/// hashes into slots `i * SLOTS / STRIPES ..`, so every primary that owns a whole
/// 1/`STRIPES` of the slot space in one range gets a share (any cluster of up to
/// `STRIPES / 2` primaries with even ranges, as `redis-cli --cluster create` makes them).
pub const STRIPES: usize = 16;

/// CRC16-XMODEM, the checksum Redis Cluster's key slots are taken from (Redis's `crc16.c`).
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of `key`, with Redis's hash-tag rule: a non-empty `{…}` (the first `{` and the
/// next `}`) is hashed instead of the whole key.
pub fn hash_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&c| c == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&c| c == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// The hash tags of `agent`'s stripes: `<agent>/<k>`, with `k` the smallest number whose tag
/// hashes into stripe `i`'s share of the slots. A pure function of the agent's name — never of
/// the topology — so a bucket's key is the same on every run and after every failover or
/// resharding.
pub fn stripe_tags(agent: &str) -> Vec<String> {
    let width = usize::from(SLOTS) / STRIPES;
    let mut tags: Vec<Option<String>> = vec![None; STRIPES];
    let mut left = STRIPES;
    // Each try lands in a given stripe with probability 1/STRIPES: this ends after a few
    // hundred tries at most.
    for k in 0u64.. {
        let tag = format!("{agent}/{k}");
        let stripe = usize::from(hash_slot(tag.as_bytes())) / width;
        if tags[stripe].is_none() {
            tags[stripe] = Some(tag);
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    tags.into_iter()
        .map(|t| t.expect("every stripe found"))
        .collect()
}

/// The error a connection gives once a redirect made its topology stale.
const STALE: &str = "the cluster topology changed (MOVED/ASK); reconnecting";

/// Whether `e` says the topology moved under a connection — a `MOVED`/`ASK` answer, a use of
/// the connection after one, or `TRYAGAIN` (a command over several keys of a slot being
/// migrated, some of them moved already) — rather than that something failed: the caller
/// reconnects (reading the topology again) and goes on.
pub fn is_redirect(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("MOVED" | "ASK" | "TRYAGAIN")) || e.to_string().contains(STALE)
}

/// The key a command works on, for routing: `None` for commands without one (PING, INFO, SCAN,
/// CLUSTER …), which go to the first primary.
fn key_of(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().map(|a| match a {
        redis::Arg::Simple(s) => s,
        redis::Arg::Cursor => &b"0"[..],
    });
    let name = args.next()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" => {
            let _script = args.next()?;
            let numkeys = std::str::from_utf8(args.next()?)
                .ok()?
                .parse::<u32>()
                .ok()?;
            if numkeys == 0 {
                None
            } else {
                args.next()
            }
        }
        b"PING" | b"INFO" | b"SCAN" | b"CLUSTER" | b"DBSIZE" | b"TIME" | b"CLIENT" | b"CONFIG"
        | b"HELLO" | b"AUTH" | b"SELECT" | b"SCRIPT" | b"FUNCTION" | b"ROLE" | b"LASTSAVE"
        | b"MEMORY" | b"COMMAND" | b"ECHO" => None,
        b"XREAD" | b"XREADGROUP" => {
            let mut args = args;
            args.find(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
            args.next()
        }
        _ => args.next(),
    }
}

/// One cluster's primaries and who owns which slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// `host:port` of each primary, in the order of their first slot.
    pub primaries: Vec<(String, u16)>,
    /// Slot → index in `primaries`; `u16::MAX` for a slot no primary serves.
    owner: Vec<u16>,
}

impl Topology {
    /// Read from a `CLUSTER SLOTS` reply; `seed_host` stands in for a node that reports its
    /// host as empty (it does not know the address it is reached at).
    pub fn from_slots(v: &Value, seed_host: &str) -> Option<Topology> {
        let Value::Array(ranges) = v else {
            return None;
        };
        let int = |v: &Value| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        };
        let mut spans = Vec::new();
        for r in ranges {
            let Value::Array(r) = r else { return None };
            let (start, end) = (int(r.first()?)?, int(r.get(1)?)?);
            let Value::Array(node) = r.get(2)? else {
                return None;
            };
            let host = crate::layout::text(node.first()?)?;
            let host = if host.is_empty() || host == "?" {
                seed_host
            } else {
                host
            };
            let port = u16::try_from(int(node.get(1)?)?).ok()?;
            let (start, end) = (u16::try_from(start).ok()?, u16::try_from(end).ok()?);
            if start > end || end >= SLOTS {
                return None;
            }
            spans.push((start, end, (host.to_string(), port)));
        }
        spans.sort_by_key(|s| s.0);
        let mut primaries: Vec<(String, u16)> = Vec::new();
        let mut owner = vec![u16::MAX; usize::from(SLOTS)];
        for (start, end, node) in spans {
            let i = match primaries.iter().position(|p| *p == node) {
                Some(i) => i,
                None => {
                    primaries.push(node);
                    primaries.len() - 1
                }
            };
            for s in start..=end {
                owner[usize::from(s)] = i as u16;
            }
        }
        (!primaries.is_empty()).then_some(Topology { primaries, owner })
    }

    /// The primary that owns `slot`, if one does.
    pub fn owner(&self, slot: u16) -> Option<usize> {
        match self.owner.get(usize::from(slot)) {
            Some(&i) if i != u16::MAX => Some(usize::from(i)),
            _ => None,
        }
    }

    /// Slots each primary owns, in the order of [`primaries`](Self::primaries).
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut n = vec![0; self.primaries.len()];
        for &o in &self.owner {
            if o != u16::MAX {
                n[usize::from(o)] += 1;
            }
        }
        n
    }
}

/// A client for node `host:port` with the seed's credentials, database and certificates.
pub fn node_client(template: &ConnectionInfo, host: &str, port: u16) -> redis::Client {
    let mut info = template.clone();
    info.addr = match &template.addr {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_string(), port),
    };
    redis::Client::open(info).expect("a ConnectionInfo is always a valid client")
}

/// The seed's host, for nodes that report none.
fn host_of(info: &ConnectionInfo) -> String {
    match &info.addr {
        ConnectionAddr::Tcp(h, _) | ConnectionAddr::TcpTls { host: h, .. } => h.clone(),
        ConnectionAddr::Unix(_) => "127.0.0.1".into(),
    }
}

/// A connection to every primary of one cluster, routing each command by its key's slot.
#[derive(Clone)]
pub struct ClusterConn {
    shared: Arc<Shared>,
}

struct Shared {
    topology: Topology,
    /// One connection per primary, in the order of `topology.primaries`.
    nodes: Vec<MultiplexedConnection>,
    /// Set on a `MOVED`/`ASK` answer: the topology is out of date, and the next use fails so
    /// the caller reconnects.
    stale: AtomicBool,
}

impl ClusterConn {
    /// Read the topology from the first seed that answers, then connect to every primary. Any
    /// primary unreachable fails the whole: a cluster with a primary down cannot take the
    /// records of that primary's slots.
    pub async fn connect(
        seeds: &[redis::Client],
        t: Timeouts,
    ) -> Result<ClusterConn, ConnectError> {
        let mut last = ConnectError::Config("no cluster seed nodes".into());
        for seed in seeds {
            let mut conn = match connect_client(seed, t).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let reply = tokio::time::timeout(
                t.response,
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut conn),
            )
            .await;
            let reply = match reply {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    last = ConnectError::Other(crate::health::Cause::Other(format!(
                        "CLUSTER SLOTS failed ({e}): is this a Redis Cluster node? \
                         (use redis:// for a single server)"
                    )));
                    continue;
                }
                Err(_) => {
                    last = ConnectError::Timeout(t.response);
                    continue;
                }
            };
            let template = seed.get_connection_info();
            let Some(topology) = Topology::from_slots(&reply, &host_of(template)) else {
                last = ConnectError::Other(crate::health::Cause::Other(
                    "the cluster serves no slots yet (cluster_state not ok?)".into(),
                ));
                continue;
            };
            let mut nodes = Vec::with_capacity(topology.primaries.len());
            for (host, port) in &topology.primaries {
                nodes.push(connect_client(&node_client(template, host, *port), t).await?);
            }
            return Ok(ClusterConn {
                shared: Arc::new(Shared {
                    topology,
                    nodes,
                    stale: AtomicBool::new(false),
                }),
            });
        }
        Err(last)
    }

    /// The topology this connection routes by.
    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// One connection per primary, as `(host:port, connection)`: for commands that must run on
    /// every node (SCAN, INFO).
    pub fn primaries(&self) -> Vec<(String, MultiplexedConnection)> {
        let s = &self.shared;
        s.topology
            .primaries
            .iter()
            .zip(&s.nodes)
            .map(|((h, p), c)| (format!("{h}:{p}"), c.clone()))
            .collect()
    }

    /// The node index a command goes to.
    fn route(&self, cmd: &Cmd) -> usize {
        key_of(cmd)
            .and_then(|k| self.shared.topology.owner(hash_slot(k)))
            .unwrap_or(0)
    }

    fn check_fresh(&self) -> redis::RedisResult<()> {
        if self.shared.stale.load(Ordering::Relaxed) {
            return Err(redis::RedisError::from((redis::ErrorKind::IoError, STALE)));
        }
        Ok(())
    }

    /// Note a redirect in `v`: the topology is stale.
    fn watch(&self, v: &Value) {
        if let Value::ServerError(e) = v {
            if matches!(e.code(), "MOVED" | "ASK") {
                self.shared.stale.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.check_fresh()?;
            let mut conn = self.shared.nodes[self.route(cmd)].clone();
            let v = conn.req_packed_command(cmd).await?;
            self.watch(&v);
            Ok(v)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.check_fresh()?;
            let routes: Vec<usize> = pipe.cmd_iter().map(|c| self.route(c)).collect();
            let first = routes.first().copied().unwrap_or(0);
            // A transaction (offset > 0) must stay whole: send it where its first key lives.
            if offset != 0 || routes.iter().all(|&r| r == first) {
                let mut conn = self.shared.nodes[first].clone();
                let vs = conn.req_packed_commands(pipe, offset, count).await?;
                vs.iter().for_each(|v| self.watch(v));
                return Ok(vs);
            }
            let mut parts: Vec<(usize, Pipeline, Vec<usize>)> = Vec::new();
            for (i, (cmd, &node)) in pipe.cmd_iter().zip(&routes).enumerate() {
                let part = match parts.iter().position(|p| p.0 == node) {
                    Some(p) => p,
                    None => {
                        parts.push((node, Pipeline::new(), Vec::new()));
                        parts.len() - 1
                    }
                };
                parts[part].1.add_command(cmd.clone());
                parts[part].2.push(i);
            }
            let sends = parts.iter().map(|(node, p, _)| {
                let mut conn = self.shared.nodes[*node].clone();
                async move { conn.req_packed_commands(p, 0, p.len()).await }
            });
            let answers = futures_util::future::join_all(sends).await;
            let mut out = vec![Value::Nil; pipe.len()];
            for ((_, _, idx), answer) in parts.iter().zip(answers) {
                for (i, v) in idx.iter().zip(answer?) {
                    self.watch(&v);
                    out[*i] = v;
                }
            }
            Ok(out)
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        assert_eq!(hash_slot(b"foo{}{bar}"), hash_slot(b"foo{}{bar}"));
        assert_ne!(hash_slot(b"foo{}{bar}"), hash_slot(b"bar"));
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
    }

    #[test]
    fn every_stripe_has_a_tag_in_its_share_of_the_slots() {
        let tags = stripe_tags("web1-9000");
        assert_eq!(tags.len(), STRIPES);
        let width = usize::from(SLOTS) / STRIPES;
        for (i, t) in tags.iter().enumerate() {
            assert_eq!(usize::from(hash_slot(t.as_bytes())) / width, i, "{t}");
        }
        assert_eq!(
            tags,
            stripe_tags("web1-9000"),
            "a pure function of the name"
        );
    }

    #[test]
    fn commands_route_by_their_key() {
        let mut eval = redis::cmd("EVAL");
        eval.arg("return 1").arg(1).arg("k{a}").arg(5);
        assert_eq!(key_of(&eval), Some(&b"k{a}"[..]));
        let mut xadd = redis::cmd("XADD");
        xadd.arg("s").arg("1-1").arg("f").arg("v");
        assert_eq!(key_of(&xadd), Some(&b"s"[..]));
        assert_eq!(key_of(&redis::cmd("PING")), None);
        let mut info = redis::cmd("INFO");
        info.arg("server");
        assert_eq!(key_of(&info), None);
    }
}
