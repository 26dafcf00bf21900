//! Compressed writes: clusters written compressed by the library read back through
//! `qemu-img compare`, pass `qemu-img check`, and show as compressed in `qemu-img map`.

mod common;

use std::sync::Arc;

use common::*;
use qcow2::{BlockKind, CompressionType, CreateOptions, FileStorage, Image, OpenOptions, Storage};

fn noise(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Text-like data that compresses well, different for every cluster.
fn compressible(seed: usize, len: usize) -> Vec<u8> {
    let words = [
        "qcow2 ", "cluster ", "backup ", "blockd ", "zstd ", "deflate ",
    ];
    let mut out = Vec::with_capacity(len);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(words[i % words.len()].as_bytes());
        out.push(b'0' + (i % 10) as u8);
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    out.truncate(len);
    out
}

async fn compressed_round_trip(kind: CompressionType, cluster_size: u64, extended_l2: bool) {
    let dir = Dir::new();
    let img = dir.s("c.qcow2");
    // A partial last cluster.
    let size = 24 * cluster_size + (cluster_size / 2).max(512);
    let cs = cluster_size as usize;
    let file: Arc<dyn Storage> = Arc::new(FileStorage::create(&img).unwrap());
    let opts = CreateOptions {
        cluster_size,
        compression_type: kind,
        extended_l2,
        ..CreateOptions::new(size)
    };
    qcow2::create(Arc::clone(&file), None, &opts).await.unwrap();
    let image = Image::open(file, OpenOptions::default()).await.unwrap();
    let mut model = vec![0u8; size as usize];
    let clusters = size.div_ceil(cluster_size) as usize;
    for c in 0..clusters {
        let at = c * cs;
        let len = cs.min(size as usize - at);
        let data = match c % 4 {
            3 => noise(c as u32, len),
            2 if c % 8 == 2 => vec![0; len],
            _ => compressible(c, len),
        };
        image.write_compressed(at as u64, &data).await.unwrap();
        model[at..at + len].copy_from_slice(&data);
    }
    // Overwrite some: compressed over compressed, plain over compressed, a discard.
    for c in [1usize, 5] {
        let data = compressible(c + 100, cs);
        image
            .write_compressed((c * cs) as u64, &data)
            .await
            .unwrap();
        model[c * cs..(c + 1) * cs].copy_from_slice(&data);
    }
    image
        .write((4 * cs + 100) as u64, &[0xab; 300], None)
        .await
        .unwrap();
    model[4 * cs + 100..4 * cs + 400].fill(0xab);
    image
        .discard((8 * cs) as u64, cluster_size, false)
        .await
        .unwrap();
    model[8 * cs..9 * cs].fill(0);
    assert!(image.write_compressed(100, &vec![1; cs]).await.is_err());
    assert_eq!(
        image.block_status(0, cluster_size).await.unwrap().kind,
        BlockKind::Compressed
    );
    let ours = read_all(&image, 3 * cs + 1).await;
    assert_same(&ours, &model);
    let report = image.check().await.unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    assert!(
        report.compressed_clusters >= clusters as u64 / 2,
        "{report:?}"
    );
    image.close().await.unwrap();

    qemu_img(&["check", &img]);
    std::fs::write(dir.path("model.raw"), &model).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &img,
        &dir.s("model.raw"),
    ]);
    let map: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", &img])).unwrap();
    let compressed = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["compressed"] == serde_json::Value::Bool(true))
        .count();
    assert!(compressed > 0, "{map}");
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", &img])).unwrap();
    let want = match kind {
        CompressionType::Deflate => "zlib",
        CompressionType::Zstd => "zstd",
    };
    assert_eq!(info["format-specific"]["data"]["compression-type"], want);
    // And qemu-io reads the clusters QEMU packed next to each other, one by one.
    let mut cmds = Vec::new();
    for c in [0usize, 1, 6, clusters - 1] {
        let at = c * cs;
        let len = cs.min(size as usize - at);
        if model[at..at + len].iter().all(|&b| b == model[at]) {
            cmds.push(format!("read -P {} {at} {len}", model[at]));
        }
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    if !cmds.is_empty() {
        qemu_io("qcow2", std::path::Path::new(&img), &cmds);
    }
}

#[tokio::test]
async fn deflate_compressed_writes_read_back_in_qemu() {
    compressed_round_trip(CompressionType::Deflate, 65536, false).await;
}

#[tokio::test]
async fn zstd_compressed_writes_read_back_in_qemu() {
    compressed_round_trip(CompressionType::Zstd, 65536, false).await;
}

#[tokio::test]
async fn small_cluster_compressed_writes_read_back_in_qemu() {
    compressed_round_trip(CompressionType::Deflate, 4096, false).await;
    compressed_round_trip(CompressionType::Zstd, 512, false).await;
}

#[tokio::test]
async fn compressed_writes_with_extended_l2_read_back_in_qemu() {
    compressed_round_trip(CompressionType::Zstd, 65536, true).await;
}
