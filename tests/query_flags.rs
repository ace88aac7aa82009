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
