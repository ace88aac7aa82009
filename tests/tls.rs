//! TLS to Redis (`rediss://`) with a private CA and a client certificate, against a real
//! redis-server that requires client certificates.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{connect_many, eventually, free_port, Daemon};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl not found: apt-get install openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=redtap test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=redtap test {name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }
}

struct TlsRedis(Child);

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn rediss_with_ca_and_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let port = free_port();
    let _redis = TlsRedis(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "yes"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                d.to_str().unwrap(),
            ])
            .current_dir(d)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = |f: &str| std::fs::read(d.join(f)).unwrap();
    let client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}"),
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: pem("client.crt"),
                client_key: pem("client.key"),
            }),
            root_cert: Some(pem("ca.crt")),
        },
    )
    .unwrap();
    let xlen = || -> Option<u64> {
        let mut c = client.get_connection().ok()?;
        common::xlen_on(&mut c, "redtap:events:t").ok()
    };
    eventually(Duration::from_secs(5), "TLS redis up", || xlen().is_some());

    let daemon = tls_daemon(d, port);
    assert_eq!(connect_many(daemon.listen, 100, 2), 100);
    eventually(Duration::from_secs(10), "100 records over TLS", || {
        xlen() == Some(100)
    });

    // Without the client certificate the server refuses us: the backend is marked down.
    let backend = format!("A=rediss://127.0.0.1:{port}@1");
    let ca = d.join("ca.crt").to_str().unwrap().to_string();
    let refused = Daemon::start(&[
        "--capture",
        "connections",
        "--agent",
        "u",
        "--backend",
        &backend,
        "--tls-ca",
        &ca,
    ]);
    assert_eq!(connect_many(refused.listen, 10, 1), 10);
    eventually(
        Duration::from_secs(5),
        "backend down without a client cert",
        || refused.backends()[0]["up"] == false,
    );
}

/// `redtap run` (connections mode, agent `t`) writing to the rediss:// server on `port` with the
/// CA and client certificate made in `d`.
fn tls_daemon(d: &Path, port: u16) -> Daemon {
    let path = |f: &str| d.join(f).to_str().unwrap().to_string();
    let backend = format!("A=rediss://127.0.0.1:{port}@1");
    let (ca, cert, key) = (path("ca.crt"), path("client.crt"), path("client.key"));
    Daemon::start(&[
        "--capture",
        "connections",
        "--agent",
        "t",
        "--backend",
        &backend,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ])
}

/// A redis-server that speaks only TLS on `port` and requires client certificates from `d`.
fn tls_redis(d: &Path, port: u16) -> TlsRedis {
    TlsRedis(
        Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "yes"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", d.to_str().unwrap()])
            .current_dir(d)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn read_commands_connect_with_the_tls_files_of_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let port = free_port();
    let _redis = tls_redis(d, port);
    let path = |f: &str| d.join(f).to_str().unwrap().to_string();
    let toml = |with_client_cert: bool| {
        let mut t = format!(
            "[[backend]]\nname = \"A\"\nurl = \"rediss://127.0.0.1:{port}\"\nweight = 1\n\
             tls_ca = \"{}\"\n",
            path("ca.crt")
        );
        if with_client_cert {
            t += &format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("client.crt"),
                path("client.key")
            );
        }
        t
    };
    let full = d.join("full.toml");
    std::fs::write(&full, toml(true)).unwrap();
    let no_cert = d.join("no-cert.toml");
    std::fs::write(&no_cert, toml(false)).unwrap();
    let redtap = |args: &[&str]| {
        Command::new(common::redtap_bin())
            .args(args)
            .output()
            .unwrap()
    };
    // Wait for the server through the read side itself.
    let full_s = full.to_str().unwrap();
    eventually(Duration::from_secs(10), "TLS redis answers stats", || {
        redtap(&["stats", "--config", full_s]).status.code() == Some(0)
    });

    let daemon = tls_daemon(d, port);
    assert_eq!(connect_many(daemon.listen, 30, 2), 30);
    eventually(
        Duration::from_secs(10),
        "query reads 30 records over TLS",
        || {
            let out = redtap(&["query", "--config", full_s, "--format", "json"]);
            out.status.code() == Some(0)
                && String::from_utf8_lossy(&out.stdout).lines().count() == 30
        },
    );
    let top = redtap(&["top", "--config", full_s]);
    assert_eq!(
        top.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );

    // Without the client certificate the server refuses the reader: a partial answer (exit 2).
    let refused = redtap(&["query", "--config", no_cert.to_str().unwrap()]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
