//! `snapshot-bench`: qcow2 internal snapshots in blockd and in qemu-storage-daemon, side by
//! side in one run.
//!
//! The image is a qcow2 (64 KiB clusters) fully allocated with random data. Two workloads:
//!
//! - create and delete: on a fresh copy of the image per daemon and round, exported
//!   writable over NBD, fio first writes 4 KiB blocks at random for a few seconds (no
//!   snapshot yet: the 0-snapshot write figure), then `blockdev-snapshot-internal-sync` and
//!   `blockdev-snapshot-delete-internal-sync` run in turn, each timed from the command to its
//!   reply, a few times (median). `qemu-img snapshot -c` / `-d` on another fresh copy give a
//!   third column (process start included). Every image must pass `qemu-img check` after.
//! - 4 KiB random-write IOPS with 10 and 50 snapshots present: the snapshots are taken once
//!   by `qemu-img snapshot -c`, so both daemons get the same image, and every run gets a
//!   fresh copy of it (each first write to a cluster copies it away from the snapshots).
//!
//! Rounds alternate which daemon goes first; medians and ratios are reported; timing is
//! never asserted.
//!
//! ```text
//! cargo build --release -p daemon -p bench
//! target/release/snapshot-bench [--rounds N] [--size-mib N] [--dir DIR] [--out BENCHMARKS.md]
//! ```

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use testkit::Qmp;

const START_MARK: &str = "<!-- snapshot-bench:start -->";
const END_MARK: &str = "<!-- snapshot-bench:end -->";

/// Create/delete pairs timed per daemon run.
const PAIRS: usize = 3;
/// Length of each 4 KiB random-write run.
const WRITE_SECONDS: u64 = 3;
/// Snapshot counts of the write runs (0 is measured in the create/delete run).
const SNAPSHOT_COUNTS: [usize; 2] = [10, 50];

/// The command-line nodes: `disk` (qcow2) over `image`.
fn nodes(image: &Path) -> Result<Vec<String>> {
    Ok(vec![
        "--blockdev".to_string(),
        format!("driver=file,node-name=f,filename={}", bench::utf8(image)?),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=disk,file=f".to_string(),
    ])
}

fn execute(qmp: &mut Qmp, command: &str, args: Value) -> Result<Duration> {
    let started = Instant::now();
    qmp.execute(command, args)
        .map_err(|e| anyhow::anyhow!("{command}: {e:?}"))?;
    Ok(started.elapsed())
}

/// `qemu-img check` must find nothing wrong (no leaks either).
fn check(image: &Path, who: &str) -> Result<()> {
    bench::run(
        "qemu-img",
        "qemu-utils",
        &["check", "-q", bench::utf8(image)?],
    )
    .map_err(|e| anyhow::anyhow!("{who} left an image qemu-img check rejects: {e}"))?;
    Ok(())
}

/// What one daemon run on a fresh copy of the image measured.
struct Run {
    iops: f64,
    create: Vec<Duration>,
    delete: Vec<Duration>,
}

/// A fresh copy of `base`: the 0-snapshot writes, then [`PAIRS`] timed create/delete pairs.
fn create_delete(binary: &Path, dir: &Path, base: &Path, mib: u64) -> Result<Run> {
    let image = dir.join("work.qcow2");
    std::fs::copy(base, &image)?;
    let (mut daemon, uri) = bench::start_exporting(binary, dir, &nodes(&image)?, "disk")?;
    let mut qmp = daemon.qmp()?;
    let iops = bench::randwrite_4k_iops(&uri, mib, WRITE_SECONDS)?;
    let mut run = Run {
        iops,
        create: Vec::new(),
        delete: Vec::new(),
    };
    for _ in 0..PAIRS {
        bench::run("sync", "coreutils", &[])?;
        let args = json!({"device": "disk", "name": "bench"});
        run.create.push(execute(
            &mut qmp,
            "blockdev-snapshot-internal-sync",
            args.clone(),
        )?);
        bench::run("sync", "coreutils", &[])?;
        run.delete.push(execute(
            &mut qmp,
            "blockdev-snapshot-delete-internal-sync",
            args,
        )?);
    }
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(Duration::from_secs(60))?;
    check(&image, &binary.display().to_string())?;
    Ok(run)
}

/// [`PAIRS`] `qemu-img snapshot -c` / `-d` pairs on a fresh copy of `base`.
fn qemu_img_pairs(dir: &Path, base: &Path) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let image = dir.join("work.qcow2");
    std::fs::copy(base, &image)?;
    let img = bench::utf8(&image)?;
    let (mut create, mut delete) = (Vec::new(), Vec::new());
    for _ in 0..PAIRS {
        for (flag, times) in [("-c", &mut create), ("-d", &mut delete)] {
            bench::run("sync", "coreutils", &[])?;
            let started = Instant::now();
            bench::run("qemu-img", "qemu-utils", &["snapshot", flag, "bench", img])?;
            times.push(started.elapsed());
        }
    }
    check(&image, "qemu-img")?;
    Ok((create, delete))
}

/// 4 KiB random-write IOPS on a fresh copy of `base` (which holds snapshots).
fn iops_with_snapshots(binary: &Path, dir: &Path, base: &Path, mib: u64) -> Result<f64> {
    let image = dir.join("work.qcow2");
    std::fs::copy(base, &image)?;
    let (mut daemon, uri) = bench::start_exporting(binary, dir, &nodes(&image)?, "disk")?;
    let mut qmp = daemon.qmp()?;
    let iops = bench::randwrite_4k_iops(&uri, mib, WRITE_SECONDS)?;
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(Duration::from_secs(60))?;
    check(&image, &binary.display().to_string())?;
    Ok(iops)
}

/// Copies of `base` with each of [`SNAPSHOT_COUNTS`] snapshots, taken by qemu-img.
fn with_snapshots(dir: &Path, base: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut taken = 0;
    let mut from = base.to_path_buf();
    for n in SNAPSHOT_COUNTS {
        let image = dir.join(format!("snapshots{n}.qcow2"));
        std::fs::copy(&from, &image)?;
        let img = bench::utf8(&image)?;
        for i in taken..n {
            bench::run(
                "qemu-img",
                "qemu-utils",
                &["snapshot", "-c", &format!("s{i}"), img],
            )?;
        }
        taken = n;
        from = image.clone();
        out.push(image);
    }
    Ok(out)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let load = bench::loadavg();
    let opts = bench::SideBySide::parse("snapshot-bench", 3, 4096)?;
    let dir = opts.workdir("snapshot-bench-")?;
    eprintln!("making a {} MiB qcow2 full of random data", opts.size_mib);
    let base = bench::random_qcow2(dir.path(), opts.size_mib, 1, false)?;
    let snapshotted = with_snapshots(dir.path(), &base)?;
    let sides = [("blockd", opts.blockd.clone()), ("qemu", opts.qsd.clone())];
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    let mut iops: [Vec<Vec<f64>>; 2] = [Vec::new(), Vec::new()];
    let (mut img_create, mut img_delete) = (Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (side, binary) = (&sides[i].0, &sides[i].1);
            let run = create_delete(binary, dir.path(), &base, opts.size_mib)?;
            let mut with = Vec::new();
            for image in &snapshotted {
                with.push(iops_with_snapshots(
                    binary,
                    dir.path(),
                    image,
                    opts.size_mib,
                )?);
            }
            eprintln!(
                "round {}/{} {side:>6} create {:.1} ms, delete {:.1} ms; 4 KiB writes {:.0} / {:.0} / {:.0} IOPS with 0 / 10 / 50 snapshots",
                round + 1,
                opts.rounds,
                millis(bench::median(&run.create)),
                millis(bench::median(&run.delete)),
                run.iops,
                with[0],
                with[1]
            );
            runs[i].push(run);
            iops[i].push(with);
        }
        let (c, d) = qemu_img_pairs(dir.path(), &base)?;
        img_create.extend(c);
        img_delete.extend(d);
    }
    let times = |i: usize, create: bool| {
        let all: Vec<Duration> = runs[i]
            .iter()
            .flat_map(|r| if create { &r.create } else { &r.delete })
            .copied()
            .collect();
        millis(bench::median(&all))
    };
    let zero = |i: usize| bench::median(&runs[i].iter().map(|r| r.iops).collect::<Vec<_>>());
    let with =
        |i: usize, k: usize| bench::median(&iops[i].iter().map(|w| w[k]).collect::<Vec<_>>());
    let mut section = bench::section_head(
        START_MARK,
        "Internal snapshots: blockd vs qemu-storage-daemon",
        &load,
    );
    writeln!(
        section,
        "- method: `target/release/snapshot-bench --rounds {} --out BENCHMARKS.md`; a {} MiB qcow2 (64 KiB clusters) fully allocated with random data; every daemon run gets a fresh copy (in the page cache), exported writable over a unix socket (`--nbd-server`, `--export`); rounds alternate which daemon goes first; medians; every image passes `qemu-img check` after each run",
        opts.rounds, opts.size_mib
    )?;
    writeln!(
        section,
        "- create / delete: after the 0-snapshot write run, {PAIRS} pairs of `blockdev-snapshot-internal-sync` and `blockdev-snapshot-delete-internal-sync` (`sync` before each), each timed from the command to its reply; qemu-img: {PAIRS} pairs of `qemu-img snapshot -c` / `-d` on a fresh copy per round, process start included"
    )?;
    writeln!(
        section,
        "- writes: fio (nbd engine) `randwrite`, `bs=4k`, `iodepth=32`, {WRITE_SECONDS} s time-based over the whole image, `sync` first; the 10 and 50 snapshots are taken once by `qemu-img snapshot -c`, so both daemons write to the same image (first writes copy clusters away from the snapshots)\n"
    )?;
    writeln!(
        section,
        "| workload | blockd | QSD | blockd/QSD | qemu-img |"
    )?;
    writeln!(section, "|---|---:|---:|---:|---:|")?;
    for (create, what, img) in [
        (true, "create", &img_create),
        (false, "delete", &img_delete),
    ] {
        let (b, q) = (times(0, create), times(1, create));
        writeln!(
            section,
            "| snapshot {what}, {} MiB fully allocated, time | {b:.1} ms | {q:.1} ms | {:.2} | {:.1} ms |",
            opts.size_mib,
            q / b,
            millis(bench::median(img))
        )?;
    }
    let rows = [(zero(0), zero(1), 0)]
        .into_iter()
        .chain((0..SNAPSHOT_COUNTS.len()).map(|k| (with(0, k), with(1, k), SNAPSHOT_COUNTS[k])));
    for (b, q, n) in rows {
        writeln!(
            section,
            "| 4 KiB random write, QD 32, {n} snapshots present | {b:.0} IOPS | {q:.0} IOPS | {:.2} | |",
            b / q
        )?;
    }
    writeln!(section, "{END_MARK}")?;
    if runs.iter().any(Vec::is_empty) {
        bail!("no rounds were run");
    }
    opts.publish(START_MARK, END_MARK, &section)
}
