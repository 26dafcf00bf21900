//! Black-box tests of blockd's command line: QSD's own option syntax, pid
//! files, signals, `--daemonize`, `-h`/`-V`, the no-option default monitor, and
//! a differential table of bad command lines run against both blockd and
//! qemu-storage-daemon.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use testkit::proc::{process_alive, run_to_exit, send_signal, wait_gone, ChildGuard, PidGuard};
use testkit::{find_tool, qsd_path, start_qsd, Daemon, Qmp, Session};

/// Generous limit for anything that should happen promptly.
const LIMIT: Duration = Duration::from_secs(20);

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("blockd-cmdline-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// Spawns `binary` with `args` in `dir`, stdout and stderr going to files there.
fn spawn(binary: &Path, args: &[&str], dir: &Path) -> ChildGuard {
    let child = Command::new(binary)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("out.txt")).unwrap())
        .stderr(File::create(dir.join("err.txt")).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    ChildGuard::new(child)
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Waits until `cond` holds, panicking with `what` after [`LIMIT`].
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pid written in a pid file, once it holds a complete line.
fn wait_pidfile(path: &Path) -> u32 {
    let mut pid = 0;
    wait_for(&format!("pid file {}", path.display()), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        match text.strip_suffix('\n').map(str::parse) {
            Some(Ok(p)) => {
                pid = p;
                true
            }
            _ => false,
        }
    });
    pid
}

fn connect(socket: &Path) -> Qmp {
    wait_for(&format!("socket {}", socket.display()), || socket.exists());
    let mut qmp = Qmp::connect(socket).expect("cannot connect to the monitor");
    qmp.negotiate().expect("negotiation failed");
    qmp
}

fn exit_code(child: &mut ChildGuard) -> i32 {
    let status = child
        .wait_timeout(LIMIT)
        .unwrap()
        .expect("the daemon did not exit");
    status.code().expect("the daemon was killed by a signal")
}

fn daemon_exit_code(daemon: &mut Daemon) -> i32 {
    let status = daemon.wait_exit(LIMIT).expect("the daemon did not exit");
    status.code().expect("the daemon was killed by a signal")
}

fn make_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let file = File::create(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    path
}

#[test]
fn qsd_command_line_starts_nodes_monitor_and_pidfile() {
    let dir = tempdir();
    let image = make_image(dir.path(), "disk.img");
    let socket = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("blockd.pid");
    let chardev = format!("socket,id=m0,path={},server=on,wait=off", path_str(&socket));
    let file = format!("driver=file,node-name=f0,filename={}", path_str(&image));
    let mut child = spawn(
        &blockd(),
        &[
            "--chardev",
            &chardev,
            "--monitor",
            "chardev=m0",
            "--blockdev",
            &file,
            "--blockdev",
            r#"{"driver":"raw","node-name":"r0","file":"f0"}"#,
            "--pidfile",
            path_str(&pidfile),
        ],
        dir.path(),
    );

    let pid = wait_pidfile(&pidfile);
    assert_eq!(pid, child.id(), "the pid file names the daemon");

    let mut qmp = connect(&socket);
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let mut names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["f0", "r0"]);
    let r0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "r0")
        .unwrap();
    assert_eq!(r0["drv"], "raw");
    assert_eq!(r0["file"], path_str(&image));

    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(
        exit_code(&mut child),
        0,
        "stderr: {}",
        read(dir.path(), "err.txt")
    );
    assert!(!pidfile.exists(), "quit removes the pid file");
}

/// Starts `binary` on QSD's typical command line for `image` and returns
/// what `qemu-img info` (without `-U`) makes of the image meanwhile.
fn qemu_img_info_while_served(binary: &Path, dir: &Path, image: &Path) -> (Option<i32>, String) {
    let qemu_img = find_tool("qemu-img", "qemu-utils");
    let file = format!("driver=file,node-name=f0,filename={}", path_str(image));
    // The monitor `m0` on `dir/qmp.sock` comes first, as it always has.
    let args = [
        "--blockdev",
        &file,
        "--blockdev",
        r#"{"driver":"raw","node-name":"r0","file":"f0"}"#,
    ];
    let (mut child, mut qmp) = if binary == qsd_path() {
        // Started again if its monitor does not answer (see `start_qsd`).
        start_qsd(Some(dir), &args, Session::Negotiated).unwrap()
    } else {
        let mut daemon = Daemon::start_in(binary, dir, &args).unwrap();
        let qmp = daemon.qmp().expect("negotiation failed");
        (daemon, qmp)
    };
    let info = run_to_exit(
        &qemu_img,
        &["info", "-f", "raw", "disk.img"],
        dir,
        &[],
        LIMIT,
    )
    .unwrap();
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(daemon_exit_code(&mut child), 0);
    (info.code(), info.stderr)
}

/// QSD takes image locks only for the permissions a node's users need; a
/// node nobody uses holds none, so `qemu-img info` succeeds. blockd agrees.
#[test]
fn unused_command_line_image_is_open_to_qemu_img_as_with_qsd() {
    let dir = tempdir();
    let image = make_image(dir.path(), "disk.img");
    let qsd = qemu_img_info_while_served(&qsd_path(), dir.path(), &image);
    let ours = qemu_img_info_while_served(&blockd(), dir.path(), &image);
    assert_eq!(ours, qsd);
}

#[test]
fn quit_exits_zero_and_removes_pidfile_and_socket() {
    let dir = tempdir();
    let socket = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("d.pid");
    let chardev = format!("socket,id=m0,path={},server=on,wait=off", path_str(&socket));
    let mut child = spawn(
        &blockd(),
        &[
            "--chardev",
            &chardev,
            "--monitor",
            "chardev=m0",
            "--pidfile",
            path_str(&pidfile),
        ],
        dir.path(),
    );
    wait_pidfile(&pidfile);
    let mut qmp = connect(&socket);
    assert_eq!(qmp.execute("quit", Value::Null).unwrap(), json!({}));
    assert_eq!(exit_code(&mut child), 0);
    assert!(!pidfile.exists());
    assert!(!socket.exists());
}

#[test]
fn pidfile_is_locked_against_a_second_daemon() {
    let dir = tempdir();
    let pidfile = dir.path().join("d.pid");
    let mut first = Daemon::start(&blockd(), &["--pidfile", path_str(&pidfile)]).unwrap();
    let pid = wait_pidfile(&pidfile);
    assert_eq!(Some(pid), first.pid());

    let second = run_to_exit(
        &blockd(),
        &[
            "--blockdev",
            "null-co,node-name=n",
            "--pidfile",
            path_str(&pidfile),
        ],
        dir.path(),
        &[],
        LIMIT,
    )
    .unwrap();
    assert_eq!(second.code(), Some(1), "{second:?}");
    assert_eq!(
        second.stderr,
        "blockd: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n"
    );
    // The running daemon's pid file is untouched.
    assert_eq!(wait_pidfile(&pidfile), pid);
    assert!(
        first.try_wait().unwrap().is_none(),
        "first daemon still runs"
    );
}

/// Starts blockd with a monitor and a pid file, then sends `signal`.
fn signal_shuts_down_cleanly(signal: &str) {
    let dir = tempdir();
    let socket = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("d.pid");
    let chardev = format!("socket,id=m0,path={},server=on,wait=off", path_str(&socket));
    let mut child = spawn(
        &blockd(),
        &[
            "--chardev",
            &chardev,
            "--monitor",
            "chardev=m0",
            "--blockdev",
            "null-co,node-name=n0",
            "--pidfile",
            path_str(&pidfile),
        ],
        dir.path(),
    );
    wait_pidfile(&pidfile);
    // A negotiated client proves the daemon is serving before the signal.
    let mut qmp = connect(&socket);
    qmp.execute("query-version", Value::Null).unwrap();

    send_signal(child.id(), signal).unwrap();
    assert_eq!(
        exit_code(&mut child),
        0,
        "stderr: {}",
        read(dir.path(), "err.txt")
    );
    assert!(!pidfile.exists(), "SIG{signal} removes the pid file");
    assert!(!socket.exists(), "SIG{signal} removes the socket file");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    signal_shuts_down_cleanly("TERM");
}

#[test]
fn sigint_shuts_down_cleanly() {
    signal_shuts_down_cleanly("INT");
}

#[test]
fn daemonize_returns_once_ready_and_daemon_keeps_running() {
    let dir = tempdir();
    let socket = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("d.pid");
    let chardev = format!("socket,id=m0,path={},server=on,wait=off", path_str(&socket));
    let launcher = run_to_exit(
        &blockd(),
        &[
            "--daemonize",
            "--chardev",
            &chardev,
            "--monitor",
            "chardev=m0",
            "--blockdev",
            "null-co,node-name=n0",
            "--pidfile",
            path_str(&pidfile),
        ],
        dir.path(),
        &[],
        LIMIT,
    )
    .unwrap();
    // Read the pid before asserting, so that the daemon is killed on failure.
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    let _guard = PidGuard(pid);
    assert_eq!(launcher.code(), Some(0), "{launcher:?}");
    assert!(
        pid != 0,
        "the pid file is written before the launcher exits"
    );
    assert!(socket.exists(), "the socket exists when the launcher exits");
    assert!(process_alive(pid), "the daemon keeps running");

    let mut qmp = Qmp::connect(&socket).unwrap();
    qmp.negotiate().unwrap();
    let nodes = qmp.execute("query-named-block-nodes", Value::Null).unwrap();
    assert_eq!(nodes[0]["node-name"], "n0");
    qmp.execute("quit", Value::Null).unwrap();
    assert!(wait_gone(pid, LIMIT), "quit ends the daemonized process");
    assert!(!pidfile.exists());
}

#[test]
fn daemonize_with_a_failing_option_makes_the_launcher_exit_1() {
    let dir = tempdir();
    let pidfile = dir.path().join("d.pid");
    let launcher = run_to_exit(
        &blockd(),
        &[
            "--daemonize",
            "--blockdev",
            "nosuch,node-name=n0",
            "--pidfile",
            path_str(&pidfile),
        ],
        dir.path(),
        &[],
        LIMIT,
    )
    .unwrap();
    assert_eq!(launcher.code(), Some(1), "{launcher:?}");
    assert!(
        launcher.stderr.contains(
            "--blockdev nosuch,node-name=n0: Parameter 'driver' does not accept value 'nosuch'"
        ),
        "{launcher:?}"
    );
    assert!(!pidfile.exists());
}

#[test]
fn help_exits_zero_and_lists_the_options() {
    let dir = tempdir();
    for flag in ["-h", "--help"] {
        let out = run_to_exit(&blockd(), &[flag], dir.path(), &[], LIMIT).unwrap();
        assert_eq!(out.code(), Some(0), "{flag}: {out:?}");
        for option in [
            "--blockdev",
            "--chardev",
            "--monitor",
            "--pidfile",
            "--daemonize",
        ] {
            assert!(
                out.stdout.contains(option),
                "{flag} lacks {option}: {out:?}"
            );
        }
        assert_eq!(out.stderr, "");
    }
}

#[test]
fn version_exits_zero_and_names_the_qsd_version() {
    let dir = tempdir();
    for flag in ["-V", "--version"] {
        let out = run_to_exit(&blockd(), &[flag], dir.path(), &[], LIMIT).unwrap();
        assert_eq!(out.code(), Some(0), "{flag}: {out:?}");
        assert!(out.stdout.contains(env!("CARGO_PKG_VERSION")), "{out:?}");
        assert!(out.stdout.contains("10.0.2"), "{out:?}");
        assert_eq!(out.stderr, "");
    }
}

#[test]
fn no_option_start_serves_qmp_on_the_runtime_dir_socket() {
    let dir = tempdir();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let child = Command::new(blockd())
        .current_dir(dir.path())
        .env("XDG_RUNTIME_DIR", &runtime)
        .stdin(Stdio::null())
        .stdout(File::create(dir.path().join("out.txt")).unwrap())
        .stderr(File::create(dir.path().join("err.txt")).unwrap())
        .spawn()
        .unwrap();
    let mut child = ChildGuard::new(child);
    wait_for("the listening message", || {
        read(dir.path(), "out.txt").ends_with('\n')
    });
    let socket = runtime.join("blockd/qmp.sock");
    assert_eq!(
        read(dir.path(), "out.txt"),
        format!("blockd: QMP monitor listening on {}\n", socket.display())
    );
    let mut qmp = Qmp::connect(&socket).unwrap();
    assert_eq!(qmp.greeting()["QMP"]["capabilities"], json!(["oob"]));
    qmp.negotiate().unwrap();
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(exit_code(&mut child), 0);
}

/// Runs `args` in a fresh directory and returns (exit code, stderr).
fn run_in_fresh_dir(binary: &Path, args: &[&str]) -> (Option<i32>, String) {
    let dir = tempdir();
    make_image(dir.path(), "disk.img");
    let out = run_to_exit(binary, args, dir.path(), &[], LIMIT)
        .unwrap_or_else(|e| panic!("{} {args:?}: {e:#}", binary.display()));
    (out.code(), out.stderr)
}

/// Bad command lines: QSD and blockd must both exit 1 with the same message.
const BAD_COMMAND_LINES: &[&[&str]] = &[
    &["--bogus"],
    &["--bogus=1"],
    &["-x"],
    &["--blockdev"],
    &["--pidfile"],
    &["--daemonize=1"],
    &["-T"],
    &["foo"],
    &["--blockdev", "null-co,node-name=n0", "stray"],
    &["--blockdev", "x..y=1"],
    &["--blockdev", "null-co,node-name=n,size=x"],
    &["--blockdev", "null-co,node-name=n,read-only=maybe"],
    &["--blockdev", "null-co,node-name=n,bogus=1"],
    &["--blockdev", "help"],
    &["--blockdev", r#"{"driver":"#],
    &["--blockdev", r#"{"driver":"null-co","node-name":"n",}"#],
    &[
        "--blockdev",
        r#"{"driver":"null-co","node-name":"n","size":"1"}"#,
    ],
    &["--blockdev", "nosuch,node-name=n"],
    &["--blockdev", "node-name=n"],
    &[
        "--blockdev",
        "null-co,node-name=n",
        "--blockdev",
        "null-co,node-name=n",
    ],
    &["--blockdev", "file,node-name=f,filename=missing.img"],
    &["--blockdev", "raw,node-name=r,file=nosuchnode"],
    &["--blockdev", "null-co,node-name=1bad"],
    &[
        "--blockdev",
        "null-co,node-name=n0",
        "--export",
        "nbd,id=e0,node-name=n0",
    ],
    &["--export", "nbd,id=e0,node-name=n0"],
    &["--export", "nbd,id=e0"],
    &["--nbd-server", "addr.type=unix"],
    &[
        "--nbd-server",
        "addr.type=unix,addr.path=no/such/dir/nbd.sock",
    ],
    &[
        "--nbd-server",
        "addr.type=unix,addr.path=nbd.sock",
        "--nbd-server",
        "addr.type=unix,addr.path=nbd2.sock",
    ],
    &[
        "--blockdev",
        "null-co,node-name=n0",
        "--nbd-server",
        "addr.type=unix,addr.path=nbd.sock",
        "--export",
        "nbd,id=e0,node-name=n0",
        "--export",
        "nbd,id=e1,node-name=n0",
    ],
    &["--monitor", "m0"],
    &["--monitor", "chardev=m0,mode=readline"],
    &[
        "--chardev",
        "socket,id=m0,path=qmp.sock,server=on,wait=off",
        "--monitor",
        "chardev=m0,mode=readline",
    ],
    &["--monitor", "chardev=m0,pretty=maybe"],
    &["--monitor", "id=x"],
    &[
        "--chardev",
        "socket,id=m0,path=qmp.sock,server=on,wait=off",
        "--monitor",
        "m0",
        "--monitor",
        "m0",
    ],
    &["--chardev", "socket,path=qmp.sock,server=on,wait=off"],
    &["--chardev", "socket,id=m0"],
    &["--chardev", "bogus,id=m0"],
    &[
        "--chardev",
        "socket,id=m0,path=qmp.sock,server=on,wait=off,foo=1",
    ],
    &[
        "--chardev",
        "socket,id=m0,path=nosuchdir/qmp.sock,server=on,wait=off",
    ],
    &["--chardev", "socket,id=m0,path=nosuch.sock,server=off"],
    &[
        "--chardev",
        "socket,id=m0,path=a.sock,server=on,wait=off",
        "--chardev",
        "socket,id=m0,path=b.sock,server=on,wait=off",
    ],
    &[
        "--chardev",
        "socket,id=m0,path=qmp.sock,server=on,wait=off",
        "--monitor",
        "m0",
        "--blockdev",
        "nosuch",
    ],
    &["--object", "nosuch,id=x"],
    &["--object", "id=x"],
    &["--object", "secret,data=x"],
    &["--object", "secret,id=1bad,data=x"],
    &["--object", r#"{"qom-type":"secret","id":"a b","data":"x"}"#],
    &[
        "--object",
        "secret,id=s0,data=x",
        "--object",
        "secret,id=s0,data=y",
    ],
    &["--object", "secret,id=s0"],
    &["--object", "secret,id=s0,data=x,file=disk.img"],
    &["--object", "secret,id=s0,file=nosuch"],
    &["--object", "secret,id=s0,data=!!,format=base64"],
    &["--object", "secret,id=s0,data=x,format=b64"],
    &["--object", "secret,id=s0,data=x,keyid=nosuch"],
    &["--object", "secret,id=s0,data=x,keyid=s0"],
    &["--object", "tls-creds-x509,id=t0"],
    &["--object", "tls-creds-x509,id=t0,dir=nosuch"],
    &["--object", "tls-creds-x509,id=t0,dir=.,endpoint=server"],
    &["--object", "tls-creds-x509,id=t0,dir=.,endpoint=bogus"],
    &["--object", "tls-creds-x509,id=t0,dir=.,verify-peer=maybe"],
    &["--object", "tls-creds-x509,id=t0,dir=.,bogus=1"],
    &[
        "--object",
        r#"{"qom-type":"tls-creds-x509","id":"t0","dir":".","verify-peer":"yes"}"#,
    ],
    &["--object", "tls-creds-psk,id=p0,endpoint=server"],
    &["--object", "tls-creds-psk,id=p0,dir=.,endpoint=server"],
    &[
        "--object",
        "tls-creds-psk,id=p0,dir=.,endpoint=server,username=u",
    ],
    &["--object", "authz-simple,id=a0"],
    &["--object", "authz-list,id=a0,rules.0.match=x"],
    &["--object", "authz-list,id=a0,policy=maybe"],
    &["--object", "authz-listfile,id=a0"],
    &["--object", "authz-listfile,id=a0,filename=nosuch"],
];

/// Replaces QSD's program-name prefix by blockd's: `qemu-storage-daemon: `
/// for its own messages, and `argv[0]: ` (the path it was started by) for
/// getopt's.
fn qsd_name_to_blockd(stderr: &str) -> String {
    let argv0 = format!("{}: ", qsd_path().display());
    stderr
        .lines()
        .map(|line| {
            let rest = line
                .strip_prefix(&argv0)
                .or_else(|| line.strip_prefix("qemu-storage-daemon: "));
            match rest {
                Some(rest) => format!("blockd: {rest}\n"),
                None => format!("{line}\n"),
            }
        })
        .collect()
}

#[test]
fn bad_command_lines_fail_exactly_like_qsd() {
    let qsd = qsd_path();
    let mut differences = Vec::new();
    for args in BAD_COMMAND_LINES {
        let (qsd_code, qsd_err) = run_in_fresh_dir(&qsd, args);
        assert_eq!(
            qsd_code,
            Some(1),
            "QSD {args:?} (the table is wrong): {qsd_err}"
        );
        let (code, err) = run_in_fresh_dir(&blockd(), args);
        let expected = qsd_name_to_blockd(&qsd_err);
        if code != Some(1) || err != expected {
            differences.push(format!(
                "{args:?}\n  qsd:    exit {qsd_code:?} {expected:?}\n  blockd: exit {code:?} {err:?}"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "blockd differs from QSD:\n{}",
        differences.join("\n")
    );
}

#[test]
fn pidfile_locked_by_a_running_qsd_fails_like_qsd() {
    let dir = tempdir();
    let pidfile = dir.path().join("qsd.pid");
    // Started again if its monitor does not answer (see `start_qsd`).
    let _qsd = start_qsd(
        None,
        &["--pidfile", path_str(&pidfile)],
        Session::Negotiated,
    )
    .unwrap();
    wait_pidfile(&pidfile);
    let args = [
        "--blockdev",
        "null-co,node-name=n",
        "--pidfile",
        path_str(&pidfile),
    ];
    let (qsd_code, qsd_err) = run_in_fresh_dir(&qsd_path(), &args);
    let (code, err) = run_in_fresh_dir(&blockd(), &args);
    assert_eq!(qsd_code, Some(1), "{qsd_err}");
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err, qsd_name_to_blockd(&qsd_err));
}

#[test]
fn object_of_a_type_blockd_lacks_is_refused_by_the_schema() {
    let (code, err) = run_in_fresh_dir(&blockd(), &["--object", "iothread,id=t0"]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err,
        "blockd: --object iothread,id=t0: Parameter 'qom-type' does not accept value 'iothread'\n"
    );
}

#[test]
fn object_help_lists_the_types_blockd_creates() {
    let dir = tempdir();
    let out = run_to_exit(&blockd(), &["--object", "help"], dir.path(), &[], LIMIT).unwrap();
    assert_eq!(out.code(), Some(0));
    assert_eq!(
        out.stdout,
        "List of user creatable objects:\n  authz-list\n  authz-simple\n  secret\n  tls-creds-psk\n  tls-creds-x509\n"
    );
}

#[test]
fn object_type_help_prints_what_qsd_prints() {
    for ty in [
        "tls-creds-x509",
        "tls-creds-psk",
        "secret",
        "authz-simple",
        "authz-list",
    ] {
        let dir = tempdir();
        let arg = format!("{ty},help");
        let ours = run_to_exit(&blockd(), &["--object", &arg], dir.path(), &[], LIMIT).unwrap();
        let qsd = run_to_exit(&qsd_path(), &["--object", &arg], dir.path(), &[], LIMIT).unwrap();
        assert_eq!(
            (ours.code(), &ours.stdout),
            (qsd.code(), &qsd.stdout),
            "{ty}"
        );
    }
}

/// `--nbd-server` and `--export` start serving before the monitor is up: a real client
/// reads what the command line exported.
#[test]
fn nbd_server_and_export_from_the_command_line_serve_clients() {
    let dir = tempdir();
    let image = make_image(dir.path(), "disk.img");
    let sock = dir.path().join("nbd.sock");
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=f0,filename={}", image.display()),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", sock.display()),
        "--export".to_string(),
        "type=nbd,id=e0,node-name=f0,name=disk,writable=on".to_string(),
    ];
    let mut daemon = Daemon::start_in(&blockd(), dir.path(), &args).unwrap();
    // The monitor's socket can appear before the NBD server's.
    wait_for("the NBD socket", || sock.exists());
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x42 0 64k",
            "-c",
            "read -P 0x42 0 64k",
            &uri,
        ])
        .output()
        .expect("qemu-io is needed (install qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut qmp = daemon.qmp().unwrap();
    let exports = qmp.execute("query-block-exports", json!({})).unwrap();
    assert_eq!(
        exports,
        json!([{"node-name": "f0", "shutting-down": false, "type": "nbd", "id": "e0"}])
    );
    qmp.execute("quit", json!({})).unwrap();
    assert_eq!(daemon_exit_code(&mut daemon), 0);
}

#[test]
fn unusable_runtime_dir_fails_the_default_start_with_a_message() {
    // XDG_RUNTIME_DIR decides where the default monitor goes; an unusable
    // one must not crash the daemon (exit 1 with a message).
    let dir = tempdir();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let out = run_to_exit::<&str>(
        &blockd(),
        &[],
        dir.path(),
        &[("XDG_RUNTIME_DIR", OsStr::new(path_str(&blocker)))],
        LIMIT,
    )
    .unwrap();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .starts_with("blockd: cannot prepare the default monitor: "),
        "{out:?}"
    );
}
