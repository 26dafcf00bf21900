//! Black-box external snapshots through the `blockd` binary: an overlay put in place while a
//! client writes through an NBD export, the chain as `qemu-img info --backing-chain` sees
//! it, each write in the base or the overlay according to when it was acknowledged (for
//! `blockdev-snapshot-sync` and for `blockdev-snapshot` with an overlay added by
//! `blockdev-add`, and for a `raw` node opened on the base and exported in its place,
//! which moves onto the overlay with its client), and `mode: existing` with an overlay made
//! by qemu-img. Internal snapshots: blockd killed with SIGKILL at varied moments of
//! `blockdev-snapshot-internal-sync` and `blockdev-snapshot-delete-internal-sync` leaves an
//! image `qemu-img check` passes, holding the snapshot entirely or not at all.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::tools::{
    assert_no_corruption, create_qcow2, path, qcow2_to_raw as raw_of, snapshot_names, tool,
    wait_path,
};
use testkit::{Daemon, Qmp};

const LIMIT: Duration = Duration::from_secs(60);
const BLOCK: u64 = 64 << 10;
const WRITES: usize = 40;

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

/// blockd with `base.qcow2` (filled with 0x11) as node `base`, exported writable as `disk`:
/// directly, or with `through_raw` through a `raw` node `r` opened on it.
fn start(dir: &Path, through_raw: bool) -> (Daemon, Qmp, String) {
    let base = path(dir, "base.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", &base, "8M"]);
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 8M", &base],
    );
    let sock = path(dir, "nbd.sock");
    let mut args = vec![
        "--blockdev".to_string(),
        format!("driver=file,node-name=bf,filename={base}"),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=base,file=bf".to_string(),
    ];
    if through_raw {
        args.push("--blockdev".to_string());
        args.push("driver=raw,node-name=r,file=base".to_string());
    }
    let exported = if through_raw { "r" } else { "base" };
    args.extend([
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={sock}"),
        "--export".to_string(),
        format!("type=nbd,id=e0,node-name={exported},name=disk,writable=on"),
    ]);
    let mut daemon = Daemon::start(&blockd(), &args).expect("blockd starts");
    let qmp = daemon.qmp().expect("monitor answers");
    wait_path(&sock, LIMIT);
    (daemon, qmp, format!("nbd+unix:///disk?socket={sock}"))
}

fn pattern(i: usize) -> u8 {
    0x20 + i as u8
}

/// Whether `image` (read by qemu-io with its chain) holds `byte` over block `i`.
fn holds(image: &str, fmt: &str, i: usize, byte: u8) -> bool {
    let cmd = format!("read -P {byte:#x} {} {BLOCK}", i as u64 * BLOCK);
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", fmt, "-c", &cmd, image])
        .output()
        .expect("qemu-io is needed (install qemu-utils)");
    // qemu-io reports a pattern mismatch on stdout and still exits 0.
    out.status.success()
        && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
}

/// Writes 40 blocks through the export, one request at a time, while `take` puts node
/// `top` (whose image it returns) above `base` once a quarter of them are acknowledged;
/// the last quarter waits for it. Then checks that the export moved (or, `through_raw`,
/// that it stayed on the raw node and the raw node now reads the overlay) and the old node
/// is read-only, and, after blockd quit, both images, the chain qemu-img sees, and that
/// each write is in the chain, and in the base exactly when it was acknowledged before the
/// snapshot was asked for (so the base holds what the disk held at that moment).
fn snapshot_while_a_client_writes(through_raw: bool, take: impl FnOnce(&Path, &mut Qmp) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut daemon, mut qmp, uri) = start(d, through_raw);
    let done = Arc::new(AtomicUsize::new(0));
    let snapshotted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let times = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (uri, done, times) = (uri.clone(), done.clone(), times.clone());
        let snapshotted = snapshotted.clone();
        std::thread::spawn(move || {
            for i in 0..WRITES {
                while i >= WRITES * 3 / 4 && !snapshotted.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let cmd = format!("write -P {:#x} {} {BLOCK}", pattern(i), i as u64 * BLOCK);
                let sent = Instant::now();
                tool("qemu-io", &["-f", "raw", "-c", &cmd, &uri]);
                times.lock().unwrap().push((sent, Instant::now()));
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + LIMIT;
    while done.load(Ordering::SeqCst) < WRITES / 4 {
        assert!(Instant::now() < deadline, "the writer makes no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let asked = Instant::now();
    let overlay = take(d, &mut qmp);
    let answered = Instant::now();
    snapshotted.store(true, Ordering::SeqCst);
    writer.join().expect("the writer finishes");
    let exports = qmp.execute("query-block-exports", json!({})).unwrap();
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let node = |name: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    if through_raw {
        assert_eq!(
            exports[0]["node-name"], "r",
            "the export stays on the raw node"
        );
        let file = node("r")["file"].as_str().unwrap_or_default().to_string();
        assert!(
            file.starts_with("json:") && file.contains(&overlay),
            "the raw node reads the overlay: {file}"
        );
    } else {
        assert_eq!(
            exports[0]["node-name"], "top",
            "the export moved to the overlay"
        );
    }
    assert_eq!(node("base")["ro"], Value::Bool(true));
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(LIMIT).expect("blockd exits");

    let base = path(d, "base.qcow2");
    tool("qemu-img", &["check", &base]);
    tool("qemu-img", &["check", &overlay]);
    let info = tool(
        "qemu-img",
        &["info", "--backing-chain", "--output=json", &overlay],
    );
    let chain: Value = serde_json::from_slice(&info.stdout).unwrap();
    let files: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(files, [overlay.as_str(), base.as_str()]);
    assert_eq!(chain[0]["backing-filename"], base.as_str());
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");

    let times = times.lock().unwrap().clone();
    let (mut before, mut after) = (0, 0);
    for (i, (sent, acked)) in times.iter().enumerate() {
        // Every write is in the chain.
        assert!(holds(&overlay, "qcow2", i, pattern(i)), "block {i} lost");
        if *acked < asked {
            assert!(
                holds(&base, "qcow2", i, pattern(i)),
                "block {i} not in the base"
            );
            before += 1;
        } else if *sent > answered {
            assert!(
                holds(&base, "qcow2", i, 0x11),
                "block {i} leaked into the base"
            );
            after += 1;
        }
    }
    assert!(
        before >= WRITES / 4 && after >= WRITES / 4,
        "{before} before, {after} after"
    );
}

#[test]
fn an_overlay_goes_in_while_a_client_writes() {
    snapshot_while_a_client_writes(false, snapshot_sync);
}

/// The client writes through a `raw` node opened on the base: the raw node, a parent
/// of the base, moves onto the overlay, and no write that was inside it when the snapshot
/// was asked for reaches the base afterwards.
#[test]
fn a_raw_node_over_the_base_moves_onto_the_overlay_while_a_client_writes() {
    snapshot_while_a_client_writes(true, snapshot_sync);
}

/// `blockdev-snapshot-sync` of `base` with a new overlay `top`.
fn snapshot_sync(d: &Path, qmp: &mut Qmp) -> String {
    let overlay = path(d, "overlay.qcow2");
    qmp.execute(
        "blockdev-snapshot-sync",
        json!({"node-name": "base", "snapshot-file": overlay, "snapshot-node-name": "top"}),
    )
    .expect("blockdev-snapshot-sync");
    overlay
}

/// `blockdev-snapshot`: the overlay is made by qemu-img naming the base as its backing
/// file and added with `backing: null` while the client writes.
#[test]
fn an_added_overlay_goes_in_while_a_client_writes() {
    snapshot_while_a_client_writes(false, |d, qmp| {
        let overlay = path(d, "added.qcow2");
        made_by_qemu_img(d, &overlay);
        qmp.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "top", "backing": null,
                   "file": {"driver": "file", "filename": overlay}}),
        )
        .expect("blockdev-add");
        qmp.execute(
            "blockdev-snapshot",
            json!({"node": "base", "overlay": "top"}),
        )
        .expect("blockdev-snapshot");
        overlay
    });
}

/// An empty 8M qcow2 image `overlay` whose header names `base.qcow2` in `d`.
fn made_by_qemu_img(d: &Path, overlay: &str) {
    let base = path(d, "base.qcow2");
    tool(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", overlay, "8M",
        ],
    );
}

#[test]
fn mode_existing_uses_an_overlay_made_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut daemon, mut qmp, uri) = start(d, false);
    let base = path(d, "base.qcow2");
    let overlay = path(d, "made.qcow2");
    made_by_qemu_img(d, &overlay);
    qmp.execute(
        "blockdev-snapshot-sync",
        json!({"node-name": "base", "snapshot-file": overlay, "snapshot-node-name": "top",
               "mode": "existing"}),
    )
    .expect("blockdev-snapshot-sync");
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 1M 64k", &uri],
    );
    tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x11 0 1M", &uri],
    );
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(LIMIT).expect("blockd exits");
    assert!(holds(&overlay, "qcow2", 16, 0x77));
    assert!(holds(&base, "qcow2", 16, 0x11));
    tool("qemu-img", &["check", &overlay]);
}

/// A 256 MiB image with 4 KiB clusters (128 L2 tables, 65536 data clusters), filled with
/// 0x11: taking or deleting an internal snapshot of it changes a lot of metadata.
fn big_image(dir: &Path) -> String {
    let img = path(dir, "big.qcow2");
    create_qcow2(&img, "cluster_size=4096", "256M");
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 256M", &img],
    );
    img
}

/// A copy of `base` as `img.qcow2`, blockd serving it as node `disk`, `command` sent, and
/// blockd killed with SIGKILL `delay` later (`None`: after the reply). Returns the copy and
/// the time from the command to the kill.
fn killed_during(
    dir: &Path,
    base: &str,
    command: &Value,
    delay: Option<Duration>,
) -> (String, Duration) {
    let img = path(dir, "img.qcow2");
    std::fs::copy(base, &img).unwrap();
    let args = testkit::tools::qcow2_node_args(&img, "disk");
    let mut daemon = Daemon::start(&blockd(), &args).expect("blockd starts");
    let mut qmp = daemon.qmp().expect("monitor answers");
    qmp.send(command).unwrap();
    let sent = Instant::now();
    match delay {
        Some(delay) => std::thread::sleep(delay),
        None => {
            let reply = qmp.read_reply().unwrap();
            assert!(reply.get("return").is_some(), "{reply}");
        }
    }
    let took = sent.elapsed();
    daemon.kill();
    (img, took)
}

/// Check what a kill left: `qemu-img check` finds no corruption (leaks allowed), the active
/// layer holds `active_raw`, and snapshot `name`, when listed, holds `snapshot_raw`.
/// Returns whether it is listed.
fn whole_or_absent(
    dir: &Path,
    img: &str,
    name: &str,
    active_raw: &str,
    snapshot_raw: &str,
) -> bool {
    assert_no_corruption(img);
    tool(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", img, active_raw],
    );
    let listed = snapshot_names(img).iter().any(|n| n == name);
    if listed {
        let got = path(dir, "snapshot.raw");
        raw_of(img, Some(name), &got);
        tool(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &got, snapshot_raw],
        );
    }
    listed
}

/// Kill delays: at once, spread over the time `command` takes when it runs to the end, and
/// past it. Timing only picks the moments; every outcome is checked the same way.
fn delays(dir: &Path, base: &str, command: &Value) -> Vec<Duration> {
    let (_, took) = killed_during(dir, base, command, None);
    eprintln!("{} took {took:?}", command["execute"]);
    [0u32, 1, 2, 4, 6, 8, 12, 16]
        .into_iter()
        .map(|eighths| took * eighths / 8)
        .collect()
}

#[test]
fn sigkill_during_internal_snapshot_create_leaves_it_whole_or_absent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = big_image(d);
    let active = path(d, "active.raw");
    raw_of(&base, None, &active);
    let create = json!({"execute": "blockdev-snapshot-internal-sync",
                        "arguments": {"device": "disk", "name": "s"}});
    let (img, _) = killed_during(d, &base, &create, None);
    assert!(whole_or_absent(d, &img, "s", &active, &active));
    for delay in delays(d, &base, &create) {
        let (img, _) = killed_during(d, &base, &create, Some(delay));
        let listed = whole_or_absent(d, &img, "s", &active, &active);
        eprintln!("killed after {delay:?}: snapshot listed {listed}");
    }
}

#[test]
fn sigkill_during_internal_snapshot_delete_leaves_it_whole_or_absent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = big_image(d);
    let snapshot = path(d, "snapshot.ref.raw");
    raw_of(&base, None, &snapshot);
    tool("qemu-img", &["snapshot", "-c", "s", &base]);
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 0 64M", &base],
    );
    let active = path(d, "active.raw");
    raw_of(&base, None, &active);
    let delete = json!({"execute": "blockdev-snapshot-delete-internal-sync",
                        "arguments": {"device": "disk", "name": "s"}});
    let (img, _) = killed_during(d, &base, &delete, None);
    assert!(!whole_or_absent(d, &img, "s", &active, &snapshot));
    for delay in delays(d, &base, &delete) {
        let (img, _) = killed_during(d, &base, &delete, Some(delay));
        let listed = whole_or_absent(d, &img, "s", &active, &snapshot);
        eprintln!("killed after {delay:?}: snapshot listed {listed}");
    }
}
