//! `nbd-bench`: NBD exports of blockd and qemu-storage-daemon side by side in one run.
//!
//! For a raw and a qcow2 image (fully allocated with random data), each daemon exports the
//! node writable over a unix socket and real clients run against it: `nbdcopy` to `null:`
//! (sequential read) and from a local file (sequential write), and fio's nbd engine with
//! 4 KiB random reads and writes at queue depth 32. Rounds alternate which daemon goes
//! first; medians and blockd/QSD throughput ratios (higher is better) are reported, with
//! what memcpy and a unix socket carry on this machine for scale. Timing is never asserted.
//!
//! ```text
//! cargo build --release -p daemon -p bench
//! target/release/nbd-bench [--rounds N] [--size-mib N] [--dir DIR] [--out BENCHMARKS.md]
//! ```

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

const START_MARK: &str = "<!-- nbd-bench:start -->";
const END_MARK: &str = "<!-- nbd-bench:end -->";

#[derive(Clone, Copy)]
enum Work {
    SeqRead,
    SeqWrite,
    RandRead,
    RandWrite,
}

impl Work {
    fn label(self) -> &'static str {
        match self {
            Work::SeqRead => "sequential read (nbdcopy to null:)",
            Work::SeqWrite => "sequential write (nbdcopy from a file)",
            Work::RandRead => "random read 4 KiB, QD 32 (fio nbd)",
            Work::RandWrite => "random write 4 KiB, QD 32 (fio nbd)",
        }
    }
}

/// Reads `path` whole so that it sits in the page cache.
fn warm(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while file.read(&mut buf)? > 0 {}
    Ok(())
}

/// Throughput in MiB/s of one workload against the export at `uri` of `image`.
fn measure(work: Work, uri: &str, image: &Path, local: &Path, mib: u64) -> Result<f64> {
    // Dirty pages left by the previous workload (of either daemon) are written back first,
    // and the image and the local file are read into the page cache, so each measurement
    // starts from the same page-cache state whichever daemon goes first.
    bench::run("sync", "coreutils", &[])?;
    warm(image)?;
    warm(local)?;
    match work {
        Work::SeqRead | Work::SeqWrite => {
            let local = local.to_str().context("path")?;
            let started = Instant::now();
            match work {
                Work::SeqRead => bench::run("nbdcopy", "libnbd-bin", &[uri, "null:"])?,
                _ => bench::run("nbdcopy", "libnbd-bin", &[local, uri])?,
            };
            Ok(mib as f64 / started.elapsed().as_secs_f64())
        }
        Work::RandRead | Work::RandWrite => {
            let rw = if matches!(work, Work::RandRead) {
                "randread"
            } else {
                "randwrite"
            };
            let got = bench::fio(
                uri,
                &[
                    &format!("--rw={rw}"),
                    "--bs=4k",
                    "--iodepth=32",
                    &format!("--size={mib}M"),
                    "--runtime=4",
                    "--time_based",
                ],
                if matches!(work, Work::RandRead) {
                    "read"
                } else {
                    "write"
                },
            )?;
            Ok(got.mib_s)
        }
    }
}

/// What one CPU copies in memory, MiB/s.
fn memcpy_limit() -> f64 {
    let src = vec![7u8; 256 << 20];
    let mut dst = vec![0u8; 256 << 20];
    let started = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
    }
    1024.0 / started.elapsed().as_secs_f64()
}

/// What a unix socket carries between two threads, MiB/s.
fn socket_limit() -> Result<f64> {
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair()?;
    let total = 1u64 << 30;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = b.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok(())
    });
    let buf = vec![1u8; 1 << 20];
    let started = Instant::now();
    for _ in 0..total >> 20 {
        a.write_all(&buf)?;
    }
    drop(a);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(1024.0 / started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let load = bench::loadavg();
    let opts = bench::SideBySide::parse("nbd-bench", 3, 2048)?;
    let dir = opts.workdir("nbd-bench-")?;
    let local = dir.path().join("local.raw");
    eprintln!("making {} MiB of random data", opts.size_mib);
    bench::random_file(&local, opts.size_mib, 1)?;
    let raw = dir.path().join("disk.raw");
    let qcow2 = dir.path().join("disk.qcow2");
    bench::convert(&local, &raw, "raw")?;
    bench::convert(&local, &qcow2, "qcow2")?;
    let sides = [("blockd", opts.blockd.clone()), ("qemu", opts.qsd.clone())];
    let works = [
        Work::SeqRead,
        Work::SeqWrite,
        Work::RandRead,
        Work::RandWrite,
    ];
    let mut rows = String::new();
    for (fmt, image) in [("raw", &raw), ("qcow2", &qcow2)] {
        let mut got: Vec<[Vec<f64>; 2]> = works.iter().map(|_| [Vec::new(), Vec::new()]).collect();
        for round in 0..opts.rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let img = bench::utf8(image)?;
                let nodes = [
                    "--blockdev".to_string(),
                    format!("driver=file,node-name=f,filename={img}"),
                    "--blockdev".to_string(),
                    format!("driver={fmt},node-name=d,file=f"),
                ];
                let (mut daemon, uri) =
                    bench::start_exporting(&sides[i].1, dir.path(), &nodes, "d")?;
                for (w, work) in works.iter().enumerate() {
                    let mibs = measure(*work, &uri, image, &local, opts.size_mib)?;
                    eprintln!(
                        "round {}/{} {fmt:5} {:6} {:45} {mibs:8.1} MiB/s",
                        round + 1,
                        opts.rounds,
                        sides[i].0,
                        work.label()
                    );
                    got[w][i].push(mibs);
                }
                daemon.kill();
            }
        }
        for (w, work) in works.iter().enumerate() {
            let (b, q) = (bench::median(&got[w][0]), bench::median(&got[w][1]));
            writeln!(
                rows,
                "| {fmt} | {} | {b:.0} MiB/s | {q:.0} MiB/s | {:.2} |",
                work.label(),
                b / q
            )?;
        }
    }
    let memcpy = memcpy_limit();
    let socket = socket_limit()?;
    let mut section = bench::section_head(
        START_MARK,
        "NBD exports: blockd vs qemu-storage-daemon",
        &load,
    );
    writeln!(
        section,
        "- method: `target/release/nbd-bench --rounds {} --out BENCHMARKS.md`; a {} MiB image fully allocated with random data (raw, and qcow2 made by `qemu-img convert`), exported writable over a unix socket by each daemon in turn (`--nbd-server` and `--export`, defaults otherwise); rounds alternate which daemon goes first; before each workload `sync` and the image and the local file read into the page cache; medians",
        opts.rounds, opts.size_mib
    )?;
    writeln!(
        section,
        "- limits on this machine, for scale: memcpy {memcpy:.0} MiB/s (one thread), a unix socket between two threads {socket:.0} MiB/s\n"
    )?;
    writeln!(section, "| image | workload | blockd | QSD | blockd/QSD |")?;
    writeln!(section, "|---|---|---:|---:|---:|")?;
    section.push_str(&rows);
    writeln!(section, "{END_MARK}")?;
    opts.publish(START_MARK, END_MARK, &section)
}
