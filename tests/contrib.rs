//! The files in contrib/ that users copy as they are must stay true to the code.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{eventually, free_port, Daemon, RedisServer};
use redtap::config::{read_file, Config, RunArgs};

#[test]
fn the_example_config_is_valid_and_means_what_its_comments_say() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/redtap.toml");
    let file = read_file(&path).unwrap_or_else(|e| panic!("contrib/redtap.toml: {e}"));
    let config = Config::resolve(file, &RunArgs::default()).unwrap();
    assert_eq!(config.backends.len(), 2);
    assert_eq!(
        config
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.weight))
            .collect::<Vec<_>>(),
        [("A", 30), ("B", 70)]
    );
    assert_eq!(config.retention, std::time::Duration::from_secs(300));
    assert_eq!(
        config.state_file.as_deref(),
        Some(std::path::Path::new("/var/lib/redtap/state.json"))
    );
}

#[test]
fn the_service_reloads_with_hup_and_keeps_state_in_its_state_directory() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/redtap.service"),
    )
    .unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in contrib/redtap.service"))
    };
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(value("StateDirectory"), "redtap");
    assert!(value("AmbientCapabilities").contains("CAP_NET_RAW"));
    assert!(value("ExecStart").contains("--config /etc/redtap/redtap.toml"));
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_itself() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_redtap"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "redtap {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("_redtap()"), "{bash}");
    for sub in ["run", "weights", "query", "top", "tail", "stats"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    assert!(run(&["completions", "zsh"]).contains("#compdef redtap"));
    let man = run(&["man"]);
    assert!(man.contains(".TH redtap 1"), "{man}");
    assert!(
        man.contains("weights"),
        "the man page lists the subcommands"
    );
}

fn contrib(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `redtap_…` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("redtap_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every `expr` in a Grafana dashboard, however deep.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The metric names a real daemon exposes, with one backend down so that the families that
/// only have samples then (`redtap_backend_down_cause`) show too.
fn exposed_metric_names() -> BTreeSet<String> {
    let a = RedisServer::start();
    let dead = format!("B=redis://127.0.0.1:{}@1", free_port());
    let d = Daemon::connections(&[("A", &a, 1)], &["--backend", &dead]);
    eventually(Duration::from_secs(10), "backend B down", || {
        d.metric("redtap_backend_up{backend=\"B\"}") == 0.0
    });
    d.metrics()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

#[test]
fn the_dashboard_and_the_alerts_use_only_metrics_the_daemon_exposes() {
    let dashboard: serde_json::Value = serde_json::from_str(&contrib("grafana-dashboard.json"))
        .expect("contrib/grafana-dashboard.json is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 8, "{exprs:?}");

    let docs = yaml_rust2::YamlLoader::load_from_str(&contrib("prometheus-alerts.yml"))
        .expect("contrib/prometheus-alerts.yml is YAML");
    let rules = docs[0]["groups"][0]["rules"]
        .as_vec()
        .expect("groups[0].rules is a list");
    let alert = |name: &str| {
        rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no alert {name}"))
    };
    let down = alert("RedtapBackendDown");
    assert_eq!(down["expr"].as_str(), Some("redtap_backend_up == 0"));
    assert_eq!(down["for"].as_str(), Some("30s"));
    for (name, needle) in [
        ("RedtapRecordsDropped", "rate(redtap_records_dropped_total"),
        ("RedtapKernelDrops", "rate(redtap_kernel_drops_total"),
        ("RedtapWriterBacklog", "redtap_buffered_records"),
    ] {
        let expr = alert(name)["expr"].as_str().unwrap();
        assert!(expr.contains(needle), "{name}: {expr}");
    }
    for r in rules {
        assert!(r["annotations"]["summary"].as_str().is_some(), "{r:?}");
        exprs.push(
            r["expr"]
                .as_str()
                .expect("every rule has an expr")
                .to_string(),
        );
    }

    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for must in [
        "redtap_records_written_total",
        "redtap_backend_target_share",
        "redtap_backend_weight",
        "redtap_backend_up",
        "redtap_records_dropped_total",
        "redtap_buffered_records",
        "redtap_kernel_drops_total",
    ] {
        assert!(
            used.contains(must),
            "the dashboard or the alerts lack {must}"
        );
    }
    let exposed = exposed_metric_names();
    let unknown: Vec<&String> = used.difference(&exposed).collect();
    assert!(
        unknown.is_empty(),
        "not in the daemon's /metrics: {unknown:?}\nexposed: {exposed:?}"
    );
}
