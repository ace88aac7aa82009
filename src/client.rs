//! `redtap weights`: the command-line client of the admin API, and with `--control` of the
//! fleet's weights in a control Redis ([`fleet`]).
//!
//! Owns how weights are asked for, shown and changed from a terminal; never decides a weight
//! itself (the daemon's `WeightStore` and the control scripts check every change).

use std::collections::BTreeMap;

use anyhow::{bail, Context as _};

use crate::admin::BackendView;
use crate::config::parse_weight;

/// Fetch `GET /v1/backends` from the agent at `admin`.
pub async fn backends(admin: &str, token: Option<&str>) -> anyhow::Result<Vec<BackendView>> {
    let url = format!("{}/v1/backends", admin_url(admin));
    let resp = authorized(reqwest::Client::new().get(&url), token)
        .send()
        .await
        .with_context(|| format!("cannot reach the redtap admin API at {admin}"))?;
    answer(resp).await
}

/// The admin API's base URL from an address as `run --admin` takes it (`127.0.0.1:9900`,
/// `[::1]:9900`) or from a URL (`http://10.0.0.7:9900`).
pub fn admin_url(addr: &str) -> String {
    let addr = addr.trim().trim_end_matches('/');
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Parse `NAME=WEIGHT` arguments. A name given twice is refused: which one was meant?
pub fn parse_pairs(pairs: &[String]) -> anyhow::Result<BTreeMap<String, u32>> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let Some((name, w)) = p.split_once('=') else {
            bail!("{p:?}: expected NAME=WEIGHT, e.g. A=50");
        };
        let w = parse_weight(w).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        if let Some(first) = out.insert(name.to_string(), w) {
            bail!("{name} is given twice ({name}={first} and {name}={w}): give each backend once");
        }
    }
    if out.is_empty() {
        bail!("give at least one NAME=WEIGHT, e.g. redtap weights set A=50 B=50");
    }
    Ok(out)
}

/// `PUT /v1/weights` on the agent at `admin`.
pub async fn set(
    admin: &str,
    token: Option<&str>,
    weights: &BTreeMap<String, u32>,
) -> anyhow::Result<Vec<BackendView>> {
    let url = format!("{}/v1/weights", admin_url(admin));
    let resp = authorized(reqwest::Client::new().put(&url), token)
        .json(weights)
        .send()
        .await
        .with_context(|| format!("cannot reach the redtap admin API at {admin}"))?;
    answer(resp).await
}

/// The warning to print when the weights in force are not in the agent's state file (the
/// change is in force, so the command still succeeds; a restart would lose it).
pub fn unsaved_warning(backends: &[BackendView]) -> Option<String> {
    let why = backends.iter().find_map(|b| b.unsaved.as_deref())?;
    Some(format!("warning: weights in force, but {why}"))
}

fn authorized(req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

async fn answer(resp: reqwest::Response) -> anyhow::Result<Vec<BackendView>> {
    let status = resp.status();
    let text = resp
        .text()
        .await
        .context("reading the admin API's answer")?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(text);
        bail!("refused ({status}): {msg}");
    }
    serde_json::from_str(&text).context("the admin API's answer is not the expected JSON")
}

/// A table of backends for a terminal. ACTUAL is the share of every record since start, SINCE
/// the share since the last weight change: `-` until a record has been routed since it (a row
/// of `0.0%` would read as a failure), `-` too for ACTUAL before the first record.
pub fn table(backends: &[BackendView]) -> String {
    let share = |x: f64, any: bool| {
        if any {
            format!("{:.1}%", x * 100.0)
        } else {
            "-".to_string()
        }
    };
    let routed = backends.iter().any(|b| b.records_routed > 0);
    let routed_since = backends.iter().any(|b| b.records_routed_since_change > 0);
    let mut out = format!(
        "{:<10} {:>4} {:>6} {:>7} {:>8} {:>8} {:>12}  {}\n",
        "BACKEND", "UP", "WEIGHT", "TARGET", "ACTUAL", "SINCE", "WRITTEN", "URL"
    );
    for b in backends {
        out += &format!(
            "{:<10} {:>4} {:>6} {:>6.1}% {:>8} {:>8} {:>12}  {}\n",
            b.name,
            if b.up { "up" } else { "DOWN" },
            b.weight,
            b.target_share * 100.0,
            share(b.actual_share, routed),
            share(b.actual_share_since_change, routed_since),
            b.records_written,
            match &b.down_cause {
                Some(c) => format!("{}  ({c})", b.url),
                None => b.url.clone(),
            }
        );
    }
    out += "(ACTUAL: share of every record since start; SINCE: since the last weight change)\n";
    out
}

/// `redtap weights --control URL`: the fleet's weights in a control Redis instead of one
/// agent's admin API.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ControlArgs {
    /// Control Redis holding the fleet's weights (as for `run --control`; default: the config
    /// file's `control`). With it, `weights` lists every live agent, `weights set` changes the
    /// fleet's record (no admin API needed), `weights history` prints every change.
    #[arg(long, global = true, env = "REDTAP_CONTROL", value_name = "URL")]
    pub control: Option<String>,
    /// Key prefix the agents use (default: the config file's `prefix`, else `redtap`).
    #[arg(long, global = true)]
    pub prefix: Option<String>,
    /// CA certificate (PEM) for a rediss:// control Redis.
    #[arg(long, global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a rediss:// control Redis that checks clients.
    #[arg(long, global = true)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Client private key (PEM) that goes with --tls-cert.
    #[arg(long, global = true)]
    pub tls_key: Option<std::path::PathBuf>,
}

/// What to do with the fleet's weights.
#[derive(Debug)]
pub enum FleetAction {
    /// List every live agent against the fleet's version.
    List,
    /// Change the fleet's weights.
    Set(BTreeMap<String, u32>),
    /// The last `n` changes.
    History(usize),
}

/// Run a fleet command against the control Redis `url` (keys under `prefix`); the text to print.
pub async fn fleet(
    args: &ControlArgs,
    url: &str,
    prefix: &str,
    action: FleetAction,
    json: bool,
) -> anyhow::Result<String> {
    use crate::control;
    let target = crate::config::control_target(
        url,
        (
            args.tls_ca.clone(),
            args.tls_cert.clone(),
            args.tls_key.clone(),
        ),
        crate::config::Origin::Flag,
    );
    let mut conn = control::task::connect(&target).await?;
    let keys = control::Keys::new(prefix);
    match action {
        FleetAction::List => {
            let (fleet, agents) = control::task::list(&mut conn, &keys).await?;
            if json {
                return Ok(pretty(
                    &serde_json::json!({ "fleet": fleet, "agents": agents }),
                ));
            }
            Ok(agents_table(fleet.as_ref(), &agents))
        }
        FleetAction::Set(changes) => {
            let origin = format!("cli@{}", gethostname::gethostname().to_string_lossy());
            let fleet = control::set(
                &mut conn,
                &keys,
                &changes,
                &BTreeMap::new(),
                &origin,
                |_| Ok(()),
            )
            .await?;
            if json {
                return Ok(pretty(&fleet));
            }
            Ok(format!(
                "fleet weights version {}: {}\n(every agent applies it within a second: \
                 `redtap weights --control URL` shows who has)\n",
                fleet.version,
                pairs_text(&fleet.weights)
            ))
        }
        FleetAction::History(n) => {
            let entries = control::history(&mut conn, &keys, n).await?;
            if json {
                return Ok(pretty(&entries));
            }
            let mut out = format!(
                "{:<24} {:>7}  {:<20} {:<24} {}\n",
                "TIME (UTC)", "VERSION", "ORIGIN", "OLD", "NEW"
            );
            for e in &entries {
                let at = jiff::Timestamp::from_millisecond(e.at_ms as i64)
                    .map(|t| t.strftime("%Y-%m-%d %H:%M:%S%.3f").to_string())
                    .unwrap_or_else(|_| e.at_ms.to_string());
                out += &format!(
                    "{:<24} {:>7}  {:<20} {:<24} {}\n",
                    at,
                    e.version,
                    e.origin,
                    pairs_text(&e.old),
                    pairs_text(&e.new)
                );
            }
            Ok(out)
        }
    }
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("serializable") + "\n"
}

/// `A=50 B=50`, or `-` for none.
fn pairs_text(w: &BTreeMap<String, u32>) -> String {
    if w.is_empty() {
        return "-".into();
    }
    w.iter()
        .map(|(n, w)| format!("{n}={w}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every live agent against the fleet's version: LAGGING when it serves an older one, STALE
/// when it cannot read the control Redis, REFUSED when the newest version is an error for it.
pub fn agents_table(
    fleet: Option<&crate::control::FleetWeights>,
    agents: &[crate::control::Heartbeat],
) -> String {
    let mut out = match fleet {
        Some(f) => format!(
            "fleet weights version {}: {}\n",
            f.version,
            pairs_text(&f.weights)
        ),
        None => "no fleet weights yet (each agent uses its own)\n".to_string(),
    };
    out += &format!(
        "{:<20} {:>7} {:<8} {:>9}  {:<28} {}\n",
        "AGENT", "VERSION", "STATE", "RECORDS/S", "SHARES SINCE CHANGE", "BACKENDS"
    );
    let current = fleet.map(|f| f.version);
    for a in agents {
        let state = if a.error.is_some() {
            "REFUSED"
        } else if a.version < current {
            "LAGGING"
        } else if a.stale {
            "STALE"
        } else {
            "ok"
        };
        let shares = a
            .backends
            .iter()
            .map(|b| {
                if b.routed_since_change == 0 && b.share_since_change == 0.0 {
                    format!("{} -", b.name)
                } else {
                    format!("{} {:.1}%", b.name, b.share_since_change * 100.0)
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        let backends = a
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{}={}{}",
                    b.name,
                    b.weight,
                    if b.up { "" } else { "(DOWN)" }
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        out += &format!(
            "{:<20} {:>7} {:<8} {:>9.1}  {:<28} {}\n",
            a.agent,
            a.version.map_or_else(|| "-".to_string(), |v| v.to_string()),
            state,
            a.records_per_s,
            shares,
            backends
        );
        if let Some(e) = &a.error {
            out += &format!("{:<20} error: {e}\n", "");
        }
    }
    if agents.is_empty() {
        out += "(no live agent: none runs with --control at this prefix)\n";
    }
    out
}
