//! The settings of `redtap run`, each declared once: the flag, the TOML key, the doc that
//! `--help` shows, and the default all come from one entry of `settings!`.
//!
//! Owns: the [`Settings`] struct (the flags *and* the file: every field an `Option`, so a flag
//! overrides the file only when given), the table of defaults ([`SPECS`]), and the merge
//! ([`Layers`]): flag, then environment, then file, then default, each value remembering where
//! it came from so that an error names what the operator typed. Never: validates values (the
//! parent module does, once, for all of them).
//!
//! A default is text, read by the same parser as a typed value: there is no second literal to
//! drift from the help, and a test checks that every default passes validation.

// The doc comments in `settings!` are the CLI help (clap reads them), written for a terminal:
// `[[backend]]` and `[::1]` there are TOML and addresses, not rustdoc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use serde::Deserialize;

use super::error::{flag, At, ConfigError, Origin};
use super::{BackendConfig, CaptureMode, LogFormat, Schema, ServeMode};
use crate::balance::OnDown;

/// What a setting is when neither a flag, the environment nor the file gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// This text, read exactly as if the operator had typed it.
    Value(&'static str),
    /// Worked out at start-up from other settings or the environment.
    Derived {
        /// How help describes it.
        shown: &'static str,
        /// A value one could write.
        example: &'static str,
    },
    /// Must be given.
    Required {
        /// A value one could write.
        example: &'static str,
    },
    /// Not set unless given.
    Unset {
        /// A value one could write.
        example: &'static str,
    },
}

/// One setting with a TOML key of its own.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// The TOML key, which is also the field's name; the flag is `--` + the key with `-`.
    pub key: &'static str,
    /// What applies when nobody gives it.
    pub fallback: Fallback,
    /// Whether a TOML value of this setting is a quoted string.
    pub quoted: bool,
    /// The environment variable read between the flag and the file, if any.
    pub env: Option<&'static str>,
    /// Never repeated in a message (a token).
    pub secret: bool,
}

impl Spec {
    /// The flag, without the dashes.
    pub fn flag(&self) -> String {
        flag(self.key)
    }

    /// A value to show in examples, as a flag takes it.
    pub fn example(&self) -> &'static str {
        match self.fallback {
            Fallback::Value(v) => v,
            Fallback::Derived { example, .. }
            | Fallback::Required { example }
            | Fallback::Unset { example } => example,
        }
    }

    /// The default as typed, when it is a fixed value.
    pub fn default_text(&self) -> Option<&'static str> {
        match self.fallback {
            Fallback::Value(v) => Some(v),
            _ => None,
        }
    }

    /// [`example`](Self::example) as a TOML value.
    pub fn example_toml(&self) -> String {
        toml_text(self.example(), self.quoted)
    }

    /// The `[default: …]` that `--help` appends, if there is one to show.
    pub fn help_default(&self) -> Option<String> {
        let shown = match self.fallback {
            Fallback::Value(v) => v,
            Fallback::Derived { shown, .. } => shown,
            Fallback::Required { .. } => return Some("[required]".into()),
            Fallback::Unset { .. } => return None,
        };
        Some(format!("[default: {shown}]"))
    }

    /// A value of this setting for a message: `None` for a secret.
    fn typed(&self, text: &str, origin: &Origin) -> Option<String> {
        if self.secret {
            return None;
        }
        Some(match origin {
            Origin::File(_) | Origin::Default => toml_text(text, self.quoted),
            Origin::Flag | Origin::Env(_) => shell_text(text),
        })
    }
}

/// `text` as a TOML value: quoted and escaped when the setting is a string.
fn toml_text(text: &str, quoted: bool) -> String {
    if quoted {
        toml::Value::String(text.to_string()).to_string()
    } else {
        text.to_string()
    }
}

/// `text` as it would be typed after a flag: bare, or quoted when it would not survive a shell.
fn shell_text(text: &str) -> String {
    if text.is_empty()
        || text
            .chars()
            .any(|c| c.is_whitespace() || "\"'\\$`;|&<>(){}*?#".contains(c))
    {
        format!("{text:?}")
    } else {
        text.to_string()
    }
}

/// A type a setting can have: read from a default's text, and written back for messages.
pub trait Value: Clone {
    /// Whether TOML writes it in quotes.
    const QUOTED: bool;
    /// Read from text as the operator types it; `None` when it is not one.
    fn parse_text(s: &str) -> Option<Self>;
    /// The text the operator typed (or would have).
    fn text(&self) -> String;
}

impl Value for String {
    const QUOTED: bool = true;
    fn parse_text(s: &str) -> Option<Self> {
        Some(s.to_string())
    }
    fn text(&self) -> String {
        self.clone()
    }
}

macro_rules! number_value {
    ($($t:ty),*) => {$(
        impl Value for $t {
            const QUOTED: bool = false;
            fn parse_text(s: &str) -> Option<Self> {
                s.trim().parse().ok()
            }
            fn text(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
number_value!(usize, u32);

macro_rules! enum_value {
    ($($t:ty),*) => {$(
        impl Value for $t {
            const QUOTED: bool = true;
            fn parse_text(s: &str) -> Option<Self> {
                <$t as clap::ValueEnum>::from_str(s, false).ok()
            }
            fn text(&self) -> String {
                clap::ValueEnum::to_possible_value(self)
                    .map_or_else(String::new, |p| p.get_name().to_string())
            }
        }
    )*};
}
enum_value!(CaptureMode, ServeMode, Schema, LogFormat, OnDown);

/// A setting's value and where it came from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub origin: Origin,
    /// Which setting.
    pub spec: &'static Spec,
}

impl<T: Value> Sourced<T> {
    /// The setting, its origin and its value as typed: how a message starts.
    pub fn at(&self) -> At {
        At {
            key: self.spec.key,
            origin: self.origin.clone(),
            typed: self.spec.typed(&self.value.text(), &self.origin),
        }
    }

    /// This value refused because of `problem`.
    pub fn invalid(&self, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            at: self.at(),
            problem: problem.into(),
        }
    }

    /// How the operator set it, for a message about another setting: `--capture connections`,
    /// `capture = "connections" in FILE`, `capture (default packets)`.
    pub fn shown(&self) -> String {
        self.at().to_string()
    }

    /// Whether the operator gave it (flag, environment or file) rather than the default.
    pub fn given(&self) -> bool {
        self.origin != Origin::Default
    }
}

/// A required setting given nowhere.
#[derive(Debug, Clone, Copy)]
pub struct Missing(pub &'static Spec);

impl From<Missing> for ConfigError {
    fn from(Missing(spec): Missing) -> Self {
        ConfigError::Missing {
            key: spec.key,
            example: spec.example(),
            example_toml: spec.example_toml(),
        }
    }
}

/// The layers a value is looked up in, first hit wins: flags, the environment, the file, the
/// default.
pub struct Layers<'a> {
    flags: &'a Settings,
    file: &'a Settings,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Layers<'a> {
    /// The layers of one start: `flags` over `env` over `file` (whose `file` field names it).
    pub fn new(
        flags: &'a Settings,
        file: &'a Settings,
        env: &'a dyn Fn(&str) -> Option<String>,
    ) -> Self {
        Layers { flags, file, env }
    }

    /// The one merge: `field` of the first layer that has it, remembering which. A default
    /// that does not parse is a bug that a unit test catches, so it counts as unset.
    fn get<T: Value>(
        &self,
        spec: &'static Spec,
        field: impl Fn(&Settings) -> &Option<T>,
    ) -> Result<Sourced<T>, Missing> {
        let sourced = |value: T, origin| Sourced {
            value,
            origin,
            spec,
        };
        if let Some(v) = field(self.flags) {
            return Ok(sourced(v.clone(), Origin::Flag));
        }
        if let Some(var) = spec.env {
            if let Some(v) = (self.env)(var).and_then(|s| T::parse_text(&s)) {
                return Ok(sourced(v, Origin::Env(var)));
            }
        }
        if let Some(v) = field(self.file) {
            let path = self
                .file
                .file
                .clone()
                .unwrap_or_else(|| PathBuf::from("the config file"));
            return Ok(sourced(v.clone(), Origin::File(path)));
        }
        match spec.fallback {
            Fallback::Value(text) => T::parse_text(text)
                .map(|v| sourced(v, Origin::Default))
                .ok_or(Missing(spec)),
            _ => Err(Missing(spec)),
        }
    }

    /// The file these layers read, if any.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.file.as_deref()
    }

    /// The flags layer (its `--backend` and `--tls-*` flags have no key of their own).
    pub fn flags(&self) -> &Settings {
        self.flags
    }
}

/// Declares every setting once: a field of [`Settings`] (doc = help text, clap and serde
/// attributes as written), its [`Spec`] in [`SPECS`] and `spec::NAME`, and a `Layers` method of
/// the same name that merges it. The `before` and `after` fields (flag-only, or no key of their
/// own) are copied into `Settings` as they are, in help order.
macro_rules! settings {
    (
        $(#[$smeta:meta])*
        pub struct Settings {
            before {
                $( $(#[$bmeta:meta])* $bfield:ident : $bty:ty, )*
            }
            $(
                $(#[$fmeta:meta])*
                $field:ident : $ty:ty = $fallback:expr $(; env = $env:literal)? $(; secret = $secret:literal)?,
            )*
            @after {
                $( $(#[$xmeta:meta])* $xfield:ident : $xty:ty, )*
            }
        }
    ) => {
        $(#[$smeta])*
        pub struct Settings {
            $( $(#[$bmeta])* pub $bfield: $bty, )*
            $( $(#[$fmeta])* pub $field: Option<$ty>, )*
            $( $(#[$xmeta])* pub $xfield: $xty, )*
        }

        /// Each setting's [`Spec`], by its key.
        #[allow(non_upper_case_globals)]
        pub mod spec {
            use super::*;
            $(
                #[doc = concat!("`", stringify!($field), "`")]
                pub const $field: Spec = Spec {
                    key: stringify!($field),
                    fallback: $fallback,
                    quoted: <$ty as Value>::QUOTED,
                    env: settings!(@env $($env)?),
                    secret: settings!(@secret $($secret)?),
                };
            )*
        }

        /// Every setting with a TOML key of its own, in the order of `--help`.
        pub const SPECS: &[Spec] = &[ $( spec::$field ),* ];

        impl Layers<'_> {
            $(
                #[doc = concat!("`", stringify!($field), "`, merged.")]
                pub fn $field(&self) -> Result<Sourced<$ty>, Missing> {
                    const SPEC: &Spec = &spec::$field;
                    self.get(SPEC, |s| &s.$field)
                }
            )*
        }
    };
    (@env) => { None };
    (@env $env:literal) => { Some($env) };
    (@secret) => { false };
    (@secret $secret:literal) => { $secret };
}

/// `--help` shows each setting's default, from its [`Spec`]: applied to every argument by clap
/// (`mut_args`), so the help can never disagree with the default in force.
fn with_default(arg: clap::Arg) -> clap::Arg {
    let Some(s) = SPECS.iter().find(|s| s.key == arg.get_id().as_str()) else {
        return arg;
    };
    let mut extra = s.help_default().unwrap_or_default();
    if let Some(var) = s.env {
        extra = format!("{extra} [env: {var}]").trim().to_string();
    }
    if extra.is_empty() {
        return arg;
    }
    let help = arg.get_help().map_or_else(String::new, |h| format!("{h} "));
    arg.help(format!("{help}{extra}"))
}

settings! {
    /// The settings of `redtap run`: its flags, and the keys of its TOML file (`--config`). The
    /// same struct holds each layer; [`Layers`] merges them, flags first.
    #[derive(Debug, Default, Clone, clap::Args, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[command(mut_args = with_default)]
    pub struct Settings {
        before {
            /// TOML configuration file; flags override its settings.
            #[arg(long, short = 'c')]
            #[serde(skip)]
            config: Option<PathBuf>,
            /// A Redis backend as NAME=URL@WEIGHT, e.g. A=redis://127.0.0.1:6379@30. Repeat for
            /// each; replaces the file's [[backend]] tables.
            #[arg(long = "backend", value_name = "NAME=URL@WEIGHT")]
            #[serde(skip)]
            backends: Vec<String>,
        }
        /// Address and port to capture on, e.g. 127.0.0.1:9000 or [::1]:9000.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String = Fallback::Required { example: "127.0.0.1:9000" },
        /// How long each record stays readable, from its capture time (1s to 30d).
        #[arg(long, value_name = "DURATION")]
        retention: String = Fallback::Value("5m"),
        /// Capture mode (connections needs no privileges).
        #[arg(long, value_enum)]
        capture: CaptureMode = Fallback::Value("packets"),
        /// Accept and discard on the listen address (sink) or bind nothing (none).
        #[arg(long, value_enum)]
        serve: ServeMode = Fallback::Value("sink"),
        /// Packets mode: extra filter in tcpdump syntax, ANDed with "TCP to the listen address".
        #[arg(long, value_name = "EXPR")]
        filter: String = Fallback::Unset { example: "src net 10.0.0.0/8" },
        /// Packets mode: size of the kernel capture ring (1MiB to 2GiB).
        #[arg(long, value_name = "BYTES")]
        ring_size: String = Fallback::Value("64MiB"),
        /// Packets mode: capture threads per device, each with its own ring of --ring-size,
        /// sharing the flows (PACKET_FANOUT) (1 to 64).
        #[arg(long, value_name = "N")]
        capture_threads: usize = Fallback::Derived { shown: "1 below 4 cores, else cores/2 (at most 8)", example: "2" },
        /// Admin API listen address, or `off`.
        #[arg(long, value_name = "ADDR:PORT")]
        admin: String = Fallback::Value("127.0.0.1:9900"),
        /// Redis layout.
        #[arg(long, value_enum)]
        schema: Schema = Fallback::Value("stream"),
        /// Prefix of every Redis key.
        #[arg(long)]
        prefix: String = Fallback::Value("redtap"),
        /// Agent name in Redis keys.
        #[arg(long)]
        agent: String = Fallback::Derived { shown: "<hostname>-<listen port>", example: "web1-9000" },
        /// Most connections served at once (1 to 1000000).
        #[arg(long, value_name = "N")]
        max_connections: usize = Fallback::Value("1024"),
        /// Close connections idle this long (100ms to 1d).
        #[arg(long, value_name = "DURATION")]
        idle_timeout: String = Fallback::Value("30s"),
        /// Time allowed at shutdown to write out queued records (0s to 1h).
        #[arg(long, value_name = "DURATION")]
        grace: String = Fallback::Value("5s"),
        /// Capacity of the capture queue in records (1 to 16777216).
        #[arg(long, value_name = "N")]
        queue_capacity: usize = Fallback::Value("65536"),
        /// Most records per pipelined Redis batch (1 to 100000).
        #[arg(long, value_name = "N")]
        batch_size: usize = Fallback::Value("1024"),
        /// Log format.
        #[arg(long, value_enum)]
        log_format: LogFormat = Fallback::Value("text"),
        /// Where a down backend's share goes.
        #[arg(long, value_enum)]
        on_backend_down: OnDown = Fallback::Value("redistribute"),
        /// Memory for records waiting on down backends (1KiB to 64GiB).
        #[arg(long, value_name = "BYTES")]
        buffer_max: String = Fallback::Value("256MiB"),
        /// Consecutive failures that mark a backend down (1 to 1000).
        #[arg(long, value_name = "N")]
        down_after: u32 = Fallback::Value("2"),
        /// Consecutive successful probes that mark it up again (1 to 1000).
        #[arg(long, value_name = "N")]
        up_after: u32 = Fallback::Value("2"),
        /// How long a Redis command may take before it counts as failed (10ms to 60s).
        #[arg(long, value_name = "DURATION")]
        health_timeout: String = Fallback::Value("750ms"),
        /// File keeping weights set through the API across restarts, or `off`.
        #[arg(long, value_name = "PATH|off")]
        state_file: String = Fallback::Derived {
            shown: "redtap-state-<agent>.json in $STATE_DIRECTORY, else $XDG_STATE_HOME/redtap, \
                    else ~/.local/state/redtap",
            example: "/var/lib/redtap/state.json",
        },
        /// Bearer token the admin API requires (required when it listens beyond loopback).
        #[arg(long, value_name = "TOKEN")]
        admin_token: String = Fallback::Unset { example: "a-secret-of-16-or-more-characters" };
            env = "REDTAP_ADMIN_TOKEN"; secret = true,
        /// Control Redis holding the fleet's weights (redis:// or rediss:// URL, as for a
        /// backend; --tls-* apply to it): every agent started with it follows one record.
        #[arg(long, value_name = "URL")]
        control: String = Fallback::Unset { example: "redis://10.0.0.5:6379" }; secret = true,
        @after {
            /// CA certificate (PEM) for rediss:// backends that have none of their own.
            #[arg(long)]
            #[serde(skip)]
            tls_ca: Option<PathBuf>,
            /// Client certificate (PEM) for rediss:// backends that have none of their own.
            #[arg(long)]
            #[serde(skip)]
            tls_cert: Option<PathBuf>,
            /// Client private key (PEM) that goes with --tls-cert.
            #[arg(long)]
            #[serde(skip)]
            tls_key: Option<PathBuf>,
            /// The file's `[[backend]]` tables.
            #[arg(skip)]
            #[serde(default, rename = "backend")]
            backend: Vec<BackendConfig>,
            /// The file these settings were read from ([`read_file`](super::read_file) sets it);
            /// messages name it.
            #[arg(skip)]
            #[serde(skip)]
            file: Option<PathBuf>,
        }
    }
}
