//! Black-box tests of `snapshot-save`, `snapshot-load` and `snapshot-delete`: a group of
//! two qcow2 disks exported over NBD and written by clients while the group is saved,
//! loaded back exactly, and deleted; the group all-or-nothing when one device fails; the
//! refusals of load that change nothing; blockd killed during a load leaving the disk as
//! before or as the snapshot; `qemu-img` agreeing on every image.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::tools::{path, tool, wait_path};
use testkit::{Daemon, Qmp};

const LIMIT: Duration = Duration::from_secs(60);
const BLOCK: u64 = 64 << 10;
const BLOCKS: u64 = 64;

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

/// blockd with qcow2 disks `a` (filled with 0x11) and `b` (0x22), exported writable as
/// `a` and `b` on `nbd.sock`; `b_file` is the node `b` opens (by default its file node).
fn start(dir: &Path, b_file: &[&str]) -> (Daemon, Qmp) {
    for (name, fill) in [("a", 0x11), ("b", 0x22)] {
        let image = path(dir, &format!("{name}.qcow2"));
        tool("qemu-img", &["create", "-q", "-f", "qcow2", &image, "4M"]);
        let cmd = format!("write -P {fill:#x} 0 4M");
        tool("qemu-io", &["-f", "qcow2", "-c", &cmd, &image]);
    }
    let sock = path(dir, "nbd.sock");
    let mut args = vec![
        "--blockdev".to_string(),
        format!("driver=file,node-name=fa,filename={}", path(dir, "a.qcow2")),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=a,file=fa".to_string(),
        "--blockdev".to_string(),
        format!("driver=file,node-name=fb,filename={}", path(dir, "b.qcow2")),
    ];
    for extra in b_file {
        args.push("--blockdev".to_string());
        args.push(extra.to_string());
    }
    let b_child = if b_file.is_empty() { "fb" } else { "dbg" };
    args.extend([
        "--blockdev".to_string(),
        format!("driver=qcow2,node-name=b,file={b_child}"),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={sock}"),
        "--export".to_string(),
        "type=nbd,id=ea,node-name=a,name=a,writable=on".to_string(),
        "--export".to_string(),
        "type=nbd,id=eb,node-name=b,name=b,writable=on".to_string(),
    ]);
    let mut daemon = Daemon::start(&blockd(), &args).expect("blockd starts");
    let qmp = daemon.qmp().expect("monitor answers");
    wait_path(&sock, LIMIT);
    (daemon, qmp)
}

fn uri(dir: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", path(dir, "nbd.sock"))
}

/// Runs a snapshot job to its end: its error (if any), after `job-dismiss`.
fn run_job(qmp: &mut Qmp, command: &str, args: Value) -> Option<String> {
    let id = args["job-id"].as_str().unwrap().to_string();
    qmp.execute(command, args).unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        let event = qmp.wait_event("JOB_STATUS_CHANGE", LIMIT).unwrap();
        if event["data"] == json!({"id": id, "status": "concluded"}) {
            break;
        }
        assert!(Instant::now() < deadline, "job {id} never concluded");
    }
    let jobs = qmp.execute("query-jobs", json!({})).unwrap();
    let job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == json!(id))
        .cloned()
        .unwrap();
    qmp.execute("job-dismiss", json!({"id": id})).unwrap();
    job["error"].as_str().map(str::to_string)
}

fn save(qmp: &mut Qmp, job: &str, tag: &str, vmstate: &str, devices: &[&str]) -> Option<String> {
    let args = json!({"job-id": job, "tag": tag, "vmstate": vmstate, "devices": devices});
    run_job(qmp, "snapshot-save", args)
}

fn load(qmp: &mut Qmp, job: &str, tag: &str, vmstate: &str, devices: &[&str]) -> Option<String> {
    let args = json!({"job-id": job, "tag": tag, "vmstate": vmstate, "devices": devices});
    run_job(qmp, "snapshot-load", args)
}

fn delete(qmp: &mut Qmp, job: &str, tag: &str, devices: &[&str]) -> Option<String> {
    let args = json!({"job-id": job, "tag": tag, "devices": devices});
    run_job(qmp, "snapshot-delete", args)
}

/// The disk behind export `export` as a raw file (read through NBD, as a client sees it).
fn copy(dir: &Path, export: &str, name: &str) -> String {
    let out = path(dir, name);
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri(dir, export), &out],
    );
    out
}

fn same(left: &str, right: &str) -> bool {
    std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", left, right])
        .status()
        .expect("qemu-img is needed (install qemu-utils)")
        .success()
}

/// Whether export `export` holds `byte` over block `i`.
fn holds(dir: &Path, export: &str, i: u64, byte: u8) -> bool {
    let cmd = format!("read -P {byte:#x} {} {BLOCK}", i * BLOCK);
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", &cmd, &uri(dir, export)])
        .output()
        .expect("qemu-io is needed (install qemu-utils)");
    out.status.success()
        && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
}

/// The snapshots `qemu-img snapshot -l` lists for `image`: (tag, VM state size text).
fn listed(image: &str) -> Vec<(String, String)> {
    let out = tool("qemu-img", &["snapshot", "-l", "-U", image]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].to_string(), format!("{} {}", f[2], f[3]))
        })
        .collect()
}

/// One write of the clients: block `i` of `export`, with its byte, when it was sent and
/// when acknowledged.
struct Write {
    export: &'static str,
    block: u64,
    byte: u8,
    sent: Instant,
    acked: Instant,
}

/// Writes blocks `0..BLOCKS` of both disks (one writer per disk, a byte of its own per
/// block), the second half only after `go` is set.
fn writers(
    dir: &Path,
    go: Arc<AtomicBool>,
) -> (Vec<std::thread::JoinHandle<()>>, Arc<Mutex<Vec<Write>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let handles = ["a", "b"]
        .into_iter()
        .map(|export| {
            let (uri, log, go) = (uri(dir, export), log.clone(), go.clone());
            std::thread::spawn(move || {
                for block in 0..BLOCKS {
                    while block >= BLOCKS / 2 && !go.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let byte = 0x40 + block as u8;
                    let cmd = format!("write -P {byte:#x} {} {BLOCK}", block * BLOCK);
                    let sent = Instant::now();
                    // Writes during the save wait at the drained disks: none fails.
                    tool("qemu-io", &["-f", "raw", "-c", &cmd, &uri]);
                    let acked = Instant::now();
                    log.lock().unwrap().push(Write {
                        export,
                        block,
                        byte,
                        sent,
                        acked,
                    });
                }
            })
        })
        .collect();
    (handles, log)
}

/// Two disks written by NBD clients through a save: every write acknowledged before the
/// save was asked for is in the snapshot, none sent after it ended; load brings both
/// disks back exactly (compared with copies read at that point), again after more writes;
/// delete removes the tag from both; qemu-img lists and checks the images.
#[test]
fn a_group_saved_under_client_writes_loads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut daemon, mut qmp) = start(d, &[]);
    let go = Arc::new(AtomicBool::new(false));
    let (handles, log) = writers(d, go.clone());
    let deadline = Instant::now() + LIMIT;
    while log.lock().unwrap().len() < BLOCKS as usize / 2 {
        assert!(Instant::now() < deadline, "the writers make no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Half of the writes are still to come: they run while the save does.
    go.store(true, Ordering::SeqCst);
    let asked = Instant::now();
    assert_eq!(save(&mut qmp, "s1", "t1", "a", &["a", "b"]), None);
    let ended = Instant::now();
    for h in handles {
        h.join().expect("every client write succeeds");
    }
    assert_eq!(load(&mut qmp, "l1", "t1", "a", &["a", "b"]), None);
    let (mut before, mut after) = (0, 0);
    for w in log.lock().unwrap().iter() {
        let fill = if w.export == "a" { 0x11 } else { 0x22 };
        if w.acked < asked {
            assert!(
                holds(d, w.export, w.block, w.byte),
                "{} {} lost",
                w.export,
                w.block
            );
            before += 1;
        } else if w.sent > ended {
            assert!(
                holds(d, w.export, w.block, fill),
                "{} {} leaked",
                w.export,
                w.block
            );
            after += 1;
        }
    }
    assert!(
        before >= BLOCKS as usize / 2,
        "{before} writes before the save"
    );
    let _ = after;

    // Exactly the snapshot, every time it is loaded.
    let at_save = [copy(d, "a", "a.t1.raw"), copy(d, "b", "b.t1.raw")];
    for export in ["a", "b"] {
        let cmd = format!("write -P 0x77 0 {}", 8 * BLOCK);
        tool("qemu-io", &["-f", "raw", "-c", &cmd, &uri(d, export)]);
    }
    assert_eq!(load(&mut qmp, "l2", "t1", "a", &["a", "b"]), None);
    assert!(same(&at_save[0], &copy(d, "a", "a.again.raw")), "a differs");
    assert!(same(&at_save[1], &copy(d, "b", "b.again.raw")), "b differs");

    // A second group snapshot stays; the first is deleted from both disks.
    assert_eq!(save(&mut qmp, "s2", "t2", "b", &["a", "b"]), None);
    assert_eq!(delete(&mut qmp, "d1", "t1", &["a", "b"]), None);
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(LIMIT).expect("blockd exits");
    for disk in ["a", "b"] {
        let image = path(d, &format!("{disk}.qcow2"));
        tool("qemu-img", &["check", &image]);
        let tags = listed(&image);
        assert_eq!(tags.len(), 1, "{disk}: {tags:?}");
        assert_eq!(tags[0].0, "t2");
        // The VM state (blockd's record) is in the vmstate device's snapshot only.
        assert_eq!(tags[0].1 == "0 B", disk == "a", "{disk}: {tags:?}");
        // qemu-img reverts a copy to the same data.
        let reverted = path(d, &format!("{disk}.copy.qcow2"));
        std::fs::copy(&image, &reverted).unwrap();
        tool("qemu-img", &["snapshot", "-a", "t2", &reverted]);
        let raw = path(d, &format!("{disk}.reverted.raw"));
        tool("qemu-img", &["convert", "-O", "raw", &reverted, &raw]);
        let want = if disk == "a" {
            &at_save[0]
        } else {
            &at_save[1]
        };
        assert!(same(want, &raw), "{disk}: qemu-img's revert differs");
    }
}

/// A device that fails the snapshot (its writes fail underneath) leaves no snapshot on
/// the devices before it: the group is all-or-nothing.
#[test]
fn a_failing_device_leaves_no_snapshot_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dbg = "driver=blkdebug,node-name=dbg,image=fb,inject-error.0.event=pwritev,inject-error.0.errno=5";
    let (mut daemon, mut qmp) = start(d, &[dbg]);
    let error = save(&mut qmp, "s1", "t1", "a", &["a", "b"]);
    assert_eq!(
        error.as_deref(),
        Some("Could not create snapshot 't1' on 'b'")
    );
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    for node in nodes.as_array().unwrap() {
        assert_eq!(node["image"]["snapshots"], Value::Null, "{node}");
    }
    // Writes to the disk before the failing one still work: its drain ended.
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x55 0 64k", &uri(d, "a")],
    );
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(LIMIT).expect("blockd exits");
    let a = path(d, "a.qcow2");
    tool("qemu-img", &["check", &a]);
    assert!(listed(&a).is_empty());
}

/// Load refuses before it reverts anything: a device without the tag, a group that is
/// not whole (blockd's record names a device the list lacks), a disk-only snapshot, a raw
/// device, an empty list, a vmstate device outside the list. QEMU's messages (and
/// blockd's own for the record); the disks keep what was written after the save, and
/// their clients are served again (RESUME follows STOP).
#[test]
fn load_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut daemon, mut qmp) = start(d, &[]);
    assert_eq!(save(&mut qmp, "s1", "only-a", "a", &["a"]), None);
    assert_eq!(save(&mut qmp, "s2", "both", "a", &["a", "b"]), None);
    qmp.execute(
        "blockdev-snapshot-internal-sync",
        json!({"device": "a", "name": "disk-only"}),
    )
    .unwrap();
    for export in ["a", "b"] {
        tool(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x66 0 64k", &uri(d, export)],
        );
    }
    let filename = path(d, "b.qcow2");
    let cases: [(&str, &str, &[&str], String); 6] = [
        (
            "only-a",
            "a",
            &["a", "b"],
            "Snapshot 'only-a' does not exist in one or more devices".into(),
        ),
        (
            "both",
            "a",
            &["a"],
            format!(
                "Snapshot 'both' was saved with device 'b' ({filename}), which is not in the list"
            ),
        ),
        (
            "disk-only",
            "a",
            &["a"],
            "This is a disk-only snapshot. Revert to it  offline using qemu-img".into(),
        ),
        (
            "both",
            "b",
            &["a"],
            "vmstate block device 'b' does not exist".into(),
        ),
        (
            "both",
            "a",
            &["a", "fb"],
            "Device 'fb' is writable but does not support snapshots".into(),
        ),
        (
            "both",
            "a",
            &[],
            "At least one device is required for snapshot".into(),
        ),
    ];
    for (i, (tag, vmstate, devices, message)) in cases.iter().enumerate() {
        qmp.take_events();
        let error = load(&mut qmp, &format!("l{i}"), tag, vmstate, devices);
        assert_eq!(error.as_ref(), Some(message));
        let names: Vec<Value> = qmp
            .take_events()
            .into_iter()
            .map(|e| e["event"].clone())
            .filter(|e| e != "JOB_STATUS_CHANGE")
            .collect();
        assert_eq!(names, [json!("STOP"), json!("RESUME")], "case {i}");
        for export in ["a", "b"] {
            assert!(holds(d, export, 0, 0x66), "case {i} reverted {export}");
        }
    }
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(LIMIT).expect("blockd exits");
    for disk in ["a", "b"] {
        tool("qemu-img", &["check", &path(d, &format!("{disk}.qcow2"))]);
    }
}

/// A group snapshot QEMU's system emulator saved (its VM state is a guest's migration
/// stream, not blockd's record) is listed, loaded and deleted by blockd: the disks come
/// back to what they held at the save.
#[test]
fn a_group_saved_by_qemu_loads_in_blockd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args = Vec::new();
    for (name, fill) in [("a", 0x31), ("b", 0x32)] {
        let image = path(d, &format!("{name}.qcow2"));
        tool("qemu-img", &["create", "-q", "-f", "qcow2", &image, "4M"]);
        let cmd = format!("write -P {fill:#x} 0 2M");
        tool("qemu-io", &["-f", "qcow2", "-c", &cmd, &image]);
        args.extend([
            "--blockdev".to_string(),
            format!("driver=file,node-name=f{name},filename={image}"),
            "--blockdev".to_string(),
            format!("driver=qcow2,node-name={name},file=f{name}"),
        ]);
    }
    let qemu = testkit::daemon::qemu_system_path();
    let mut system = Daemon::start_in(&qemu, d, &args).expect("the system emulator starts");
    let mut qmp = system.qmp().expect("its monitor answers");
    assert_eq!(save(&mut qmp, "s", "by-qemu", "a", &["a", "b"]), None);
    let _ = qmp.execute("quit", json!({}));
    system.wait_exit(LIMIT).expect("the emulator exits");
    let at_save: Vec<String> = ["a", "b"]
        .iter()
        .map(|name| {
            let raw = path(d, &format!("{name}.saved.raw"));
            tool(
                "qemu-img",
                &[
                    "convert",
                    "-O",
                    "raw",
                    &path(d, &format!("{name}.qcow2")),
                    &raw,
                ],
            );
            raw
        })
        .collect();
    for name in ["a", "b"] {
        let image = path(d, &format!("{name}.qcow2"));
        tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x99 1M 2M", &image],
        );
    }

    let mut blockd = Daemon::start(&blockd(), &args).expect("blockd starts");
    let mut qmp = blockd.qmp().expect("monitor answers");
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let a = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "a")
        .unwrap();
    assert_eq!(a["image"]["snapshots"][0]["name"], "by-qemu");
    assert!(
        a["image"]["snapshots"][0]["vm-state-size"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(load(&mut qmp, "l", "by-qemu", "a", &["a", "b"]), None);
    assert_eq!(delete(&mut qmp, "d", "by-qemu", &["a", "b"]), None);
    let _ = qmp.execute("quit", json!({}));
    blockd.wait_exit(LIMIT).expect("blockd exits");
    for (name, want) in ["a", "b"].iter().zip(&at_save) {
        let image = path(d, &format!("{name}.qcow2"));
        tool("qemu-img", &["check", &image]);
        assert!(listed(&image).is_empty(), "{name} keeps the snapshot");
        let raw = path(d, &format!("{name}.loaded.raw"));
        tool("qemu-img", &["convert", "-O", "raw", &image, &raw]);
        assert!(same(want, &raw), "{name} differs from the save");
    }
}

/// A device under a running backup (its copy-before-write filter keeps the point in time)
/// is saved, but not reverted under the backup: load refuses and the disk keeps its data.
#[test]
fn load_refuses_a_device_under_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut daemon, mut qmp) = start(d, &[]);
    qmp.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "sink", "size": 4 << 20}),
    )
    .unwrap();
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "j", "device": "a", "target": "sink", "sync": "full", "speed": 1}),
    )
    .unwrap();
    assert_eq!(save(&mut qmp, "s", "t", "a", &["a", "b"]), None);
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x66 0 64k", &uri(d, "a")],
    );
    let error = load(&mut qmp, "l", "t", "a", &["b", "a"]).expect("load refused");
    assert!(
        error.starts_with("Could not load snapshot 't' on 'a': node '"),
        "{error}"
    );
    assert!(holds(d, "a", 0, 0x66));
    qmp.execute("block-job-cancel", json!({"device": "j", "force": true}))
        .unwrap();
    qmp.wait_event("BLOCK_JOB_CANCELLED", LIMIT).unwrap();
    assert_eq!(load(&mut qmp, "l2", "t", "a", &["b", "a"]), None);
    assert!(holds(d, "a", 0, 0x11));
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(LIMIT).expect("blockd exits");
    tool("qemu-img", &["check", &path(d, "a.qcow2")]);
}

/// blockd serving a copy of `base` as node `disk` (returned with the daemon).
fn serve_copy(dir: &Path, base: &str) -> (Daemon, Qmp, String) {
    let img = path(dir, "img.qcow2");
    std::fs::copy(base, &img).unwrap();
    let args = testkit::tools::qcow2_node_args(&img, "disk");
    let mut daemon = Daemon::start(&blockd(), &args).expect("blockd starts");
    let qmp = daemon.qmp().expect("monitor answers");
    (daemon, qmp, img)
}

/// blockd killed with SIGKILL at varied moments of a `snapshot-load` (a revert of a
/// 256 MiB image with 4 KiB clusters, 64 MiB of it written since the save) leaves an image
/// `qemu-img check` finds without corruption, the snapshot intact, and the disk either as
/// it was or as the snapshot: never a mix. Timing only picks the moments.
#[test]
fn sigkill_during_snapshot_load_leaves_the_disk_before_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = path(d, "big.qcow2");
    testkit::tools::create_qcow2(&base, "cluster_size=4096", "256M");
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 256M", &base],
    );
    let (mut daemon, mut qmp, img) = serve_copy(d, &base);
    assert_eq!(save(&mut qmp, "s", "s", "disk", &["disk"]), None);
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(LIMIT).expect("blockd exits");
    std::fs::rename(&img, &base).unwrap();
    let saved = path(d, "saved.raw");
    testkit::tools::qcow2_to_raw(&base, None, &saved);
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 0 64M", &base],
    );
    let before = path(d, "before.raw");
    testkit::tools::qcow2_to_raw(&base, None, &before);

    let load = json!({"job-id": "l", "tag": "s", "vmstate": "disk", "devices": ["disk"]});
    let (mut daemon, mut qmp, _) = serve_copy(d, &base);
    let started = Instant::now();
    assert_eq!(run_job(&mut qmp, "snapshot-load", load.clone()), None);
    let took = started.elapsed();
    daemon.kill();
    let mut outcomes = Vec::new();
    for eighths in [0u32, 1, 2, 4, 6, 8, 12, 16] {
        let (mut daemon, mut qmp, img) = serve_copy(d, &base);
        qmp.execute("snapshot-load", load.clone()).unwrap();
        std::thread::sleep(took * eighths / 8);
        daemon.kill();
        testkit::tools::assert_no_corruption(&img);
        assert_eq!(testkit::tools::snapshot_names(&img), ["s"]);
        let snapshot = path(d, "snapshot.raw");
        testkit::tools::qcow2_to_raw(&img, Some("s"), &snapshot);
        assert!(same(&snapshot, &saved), "the snapshot changed");
        let now = path(d, "now.raw");
        testkit::tools::qcow2_to_raw(&img, None, &now);
        let reverted = same(&now, &saved);
        assert!(reverted || same(&now, &before), "a mix of before and after");
        outcomes.push(reverted);
    }
    eprintln!("snapshot-load took {took:?}; reverted per kill: {outcomes:?}");
}
