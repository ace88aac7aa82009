//! [`ConfigError`]: what is wrong with a setting, named the way the operator wrote it.
//!
//! Owns: where a value came from ([`Origin`]), the one-line messages, and the translation of
//! TOML parse errors into plain words. Never: decides what is valid (the settings do).

use std::fmt;
use std::path::PathBuf;

/// Where a setting's value came from: the message names it the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Origin {
    /// A flag of `redtap run` (`--retention 5x`).
    Flag,
    /// An environment variable (`REDTAP_ADMIN_TOKEN`).
    Env(&'static str),
    /// A key of this TOML file (`retention = "5x" in /etc/redtap.toml`).
    File(PathBuf),
    /// Nobody gave it: the built-in default, or one derived from other settings.
    #[default]
    Default,
}

/// A setting's value as the operator wrote it, and where: the start of every message about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    /// The TOML key (the flag is `--` and the key with `-` for `_`).
    pub key: &'static str,
    /// Where the value came from.
    pub origin: Origin,
    /// The value as written: raw for a flag, a TOML literal for a file key; `None` for a
    /// secret, which is never repeated.
    pub typed: Option<String>,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let typed = self.typed.as_deref();
        match (&self.origin, typed) {
            (Origin::Flag, Some(t)) => write!(f, "--{} {}", flag(self.key), t),
            (Origin::Flag, None) => write!(f, "--{}", flag(self.key)),
            (Origin::Env(var), Some(t)) => write!(f, "{var}={t}"),
            (Origin::Env(var), None) => write!(f, "{var}"),
            (Origin::File(p), Some(t)) => write!(f, "{} = {t} in {}", self.key, p.display()),
            (Origin::File(p), None) => write!(f, "{} in {}", self.key, p.display()),
            (Origin::Default, Some(t)) => write!(f, "{} (default {t})", self.key),
            (Origin::Default, None) => write!(f, "{} (default)", self.key),
        }
    }
}

/// The flag of a TOML key: `max_connections` → `max-connections`.
pub fn flag(key: &str) -> String {
    key.replace('_', "-")
}

/// A configuration problem, phrased for the operator: [`Display`](fmt::Display) is the one
/// line `redtap` prints before exiting 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting's value is refused.
    #[error("{at}: {problem}")]
    Invalid {
        /// Which setting, from where, as typed.
        at: At,
        /// What is wrong and what to write instead.
        problem: String,
    },
    /// A required setting was given nowhere.
    #[error(
        "{key} is required: give --{} {example}, or {key} = {example_toml} in the config file",
        flag(key)
    )]
    Missing {
        /// The TOML key.
        key: &'static str,
        /// An example value as a flag takes it.
        example: &'static str,
        /// The same as a TOML literal.
        example_toml: String,
    },
    /// The config file cannot be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not TOML, has a key of the wrong type, or a key redtap does not know.
    #[error("{}", file_message(path, *line, key.as_deref(), typed.as_deref(), problem))]
    File {
        /// The file.
        path: PathBuf,
        /// Where in it, counting from 1, when known.
        line: Option<usize>,
        /// The key the problem is at, when known.
        key: Option<String>,
        /// The value as written there, when known.
        typed: Option<String>,
        /// What is wrong, in plain words.
        problem: String,
    },
    /// One backend is refused (its URL, weight, name or TLS files).
    #[error("{}: {problem}", backend_place(name, origin))]
    Backend {
        /// Its name as given.
        name: String,
        /// `--backend` or the file's `[[backend]]`.
        origin: Origin,
        /// What is wrong.
        problem: String,
    },
    /// The list of backends as a whole is refused (none, all weights 0, a name twice, the same
    /// server twice).
    #[error("{problem}{}", in_file(origin))]
    Backends {
        /// `--backend` flags or the file's `[[backend]]` tables.
        origin: Origin,
        /// What is wrong.
        problem: String,
    },
    /// The default state directory cannot be made.
    #[error(
        "cannot create the state directory {}: {source}; set STATE_DIRECTORY or XDG_STATE_HOME, \
         or give --state-file PATH (or --state-file off)", path.display()
    )]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A problem that is not about one setting of `redtap run`: a read command's flag, or a
    /// start-up check that refused the backends (same server twice, lease held).
    #[error("{0}")]
    Usage(String),
}

impl ConfigError {
    /// The TOML key of the setting at fault, if the problem is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { at, .. } => Some(at.key),
            ConfigError::Missing { key, .. } => Some(key),
            ConfigError::File { key, .. } => key.as_deref(),
            _ => None,
        }
    }

    /// Where the faulty value came from, if known.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            ConfigError::Invalid { at, .. } => Some(&at.origin),
            ConfigError::Backend { origin, .. } | ConfigError::Backends { origin, .. } => {
                Some(origin)
            }
            _ => None,
        }
    }
}

fn backend_place(name: &str, origin: &Origin) -> String {
    match origin {
        Origin::Flag => format!("--backend {name:?}"),
        Origin::File(p) => format!("backend {name:?} in {}", p.display()),
        _ => format!("backend {name:?}"),
    }
}

fn in_file(origin: &Origin) -> String {
    match origin {
        Origin::File(p) => format!(" (the [[backend]] tables of {})", p.display()),
        _ => String::new(),
    }
}

fn file_message(
    path: &std::path::Path,
    line: Option<usize>,
    key: Option<&str>,
    typed: Option<&str>,
    problem: &str,
) -> String {
    let line = line.map(|l| format!(" (line {l})")).unwrap_or_default();
    match (key, typed) {
        (Some(k), Some(t)) => format!("{k} = {t} in {}{line}: {problem}", path.display()),
        (Some(k), None) => format!("{k} in {}{line}: {problem}", path.display()),
        _ => format!("config file {}{line}: {problem}", path.display()),
    }
}

/// A TOML error of `path` (whose text is `text`) as a [`ConfigError::File`]: the key and value
/// it is at, and serde's "expected u32" in plain words with an example from `example`
/// (a key → an example TOML value).
pub fn from_toml(
    path: &std::path::Path,
    text: &str,
    e: &toml::de::Error,
    example: impl Fn(&str) -> Option<String>,
) -> ConfigError {
    let msg = e.message().trim();
    let span = e.span();
    let line = span
        .as_ref()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    // The line the error is on, as `key = value`: the key and value as typed.
    let src_line = span.as_ref().and_then(|s| {
        let start = text[..s.start.min(text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        text[start..].lines().next()
    });
    let (mut key, mut typed) = (None, None);
    if let Some((k, v)) = src_line.and_then(|l| l.split_once('=')) {
        let k = k.trim();
        if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            key = Some(k.to_string());
            typed = Some(value_text(v)).filter(|v| !v.is_empty() && v.len() <= 200);
        }
    }
    let example_for = |k: &str| {
        example(k)
            .map(|ex| format!(", e.g. {k} = {ex}"))
            .unwrap_or_default()
    };
    let problem = if let Some(field) = between(msg, "unknown field `", "`") {
        key = Some(field.to_string());
        let known = msg
            .split_once("expected ")
            .map(|(_, r)| r.trim_start_matches("one of ").replace('`', ""))
            .map(|r| format!("; the keys here are {r}"))
            .unwrap_or_default();
        format!("not a setting of redtap run{known}")
    } else if let Some(field) = between(msg, "missing field `", "`") {
        format!("a [[backend]] table needs {field}{}", example_for(field))
    } else if msg.starts_with("invalid value: integer") {
        match &key {
            Some(k) => format!(
                "out of range (see redtap run --help for the range){}",
                example_for(k)
            ),
            None => "a number out of range".to_string(),
        }
    } else if let Some(expected) = msg.split_once(", expected ").map(|(_, r)| r) {
        let plain = plain_type(expected);
        match &key {
            Some(k) => format!("expected {plain}{}", example_for(k)),
            None => format!("expected {plain}"),
        }
    } else if let Some(expected) = msg.strip_prefix("expected ") {
        format!("expected {}", plain_type(expected))
    } else {
        // One line, whatever the parser said.
        msg.split('\n')
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ")
    };
    ConfigError::File {
        path: path.to_path_buf(),
        line,
        key,
        typed,
        problem,
    }
}

/// The value part of a `key = value` line as typed: a quoted string up to its closing quote,
/// anything else up to a comment.
fn value_text(v: &str) -> String {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(rest) = v.strip_prefix(q) {
            if let Some(end) = rest.find(q) {
                return v[..end + 2].to_string();
            }
        }
    }
    v.split('#').next().unwrap_or(v).trim().to_string()
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// serde's name of a type in words an operator uses.
fn plain_type(expected: &str) -> String {
    let e = expected.trim();
    match e {
        "usize" | "u64" | "u32" | "u16" | "u8" | "i64" | "i32" | "integer" => {
            "a whole number".to_string()
        }
        "a string" => "text in quotes".to_string(),
        "a boolean" | "bool" => "true or false".to_string(),
        "a sequence" => "a list: write [[backend]], one per backend".to_string(),
        _ if e.contains('`') => format!("one of {}", e.replace('`', "\"")),
        _ => e.to_string(),
    }
}
