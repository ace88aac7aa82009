//! The live page in a real headless Chromium (through chromedriver), against a real daemon and
//! real redis-servers: it shows both backends and their live weights, a weight change made on
//! the page reaches `GET /v1/backends`, the shares follow traffic, a refused change and a gone
//! daemon say so, and with a token the page asks for it, names a wrong one, changes weights
//! with the right one, and shows a backend whose Redis died as down.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test.sh` installs them); without
//! them these tests fail with that message rather than pass. Set `REDTAP_PAGE_SCREENSHOT=PATH`
//! to keep the screenshot the first test takes (the README's `docs/page.png`).

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect_many, free_port, http_get, paced_connections, Daemon, RedisServer};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// chromedriver on a free port, killed and reaped on drop.
struct Driver {
    child: Child,
    port: u16,
    log: tempfile::NamedTempFile,
    profile: tempfile::TempDir,
}

fn find_program(name: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !path.is_empty()).then_some(path)
}

impl Driver {
    fn start() -> Driver {
        let missing: Vec<&str> = [
            ("chromedriver", "chromium-driver"),
            ("chromium", "chromium"),
        ]
        .into_iter()
        .filter(|(cmd, _)| find_program(cmd).is_none())
        .map(|(_, pkg)| pkg)
        .collect();
        assert!(
            missing.is_empty(),
            "the live page tests need a headless browser: install it with \
             'sudo apt-get install {}' (./scripts/test.sh does this) and run them again",
            missing.join(" ")
        );
        let log = tempfile::NamedTempFile::new().unwrap();
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("cannot run chromedriver");
        let driver = Driver {
            child,
            port,
            log,
            profile: tempfile::tempdir().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(&format!("http://127.0.0.1:{port}/status")).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer within 20 s:\n{}",
                driver.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// A new browser session: headless Chromium with a fresh profile.
    async fn browser(&self) -> Client {
        let chromium = find_program("chromium").expect("checked in start");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1440,1000",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut builder = ClientBuilder::new(connector);
        builder.capabilities(caps);
        let url = format!("http://127.0.0.1:{}", self.port);
        match tokio::time::timeout(Duration::from_secs(60), builder.connect(&url)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!(
                "cannot start headless Chromium through chromedriver: {e}\n{}",
                self.log()
            ),
            Err(_) => panic!(
                "headless Chromium did not start within 60 s\n{}",
                self.log()
            ),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `body` with a browser session, closing the session (and so the browser) even when the
/// body panics, then passing the panic on.
async fn with_browser<F, Fut>(driver: &Driver, body: F)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let client = driver.browser().await;
    let outcome = tokio::spawn(body(client.clone())).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            Err(e) => panic!("test body did not finish: {e}"),
        }
    }
}

/// Poll `cond` (an async read of the page) every 100 ms until it gives `Some`, or panic with
/// `what` and the page's last message after `within`.
async fn until<T, F, Fut>(c: &Client, within: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if Instant::now() >= deadline {
            let msg = text(c, "#message").await;
            let rows = rows(c).await;
            panic!("timed out after {within:?} waiting for: {what}\npage message: {msg:?}\nrows: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One backend row as the page shows it.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    state: String,
    weight: String,
    since_change: f64,
    recent: f64,
    routed: u64,
}

/// The backend rows the page shows now (read from the DOM).
async fn rows(c: &Client) -> Vec<Row> {
    let v = c
        .execute(
            "return Array.from(document.querySelectorAll('#backends tbody tr')).map(r => [
                r.dataset.backend, r.querySelector('.state').textContent,
                r.querySelector('.weight-now').textContent,
                (r.querySelector('.since-change .v') || {}).textContent || '',
                (r.querySelector('.share-recent .v') || {}).textContent || '',
                (r.querySelector('.routed') || {}).textContent || '0'])",
            vec![],
        )
        .await
        .unwrap_or(Value::Null);
    let pct = |s: &Value| {
        s.as_str()
            .and_then(|s| s.trim_end_matches('%').parse::<f64>().ok())
            .map_or(f64::NAN, |p| p / 100.0)
    };
    v.as_array()
        .into_iter()
        .flatten()
        .map(|r| Row {
            name: r[0].as_str().unwrap_or("").into(),
            state: r[1].as_str().unwrap_or("").into(),
            weight: r[2].as_str().unwrap_or("").into(),
            since_change: pct(&r[3]),
            recent: pct(&r[4]),
            routed: r[5]
                .as_str()
                .unwrap_or("0")
                .replace(',', "")
                .parse()
                .unwrap_or(0),
        })
        .collect()
}

/// The text of the first element matching `css`, or "" when there is none or it is hidden.
async fn text(c: &Client, css: &str) -> String {
    let v = c
        .execute(
            "const e = document.querySelector(arguments[0]); \
             return e && !e.hidden ? e.textContent : '';",
            vec![json!(css)],
        )
        .await
        .unwrap_or(Value::Null);
    v.as_str().unwrap_or("").to_string()
}

/// Type `value` into backend `name`'s weight input, as a user would.
async fn type_weight(c: &Client, name: &str, value: &str) {
    let input = c
        .find(Locator::Css(&format!(
            "tr[data-backend='{name}'] input.weight-input"
        )))
        .await
        .unwrap();
    input.clear().await.unwrap();
    input.send_keys(value).await.unwrap();
}

/// Review and confirm the typed change; returns the confirm step's text.
async fn review_and_confirm(c: &Client) -> String {
    c.find(Locator::Id("review"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let listed = until(
        c,
        Duration::from_secs(5),
        "the confirm step",
        || async move { Some(text(c, "#confirm").await).filter(|t| !t.is_empty()) },
    )
    .await;
    c.find(Locator::Id("confirm-yes"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    listed
}

/// Open and close `n` connections to `addr` (bounded: each connect has a 5 s timeout). When a
/// screenshot is wanted, send five times as many spread over 15 s, so the chart has a shape.
async fn send(addr: std::net::SocketAddr, n: usize) -> usize {
    if std::env::var_os("REDTAP_PAGE_SCREENSHOT").is_some() {
        let n = n * 5;
        let per_tick = n.div_ceil(75);
        tokio::task::spawn_blocking(move || {
            paced_connections(addr, n, per_tick, Duration::from_millis(200))
                .join()
                .unwrap()
        })
        .await
        .unwrap()
    } else {
        tokio::task::spawn_blocking(move || connect_many(addr, n, 4))
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_both_backends_changes_a_weight_and_the_shares_follow_traffic() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let mut d = Daemon::connections(&[("A", &a, 50), ("B", &b, 50)], &[]);
    let driver = Driver::start();
    let admin = d.admin.clone();
    let listen = d.listen;
    // The body runs in its own task; the daemon stays here, reached through its address.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let stopper = tokio::task::spawn_blocking(move || {
        if stop_rx.blocking_recv().is_ok() {
            d.stop(Duration::from_secs(10));
            let _ = stopped_tx.send(());
        }
    });
    with_browser(&driver, move |c| async move {
        let c = &c;
        c.goto(&format!("{admin}/")).await.unwrap();
        // Both backends and their live weights.
        until(
            c,
            Duration::from_secs(10),
            "both backends at weight 50",
            || async move {
                let r = rows(c).await;
                (r.len() == 2
                    && r[0].name == "A"
                    && r[1].name == "B"
                    && r.iter().all(|r| r.weight == "50" && r.state == "up"))
                .then_some(())
            },
        )
        .await;

        // Traffic at 50/50: both get records, and the recent share is near a half.
        let ok = send(listen, 400).await;
        assert!(ok > 300, "only {ok} of 400 connections made");
        until(
            c,
            Duration::from_secs(15),
            "records routed to both, recent share near 50%",
            || async move {
                let r = rows(c).await;
                (r.len() == 2
                    && r.iter()
                        .all(|r| r.routed > 100 && (r.recent - 0.5).abs() < 0.1))
                .then_some(())
            },
        )
        .await;

        // A change the API refuses (every weight 0) says why and changes nothing.
        type_weight(c, "A", "0").await;
        type_weight(c, "B", "0").await;
        review_and_confirm(c).await;
        let msg = until(
            c,
            Duration::from_secs(5),
            "the refusal on the page",
            || async move { Some(text(c, "#message").await).filter(|m| m.contains("refused")) },
        )
        .await;
        assert!(
            msg.contains("422") && msg.contains("Nothing changed"),
            "{msg}"
        );
        let now = common::http_get(&format!("{admin}/v1/backends")).unwrap().1;
        let now: Value = serde_json::from_str(&now).unwrap();
        assert_eq!(
            (now[0]["weight"].as_u64(), now[1]["weight"].as_u64()),
            (Some(50), Some(50))
        );

        // A change made on the page reaches GET /v1/backends.
        type_weight(c, "A", "20").await;
        type_weight(c, "B", "80").await;
        let listed = review_and_confirm(c).await;
        assert!(
            listed.contains("A: weight 50 → 20") && listed.contains("B: weight 50 → 80"),
            "confirm step: {listed}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let body = common::http_get(&format!("{admin}/v1/backends")).unwrap().1;
            let v: Value = serde_json::from_str(&body).unwrap();
            if v[0]["weight"] == 20 && v[1]["weight"] == 80 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the page's change did not reach the API: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        until(
            c,
            Duration::from_secs(5),
            "the page shows weights 20 and 80",
            || async move {
                let r = rows(c).await;
                (r.len() == 2 && r[0].weight == "20" && r[1].weight == "80").then_some(())
            },
        )
        .await;

        // Under traffic the shares move to the new weights.
        let ok = send(listen, 500).await;
        assert!(ok > 400, "only {ok} of 500 connections made");
        until(
            c,
            Duration::from_secs(15),
            "since-change share B near 80%, recent share B above 60%",
            || async move {
                let r = rows(c).await;
                (r.len() == 2 && (r[1].since_change - 0.8).abs() < 0.02 && r[1].recent > 0.6)
                    .then_some(())
            },
        )
        .await;
        // The top sources name the senders (connect_many sends from 127.0.1.x).
        until(
            c,
            Duration::from_secs(5),
            "top sources list 127.0.1.x",
            || async move { text(c, "#sources").await.contains("127.0.1.").then_some(()) },
        )
        .await;

        let png = c.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        if let Ok(path) = std::env::var("REDTAP_PAGE_SCREENSHOT") {
            std::fs::write(&path, &png).unwrap();
        }

        // The daemon goes away: the page says it cannot reach it.
        stop_tx.send(()).unwrap();
        stopped_rx.await.unwrap();
        until(
            c,
            Duration::from_secs(10),
            "the page says redtap is unreachable",
            || async move {
                text(c, "#message")
                    .await
                    .contains("Cannot reach redtap")
                    .then_some(())
            },
        )
        .await;
    })
    .await;
    stopper.await.unwrap();
}

/// `METHOD url` with `Authorization: Bearer token`: (status, body).
fn http_with_token(method: &str, url: &str, token: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').expect("a path");
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_names_a_wrong_one_and_changes_weights_with_it() {
    const TOKEN: &str = "s3cret-page-token";
    let (mut a, b) = (RedisServer::start(), RedisServer::start());
    let d = Daemon::connections(&[("A", &a, 50), ("B", &b, 50)], &["--admin-token", TOKEN]);
    let driver = Driver::start();
    let admin = d.admin.clone();
    // The page itself is public (it holds no data); its data is not.
    let (status, html) = http_get(&format!("{admin}/")).unwrap();
    assert_eq!(status, 200);
    assert!(html.contains("<title>redtap</title>"));
    assert_eq!(http_get(&format!("{admin}/v1/live")).unwrap().0, 401);
    let state_dir = d.dir.join("state");
    with_browser(&driver, move |c| async move {
        let c = &c;
        c.goto(&format!("{admin}/")).await.unwrap();
        until(
            c,
            Duration::from_secs(10),
            "the page asks for a token",
            || async move {
                text(c, "#message")
                    .await
                    .contains("a token is required")
                    .then_some(())
            },
        )
        .await;
        assert!(!text(c, "#auth").await.is_empty(), "the token form shows");
        assert!(
            text(c, "#main").await.is_empty(),
            "no data shows without the token"
        );

        let use_token = |t: &'static str| async move {
            let input = c.find(Locator::Id("token")).await.unwrap();
            input.clear().await.unwrap();
            input.send_keys(t).await.unwrap();
            c.find(Locator::Id("token-use"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
        };
        use_token("not-the-token").await;
        until(
            c,
            Duration::from_secs(10),
            "the page says the token was refused",
            || async move {
                text(c, "#message")
                    .await
                    .contains("refused the token")
                    .then_some(())
            },
        )
        .await;
        assert!(text(c, "#main").await.is_empty());

        use_token(TOKEN).await;
        until(
            c,
            Duration::from_secs(10),
            "both backends at weight 50 with the token",
            || async move {
                let r = rows(c).await;
                (r.len() == 2 && r.iter().all(|r| r.weight == "50")).then_some(())
            },
        )
        .await;
        assert_eq!(
            text(c, "#message").await,
            "",
            "the refusal is gone once the token works"
        );
        let stored = c
            .execute("return sessionStorage.getItem('redtap-token')", vec![])
            .await
            .unwrap();
        assert_eq!(stored, json!(TOKEN), "the token is kept for this tab");

        // A change on the page carries the token.
        type_weight(c, "A", "10").await;
        review_and_confirm(c).await;
        let url = format!("{admin}/v1/backends");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, body) = http_with_token("GET", &url, TOKEN);
            assert_eq!(status, 200, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            if v[0]["weight"] == 10 && v[1]["weight"] == 50 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the page's change did not reach the API: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A change that cannot be saved applies, and the page says it was not saved: the state
        // file's directory is replaced by a file (root ignores permission bits, not that).
        std::fs::remove_dir_all(&state_dir).unwrap();
        std::fs::write(&state_dir, "not a directory").unwrap();
        type_weight(c, "A", "20").await;
        review_and_confirm(c).await;
        let warned = until(
            c,
            Duration::from_secs(10),
            "the page warns that the change was not saved",
            || async move { Some(text(c, "#message").await).filter(|m| m.contains("not saved")) },
        )
        .await;
        assert!(
            warned.starts_with("Weights applied: A=20,B=50, but not saved")
                && warned.contains("redtap-state-t.json")
                && warned.contains("a restart would lose them"),
            "{warned}"
        );
        let (_, body) = http_with_token("GET", &url, TOKEN);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v[0]["weight"], 20, "the unsaved change is in force: {v}");

        // A backend whose Redis dies shows as down, with the cause the API gives.
        a.kill9();
        let down = until(
            c,
            Duration::from_secs(10),
            "backend A shown down, with its cause",
            || async move {
                let r = rows(c).await;
                (r.len() == 2 && r[0].state.starts_with("down: ") && r[1].state == "up")
                    .then_some(r)
            },
        )
        .await;
        assert!(
            down[0].state.len() > "down: ".len(),
            "a cause is named: {down:?}"
        );
    })
    .await;
    drop(d);
}
