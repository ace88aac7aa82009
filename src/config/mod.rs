//! Configuration: the settings of `redtap run` from flags, the environment and a TOML file,
//! validated into one [`Config`] before anything binds.
//!
//! Owns: the one settings source ([`settings`]: each setting's flag, key, doc and default
//! declared once), the merge (flag over `REDTAP_ADMIN_TOKEN` over file over default, each value
//! remembering where it came from), every bound and check, the default state directory, and
//! the typed [`ConfigError`] whose one line names what the operator typed (`--retention 5x`,
//! `retention = "5x" in /etc/redtap.toml`). A `--backend` flag replaces the file's whole
//! backend list. Never: binds or connects — it runs before any socket exists.
//!
//! Adding a setting: a field in [`settings::Settings`] (its doc is the help, its default one
//! [`settings::Fallback`]), a field in [`Config`] and its check in [`Config::resolve_with`], and
//! a row in README's configuration reference (a test compares the two).

mod backend;
mod error;
pub mod settings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::balance::OnDown;
use crate::health::HealthConfig;

pub use backend::{
    is_valid_name, parse_backend_flag, parse_weight, redact_url, validate_backends, BackendConfig,
    BadWeight, TlsFromFlags,
};
pub use error::{At, ConfigError, Origin};
pub use settings::{Layers, Settings, Sourced};

/// The flags of `redtap run` (the same struct as the file: see [`Settings`]).
pub type RunArgs = Settings;
/// The TOML file of `redtap run` (the same struct as the flags: see [`Settings`]).
pub type FileConfig = Settings;

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
    /// `--capture-threads`: 1 to 64 per device.
    pub const CAPTURE_THREADS: (usize, usize) = (1, 64);
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
    /// Capture threads per device, packets mode.
    pub capture_threads: usize,
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
    /// Set when `state_file` is the old default in the working directory, found at start-up
    /// (the default before the state directory): where it belongs now.
    pub state_file_moved_to: Option<PathBuf>,
    /// Bearer token the admin API requires, if any.
    pub admin_token: Option<String>,
    /// The control Redis (`--control`), as a backend-like target named `control`.
    pub control: Option<BackendConfig>,
}

impl Config {
    /// Read the file named by `args.config` (if any), apply the flags and the environment over
    /// it, validate, and create the default state directory if it is the one in use.
    pub fn load(args: &RunArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let state_given = args.state_file.is_some() || file.state_file.is_some();
        let mut config = Config::resolve_with(file, args, &|var| std::env::var(var).ok())?;
        if !state_given {
            if let Some(new) = config.state_file.clone() {
                // Before the state directory, the default was this name in the working
                // directory: keep using a file found there, so an upgrade keeps its weights,
                // and say where it belongs now.
                let old = new.file_name().map(PathBuf::from);
                if let Some(old) = old.filter(|o| o.is_file() && !new.exists()) {
                    let old = std::env::current_dir().map_or(old.clone(), |d| d.join(old));
                    config.state_file = Some(old);
                    config.state_file_moved_to = Some(new);
                } else if let Some(dir) = new.parent() {
                    create_state_dir(dir)?;
                }
            }
        }
        Ok(config)
    }

    /// Merge `file` and `args` (flags win; `REDTAP_ADMIN_TOKEN` and the state directory from
    /// the process environment) and validate every field. Creates nothing.
    pub fn resolve(file: FileConfig, args: &RunArgs) -> Result<Config, ConfigError> {
        Config::resolve_with(file, args, &|var| std::env::var(var).ok())
    }

    /// [`resolve`](Self::resolve) with the environment given as a lookup.
    pub fn resolve_with(
        file: FileConfig,
        args: &RunArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let l = Layers::new(args, &file, env);

        let listen_s = l.listen()?;
        let listen: SocketAddr = listen_s
            .value
            .parse()
            .map_err(|_| listen_s.invalid("not an IP:port (e.g. 127.0.0.1:9000 or [::1]:9000)"))?;
        if listen.port() == 0 {
            return Err(listen_s.invalid("needs a port other than 0"));
        }

        let backends = backends(&l, &file)?;
        let retention = duration(&l.retention()?, bounds::RETENTION)?;

        let admin_s = l.admin()?;
        let admin: Option<SocketAddr> =
            if admin_s.value == "off" {
                None
            } else {
                Some(admin_s.value.parse().map_err(|_| {
                    admin_s.invalid("not an IP:port or \"off\" (e.g. 127.0.0.1:9900)")
                })?)
            };
        let prefix = key_part(l.prefix()?)?;
        let agent = match l.agent().ok() {
            Some(a) => key_part(a)?,
            None => format!("{}-{}", hostname(), listen.port()),
        };

        let max_connections = number(&l.max_connections()?, bounds::MAX_CONNECTIONS)?;
        let queue_capacity = number(&l.queue_capacity()?, bounds::QUEUE_CAPACITY)?;
        let batch_size = number(&l.batch_size()?, bounds::BATCH_SIZE)?;
        let buffer_max = size(&l.buffer_max()?, bounds::BUFFER_MAX)?;
        let health = HealthConfig {
            down_after: number(&l.down_after()?, bounds::HEALTH_COUNT)?,
            up_after: number(&l.up_after()?, bounds::HEALTH_COUNT)?,
            timeout: duration(&l.health_timeout()?, bounds::HEALTH_TIMEOUT)?,
            probe_every: HealthConfig::default().probe_every,
        };
        let state_file = match l.state_file().ok() {
            Some(s) if s.value == "off" => None,
            Some(s) => Some(PathBuf::from(s.value)),
            None => Some(default_state_dir(env)?.join(format!("redtap-state-{agent}.json"))),
        };
        let admin_token = l.admin_token().ok();
        if let Some(t) = &admin_token {
            if t.value.len() < 16 || t.value.chars().any(char::is_whitespace) {
                return Err(t.invalid("must be at least 16 characters, without spaces"));
            }
        }
        if let Some(addr) = admin {
            if !addr.ip().is_loopback() && admin_token.is_none() {
                return Err(admin_s.invalid(
                    "is reachable from other hosts: set --admin-token (or REDTAP_ADMIN_TOKEN, or \
                     admin_token in the config file), or listen on 127.0.0.1",
                ));
            }
        }
        let capture = l.capture()?;
        let serve = l.serve()?;
        if capture.value == CaptureMode::Connections && serve.value == ServeMode::None {
            return Err(serve.invalid(format!(
                "needs packets capture, but {} records what it accepts",
                capture.shown()
            )));
        }
        let filter = l.filter().ok();
        if let Some(f) = &filter {
            if capture.value == CaptureMode::Connections {
                return Err(f.invalid(format!(
                    "needs packets capture: {} has no packet filter",
                    capture.shown()
                )));
            }
            if f.value.trim().is_empty() {
                return Err(f.invalid(
                    "is empty; leave it out to capture every segment to the listen address",
                ));
            }
        }
        let ring_size = size(&l.ring_size()?, bounds::RING_SIZE)?;
        let capture_threads = match l.capture_threads().ok() {
            Some(n) => number(&n, bounds::CAPTURE_THREADS)?,
            None => crate::capture::packets::default_threads(),
        };
        let control = match l.control().ok() {
            Some(c) => {
                if !(c.value.starts_with("redis://") || c.value.starts_with("rediss://")) {
                    return Err(c.invalid("must be a redis:// or rediss:// URL"));
                }
                let tls = (
                    args.tls_ca.clone(),
                    args.tls_cert.clone(),
                    args.tls_key.clone(),
                );
                let target = control_target(&c.value, tls, c.origin.clone());
                // Checked now (URL, TLS files), so a bad one stops the start with exit 64.
                target.client()?;
                Some(target)
            }
            None => None,
        };

        Ok(Config {
            control,
            on_backend_down: l.on_backend_down()?.value,
            buffer_max,
            health,
            state_file,
            state_file_moved_to: None,
            admin_token: admin_token.map(|t| t.value),
            listen,
            capture: capture.value,
            serve: serve.value,
            filter: filter.map(|f| f.value),
            ring_size,
            capture_threads,
            backends,
            retention,
            admin,
            schema: l.schema()?.value,
            prefix,
            agent,
            max_connections,
            idle_timeout: duration(&l.idle_timeout()?, bounds::IDLE_TIMEOUT)?,
            grace: duration(&l.grace()?, bounds::GRACE)?,
            queue_capacity,
            batch_size,
            log_format: l.log_format()?.value,
            config_path: args.config.clone(),
        })
    }
}

/// The backends: the `--backend` flags if any (they replace the file's), else the file's
/// tables; the `--tls-*` flags fill in what a `rediss://` backend does not say itself.
fn backends(l: &Layers, file: &FileConfig) -> Result<Vec<BackendConfig>, ConfigError> {
    let args = l.flags();
    let mut backends: Vec<BackendConfig> = if args.backends.is_empty() {
        file.backend.clone()
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
        let fill = |own: &mut Option<PathBuf>, flag: &Option<PathBuf>| {
            let from_flag = own.is_none() && flag.is_some();
            if from_flag {
                own.clone_from(flag);
            }
            from_flag
        };
        b.tls_from_flags = TlsFromFlags {
            ca: fill(&mut b.tls_ca, &args.tls_ca),
            cert: fill(&mut b.tls_cert, &args.tls_cert),
            key: fill(&mut b.tls_key, &args.tls_key),
        };
    }
    validate_backends(&backends)?;
    Ok(backends)
}

/// A duration setting (`500ms`, `30s`, `5m`) within `lo..=hi`.
pub fn duration(
    s: &Sourced<String>,
    (lo, hi): (Duration, Duration),
) -> Result<Duration, ConfigError> {
    let d = parse_duration(s)?;
    if d < lo || d > hi {
        return Err(s.invalid(format!(
            "out of range: use {} to {}",
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        )));
    }
    Ok(d)
}

/// A duration setting without bounds (the read commands' `--retention`).
pub fn parse_duration(s: &Sourced<String>) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.value.trim())
        .map_err(|e| s.invalid(format!("not a duration ({e}); use e.g. 500ms, 30s, 5m")))
}

/// A size setting (`64MiB`, `1GiB`, `4096`) within `lo..=hi` bytes.
fn size(s: &Sourced<String>, (lo, hi): (usize, usize)) -> Result<usize, ConfigError> {
    let n = parse_bytes(&s.value)
        .ok_or_else(|| s.invalid("not a size; use e.g. 8MiB, 64MiB or 1GiB"))?;
    if n < lo || n > hi {
        return Err(s.invalid(format!("out of range: use {} to {}", iec(lo), iec(hi))));
    }
    Ok(n)
}

/// `n` bytes as the largest whole binary unit: `64MiB`, `1KiB`, `100`.
fn iec(n: usize) -> String {
    for (unit, name) in [(1usize << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{}{name}", n / unit);
        }
    }
    n.to_string()
}

/// A count setting within `lo..=hi`.
fn number<T>(s: &Sourced<T>, (lo, hi): (T, T)) -> Result<T, ConfigError>
where
    T: settings::Value + PartialOrd + Copy + std::fmt::Display,
{
    if s.value < lo || s.value > hi {
        return Err(s.invalid(format!("out of range: use {lo} to {hi}")));
    }
    Ok(s.value)
}

/// A size such as `64MiB`, `1GiB`, `512KiB` or `4096` (bytes). `MB`/`GB` are powers of ten.
pub fn parse_bytes(s: &str) -> Option<usize> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .ok()
        .and_then(|b| usize::try_from(b.as_u64()).ok())
}

/// A part of a Redis key (`prefix`, `agent`): non-empty, no spaces, no `:`.
pub fn key_part(s: Sourced<String>) -> Result<String, ConfigError> {
    if s.value.is_empty() || s.value.chars().any(|c| c.is_whitespace() || c == ':') {
        return Err(s.invalid("must be non-empty, without spaces or ':'"));
    }
    Ok(s.value)
}

/// Where the state file lives by default: `$STATE_DIRECTORY` (what systemd's `StateDirectory=`
/// sets; the first one if it lists several), else `$XDG_STATE_HOME/redtap`, else
/// `~/.local/state/redtap`. Relative values are ignored, as the XDG spec says.
pub fn default_state_dir(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, ConfigError> {
    let absolute = |v: Option<String>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(dir) =
        absolute(env("STATE_DIRECTORY").and_then(|v| v.split(':').next().map(str::to_string)))
    {
        return Ok(dir);
    }
    if let Some(dir) = absolute(env("XDG_STATE_HOME")) {
        return Ok(dir.join("redtap"));
    }
    if let Some(home) = absolute(env("HOME")) {
        return Ok(home.join(".local/state/redtap"));
    }
    Err(ConfigError::Usage(
        "no state directory: none of STATE_DIRECTORY, XDG_STATE_HOME or HOME is set to an \
         absolute path; give --state-file PATH (or --state-file off)"
            .into(),
    ))
}

/// Create the state directory (and its parents) with mode 0700 if it does not exist.
fn create_state_dir(dir: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ConfigError::StateDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// A control Redis URL (`--control`) as a backend-like target named `control`: the `--tls-*`
/// files `tls` apply to a `rediss://` URL, as they do to backends.
pub fn control_target(
    url: &str,
    tls: (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>),
    origin: Origin,
) -> BackendConfig {
    let on = url.starts_with("rediss://");
    let (ca, cert, key) = tls;
    BackendConfig {
        name: "control".into(),
        url: url.to_string(),
        weight: 0,
        tls_from_flags: backend::TlsFromFlags {
            ca: on && ca.is_some(),
            cert: on && cert.is_some(),
            key: on && key.is_some(),
        },
        tls_ca: ca.filter(|_| on),
        tls_cert: cert.filter(|_| on),
        tls_key: key.filter(|_| on),
        origin,
    }
}

/// Read and parse a TOML configuration file. A type error names the key, the file and the
/// line, in plain words with an example.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut file: FileConfig =
        toml::from_str(&text).map_err(|e| error::from_toml(path, &text, &e, example_toml))?;
    file.file = Some(path.to_path_buf());
    for b in &mut file.backend {
        b.origin = Origin::File(path.to_path_buf());
    }
    Ok(file)
}

/// An example TOML value of `key`, for messages about the file.
fn example_toml(key: &str) -> Option<String> {
    if let Some(s) = settings::SPECS.iter().find(|s| s.key == key) {
        return Some(s.example_toml());
    }
    // The keys of a [[backend]] table.
    Some(
        match key {
            "name" => "\"A\"",
            "url" => "\"redis://127.0.0.1:6379/0\"",
            "weight" => "30",
            "tls_ca" => "\"/etc/redtap/ca.pem\"",
            "tls_cert" => "\"/etc/redtap/client.pem\"",
            "tls_key" => "\"/etc/redtap/client.key\"",
            _ => return None,
        }
        .to_string(),
    )
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
    use super::settings::{spec, Fallback, SPECS};
    use super::*;

    fn args(backends: &[&str]) -> RunArgs {
        RunArgs {
            listen: Some("127.0.0.1:9000".into()),
            backends: backends.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// No environment but a home, so results do not depend on who runs the tests.
    fn env(var: &str) -> Option<String> {
        (var == "HOME").then(|| "/home/t".to_string())
    }

    fn resolve(file: FileConfig, args: &RunArgs) -> Result<Config, ConfigError> {
        Config::resolve_with(file, args, &env)
    }

    fn file(toml: &str) -> FileConfig {
        let mut f: FileConfig = toml::from_str(toml).unwrap();
        f.file = Some("/etc/redtap.toml".into());
        for b in &mut f.backend {
            b.origin = Origin::File("/etc/redtap.toml".into());
        }
        f
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
            let e = resolve(FileConfig::default(), &args(&flags)).unwrap_err();
            assert!(e.to_string().contains(needle), "{flags:?}: {e}");
        }
    }

    #[test]
    fn flags_override_file() {
        let file = file(
            r#"
            listen = "127.0.0.1:7000"
            retention = "2s"
            [[backend]]
            name = "A"
            url = "redis://127.0.0.1:1"
            weight = 1
            "#,
        );
        let mut a = args(&[]);
        a.retention = Some("10s".into());
        let c = resolve(file, &a).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.retention, Duration::from_secs(10));
        assert_eq!(c.backends.len(), 1);
        assert_eq!(c.agent, format!("{}-9000", hostname()));
    }

    #[test]
    fn packets_is_the_default_and_sizes_parse() {
        let c = resolve(FileConfig::default(), &args(&["A=redis://x@1"])).unwrap();
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
        let e = resolve(FileConfig::default(), &a).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--ring-size 100: out of range: use 1MiB to 2GiB"
        );
        let mut a = args(&["A=redis://x@1"]);
        a.capture = Some(CaptureMode::Connections);
        a.serve = Some(ServeMode::None);
        let e = resolve(FileConfig::default(), &a).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--serve none: needs packets capture"),
            "{e}"
        );
        a.serve = None;
        a.filter = Some("src net 10.0.0.0/8".into());
        let e = resolve(FileConfig::default(), &a).unwrap_err();
        assert!(
            e.to_string()
                .contains("--capture connections has no packet filter"),
            "{e}"
        );
    }

    #[test]
    fn every_default_is_read_like_typed_input_and_is_valid() {
        let c = resolve(FileConfig::default(), &args(&["A=redis://x@1"])).unwrap();
        for s in SPECS {
            if let Fallback::Value(v) = s.fallback {
                // The default of every key with one is used and valid: set it by hand and the
                // result is the same.
                let f = file(&format!("{} = {}", s.key, s.example_toml()));
                let same = resolve(f, &args(&["A=redis://x@1"])).unwrap();
                assert_eq!(format!("{same:?}"), format!("{c:?}"), "{} = {v}", s.key);
            }
        }
        assert_eq!(c.health, HealthConfig::default(), "health.rs agrees");
        assert_eq!(c.retention, Duration::from_secs(300));
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.admin, Some("127.0.0.1:9900".parse().unwrap()));
        assert_eq!(
            c.state_file.as_deref(),
            Some(Path::new(&format!(
                "/home/t/.local/state/redtap/redtap-state-{}.json",
                c.agent
            )))
        );
    }

    #[test]
    fn an_error_names_what_was_typed_where() {
        let mut a = args(&["A=redis://x@1"]);
        a.retention = Some("5x".into());
        let flag = resolve(FileConfig::default(), &a).unwrap_err();
        assert!(
            flag.to_string()
                .starts_with("--retention 5x: not a duration"),
            "{flag}"
        );
        assert_eq!(
            (flag.key(), flag.origin()),
            (Some("retention"), Some(&Origin::Flag))
        );

        let f = file("max_connections = 0");
        let e = resolve(f, &args(&["A=redis://x@1"])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("max_connections = 0 in /etc/redtap.toml: out of range: use 1 to"),
            "{e}"
        );
        let f = file("retention = \"5x\"");
        let e = resolve(f, &args(&["A=redis://x@1"])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("retention = \"5x\" in /etc/redtap.toml: not a duration"),
            "{e}"
        );

        // The token comes from the environment between flag and file, and is never repeated.
        let f = file("admin_token = \"from-the-file-0123456789\"");
        let short = |v: &str| match v {
            "REDTAP_ADMIN_TOKEN" => Some("short".to_string()),
            _ => env(v),
        };
        let e = Config::resolve_with(f, &args(&["A=redis://x@1"]), &short).unwrap_err();
        assert_eq!(
            e.to_string(),
            "REDTAP_ADMIN_TOKEN: must be at least 16 characters, without spaces"
        );
        let mut a = args(&["A=redis://x@1"]);
        a.admin_token = Some("sh ort".into());
        let e = resolve(FileConfig::default(), &a).unwrap_err();
        assert!(!e.to_string().contains("sh ort"), "{e}");

        let e = resolve(FileConfig::default(), &RunArgs::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "listen is required: give --listen 127.0.0.1:9000, or listen = \"127.0.0.1:9000\" \
             in the config file"
        );
    }

    #[test]
    fn a_url_error_shows_the_typed_url_without_its_password() {
        let f = file("[[backend]]\nname = \"A\"\nurl = \"127.0.0.1:6379\"\nweight = 1");
        let mut a = args(&[]);
        a.backends.clear();
        let e = resolve(f, &a).unwrap_err();
        assert_eq!(
            e.to_string(),
            "backend \"A\" in /etc/redtap.toml: \"127.0.0.1:6379\" is not a Redis URL: write \
             redis://127.0.0.1:6379"
        );
        let e = resolve(
            FileConfig::default(),
            &args(&["A=redis://u:secret@h:port@1"]),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--backend \"A\": \"redis://u:***@h:port\" is not a Redis URL: invalid port number"
        );
    }

    #[test]
    fn the_state_directory_follows_systemd_then_xdg_then_home() {
        let dir = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            default_state_dir(&move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
                .map_err(|e| e.to_string())
        };
        let all = [
            ("STATE_DIRECTORY", "/var/lib/redtap:/var/lib/other"),
            ("XDG_STATE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(dir(&all), Ok(PathBuf::from("/var/lib/redtap")));
        assert_eq!(dir(&all[1..]), Ok(PathBuf::from("/x/redtap")));
        assert_eq!(dir(&all[2..]), Ok(PathBuf::from("/h/.local/state/redtap")));
        // Relative values are ignored (the XDG spec), and none at all is a clear error.
        assert_eq!(
            dir(&[("XDG_STATE_HOME", "rel"), ("HOME", "/h")]),
            Ok(PathBuf::from("/h/.local/state/redtap"))
        );
        assert!(dir(&[]).unwrap_err().contains("--state-file"));
    }

    #[test]
    fn every_flag_has_one_spec_and_every_spec_is_a_file_key_with_its_default_in_help() {
        use clap::Args as _;
        let cmd = Settings::augment_args(clap::Command::new("run"));
        let flag_only = ["config", "backends", "tls_ca", "tls_cert", "tls_key"];
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if flag_only.contains(&id) {
                continue;
            }
            let s = SPECS
                .iter()
                .find(|s| s.key == id)
                .unwrap_or_else(|| panic!("--{id} has no spec"));
            assert_eq!(a.get_long(), Some(s.flag().as_str()));
            let help = a.get_help().unwrap().to_string();
            if let Some(d) = s.help_default() {
                assert!(
                    help.ends_with(&d) || help.contains(&format!("{d} ")),
                    "{help}"
                );
            }
        }
        for s in SPECS {
            let text = format!("{} = {}", s.key, s.example_toml());
            let parsed: Result<FileConfig, _> = toml::from_str(&text);
            assert!(parsed.is_ok(), "{text}: {parsed:?}");
        }
        assert!(spec::admin_token.secret && spec::admin_token.env.is_some());
    }
}
