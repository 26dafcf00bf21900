//! NBD exports through the `blockd` binary, against real clients and against
//! qemu-storage-daemon: the same images exported by both daemons must look the same to
//! `qemu-img map`, `nbdinfo --json` and `nbdinfo --map` (base:allocation and
//! qemu:allocation-depth, and qemu:dirty-bitmap:NAME after writes through the exports), and
//! data written through blockd's export must land in the image.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{json, Value};
use testkit::tools::{path as p, tool};
use testkit::{start_qsd, Daemon, Session};

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

fn qemu(args: &[&str]) -> Output {
    tool(args[0], &args[1..])
}

/// Daemon arguments exporting `node` (the last of `blockdevs`) as `disk`.
fn args(dir: &Path, blockdevs: &[String], node: &str) -> Vec<String> {
    let mut args = Vec::new();
    for b in blockdevs {
        args.push("--blockdev".to_string());
        args.push(b.clone());
    }
    args.push("--nbd-server".into());
    args.push(format!("addr.type=unix,addr.path={}", p(dir, "nbd.sock")));
    args.push("--export".into());
    args.push(format!(
        "type=nbd,id=e0,node-name={node},name=disk,writable=on,allocation-depth=on"
    ));
    args
}

/// Waits for the NBD socket: the monitor's can come up first.
fn wait_socket(dir: &Path) {
    let sock = dir.join("nbd.sock");
    for _ in 0..500 {
        if sock.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What the clients report for the export, with the socket path taken out.
fn views(dir: &Path) -> Vec<String> {
    let sock = p(dir, "nbd.sock");
    let uri = format!("nbd+unix:///disk?socket={sock}");
    let out = |o: Output| String::from_utf8_lossy(&o.stdout).replace(&sock, "SOCK");
    vec![
        out(qemu(&[
            "qemu-img",
            "map",
            "--output=json",
            "-f",
            "raw",
            &uri,
        ])),
        out(tool("nbdinfo", &["--json", &uri])),
        out(tool("nbdinfo", &["--map", &uri])),
        out(tool("nbdinfo", &["--map=qemu:allocation-depth", &uri])),
    ]
}

/// Runs `views` against QSD and blockd serving the same files.
fn same_as_qsd(make: impl Fn(&Path) -> (Vec<String>, String)) {
    let mut seen = Vec::new();
    for qsd in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (blockdevs, node) = make(dir.path());
        let args = args(dir.path(), &blockdevs, &node);
        let daemon = if qsd {
            start_qsd(Some(dir.path()), &args, Session::Negotiated)
                .expect("qemu-storage-daemon starts")
                .0
        } else {
            Daemon::start_in(&blockd(), dir.path(), &args).expect("blockd starts")
        };
        wait_socket(dir.path());
        seen.push(views(dir.path()));
        drop(daemon);
    }
    let names = [
        "qemu-img map",
        "nbdinfo --json",
        "nbdinfo --map",
        "allocation depth",
    ];
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            seen[1][i], seen[0][i],
            "{name}: blockd (left) vs QSD (right)"
        );
    }
}

#[test]
fn raw_file_with_holes_looks_the_same_as_through_qsd() {
    same_as_qsd(|dir| {
        let img = p(dir, "a.raw");
        qemu(&["qemu-img", "create", "-q", "-f", "raw", &img, "8M"]);
        qemu(&[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 1 1M 1M",
            "-c",
            "write -P 2 6M 64k",
            &img,
        ]);
        (
            vec![
                format!("driver=file,node-name=f,filename={img}"),
                "driver=raw,node-name=r,file=f".to_string(),
            ],
            "r".to_string(),
        )
    });
}

#[test]
fn qcow2_with_data_zero_and_unallocated_clusters_over_a_backing_file_looks_the_same() {
    same_as_qsd(|dir| {
        let base = p(dir, "base.qcow2");
        let top = p(dir, "top.qcow2");
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", &base, "4M"]);
        qemu(&["qemu-io", "-c", "write -P 7 0 2M", &base]);
        qemu(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top, "8M",
        ]);
        qemu(&[
            "qemu-io",
            "-c",
            "write -P 9 512k 256k",
            "-c",
            "write -z 1M 128k",
            "-c",
            "write -P 3 5M 64k",
            &top,
        ]);
        (
            vec![
                format!("driver=file,node-name=f,filename={top}"),
                "driver=qcow2,node-name=q,file=f".to_string(),
            ],
            "q".to_string(),
        )
    });
}

#[test]
fn writes_through_the_export_land_in_the_qcow2_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "a.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", &img, "16M"]);
    let blockdevs = vec![
        format!("driver=file,node-name=f,filename={img}"),
        "driver=qcow2,node-name=q,file=f".to_string(),
    ];
    let mut daemon = Daemon::start_in(&blockd(), dir.path(), &args(dir.path(), &blockdevs, "q"))
        .expect("blockd starts");
    wait_socket(dir.path());
    let uri = format!("nbd+unix:///disk?socket={}", p(dir.path(), "nbd.sock"));
    let src = p(dir.path(), "src.raw");
    qemu(&["qemu-img", "create", "-q", "-f", "raw", &src, "16M"]);
    qemu(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x61 0 5M",
        "-c",
        "write -P 0x62 9M 3M",
        &src,
    ]);
    tool("nbdcopy", &[&src, &uri]);
    tool(
        "fio",
        &[
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--offset=12M",
            "--size=4M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    qemu(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "read -P 0x61 0 5M",
        "-c",
        "read -P 0x62 9M 3M",
        &uri,
    ]);
    let mut qmp = daemon.qmp().unwrap();
    qmp.execute("quit", json!({})).unwrap();
    daemon
        .wait_exit(std::time::Duration::from_secs(20))
        .unwrap();
    qemu(&["qemu-img", "check", "-q", &img]);
    qemu(&[
        "qemu-io",
        "-c",
        "read -P 0x61 0 5M",
        "-c",
        "read -P 0x62 9M 3M",
        &img,
    ]);
    let info: Value =
        serde_json::from_slice(&qemu(&["qemu-img", "info", "--output=json", &img]).stdout).unwrap();
    assert_eq!(info["dirty-flag"], json!(false));
}

/// An inet server: `nbd://` URLs with qemu-io and qemu-img, and max-connections=1 (no
/// multi-conn advertised, as QEMU).
#[test]
fn inet_export_serves_nbd_urls() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "a.raw");
    qemu(&["qemu-img", "create", "-q", "-f", "raw", &img, "4M"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut daemon =
        Daemon::start_in(&blockd(), dir.path(), &[] as &[&str]).expect("blockd starts");
    let mut qmp = daemon.qmp().unwrap();
    qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": img}),
    )
    .unwrap();
    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}, "max-connections": 1}),
    )
    .unwrap();
    qmp.execute("nbd-server-add", json!({"device": "f", "writable": true}))
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/f");
    qemu(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x3e 1M 64k",
        "-c",
        "read -P 0x3e 1M 64k",
        &uri,
    ]);
    let info = tool("nbdinfo", &["--json", &uri]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["exports"][0]["can_multi_conn"], json!(false), "{info}");
    qemu(&["qemu-img", "compare", "-f", "raw", "-F", "raw", &img, &uri]);
    qmp.execute("quit", json!({})).unwrap();
    daemon
        .wait_exit(std::time::Duration::from_secs(20))
        .unwrap();
}

/// What the clients see of bitmap `b0` after writes through export `disk`, then through
/// export `bm` (writable, offering the enabled bitmap): the map from `nbdinfo` and from
/// `qemu-img map` with `x-dirty-bitmap`, the export list with its contexts, and the
/// bitmap's `busy` flag while exported and after `block-export-del`.
fn dirty_bitmap_views(qsd: bool) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "a.raw");
    qemu(&["qemu-img", "create", "-q", "-f", "raw", &img, "8M"]);
    let blockdevs = vec![format!("driver=file,node-name=f,filename={img}")];
    let args = args(dir.path(), &blockdevs, "f");
    let (_daemon, mut qmp) = if qsd {
        start_qsd(Some(dir.path()), &args, Session::Negotiated).expect("qemu-storage-daemon starts")
    } else {
        let mut d = Daemon::start_in(&blockd(), dir.path(), &args).expect("blockd starts");
        let q = d.qmp().unwrap();
        (d, q)
    };
    wait_socket(dir.path());
    let sock = p(dir.path(), "nbd.sock");
    let uri = |export: &str| format!("nbd+unix:///{export}?socket={sock}");
    qmp.execute("block-dirty-bitmap-add", json!({"node": "f", "name": "b0"}))
        .unwrap();
    qemu(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write 1M 4k",
        "-c",
        "write 3132k 8k",
        "-c",
        "write 7M 1M",
        &uri("disk"),
    ]);
    qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "f", "name": "bm",
               "writable": true, "bitmaps": ["b0"]}),
    )
    .unwrap();
    qemu(&["qemu-io", "-f", "raw", "-c", "write 5M 512", &uri("bm")]);
    let busy = |qmp: &mut testkit::Qmp| {
        let nodes = qmp
            .execute("query-named-block-nodes", json!({"flat": true}))
            .unwrap();
        nodes[0]["dirty-bitmaps"].to_string()
    };
    let out = |o: Output| String::from_utf8_lossy(&o.stdout).replace(&sock, "SOCK");
    let views = vec![
        out(tool("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &uri("bm")])),
        out(qemu(&[
            "qemu-img",
            "map",
            "--output=json",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={sock},export=bm,\
                 x-dirty-bitmap=qemu:dirty-bitmap:b0"
            ),
        ])),
        out(tool(
            "nbdinfo",
            &["--list", &format!("nbd+unix://?socket={sock}")],
        )),
        busy(&mut qmp),
    ];
    qmp.execute("block-export-del", json!({"id": "e1"}))
        .unwrap();
    let freed = busy(&mut qmp);
    qmp.execute("quit", json!({})).unwrap();
    [views, vec![freed]].concat()
}

#[test]
fn dirty_bitmap_context_shows_the_written_ranges_as_qsd_does() {
    let blockd = dirty_bitmap_views(false);
    let qsd = dirty_bitmap_views(true);
    let names = [
        "nbdinfo --map",
        "qemu-img map",
        "nbdinfo --list",
        "busy while exported",
        "busy after block-export-del",
    ];
    for (i, name) in names.iter().enumerate() {
        assert_eq!(blockd[i], qsd[i], "{name}: blockd (left) vs QSD (right)");
    }
    // Whole 64 KiB chunks: 3132k + 8k spans two of them.
    let expected = "         0     1048576    0  clean
   1048576       65536    1  dirty
   1114112     2031616    0  clean
   3145728      131072    1  dirty
   3276800     1966080    0  clean
   5242880       65536    1  dirty
   5308416     2031616    0  clean
   7340032     1048576    1  dirty
";
    assert_eq!(blockd[0], expected);
    assert!(blockd[2].contains("qemu:dirty-bitmap:b0"), "{}", blockd[2]);
    assert!(blockd[3].contains("\"busy\":true"), "{}", blockd[3]);
    assert!(blockd[4].contains("\"busy\":false"), "{}", blockd[4]);
}
