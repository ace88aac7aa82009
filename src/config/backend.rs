//! One Redis backend: `NAME=URL@WEIGHT` or a `[[backend]]` table, its checks, and the one way
//! to make its Redis client (TLS files loaded for `rediss://`).
//!
//! Owns: the weight range as typed by a user ([`parse_weight`]), URL checks and redaction.
//! Never: connects (a `redis::Client` is only a parsed URL), or prints a password: a URL in a
//! message has its password replaced by `***`, even when it does not parse.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::error::{ConfigError, Origin};
use crate::balance::MAX_WEIGHT;

/// One Redis backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Short name used in the API, metrics and logs (letters, digits, `_`, `-`, `.`).
    pub name: String,
    /// `redis://[user:password@]host[:port][/db]`, or a Redis Cluster:
    /// `redis+cluster://[user:password@]host:port[,host:port…]` (seed nodes; the rest are
    /// discovered). `rediss://` and `rediss+cluster://` for TLS.
    pub url: String,
    /// Relative weight, 0..=10000; 0 means "no new records".
    pub weight: u32,
    /// `rediss://` only: PEM file of the CA that signed the server's certificate (default: the
    /// system's roots).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// `rediss://` only: PEM client certificate, for servers that check clients.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// `rediss://` only: PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Where it was declared: `--backend`, or a file's `[[backend]]` table.
    #[serde(skip)]
    pub origin: Origin,
    /// Which TLS files came from the `--tls-*` flags rather than the table: messages name
    /// what was written.
    #[serde(skip)]
    pub tls_from_flags: TlsFromFlags,
}

/// Which of a backend's TLS files the `--tls-ca`, `--tls-cert`, `--tls-key` flags supplied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsFromFlags {
    /// `--tls-ca`.
    pub ca: bool,
    /// `--tls-cert`.
    pub cert: bool,
    /// `--tls-key`.
    pub key: bool,
}

impl BackendConfig {
    fn refused(&self, problem: impl Into<String>) -> ConfigError {
        ConfigError::Backend {
            name: self.name.clone(),
            origin: self.origin.clone(),
            problem: problem.into(),
        }
    }

    /// How a TLS setting was written for this backend: `--tls-ca` or `tls_ca`.
    fn tls_name(&self, key: &str, from_flag: bool) -> String {
        if from_flag {
            format!("--{}", key.replace('_', "-"))
        } else {
            key.to_string()
        }
    }

    /// Whether the URL names a Redis Cluster (`redis+cluster://`, `rediss+cluster://`).
    pub fn is_cluster(&self) -> bool {
        cluster_parts(&self.url).is_some()
    }

    /// A cluster backend's seed nodes as `host:port`, in the order written; `None` for a single
    /// server.
    pub fn cluster_seeds(&self) -> Option<Vec<String>> {
        let (_, _, hosts, _) = cluster_parts(&self.url)?;
        Some(hosts.split(',').map(str::to_string).collect())
    }

    /// The single-server URL of a cluster's first seed (same scheme security, credentials and
    /// path), which is what [`client`](Self::client) connects to; the URL itself otherwise.
    fn single_url(&self) -> String {
        match cluster_parts(&self.url) {
            Some((scheme, userinfo, hosts, path)) => {
                let first = hosts.split(',').next().unwrap_or_default();
                format!("{scheme}://{userinfo}{first}{path}")
            }
            None => self.url.clone(),
        }
    }

    /// A Redis client for this backend, with TLS certificates loaded for `rediss://`. For a
    /// cluster, the client of its first seed node: `connect::Target` derives the other nodes'
    /// clients from it (same credentials and certificates).
    pub fn client(&self) -> Result<redis::Client, ConfigError> {
        let bad = |e: &dyn std::fmt::Display| {
            self.refused(format!(
                "{:?} is not a Redis URL redtap can use: {e}",
                self.redacted_url()
            ))
        };
        let url = self.single_url();
        if !url.starts_with("rediss://") {
            if self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some() {
                return Err(self.refused("TLS files given for a redis:// URL; use rediss://"));
            }
            return redis::Client::open(url.as_str()).map_err(|e| bad(&e));
        }
        // rustls needs one process-wide crypto provider; a second install is a harmless no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let flags = self.tls_from_flags;
        let read = |key: &str,
                    from_flag: bool,
                    p: &Option<PathBuf>|
         -> Result<Option<Vec<u8>>, ConfigError> {
            p.as_ref()
                .map(|p| {
                    std::fs::read(p).map_err(|e| {
                        self.refused(format!(
                            "cannot read {} {}: {e}",
                            self.tls_name(key, from_flag),
                            p.display()
                        ))
                    })
                })
                .transpose()
        };
        let root_cert = read("tls_ca", flags.ca, &self.tls_ca)?;
        let client_tls = match (
            read("tls_cert", flags.cert, &self.tls_cert)?,
            read("tls_key", flags.key, &self.tls_key)?,
        ) {
            (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
            (None, None) => None,
            (cert, _) => {
                let (given, missing) = if cert.is_some() {
                    (self.tls_name("tls_cert", flags.cert), "key")
                } else {
                    (self.tls_name("tls_key", flags.key), "cert")
                };
                return Err(self.refused(format!(
                    "{given} needs tls_{missing} (--tls-{missing}): a client certificate and \
                     its key go together"
                )));
            }
        };
        redis::Client::build_with_tls(
            url.as_str(),
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .map_err(|e| bad(&e))
    }

    /// The URL with any password replaced by `***`, safe for logs, metrics and API answers.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// A cluster URL's parts: scheme without `+cluster`, the user-info with its `@` (or empty), the
/// comma-separated `host:port` list, and the rest (path); `None` if `raw` is not a cluster URL.
fn cluster_parts(raw: &str) -> Option<(&str, &str, &str, &str)> {
    let (scheme, rest) = raw.split_once("://")?;
    let scheme = scheme.strip_suffix("+cluster")?;
    let (userinfo, hostpath) = match rest.rfind('@') {
        Some(at) => rest.split_at(at + 1),
        None => ("", rest),
    };
    let (hosts, path) = match hostpath.find('/') {
        Some(i) => hostpath.split_at(i),
        None => (hostpath, ""),
    };
    Some((scheme, userinfo, hosts, path))
}

/// `raw` with its password replaced by `***`; a URL that does not parse keeps what was typed
/// except anything that could be a password (between the first `:` after `://` and the last
/// `@`).
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) if u.has_host() => u.to_string(),
        _ => redact_typed(raw),
    }
}

fn redact_typed(raw: &str) -> String {
    let (scheme, rest) = match raw.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), raw),
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return raw.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}{user}:***@{host}"),
        // A lone name before '@' may be a password (`redis://secret@host`): hide it too.
        None => format!("{scheme}***@{host}"),
    }
}

/// Parse `NAME=URL@WEIGHT`. The weight follows the *last* `@`, so a URL with credentials
/// (`redis://user:pass@host`) still parses.
///
/// Errors never repeat the URL before it is known to be one: the text after the last `@` may
/// be part of a password when the weight is missing.
pub fn parse_backend_flag(s: &str) -> Result<BackendConfig, ConfigError> {
    let usage = "expected NAME=URL@WEIGHT, e.g. A=redis://127.0.0.1:6379@30";
    let whole = |problem: String| ConfigError::Backends {
        origin: Origin::Flag,
        problem,
    };
    let Some((name, rest)) = s.split_once('=') else {
        return Err(whole(format!("--backend: no '=' after the name; {usage}")));
    };
    if name.contains("://") {
        return Err(whole(format!("--backend: the name comes first; {usage}")));
    }
    let named = |problem: String| ConfigError::Backend {
        name: name.to_string(),
        origin: Origin::Flag,
        problem,
    };
    let Some((url, weight)) = rest.rsplit_once('@') else {
        return Err(named(format!("missing @WEIGHT; {usage}")));
    };
    let weight = parse_weight(weight).map_err(|_| {
        named(format!(
            "the weight after the last '@' must be an integer from 0 to {MAX_WEIGHT}; {usage}"
        ))
    })?;
    Ok(BackendConfig {
        name: name.to_string(),
        url: url.to_string(),
        weight,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        origin: Origin::Flag,
        tls_from_flags: TlsFromFlags::default(),
    })
}

/// Whether `name` may name a backend: letters, digits, `_`, `-` or `.` — the one rule, for the
/// configuration and for fleet weights alike.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

/// A weight that is not an integer from 0 to 10000, as typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("weight must be an integer from 0 to {MAX_WEIGHT}, got {0:?}")]
pub struct BadWeight(pub String);

/// A weight as written by a user: an integer from 0 to 10000. The one check of the range for
/// flags, the file and `redtap weights set`.
pub fn parse_weight(s: &str) -> Result<u32, BadWeight> {
    match s.trim().parse::<u32>() {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(BadWeight(s.to_string())),
    }
}

/// Check a list of backends: at least one, names unique and well formed, each URL a Redis
/// URL, no server twice, at least one non-zero weight.
pub fn validate_backends(backends: &[BackendConfig]) -> Result<(), ConfigError> {
    let Some(first) = backends.first() else {
        return Err(ConfigError::Backends {
            origin: Origin::Default,
            problem: "at least one --backend NAME=URL@WEIGHT (or a [[backend]] table in the \
                      config file) is required"
                .into(),
        });
    };
    let list = |problem: String| ConfigError::Backends {
        origin: first.origin.clone(),
        problem,
    };
    let mut seen = BTreeSet::new();
    for b in backends {
        if !is_valid_name(&b.name) {
            return Err(b.refused("a name uses letters, digits, '_', '-' or '.'"));
        }
        if !seen.insert(b.name.as_str()) {
            return Err(list(format!("backend name {:?} is used twice", b.name)));
        }
        if let Some(other) = backends
            .iter()
            .take_while(|o| !std::ptr::eq(*o, b))
            .find(|o| same_server(&o.url, &b.url))
        {
            return Err(list(format!(
                "backends {:?} and {:?} are the same Redis server and database: records would \
                 share one stream",
                other.name, b.name
            )));
        }
        if b.weight > MAX_WEIGHT {
            return Err(b.refused(BadWeight(b.weight.to_string()).to_string()));
        }
        check_url(b)?;
        b.client()?;
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(list(
            "at least one backend must have a non-zero weight".into(),
        ));
    }
    Ok(())
}

/// The URL is `redis://` or `rediss://` with a host; the message shows what was typed. A
/// cluster URL names at least one seed, each `host:port`, and no database (a cluster has only
/// database 0).
fn check_url(b: &BackendConfig) -> Result<(), ConfigError> {
    let shown = b.redacted_url();
    if let Some((scheme, _, hosts, path)) = cluster_parts(&b.url) {
        if !matches!(scheme, "redis" | "rediss") {
            return Err(b.refused(format!(
                "{shown:?} is not a Redis URL: use redis+cluster://host:port,host:port \
                 (rediss+cluster:// for TLS)"
            )));
        }
        for seed in hosts.split(',') {
            let ok = seed
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(b.refused(format!(
                    "{shown:?}: cluster seed {seed:?} is not host:port; use \
                     redis+cluster://host:port,host:port"
                )));
            }
        }
        if !matches!(path, "" | "/" | "/0") {
            return Err(b.refused(format!(
                "{shown:?}: a Redis Cluster has only database 0; remove {path:?}"
            )));
        }
        return Ok(());
    }
    if !b.url.contains("://") {
        return Err(b.refused(format!(
            "{shown:?} is not a Redis URL: write redis://{shown}"
        )));
    }
    let parsed = url::Url::parse(&b.url)
        .map_err(|e| b.refused(format!("{shown:?} is not a Redis URL: {e}")))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err(b.refused(format!(
            "{shown:?} is not a Redis URL: use redis://host:port[/db] (rediss:// for TLS)"
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(b.refused(format!("{shown:?} has no host: use redis://host:port[/db]")));
    }
    Ok(())
}

/// Whether two URLs name the same server and database (credentials aside); two cluster URLs
/// sharing a seed are the same cluster.
fn same_server(a: &str, b: &str) -> bool {
    if let (Some((_, _, ha, _)), Some((_, _, hb, _))) = (cluster_parts(a), cluster_parts(b)) {
        let norm = |s: &str| s.to_ascii_lowercase();
        return ha
            .split(',')
            .any(|x| hb.split(',').any(|y| norm(x) == norm(y)));
    }
    let key = |u: &str| {
        url::Url::parse(u).ok().map(|u| {
            let db = u.path().trim_matches('/').to_string();
            let db = if db.is_empty() { "0".to_string() } else { db };
            (
                u.host_str().map(str::to_ascii_lowercase),
                u.port().unwrap_or(6379),
                db,
            )
        })
    };
    key(a).is_some() && key(a) == key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_flag_with_credentials() {
        let b = parse_backend_flag("A=redis://u:p@w@127.0.0.1:6379/2@30").unwrap();
        assert_eq!(b.name, "A");
        assert_eq!(b.url, "redis://u:p@w@127.0.0.1:6379/2");
        assert_eq!(b.weight, 30);
    }

    #[test]
    fn cluster_urls_parse_with_seeds_credentials_and_weight() {
        let b = parse_backend_flag("C=redis+cluster://u:p@w@h1:7000,h2:7001@30").unwrap();
        assert_eq!(b.url, "redis+cluster://u:p@w@h1:7000,h2:7001");
        assert_eq!(b.weight, 30);
        assert!(b.is_cluster());
        assert_eq!(b.cluster_seeds().unwrap(), ["h1:7000", "h2:7001"]);
        assert_eq!(b.single_url(), "redis://u:p@w@h1:7000");
        assert!(!b.redacted_url().contains("p@w"), "{}", b.redacted_url());
        validate_backends(std::slice::from_ref(&b)).unwrap();
        let tls = parse_backend_flag("T=rediss+cluster://h1:7000@1").unwrap();
        assert_eq!(tls.single_url(), "rediss://h1:7000");
        assert!(!parse_backend_flag("S=redis://h1:7000@1")
            .unwrap()
            .is_cluster());
    }

    #[test]
    fn bad_cluster_urls_are_refused_with_the_reason() {
        for (url, says) in [
            ("redis+cluster://h1,h2:7001", "is not host:port"),
            ("redis+cluster://h1:7000/2", "only database 0"),
            ("redis+cluster://", "is not host:port"),
            ("http+cluster://h1:7000", "is not a Redis URL"),
        ] {
            let b = parse_backend_flag(&format!("C={url}@1")).unwrap();
            let e = validate_backends(&[b]).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
        let a = parse_backend_flag("A=redis+cluster://h1:7000,h2:7001@1").unwrap();
        let b = parse_backend_flag("B=redis+cluster://h2:7001@1").unwrap();
        let e = validate_backends(&[a, b]).unwrap_err().to_string();
        assert!(e.contains("same Redis server"), "{e}");
    }

    #[test]
    fn password_redacted_even_when_the_url_does_not_parse() {
        assert_eq!(
            redact_url("redis://user:secret@h:1/0"),
            "redis://user:***@h:1/0"
        );
        assert_eq!(
            redact_url("redis://u:secret@host:badport"),
            "redis://u:***@host:badport"
        );
        assert_eq!(redact_url("redis://u:se@cret@[::1"), "redis://u:***@[::1");
        assert_eq!(redact_url("u:secret@h:1"), "u:***@h:1");
        assert_eq!(redact_url("127.0.0.1:6379"), "127.0.0.1:6379");
    }

    #[test]
    fn weights_outside_the_range_are_refused_as_typed() {
        assert_eq!(parse_weight(" 30 "), Ok(30));
        assert_eq!(parse_weight("10000"), Ok(10_000));
        for bad in ["10001", "-1", "1.5", "", "x"] {
            assert_eq!(parse_weight(bad), Err(BadWeight(bad.into())));
        }
    }
}
