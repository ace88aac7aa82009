//! Fleet weights: several real agents following one versioned record in a real control Redis.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use common::{connect_many, eventually, http, http_get, redtap_bin, Daemon, RedisServer};
use redtap::control::{self, Keys};

/// Generous: an agent applies a change within a second; the deadline only bounds a hung test.
const DEADLINE: Duration = Duration::from_secs(15);

/// An agent named `name` in connections mode over backends A and B (weights 30/70),
/// following the control Redis `control`.
fn agent(name: &str, a: &RedisServer, b: &RedisServer, control: &RedisServer) -> Daemon {
    let args = agent_args(name, a, b, control);
    Daemon::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn agent_args(name: &str, a: &RedisServer, b: &RedisServer, control: &RedisServer) -> Vec<String> {
    vec![
        "--capture".into(),
        "connections".into(),
        "--agent".into(),
        name.into(),
        "--backend".into(),
        format!("A={}@30", a.url()),
        "--backend".into(),
        format!("B={}@70", b.url()),
        "--control".into(),
        control.url(),
    ]
}

/// `redtap weights ARGS… --control URL`.
fn weights_cli(control: &RedisServer, args: &[&str]) -> Output {
    Command::new(redtap_bin())
        .arg("weights")
        .args(args)
        .args(["--control", &control.url()])
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The agent's weights by backend name, from `GET /v1/backends`.
fn weights_of(d: &Daemon) -> BTreeMap<String, u64> {
    d.backends()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `GET /v1/control`.
fn control_of(d: &Daemon) -> serde_json::Value {
    let (status, body) = http_get(&format!("{}/v1/control", d.admin)).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn w(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(n, w)| (n.to_string(), *w)).collect()
}

/// The fleet list as JSON (`redtap weights --control URL --json`).
fn fleet_json(control: &RedisServer) -> serde_json::Value {
    serde_json::from_str(&ok(weights_cli(control, &["--json"]))).unwrap()
}

#[test]
fn a_change_is_followed_by_every_agent_and_a_later_agent_starts_with_it() {
    let (a, b, ctl) = (
        RedisServer::start(),
        RedisServer::start(),
        RedisServer::start(),
    );
    let agents: Vec<Daemon> = ["a1", "a2", "a3"]
        .iter()
        .map(|n| agent(n, &a, &b, &ctl))
        .collect();
    for d in &agents {
        assert_eq!(weights_of(d), w(&[("A", 30), ("B", 70)]));
    }

    let out = ok(weights_cli(&ctl, &["set", "A=50", "B=50"]));
    assert!(out.contains("version 1"), "{out}");
    for d in &agents {
        eventually(DEADLINE, "every agent serves version 1", || {
            control_of(d)["version"] == 1 && weights_of(d) == w(&[("A", 50), ("B", 50)])
        });
        assert_eq!(control_of(d)["stale"], false);
        assert_eq!(d.metric("redtap_control_version"), 1.0);
        assert_eq!(d.metric("redtap_control_stale"), 0.0);
    }
    // Records flow at the new weights.
    for d in &agents {
        assert_eq!(connect_many(d.listen, 100, 4), 100);
    }
    eventually(DEADLINE, "300 records stored", || {
        agents
            .iter()
            .map(|d| d.metric_sum("redtap_records_written_total"))
            .sum::<f64>()
            == 300.0
    });
    // From the first record after the change, each share within one record of 50/50.
    for d in &agents {
        for b in d.backends().as_array().unwrap() {
            let n = b["records_routed_since_change"].as_u64().unwrap();
            assert!((49..=51).contains(&n), "{b}");
        }
    }

    // Every live agent is listed with the version it serves and its shares.
    eventually(DEADLINE, "three heartbeats at version 1", || {
        let list = fleet_json(&ctl);
        let live = list["agents"].as_array().unwrap();
        live.len() == 3
            && live
                .iter()
                .all(|a| a["version"] == 1 && a["error"].is_null())
    });
    let table = ok(weights_cli(&ctl, &[]));
    for name in ["a1", "a2", "a3"] {
        assert!(table.contains(name), "{table}");
    }
    assert!(
        table.contains("fleet weights version 1: A=50 B=50"),
        "{table}"
    );

    // An agent started later serves the fleet's weights from its first record.
    let late = agent("a4", &a, &b, &ctl);
    assert_eq!(weights_of(&late), w(&[("A", 50), ("B", 50)]));
    assert_eq!(control_of(&late)["version"], 1);

    // PUT /v1/weights on any agent changes the fleet's record: every agent follows.
    let (status, body) = agents[1].put_weights(r#"{"A":20}"#);
    assert_eq!(status, 200, "{body}");
    for d in agents.iter().chain([&late]) {
        eventually(DEADLINE, "every agent serves version 2", || {
            control_of(d)["version"] == 2 && weights_of(d) == w(&[("A", 20), ("B", 50)])
        });
    }
    // A name the agent does not have is refused there and changes nothing.
    let (status, body) = agents[0].put_weights(r#"{"C":5}"#);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("unknown backend"), "{body}");

    let history = ok(weights_cli(&ctl, &["history"]));
    let lines: Vec<&str> = history.lines().skip(1).collect();
    assert_eq!(lines.len(), 2, "{history}");
    assert!(lines[0].contains("cli@"), "{history}");
    assert!(lines[1].contains("admin@a2"), "{history}");
    assert!(
        lines[1].contains("A=50 B=50") && lines[1].contains("A=20 B=50"),
        "{history}"
    );
}

#[test]
fn agents_keep_capturing_while_the_control_redis_is_down_report_stale_then_converge() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let mut ctl = RedisServer::start();
    let agents: Vec<Daemon> = ["s1", "s2", "s3"]
        .iter()
        .map(|n| agent(n, &a, &b, &ctl))
        .collect();
    ok(weights_cli(&ctl, &["set", "A=10", "B=90"]));
    for d in &agents {
        eventually(DEADLINE, "version 1 everywhere", || {
            weights_of(d) == w(&[("A", 10), ("B", 90)])
        });
    }

    ctl.kill9();
    for d in &agents {
        eventually(DEADLINE, "stale reported", || {
            control_of(d)["stale"] == true && d.metric("redtap_control_stale") == 1.0
        });
        // Still serving the last good weights, still capturing and storing.
        assert_eq!(weights_of(d), w(&[("A", 10), ("B", 90)]));
        assert_eq!(connect_many(d.listen, 50, 4), 50);
    }
    eventually(
        DEADLINE,
        "150 records stored while the control Redis is down",
        || {
            agents
                .iter()
                .map(|d| d.metric_sum("redtap_records_written_total"))
                .sum::<f64>()
                == 150.0
        },
    );
    assert!(
        agents[0].log().contains("control Redis lost"),
        "{}",
        agents[0].log()
    );
    // A change through an agent's API needs the control Redis: refused, nothing changes.
    let (status, body) = agents[0].put_weights(r#"{"A":99}"#);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("weights unchanged"), "{body}");
    assert_eq!(weights_of(&agents[0]), w(&[("A", 10), ("B", 90)]));

    // Back without its data: the agents write back the version they serve, then follow the
    // next change.
    ctl.restart();
    let keys = Keys::new("redtap");
    eventually(DEADLINE, "the fleet record written back", || {
        ctl.conn().ok().and_then(|mut c| {
            redis::cmd("HGET")
                .arg(&keys.weights)
                .arg("version")
                .query::<Option<u64>>(&mut c)
                .ok()
                .flatten()
        }) == Some(1)
    });
    for d in &agents {
        eventually(DEADLINE, "not stale any more", || {
            control_of(d)["stale"] == false
        });
    }
    ok(weights_cli(&ctl, &["set", "A=60", "B=40"]));
    for d in &agents {
        eventually(DEADLINE, "every agent converges on version 2", || {
            control_of(d)["version"] == 2 && weights_of(d) == w(&[("A", 60), ("B", 40)])
        });
        assert_eq!(d.metric("redtap_control_stale"), 0.0);
    }
    let history = ok(weights_cli(&ctl, &["history"]));
    assert!(history.contains("raise@s"), "{history}");
}

#[test]
fn an_agent_started_while_the_control_redis_is_down_serves_its_last_version_as_stale() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let mut ctl = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let admin = format!("127.0.0.1:{}", common::free_port());
    let args = agent_args("st", &a, &b, &ctl);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start_in(dir.path(), &listen, &admin, &args);
    ok(weights_cli(&ctl, &["set", "A=5", "B=95"]));
    // The version is shown once the state file holds it.
    eventually(DEADLINE, "version 1 applied", || {
        weights_of(&d) == w(&[("A", 5), ("B", 95)]) && control_of(&d)["version"] == 1
    });
    assert!(d.stop(Duration::from_secs(10)).success());

    ctl.kill9();
    let d = Daemon::start_in(dir.path(), &listen, &admin, &args);
    // From the state file: the last version applied, marked stale in the API and metrics.
    assert_eq!(weights_of(&d), w(&[("A", 5), ("B", 95)]));
    let status = control_of(&d);
    assert_eq!(status["version"], 1, "{status}");
    assert_eq!(status["stale"], true, "{status}");
    assert_eq!(d.metric("redtap_control_stale"), 1.0);
    assert!(d.log().contains("stale"), "{}", d.log());
    assert_eq!(connect_many(d.listen, 20, 2), 20);
    eventually(
        DEADLINE,
        "records stored with the control Redis down",
        || d.metric_sum("redtap_records_written_total") == 20.0,
    );

    ctl.restart();
    eventually(
        DEADLINE,
        "stale cleared once the control Redis answers",
        || control_of(&d)["stale"] == false && d.metric("redtap_control_stale") == 0.0,
    );
}

#[test]
fn concurrent_sets_all_land_in_the_audit_stream_in_version_order() {
    let ctl = RedisServer::start();
    // Many concurrent compare-and-sets over their own connections: conflicts are certain.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (writers, each) = (4u32, 25u32);
    rt.block_on(async {
        let client = redis::Client::open(ctl.url()).unwrap();
        let mut tasks = Vec::new();
        for t in 0..writers {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                let keys = Keys::new("redtap");
                for i in 0..each {
                    // Each writer owns one name; its weight counts its changes.
                    let changes = BTreeMap::from([(format!("W{t}"), i + 1)]);
                    control::set(
                        &mut conn,
                        &keys,
                        &changes,
                        &BTreeMap::new(),
                        &format!("test{t}"),
                        |_| Ok(()),
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    // And two concurrent command-line `weights set`.
    let spawn = |pair: &str| {
        Command::new(redtap_bin())
            .args(["weights", "set", pair, "--control", &ctl.url()])
            .spawn()
            .unwrap()
    };
    let (mut p, mut q) = (spawn("X=1"), spawn("Y=2"));
    assert!(p.wait().unwrap().success() && q.wait().unwrap().success());

    let total = (writers * each + 2) as usize;
    let entries = rt.block_on(async {
        let client = redis::Client::open(ctl.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        control::history(&mut conn, &Keys::new("redtap"), total + 10)
            .await
            .unwrap()
    });
    assert_eq!(entries.len(), total, "none lost");
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.version, i as u64 + 1, "in version order: {e:?}");
        // Each change was made over the one before it: none was overwritten unseen.
        if i > 0 {
            assert_eq!(e.old, entries[i - 1].new, "version {}", e.version);
        }
    }
    let last = &entries[total - 1].new;
    for t in 0..writers {
        assert_eq!(last[&format!("W{t}")], each, "{last:?}");
    }
    assert_eq!((last["X"], last["Y"]), (1, 2));
}

#[test]
fn an_unknown_backend_name_is_an_error_for_that_agent_not_a_crash() {
    let (a, b, ctl) = (
        RedisServer::start(),
        RedisServer::start(),
        RedisServer::start(),
    );
    let d = agent("u1", &a, &b, &ctl);
    ok(weights_cli(&ctl, &["set", "A=50", "B=50"]));
    eventually(DEADLINE, "version 1", || control_of(&d)["version"] == 1);

    // C is not one of this agent's backends: refused here, the last good weights stay.
    ok(weights_cli(&ctl, &["set", "C=40"]));
    eventually(DEADLINE, "version 2 refused", || {
        control_of(&d)["refused_version"] == 2
    });
    let status = control_of(&d);
    assert_eq!(status["version"], 1, "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("\"C\""),
        "{status}"
    );
    assert_eq!(weights_of(&d), w(&[("A", 50), ("B", 50)]));
    assert!(d.log().contains("fleet weights refused"), "{}", d.log());
    eventually(DEADLINE, "the heartbeat shows the error", || {
        let list = fleet_json(&ctl);
        list["agents"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("version 2") && e.contains("\"C\""))
    });
    assert!(ok(weights_cli(&ctl, &[])).contains("REFUSED"));
    // Still capturing.
    assert_eq!(connect_many(d.listen, 10, 2), 10);
    eventually(DEADLINE, "records stored", || {
        d.metric_sum("redtap_records_written_total") == 10.0
    });

    // Weight 0 for a backend it lacks asks nothing of it: the next version applies.
    ok(weights_cli(&ctl, &["set", "C=0", "A=70"]));
    eventually(DEADLINE, "version 3 applied", || {
        control_of(&d)["version"] == 3 && weights_of(&d) == w(&[("A", 70), ("B", 50)])
    });
    assert!(control_of(&d)["error"].is_null());

    // Bad input on the command line changes nothing.
    let out = weights_cli(&ctl, &["set", "A=0", "B=0", "C=0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("non-zero"));
    let out = weights_cli(&ctl, &["set", "A=10001"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(ok(weights_cli(&ctl, &["history"])).lines().count(), 4);
    // A control URL that is not Redis stops the start (exit 64), naming the flag.
    let out = Command::new(redtap_bin())
        .args(["run", "--listen", "127.0.0.1:1", "--capture", "connections"])
        .args(["--backend", &format!("A={}@1", a.url())])
        .args(["--control", "http://user:pw@127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--control") && !err.contains("pw"), "{err}");
    // Without a control Redis there is no /v1/control.
    let plain = Daemon::connections(&[("A", &a, 1)], &[]);
    let (status, _) = http("GET", &format!("{}/v1/control", plain.admin), None).unwrap();
    assert_eq!(status, 404);
}

#[test]
fn with_a_control_redis_sighup_leaves_the_fleet_weights_alone() {
    let (a, b, ctl) = (
        RedisServer::start(),
        RedisServer::start(),
        RedisServer::start(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redtap.toml");
    std::fs::write(
        &path,
        format!(
            "capture = \"connections\"\nagent = \"h1\"\ncontrol = \"{}\"\n\
             [[backend]]\nname = \"A\"\nurl = \"{}\"\nweight = 1\n\
             [[backend]]\nname = \"B\"\nurl = \"{}\"\nweight = 1\n",
            ctl.url(),
            a.url(),
            b.url()
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", path.to_str().unwrap()]);
    ok(weights_cli(&ctl, &["set", "A=40", "B=60"]));
    // The weights swap first, then the status says which version they are.
    eventually(DEADLINE, "version 1 applied", || {
        weights_of(&d) == w(&[("A", 40), ("B", 60)]) && control_of(&d)["version"] == 1
    });
    d.signal("HUP");
    eventually(DEADLINE, "SIGHUP logged", || {
        d.log().contains("weights come from the control Redis")
    });
    assert_eq!(weights_of(&d), w(&[("A", 40), ("B", 60)]));
    assert_eq!(control_of(&d)["version"], 1);
}
