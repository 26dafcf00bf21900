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
