//! Snapshots against a model: random writes, zero writes, discards, compressed writes and
//! snapshot creates, deletes and reverts, with the disk and every snapshot kept as plain
//! bytes. After every step the library reads the model's disk back and its own check finds
//! nothing; at the end `qemu-img check` is clean, `qemu-img compare` agrees with the disk and
//! `qemu-img snapshot -a` brings back every snapshot's contents.

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use qcow2::{create, CreateOptions, Image, MemStorage, NewSnapshot, OpenOptions};

const SIZE: u64 = 2 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zeroes { off: u64, len: u64, unmap: bool },
    Discard { cluster: u64, clusters: u64 },
    Compressed { cluster: u64, byte: u8 },
    Create,
    Delete { pick: usize, by_id: bool },
    Revert { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|off| (Just(off), 1..=(SIZE - off).min(200_000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte }),
        1 => (range, any::<bool>()).prop_map(|((off, len), unmap)| Op::Zeroes { off, len, unmap }),
        1 => (0..64u64, 1..8u64).prop_map(|(cluster, clusters)| Op::Discard { cluster, clusters }),
        1 => (0..64u64, any::<u8>()).prop_map(|(cluster, byte)| Op::Compressed { cluster, byte }),
        2 => Just(Op::Create),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, by_id)| Op::Delete { pick, by_id }),
        1 => any::<usize>().prop_map(|pick| Op::Revert { pick }),
    ]
}

/// The image formats tried: (version, cluster size, extended L2).
const FORMATS: [(u32, u64, bool); 3] = [(3, 512, false), (2, 4096, false), (3, 16384, true)];

struct Snap {
    id: String,
    name: String,
    disk: Vec<u8>,
}

struct Model {
    disk: Vec<u8>,
    snaps: Vec<Snap>,
    created: usize,
    cs: u64,
}

async fn apply(image: &Image, m: &mut Model, op: &Op) {
    let cs = m.cs;
    match *op {
        Op::Write { off, len, byte } => {
            let data = vec![byte; len as usize];
            image.write(off, &data, None).await.unwrap();
            m.disk[off as usize..(off + len) as usize].fill(byte);
        }
        Op::Zeroes { off, len, unmap } => {
            image.write_zeroes(off, len, unmap, None).await.unwrap();
            m.disk[off as usize..(off + len) as usize].fill(0);
        }
        Op::Discard { cluster, clusters } => {
            let off = (cluster * cs).min(SIZE - cs);
            let len = (clusters * cs).min(SIZE - off);
            image.discard(off, len, false).await.unwrap();
            m.disk[off as usize..(off + len) as usize].fill(0);
        }
        Op::Compressed { cluster, byte } => {
            let off = (cluster * cs).min(SIZE - cs);
            let data = vec![byte; cs as usize];
            image.write_compressed(off, &data).await.unwrap();
            m.disk[off as usize..(off + cs) as usize].fill(byte);
        }
        Op::Create => {
            m.created += 1;
            let name = format!("snap{}", m.created);
            let info = image
                .create_snapshot(&NewSnapshot::new(&name))
                .await
                .unwrap();
            m.snaps.push(Snap {
                id: info.id,
                name,
                disk: m.disk.clone(),
            });
        }
        Op::Delete { pick, by_id } if !m.snaps.is_empty() => {
            let s = m.snaps.remove(pick % m.snaps.len());
            let r = match by_id {
                true => image.delete_snapshot(Some(&s.id), None).await,
                false => image.delete_snapshot(None, Some(&s.name)).await,
            };
            assert_eq!(r.unwrap().name, s.name);
        }
        Op::Revert { pick } if !m.snaps.is_empty() => {
            let s = &m.snaps[pick % m.snaps.len()];
            image.revert_snapshot(&s.name).await.unwrap();
            m.disk = s.disk.clone();
        }
        Op::Delete { .. } | Op::Revert { .. } => {}
    }
}

/// qemu-img's view of the final image: check, compare, and every snapshot applied.
fn qemu_agrees(bytes: &[u8], m: &Model) {
    let dir = Dir::new();
    let img = dir.s("m.qcow2");
    std::fs::write(&img, bytes).unwrap();
    qemu_img(&["check", "-q", &img]);
    let raw = dir.s("disk.raw");
    std::fs::write(&raw, &m.disk).unwrap();
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", &img, &raw]);
    for s in &m.snaps {
        let copy = dir.s("applied.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        qemu_img(&["snapshot", "-a", &s.name, &copy]);
        qemu_img(&["check", "-q", &copy]);
        std::fs::write(&raw, &s.disk).unwrap();
        qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", &copy, &raw]);
    }
}

async fn run(format: usize, ops: Vec<Op>) {
    let (version, cluster_size, extended_l2) = FORMATS[format];
    let st = MemStorage::new();
    let opts = CreateOptions {
        version,
        cluster_size,
        extended_l2,
        ..CreateOptions::new(SIZE)
    };
    create(Arc::new(st.clone()), None, &opts).await.unwrap();
    let image = Image::open(Arc::new(st.clone()), OpenOptions::default())
        .await
        .unwrap();
    let mut m = Model {
        disk: vec![0; SIZE as usize],
        snaps: Vec::new(),
        created: 0,
        cs: cluster_size,
    };
    for op in &ops {
        apply(&image, &mut m, op).await;
        assert_same(&read_all(&image, 1 << 20).await, &m.disk);
        let report = image.check().await.unwrap();
        assert_eq!(
            (report.corruptions, report.leaks),
            (0, 0),
            "after {op:?}: {report:?}"
        );
    }
    let names: Vec<String> = image
        .snapshots()
        .await
        .into_iter()
        .map(|s| s.name)
        .collect();
    let want: Vec<String> = m.snaps.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, want);
    image.close().await.unwrap();
    qemu_agrees(&st.to_bytes(), &m);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn snapshots_follow_the_model(format in 0..FORMATS.len(), ops in prop::collection::vec(op(), 1..30)) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(run(format, ops));
    }
}
