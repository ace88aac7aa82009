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
//! Never: retries, logs or counts — each caller decides what a failure means to it.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
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

/// Connect to backend `b` (its URL, password and TLS files) and see it answer.
pub async fn connect(
    b: &BackendConfig,
    t: Timeouts,
) -> Result<MultiplexedConnection, ConnectError> {
    let client = b
        .client()
        .map_err(|e| ConnectError::Config(e.to_string()))?;
    connect_client(&client, t).await
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
