//! What the benchmark binaries share: the date and machine lines of a report and
//! the update of one marked section of BENCHMARKS.md.

use anyhow::{Context, Result};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// `YYYY-MM-DD` (UTC) from the system clock.
pub fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// CPUs, CPU model and kernel of this machine, for the report.
pub fn machine() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |k| k.trim().to_string());
    format!("{nproc} CPUs ({cpu}), Linux {kernel}")
}

/// Replaces the part of the file at `path` between `start` and `end` (markers
/// included) with `section`, which carries its own markers; appends it when the
/// markers are absent, and starts a new file with a title when there is none.
pub fn write_section(path: &Path, start: &str, end: &str, section: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(start), old.find(end)) {
        (Some(s), Some(e)) if s < e => {
            let e = e + end.len();
            let rest = old[e..].strip_prefix('\n').unwrap_or(&old[e..]);
            format!("{}{section}{rest}", &old[..s])
        }
        _ if old.trim().is_empty() => format!(
            "# Benchmarks\n\nWritten by the benchmarks in crates/bench; timings are \
             informative only and never asserted.\n\n{section}"
        ),
        _ => format!("{}\n\n{section}", old.trim_end()),
    };
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}

/// Options of the side-by-side benchmarks that run both daemons on images they make.
#[derive(Debug, Clone)]
pub struct SideBySide {
    pub rounds: usize,
    pub size_mib: u64,
    /// Where the images go (a temporary directory inside it); default `.`.
    pub dir: Option<std::path::PathBuf>,
    /// The report file whose marked section is replaced.
    pub out: Option<std::path::PathBuf>,
    pub blockd: std::path::PathBuf,
    pub qsd: std::path::PathBuf,
}

impl SideBySide {
    /// Parses `--rounds`, `--size-mib`, `--dir`, `--out`, `--blockd`, `--qsd`; blockd
    /// defaults to the binary next to this one.
    pub fn parse(program: &str, rounds: usize, size_mib: u64) -> Result<Self> {
        let mut opts = SideBySide {
            rounds,
            size_mib,
            dir: None,
            out: None,
            blockd: std::env::current_exe()?.with_file_name("blockd"),
            qsd: testkit::qsd_path(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().context("missing value");
            match arg.as_str() {
                "--rounds" => opts.rounds = value()?.parse()?,
                "--size-mib" => opts.size_mib = value()?.parse()?,
                "--dir" => opts.dir = Some(value()?.into()),
                "--out" => opts.out = Some(value()?.into()),
                "--blockd" => opts.blockd = value()?.into(),
                "--qsd" => opts.qsd = value()?.into(),
                other => anyhow::bail!(
                    "unknown option {other}; usage: {program} [--rounds N] [--size-mib N] \
                     [--dir DIR] [--out FILE] [--blockd PATH] [--qsd PATH]"
                ),
            }
        }
        if !opts.blockd.is_file() {
            anyhow::bail!(
                "blockd not found at {} (cargo build --release -p daemon, or --blockd)",
                opts.blockd.display()
            );
        }
        Ok(opts)
    }
}

impl SideBySide {
    /// A new temporary directory for the images, under `--dir` (default `.`).
    pub fn workdir(&self, prefix: &str) -> Result<tempfile::TempDir> {
        let base = self
            .dir
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from("."));
        Ok(tempfile::Builder::new().prefix(prefix).tempdir_in(&base)?)
    }

    /// Prints `section` (see [`section_head`]) and, with `--out`, puts it in that file
    /// between the markers `start` and `end`.
    pub fn publish(&self, start: &str, end: &str, section: &str) -> Result<()> {
        use std::io::Write as _;
        print!("{section}");
        std::io::stdout().flush()?;
        if let Some(out) = &self.out {
            write_section(out, start, end, section)?;
            eprintln!("wrote {}", out.display());
        }
        Ok(())
    }
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` has them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The start of a report section: its `start` marker, the `title` heading, and the date,
/// machine and load lines (`load_before` from [`loadavg`] when the run began; the load
/// after is read now).
pub fn section_head(start: &str, title: &str, load_before: &str) -> String {
    format!(
        "{start}\n## {title}\n\n- date: {}\n- machine: {}\n\
         - load average (1, 5, 15 min) before / after: {load_before} / {}\n",
        today(),
        machine(),
        loadavg()
    )
}

/// `qemu-img convert -O fmt from to`.
pub fn convert(from: &Path, to: &Path, fmt: &str) -> Result<()> {
    run(
        "qemu-img",
        "qemu-utils",
        &["convert", "-O", fmt, utf8(from)?, utf8(to)?],
    )?;
    Ok(())
}

/// A file of `mib` MiB whose every `step`-th MiB (from the first) holds pseudo-random bytes;
/// the rest are holes (`step` 1: all data).
pub fn random_file(path: &Path, mib: u64, step: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for m in (0..mib).step_by(step.max(1) as usize) {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        f.write_all_at(&buf, m << 20)?;
    }
    f.sync_all()?;
    Ok(())
}

/// `dir/source.qcow2`: a qcow2 of `mib` MiB made by `qemu-img convert` from a file whose
/// every `step`-th MiB holds pseudo-random bytes (see [`random_file`]); the raw file is
/// removed unless `keep_raw`. Returns the qcow2's path.
pub fn random_qcow2(dir: &Path, mib: u64, step: u64, keep_raw: bool) -> Result<std::path::PathBuf> {
    let raw = dir.join("source.raw");
    let qcow2 = dir.join("source.qcow2");
    random_file(&raw, mib, step)?;
    convert(&raw, &qcow2, "qcow2")?;
    if !keep_raw {
        std::fs::remove_file(&raw)?;
    }
    Ok(qcow2)
}

/// `sync`, then fio 4 KiB random writes at queue depth 32 over the first `mib` MiB of the
/// export at `uri` for `seconds`; returns the IOPS.
pub fn randwrite_4k_iops(uri: &str, mib: u64, seconds: u64) -> Result<f64> {
    run("sync", "coreutils", &[])?;
    let got = fio(
        uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={mib}M"),
            &format!("--runtime={seconds}"),
            "--time_based",
        ],
        "write",
    )?;
    Ok(got.iops)
}

/// Runs `program` with `args` and returns its stdout; fails with its output when it fails,
/// and names the Debian `package` that brings it when it cannot be started.
pub fn run(program: &str, package: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("{program} is needed (apt-get install {package})"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The middle value (the upper one of an even count); `v` must not be empty.
pub fn median<T: Copy + PartialOrd>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// `path` as UTF-8, which the daemons' command lines and the QEMU tools need.
pub fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

/// Starts `binary` in `dir` with the command-line `nodes` plus an NBD server on a unix
/// socket in `dir` that exports node `node` writable under the name `disk`; returns the
/// daemon once the socket is there, and the export's URI.
pub fn start_exporting(
    binary: &Path,
    dir: &Path,
    nodes: &[String],
    node: &str,
) -> Result<(testkit::Daemon, String)> {
    let sock = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut args = nodes.to_vec();
    args.extend([
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", utf8(&sock)?),
        "--export".to_string(),
        format!("type=nbd,id=e,node-name={node},name=disk,writable=on"),
    ]);
    let daemon = testkit::Daemon::start_in(binary, dir, &args)?;
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if !sock.exists() {
        anyhow::bail!("{}: no NBD socket", binary.display());
    }
    Ok((daemon, format!("nbd+unix:///disk?socket={}", utf8(&sock)?)))
}

/// What fio reports for one direction of a job.
#[derive(Debug, Clone, Copy)]
pub struct FioSide {
    pub ios: u64,
    pub iops: f64,
    pub mib_s: f64,
    /// Completion latency percentiles, µs (0 when no request completed).
    pub clat_p50_us: f64,
    pub clat_p99_us: f64,
}

/// The fio arguments that point its nbd engine at `uri` and ask for JSON output.
fn fio_args<'a>(uri: &'a str, args: &[&'a str]) -> Vec<String> {
    let mut all = vec![
        "--name=bench".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--output-format=json".to_string(),
    ];
    all.extend(args.iter().map(|a| (*a).to_string()));
    all
}

/// Parses fio's JSON output (fio may print notes before it) for direction `side`
/// (`read` or `write`).
pub fn fio_parse(out: &str, side: &str) -> Result<FioSide> {
    let json = out.find('{').map_or(out, |at| &out[at..]);
    let v: serde_json::Value = serde_json::from_str(json).context("fio's json")?;
    let s = &v["jobs"][0][side];
    let pct = |p: &str| s["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(FioSide {
        ios: s["total_ios"].as_u64().context("fio's total_ios")?,
        iops: s["iops"].as_f64().context("fio's iops")?,
        mib_s: s["bw"].as_f64().context("fio's bw")? / 1024.0,
        clat_p50_us: pct("50.000000"),
        clat_p99_us: pct("99.000000"),
    })
}

/// Runs fio's nbd engine against `uri` with the job options `args` (`--rw=...` and so on)
/// to the end, and returns direction `side` of its report.
pub fn fio(uri: &str, args: &[&str], side: &str) -> Result<FioSide> {
    let all = fio_args(uri, args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    fio_parse(&run("fio", "fio", &all)?, side)
}

/// A fio run in the background (see [`fio_start`]).
pub struct FioRun(std::process::Child);

/// Starts fio's nbd engine against `uri` with the job options `args` in the background;
/// [`FioRun::stop`] ends it and reads its report.
pub fn fio_start(uri: &str, args: &[&str]) -> Result<FioRun> {
    let child = std::process::Command::new("fio")
        .args(fio_args(uri, args))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("fio is needed (apt-get install fio)")?;
    Ok(FioRun(child))
}

impl FioRun {
    /// Interrupts fio (it reports what it did up to then) and returns direction `side`.
    pub fn stop(mut self, side: &str) -> Result<FioSide> {
        testkit::proc::send_signal(self.0.id(), "INT")?;
        let mut out = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            std::io::Read::read_to_string(&mut stdout, &mut out)?;
        }
        self.0.wait()?;
        fio_parse(&out, side)
    }
}

impl Drop for FioRun {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
