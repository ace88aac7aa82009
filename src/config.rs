//! Configuration: one struct tree, from a TOML file and command-line flags, validated before
//! anything binds.
//!
//! Flags override the file; a `--backend` flag replaces the file's whole backend list. Every
//! problem is reported as one [`ConfigError`] line naming the setting, and the binary exits 64.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::balance::{OnDown, MAX_WEIGHT};
use crate::health::HealthConfig;

/// A configuration problem, phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Bounds of every numeric setting: each is refused outside them with a message naming the
/// range (a value inside can never overflow a timer, an allocation or a Redis argument).
pub mod bounds {
    use std::time::Duration;

    /// `--retention`: 1 s to 30 days.
    pub const RETENTION: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(30 * 86_400));
    /// `--idle-timeout`: 100 ms to 1 day.
    pub const IDLE_TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(86_400));
    /// `--grace`: 0 (drop what is queued at once) to 1 hour.
    pub const GRACE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(3_600));
    /// `--health-timeout`: 10 ms to 60 s.
    pub const HEALTH_TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(10), Duration::from_secs(60));
    /// `--down-after`, `--up-after`: 1 to 1000 outcomes.
    pub const HEALTH_COUNT: (u32, u32) = (1, 1_000);
    /// `--max-connections`: 1 to 1,000,000.
    pub const MAX_CONNECTIONS: (usize, usize) = (1, 1_000_000);
    /// `--queue-capacity`: 1 to 16 Mi records.
    pub const QUEUE_CAPACITY: (usize, usize) = (1, 1 << 24);
    /// `--batch-size`: 1 to 100,000 records per pipeline.
    pub const BATCH_SIZE: (usize, usize) = (1, 100_000);
    /// `--buffer-max`: 1 KiB to 64 GiB.
    pub const BUFFER_MAX: (usize, usize) = (1 << 10, 64 << 30);
    /// `--ring-size`: 1 MiB to 2 GiB.
    pub const RING_SIZE: (usize, usize) = (1 << 20, 1 << 31);
}

fn in_range<T: PartialOrd + std::fmt::Display>(
    name: &str,
    v: T,
    (lo, hi): (T, T),
) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        return err(format!("--{name} {v} is out of range: use {lo} to {hi}"));
    }
    Ok(v)
}

fn bounded_duration(
    name: &str,
    value: Option<&str>,
    default: &str,
    (lo, hi): (Duration, Duration),
) -> Result<Duration, ConfigError> {
    let d = duration(name, value, default)?;
    if d < lo || d > hi {
        return err(format!(
            "--{name} {:?} is out of range: use {} to {}",
            value.unwrap_or(default),
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        ));
    }
    Ok(d)
}

/// How records are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// One record per TCP segment sent to the address (needs CAP_NET_RAW); the default.
    Packets,
    /// One record per accepted TCP connection; needs no privileges.
    Connections,
}

/// Whether redtap accepts connections on the listen address itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ServeMode {
    /// Accept on the port and discard what clients send, so their handshakes complete.
    Sink,
    /// Bind nothing: a passive tap on a port another program serves (packets mode only).
    None,
}

/// How records are laid out in Redis (see docs/redis-schema.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schema {
    /// One Redis Stream per agent and capture second, each expiring by itself.
    Stream,
    /// One string key per record with an absolute expiry.
    Keys,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// One Redis backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Short name used in the API, metrics and logs (letters, digits, `_`, `-`, `.`).
    pub name: String,
    /// `redis://[user:password@]host[:port][/db]`.
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
}

impl BackendConfig {
    /// A Redis client for this backend, with TLS certificates loaded for `rediss://`.
    pub fn client(&self) -> Result<redis::Client, ConfigError> {
        let bad = |e: &dyn std::fmt::Display| {
            ConfigError(format!(
                "backend {:?}: bad URL {:?}: {e}",
                self.name,
                self.redacted_url()
            ))
        };
        if !self.url.starts_with("rediss://") {
            if self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some() {
                return err(format!(
                    "backend {:?}: TLS files given for a redis:// URL; use rediss://",
                    self.name
                ));
            }
            return redis::Client::open(self.url.as_str()).map_err(|e| bad(&e));
        }
        // rustls needs one process-wide crypto provider; a second install is a harmless no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let read = |what: &str, p: &Option<PathBuf>| -> Result<Option<Vec<u8>>, ConfigError> {
            p.as_ref()
                .map(|p| {
                    std::fs::read(p).map_err(|e| {
                        ConfigError(format!(
                            "backend {:?}: cannot read {what} {}: {e}",
                            self.name,
                            p.display()
                        ))
                    })
                })
                .transpose()
        };
        let root_cert = read("--tls-ca", &self.tls_ca)?;
        let client_tls = match (
            read("--tls-cert", &self.tls_cert)?,
            read("--tls-key", &self.tls_key)?,
        ) {
            (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
            (None, None) => None,
            _ => {
                return err(format!(
                    "backend {:?}: --tls-cert and --tls-key go together",
                    self.name
                ))
            }
        };
        redis::Client::build_with_tls(
            self.url.as_str(),
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

/// `url` with its password replaced by `***`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<invalid url>".to_string(),
    }
}

/// The file form: every field optional, defaults filled in by [`Config::resolve`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address and port to capture on.
    pub listen: Option<String>,
    /// `packets` or `connections`.
    pub capture: Option<CaptureMode>,
    /// `sink` or `none`.
    pub serve: Option<ServeMode>,
    /// Extra capture filter in tcpdump syntax, ANDed with the built-in one (packets mode).
    pub filter: Option<String>,
    /// Size of the kernel capture ring, e.g. `64MiB` (packets mode).
    pub ring_size: Option<String>,
    /// How long a record stays readable, counted from its capture, e.g. `5m`.
    pub retention: Option<String>,
    /// Admin API address, or `off`.
    pub admin: Option<String>,
    /// `stream` or `keys`.
    pub schema: Option<Schema>,
    /// Prefix of every Redis key.
    pub prefix: Option<String>,
    /// This agent's name in Redis keys.
    pub agent: Option<String>,
    /// Most connections served at once (connections mode).
    pub max_connections: Option<usize>,
    /// Close a connection that sends nothing for this long.
    pub idle_timeout: Option<String>,
    /// How long shutdown may take to write out queued records.
    pub grace: Option<String>,
    /// Records the capture → balancer queue holds.
    pub queue_capacity: Option<usize>,
    /// Most records written to Redis in one pipelined batch.
    pub batch_size: Option<usize>,
    /// `text` or `json`.
    pub log_format: Option<LogFormat>,
    /// `redistribute` or `hold`.
    pub on_backend_down: Option<OnDown>,
    /// Memory for records waiting on down backends, e.g. `256MiB`.
    pub buffer_max: Option<String>,
    /// Consecutive failures that mark a backend down.
    pub down_after: Option<u32>,
    /// Consecutive successful probes that mark it up again.
    pub up_after: Option<u32>,
    /// How long a Redis command may take before it counts as failed.
    pub health_timeout: Option<String>,
    /// Where weights set through the API are kept across restarts, or `off`.
    pub state_file: Option<String>,
    /// Bearer token the admin API requires.
    pub admin_token: Option<String>,
    /// The control Redis keeping the fleet's weights (any URL a backend takes).
    pub control: Option<String>,
    /// The Redis backends.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// Flags of `redtap run`. Each overrides the file's setting of the same name.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunArgs {
    /// TOML configuration file; flags override its settings.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Address and port to capture on, e.g. 127.0.0.1:9000 or [::1]:9000.
    #[arg(long)]
    pub listen: Option<String>,
    /// A Redis backend as NAME=URL@WEIGHT, e.g. A=redis://127.0.0.1:6379@30. Repeat for each.
    #[arg(long = "backend", value_name = "NAME=URL@WEIGHT")]
    pub backends: Vec<String>,
    /// How long each record stays readable, from its capture time (default 5m).
    #[arg(long)]
    pub retention: Option<String>,
    /// Capture mode (default packets; connections needs no privileges).
    #[arg(long, value_enum)]
    pub capture: Option<CaptureMode>,
    /// Accept and discard on the listen address (sink, default) or bind nothing (none).
    #[arg(long, value_enum)]
    pub serve: Option<ServeMode>,
    /// Packets mode: extra filter in tcpdump syntax, ANDed with "TCP to the listen address".
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
    /// Packets mode: size of the kernel capture ring, e.g. 64MiB (default 64MiB).
    #[arg(long, value_name = "BYTES")]
    pub ring_size: Option<String>,
    /// Admin API listen address, or `off` (default 127.0.0.1:9900).
    #[arg(long)]
    pub admin: Option<String>,
    /// Redis layout (default stream).
    #[arg(long, value_enum)]
    pub schema: Option<Schema>,
    /// Prefix of every Redis key (default redtap).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Agent name in Redis keys (default <hostname>-<listen port>).
    #[arg(long)]
    pub agent: Option<String>,
    /// Most connections served at once (default 1024).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Close connections idle this long (default 30s).
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// Time allowed at shutdown to write out queued records (default 5s).
    #[arg(long)]
    pub grace: Option<String>,
    /// Capacity of the capture queue in records (default 65536).
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Most records per pipelined Redis batch (default 1024).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Log format (default text).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Where a down backend's share goes (default redistribute).
    #[arg(long, value_enum)]
    pub on_backend_down: Option<OnDown>,
    /// Memory for records waiting on down backends (default 256MiB).
    #[arg(long)]
    pub buffer_max: Option<String>,
    /// Consecutive failures that mark a backend down (default 2).
    #[arg(long)]
    pub down_after: Option<u32>,
    /// Consecutive successful probes that mark it up again (default 2).
    #[arg(long)]
    pub up_after: Option<u32>,
    /// How long a Redis command may take before it counts as failed (default 750ms).
    #[arg(long)]
    pub health_timeout: Option<String>,
    /// File keeping weights set through the API across restarts, or `off`
    /// (default redtap-state-<agent>.json in the working directory).
    #[arg(long)]
    pub state_file: Option<String>,
    /// Bearer token the admin API requires (required when it listens beyond loopback).
    #[arg(long, env = "REDTAP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Control Redis holding the fleet's weights (redis:// or rediss:// URL, as for a backend;
    /// --tls-* apply to it): every agent started with it follows one versioned record.
    #[arg(long, value_name = "URL")]
    pub control: Option<String>,
    /// CA certificate (PEM) for rediss:// backends that have none of their own.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for rediss:// backends that have none of their own.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM) that goes with --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address and port to capture on.
    pub listen: SocketAddr,
    /// Capture mode.
    pub capture: CaptureMode,
    /// Whether redtap accepts on the listen address.
    pub serve: ServeMode,
    /// Extra capture filter (tcpdump syntax), packets mode.
    pub filter: Option<String>,
    /// Kernel capture ring size in bytes, packets mode.
    pub ring_size: usize,
    /// The backends, in order; names are unique and at least one weight is non-zero.
    pub backends: Vec<BackendConfig>,
    /// How long a record stays readable from its capture time.
    pub retention: Duration,
    /// Admin API address; `None` when `off`.
    pub admin: Option<SocketAddr>,
    /// Redis layout.
    pub schema: Schema,
    /// Prefix of every Redis key.
    pub prefix: String,
    /// This agent's name in Redis keys.
    pub agent: String,
    /// Most connections served at once.
    pub max_connections: usize,
    /// Close connections idle this long.
    pub idle_timeout: Duration,
    /// Time allowed at shutdown to write out queued records.
    pub grace: Duration,
    /// Capacity of the capture → balancer queue.
    pub queue_capacity: usize,
    /// Most records per pipelined batch.
    pub batch_size: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// The file this came from, re-read on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// Where a down backend's share goes.
    pub on_backend_down: OnDown,
    /// Bytes of records allowed to wait on down backends.
    pub buffer_max: usize,
    /// Health thresholds.
    pub health: HealthConfig,
    /// Where API weight changes are kept across restarts; `None` when `off`.
    pub state_file: Option<PathBuf>,
    /// Bearer token the admin API requires, if any.
    pub admin_token: Option<String>,
    /// The control Redis (`--control`), as a backend-like target named `control`.
    pub control: Option<BackendConfig>,
}

impl Config {
    /// Read the file named by `args.config` (if any), apply the flags over it, and validate.
    pub fn load(args: &RunArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Config::resolve(file, args)
    }

    /// Merge `file` and `args` (flags win) and validate every field.
    pub fn resolve(file: FileConfig, args: &RunArgs) -> Result<Config, ConfigError> {
        let listen_s = args
            .listen
            .clone()
            .or(file.listen)
            .ok_or_else(|| ConfigError("--listen is required (e.g. 127.0.0.1:9000)".into()))?;
        let listen: SocketAddr = listen_s.parse().map_err(|_| {
            ConfigError(format!(
                "--listen {listen_s:?} is not an IP:port (e.g. 127.0.0.1:9000 or [::1]:9000)"
            ))
        })?;
        if listen.port() == 0 {
            return err("--listen needs a port other than 0");
        }

        let mut backends: Vec<BackendConfig> = if args.backends.is_empty() {
            file.backends
        } else {
            args.backends
                .iter()
                .map(|s| parse_backend_flag(s))
                .collect::<Result<_, _>>()?
        };
        for b in backends
            .iter_mut()
            .filter(|b| b.url.starts_with("rediss://"))
        {
            b.tls_ca = b.tls_ca.take().or_else(|| args.tls_ca.clone());
            b.tls_cert = b.tls_cert.take().or_else(|| args.tls_cert.clone());
            b.tls_key = b.tls_key.take().or_else(|| args.tls_key.clone());
        }
        validate_backends(&backends)?;

        let retention = bounded_duration(
            "retention",
            args.retention.as_deref().or(file.retention.as_deref()),
            "5m",
            bounds::RETENTION,
        )?;
        let admin_s = args
            .admin
            .clone()
            .or(file.admin)
            .unwrap_or_else(|| "127.0.0.1:9900".into());
        let admin: Option<SocketAddr> = if admin_s == "off" {
            None
        } else {
            Some(admin_s.parse().map_err(|_| {
                ConfigError(format!(
                    "--admin {admin_s:?} is not an IP:port or \"off\" (e.g. 127.0.0.1:9900)"
                ))
            })?)
        };
        let prefix = args
            .prefix
            .clone()
            .or(file.prefix)
            .unwrap_or_else(|| "redtap".into());
        check_key_part("prefix", &prefix)?;
        let agent = match args.agent.clone().or(file.agent) {
            Some(a) => a,
            None => format!("{}-{}", hostname(), listen.port()),
        };
        check_key_part("agent", &agent)?;

        let max_connections = in_range(
            "max-connections",
            args.max_connections
                .or(file.max_connections)
                .unwrap_or(1024),
            bounds::MAX_CONNECTIONS,
        )?;
        let queue_capacity = in_range(
            "queue-capacity",
            args.queue_capacity
                .or(file.queue_capacity)
                .unwrap_or(65_536),
            bounds::QUEUE_CAPACITY,
        )?;
        let batch_size = in_range(
            "batch-size",
            args.batch_size.or(file.batch_size).unwrap_or(1024),
            bounds::BATCH_SIZE,
        )?;

        let buffer_s = args
            .buffer_max
            .clone()
            .or(file.buffer_max)
            .unwrap_or_else(|| "256MiB".into());
        let buffer_max = parse_bytes(&buffer_s).ok_or_else(|| {
            ConfigError(format!(
                "--buffer-max {buffer_s:?} is not a size; use e.g. 64MiB or 1GiB"
            ))
        })?;
        if !(bounds::BUFFER_MAX.0..=bounds::BUFFER_MAX.1).contains(&buffer_max) {
            return err(format!(
                "--buffer-max {buffer_s:?} is out of range: use 1KiB to 64GiB"
            ));
        }
        let defaults = HealthConfig::default();
        let health = HealthConfig {
            down_after: in_range(
                "down-after",
                args.down_after
                    .or(file.down_after)
                    .unwrap_or(defaults.down_after),
                bounds::HEALTH_COUNT,
            )?,
            up_after: in_range(
                "up-after",
                args.up_after.or(file.up_after).unwrap_or(defaults.up_after),
                bounds::HEALTH_COUNT,
            )?,
            timeout: bounded_duration(
                "health-timeout",
                args.health_timeout
                    .as_deref()
                    .or(file.health_timeout.as_deref()),
                "750ms",
                bounds::HEALTH_TIMEOUT,
            )?,
            probe_every: defaults.probe_every,
        };
        let state_file = match args.state_file.clone().or(file.state_file) {
            Some(s) if s == "off" => None,
            Some(s) => Some(PathBuf::from(s)),
            None => Some(PathBuf::from(format!("redtap-state-{agent}.json"))),
        };
        let admin_token = args.admin_token.clone().or(file.admin_token);
        let control = match args.control.clone().or(file.control) {
            Some(url) => Some(control_target(url, args)?),
            None => None,
        };
        if let Some(t) = &admin_token {
            if t.len() < 16 || t.chars().any(|c| c.is_whitespace()) {
                return err("--admin-token must be at least 16 characters, without spaces");
            }
        }
        if let Some(addr) = admin {
            if !addr.ip().is_loopback() && admin_token.is_none() {
                return err(format!(
                    "--admin {addr} is reachable from other hosts: set --admin-token \
                     (or REDTAP_ADMIN_TOKEN), or listen on 127.0.0.1"
                ));
            }
        }
        let capture = args
            .capture
            .or(file.capture)
            .unwrap_or(CaptureMode::Packets);
        let serve = args.serve.or(file.serve).unwrap_or(ServeMode::Sink);
        if capture == CaptureMode::Connections && serve == ServeMode::None {
            return err(
                "--serve none needs --capture packets: connections mode records what it accepts",
            );
        }
        let filter = args.filter.clone().or(file.filter);
        if capture == CaptureMode::Connections && filter.is_some() {
            return err("--filter needs --capture packets: connections mode has no packet filter");
        }
        if filter.as_deref().is_some_and(|f| f.trim().is_empty()) {
            return err("--filter is empty; leave it out to capture every segment to --listen");
        }
        let ring_s = args
            .ring_size
            .clone()
            .or(file.ring_size)
            .unwrap_or_else(|| "64MiB".into());
        let ring_size = parse_bytes(&ring_s).ok_or_else(|| {
            ConfigError(format!(
                "--ring-size {ring_s:?} is not a size; use e.g. 8MiB, 64MiB, 1GiB"
            ))
        })?;
        if !(bounds::RING_SIZE.0..=bounds::RING_SIZE.1).contains(&ring_size) {
            return err(format!("--ring-size {ring_s:?} must be from 1MiB to 2GiB"));
        }

        Ok(Config {
            on_backend_down: args
                .on_backend_down
                .or(file.on_backend_down)
                .unwrap_or(OnDown::Redistribute),
            buffer_max,
            health,
            state_file,
            admin_token,
            control,
            listen,
            capture,
            serve,
            filter,
            ring_size,
            backends,
            retention,
            admin,
            schema: args.schema.or(file.schema).unwrap_or(Schema::Stream),
            prefix,
            agent,
            max_connections,
            idle_timeout: bounded_duration(
                "idle-timeout",
                args.idle_timeout
                    .as_deref()
                    .or(file.idle_timeout.as_deref()),
                "30s",
                bounds::IDLE_TIMEOUT,
            )?,
            grace: bounded_duration(
                "grace",
                args.grace.as_deref().or(file.grace.as_deref()),
                "5s",
                bounds::GRACE,
            )?,
            queue_capacity,
            batch_size,
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            config_path: args.config.clone(),
        })
    }
}

/// `--control URL` as a backend-like target: the run's `--tls-*` apply to a `rediss://` URL,
/// and the URL is checked now (scheme, TLS files) so a bad one stops the start with exit 64.
fn control_target(url: String, args: &RunArgs) -> Result<BackendConfig, ConfigError> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return err(format!(
            "--control {:?} must be a redis:// or rediss:// URL",
            redact_url(&url)
        ));
    }
    let tls = url.starts_with("rediss://");
    let target = BackendConfig {
        name: "control".into(),
        url,
        weight: 0,
        tls_ca: args.tls_ca.clone().filter(|_| tls),
        tls_cert: args.tls_cert.clone().filter(|_| tls),
        tls_key: args.tls_key.clone().filter(|_| tls),
    };
    target.client()?;
    Ok(target)
}

/// Read and parse a TOML configuration file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        let at = e
            .span()
            .map(|s| {
                let line = text[..s.start].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        ConfigError(format!("config file {}{at}: {msg}", path.display()))
    })
}

/// Parse `NAME=URL@WEIGHT`. The weight follows the *last* `@`, so a URL with credentials
/// (`redis://user:pass@host`) still parses.
///
/// Errors never repeat the flag or its URL: either may hold a password.
pub fn parse_backend_flag(s: &str) -> Result<BackendConfig, ConfigError> {
    let usage = "expected NAME=URL@WEIGHT, e.g. A=redis://127.0.0.1:6379@30";
    let Some((name, rest)) = s.split_once('=') else {
        return err(format!("--backend: no '=' after the name; {usage}"));
    };
    if name.contains("://") {
        return err(format!("--backend: the name comes first; {usage}"));
    }
    let Some((url, weight)) = rest.rsplit_once('@') else {
        return err(format!("--backend {name:?}: missing @WEIGHT; {usage}"));
    };
    let weight = parse_weight(weight).map_err(|_| {
        // The text after the last '@' may be part of a password when the weight is missing.
        ConfigError(format!(
            "--backend {name:?}: the weight after the last '@' must be an integer from 0 to \
             {MAX_WEIGHT}; {usage}"
        ))
    })?;
    Ok(BackendConfig {
        name: name.to_string(),
        url: url.to_string(),
        weight,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
    })
}

/// A weight as written by a user: an integer from 0 to 10000.
pub fn parse_weight(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(format!(
            "weight must be an integer from 0 to {MAX_WEIGHT}, got {s:?}"
        )),
    }
}

pub fn validate_backends(backends: &[BackendConfig]) -> Result<(), ConfigError> {
    if backends.is_empty() {
        return err("at least one --backend NAME=URL@WEIGHT is required");
    }
    let mut seen = BTreeSet::new();
    for b in backends {
        if b.name.is_empty()
            || !b
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return err(format!(
                "backend name {:?}: use letters, digits, '_', '-' or '.'",
                b.name
            ));
        }
        if !seen.insert(b.name.as_str()) {
            return err(format!("backend name {:?} is used twice", b.name));
        }
        if let Some(other) = backends
            .iter()
            .take_while(|o| !std::ptr::eq(*o, b))
            .find(|o| same_server(&o.url, &b.url))
        {
            return err(format!(
                "backends {:?} and {:?} are the same Redis server and database: records would \
                 share one stream",
                other.name, b.name
            ));
        }
        if b.weight > MAX_WEIGHT {
            return err(format!(
                "backend {:?}: weight must be an integer from 0 to {MAX_WEIGHT}, got {}",
                b.name, b.weight
            ));
        }
        let parsed = url::Url::parse(&b.url).map_err(|e| {
            ConfigError(format!(
                "backend {:?}: bad URL {:?}: {e}",
                b.name,
                b.redacted_url()
            ))
        })?;
        if !matches!(parsed.scheme(), "redis" | "rediss") || parsed.host_str().is_none() {
            return err(format!(
                "backend {:?}: URL must look like redis://host:port[/db], got {:?}",
                b.name,
                b.redacted_url()
            ));
        }
        b.client()?;
    }
    if backends.iter().all(|b| b.weight == 0) {
        return err("at least one backend must have a non-zero weight");
    }
    Ok(())
}

/// Whether two URLs name the same server and database (credentials aside).
fn same_server(a: &str, b: &str) -> bool {
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

fn duration(name: &str, value: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let s = value.unwrap_or(default);
    humantime::parse_duration(s).map_err(|e| {
        ConfigError(format!(
            "--{name} {s:?} is not a duration ({e}); use e.g. 500ms, 30s, 5m"
        ))
    })
}

/// A size such as `64MiB`, `1GiB`, `512KiB` or `4096` (bytes). `MB`/`GB` are powers of ten.
pub fn parse_bytes(s: &str) -> Option<usize> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .ok()
        .and_then(|b| usize::try_from(b.as_u64()).ok())
}

fn check_key_part(name: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == ':') {
        return err(format!(
            "--{name} {v:?} must be non-empty, without spaces or ':'"
        ));
    }
    Ok(())
}

fn hostname() -> String {
    let h = gethostname::gethostname().to_string_lossy().into_owned();
    let h: String = h
        .chars()
        .map(|c| {
            if c == ':' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if h.is_empty() {
        "redtap".into()
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(backends: &[&str]) -> RunArgs {
        RunArgs {
            listen: Some("127.0.0.1:9000".into()),
            backends: backends.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn backend_flag_with_credentials() {
        let b = parse_backend_flag("A=redis://u:p@w@127.0.0.1:6379/2@30").unwrap();
        assert_eq!(b.name, "A");
        assert_eq!(b.url, "redis://u:p@w@127.0.0.1:6379/2");
        assert_eq!(b.weight, 30);
    }

    #[test]
    fn bad_inputs_name_the_problem() {
        for (flags, needle) in [
            (vec!["A=redis://127.0.0.1:6379"], "missing @WEIGHT"),
            (vec!["A=redis://127.0.0.1:6379@-1"], "integer from 0"),
            (vec!["A=redis://127.0.0.1:6379@1.5"], "integer from 0"),
            (vec!["A=redis://127.0.0.1:6379@10001"], "integer from 0"),
            (vec!["A=redis://x@0"], "non-zero"),
            (vec!["A=http://x@1"], "redis://"),
            (vec!["A=redis://x@1", "A=redis://y@1"], "used twice"),
            (
                vec!["A=redis://x@1", "B=redis://:p@x:6379/0@1"],
                "same Redis server",
            ),
            (vec![], "at least one --backend"),
        ] {
            let e = Config::resolve(FileConfig::default(), &args(&flags)).unwrap_err();
            assert!(e.0.contains(needle), "{flags:?}: {e}");
        }
    }

    #[test]
    fn flags_override_file() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:7000"
            retention = "2s"
            [[backend]]
            name = "A"
            url = "redis://127.0.0.1:1"
            weight = 1
            "#,
        )
        .unwrap();
        let mut a = args(&[]);
        a.retention = Some("10s".into());
        let c = Config::resolve(file, &a).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.retention, Duration::from_secs(10));
        assert_eq!(c.backends.len(), 1);
        assert_eq!(c.agent, format!("{}-9000", hostname()));
    }

    #[test]
    fn packets_is_the_default_and_sizes_parse() {
        let c = Config::resolve(FileConfig::default(), &args(&["A=redis://x@1"])).unwrap();
        assert_eq!(c.capture, CaptureMode::Packets);
        assert_eq!(c.serve, ServeMode::Sink);
        assert_eq!(c.ring_size, 64 << 20);
        assert_eq!(parse_bytes("8MiB"), Some(8 << 20));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("MiB"), None);
        assert_eq!(parse_bytes("3 parsecs"), None);
        let mut a = args(&["A=redis://x@1"]);
        a.ring_size = Some("100".into());
        let e = Config::resolve(FileConfig::default(), &a).unwrap_err();
        assert!(e.0.contains("--ring-size"), "{e}");
        let mut a = args(&["A=redis://x@1"]);
        a.capture = Some(CaptureMode::Connections);
        a.serve = Some(ServeMode::None);
        let e = Config::resolve(FileConfig::default(), &a).unwrap_err();
        assert!(e.0.contains("--serve none"), "{e}");
        a.serve = None;
        a.filter = Some("src net 10.0.0.0/8".into());
        let e = Config::resolve(FileConfig::default(), &a).unwrap_err();
        assert!(e.0.contains("--filter needs --capture packets"), "{e}");
    }

    #[test]
    fn password_redacted() {
        assert_eq!(
            redact_url("redis://user:secret@h:1/0"),
            "redis://user:***@h:1/0"
        );
    }
}
