//! `redtap weights`: the command-line client of the admin API.

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
