//! The one way to connect to a Redis backend.
//!
//! Owns: the connection settings every caller shares (connect and answer times bounded, AUTH and
//! TLS from the backend's URL and files through [`BackendConfig::client`]), the proof that the
//! server answers (a `PING`: a stopped server's kernel still accepts TCP, and a server that wants
//! a password the URL lacks only says so to a command), and [`ConnectError`], which says in
//! plain words what went wrong and lets a caller branch on it. The writers, the identity guard,
//! the readers (`redtap query/top/tail/stats`) and `redtap check` all connect through here, so
//! a wrong password reads the same everywhere.
//!
//! A backend is a single server or a Redis Cluster ([`Target`]); either way a caller gets one
//! [`Conn`] that routes each command ([`cluster`] says how a cluster does it).
//!
//! Never: retries, logs or counts — each caller decides what a failure means to it.

pub mod cluster;

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::AsyncConnectionConfig;

use crate::config::BackendConfig;
use crate::health::Cause;

/// How long a connection may take to open, and each answer on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Opening the connection (TCP, TLS handshake, AUTH).
    pub connect: Duration,
    /// Each answer once connected (the `PING`, and every command after it).
    pub response: Duration,
}

impl Timeouts {
    /// The same bound for both (the daemon uses its health timeout).
    pub fn both(d: Duration) -> Self {
        Timeouts {
            connect: d,
            response: d,
        }
    }
}

/// Why a backend could not be connected to, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The URL or the TLS files are wrong: no connection was attempted.
    #[error("bad backend configuration: {0}")]
    Config(String),
    /// Nothing listens at the address (TCP RST).
    #[error("unreachable: connection refused (is redis-server running on that host and port?)")]
    Refused,
    /// No answer in time: host down, a firewall dropping packets, or the server hung.
    #[error("unreachable: timed out after {} (host down, firewall, or the server hung)",
            humantime::format_duration(*.0))]
    Timeout(Duration),
    /// WRONGPASS, NOAUTH (a password is required and the URL has none) or NOPERM (the ACL user
    /// may not run PING).
    #[error("authentication failed: {} (check the user and password in the URL)", auth_text(.0))]
    Auth(Cause),
    /// The TLS handshake failed: certificate, CA, host name or protocol.
    #[error(
        "TLS handshake or certificate problem: {0} (check rediss://, tls_ca, tls_cert, tls_key)"
    )]
    Tls(String),
    /// Anything else (the name does not resolve, the connection broke, LOADING…).
    #[error("{}", other_text(.0))]
    Other(Cause),
}

/// The server's word for it, without repeating "authentication failed".
fn auth_text(cause: &Cause) -> &'static str {
    match cause {
        Cause::NoPerm => "the ACL user may not run PING (NOPERM)",
        _ => "the server refused the user or password (WRONGPASS/NOAUTH)",
    }
}

/// DNS and I/O failures mean the server was never reached; a reply such as LOADING came from it.
fn other_text(cause: &Cause) -> String {
    match cause {
        Cause::Dns | Cause::Io(_) | Cause::Refused | Cause::Timeout => {
            format!("unreachable: {cause}")
        }
        _ => cause.to_string(),
    }
}

impl ConnectError {
    /// Classify a client error met while connecting.
    pub fn from_redis(e: &redis::RedisError, waited: Duration) -> ConnectError {
        match Cause::from_redis_error(e) {
            Cause::Refused => ConnectError::Refused,
            Cause::Timeout => ConnectError::Timeout(waited),
            c @ (Cause::Auth | Cause::NoPerm) => ConnectError::Auth(c),
            Cause::Tls => ConnectError::Tls(e.to_string()),
            c => ConnectError::Other(c),
        }
    }

    /// The health [`Cause`] this failure counts as (metrics, `down_cause`).
    pub fn cause(&self) -> Cause {
        match self {
            ConnectError::Config(m) => Cause::Other(format!("bad backend configuration: {m}")),
            ConnectError::Refused => Cause::Refused,
            ConnectError::Timeout(_) => Cause::Timeout,
            ConnectError::Auth(c) | ConnectError::Other(c) => c.clone(),
            ConnectError::Tls(_) => Cause::Tls,
        }
    }

    /// Whether the server was never reached (refused, timed out, name or network), as opposed
    /// to reached and refusing us (authentication, TLS) or misconfigured.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ConnectError::Refused
                | ConnectError::Timeout(_)
                | ConnectError::Other(Cause::Dns | Cause::Io(_))
        )
    }
}

/// What a backend's URL names, with its clients built (TLS files read once).
#[derive(Clone)]
pub enum Target {
    /// One Redis server.
    Single(redis::Client),
    /// A Redis Cluster: a client per seed node (the first is the URL's; the others share its
    /// credentials and certificates).
    Cluster(Vec<redis::Client>),
}

impl From<redis::Client> for Target {
    fn from(c: redis::Client) -> Self {
        Target::Single(c)
    }
}

impl Target {
    /// The target of backend `b`.
    pub fn of(b: &BackendConfig) -> Result<Target, crate::config::ConfigError> {
        let first = b.client()?;
        let Some(seeds) = b.cluster_seeds() else {
            return Ok(Target::Single(first));
        };
        let template = first.get_connection_info().clone();
        let clients = seeds
            .iter()
            .map(|s| {
                let (host, port) = s.rsplit_once(':').unwrap_or((s, "6379"));
                cluster::node_client(&template, host, port.parse().unwrap_or(6379))
            })
            .collect();
        Ok(Target::Cluster(clients))
    }
}

/// A connection to a backend: one server's, or every primary's of a cluster.
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Single(MultiplexedConnection),
    /// A cluster.
    Cluster(cluster::ClusterConn),
}

impl Conn {
    /// One connection per node, named `host:port`, for commands that must run on each (SCAN);
    /// a single server's is its only one, named `""`.
    pub fn nodes(&self) -> Vec<(String, MultiplexedConnection)> {
        match self {
            Conn::Single(c) => vec![(String::new(), c.clone())],
            Conn::Cluster(c) => c.primaries(),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Connect to backend `b` (its URL, password and TLS files) and see it answer; a cluster
/// through every primary.
pub async fn connect_backend(b: &BackendConfig, t: Timeouts) -> Result<Conn, ConnectError> {
    let target = Target::of(b).map_err(|e| ConnectError::Config(e.to_string()))?;
    connect_target(&target, t).await
}

/// Connect to the one server `b` names and see it answer (for a cluster URL, its first seed
/// only: use [`connect_backend`] to reach the cluster).
pub async fn connect(
    b: &BackendConfig,
    t: Timeouts,
) -> Result<MultiplexedConnection, ConnectError> {
    let client = b
        .client()
        .map_err(|e| ConnectError::Config(e.to_string()))?;
    connect_client(&client, t).await
}

/// [`connect`] with the target already built (a writer builds its own once, so its TLS files
/// are read once at start). A cluster: every primary connected and answering.
pub async fn connect_target(target: &Target, t: Timeouts) -> Result<Conn, ConnectError> {
    match target {
        Target::Single(c) => connect_client(c, t).await.map(Conn::Single),
        Target::Cluster(seeds) => cluster::ClusterConn::connect(seeds, t)
            .await
            .map(Conn::Cluster),
    }
}

/// [`connect`] with a client already built (a writer builds its own once, so its TLS files are
/// read once at start).
pub async fn connect_client(
    client: &redis::Client,
    t: Timeouts,
) -> Result<MultiplexedConnection, ConnectError> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(t.connect)
        .set_response_timeout(t.response);
    // Both bounds again around the whole: DNS resolution is not covered by the client's own.
    let whole = t.connect + t.response;
    let attempt = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| ConnectError::from_redis(&e, t.connect))?;
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| ConnectError::from_redis(&e, t.response))?;
        Ok(conn)
    };
    tokio::time::timeout(whole, attempt)
        .await
        .unwrap_or(Err(ConnectError::Timeout(whole)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_says_what_it_is_and_keeps_its_cause() {
        let wrongpass = redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "WRONGPASS",
            "invalid username-password pair".to_string(),
        ));
        let e = ConnectError::from_redis(&wrongpass, Duration::from_secs(1));
        assert_eq!(e, ConnectError::Auth(Cause::Auth));
        assert!(e.to_string().starts_with("authentication failed"), "{e}");
        assert!(!e.is_unreachable());

        let refused =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = ConnectError::from_redis(&refused, Duration::from_secs(1));
        assert_eq!(e.cause(), Cause::Refused);
        assert!(e.to_string().starts_with("unreachable"), "{e}");
        assert!(e.is_unreachable());

        let e = ConnectError::Timeout(Duration::from_secs(2));
        assert!(e.to_string().contains("timed out after 2s"), "{e}");
    }
}
