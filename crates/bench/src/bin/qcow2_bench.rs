//! `qcow2-bench`: blockd's qcow2 driver against QEMU's on the same workloads.
//!
//! Each side works on a fresh 4 GiB qcow2 image with 64 KiB clusters made by
//! `qemu-img create`. QEMU runs `qemu-img bench`; blockd opens the image through
//! `block::BlockGraph` (qcow2 over file) on a current-thread tokio runtime, as the
//! daemon does (file I/O on the blocking pool), and keeps the same number of
//! requests in flight at the same offsets, in the same order (`qemu-img bench`'s
//! offset walk: start at 0, add the step, wrap at the image size). Both sides use
//! `cache.direct=off` (QEMU's `-t writeback`) and thread-pool I/O (`-i threads`).
//! Only the requests are timed: open and close are not, as in `qemu-img bench`.
//! It reports medians and the blockd/QEMU throughput ratio; it never asserts timing.
//!
//! ```text
//! cargo run --release -p bench --bin qcow2-bench -- [--rounds N] [--dir DIR]
//!     [--out BENCHMARKS.md] [--qemu-img PATH] [--side both|blockd|qemu] [--only NAME]
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use block::{Backend, BlockGraph, BlockdevOptions, Perm, WriteFlags};
use serde_json::json;

const START_MARK: &str = "<!-- qcow2-bench:start -->";
const END_MARK: &str = "<!-- qcow2-bench:end -->";

const IMAGE_SIZE: u64 = 4 << 30;
const CLUSTER: u64 = 64 << 10;
const DEPTH: usize = 32;
/// Byte written by both sides (not zero, so nothing can skip it as a zero write).
const PATTERN: u8 = 0xa5;
/// Step of the 4 KiB "random" walk: 324019 blocks of 4 KiB, about 0.618 of 2 GiB
/// (`qemu-img bench` takes steps below 2 GiB). It is odd in blocks, so 16384 requests
/// land in 16384 distinct clusters spread over the whole image (every wrap at 4 GiB
/// shifts the walk).
const RANDOM_STEP: u64 = 324_019 * 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Blockd,
    Qemu,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Blockd => "blockd",
            Side::Qemu => "qemu",
        }
    }
}

/// One workload: `count` requests of `size` bytes, the offset advancing by `step`.
#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    label: &'static str,
    /// Image it runs on: 0 = the sequential image, 1 = the random one.
    image: usize,
    write: bool,
    size: u64,
    step: u64,
    count: u64,
}

impl Workload {
    fn bytes(&self) -> u64 {
        self.size * self.count
    }
}

/// In order: each image is made fresh, first written (allocating), then rewritten,
/// then read.
fn workloads() -> Vec<Workload> {
    let seq = |name, label, write| Workload {
        name,
        label,
        image: 0,
        write,
        size: CLUSTER,
        step: CLUSTER,
        count: 16384,
    };
    let rand = |name, label, write| Workload {
        name,
        label,
        image: 1,
        write,
        size: 4096,
        step: RANDOM_STEP,
        count: 16384,
    };
    vec![
        seq(
            "seq-write-new",
            "sequential write 64 KiB, unallocated (1 GiB)",
            true,
        ),
        seq(
            "seq-rewrite",
            "sequential rewrite 64 KiB, allocated (1 GiB)",
            true,
        ),
        seq(
            "seq-read",
            "sequential read 64 KiB, allocated (1 GiB)",
            false,
        ),
        rand(
            "rand-write-new",
            "random write 4 KiB, unallocated clusters (16384)",
            true,
        ),
        rand(
            "rand-rewrite",
            "random rewrite 4 KiB, allocated (16384)",
            true,
        ),
        rand("rand-read", "random read 4 KiB, allocated (16384)", false),
    ]
}

#[derive(Debug)]
struct Options {
    rounds: usize,
    dir: Option<PathBuf>,
    out: Option<PathBuf>,
    qemu_img: PathBuf,
    sides: Vec<Side>,
    only: Option<String>,
}

fn usage() -> &'static str {
    "usage: qcow2-bench [--rounds N] [--dir DIR] [--out FILE] [--qemu-img PATH] \
     [--side both|blockd|qemu] [--only WORKLOAD]"
}

fn parse_options() -> Result<Options> {
    let mut opts = Options {
        rounds: 3,
        dir: None,
        out: None,
        qemu_img: PathBuf::from("qemu-img"),
        sides: vec![Side::Blockd, Side::Qemu],
        only: None,
    };
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_str().context(usage())?.to_string();
        if arg == "-h" || arg == "--help" {
            println!("{}", usage());
            std::process::exit(0);
        }
        let mut value = || -> Result<String> {
            args.next()
                .and_then(|v| v.to_str().map(str::to_string))
                .with_context(|| format!("{arg} needs a value; {}", usage()))
        };
        match arg.as_str() {
            "--rounds" => opts.rounds = value()?.parse::<usize>().context("--rounds")?.max(1),
            "--dir" => opts.dir = Some(PathBuf::from(value()?)),
            "--out" => opts.out = Some(PathBuf::from(value()?)),
            "--qemu-img" => opts.qemu_img = PathBuf::from(value()?),
            "--side" => {
                opts.sides = match value()?.as_str() {
                    "both" => vec![Side::Blockd, Side::Qemu],
                    "blockd" => vec![Side::Blockd],
                    "qemu" => vec![Side::Qemu],
                    other => bail!("unknown side {other:?}; {}", usage()),
                }
            }
            "--only" => {
                let name = value()?;
                ensure!(
                    workloads().iter().any(|w| w.name == name),
                    "unknown workload {name:?}"
                );
                opts.only = Some(name);
            }
            _ => bail!("unexpected argument {arg:?}; {}", usage()),
        }
    }
    Ok(opts)
}

fn qemu_img(opts: &Options, args: &[&str]) -> Result<String> {
    let out = Command::new(&opts.qemu_img)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", opts.qemu_img.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "qemu-img {}: {}{}",
            args.join(" "),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn create_image(opts: &Options, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    qemu_img(
        opts,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k",
            path.to_str().context("non-UTF-8 path")?,
            &IMAGE_SIZE.to_string(),
        ],
    )?;
    Ok(())
}

/// `qemu-img bench`; returns its own timing ("Run completed in X seconds.").
fn run_qemu(opts: &Options, path: &Path, w: &Workload) -> Result<Duration> {
    let (count, size, step) = (w.count.to_string(), w.size.to_string(), w.step.to_string());
    let pattern = PATTERN.to_string();
    let mut args = vec![
        "bench",
        "-f",
        "qcow2",
        "-t",
        "writeback",
        "-i",
        "threads",
        "-d",
        "32",
        "-c",
        &count,
        "-s",
        &size,
        "-S",
        &step,
    ];
    if w.write {
        args.extend(["-w", "--pattern", &pattern]);
    }
    args.push(path.to_str().context("non-UTF-8 path")?);
    let out = qemu_img(opts, &args)?;
    let secs = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|s| s.parse::<f64>().ok())
        })
        .with_context(|| format!("no timing in qemu-img bench output: {out}"))?;
    Ok(Duration::from_secs_f64(secs))
}

/// The same workload through blockd's block layer, `DEPTH` requests in flight.
fn run_blockd(path: &Path, w: &Workload) -> Result<Duration> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let mut graph = BlockGraph::new();
        let options: BlockdevOptions = serde_json::from_value(json!({
            "driver": "qcow2",
            "node-name": "q",
            "file": {
                "driver": "file",
                "filename": path.to_str().context("non-UTF-8 path")?,
                "cache": {"direct": false},
                "aio": "threads",
            },
        }))?;
        graph.add(options).await?;
        let user = Arc::new(graph.attach(
            "q",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            "",
        )?);
        let elapsed = drive(&user, w).await;
        drop(user);
        graph.close_all().await;
        elapsed
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Runs `w` on `user`: `DEPTH` tasks each take the next request index, so the
/// requests go out in `qemu-img bench`'s order with at most `DEPTH` in flight.
async fn drive(user: &Arc<Backend>, w: &Workload) -> Result<Duration> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(DEPTH);
    for _ in 0..DEPTH {
        let (user, next, w) = (user.clone(), next.clone(), *w);
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![PATTERN; usize::try_from(w.size)?];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= w.count {
                    return anyhow::Ok(());
                }
                // qemu-img bench: offset += step; offset %= image_size.
                let offset = (u128::from(i) * u128::from(w.step) % u128::from(IMAGE_SIZE)) as u64;
                if w.write {
                    user.write(offset, &buf, WriteFlags::default()).await?;
                } else {
                    user.read(offset, &mut buf).await?;
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn write_out(path: &Path, section: &str) -> Result<()> {
    bench::write_section(path, START_MARK, END_MARK, section)
}

fn main() -> Result<()> {
    let opts = parse_options()?;
    let dir = match &opts.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        // Next to the build, not in a tmpfs /tmp: the images must be on a real disk.
        None => tempfile::tempdir_in(".")?,
    };
    let loads = vec![bench::loadavg()];
    let all = workloads();
    let chosen: Vec<Workload> = all
        .iter()
        .filter(|w| opts.only.as_deref().is_none_or(|o| o == w.name))
        .copied()
        .collect();
    // Throughput in MiB/s per workload, per side.
    let mut mibs: Vec<[Vec<f64>; 2]> = chosen.iter().map(|_| [vec![], vec![]]).collect();
    // Round 1 keeps both sides' images to compare them.
    let compare = opts.sides.len() == 2 && opts.only.is_none();
    for round in 0..opts.rounds {
        let mut sides = opts.sides.clone();
        if round % 2 == 1 {
            sides.reverse();
        }
        for &side in &sides {
            let images = [
                dir.path().join(format!("{}-seq.qcow2", side.name())),
                dir.path().join(format!("{}-rand.qcow2", side.name())),
            ];
            for image in &images {
                create_image(&opts, image)?;
            }
            // Start each side with no dirty page cache left by the other one.
            let _ = Command::new("sync").status();
            // Workloads before the chosen one prepare the image (allocate it).
            let upto = chosen.last().map_or(0, |last| {
                all.iter().position(|w| w.name == last.name).unwrap_or(0)
            });
            for w in &all[..=upto] {
                let path = &images[w.image];
                let elapsed = match side {
                    Side::Qemu => run_qemu(&opts, path, w)?,
                    Side::Blockd => run_blockd(path, w)?,
                };
                let rate = w.bytes() as f64 / elapsed.as_secs_f64() / f64::from(1u32 << 20);
                if let Some(i) = chosen.iter().position(|c| c.name == w.name) {
                    mibs[i][usize::from(side == Side::Qemu)].push(rate);
                    eprintln!(
                        "round {}/{} {:>6} {:<15} {:8.1} MiB/s ({:.3} s)",
                        round + 1,
                        opts.rounds,
                        side.name(),
                        w.name,
                        rate,
                        elapsed.as_secs_f64()
                    );
                }
            }
            if !(round == 0 && compare) {
                for image in &images {
                    let _ = std::fs::remove_file(image);
                }
            }
        }
        // The first round checks that both sides wrote the same images.
        if round == 0 && compare {
            for kind in ["seq", "rand"] {
                let a = dir.path().join(format!("blockd-{kind}.qcow2"));
                let b = dir.path().join(format!("qemu-{kind}.qcow2"));
                let a = a.to_str().context("non-UTF-8 path")?;
                let b = b.to_str().context("non-UTF-8 path")?;
                qemu_img(&opts, &["check", "-q", a])?;
                qemu_img(
                    &opts,
                    &["compare", "-q", "-f", "qcow2", "-F", "qcow2", a, b],
                )
                .with_context(|| format!("the {kind} images differ"))?;
            }
            eprintln!("round 1: blockd's images pass qemu-img check and compare equal to QEMU's");
        }
        for side in &opts.sides {
            for kind in ["seq", "rand"] {
                let _ =
                    std::fs::remove_file(dir.path().join(format!("{}-{kind}.qcow2", side.name())));
            }
        }
    }
    let mut loads = loads;
    loads.push(bench::loadavg());

    let mut table = String::from(
        "| workload (queue depth 32) | blockd | QEMU | blockd/QEMU |\n|---|---:|---:|---:|\n",
    );
    for (w, [b, q]) in chosen.iter().zip(mibs.iter_mut()) {
        let (b, q) = (median(b), median(q));
        let ratio = if q > 0.0 { b / q } else { 0.0 };
        let _ = writeln!(
            table,
            "| {} | {b:.0} MiB/s | {q:.0} MiB/s | {ratio:.2} |",
            w.label
        );
    }
    print!("{table}");
    if let Some(out) = &opts.out {
        let version = qemu_img(&opts, &["--version"])?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let section = format!(
            "{START_MARK}\n## qcow2: blockd vs qemu-img bench\n\n\
             - date: {}\n- machine: {}\n- load average (1, 5, 15 min) before / after: {} / {}\n\
             - QEMU: `{version}`\n\
             - method: `cargo run --release -p bench --bin qcow2-bench -- --rounds {r} --out BENCHMARKS.md`; \
             {r} rounds alternating which side goes first; medians of throughput \
             (higher is better, so a ratio above 1 means blockd is faster)\n\
             - both sides: a fresh `qemu-img create -f qcow2 -o cluster_size=64k` 4 GiB image \
             per side and round, on the repository's disk (a temp dir under the current \
             directory; `--dir` picks another, keep it off tmpfs), `sync` before each side; \
             `cache.direct=off` with thread-pool I/O (QEMU: `qemu-img bench -t writeback \
             -i threads -d 32`, pattern byte 0xa5); 32 requests in flight at \
             `qemu-img bench`'s offsets (offset += step, modulo the image size); \
             sequential: 64 KiB requests, step 64 KiB; random: 4 KiB requests, step \
             {RANDOM_STEP} bytes, each request in its own cluster; only the requests are \
             timed (QEMU's own \"Run completed in\" figure), not open and close\n\
             - blockd: `BlockGraph::add` of qcow2 over file, on a current-thread tokio \
             runtime plus its blocking pool, as the daemon runs\n\
             - round 1 checks blockd's images with `qemu-img check` and `qemu-img compare` \
             against QEMU's\n\n{table}{END_MARK}\n",
            bench::today(),
            bench::machine(),
            loads[0],
            loads[1],
            r = opts.rounds,
        );
        write_out(out, &section)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
