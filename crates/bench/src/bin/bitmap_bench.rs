//! `bitmap-bench`: dirty bitmaps in blockd and in qemu-storage-daemon, side by side in
//! one run.
//!
//! The image is a qcow2 (64 KiB clusters) fully allocated with random data, exported
//! writable over NBD by the daemon under test. Two workloads:
//!
//! - incremental backup: `block-dirty-bitmap-add`, then fio (nbd engine) rewrites 5% of
//!   the clusters, scattered (64 KiB random writes, a fixed count and seed, so both
//!   daemons see the same clusters); the bitmap's count is checked, then
//!   `blockdev-backup sync=incremental` to a new qcow2 target is timed from the command
//!   to `BLOCK_JOB_COMPLETED`. The target must hold exactly the dirty clusters
//!   (`qemu-img check`); in the first round its data is also compared with the source,
//!   the source serving as the target's backing file.
//! - the bitmaps' cost on writes: fio 4 KiB random writes, queue depth 32, for a few
//!   seconds, with no bitmap and with two enabled bitmaps on the exported node, in the
//!   order none, two, two, none, twice (or the other way round) within one daemon run.
//!
//! Rounds alternate which daemon goes first; medians and ratios are reported; timing is
//! never asserted.
//!
//! ```text
//! cargo build --release -p daemon -p bench
//! target/release/bitmap-bench [--rounds N] [--size-mib N] [--dir DIR] [--out BENCHMARKS.md]
//! ```

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use testkit::Qmp;

const START_MARK: &str = "<!-- bitmap-bench:start -->";
const END_MARK: &str = "<!-- bitmap-bench:end -->";

/// The image's cluster size, and the bitmap granularity of the incremental backup.
const CLUSTER: u64 = 64 << 10;
/// Percent of the clusters made dirty before the incremental backup.
const DIRTY_PERCENT: u64 = 5;
/// Length of each 4 KiB random-write run.
const WRITE_SECONDS: u64 = 2;

/// The command-line nodes: `src` (qcow2) over `source`, and `tgt` (qcow2) over `target`.
fn nodes(source: &Path, target: Option<&Path>) -> Result<Vec<String>> {
    let mut nodes = vec![
        "--blockdev".to_string(),
        format!("driver=file,node-name=sf,filename={}", bench::utf8(source)?),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=src,file=sf".to_string(),
    ];
    if let Some(target) = target {
        nodes.extend([
            "--blockdev".to_string(),
            format!("driver=file,node-name=tf,filename={}", bench::utf8(target)?),
            "--blockdev".to_string(),
            "driver=qcow2,node-name=tgt,file=tf".to_string(),
        ]);
    }
    Ok(nodes)
}

fn execute(qmp: &mut Qmp, command: &str, args: Value) -> Result<Value> {
    qmp.execute(command, args)
        .map_err(|e| anyhow::anyhow!("{command}: {e:?}"))
}

/// The count (bytes) of bitmap `name` on node `src`.
fn dirty_bytes(qmp: &mut Qmp, name: &str) -> Result<u64> {
    let nodes = execute(qmp, "query-named-block-nodes", json!({}))?;
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["node-name"] == "src")
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .find(|b| b["name"] == name)
        .and_then(|b| b["count"].as_u64())
        .with_context(|| format!("no bitmap {name} on src"))
}

/// One incremental backup: a bitmap, `dirty` scattered 64 KiB writes over NBD, then the
/// timed `blockdev-backup sync=incremental` to a fresh qcow2 target, which is checked
/// (and, with `compare`, compared with `source` through a backing link).
fn incremental_once(
    binary: &Path,
    dir: &Path,
    source: &Path,
    mib: u64,
    dirty: u64,
    compare: bool,
) -> Result<Duration> {
    let target = dir.join("target.qcow2");
    let _ = std::fs::remove_file(&target);
    let t = bench::utf8(&target)?;
    let size = format!("{mib}M");
    bench::run(
        "qemu-img",
        "qemu-utils",
        &["create", "-q", "-f", "qcow2", t, &size],
    )?;
    let (mut daemon, uri) =
        bench::start_exporting(binary, dir, &nodes(source, Some(&target))?, "src")?;
    let mut qmp = daemon.qmp()?;
    execute(
        &mut qmp,
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0", "granularity": CLUSTER}),
    )?;
    let written = bench::fio(
        &uri,
        &[
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=4",
            &format!("--size={mib}M"),
            &format!("--number_ios={dirty}"),
            "--randseed=20261121",
        ],
        "write",
    )?;
    let count = dirty_bytes(&mut qmp, "b0")?;
    if written.ios != dirty || count != dirty * CLUSTER {
        bail!(
            "{}: {} writes left {count} dirty bytes, expected {dirty} clusters",
            binary.display(),
            written.ios
        );
    }
    bench::run("sync", "coreutils", &[])?;
    let started = Instant::now();
    execute(
        &mut qmp,
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt",
               "sync": "incremental", "bitmap": "b0"}),
    )?;
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(600))?;
    let elapsed = started.elapsed();
    if done["data"].get("error").is_some() {
        bail!("{}: backup failed: {done}", binary.display());
    }
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(Duration::from_secs(60))?;
    let check = bench::run(
        "qemu-img",
        "qemu-utils",
        &["check", "--output=json", "-f", "qcow2", t],
    )?;
    let check: Value = serde_json::from_str(&check).context("qemu-img check's json")?;
    let allocated = check["allocated-clusters"].as_u64().unwrap_or(0);
    if allocated != dirty {
        bail!(
            "{}: the target has {allocated} clusters, expected {dirty}",
            binary.display()
        );
    }
    if compare {
        let backing = std::fs::canonicalize(source)?;
        let b = bench::utf8(&backing)?;
        bench::run(
            "qemu-img",
            "qemu-utils",
            &["rebase", "-u", "-b", b, "-F", "qcow2", "-f", "qcow2", t],
        )?;
        bench::run(
            "qemu-img",
            "qemu-utils",
            &["compare", "-q", "-f", "qcow2", "-F", "qcow2", t, b],
        )
        .with_context(|| {
            format!(
                "{}: target plus source differ from the source",
                binary.display()
            )
        })?;
    }
    Ok(elapsed)
}

/// Adds (`on`) or removes bitmaps `b1` and `b2` on `src`.
fn set_bitmaps(qmp: &mut Qmp, on: bool) -> Result<()> {
    for name in ["b1", "b2"] {
        if on {
            execute(
                qmp,
                "block-dirty-bitmap-add",
                json!({"node": "src", "name": name}),
            )?;
        } else {
            execute(
                qmp,
                "block-dirty-bitmap-remove",
                json!({"node": "src", "name": name}),
            )?;
        }
    }
    Ok(())
}

/// 4 KiB random-write IOPS without bitmaps and with two, each the mean of four runs in the
/// order none, two, two, none, none, two, two, none (`two_first`: the other way round) on
/// one daemon, so that a drift of the machine's load weighs on both alike.
fn write_iops(
    binary: &Path,
    dir: &Path,
    source: &Path,
    mib: u64,
    two_first: bool,
) -> Result<[f64; 2]> {
    let (mut daemon, uri) = bench::start_exporting(binary, dir, &nodes(source, None)?, "src")?;
    let mut qmp = daemon.qmp()?;
    let mut sums = [0.0; 2];
    let mut on = false;
    let (a, b) = (two_first, !two_first);
    for step in [a, b, b, a, a, b, b, a] {
        if step != on {
            set_bitmaps(&mut qmp, step)?;
            on = step;
        }
        sums[usize::from(step)] += bench::randwrite_4k_iops(&uri, mib, WRITE_SECONDS)?;
    }
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(Duration::from_secs(60))?;
    Ok(sums.map(|s| s / 4.0))
}

fn main() -> Result<()> {
    let load = bench::loadavg();
    let opts = bench::SideBySide::parse("bitmap-bench", 3, 4096)?;
    let dir = opts.workdir("bitmap-bench-")?;
    eprintln!("making a {} MiB qcow2 full of random data", opts.size_mib);
    let source = bench::random_qcow2(dir.path(), opts.size_mib, 1, false)?;
    let clusters = (opts.size_mib << 20) / CLUSTER;
    let dirty = clusters * DIRTY_PERCENT / 100;
    let sides = [("blockd", opts.blockd.clone()), ("qemu", opts.qsd.clone())];
    let mut backups: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut iops: [Vec<[f64; 2]>; 2] = [Vec::new(), Vec::new()];
    for round in 0..opts.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (side, binary) = (&sides[i].0, &sides[i].1);
            let t = incremental_once(
                binary,
                dir.path(),
                &source,
                opts.size_mib,
                dirty,
                round == 0,
            )?;
            let w = write_iops(binary, dir.path(), &source, opts.size_mib, round % 2 == 1)?;
            eprintln!(
                "round {}/{} {side:>6} incremental {:.3} s; 4 KiB writes {:.0} IOPS, with two bitmaps {:.0} IOPS",
                round + 1,
                opts.rounds,
                t.as_secs_f64(),
                w[0],
                w[1]
            );
            backups[i].push(t);
            iops[i].push(w);
        }
    }
    let (b, q) = (
        bench::median(&backups[0]).as_secs_f64(),
        bench::median(&backups[1]).as_secs_f64(),
    );
    let dirty_mib = (dirty * CLUSTER) as f64 / f64::from(1 << 20);
    let pick =
        |i: usize, k: usize| bench::median(&iops[i].iter().map(|w| w[k]).collect::<Vec<_>>());
    // The cost is taken per daemon run (its own none and two), then the median.
    let cost = |i: usize| {
        bench::median(
            &iops[i]
                .iter()
                .map(|w| 100.0 * (1.0 - w[1] / w[0]))
                .collect::<Vec<_>>(),
        )
    };
    let mut section = bench::section_head(
        START_MARK,
        "Dirty bitmaps: blockd vs qemu-storage-daemon",
        &load,
    );
    writeln!(
        section,
        "- method: `target/release/bitmap-bench --rounds {} --out BENCHMARKS.md`; a {} MiB qcow2 (64 KiB clusters) fully allocated with random data, exported writable over a unix socket (`--nbd-server`, `--export`) by each daemon in turn; rounds alternate which daemon goes first; medians",
        opts.rounds, opts.size_mib
    )?;
    writeln!(
        section,
        "- incremental backup: `block-dirty-bitmap-add` (granularity 64 KiB), fio (nbd engine) writes {dirty} random 64 KiB clusters ({DIRTY_PERCENT}% of {clusters}; fixed seed, no cluster twice; the bitmap's count is checked), `sync`, then `blockdev-backup sync=incremental` to a new qcow2 target (`qemu-img create`) timed from the command to `BLOCK_JOB_COMPLETED`; `qemu-img check` finds exactly {dirty} clusters in every target; round 1 also compares target-over-source with the source (`qemu-img rebase -u`, `qemu-img compare`)"
    )?;
    writeln!(
        section,
        "- write cost: fio (nbd engine) `randwrite`, `bs=4k`, `iodepth=32`, {WRITE_SECONDS} s time-based over the whole image, `sync` before each run; per daemon run none, two, two, none, none, two, two, none (every other round the other way round), the two bitmaps added with `block-dirty-bitmap-add` (default granularity) and removed with `block-dirty-bitmap-remove`; the cost is the median over the daemon runs of 1 - IOPS with bitmaps / IOPS without\n"
    )?;
    writeln!(section, "| workload | blockd | QSD | blockd/QSD |")?;
    writeln!(section, "|---|---:|---:|---:|")?;
    writeln!(
        section,
        "| incremental backup, {dirty} dirty clusters ({dirty_mib:.0} MiB) to new qcow2, speed | {:.3} s ({:.0} MiB/s) | {:.3} s ({:.0} MiB/s) | {:.2} |",
        b,
        dirty_mib / b,
        q,
        dirty_mib / q,
        q / b
    )?;
    for (k, what) in [(0, "no bitmap"), (1, "two enabled bitmaps")] {
        writeln!(
            section,
            "| 4 KiB random write, QD 32, {what} | {:.0} IOPS | {:.0} IOPS | {:.2} |",
            pick(0, k),
            pick(1, k),
            pick(0, k) / pick(1, k)
        )?;
    }
    writeln!(
        section,
        "| cost of the two bitmaps on 4 KiB write IOPS | {:.1}% | {:.1}% | |",
        cost(0),
        cost(1)
    )?;
    writeln!(section, "{END_MARK}")?;
    opts.publish(START_MARK, END_MARK, &section)
}
