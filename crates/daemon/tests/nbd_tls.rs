//! NBD over TLS: qemu-io with PSK and with x509 credentials against blockd's export
//! (`--object tls-creds-*` and `tls-creds` on `--nbd-server`); a client without TLS and a
//! client with the wrong key are refused.

use std::path::{Path, PathBuf};
use std::process::Output;

use testkit::tools::{path as p, try_tool as run};
use testkit::Daemon;

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// blockd serving `disk.img` as export `disk` with credentials object `tls0` made from
/// `object` and, if given, authorization object `auth0` made from `authz`.
fn serve(dir: &Path, object: &str, authz: Option<&str>) -> Daemon {
    let img = p(dir, "disk.img");
    ok(run("qemu-img", &["create", "-q", "-f", "raw", &img, "4M"]));
    let mut args = vec!["--object".to_string(), object.to_string()];
    let mut server = format!(
        "addr.type=unix,addr.path={},tls-creds=tls0",
        p(dir, "nbd.sock")
    );
    if let Some(a) = authz {
        args.extend(["--object".to_string(), a.to_string()]);
        server.push_str(",tls-authz=auth0");
    }
    args.extend([
        "--blockdev".to_string(),
        format!("driver=file,node-name=f,filename={img}"),
        "--nbd-server".to_string(),
        server,
        "--export".to_string(),
        "type=nbd,id=e,node-name=f,name=disk,writable=on".to_string(),
    ]);
    let daemon = Daemon::start_in(&blockd(), dir, &args).expect("blockd starts");
    // The monitor's socket can appear before the NBD server's.
    let sock = dir.join("nbd.sock");
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    daemon
}

/// qemu-io writing and reading through the export with client object `object` (none:
/// plain NBD).
fn qemu_io(dir: &Path, object: Option<&str>) -> Output {
    let sock = p(dir, "nbd.sock");
    let mut opts = format!("driver=raw,file.driver=nbd,file.path={sock},file.export=disk");
    let mut args: Vec<String> = Vec::new();
    if let Some(o) = object {
        args.push("--object".into());
        args.push(o.into());
        opts.push_str(",file.tls-creds=tlsc");
        if o.starts_with("tls-creds-x509") {
            // A unix socket has no host name to check the certificate against.
            opts.push_str(",file.tls-hostname=localhost");
        }
    }
    args.extend(
        [
            "--image-opts",
            "-c",
            "write -P 0x5c 64k 64k",
            "-c",
            "read -P 0x5c 64k 64k",
        ]
        .map(String::from),
    );
    args.push(opts);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args)
}

fn write_psk(dir: &Path, sub: &str, key: &str) -> String {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("keys.psk"), format!("qemu:{key}\n")).unwrap();
    d.to_string_lossy().into_owned()
}

#[test]
fn psk_client_is_served_and_plain_or_wrong_key_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = "9a5f0e1b2c3d4e5f60718293a4b5c6d7";
    let server = write_psk(dir.path(), "server", key);
    let _d = serve(
        dir.path(),
        &format!("tls-creds-psk,id=tls0,endpoint=server,dir={server}"),
        None,
    );
    let good = write_psk(dir.path(), "client", key);
    ok(qemu_io(
        dir.path(),
        Some(&format!(
            "tls-creds-psk,id=tlsc,endpoint=client,dir={good},username=qemu"
        )),
    ));
    // qemu-img too: `info` through the same credentials.
    let sock = p(dir.path(), "nbd.sock");
    let info = ok(run(
        "qemu-img",
        &[
            "info",
            "--object",
            &format!("tls-creds-psk,id=tlsc,endpoint=client,dir={good},username=qemu"),
            "--image-opts",
            &format!("driver=nbd,path={sock},export=disk,tls-creds=tlsc"),
        ],
    ));
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("virtual size: 4 MiB"),
        "{}",
        String::from_utf8_lossy(&info.stdout)
    );
    let plain = qemu_io(dir.path(), None);
    assert!(!plain.status.success(), "a client without TLS is refused");
    let bad = write_psk(dir.path(), "bad", "00112233445566778899aabbccddeeff");
    let wrong = qemu_io(
        dir.path(),
        Some(&format!(
            "tls-creds-psk,id=tlsc,endpoint=client,dir={bad},username=qemu"
        )),
    );
    assert!(
        !wrong.status.success(),
        "a client with the wrong key is refused"
    );
}

/// A CA, and a certificate for `name` signed by it, in `dir` as QEMU names the files.
fn x509_dir(base: &Path, sub: &str, role: &str, cn: &str) -> String {
    let d = base.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    let ca_key = p(base, "ca-key.pem");
    let ca = p(base, "ca-cert.pem");
    if !Path::new(&ca).exists() {
        ok(run(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &ca_key,
                "-out",
                &ca,
                "-days",
                "2",
                "-subj",
                "/CN=blockd test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ));
    }
    std::fs::copy(&ca, d.join("ca-cert.pem")).unwrap();
    let key = p(&d, &format!("{role}-key.pem"));
    let csr = p(&d, "req.csr");
    let cert = p(&d, &format!("{role}-cert.pem"));
    ok(run(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ],
    ));
    let ext = p(&d, "ext.cnf");
    let usage = if role == "server" {
        "serverAuth"
    } else {
        "clientAuth"
    };
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\nsubjectAltName=DNS:localhost\n"
        ),
    )
    .unwrap();
    ok(run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    ));
    d.to_string_lossy().into_owned()
}

#[test]
fn x509_client_is_served_and_a_plain_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = x509_dir(dir.path(), "server", "server", "localhost");
    let client = x509_dir(dir.path(), "client", "client", "qemu-client");
    let _d = serve(
        dir.path(),
        &format!("tls-creds-x509,id=tls0,endpoint=server,dir={server},verify-peer=on"),
        None,
    );
    ok(qemu_io(
        dir.path(),
        Some(&format!(
            "tls-creds-x509,id=tlsc,endpoint=client,dir={client}"
        )),
    ));
    assert!(
        !qemu_io(dir.path(), None).status.success(),
        "a client without TLS is refused"
    );
}

/// `tls-authz`: the client certificate's name must be allowed.
#[test]
fn authz_refuses_a_certificate_it_does_not_list() {
    for (identity, allowed) in [("CN=qemu-client", true), ("CN=someone-else", false)] {
        let dir = tempfile::tempdir().unwrap();
        let server = x509_dir(dir.path(), "server", "server", "localhost");
        let client = x509_dir(dir.path(), "client", "client", "qemu-client");
        let _d = serve(
            dir.path(),
            &format!("tls-creds-x509,id=tls0,endpoint=server,dir={server},verify-peer=on"),
            Some(&format!("authz-simple,id=auth0,identity={identity}")),
        );
        let out = qemu_io(
            dir.path(),
            Some(&format!(
                "tls-creds-x509,id=tlsc,endpoint=client,dir={client}"
            )),
        );
        assert_eq!(
            out.status.success(),
            allowed,
            "identity {identity}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
