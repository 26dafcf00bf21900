//! Handshakes of real TLS clients with the acceptors this crate builds: OpenSSL's
//! `s_client` and GnuTLS's `gnutls-cli` (the library qemu-img and qemu-nbd use),
//! with x509 certificates and with pre-shared keys, over TLS 1.3 and 1.2.
//! Certificates are made by `openssl` in a temporary directory for each test.
//!
//! Each test runs one server connection on a thread and asserts on what the
//! server saw: a completed handshake and the peer's identity, or the failure.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tls::{Authorizer, Authz, Endpoint, PskCreds, PskOptions, TlsCreds, X509Creds, X509Options};

const PSK_KEY: &str = "0123456789abcdef0123456789abcdef";
/// QEMU's priority string for PSK credentials (`crypto/tlssession.c`).
const GNUTLS_PSK_PRIORITY: &str = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK";

/// Fails loudly when a tool is missing, naming the Debian package.
fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: install the Debian package {package}"
    );
}

fn run(dir: &Path, args: &[&str]) {
    require("openssl", "openssl");
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost, and two client certificates
/// (`client` and `stranger`) in `dir`, with QEMU's file names.
fn make_pki(dir: &Path) {
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "30",
            "-subj",
            "/CN=Test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    for (name, subject, ext) in [
        ("server", "/O=blockd/CN=localhost", "server.ext"),
        ("client", "/C=GB/O=blockd/CN=client", "client.ext"),
        ("stranger", "/O=elsewhere/CN=stranger", "client.ext"),
    ] {
        let key = format!("{name}-key.pem");
        let csr = format!("{name}.csr");
        let cert = format!("{name}-cert.pem");
        run(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                subject,
            ],
        );
        run(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "30",
                "-extfile",
                ext,
            ],
        );
    }
}

fn x509_server(dir: &Path, verify_peer: bool) -> TlsCreds {
    TlsCreds::X509(
        X509Creds::load(&X509Options {
            dir: Some(dir.to_str().unwrap().to_string()),
            endpoint: Endpoint::Server,
            verify_peer,
            sanity_check: true,
            password: None,
        })
        .expect("the generated credentials load"),
    )
}

fn psk_server(dir: &Path) -> TlsCreds {
    std::fs::write(dir.join("keys.psk"), format!("alice:{PSK_KEY}\n")).unwrap();
    TlsCreds::Psk(
        PskCreds::load(&PskOptions {
            dir: Some(dir.to_str().unwrap().to_string()),
            endpoint: Endpoint::Server,
            username: None,
        })
        .unwrap(),
    )
}

/// A blocking socket whose reads and writes are retried when interrupted: with a receive
/// timeout set, Linux fails a `recv` with `EINTR` after the process was stopped and
/// continued (or on any signal handler, restartable or not), and OpenSSL would take that
/// for a broken connection.
#[derive(Debug)]
struct Restarting(TcpStream);

impl Read for Restarting {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

impl Write for Restarting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Serves one connection: the handshake, the peer check, then a line of text.
/// Returns the port and what the server saw: `Ok(identity)` or the failure.
fn serve_one(
    creds: TlsCreds,
    authz: Option<Authz>,
) -> (u16, mpsc::Receiver<Result<Option<String>, String>>) {
    let acceptor = creds.acceptor().expect("the acceptor builds");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let outcome = match acceptor.accept(Restarting(stream)) {
            Ok(mut tls) => {
                let checked = creds
                    .check_peer(tls.ssl(), authz.as_ref().map(|a| a as &dyn Authorizer))
                    .map_err(|e| e.to_string());
                if checked.is_ok() {
                    let _ = tls.write_all(b"hello\n");
                }
                let _ = tls.shutdown();
                checked
            }
            Err(err) => Err(format!("handshake failed: {err}")),
        };
        let _ = tx.send(outcome);
    });
    (port, rx)
}

/// Runs a client to completion (stdin closed, killed after 20 s).
fn client(program: &str, package: &str, args: &[String]) {
    require(program, package);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start the client");
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn outcome(rx: mpsc::Receiver<Result<Option<String>, String>>) -> Result<Option<String>, String> {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the server saw no connection")
}

fn s_client_x509(dir: &Path, port: u16, who: &str, extra: &[&str]) -> Vec<String> {
    let d = dir.display();
    let mut args: Vec<String> = [
        "s_client".to_string(),
        "-connect".into(),
        format!("127.0.0.1:{port}"),
        "-CAfile".into(),
        format!("{d}/ca-cert.pem"),
        "-cert".into(),
        format!("{d}/{who}-cert.pem"),
        "-key".into(),
        format!("{d}/{who}-key.pem"),
        "-verify_return_error".into(),
    ]
    .into();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn gnutls_x509(dir: &Path, port: u16, who: &str, extra: &[&str]) -> Vec<String> {
    let d = dir.display();
    let mut args: Vec<String> = vec![
        format!("--x509cafile={d}/ca-cert.pem"),
        format!("--x509certfile={d}/{who}-cert.pem"),
        format!("--x509keyfile={d}/{who}-key.pem"),
        format!("--port={port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("localhost".into());
    args
}

fn gnutls_psk(port: u16, user: &str, key: &str, priority: &str) -> Vec<String> {
    vec![
        format!("--pskusername={user}"),
        format!("--pskkey={key}"),
        format!("--priority={priority}"),
        "--insecure".into(),
        format!("--port={port}"),
        "127.0.0.1".into(),
    ]
}

const CLIENT_DN: &str = "CN=client,O=blockd,C=GB";

#[test]
fn openssl_x509_client_completes_the_handshake_with_its_dn() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (port, rx) = serve_one(x509_server(dir.path(), true), None);
    client(
        "openssl",
        "openssl",
        &s_client_x509(dir.path(), port, "client", &[]),
    );
    assert_eq!(outcome(rx), Ok(Some(CLIENT_DN.to_string())));
}

#[test]
fn openssl_x509_client_over_tls12_completes_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (port, rx) = serve_one(x509_server(dir.path(), true), None);
    client(
        "openssl",
        "openssl",
        &s_client_x509(dir.path(), port, "client", &["-tls1_2"]),
    );
    assert_eq!(outcome(rx), Ok(Some(CLIENT_DN.to_string())));
}

#[test]
fn gnutls_x509_client_completes_the_handshake_with_its_dn() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (port, rx) = serve_one(x509_server(dir.path(), true), None);
    client(
        "gnutls-cli",
        "gnutls-bin",
        &gnutls_x509(dir.path(), port, "client", &[]),
    );
    assert_eq!(outcome(rx), Ok(Some(CLIENT_DN.to_string())));
}

#[test]
fn gnutls_x509_client_over_tls12_completes_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (port, rx) = serve_one(x509_server(dir.path(), true), None);
    let args = gnutls_x509(
        dir.path(),
        port,
        "client",
        &["--priority=NORMAL:-VERS-TLS1.3"],
    );
    client("gnutls-cli", "gnutls-bin", &args);
    assert_eq!(outcome(rx), Ok(Some(CLIENT_DN.to_string())));
}

#[test]
fn gnutls_client_listed_by_authz_list_glob_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let authz = Authz::List {
        policy: tls::Policy::Deny,
        rules: vec![tls::Rule {
            pattern: "CN=client,*".into(),
            policy: tls::Policy::Allow,
            format: tls::Format::Glob,
        }],
    };
    let (port, rx) = serve_one(x509_server(dir.path(), true), Some(authz));
    client(
        "gnutls-cli",
        "gnutls-bin",
        &gnutls_x509(dir.path(), port, "client", &[]),
    );
    assert_eq!(outcome(rx), Ok(Some(CLIENT_DN.to_string())));
}

#[test]
fn gnutls_client_not_listed_by_authz_is_denied() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let authz = Authz::Simple {
        identity: CLIENT_DN.into(),
    };
    let (port, rx) = serve_one(x509_server(dir.path(), true), Some(authz));
    client(
        "gnutls-cli",
        "gnutls-bin",
        &gnutls_x509(dir.path(), port, "stranger", &[]),
    );
    assert_eq!(
        outcome(rx),
        Err("TLS x509 authz check for CN=stranger,O=elsewhere is denied".to_string())
    );
}

#[test]
fn openssl_client_not_listed_by_authz_is_denied() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let authz = Authz::Simple {
        identity: CLIENT_DN.into(),
    };
    let (port, rx) = serve_one(x509_server(dir.path(), true), Some(authz));
    client(
        "openssl",
        "openssl",
        &s_client_x509(dir.path(), port, "stranger", &[]),
    );
    assert_eq!(
        outcome(rx),
        Err("TLS x509 authz check for CN=stranger,O=elsewhere is denied".to_string())
    );
}

#[test]
fn client_without_a_certificate_fails_when_verify_peer_is_on() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (port, rx) = serve_one(x509_server(dir.path(), true), None);
    let args = vec![
        format!("--x509cafile={}/ca-cert.pem", dir.path().display()),
        format!("--port={port}"),
        "localhost".to_string(),
    ];
    client("gnutls-cli", "gnutls-bin", &args);
    assert!(outcome(rx).is_err());
}

#[test]
fn client_without_a_certificate_is_served_when_verify_peer_is_off() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (port, rx) = serve_one(x509_server(dir.path(), false), None);
    let args = vec![
        format!("--x509cafile={}/ca-cert.pem", dir.path().display()),
        format!("--port={port}"),
        "localhost".to_string(),
    ];
    client("gnutls-cli", "gnutls-bin", &args);
    assert_eq!(outcome(rx), Ok(None));
}

#[test]
fn gnutls_psk_client_over_tls13_completes_the_handshake_as_its_user() {
    let dir = tempfile::tempdir().unwrap();
    let (port, rx) = serve_one(psk_server(dir.path()), None);
    client(
        "gnutls-cli",
        "gnutls-bin",
        &gnutls_psk(port, "alice", PSK_KEY, GNUTLS_PSK_PRIORITY),
    );
    assert_eq!(outcome(rx), Ok(Some("alice".to_string())));
}

#[test]
fn gnutls_psk_client_over_tls12_completes_the_handshake_as_its_user() {
    let dir = tempfile::tempdir().unwrap();
    let (port, rx) = serve_one(psk_server(dir.path()), None);
    let priority = format!("{GNUTLS_PSK_PRIORITY}:-VERS-TLS1.3");
    client(
        "gnutls-cli",
        "gnutls-bin",
        &gnutls_psk(port, "alice", PSK_KEY, &priority),
    );
    assert_eq!(outcome(rx), Ok(Some("alice".to_string())));
}

#[test]
fn gnutls_psk_client_with_a_wrong_key_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let (port, rx) = serve_one(psk_server(dir.path()), None);
    let wrong = "ffffffffffffffffffffffffffffffff";
    client(
        "gnutls-cli",
        "gnutls-bin",
        &gnutls_psk(port, "alice", wrong, GNUTLS_PSK_PRIORITY),
    );
    assert!(outcome(rx).is_err());
}

#[test]
fn gnutls_psk_client_with_an_unknown_user_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let (port, rx) = serve_one(psk_server(dir.path()), None);
    client(
        "gnutls-cli",
        "gnutls-bin",
        &gnutls_psk(port, "mallory", PSK_KEY, GNUTLS_PSK_PRIORITY),
    );
    assert!(outcome(rx).is_err());
}

#[test]
fn openssl_psk_client_over_tls13_completes_the_handshake_as_its_user() {
    let dir = tempfile::tempdir().unwrap();
    let (port, rx) = serve_one(psk_server(dir.path()), None);
    let args: Vec<String> = [
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-psk",
        PSK_KEY,
        "-psk_identity",
        "alice",
        "-tls1_3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    client("openssl", "openssl", &args);
    assert_eq!(outcome(rx), Ok(Some("alice".to_string())));
}

#[test]
fn openssl_psk_client_over_tls12_completes_the_handshake_as_its_user() {
    let dir = tempfile::tempdir().unwrap();
    let (port, rx) = serve_one(psk_server(dir.path()), None);
    let args: Vec<String> = [
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-psk",
        PSK_KEY,
        "-psk_identity",
        "alice",
        "-tls1_2",
        "-cipher",
        "PSK",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    client("openssl", "openssl", &args);
    assert_eq!(outcome(rx), Ok(Some("alice".to_string())));
}

#[test]
fn openssl_psk_client_with_a_wrong_key_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let (port, rx) = serve_one(psk_server(dir.path()), None);
    let args: Vec<String> = [
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-psk",
        "ffff",
        "-psk_identity",
        "alice",
        "-tls1_3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    client("openssl", "openssl", &args);
    assert!(outcome(rx).is_err());
}
