//! Black-box backups: `blockdev-backup` through the `blockd` binary in each sync mode, raw
//! and qcow2 sources (a backing chain for `top`), targets checked with `qemu-img compare`
//! and `qemu-img check`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use testkit::tools::{path as p, tool as run};
use testkit::{Daemon, Qmp};

const LIMIT: Duration = Duration::from_secs(30);

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

/// Starts blockd with `src` and `tgt` nodes of the given formats over the files.
fn start(dir: &Path, src_fmt: &str, tgt_fmt: &str) -> (Daemon, Qmp) {
    start_with(dir, src_fmt, tgt_fmt, &[])
}

/// [`start`] with more arguments after the nodes.
fn start_with(dir: &Path, src_fmt: &str, tgt_fmt: &str, extra: &[String]) -> (Daemon, Qmp) {
    let mut args = vec![
        "--blockdev".to_string(),
        format!("driver=file,node-name=sf,filename={}", p(dir, "src.img")),
        "--blockdev".to_string(),
        format!("driver={src_fmt},node-name=src,file=sf"),
        "--blockdev".to_string(),
        format!("driver=file,node-name=tf,filename={}", p(dir, "tgt.img")),
        "--blockdev".to_string(),
        format!("driver={tgt_fmt},node-name=tgt,file=tf"),
    ];
    args.extend_from_slice(extra);
    let mut daemon = Daemon::start(&blockd(), &args).expect("blockd starts");
    // `qmp()` connects and negotiates.
    let qmp = daemon.qmp().expect("monitor answers");
    (daemon, qmp)
}

/// [`start`] with qcow2 nodes and `src` exported writable over NBD as `disk`; returns the
/// export's URI too.
fn start_exported(dir: &Path) -> (Daemon, Qmp, String) {
    let sock = p(dir, "nbd.sock");
    let extra = [
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={sock}"),
        "--export".to_string(),
        "type=nbd,id=e0,node-name=src,name=disk,writable=on".to_string(),
    ];
    let (daemon, qmp) = start_with(dir, "qcow2", "qcow2", &extra);
    wait_path(&sock);
    (daemon, qmp, format!("nbd+unix:///disk?socket={sock}"))
}

/// Waits for the NBD server's socket (the monitor's can appear first).
fn wait_path(path: &str) {
    let deadline = std::time::Instant::now() + LIMIT;
    while !Path::new(path).exists() {
        assert!(std::time::Instant::now() < deadline, "no {path}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a backup to its end and returns the BLOCK_JOB_COMPLETED event.
fn backup(qmp: &mut Qmp, sync: &str) -> Value {
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": sync}),
    )
    .expect("blockdev-backup");
    let done = qmp
        .wait_event("BLOCK_JOB_COMPLETED", LIMIT)
        .expect("the job completes");
    assert!(done["data"].get("error").is_none(), "{done}");
    done
}

fn quit(mut daemon: Daemon, mut qmp: Qmp) {
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(LIMIT).expect("blockd exits");
}

#[test]
fn full_backup_of_raw_to_raw_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (p(dir.path(), "src.img"), p(dir.path(), "tgt.img"));
    run("qemu-img", &["create", "-q", "-f", "raw", &src, "16M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 1M 3M",
            "-c",
            "write -P 0x4d 9M 100k",
            &src,
        ],
    );
    run("qemu-img", &["create", "-q", "-f", "raw", &tgt, "16M"]);
    let (daemon, mut qmp) = start(dir.path(), "raw", "raw");
    let done = backup(&mut qmp, "full");
    assert_eq!(done["data"]["len"], json!(16 << 20));
    quit(daemon, qmp);
    run(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "raw", &src, &tgt],
    );
}

#[test]
fn full_backup_of_qcow2_to_qcow2_is_identical_and_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (p(dir.path(), "src.img"), p(dir.path(), "tgt.img"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &src, "16M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x3c 0 2M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 0x4d 12M 64k",
            &src,
        ],
    );
    run("qemu-img", &["create", "-q", "-f", "qcow2", &tgt, "16M"]);
    let (daemon, mut qmp) = start(dir.path(), "qcow2", "qcow2");
    backup(&mut qmp, "full");
    quit(daemon, qmp);
    run("qemu-img", &["compare", "-q", &src, &tgt]);
    run("qemu-img", &["check", "-q", &tgt]);
    run("qemu-img", &["check", "-q", &src]);
}

/// `top` copies only what the top image allocates: the target, put over the same backing
/// file, reads as the source.
#[test]
fn top_backup_copies_the_top_layer_only() {
    let dir = tempfile::tempdir().unwrap();
    let (base, src, tgt) = (
        p(dir.path(), "base.img"),
        p(dir.path(), "src.img"),
        p(dir.path(), "tgt.img"),
    );
    run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "8M"]);
    run("qemu-io", &["-c", "write -P 0x11 0 8M", &base]);
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &src,
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x22 1M 128k",
            "-c",
            "write -P 0x33 6M 64k",
            &src,
        ],
    );
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &tgt,
        ],
    );
    let (daemon, mut qmp) = start(dir.path(), "qcow2", "qcow2");
    let done = backup(&mut qmp, "top");
    assert_eq!(
        done["data"]["len"],
        json!(192 << 10),
        "only the top layer: {done}"
    );
    quit(daemon, qmp);
    run("qemu-img", &["compare", "-q", &src, &tgt]);
    run("qemu-img", &["check", "-q", &tgt]);
    let map = run("qemu-img", &["map", "--output=json", &tgt]);
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let top_bytes: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == json!(0) && e["data"] == json!(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(
        top_bytes,
        192 << 10,
        "the target's own layer holds the copy"
    );
}

/// `none` copies nothing until cancelled; the cancel event reports nothing done.
#[test]
fn none_backup_waits_for_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (p(dir.path(), "src.img"), p(dir.path(), "tgt.img"));
    run("qemu-img", &["create", "-q", "-f", "raw", &src, "4M"]);
    run("qemu-img", &["create", "-q", "-f", "raw", &tgt, "4M"]);
    let (daemon, mut qmp) = start(dir.path(), "raw", "raw");
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "none"}),
    )
    .expect("blockdev-backup");
    std::thread::sleep(Duration::from_millis(300));
    let jobs = qmp.execute("query-block-jobs", json!({})).unwrap();
    assert_eq!(jobs[0]["status"], json!("running"), "{jobs}");
    qmp.execute("block-job-cancel", json!({"device": "b"}))
        .unwrap();
    let ev = qmp.wait_event("BLOCK_JOB_CANCELLED", LIMIT).unwrap();
    assert_eq!(ev["data"]["offset"], json!(0), "{ev}");
    quit(daemon, qmp);
}

/// `drive-backup` creates its target: a full copy as a new qcow2, and a `top` copy as a new
/// qcow2 over the source's backing file; both read as the source.
#[test]
fn drive_backup_creates_full_and_top_targets() {
    let dir = tempfile::tempdir().unwrap();
    let (base, src) = (p(dir.path(), "base.img"), p(dir.path(), "src.img"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "8M"]);
    run("qemu-io", &["-c", "write -P 0x11 0 8M", &base]);
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &src,
        ],
    );
    run("qemu-io", &["-c", "write -P 0x22 1M 192k", &src]);
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &p(dir.path(), "tgt.img"), "8M"],
    );
    let (daemon, mut qmp) = start(dir.path(), "qcow2", "raw");
    let (full, top) = (p(dir.path(), "full.qcow2"), p(dir.path(), "top.qcow2"));
    for (id, target, sync) in [("f", &full, "full"), ("t", &top, "top")] {
        qmp.execute(
            "drive-backup",
            json!({"job-id": id, "device": "src", "target": target, "sync": sync, "format": "qcow2"}),
        )
        .expect("drive-backup");
        let done = qmp.wait_event("BLOCK_JOB_COMPLETED", LIMIT).unwrap();
        assert!(done["data"].get("error").is_none(), "{done}");
    }
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let files: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["file"].as_str().unwrap())
        .collect();
    assert!(
        !files
            .iter()
            .any(|f| f.ends_with("full.qcow2") || f.ends_with("top.qcow2")),
        "the targets are closed: {files:?}"
    );
    quit(daemon, qmp);
    for target in [&full, &top] {
        run("qemu-img", &["compare", "-q", &src, target]);
        run("qemu-img", &["check", "-q", target]);
    }
    let info = run("qemu-img", &["info", "--output=json", &top]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], json!(base), "{info}");
    assert!(
        std::fs::metadata(&top).unwrap().len() < std::fs::metadata(&full).unwrap().len(),
        "the top copy holds only the top layer"
    );
}

/// `quit` in the middle of a throttled backup cancels it and closes the nodes: both the
/// source and the half-written qcow2 target pass `qemu-img check`.
#[test]
fn quit_mid_backup_leaves_valid_images() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (p(dir.path(), "src.img"), p(dir.path(), "tgt.img"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &src, "16M"]);
    run("qemu-io", &["-c", "write -P 0x5a 0 16M", &src]);
    run("qemu-img", &["create", "-q", "-f", "qcow2", &tgt, "16M"]);
    let (daemon, mut qmp) = start(dir.path(), "qcow2", "qcow2");
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": 1048576}),
    )
    .expect("blockdev-backup");
    std::thread::sleep(Duration::from_millis(500));
    quit(daemon, qmp);
    run("qemu-img", &["check", "-q", &src]);
    run("qemu-img", &["check", "-q", &tgt]);
    let info = run("qemu-img", &["info", "--output=json", &tgt]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["dirty-flag"], json!(false), "{info}");
}

/// The point in time: a throttled backup of a 1 GiB qcow2 while fio hammers the source
/// through an NBD export for the whole run. The target equals the source as it was when the
/// job started, and fio's verification reads back every write from the source.
#[test]
fn backup_is_a_point_in_time_while_a_client_writes_through_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt, snap) = (
        p(dir.path(), "src.img"),
        p(dir.path(), "tgt.img"),
        p(dir.path(), "snap.qcow2"),
    );
    run("qemu-img", &["create", "-q", "-f", "qcow2", &src, "1G"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 32M",
            "-c",
            "write -P 0x22 512M 32M",
            "-c",
            "write -P 0x33 1000M 24M",
            &src,
        ],
    );
    run("qemu-img", &["create", "-q", "-f", "qcow2", &tgt, "1G"]);
    std::fs::copy(&src, &snap).unwrap();
    let (daemon, mut qmp, uri) = start_exported(dir.path());
    qmp.execute(
        "blockdev-backup",
        // At 32 MiB/s the job needs half a minute: fio is done long before.
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": 32 << 20}),
    )
    .expect("blockdev-backup");
    // fio writes (and then verifies) over the whole disk while the job runs.
    let fio = Command::new("fio")
        .args([
            "--name=hammer",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=1G",
            "--io_size=24M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
        ])
        .output()
        .expect("fio is needed (apt-get install fio)");
    assert!(
        fio.status.success(),
        "fio failed:\n{}{}",
        String::from_utf8_lossy(&fio.stdout),
        String::from_utf8_lossy(&fio.stderr)
    );
    let jobs = qmp.execute("query-block-jobs", json!({})).unwrap();
    assert_eq!(
        jobs[0]["status"],
        json!("running"),
        "the writes ran during the job: {jobs}"
    );
    qmp.execute("block-job-set-speed", json!({"device": "b", "speed": 0}))
        .unwrap();
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", LIMIT).unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    quit(daemon, qmp);
    run("qemu-img", &["compare", "-q", &snap, &tgt]);
    run("qemu-img", &["check", "-q", &src]);
    run("qemu-img", &["check", "-q", &tgt]);
    let changed = Command::new("qemu-img")
        .args(["compare", "-q", &snap, &src])
        .status()
        .unwrap();
    assert!(!changed.success(), "fio's writes are in the source");
}

/// Polls `query-block-jobs` until job `id` satisfies `cond`; returns that job's entry.
fn wait_job(qmp: &mut Qmp, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let jobs = qmp.execute("query-block-jobs", json!({})).unwrap();
        if let Some(job) = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["device"] == json!(id))
        {
            if cond(job) {
                return job.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} never {what}: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The target runs out of space once (blkdebug fails one write with ENOSPC): under
/// `on-target-error=enospc` the job pauses with io-status `nospace`, a resume clears the
/// status and retries, and the finished target equals the source.
#[test]
fn enospc_on_the_target_pauses_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (p(dir.path(), "src.img"), p(dir.path(), "tgt.img"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &src, "4M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x61 0 3M",
            "-c",
            "write -P 0x62 3M 1M",
            &src,
        ],
    );
    run("qemu-img", &["create", "-q", "-f", "raw", &tgt, "4M"]);
    let target = json!({
        "driver": "raw", "node-name": "tgt",
        "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "write_aio", "errno": 28, "once": true}],
            "image": {"driver": "file", "filename": tgt},
        },
    });
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=sf,filename={src}"),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=src,file=sf".to_string(),
        "--blockdev".to_string(),
        target.to_string(),
    ];
    let mut daemon = Daemon::start(&blockd(), &args).expect("blockd starts");
    let mut qmp = daemon.qmp().expect("monitor answers");
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full",
               "on-target-error": "enospc", "speed": 1 << 20}),
    )
    .expect("blockdev-backup");
    let err = qmp.wait_event("BLOCK_JOB_ERROR", LIMIT).unwrap();
    assert_eq!(
        err["data"],
        json!({"device": "b", "operation": "write", "action": "stop"})
    );
    let job = wait_job(&mut qmp, "b", "paused", |j| j["status"] == json!("paused"));
    assert_eq!(job["io-status"], json!("nospace"), "{job}");
    qmp.execute("block-job-resume", json!({"device": "b"}))
        .unwrap();
    let job = wait_job(&mut qmp, "b", "ran again", |j| {
        j["status"] != json!("paused")
    });
    assert_eq!(job["io-status"], json!("ok"), "a resume clears it: {job}");
    qmp.execute("block-job-set-speed", json!({"device": "b", "speed": 0}))
        .unwrap();
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", LIMIT).unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], json!(4 << 20), "{done}");
    quit(daemon, qmp);
    run("qemu-img", &["compare", "-q", "-F", "raw", &src, &tgt]);
}

/// One acknowledged guest write: `len` bytes of `pattern` at `offset`.
struct Acked {
    offset: u64,
    len: usize,
    pattern: u8,
}

/// blockd killed with SIGKILL in the middle of a throttled qcow2 backup while a client
/// writes the source through NBD: neither image is corrupted (leaked clusters are allowed),
/// and every write whose flush was acknowledged before the kill is in the source.
#[test]
fn sigkill_mid_backup_corrupts_nothing_and_keeps_acknowledged_writes() {
    const CHUNK: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (p(dir.path(), "src.img"), p(dir.path(), "tgt.img"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &src, "16M"]);
    run("qemu-io", &["-c", "write -P 0x5a 0 12M", &src]);
    run("qemu-img", &["create", "-q", "-f", "qcow2", &tgt, "16M"]);
    let (mut daemon, mut qmp, uri) = start_exported(dir.path());
    qmp.execute(
        "blockdev-backup",
        // 16 MiB at 512 KiB/s: half a minute, far longer than the writes below.
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": 512 << 10}),
    )
    .expect("blockdev-backup");
    // Every write is its own qemu-io over NBD, written and flushed: acknowledged once
    // qemu-io succeeds. Distinct clusters, half of them over data the backup still needs.
    let mut acked = Vec::new();
    for i in 0..24u64 {
        let (offset, pattern) = (i * 5 * CHUNK + 4096, 0x80 + i as u8);
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {pattern} {offset} 8k"),
                "-c",
                "flush",
                &uri,
            ])
            .output()
            .expect("qemu-io is needed (install qemu-utils)");
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
            "write {i} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        acked.push(Acked {
            offset,
            len: 8 << 10,
            pattern,
        });
    }
    let job = wait_job(&mut qmp, "b", "started copying", |j| {
        j["offset"].as_u64().unwrap() > 0
    });
    assert!(
        job["offset"].as_u64().unwrap() < job["len"].as_u64().unwrap(),
        "the job is mid-way: {job}"
    );
    // One more write in flight while the daemon dies: it may or may not land.
    let mut last = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xee 15M 64k", &uri])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    daemon.kill();
    let _ = last.wait();
    for image in [&src, &tgt] {
        let out = Command::new("qemu-img")
            .args(["check", "--output=json", image])
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("qemu-img check {image}: {e}: {out:?}"));
        // Exit status 3 means leaked clusters only, which an interrupted write may leave.
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "{image} is corrupt: {report}"
        );
        assert!(report.get("corruptions").is_none(), "{image}: {report}");
    }
    let flat = p(dir.path(), "src.raw");
    run("qemu-img", &["convert", "-O", "raw", &src, &flat]);
    let data = std::fs::read(&flat).unwrap();
    for w in &acked {
        let at = w.offset as usize;
        assert!(
            data[at..at + w.len].iter().all(|&b| b == w.pattern),
            "the acknowledged write of {:#x} at {:#x} is lost",
            w.pattern,
            w.offset
        );
    }
    // Around the writes, the source still holds what it had.
    assert!(data[..4096].iter().all(|&b| b == 0x5a));
}

/// `compress: true` onto a qcow2 target: the clusters are stored compressed (`qemu-img map`
/// says so), the image is clean, reads as the source and is smaller than an uncompressed
/// copy; an incompressible cluster is stored as it is.
#[test]
fn compressed_backup_stores_compressed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt, plain) = (
        p(dir.path(), "src.img"),
        p(dir.path(), "tgt.img"),
        p(dir.path(), "plain.img"),
    );
    run("qemu-img", &["create", "-q", "-f", "qcow2", &src, "8M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x3c 0 4M",
            "-c",
            "write -P 0x4d 6M 1M",
            &src,
        ],
    );
    // One cluster of random bytes does not compress.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    let noise_file = p(dir.path(), "noise.bin");
    std::fs::write(&noise_file, &noise).unwrap();
    run(
        "qemu-io",
        &["-c", &format!("write -s {noise_file} 7M 64k"), &src],
    );
    for t in [&tgt, &plain] {
        run("qemu-img", &["create", "-q", "-f", "qcow2", t, "8M"]);
    }
    let (daemon, mut qmp) = start(dir.path(), "qcow2", "qcow2");
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "compress": true}),
    )
    .expect("blockdev-backup");
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", LIMIT).unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    quit(daemon, qmp);
    run("qemu-img", &["check", "-q", &tgt]);
    run("qemu-img", &["compare", "-q", &src, &tgt]);
    run("qemu-img", &["convert", "-O", "qcow2", &src, &plain]);
    let map = run("qemu-img", &["map", "--output=json", &tgt]);
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let bytes = |compressed: bool| -> u64 {
        map.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == json!(true) && e["compressed"] == json!(compressed))
            .map(|e| e["length"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(bytes(true), 5 << 20, "the patterns are compressed: {map}");
    assert_eq!(bytes(false), 64 << 10, "the noise is not: {map}");
    let (small, big) = (
        std::fs::metadata(&tgt).unwrap().len(),
        std::fs::metadata(&plain).unwrap().len(),
    );
    assert!(small * 4 < big, "compressed {small} vs plain {big}");
}

/// `x-perf.max-chunk` bounds the bytes of one copy: at a crawling speed the job starts one
/// copy and waits, and that copy is one chunk (rounded down to whole clusters); without it
/// a copy is 1 MiB.
#[test]
fn max_chunk_bounds_the_bytes_of_one_copy() {
    for (perf, chunk) in [
        (json!({"max-chunk": 196608}), 196608),
        (json!({"max-chunk": 200000}), 196608),
        (json!({"max-workers": 1}), 1 << 20),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (src, tgt) = (p(dir.path(), "src.img"), p(dir.path(), "tgt.img"));
        run("qemu-img", &["create", "-q", "-f", "raw", &src, "4M"]);
        run("qemu-io", &["-f", "raw", "-c", "write -P 0x77 0 4M", &src]);
        run("qemu-img", &["create", "-q", "-f", "raw", &tgt, "4M"]);
        let (daemon, mut qmp) = start(dir.path(), "raw", "raw");
        qmp.execute(
            "blockdev-backup",
            json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full",
                   "speed": 1, "x-perf": perf}),
        )
        .expect("blockdev-backup");
        let job = wait_job(&mut qmp, "b", "copied", |j| j["offset"] != json!(0));
        assert_eq!(job["offset"], json!(chunk), "{perf}: {job}");
        qmp.execute("block-job-cancel", json!({"device": "b", "force": true}))
            .unwrap();
        qmp.wait_event("BLOCK_JOB_CANCELLED", LIMIT).unwrap();
        quit(daemon, qmp);
        let copied = std::fs::read(&tgt).unwrap();
        let end = copied.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        assert_eq!(end, chunk as usize, "{perf}: one copy reached the target");
    }
}

/// An 8 MiB qcow2 `src.img` with `writes` (qemu-io commands), a copy of it `orig.img` and an
/// empty qcow2 `tgt.img`; returns the three paths.
fn qcow2_images(dir: &Path, writes: &[&str]) -> (String, String, String) {
    let (src, tgt, orig) = (p(dir, "src.img"), p(dir, "tgt.img"), p(dir, "orig.img"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &src, "8M"]);
    let mut args: Vec<&str> = writes.iter().flat_map(|w| ["-c", w]).collect();
    args.push(&src);
    run("qemu-io", &args);
    std::fs::copy(&src, &orig).unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &tgt, "8M"]);
    (src, tgt, orig)
}

/// `discard-source`: each copied range is discarded on the source (which allows it with
/// `discard=unmap`); the target holds what the source held.
#[test]
fn discard_source_empties_the_source_behind_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt, orig) = qcow2_images(dir.path(), &["write -P 0x21 0 3M", "write -P 0x22 5M 2M"]);
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=sf,filename={src},discard=unmap"),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=src,file=sf,discard=unmap".to_string(),
        "--blockdev".to_string(),
        format!("driver=file,node-name=tf,filename={tgt}"),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=tgt,file=tf".to_string(),
    ];
    let mut daemon = Daemon::start(&blockd(), &args).expect("blockd starts");
    let mut qmp = daemon.qmp().expect("monitor answers");
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "discard-source": true}),
    )
    .expect("blockdev-backup");
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", LIMIT).unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    quit(daemon, qmp);
    run("qemu-img", &["compare", "-q", &orig, &tgt]);
    run("qemu-img", &["check", "-q", &src]);
    let map = run("qemu-img", &["map", "--output=json", &src]);
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .all(|e| e["data"] == json!(false)),
        "nothing left in the source: {map}"
    );
}

/// Fleecing: a `copy-before-write` node over the source with a qcow2 temporary image (backed
/// by the source) as target, and a `snapshot-access` node over it, exported over NBD. The
/// disk stays live through an export of the filter; the snapshot export keeps showing the
/// data of the moment the filter was added, and only the overwritten clusters land in the
/// temporary image.
#[test]
fn fleecing_exports_a_point_in_time_while_the_disk_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tmp, orig) = qcow2_images(dir.path(), &["write -P 0x11 0 4M", "write -P 0x12 6M 1M"]);
    let sock = p(dir.path(), "nbd.sock");
    let extra = [
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={sock}"),
    ];
    // The temporary image reads as the source where it holds nothing.
    let (daemon, mut qmp) = start_with(dir.path(), "qcow2", "qcow2,backing=src", &extra);
    wait_path(&sock);
    qmp.execute(
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgt"}),
    )
    .expect("copy-before-write");
    qmp.execute(
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
    )
    .expect("snapshot-access");
    for (id, node, name, writable) in [("d", "cbw", "disk", true), ("s", "acc", "snap", false)] {
        qmp.execute(
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": node, "name": name, "writable": writable}),
        )
        .expect("block-export-add");
    }
    let disk = format!("nbd+unix:///disk?socket={sock}");
    let snap = format!("nbd+unix:///snap?socket={sock}");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x99 0 1M",
            "-c",
            "write -P 0x98 3140k 8k",
            "-c",
            "write -z 6M 64k",
            "-c",
            "write -P 0x97 7M 64k",
            &disk,
        ],
    );
    // The disk has the new data, the snapshot the old.
    run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x99 0 1M",
            "-c",
            "read -P 0x98 3140k 8k",
            &disk,
        ],
    );
    run(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "qcow2", &snap, &orig],
    );
    let changed = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2", &disk, &orig])
        .status()
        .unwrap();
    assert!(!changed.success(), "the disk changed");
    // Writing the snapshot is refused; the disk goes on taking writes.
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &snap])
        .output()
        .unwrap();
    assert!(
        !refused.status.success() || String::from_utf8_lossy(&refused.stdout).contains("failed"),
        "snapshot write: {refused:?}"
    );
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x96 2M 64k", &disk],
    );
    run(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "qcow2", &snap, &orig],
    );
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let cbw = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == json!("cbw"))
        .unwrap();
    // 1M + 64k (the 8k write) + 64k + 64k + 64k copied, of 8M.
    let copied = (1 << 20) + 4 * (64 << 10);
    assert_eq!(
        cbw["dirty-bitmaps"][1]["count"],
        json!(copied),
        "copied clusters: {cbw}"
    );
    assert_eq!(cbw["dirty-bitmaps"][2]["count"], json!((8 << 20) - copied));
    for id in ["d", "s"] {
        qmp.execute("block-export-del", json!({"id": id})).unwrap();
        qmp.wait_event("BLOCK_EXPORT_DELETED", LIMIT).unwrap();
    }
    for node in ["acc", "cbw", "tgt", "tf"] {
        qmp.execute("blockdev-del", json!({"node-name": node}))
            .expect("blockdev-del");
    }
    quit(daemon, qmp);
    run("qemu-img", &["check", "-q", &src]);
    run("qemu-img", &["check", "-q", &tmp]);
    // Only the overwritten clusters were copied into the temporary image.
    let map = run("qemu-img", &["map", "--output=json", "-f", "qcow2", &tmp]);
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let own: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == json!(0) && e["present"] == json!(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(own, copied, "{map}");
}
