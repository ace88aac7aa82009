//! The files in contrib/ that users copy as they are must stay true to the code.

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
