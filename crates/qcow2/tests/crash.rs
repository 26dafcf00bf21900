//! Crash safety: a child process (this test binary run again, see [`crash_child`]) does random
//! writes, write_zeroes, discards and flushes on an image until it is killed with SIGKILL at a
//! random moment. After every kill `qemu-img check` must find no corruption (leaks are allowed
//! and repaired with `qemu-img check -r leaks`), and every byte written before the last
//! completed flush must read back, except bytes that later, unflushed requests touched.
//! Lazy-refcount images may be left dirty; reopening them read-write must repair them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use qcow2::{CreateOptions, FileStorage, Image, OpenOptions, Storage};

const CHILD_IMG: &str = "QCOW2_CRASH_CHILD_IMAGE";
const CHILD_SEED: &str = "QCOW2_CRASH_CHILD_SEED";
/// Requests one child issues at most before it just waits for its kill.
const MAX_OPS: usize = 50_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Write(u8),
    Zeroes { unmap: bool },
    Discard,
    Flush,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: Kind,
    off: u64,
    len: u64,
}

/// The request sequence of one child, the same in the child and in the checker.
struct Workload {
    rng: Rng,
    cs: u64,
    size: u64,
}

impl Iterator for Workload {
    type Item = Op;
    fn next(&mut self) -> Option<Op> {
        let r = &mut self.rng;
        let len = 1 + r.below((4 * self.cs).min(self.size));
        let off = r.below(self.size - len + 1);
        let kind = match r.below(16) {
            0..=7 => Kind::Write(r.next() as u8 | 1),
            8..=9 => Kind::Zeroes {
                unmap: r.below(2) == 0,
            },
            10..=12 => Kind::Discard,
            _ => Kind::Flush,
        };
        Some(Op { kind, off, len })
    }
}

fn workload(seed: u64, cs: u64, size: u64) -> Workload {
    Workload {
        rng: Rng(seed | 1),
        cs,
        size,
    }
}

fn pattern(v: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| v.wrapping_add((i / 512) as u8)).collect()
}

/// Apply `op` to the guest model (no backing file, so discarded clusters read as zeros).
fn apply(model: &mut [u8], op: Op, cs: u64) {
    let (o, l) = (op.off as usize, op.len as usize);
    match op.kind {
        Kind::Write(v) => model[o..o + l].copy_from_slice(&pattern(v, op.len)),
        Kind::Zeroes { .. } => model[o..o + l].fill(0),
        Kind::Discard => {
            let size = model.len() as u64;
            let end = op.off + op.len;
            let last = if end == size {
                size.div_ceil(cs)
            } else {
                end / cs
            };
            for c in op.off.div_ceil(cs)..last {
                let s = (c * cs) as usize;
                let e = (s + cs as usize).min(model.len());
                model[s..e].fill(0);
            }
        }
        Kind::Flush => {}
    }
}

/// The child side: only does something when the crash test starts this binary for it.
#[test]
fn crash_child() {
    let (Ok(img), Ok(seed)) = (std::env::var(CHILD_IMG), std::env::var(CHILD_SEED)) else {
        return;
    };
    let seed: u64 = seed.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let file: Arc<dyn Storage> = Arc::new(FileStorage::open(&img, true).unwrap());
        let image = Image::open(file, OpenOptions::default()).await.unwrap();
        let mut out = std::io::stdout();
        let ops = workload(seed, image.cluster_size(), image.size());
        for (i, op) in ops.take(MAX_OPS).enumerate() {
            writeln!(out, "S {i}").unwrap();
            out.flush().unwrap();
            match op.kind {
                Kind::Write(v) => image.write(op.off, &pattern(v, op.len), None).await,
                Kind::Zeroes { unmap } => image.write_zeroes(op.off, op.len, unmap, None).await,
                Kind::Discard => image.discard(op.off, op.len, false).await,
                Kind::Flush => image.flush().await,
            }
            .unwrap();
            if matches!(op.kind, Kind::Flush) {
                writeln!(out, "F {i}").unwrap();
                out.flush().unwrap();
            }
        }
        std::future::pending::<()>().await;
    });
}

/// What one killed child reported: the index of its last completed flush and of the last
/// request it started.
struct Run {
    flushed: Option<usize>,
    started: Option<usize>,
}

fn run_child(img: &Path, seed: u64, delay: Duration) -> Run {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_IMG, img)
        .env(CHILD_SEED, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut run = Run {
            flushed: None,
            started: None,
        };
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The harness's "test crash_child ... " may precede the first report on its line.
            let mut words = line.split_whitespace().rev();
            let (n, tag) = (words.next().and_then(|n| n.parse().ok()), words.next());
            match tag {
                Some("S") => run.started = n,
                Some("F") => run.flushed = n,
                _ => {}
            }
        }
        run
    });
    std::thread::sleep(delay);
    let early = child.try_wait().unwrap();
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    if let Some(st) = early {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        panic!("the child exited by itself ({st}): {err}");
    }
    assert!(!status.success());
    reader.join().unwrap()
}

fn qemu_check_json(img: &str, repair: Option<&str>) -> (i32, serde_json::Value) {
    let mut args = vec!["check", "--output=json"];
    if let Some(r) = repair {
        args.extend(["-r", r]);
    }
    args.push(img);
    let out = run("qemu-img", &args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check {img}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v.get(name).and_then(|x| x.as_u64()).unwrap_or(0)
}

fn is_dirty(img: &str) -> bool {
    let bytes = std::fs::read(img).unwrap();
    u64::from_be_bytes(bytes[72..80].try_into().unwrap()) & 1 != 0
}

#[derive(Default, Debug)]
struct Tally {
    kills: usize,
    after_a_flush: usize,
    with_leaks: usize,
    dirty: usize,
    requests: usize,
}

/// Kill a child `kills` times on one image; check the image and its data after each kill.
async fn crash_loop(opts: CreateOptions, kills: usize, seed: u64) -> Tally {
    let dir = Dir::new();
    let img = dir.s("crash.qcow2");
    let (cs, size) = (opts.cluster_size, opts.size);
    let lazy = opts.lazy_refcounts;
    {
        let file: Arc<dyn Storage> = Arc::new(FileStorage::create(&img).unwrap());
        qcow2::create(file, None, &opts).await.unwrap();
    }
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let mut tally = Tally::default();
    for k in 0..kills {
        let child_seed = rng.next();
        let delay = Duration::from_millis(rng.below(200));
        let run = run_child(Path::new(&img), child_seed, delay);
        tally.kills += 1;
        let ctx = format!("kill {k} (seed {seed}, child seed {child_seed}, delay {delay:?})");
        if lazy && is_dirty(&img) {
            tally.dirty += 1;
            // Reopening read-write rebuilds the refcounts; closing clears the dirty bit.
            let image = open(Path::new(&img), false).await;
            image.close().await.unwrap();
            drop(image);
            assert!(!is_dirty(&img), "{ctx}: still dirty after a repair");
        }
        let (code, v) = qemu_check_json(&img, None);
        assert_eq!(field(&v, "corruptions"), 0, "{ctx}: corrupt: {v}");
        assert_eq!(field(&v, "check-errors"), 0, "{ctx}: {v}");
        if field(&v, "leaks") > 0 {
            tally.with_leaks += 1;
            let (_, r) = qemu_check_json(&img, Some("leaks"));
            assert_eq!(field(&r, "corruptions"), 0, "{ctx}: {r}");
            let (code, v) = qemu_check_json(&img, None);
            assert_eq!(code, 0, "{ctx}: not clean after -r leaks: {v}");
        } else {
            assert_eq!(code, 0, "{ctx}: {v}");
        }
        // Everything up to the last completed flush must be there, except bytes that requests
        // started after it may have changed.
        let actual = qemu_raw(Path::new(&img), dir.tmp.path());
        let ops: Vec<Op> = match run.started {
            Some(s) => workload(child_seed, cs, size).take(s + 1).collect(),
            None => Vec::new(),
        };
        let durable = run.flushed.map_or(0, |f| f + 1);
        tally.requests += ops.len();
        if run.flushed.is_some() {
            tally.after_a_flush += 1;
        }
        for op in &ops[..durable] {
            apply(&mut model, *op, cs);
        }
        let mut loose = vec![false; size as usize];
        for op in &ops[durable..] {
            if !matches!(op.kind, Kind::Flush) {
                loose[op.off as usize..(op.off + op.len) as usize].fill(true);
            }
        }
        if let Some(i) = (0..size as usize).find(|&i| !loose[i] && actual[i] != model[i]) {
            let later = workload(child_seed, cs, size)
                .take(ops.len() + 5000)
                .position(|op| {
                    !matches!(op.kind, Kind::Flush)
                        && (op.off..op.off + op.len).contains(&(i as u64))
                });
            panic!(
                "{ctx}: byte {i:#x} is {:#x}, expected {:#x} (flushed through request {:?}, \
                 started {:?}, first request of the child touching it: {later:?})",
                actual[i], model[i], run.flushed, run.started
            );
        }
        // The next child starts from what the image holds now.
        model = actual;
    }
    tally
}

fn report(name: &str, t: &Tally, started: Instant) {
    eprintln!("{name}: {t:?} in {:?}", started.elapsed());
    assert!(
        t.after_a_flush * 2 >= t.kills,
        "{name}: too few kills after a flush"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_never_corrupts_and_keeps_flushed_writes() {
    let started = Instant::now();
    let configs = [
        CreateOptions {
            cluster_size: 512,
            ..CreateOptions::new(4 << 20)
        },
        CreateOptions {
            cluster_size: 4096,
            ..CreateOptions::new(16 << 20)
        },
        CreateOptions {
            extended_l2: true,
            ..CreateOptions::new(16 << 20)
        },
    ];
    let mut total = Tally::default();
    for (i, opts) in configs.into_iter().enumerate() {
        let t = crash_loop(opts, 17, 0x5eed + i as u64).await;
        total.kills += t.kills;
        total.after_a_flush += t.after_a_flush;
        total.with_leaks += t.with_leaks;
        total.requests += t.requests;
    }
    assert!(total.kills >= 50);
    report("crash", &total, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_lazy_refcounts_is_repaired_on_reopen() {
    let started = Instant::now();
    let opts = CreateOptions {
        cluster_size: 4096,
        lazy_refcounts: true,
        ..CreateOptions::new(16 << 20)
    };
    let t = crash_loop(opts, 20, 0x1a27).await;
    assert!(t.dirty > 0, "no kill left the image dirty: {t:?}");
    report("lazy crash", &t, started);
}
