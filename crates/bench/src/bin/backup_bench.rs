//! `backup-bench`: a full `blockdev-backup` through blockd and through
//! qemu-storage-daemon, side by side in one run.
//!
//! Workloads: a qcow2 source (half of it allocated with random data, in 1 MiB runs
//! every other MiB) backed up to a new qcow2 target, and a raw source (the same
//! layout) to a raw target. Each round starts the daemon with the four nodes, runs
//! `blockdev-backup sync=full` and times from the command to `BLOCK_JOB_COMPLETED`;
//! rounds alternate which daemon goes first. Medians and blockd/QSD throughput
//! ratios (higher is better) are reported; timing is never asserted.
//!
//! Each round also backs up a copy of the source that the daemon exports over NBD,
//! while fio writes 4 KiB at random to the export (queue depth 1) from the moment the
//! backup has started until it completes: the latency and rate of those writes are the
//! copy-before-write cost a client sees; the same writes without a backup follow, for
//! scale. Every target is compared with the source as it was when its backup started.
//!
//! ```text
//! cargo build --release -p daemon -p bench
//! target/release/backup-bench [--rounds N] [--size-mib N] [--dir DIR] [--out BENCHMARKS.md]
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use testkit::{Daemon, Qmp};

const START_MARK: &str = "<!-- backup-bench:start -->";
const END_MARK: &str = "<!-- backup-bench:end -->";

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Qcow2,
    Raw,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// A fresh target for `fmt` in `dir`, made by `qemu-img create`.
fn fresh_target(dir: &Path, fmt: Format, mib: u64) -> Result<PathBuf> {
    let target = dir.join(format!("target.{}", fmt.name()));
    let _ = std::fs::remove_file(&target);
    let size = format!("{mib}M");
    let t = bench::utf8(&target)?;
    bench::run(
        "qemu-img",
        "qemu-utils",
        &["create", "-q", "-f", fmt.name(), t, &size],
    )?;
    Ok(target)
}

/// The command-line nodes: `src` over `source` and `tgt` over `target`, both `fmt`.
fn nodes(source: &Path, target: &Path, fmt: Format) -> Result<Vec<String>> {
    let (s, t) = (bench::utf8(source)?, bench::utf8(target)?);
    Ok(vec![
        "--blockdev".to_string(),
        format!("driver=file,node-name=sf,filename={s}"),
        "--blockdev".to_string(),
        format!("driver={},node-name=src,file=sf", fmt.name()),
        "--blockdev".to_string(),
        format!("driver=file,node-name=tf,filename={t}"),
        "--blockdev".to_string(),
        format!("driver={},node-name=tgt,file=tf", fmt.name()),
    ])
}

/// Starts `blockdev-backup sync=full` from `src` to `tgt`.
fn start_backup(qmp: &mut Qmp) -> Result<()> {
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full"}),
    )
    .map_err(|e| anyhow::anyhow!("blockdev-backup: {e:?}"))?;
    Ok(())
}

/// Waits for the backup's `BLOCK_JOB_COMPLETED`; fails when it reports an error.
fn wait_backup(qmp: &mut Qmp, binary: &Path) -> Result<()> {
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(600))?;
    if done["data"].get("error").is_some() {
        bail!("{}: backup failed: {done}", binary.display());
    }
    Ok(())
}

/// Quits the daemon and checks that `target` holds what `source` held when the backup
/// started.
fn quit_and_compare(
    mut daemon: Daemon,
    qmp: &mut Qmp,
    binary: &Path,
    source: &Path,
    target: &Path,
    fmt: Format,
) -> Result<()> {
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(Duration::from_secs(60))?;
    let (s, t) = (bench::utf8(source)?, bench::utf8(target)?);
    bench::run(
        "qemu-img",
        "qemu-utils",
        &["compare", "-q", "-f", fmt.name(), "-F", fmt.name(), s, t],
    )
    .with_context(|| format!("{}: target differs from the source", binary.display()))?;
    Ok(())
}

/// One timed backup of `source` (format `fmt`) to a fresh target in `dir`.
fn backup_once(
    binary: &Path,
    dir: &Path,
    source: &Path,
    fmt: Format,
    mib: u64,
) -> Result<Duration> {
    let target = fresh_target(dir, fmt, mib)?;
    bench::run("sync", "coreutils", &[])?;
    let mut daemon = Daemon::start_in(binary, dir, &nodes(source, &target, fmt)?)?;
    let mut qmp = daemon.qmp()?;
    let started = Instant::now();
    start_backup(&mut qmp)?;
    wait_backup(&mut qmp, binary)?;
    let elapsed = started.elapsed();
    quit_and_compare(daemon, &mut qmp, binary, source, &target, fmt)?;
    Ok(elapsed)
}

/// What a backup with a client writing to its source shows.
struct Written {
    /// From `blockdev-backup` to `BLOCK_JOB_COMPLETED`.
    backup: Duration,
    /// The client's 4 KiB writes while the backup ran.
    during: bench::FioSide,
    /// The same writes with no backup running (after it, same daemon).
    idle: bench::FioSide,
}

/// 4 KiB random writes at queue depth 1 over the whole export, time-based.
fn writer_args(mib: u64, seconds: u64) -> [String; 6] {
    [
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=1".into(),
        format!("--size={mib}M"),
        "--time_based".into(),
        format!("--runtime={seconds}"),
    ]
}

/// A timed backup of a copy of `source` exported over NBD by the same daemon, with fio
/// writing to the export from the moment the backup has started until it completes;
/// then the same writes for `IDLE_SECONDS` without a backup. The target must equal
/// `source` (the copy as it was when the backup started).
fn backup_with_writer(
    binary: &Path,
    dir: &Path,
    source: &Path,
    fmt: Format,
    mib: u64,
) -> Result<Written> {
    const IDLE_SECONDS: u64 = 3;
    let work = dir.join(format!("work.{}", fmt.name()));
    let _ = std::fs::remove_file(&work);
    bench::run(
        "cp",
        "coreutils",
        &["--sparse=always", bench::utf8(source)?, bench::utf8(&work)?],
    )?;
    let target = fresh_target(dir, fmt, mib)?;
    bench::run("sync", "coreutils", &[])?;
    let (mut daemon, uri) =
        bench::start_exporting(binary, dir, &nodes(&work, &target, fmt)?, "src")?;
    let mut qmp = daemon.qmp()?;
    let started = Instant::now();
    start_backup(&mut qmp)?;
    // Started only now, so that every write comes after the backup's point in time.
    let args = writer_args(mib, 600);
    let writer = bench::fio_start(&uri, &args.each_ref().map(String::as_str))?;
    wait_backup(&mut qmp, binary)?;
    let backup = started.elapsed();
    let during = writer.stop("write")?;
    bench::run("sync", "coreutils", &[])?;
    let args = writer_args(mib, IDLE_SECONDS);
    let idle = bench::fio(&uri, &args.each_ref().map(String::as_str), "write")?;
    quit_and_compare(daemon, &mut qmp, binary, source, &target, fmt)?;
    let _ = std::fs::remove_file(&work);
    Ok(Written {
        backup,
        during,
        idle,
    })
}

fn main() -> Result<()> {
    let load = bench::loadavg();
    let opts = bench::SideBySide::parse("backup-bench", 3, 4096)?;
    let dir = opts.workdir("backup-bench-")?;
    eprintln!("making a {} MiB source, half random data", opts.size_mib);
    let qcow2 = bench::random_qcow2(dir.path(), opts.size_mib, 2, true)?;
    let raw = dir.path().join("source.raw");
    let sides = [("blockd", opts.blockd.clone()), ("qemu", opts.qsd.clone())];
    let mut rows = String::new();
    let mut latency_rows = String::new();
    let secs = |d: Duration| d.as_secs_f64();
    let mibs = |d: Duration| opts.size_mib as f64 / d.as_secs_f64();
    for (fmt, source) in [(Format::Qcow2, &qcow2), (Format::Raw, &raw)] {
        let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        let mut written: [Vec<Written>; 2] = [Vec::new(), Vec::new()];
        for round in 0..opts.rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let (side, binary) = (&sides[i].0, &sides[i].1);
                let t = backup_once(binary, dir.path(), source, fmt, opts.size_mib)?;
                let w = backup_with_writer(binary, dir.path(), source, fmt, opts.size_mib)?;
                eprintln!(
                    "round {}/{} {} {side:>6} {:>6.2} s; with a writer {:>6.2} s, \
                     write p50/p99 {:.0}/{:.0} µs ({} writes), without a backup {:.0}/{:.0} µs",
                    round + 1,
                    opts.rounds,
                    fmt.name(),
                    secs(t),
                    secs(w.backup),
                    w.during.clat_p50_us,
                    w.during.clat_p99_us,
                    w.during.ios,
                    w.idle.clat_p50_us,
                    w.idle.clat_p99_us,
                );
                times[i].push(t);
                written[i].push(w);
            }
        }
        let with_writer =
            |i: usize| -> Vec<Duration> { written[i].iter().map(|w| w.backup).collect() };
        for (what, t) in [
            ("", [bench::median(&times[0]), bench::median(&times[1])]),
            (
                ", with 4 KiB writes to the source",
                [
                    bench::median(&with_writer(0)),
                    bench::median(&with_writer(1)),
                ],
            ),
        ] {
            writeln!(
                rows,
                "| full backup, {0} to new {0} ({1} MiB, half allocated){what} | {2:.2} s ({3:.0} MiB/s) | {4:.2} s ({5:.0} MiB/s) | {6:.2} |",
                fmt.name(),
                opts.size_mib,
                secs(t[0]),
                mibs(t[0]),
                secs(t[1]),
                mibs(t[1]),
                secs(t[1]) / secs(t[0])
            )?;
        }
        type Pick = fn(&Written) -> f64;
        let picks: [(&str, &str, Pick); 6] = [
            ("latency p50, during the backup", " µs", |w| {
                w.during.clat_p50_us
            }),
            ("latency p99, during the backup", " µs", |w| {
                w.during.clat_p99_us
            }),
            ("writes per second, during the backup", "", |w| {
                w.during.iops
            }),
            ("latency p50, no backup", " µs", |w| w.idle.clat_p50_us),
            ("latency p99, no backup", " µs", |w| w.idle.clat_p99_us),
            ("writes per second, no backup", "", |w| w.idle.iops),
        ];
        for (what, unit, pick) in picks {
            let m = |i: usize| bench::median(&written[i].iter().map(pick).collect::<Vec<_>>());
            let (b, q) = (m(0), m(1));
            // Small ratios keep two significant digits.
            let ratio = b / q;
            let digits = if ratio < 0.1 { 3 } else { 2 };
            writeln!(
                latency_rows,
                "| {} | {what} | {b:.0}{unit} | {q:.0}{unit} | {ratio:.digits$} |",
                fmt.name(),
            )?;
        }
        let writes =
            |i: usize| bench::median(&written[i].iter().map(|w| w.during.ios).collect::<Vec<_>>());
        eprintln!(
            "{}: median writes during the backup: blockd {}, QSD {}",
            fmt.name(),
            writes(0),
            writes(1)
        );
    }
    let mut section =
        bench::section_head(START_MARK, "Backup: blockd vs qemu-storage-daemon", &load);
    writeln!(
        section,
        "- method: `target/release/backup-bench --rounds {} --out BENCHMARKS.md`; both daemons get the same source and a fresh target made by `qemu-img create`, `sync` before each run; time from `blockdev-backup` to `BLOCK_JOB_COMPLETED`; rounds alternate which daemon goes first; medians; every target is checked with `qemu-img compare` against the source as it was when the backup started",
        opts.rounds
    )?;
    writeln!(
        section,
        "- with writes: the daemon also exports the source (a `cp --sparse=always` copy) writable over NBD (`--nbd-server`, `--export`); once `blockdev-backup` has returned, fio (nbd engine, `randwrite`, `bs=4k`, `iodepth=1`, over the whole image) writes until `BLOCK_JOB_COMPLETED`; latency is fio's completion latency (clat; a lower ratio is better), writes per second fio's IOPS (a higher ratio is better); then `sync` and the same writes for 3 s without a backup, same daemon, for scale"
    )?;
    writeln!(
        section,
        "- throughput counts the virtual size (the job also reads the holes' status)\n"
    )?;
    writeln!(
        section,
        "| workload | blockd | QSD | blockd/QSD throughput |"
    )?;
    writeln!(section, "|---|---:|---:|---:|")?;
    section.push_str(&rows);
    writeln!(
        section,
        "\n| source | 4 KiB random writes to the source, QD 1 | blockd | QSD | blockd/QSD |"
    )?;
    writeln!(section, "|---|---|---:|---:|---:|")?;
    section.push_str(&latency_rows);
    writeln!(section, "{END_MARK}")?;
    opts.publish(START_MARK, END_MARK, &section)
}
