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
//! ```text
//! cargo build --release -p daemon -p bench
//! target/release/backup-bench [--rounds N] [--size-mib N] [--dir DIR] [--out BENCHMARKS.md]
//! ```

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use testkit::Daemon;

const START_MARK: &str = "<!-- backup-bench:start -->";
const END_MARK: &str = "<!-- backup-bench:end -->";

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("{program} is needed (install qemu-utils)"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

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

/// One timed backup of `source` (format `fmt`) to a fresh target in `dir`.
fn backup_once(
    binary: &Path,
    dir: &Path,
    source: &Path,
    fmt: Format,
    mib: u64,
) -> Result<Duration> {
    let target = dir.join(format!("target.{}", fmt.name()));
    let _ = std::fs::remove_file(&target);
    let t = target.to_str().context("non-UTF-8 path")?;
    let size = format!("{mib}M");
    run("qemu-img", &["create", "-q", "-f", fmt.name(), t, &size])?;
    run("sync", &[])?;
    let s = source.to_str().context("non-UTF-8 path")?;
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=sf,filename={s}"),
        "--blockdev".to_string(),
        format!("driver={},node-name=src,file=sf", fmt.name()),
        "--blockdev".to_string(),
        format!("driver=file,node-name=tf,filename={t}"),
        "--blockdev".to_string(),
        format!("driver={},node-name=tgt,file=tf", fmt.name()),
    ];
    let mut daemon = Daemon::start_in(binary, dir, &args)?;
    let mut qmp = daemon.qmp()?;
    let started = Instant::now();
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full"}),
    )
    .map_err(|e| anyhow::anyhow!("blockdev-backup: {e:?}"))?;
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(600))?;
    let elapsed = started.elapsed();
    if done["data"].get("error").is_some() {
        bail!("{}: backup failed: {done}", binary.display());
    }
    let _ = qmp.execute("quit", json!({}));
    daemon.wait_exit(Duration::from_secs(60))?;
    run(
        "qemu-img",
        &["compare", "-q", "-f", fmt.name(), "-F", fmt.name(), s, t],
    )
    .with_context(|| format!("{}: target differs from the source", binary.display()))?;
    Ok(elapsed)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let opts = bench::SideBySide::parse("backup-bench", 3, 4096)?;
    let base = opts.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let dir = tempfile::Builder::new()
        .prefix("backup-bench-")
        .tempdir_in(&base)?;
    let raw = dir.path().join("source.raw");
    let qcow2 = dir.path().join("source.qcow2");
    eprintln!("making a {} MiB source, half random data", opts.size_mib);
    bench::random_file(&raw, opts.size_mib, 2)?;
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().context("path")?,
            qcow2.to_str().context("path")?,
        ],
    )?;
    let sides = [("blockd", opts.blockd.clone()), ("qemu", opts.qsd.clone())];
    let mut rows = String::new();
    for (fmt, source) in [(Format::Qcow2, &qcow2), (Format::Raw, &raw)] {
        let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        for round in 0..opts.rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let t = backup_once(&sides[i].1, dir.path(), source, fmt, opts.size_mib)?;
                eprintln!(
                    "round {}/{} {} {:>6} {:>8.2} s",
                    round + 1,
                    opts.rounds,
                    fmt.name(),
                    sides[i].0,
                    t.as_secs_f64()
                );
                times[i].push(t);
            }
        }
        let (b, q) = (median(times[0].clone()), median(times[1].clone()));
        let mibs = |d: Duration| opts.size_mib as f64 / d.as_secs_f64();
        writeln!(
            rows,
            "| full backup, {0} to new {0} ({1} MiB, half allocated) | {2:.2} s ({3:.0} MiB/s) | {4:.2} s ({5:.0} MiB/s) | {6:.2} |",
            fmt.name(),
            opts.size_mib,
            b.as_secs_f64(),
            mibs(b),
            q.as_secs_f64(),
            mibs(q),
            q.as_secs_f64() / b.as_secs_f64()
        )?;
    }
    let mut section = String::new();
    writeln!(section, "{START_MARK}")?;
    writeln!(section, "## Backup: blockd vs qemu-storage-daemon\n")?;
    writeln!(section, "- date: {}", bench::today())?;
    writeln!(section, "- machine: {}", bench::machine())?;
    writeln!(
        section,
        "- method: `target/release/backup-bench --rounds {} --out BENCHMARKS.md`; both daemons get the same source and a fresh target made by `qemu-img create`, `sync` before each run; time from `blockdev-backup` to `BLOCK_JOB_COMPLETED`; rounds alternate which daemon goes first; medians; every target is checked with `qemu-img compare`",
        opts.rounds
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
    writeln!(section, "{END_MARK}")?;
    print!("{section}");
    std::io::stdout().flush()?;
    if let Some(out) = &opts.out {
        bench::write_section(out, START_MARK, END_MARK, &section)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
