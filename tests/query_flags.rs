//! The read commands' time flags as a user types them: dates and local times, windows that end
//! before they start, `top --count`.

mod common;

use std::process::Command;

use common::{redtap_bin, RedisServer};

/// `redtap <args>` with `TZ` set: (exit code, stdout, stderr).
fn redtap_tz(tz: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(redtap_bin())
        .args(args)
        .env("TZ", tz)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn a_window_that_ends_before_it_starts_is_a_usage_error() {
    let r = RedisServer::start();
    let be = format!("A={}@1", r.url());
    let (code, _, err) = redtap_tz(
        "UTC",
        &["query", "--backend", &be, "--since", "1m", "--until", "5m"],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("before it starts"), "{err}");
    let (code, _, err) = redtap_tz(
        "UTC",
        &["top", "--backend", &be, "--since", "1m", "--until", "2m"],
    );
    assert_eq!(code, 64, "{err}");
}

#[test]
fn dates_and_local_times_are_read_in_the_local_zone_and_said_so() {
    let r = RedisServer::start();
    let be = format!("A={}@1", r.url());
    // 2026-11-24 09:00 in UTC+2 (POSIX TZ "XXX-2") is 07:00Z.
    let (code, out, err) = redtap_tz(
        "XXX-2",
        &[
            "query",
            "--backend",
            &be,
            "--since",
            "2026-11-24 09:00",
            "--format",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty(), "nothing stored, nothing shown: {out}");
    assert!(
        err.contains("read as local time") && err.contains("2026-11-24T07:00:00Z"),
        "{err}"
    );
    let (code, _, err) = redtap_tz("UTC", &["query", "--backend", &be, "--since", "2026-11-24"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2026-11-24T00:00:00Z"), "{err}");
    let (code, _, err) = redtap_tz("UTC", &["query", "--backend", &be, "--since", "yesterday"]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("2026-11-24 09:00"),
        "the error shows the forms it takes: {err}"
    );
}

#[test]
fn top_takes_count_and_keeps_top_as_an_alias() {
    let r = RedisServer::start();
    let be = format!("A={}@1", r.url());
    for flag in ["--count", "-n", "--top"] {
        let (code, _, err) = redtap_tz("UTC", &["top", "--backend", &be, flag, "3"]);
        assert_eq!(code, 0, "top {flag} 3: {err}");
    }
}

#[test]
fn readers_need_no_weight_and_stats_says_so() {
    let r = RedisServer::start();
    let be = format!("A={}", r.url());
    for cmd in ["query", "top", "stats"] {
        let (code, _, err) = redtap_tz("UTC", &[cmd, "--backend", &be]);
        assert_eq!(code, 0, "{cmd} --backend NAME=URL: {err}");
    }
    let (_, out, _) = redtap_tz("UTC", &["stats", "--backend", &be]);
    assert!(out.contains("WEIGHT: not given"), "{out}");
    // A password before the host is not taken for a weight.
    let (code, _, err) = redtap_tz(
        "UTC",
        &[
            "stats",
            "--backend",
            &format!("A=redis://:nopass@127.0.0.1:{}", r.port),
        ],
    );
    assert_ne!(
        code, 64,
        "parsed as a URL with a password, not a weight: {err}"
    );
}

#[test]
fn stats_shows_the_weights_in_force_when_the_admin_api_answers() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let d = common::Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &["--state-file", "off"]);
    let (status, body) = d.put_weights(r#"{"A":50,"B":50}"#);
    assert_eq!(status, 200, "{body}");
    let backends = [format!("A={}@30", a.url()), format!("B={}@70", b.url())];
    let base = [
        "stats",
        "--backend",
        &backends[0],
        "--backend",
        &backends[1],
        "--format",
        "json",
    ];
    let stats = |extra: &[&str]| -> serde_json::Value {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let (code, out, err) = redtap_tz("UTC", &args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let configured = stats(&[]);
    assert_eq!(configured["weights_from"], "configured");
    assert_eq!(configured["backends"][0]["weight"], 30);
    let addr = d.admin.trim_start_matches("http://").to_string();
    let live = stats(&["--admin", &addr]);
    assert_eq!(live["weights_from"], "live", "{live}");
    assert_eq!(live["backends"][0]["weight"], 50);
    assert_eq!(live["backends"][1]["target_share"], 0.5);
    // An admin API that does not answer: the configured weights, said on stderr.
    let mut args = base.to_vec();
    let dead = format!("127.0.0.1:{}", common::free_port());
    args.extend_from_slice(&["--admin", &dead]);
    let (code, out, err) = redtap_tz("UTC", &args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("configured weights"), "{err}");
    assert!(out.contains("\"configured\""), "{out}");
}
