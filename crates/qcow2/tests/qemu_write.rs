//! Random write/write_zeroes/discard sequences against an in-memory model; afterwards
//! `qemu-img check` finds nothing and `qemu-img compare` finds the model's raw image identical.

mod common;

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use qcow2::{Backing, CreateOptions, FileStorage, Image, OpenOptions, Storage};

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

struct VecBacking(Vec<u8>);

#[async_trait]
impl Backing for VecBacking {
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
}

struct Case {
    opts: CreateOptions,
    ops: usize,
    seed: u64,
    with_backing: bool,
}

async fn run_case(case: Case) {
    let dir = Dir::new();
    let size = case.opts.size;
    let cs = case.opts.cluster_size;
    let mut rng = Rng(case.seed);
    let mut model = vec![0u8; size as usize];
    let mut opts = case.opts;
    let v2 = opts.version == 2;
    let backing = if case.with_backing {
        for (i, b) in model.iter_mut().enumerate() {
            *b = (i / 4096) as u8 | 1;
        }
        std::fs::write(dir.path("base.raw"), &model).unwrap();
        opts.backing_file = Some(dir.s("base.raw"));
        opts.backing_fmt = Some("raw".into());
        Some(VecBacking(model.clone()))
    } else {
        None
    };
    let bk = backing.as_ref().map(|b| b as &dyn Backing);
    let img = dir.s("img.qcow2");
    let file: Arc<dyn Storage> = Arc::new(FileStorage::create(&img).unwrap());
    qcow2::create(Arc::clone(&file), None, &opts).await.unwrap();
    let image = Image::open(file, OpenOptions::default()).await.unwrap();
    for _ in 0..case.ops {
        let max = (4 * cs).min(size);
        let len = 1 + rng.below(max);
        let off = rng.below(size - len + 1);
        let (o, l) = (off as usize, len as usize);
        match rng.below(10) {
            0..=5 => {
                let v = rng.next() as u8;
                let data: Vec<u8> = (0..l).map(|i| v.wrapping_add((i / 512) as u8)).collect();
                image.write(off, &data, bk).await.unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            6..=7 => {
                image
                    .write_zeroes(off, len, rng.below(2) == 0, bk)
                    .await
                    .unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                image.discard(off, len, bk.is_some()).await.unwrap();
                let first = off.div_ceil(cs);
                let end = if off + len == size {
                    size.div_ceil(cs)
                } else {
                    (off + len) / cs
                };
                for c in first..end {
                    let s = (c * cs) as usize;
                    let e = (s + cs as usize).min(size as usize);
                    match &backing {
                        // v2 has no zero flag: a discarded cluster shows the backing file.
                        Some(b) if v2 => model[s..e].copy_from_slice(&b.0[s..e]),
                        _ => model[s..e].fill(0),
                    }
                }
            }
        }
    }
    let mut ours = vec![0u8; size as usize];
    let holes = image.read(0, &mut ours).await.unwrap();
    if let Some(b) = &backing {
        for h in holes {
            ours[h.start as usize..h.end as usize]
                .copy_from_slice(&b.0[h.start as usize..h.end as usize]);
        }
    }
    let report = image.check().await.unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    image.close().await.unwrap();
    assert_same(&ours, &model);
    std::fs::write(dir.path("model.raw"), &model).unwrap();
    let check = run("qemu-img", &["check", &img]);
    assert!(
        check.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &img,
        &dir.s("model.raw"),
    ]);
}

fn opts(size: u64) -> CreateOptions {
    CreateOptions::new(size)
}

#[tokio::test]
async fn random_writes_on_v3_64k_check_clean_and_compare_identical() {
    run_case(Case {
        opts: opts(8 << 20),
        ops: 300,
        seed: 1,
        with_backing: false,
    })
    .await;
}

#[tokio::test]
async fn random_writes_on_v2_check_clean_and_compare_identical() {
    let o = CreateOptions {
        version: 2,
        ..opts(8 << 20)
    };
    run_case(Case {
        opts: o,
        ops: 300,
        seed: 2,
        with_backing: false,
    })
    .await;
}

#[tokio::test]
async fn random_writes_on_512_byte_clusters_grow_refcounts_and_compare_identical() {
    let o = CreateOptions {
        cluster_size: 512,
        ..opts(4 << 20)
    };
    run_case(Case {
        opts: o,
        ops: 600,
        seed: 3,
        with_backing: false,
    })
    .await;
}

#[tokio::test]
async fn random_writes_with_1_bit_refcounts_compare_identical() {
    let o = CreateOptions {
        cluster_size: 512,
        refcount_bits: 1,
        ..opts(4 << 20)
    };
    run_case(Case {
        opts: o,
        ops: 600,
        seed: 4,
        with_backing: false,
    })
    .await;
}

#[tokio::test]
async fn random_writes_with_extended_l2_compare_identical() {
    let o = CreateOptions {
        extended_l2: true,
        ..opts(8 << 20)
    };
    run_case(Case {
        opts: o,
        ops: 300,
        seed: 5,
        with_backing: false,
    })
    .await;
}

#[tokio::test]
async fn random_writes_over_a_backing_file_compare_identical() {
    run_case(Case {
        opts: opts(8 << 20),
        ops: 300,
        seed: 6,
        with_backing: true,
    })
    .await;
}

#[tokio::test]
async fn random_writes_with_extended_l2_over_a_backing_file_compare_identical() {
    let o = CreateOptions {
        extended_l2: true,
        ..opts(8 << 20)
    };
    run_case(Case {
        opts: o,
        ops: 300,
        seed: 7,
        with_backing: true,
    })
    .await;
}

#[tokio::test]
async fn random_writes_on_v2_over_a_backing_file_compare_identical() {
    let o = CreateOptions {
        version: 2,
        ..opts(8 << 20)
    };
    run_case(Case {
        opts: o,
        ops: 300,
        seed: 8,
        with_backing: true,
    })
    .await;
}

#[tokio::test]
async fn random_writes_with_lazy_refcounts_close_clean() {
    let o = CreateOptions {
        lazy_refcounts: true,
        ..opts(8 << 20)
    };
    run_case(Case {
        opts: o,
        ops: 300,
        seed: 9,
        with_backing: false,
    })
    .await;
}

#[tokio::test]
async fn growing_the_disk_moves_the_l1_table_and_stays_clean() {
    let dir = Dir::new();
    let img = dir.s("g.qcow2");
    let file: Arc<dyn Storage> = Arc::new(FileStorage::create(&img).unwrap());
    let o = CreateOptions {
        cluster_size: 512,
        ..opts(1 << 20)
    };
    qcow2::create(Arc::clone(&file), None, &o).await.unwrap();
    let image = Image::open(file, OpenOptions::default()).await.unwrap();
    image.write(4096, &[7; 4096], None).await.unwrap();
    image.truncate(64 << 20).await.unwrap();
    image
        .write((64 << 20) - 4096, &[9; 4096], None)
        .await
        .unwrap();
    image.close().await.unwrap();
    qemu_img(&["check", &img]);
    let mut model = vec![0u8; 64 << 20];
    model[4096..8192].fill(7);
    model[(64 << 20) - 4096..].fill(9);
    std::fs::write(dir.path("m.raw"), &model).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &img, &dir.s("m.raw")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_to_one_cluster_and_many_clusters_lose_nothing() {
    let dir = Dir::new();
    let img = dir.s("c.qcow2");
    let file: Arc<dyn Storage> = Arc::new(FileStorage::create(&img).unwrap());
    qcow2::create(Arc::clone(&file), None, &opts(4 << 20))
        .await
        .unwrap();
    let image = Arc::new(Image::open(file, OpenOptions::default()).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let image = Arc::clone(&image);
        // Two writers per 64 KiB cluster, each on its own 4 KiB, racing to allocate it.
        tasks.push(tokio::spawn(async move {
            image
                .write(i * 32768 + 4096, &[i as u8 + 1; 4096], None)
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    image.close().await.unwrap();
    let mut model = vec![0u8; 4 << 20];
    for i in 0..32usize {
        model[i * 32768 + 4096..i * 32768 + 8192].fill(i as u8 + 1);
    }
    std::fs::write(dir.path("m.raw"), &model).unwrap();
    qemu_img(&["check", &img]);
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &img, &dir.s("m.raw")]);
}
