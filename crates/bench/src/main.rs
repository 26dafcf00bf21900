//! `blockd-bench`: runs blockd and qemu-storage-daemon side by side,
//! interleaved over several rounds, and reports per metric both sides and
//! the blockd/QSD ratio. It measures; it never asserts timing.
//!
//! ```text
//! cargo run --release -p bench -- [--blockd PATH] [--qsd PATH] [--out BENCHMARKS.md]
//!                                 [--rounds N] [--starts N] [--requests N]
//! ```

use std::fmt::Write as _;
use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use testkit::Daemon;

const START_MARK: &str = "<!-- blockd-bench:start -->";
const END_MARK: &str = "<!-- blockd-bench:end -->";

#[derive(Debug)]
struct Options {
    blockd: PathBuf,
    qsd: PathBuf,
    out: Option<PathBuf>,
    rounds: usize,
    starts: usize,
    requests: usize,
}

fn usage() -> &'static str {
    "usage: blockd-bench [--blockd PATH] [--qsd PATH] [--out FILE] [--rounds N] [--starts N] [--requests N]"
}

fn parse_options() -> Result<Options> {
    let mut blockd = None;
    let mut qsd = None;
    let mut out = None;
    let mut rounds = 5;
    let mut starts = 4;
    let mut requests = 2000;
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
            "--blockd" => blockd = Some(PathBuf::from(value()?)),
            "--qsd" => qsd = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--rounds" => rounds = value()?.parse().context("--rounds")?,
            "--starts" => starts = value()?.parse().context("--starts")?,
            "--requests" => requests = value()?.parse().context("--requests")?,
            _ => bail!("unexpected argument {arg:?}; {}", usage()),
        }
    }
    let blockd = match blockd {
        Some(path) => path,
        None => {
            // `cargo build --release -p daemon` puts blockd next to this binary.
            let exe = std::env::current_exe().context("cannot find own path")?;
            exe.with_file_name("blockd")
        }
    };
    if !blockd.is_file() {
        bail!(
            "blockd not found at {} (build it with `cargo build --release -p daemon` or pass --blockd)",
            blockd.display()
        );
    }
    Ok(Options {
        blockd,
        qsd: qsd.unwrap_or_else(testkit::qsd_path),
        out,
        rounds: rounds.max(1),
        starts: starts.max(1),
        requests: requests.max(1),
    })
}

/// Samples of one side.
#[derive(Debug, Default)]
struct Samples {
    startup: Vec<Duration>,
    rss_kib: Vec<u64>,
    latency: Vec<Duration>,
}

/// Time from spawn to a read QMP greeting.
///
/// The daemon is started with the same monitor as testkit's launcher, but the
/// socket is polled every 50 µs (testkit sleeps 2 ms between tries, which
/// would round every start-up up to its poll period), and the greeting is read
/// straight off the socket.
fn startup_once(binary: &Path) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("qmp.sock");
    let chardev = format!(
        "socket,id=m0,path={},server=on,wait=off",
        socket.to_str().context("non-UTF-8 socket path")?
    );
    let started = Instant::now();
    let mut child = std::process::Command::new(binary)
        .args(["--chardev", &chardev, "--monitor", "chardev=m0"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let result = (|| -> Result<Duration> {
        let deadline = started + Duration::from_secs(10);
        let mut stream = loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => break stream,
                Err(err) => {
                    if let Some(status) = child.try_wait()? {
                        bail!("{} exited ({status}) during start-up", binary.display());
                    }
                    if Instant::now() > deadline {
                        return Err(err).context("no QMP socket within 10 s");
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut greeting = Vec::with_capacity(256);
        let mut buf = [0u8; 512];
        while !greeting.contains(&b'\n') {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                bail!(
                    "{}: connection closed before the greeting",
                    binary.display()
                );
            }
            greeting.extend_from_slice(&buf[..n]);
        }
        let elapsed = started.elapsed();
        if !greeting.starts_with(b"{\"QMP\"") {
            bail!("{}: unexpected greeting", binary.display());
        }
        Ok(elapsed)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// A daemon with four nodes: file, raw over it, and two null-co.
fn start_with_nodes(binary: &Path, dir: &Path) -> Result<Daemon> {
    let image = dir.join("a.img");
    std::fs::File::create(&image)?.set_len(1 << 20)?;
    let image = image.to_str().context("non-UTF-8 path")?;
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=file0,filename={image}"),
        "--blockdev".to_string(),
        "driver=raw,node-name=raw0,file=file0".to_string(),
        "--blockdev".to_string(),
        "driver=null-co,node-name=null0".to_string(),
        "--blockdev".to_string(),
        "driver=null-co,node-name=null1,size=1048576".to_string(),
    ];
    Daemon::start_in(binary, dir, &args)
}

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// Idle RSS after negotiation, then `requests` round trips.
fn steady_once(binary: &Path, requests: usize, samples: &mut Samples) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut daemon = start_with_nodes(binary, dir.path())?;
    let mut qmp = daemon.qmp()?;
    let nodes = qmp
        .execute("query-named-block-nodes", json!({}))
        .map_err(anyhow::Error::from)?;
    let count = nodes.as_array().map_or(0, Vec::len);
    if count != 4 {
        bail!("{}: expected 4 nodes, got {count}", binary.display());
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = daemon.pid().context("daemon not running")?;
    samples.rss_kib.push(vm_rss_kib(pid)?);
    let request = br#"{"execute": "query-named-block-nodes"}"#;
    for _ in 0..requests {
        let t = Instant::now();
        qmp.send_raw(request)?;
        let reply = qmp.read_reply()?;
        samples.latency.push(t.elapsed());
        if reply.get("return").is_none() {
            bail!("{}: unexpected reply {reply}", binary.display());
        }
    }
    daemon.kill();
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median_u64(values: &[u64]) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

struct Row {
    metric: String,
    blockd: f64,
    qsd: f64,
    unit: &'static str,
}

fn rows(b: &mut Samples, q: &mut Samples, opts: &Options) -> Vec<Row> {
    for s in [&mut *b, &mut *q] {
        s.startup.sort_unstable();
        s.latency.sort_unstable();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    vec![
        Row {
            metric: format!(
                "start to QMP greeting, median of {}",
                opts.rounds * opts.starts
            ),
            blockd: ms(percentile(&b.startup, 50.0)),
            qsd: ms(percentile(&q.startup, 50.0)),
            unit: "ms",
        },
        Row {
            metric: format!("idle VmRSS with 4 nodes, median of {}", opts.rounds),
            blockd: median_u64(&b.rss_kib) as f64 / 1024.0,
            qsd: median_u64(&q.rss_kib) as f64 / 1024.0,
            unit: "MiB",
        },
        Row {
            metric: format!(
                "query-named-block-nodes round trip p50 ({} x {})",
                opts.rounds, opts.requests
            ),
            blockd: us(percentile(&b.latency, 50.0)),
            qsd: us(percentile(&q.latency, 50.0)),
            unit: "µs",
        },
        Row {
            metric: format!(
                "query-named-block-nodes round trip p99 ({} x {})",
                opts.rounds, opts.requests
            ),
            blockd: us(percentile(&b.latency, 99.0)),
            qsd: us(percentile(&q.latency, 99.0)),
            unit: "µs",
        },
    ]
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| metric | blockd | QSD | blockd/QSD |\n|---|---:|---:|---:|\n");
    for r in rows {
        let ratio = if r.qsd > 0.0 { r.blockd / r.qsd } else { 0.0 };
        let _ = writeln!(
            out,
            "| {} | {:.1} {} | {:.1} {} | {:.2} |",
            r.metric, r.blockd, r.unit, r.qsd, r.unit, ratio
        );
    }
    out
}

fn version_line(binary: &Path) -> String {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn report(table: &str, opts: &Options) -> String {
    format!(
        "{START_MARK}\n## blockd vs qemu-storage-daemon\n\n\
         - date: {}\n- machine: {}\n- QSD: `{}`\n- blockd: `{}`\n\
         - method: `cargo run --release -p bench -- --rounds {r} --starts {s} --requests {n}`; \
         {r} interleaved rounds, each starting both daemons {s} times, then measuring idle \
         RSS and {n} round trips (nodes: file, raw, null-co, null-co)\n\n{}{END_MARK}\n",
        bench::today(),
        bench::machine(),
        version_line(&opts.qsd),
        version_line(&opts.blockd),
        table,
        r = opts.rounds,
        s = opts.starts,
        n = opts.requests,
    )
}

fn write_out(path: &Path, section: &str) -> Result<()> {
    bench::write_section(path, START_MARK, END_MARK, section)
}

fn main() -> Result<()> {
    let opts = parse_options()?;
    let mut b = Samples::default();
    let mut q = Samples::default();
    for round in 0..opts.rounds {
        eprintln!("round {}/{}", round + 1, opts.rounds);
        // Alternate which side goes first so neither always runs on a warm cache.
        let sides: [(&Path, bool); 2] = if round % 2 == 0 {
            [(&opts.blockd, true), (&opts.qsd, false)]
        } else {
            [(&opts.qsd, false), (&opts.blockd, true)]
        };
        for _ in 0..opts.starts {
            for (binary, is_blockd) in sides {
                let s = if is_blockd { &mut b } else { &mut q };
                s.startup.push(startup_once(binary)?);
            }
        }
        for (binary, is_blockd) in sides {
            let s = if is_blockd { &mut b } else { &mut q };
            steady_once(binary, opts.requests, s)?;
        }
    }
    let rows = rows(&mut b, &mut q, &opts);
    let table = table(&rows);
    print!("{table}");
    if let Some(out) = &opts.out {
        write_out(out, &report(&table, &opts))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
