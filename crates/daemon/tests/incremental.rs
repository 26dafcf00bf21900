//! Black-box incremental backups and persistent bitmaps through the `blockd` binary: a
//! full backup and a bitmap started in one transaction, writes through an NBD export,
//! incremental backups restored as a qcow2 chain and compared with the disk as it was at
//! each backup; failing backups and what their bitmap keeps; bitmaps that qemu-img wrote
//! or reads back; a bitmap left in use by a crash.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use testkit::tools::{path, tool, try_tool, wait_path};
use testkit::{Daemon, Qmp};

const LIMIT: Duration = Duration::from_secs(60);
const SIZE: &str = "32M";

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

/// blockd with the qcow2 image `src.qcow2` as node `src`, exported writable as `disk`.
struct Disk {
    daemon: Daemon,
    qmp: Qmp,
    uri: String,
}

impl Disk {
    fn start(dir: &Path, extra: &[String]) -> Disk {
        let sock = path(dir, "nbd.sock");
        let mut args = vec![
            "--blockdev".to_string(),
            format!(
                "driver=file,node-name=sf,filename={}",
                path(dir, "src.qcow2")
            ),
            "--blockdev".to_string(),
            "driver=qcow2,node-name=src,file=sf".to_string(),
            "--nbd-server".to_string(),
            format!("addr.type=unix,addr.path={sock}"),
            "--export".to_string(),
            "type=nbd,id=e0,node-name=src,name=disk,writable=on".to_string(),
        ];
        args.extend_from_slice(extra);
        let mut daemon = Daemon::start(&blockd(), &args).expect("blockd starts");
        let qmp = daemon.qmp().expect("monitor answers");
        wait_path(&sock, LIMIT);
        Disk {
            daemon,
            qmp,
            uri: format!("nbd+unix:///disk?socket={sock}"),
        }
    }

    /// Writes `pattern` over each `(offset, len)` through the export.
    fn write(&self, pattern: u8, ranges: &[(u64, u64)]) {
        let cmds: Vec<String> = ranges
            .iter()
            .map(|(off, len)| format!("write -P {pattern:#x} {off} {len}"))
            .collect();
        let mut args = vec!["-f", "raw"];
        for c in &cmds {
            args.extend(["-c", c]);
        }
        args.push(&self.uri);
        tool("qemu-io", &args);
    }

    /// What the disk holds now, as a raw file `name` in `dir`.
    fn snapshot(&self, dir: &Path, name: &str) -> String {
        let out = path(dir, name);
        tool(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &self.uri, &out],
        );
        out
    }

    /// Runs a job to its end and returns its BLOCK_JOB_COMPLETED event.
    fn finish(&mut self, command: &str, args: Value) -> Value {
        self.qmp.execute(command, args).expect(command);
        self.qmp
            .wait_event("BLOCK_JOB_COMPLETED", LIMIT)
            .expect("the job completes")
    }

    /// A full backup to `full.qcow2` and the bitmap `b0`, started in one transaction.
    fn full_backup(&mut self, dir: &Path) -> String {
        let full = path(dir, "full.qcow2");
        let done = self.finish(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
                {"type": "drive-backup", "data": {"job-id": "f0", "device": "src",
                                                  "target": full, "format": "qcow2",
                                                  "sync": "full"}}]}),
        );
        assert!(done["data"].get("error").is_none(), "{done}");
        full
    }

    fn bitmap(&mut self, name: &str) -> Value {
        let nodes = self
            .qmp
            .execute("query-named-block-nodes", json!({"flat": true}))
            .expect("query-named-block-nodes");
        nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["node-name"] == "src")
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no bitmap {name} on src"))
    }

    fn sha256(&mut self, name: &str) -> String {
        let r = self
            .qmp
            .execute(
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": "src", "name": name}),
            )
            .expect("sha256");
        r["sha256"].as_str().unwrap().to_string()
    }

    fn quit(mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        self.daemon.wait_exit(LIMIT).expect("blockd exits");
    }
}

/// qemu-storage-daemon with `image` as qcow2 node `src`.
fn qsd_on(image: &str) -> (Daemon, Qmp) {
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=f,filename={image}"),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=src,file=f".to_string(),
    ];
    testkit::start_qsd(None, &args, testkit::Session::Negotiated)
        .expect("qemu-storage-daemon starts")
}

fn new_source(dir: &Path) {
    let src = path(dir, "src.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", &src, SIZE]);
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 24M", &src],
    );
}

fn compare(image: &str, reference: &str) {
    let out = try_tool("qemu-img", &["compare", "-F", "raw", image, reference]);
    assert!(
        out.status.success(),
        "{image} differs from {reference}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check(image: &str) {
    tool("qemu-img", &["check", image]);
}

/// Bytes the top layer of `image` allocates (`qemu-img map`, depth 0, data).
fn top_layer_bytes(image: &str) -> u64 {
    let out = tool("qemu-img", &["map", "--output=json", image]);
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// The dirty extents (offset, length) in `nbdinfo --map=qemu:dirty-bitmap:... --json`.
fn dirty_extents(json: &[u8]) -> Vec<(u64, u64)> {
    let map: Value = serde_json::from_slice(json).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == 1)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// An overlay for the next incremental backup, over `backing`.
fn overlay(dir: &Path, name: &str, backing: &str) -> String {
    let img = path(dir, name);
    tool(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", &img, SIZE,
        ],
    );
    img
}

fn incremental(disk: &mut Disk, job: &str, target: &str) -> Value {
    disk.finish(
        "drive-backup",
        json!({"job-id": job, "device": "src", "target": target, "format": "qcow2",
               "mode": "existing", "sync": "incremental", "bitmap": "b0"}),
    )
}

/// A full backup and the bitmap start together; each later incremental backup holds only
/// what changed, and the chain up to it equals the disk at that backup.
#[test]
fn an_incremental_chain_restores_every_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    new_source(d);
    let mut disk = Disk::start(d, &[]);
    let full = disk.full_backup(d);
    let reference = disk.snapshot(d, "ref0.raw");
    compare(&full, &reference);
    check(&full);

    let rounds: [(u8, &[(u64, u64)]); 3] = [
        (0x21, &[(0, 64 << 10), (5 << 20, 4096), (20 << 20, 1 << 20)]),
        (0x22, &[(64 << 10, 128 << 10), (28 << 20, 512)]),
        (0x23, &[(0, 4096), (12 << 20, 3 << 20), (31 << 20, 1 << 20)]),
    ];
    let mut backing = full;
    for (i, (pattern, ranges)) in rounds.iter().enumerate() {
        disk.write(*pattern, ranges);
        let dirty: u64 = ranges
            .iter()
            .map(|(off, len)| (off + len).div_ceil(65536) * 65536 - off / 65536 * 65536)
            .sum();
        assert_eq!(disk.bitmap("b0")["count"], dirty, "round {i}");
        let reference = disk.snapshot(d, &format!("ref{}.raw", i + 1));
        let target = overlay(d, &format!("inc{}.qcow2", i + 1), &backing);
        let done = incremental(&mut disk, &format!("i{i}"), &target);
        assert!(done["data"].get("error").is_none(), "{done}");
        assert_eq!(
            done["data"]["len"], dirty,
            "only the dirty clusters are copied"
        );
        assert_eq!(
            disk.bitmap("b0")["count"],
            0,
            "a successful backup clears the bitmap"
        );
        compare(&target, &reference);
        check(&target);
        assert_eq!(top_layer_bytes(&target), dirty, "round {i}");
        backing = target;
    }
    disk.quit();
}

/// A failing incremental backup (bitmap mode `on-success`) keeps every change in the
/// bitmap, so the next one still restores the disk.
#[test]
fn a_failed_incremental_backup_keeps_its_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    new_source(d);
    let bad = path(d, "bad.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", &bad, SIZE]);
    let mut disk = Disk::start(d, &[]);
    let full = disk.full_backup(d);
    disk.write(0x31, &[(1 << 20, 256 << 10), (17 << 20, 4096)]);
    let (count, sha) = (disk.bitmap("b0")["count"].clone(), disk.sha256("b0"));
    disk.qmp
        .execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "bad", "backing": null,
                   "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": bad},
                            "inject-error": [{"event": "write_aio", "errno": 5}]}}),
        )
        .expect("blockdev-add");
    let done = disk.finish(
        "blockdev-backup",
        json!({"job-id": "x", "device": "src", "target": "bad", "sync": "incremental",
               "bitmap": "b0"}),
    );
    assert!(done["data"]["error"].is_string(), "{done}");
    assert_eq!(disk.bitmap("b0")["count"], count);
    assert_eq!(disk.sha256("b0"), sha, "the bitmap is as it was");
    // Writes during and after the failure are kept too.
    disk.write(0x32, &[(30 << 20, 64 << 10)]);
    let reference = disk.snapshot(d, "ref1.raw");
    let target = overlay(d, "inc1.qcow2", &full);
    let done = incremental(&mut disk, "i1", &target);
    assert!(done["data"].get("error").is_none(), "{done}");
    compare(&target, &reference);
    check(&target);
    disk.quit();
}

/// With bitmap mode `always`, a failing backup clears what it did copy: every range it
/// dropped from the bitmap holds the disk's data on the target.
#[test]
fn a_failed_always_backup_clears_only_what_reached_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    new_source(d);
    let tgt = path(d, "t.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", &tgt, SIZE]);
    let mut disk = Disk::start(d, &[]);
    disk.qmp
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0"}),
        )
        .expect("bitmap");
    // One dirty run of 8 MiB copied in 1 MiB chunks; the write at 6 MiB fails.
    let ranges = [(0u64, 8u64 << 20)];
    disk.write(0x41, &ranges);
    let before = disk.bitmap("b0")["count"].as_u64().unwrap();
    disk.qmp
        .execute(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "t",
                   "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": tgt},
                            "inject-error": [{"event": "write_aio", "errno": 5,
                                              "sector": (6u64 << 20) / 512}]}}),
        )
        .expect("blockdev-add");
    let done = disk.finish(
        "blockdev-backup",
        json!({"job-id": "x", "device": "src", "target": "t", "sync": "bitmap",
               "bitmap": "b0", "bitmap-mode": "always", "x-perf": {"max-workers": 1}}),
    );
    assert!(done["data"]["error"].is_string(), "{done}");
    let after = disk.bitmap("b0")["count"].as_u64().unwrap();
    assert!(after < before && after > 0, "{before} -> {after}");
    let reference = disk.snapshot(d, "ref.raw");
    disk.quit();
    let (got, want) = (
        std::fs::read(&tgt).unwrap(),
        std::fs::read(&reference).unwrap(),
    );
    // The copies ran in order: what is no longer dirty is the first `before - after`
    // bytes, and it is on the target.
    let copied = (before - after) as usize;
    assert_eq!(got[..copied], want[..copied]);
    assert_ne!(
        got[(6 << 20)..(6 << 20) + 512],
        want[(6 << 20)..(6 << 20) + 512]
    );
}

/// A persistent bitmap blockd stores is read by qemu-img with the same bits (merged into a
/// scratch image and read back over NBD from qemu-nbd), and one qemu-img made is loaded
/// by blockd with the bits qemu-storage-daemon sees.
#[test]
fn persistent_bitmaps_interoperate_with_qemu_img_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    new_source(d);
    let src = path(d, "src.qcow2");
    let mut disk = Disk::start(d, &[]);
    disk.qmp
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "p", "persistent": true, "granularity": 131072}),
        )
        .expect("bitmap");
    disk.write(
        0x51,
        &[(300 << 10, 10), (4 << 20, 1 << 20), (31 << 20, 1 << 20)],
    );
    let sha = disk.sha256("p");
    disk.quit();
    check(&src);
    let info = tool("qemu-img", &["info", "--output=json", &src]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(
        bitmaps,
        &json!([{"flags": ["auto"], "name": "p", "granularity": 131072}])
    );
    // qemu-img merges it into a scratch image; qemu-nbd serves that bitmap.
    let scratch = path(d, "scratch.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", &scratch, SIZE]);
    tool(
        "qemu-img",
        &["bitmap", "--add", "-g", "131072", &scratch, "m"],
    );
    tool(
        "qemu-img",
        &[
            "bitmap", "--merge", "p", "-b", &src, "-F", "qcow2", &scratch, "m",
        ],
    );
    let sock = path(d, "qnbd.sock");
    let mut qnbd = std::process::Command::new("qemu-nbd")
        .args(["-r", "-k", &sock, "-B", "m", "-f", "qcow2", &scratch])
        .spawn()
        .expect("qemu-nbd is needed (install qemu-utils)");
    wait_path(&sock, LIMIT);
    let map = tool(
        "nbdinfo",
        &[
            "--map=qemu:dirty-bitmap:m",
            "--json",
            &format!("nbd+unix:///?socket={sock}"),
        ],
    );
    let _ = qnbd.kill();
    let _ = qnbd.wait();
    let dirty = dirty_extents(&map.stdout);
    assert_eq!(
        dirty,
        [
            (256 << 10, 128 << 10),
            (4 << 20, 1 << 20),
            (31 << 20, 1 << 20)
        ]
    );
    // The other way: blockd loads what it stored (and qemu-io then changed) with the bits
    // qemu-storage-daemon sees.
    tool("qemu-io", &["-f", "qcow2", "-c", "write 8M 64k", &src]);
    let copy = path(d, "copy.qcow2");
    std::fs::copy(&src, &copy).unwrap();
    let disk = Disk::start(d, &[]);
    let mut disk = disk;
    let ours = disk.sha256("p");
    assert_ne!(ours, sha, "qemu-io's write is in the bitmap");
    disk.quit();
    let (mut qsd, mut q) = qsd_on(&copy);
    let theirs = q
        .execute(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "src", "name": "p"}),
        )
        .expect("sha256");
    assert_eq!(theirs["sha256"], ours.as_str());
    let _ = q.execute("quit", json!({}));
    let _ = qsd.wait_exit(LIMIT);
}

/// blockd killed while a persistent bitmap is in use leaves it in use on disk; the next
/// open reports it inconsistent as qemu-storage-daemon does, and it can be removed.
#[test]
fn a_bitmap_left_in_use_by_a_crash_is_inconsistent_as_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    new_source(d);
    let src = path(d, "src.qcow2");
    tool("qemu-img", &["bitmap", "--add", &src, "p"]);
    let mut disk = Disk::start(d, &[]);
    disk.write(0x61, &[(0, 1 << 20)]);
    disk.qmp.execute("query-block-exports", json!({})).unwrap();
    disk.daemon.kill();
    let check_out = try_tool("qemu-img", &["check", &src]);
    // Leaked clusters (exit 3) are allowed; corruption (2) is not.
    assert!(
        matches!(check_out.status.code(), Some(0) | Some(3)),
        "{}",
        String::from_utf8_lossy(&check_out.stdout)
    );
    let info = tool("qemu-img", &["info", "--output=json", &src]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"][0]["flags"],
        json!(["in-use", "auto"])
    );
    let copy = path(d, "copy.qcow2");
    std::fs::copy(&src, &copy).unwrap();
    let mut disk = Disk::start(d, &[]);
    let ours = disk.bitmap("p");
    let (mut qsd, mut q) = qsd_on(&copy);
    let nodes = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let theirs = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "src")
        .unwrap()["dirty-bitmaps"][0]
        .clone();
    let _ = q.execute("quit", json!({}));
    let _ = qsd.wait_exit(LIMIT);
    assert_eq!(ours, theirs);
    assert_eq!(ours["inconsistent"], true);
    let clear = disk
        .qmp
        .try_execute(
            "block-dirty-bitmap-clear",
            json!({"node": "src", "name": "p"}),
        )
        .unwrap();
    assert!(clear.is_err(), "an inconsistent bitmap cannot be cleared");
    disk.qmp
        .execute(
            "block-dirty-bitmap-remove",
            json!({"node": "src", "name": "p"}),
        )
        .expect("remove");
    disk.quit();
    check(&src);
    let info = tool("qemu-img", &["info", "--output=json", &src]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info["format-specific"]["data"].get("bitmaps").is_none(),
        "{info}"
    );
}

/// Pull mode: at the point in time a copy-before-write filter (copying only what the bitmap
/// of the changes since the last backup marks) goes over the disk and that bitmap is
/// frozen; its snapshot view is exported with the bitmap; the client reads only the dirty extents (`nbdinfo --map`, `qemu-img
/// dd`) onto the last backup and gets the disk as it was at that point, while the disk is
/// written meanwhile.
#[test]
fn pull_mode_reads_only_the_dirty_extents_of_a_point_in_time_view() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    new_source(d);
    let fleece = path(d, "fleece.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", &fleece, SIZE]);
    let extra = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=ff,filename={fleece}"),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=fl,file=ff,backing=src".to_string(),
    ];
    let mut disk = Disk::start(d, &extra);
    let full = disk.full_backup(d);
    let written = [
        (64u64 << 10, 64u64 << 10),
        (10 << 20, 200 << 10),
        (31 << 20, 4096),
    ];
    disk.write(0x71, &written);
    let reference = disk.snapshot(d, "ref.raw");
    // The point in time: the live disk goes through the filter from now on.
    disk.qmp
        .execute("block-export-del", json!({"id": "e0"}))
        .expect("block-export-del");
    disk.qmp
        .wait_event("BLOCK_EXPORT_DELETED", LIMIT)
        .expect("export gone");
    disk.qmp
        .execute(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b1"}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b0"}}]}),
        )
        .expect("transaction");
    for (args, what) in [
        (
            json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "fl",
                   "bitmap": {"node": "src", "name": "b0"}}),
            "copy-before-write",
        ),
        (
            json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
            "snapshot-access",
        ),
        (
            json!({"type": "nbd", "id": "live", "node-name": "cbw", "name": "disk", "writable": true}),
            "live export",
        ),
        (
            json!({"type": "nbd", "id": "pit", "node-name": "acc", "name": "pit",
                   "bitmaps": [{"node": "src", "name": "b0"}]}),
            "point-in-time export",
        ),
    ] {
        let command = if what.ends_with("export") {
            "block-export-add"
        } else {
            "blockdev-add"
        };
        disk.qmp.execute(command, args).expect(what);
    }
    // The disk changes on, also where the backup still has to read.
    disk.write(0x72, &[(10 << 20, 64 << 10), (20 << 20, 1 << 20)]);
    let pit = disk.uri.replace("/disk?", "/pit?");
    let sock = path(d, "nbd.sock");
    let map = tool("nbdinfo", &["--map=qemu:dirty-bitmap:b0", "--json", &pit]);
    let dirty = dirty_extents(&map.stdout);
    assert_eq!(
        dirty,
        [
            (64 << 10, 64 << 10),
            (10 << 20, 256 << 10),
            (31 << 20, 64 << 10)
        ]
    );
    // Onto the last backup go only the dirty extents of the view.
    let restored = path(d, "restored.raw");
    tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", &full, &restored],
    );
    let mut image = std::fs::read(&restored).unwrap();
    for (offset, length) in dirty {
        let piece = path(d, "piece.raw");
        let _ = std::fs::remove_file(&piece);
        // A raw view of just this extent, read from the export.
        let view = format!(
            "driver=raw,offset={offset},size={length},file.driver=nbd,\
             file.server.type=unix,file.server.path={sock},file.export=pit"
        );
        tool(
            "qemu-img",
            &["convert", "--image-opts", &view, "-O", "raw", &piece],
        );
        let bytes = std::fs::read(&piece).unwrap();
        assert_eq!(bytes.len() as u64, length);
        image[offset as usize..(offset + length) as usize].copy_from_slice(&bytes);
    }
    std::fs::write(&restored, &image).unwrap();
    compare(&restored, &reference);
    // The filter keeps only what the bitmap marks: the rest of the view cannot be read.
    let clean = try_tool("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &pit]);
    let said = String::from_utf8_lossy(&clean.stdout).to_string()
        + &String::from_utf8_lossy(&clean.stderr);
    assert!(said.contains("failed"), "{said}");
    disk.quit();
}
