//! Black-box tests of blockd's QMP monitors: client-mode and TCP chardevs,
//! several monitors at once with event fan-out, and `pretty=on` output
//! compared byte for byte with qemu-storage-daemon's.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use testkit::proc::{ChildGuard, RawConn};
use testkit::{probe_monitor, qsd_path, start_qsd_checked, Daemon, Qmp, Session};

/// Generous limit for anything that should happen promptly.
const LIMIT: Duration = Duration::from_secs(20);

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("blockd-monitor-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn spawn_blockd(args: &[&str], dir: &Path) -> ChildGuard {
    let child = Command::new(blockd())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("err.txt")).unwrap())
        .spawn()
        .expect("cannot start blockd");
    ChildGuard::new(child)
}

fn greeting_is_qsd_like(greeting: &Value) {
    assert_eq!(
        greeting["QMP"]["version"]["qemu"],
        json!({"micro": 2, "minor": 0, "major": 10})
    );
    assert_eq!(greeting["QMP"]["capabilities"], json!(["oob"]));
}

#[test]
fn client_mode_chardev_connects_and_serves_qmp() {
    let dir = tempdir();
    let socket = dir.path().join("client.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let chardev = format!("socket,id=m0,path={},server=off", path_str(&socket));
    let mut child = spawn_blockd(
        &["--chardev", &chardev, "--monitor", "chardev=m0"],
        dir.path(),
    );

    let deadline = Instant::now() + LIMIT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    child.wait_timeout(Duration::ZERO).unwrap().is_none(),
                    "blockd exited: {}",
                    std::fs::read_to_string(dir.path().join("err.txt")).unwrap_or_default()
                );
                assert!(Instant::now() < deadline, "blockd did not connect");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    let mut qmp = Qmp::from_stream(stream).unwrap();
    greeting_is_qsd_like(qmp.greeting());
    qmp.negotiate().unwrap();
    let version = qmp.execute("query-version", Value::Null).unwrap();
    assert_eq!(version["qemu"]["major"], 10);
    qmp.execute("quit", Value::Null).unwrap();
    let status = child.wait_timeout(LIMIT).unwrap().expect("blockd exits");
    assert_eq!(status.code(), Some(0));
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn connect_tcp(port: u16, child: &mut ChildGuard) -> TcpStream {
    let deadline = Instant::now() + LIMIT;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => return stream,
            Err(e) => {
                assert!(
                    child.wait_timeout(Duration::ZERO).unwrap().is_none(),
                    "blockd exited"
                );
                assert!(Instant::now() < deadline, "cannot connect: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[test]
fn tcp_server_chardev_serves_qmp() {
    let dir = tempdir();
    let port = free_port();
    let chardev = format!("socket,id=m0,host=127.0.0.1,port={port},server=on,wait=off");
    let mut child = spawn_blockd(
        &["--chardev", &chardev, "--monitor", "chardev=m0"],
        dir.path(),
    );
    let stream = connect_tcp(port, &mut child);
    let mut conn = RawConn::new(stream, LIMIT);
    greeting_is_qsd_like(&conn.read_json().unwrap());
    conn.send(br#"{"execute":"qmp_capabilities"}"#).unwrap();
    assert_eq!(conn.read_json().unwrap(), json!({"return": {}}));
    conn.send(br#"{"execute":"query-version","id":7}"#).unwrap();
    let reply = conn.read_json().unwrap();
    assert_eq!(reply["id"], 7);
    assert_eq!(reply["return"]["qemu"]["minor"], 0);
    conn.send(br#"{"execute":"quit"}"#).unwrap();
    assert_eq!(conn.read_json().unwrap(), json!({"return": {}}));
    let status = child.wait_timeout(LIMIT).unwrap().expect("blockd exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn tcp_client_chardev_connects_and_serves_qmp() {
    let dir = tempdir();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let chardev = format!("socket,id=m0,host=127.0.0.1,port={port},server=off");
    let mut child = spawn_blockd(
        &["--chardev", &chardev, "--monitor", "chardev=m0"],
        dir.path(),
    );
    let deadline = Instant::now() + LIMIT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    child.wait_timeout(Duration::ZERO).unwrap().is_none(),
                    "blockd exited"
                );
                assert!(Instant::now() < deadline, "blockd did not connect");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    let mut conn = RawConn::new(stream, LIMIT);
    greeting_is_qsd_like(&conn.read_json().unwrap());
    conn.send(br#"{"execute":"qmp_capabilities"}"#).unwrap();
    assert_eq!(conn.read_json().unwrap(), json!({"return": {}}));
    conn.send(br#"{"execute":"query-jobs"}"#).unwrap();
    assert_eq!(conn.read_json().unwrap(), json!({"return": []}));
}

/// Starts blockd with its `m0` monitor (`qmp.sock`) and two more, `m1`
/// (`one.sock`) and `m2` (`two.sock`).
fn three_monitors(dir: &Path) -> Daemon {
    let one = format!(
        "socket,id=m1,path={},server=on,wait=off",
        path_str(&dir.join("one.sock"))
    );
    let two = format!(
        "socket,id=m2,path={},server=on,wait=off",
        path_str(&dir.join("two.sock"))
    );
    Daemon::start_in(
        &blockd(),
        dir,
        &[
            "--chardev",
            &one,
            "--monitor",
            "chardev=m1",
            "--chardev",
            &two,
            "--monitor",
            "chardev=m2",
        ],
    )
    .unwrap()
}

fn connect_when_ready(path: &Path) -> Qmp {
    let deadline = Instant::now() + LIMIT;
    loop {
        match Qmp::connect(path) {
            Ok(qmp) => return qmp,
            Err(e) => {
                assert!(Instant::now() < deadline, "{e:#}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[test]
fn several_monitors_negotiate_independently() {
    let dir = tempdir();
    let mut daemon = three_monitors(dir.path());
    let mut zero = daemon.connect().unwrap();
    let mut one = connect_when_ready(&dir.path().join("one.sock"));
    let mut two = connect_when_ready(&dir.path().join("two.sock"));

    one.negotiate().unwrap();
    // Negotiating one monitor leaves the others in negotiation mode.
    let err = zero.execute("query-version", Value::Null).unwrap_err();
    assert_eq!(err.class, "CommandNotFound");
    assert_eq!(
        err.desc,
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    zero.negotiate().unwrap();
    two.negotiate().unwrap();
    for qmp in [&mut zero, &mut one, &mut two] {
        assert_eq!(qmp.execute("query-jobs", Value::Null).unwrap(), json!([]));
    }
    // A second qmp_capabilities is refused on that monitor only.
    let err = one.execute("qmp_capabilities", json!({})).unwrap_err();
    assert_eq!(err.class, "CommandNotFound");
    assert_eq!(
        err.desc,
        "Capabilities negotiation is already complete, command ignored"
    );
}

/// Statuses of the `JOB_STATUS_CHANGE` events of job `id` up to and
/// including `concluded` (blockdev-create jobs wait for job-dismiss).
fn job_statuses(qmp: &mut Qmp, id: &str) -> Vec<String> {
    let mut statuses = Vec::new();
    loop {
        let event = qmp.wait_event("JOB_STATUS_CHANGE", LIMIT).unwrap();
        assert_eq!(event["data"]["id"], id);
        let status = event["data"]["status"].as_str().unwrap().to_string();
        statuses.push(status.clone());
        if status == "concluded" {
            return statuses;
        }
    }
}

#[test]
fn job_events_reach_every_negotiated_monitor_and_no_negotiating_one() {
    let dir = tempdir();
    let mut daemon = three_monitors(dir.path());
    let mut zero = daemon.qmp().unwrap();
    let mut one = connect_when_ready(&dir.path().join("one.sock"));
    one.negotiate().unwrap();
    // m2 stays in negotiation mode throughout the job.
    let mut two = connect_when_ready(&dir.path().join("two.sock"));

    let image = dir.path().join("new.img");
    zero.execute(
        "blockdev-create",
        json!({
            "job-id": "j0",
            "options": {"driver": "file", "filename": path_str(&image), "size": 1048576}
        }),
    )
    .unwrap();
    let seen_zero = job_statuses(&mut zero, "j0");
    let seen_one = job_statuses(&mut one, "j0");
    assert_eq!(seen_zero.first().map(String::as_str), Some("created"));
    assert_eq!(seen_zero, seen_one, "both monitors see the same events");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1048576);

    // Every event was written before the job vanished; the negotiating
    // monitor's next message is the reply to its request, not an event.
    two.send(&json!({"execute": "query-jobs"})).unwrap();
    let reply = two.read_message().unwrap();
    assert_eq!(reply["error"]["class"], "CommandNotFound", "{reply}");
    // Nor does it get the old events once it negotiates.
    two.send(&json!({"execute": "qmp_capabilities"})).unwrap();
    assert_eq!(two.read_message().unwrap(), json!({"return": {}}));
    two.send(&json!({"execute": "query-jobs"})).unwrap();
    let reply = two.read_message().unwrap();
    assert_eq!(reply["return"][0]["id"], "j0", "{reply}");
    assert_eq!(reply["return"][0]["status"], "concluded", "{reply}");
}

/// Replaces the value of every `"package": "..."` line (the vendor string
/// differs between QSD builds and blockd).
fn mask_package(bytes: &[u8]) -> String {
    let text = String::from_utf8(bytes.to_vec()).expect("QMP output is UTF-8");
    text.split_inclusive('\n')
        .map(|line| match line.find("\"package\": \"") {
            Some(at) => {
                let comma = if line.trim_end().ends_with(',') {
                    ","
                } else {
                    ""
                };
                format!("{}\"package\": \"<masked>\"{comma}\r\n", &line[..at])
            }
            None => line.to_string(),
        })
        .collect()
}

/// Requests whose pretty replies are compared; `"$DIR"` is the directory.
const PRETTY_REQUESTS: &[&str] = &[
    r#"{"execute":"qmp_capabilities"}"#,
    r#"{"execute":"query-jobs"}"#,
    r#"{"execute":"query-block-jobs"}"#,
    r#"{"execute":"query-version"}"#,
    r#"{"execute":"no-such-command"}"#,
    r#"{"execute":"query-version","id":{"a":[1,"x",null,true]}}"#,
    r#"{"execute":"query-named-block-nodes","arguments":{"flat":"x"}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":4096}}"#,
    r#"{"execute":"blockdev-del","arguments":{"node-name":"nosuch"}}"#,
    r#"{"execute":"job-dismiss","arguments":{"id":"nosuch"}}"#,
    r#"{"execute":"block_resize","arguments":{"node-name":"n0","size":-1}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"null-co"}}"#,
    r#"{"execute":"query-version","arguments":{"bogus":1}}"#,
    r#"{"execute":"query-version","bogus":1}"#,
    r#"["not", "an", "object"]"#,
    r#"{"execute":"quit"}"#,
];

/// The greeting and the pretty replies to [`PRETTY_REQUESTS`], packages masked.
fn pretty_transcript(binary: &Path) -> Vec<String> {
    let dir = tempdir();
    let socket = dir.path().join("pretty.sock");
    let chardev = format!("socket,id=p0,path={},server=on,wait=off", path_str(&socket));
    let args = ["--chardev", &chardev, "--monitor", "chardev=p0,pretty=on"];
    // The default monitor proves start-up is done; the pretty one listens by then.
    let _daemon = if binary == qsd_path() {
        // Started again until both monitors answer (see `start_qsd`).
        let (daemon, qmp) =
            start_qsd_checked(Some(dir.path()), &args, Session::Negotiating, |_| {
                probe_monitor(&socket, Duration::from_secs(5))
            })
            .unwrap();
        drop(qmp);
        daemon
    } else {
        let mut daemon = Daemon::start_in(binary, dir.path(), &args).unwrap();
        drop(daemon.connect().unwrap());
        daemon
    };
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut conn = RawConn::new(stream, LIMIT);
    let mut transcript = vec![mask_package(&conn.read_pretty().unwrap())];
    for request in PRETTY_REQUESTS {
        conn.send(request.as_bytes()).unwrap();
        let reply = conn.read_pretty().unwrap();
        transcript.push(format!("{request}\n{}", mask_package(&reply)));
    }
    transcript
}

#[test]
fn pretty_output_matches_qsd_byte_for_byte() {
    let qsd = pretty_transcript(&qsd_path());
    let ours = pretty_transcript(&blockd());
    assert_eq!(qsd.len(), ours.len());
    for (theirs, ours) in qsd.iter().zip(&ours) {
        assert_eq!(ours, theirs, "pretty output differs");
    }
}

#[test]
fn compact_replies_end_with_crlf_like_qsd() {
    let mut daemon = Daemon::start(&blockd(), &[] as &[&str]).unwrap();
    let stream = daemon.connect_stream(LIMIT).unwrap();
    let mut conn = RawConn::new(stream, LIMIT);
    let greeting = conn.read_line().unwrap();
    assert!(greeting.ends_with(b"}\r\n"), "{greeting:?}");
    conn.send(br#"{"execute":"qmp_capabilities"}"#).unwrap();
    assert_eq!(conn.read_line().unwrap(), b"{\"return\": {}}\r\n");
    conn.send(br#"{"execute":"query-jobs"}"#).unwrap();
    assert_eq!(conn.read_line().unwrap(), b"{\"return\": []}\r\n");
}
