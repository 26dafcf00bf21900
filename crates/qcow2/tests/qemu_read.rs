//! Images made by qemu-img and written by qemu-io read byte for byte as qemu-img reads them.

mod common;

use common::*;

/// A write pattern touching whole clusters, partial clusters, zeroes and a discard.
const PATTERN: &[&str] = &[
    "write -P 0xaa 0 64k",
    "write -P 0x55 100k 3k",
    "write -P 0x11 1M 1500",
    "write -P 0x22 2047k 2k",
    "write -z 3M 256k",
    "write -P 0x33 3200k 64k",
    "discard 3200k 64k",
];

async fn check_qcow2(dir: &Dir, opts: &str, size: &str, cmds: &[&str]) {
    let img = dir.path("a.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        img.to_str().unwrap(),
        size,
    ]);
    qemu_io("qcow2", &img, cmds);
    let theirs = qemu_raw(&img, dir.tmp.path());
    let image = open(&img, true).await;
    assert_same(&read_all(&image, 192 * 1024 + 512).await, &theirs);
}

#[tokio::test]
async fn reads_v2_image_with_64k_clusters() {
    check_qcow2(&Dir::new(), "compat=0.10", "4M", PATTERN).await;
}

#[tokio::test]
async fn reads_v3_image_with_64k_clusters() {
    check_qcow2(&Dir::new(), "compat=1.1", "4M", PATTERN).await;
}

#[tokio::test]
async fn reads_v3_image_with_512_byte_clusters() {
    check_qcow2(&Dir::new(), "cluster_size=512", "4M", PATTERN).await;
}

#[tokio::test]
async fn reads_v2_image_with_512_byte_clusters() {
    check_qcow2(&Dir::new(), "compat=0.10,cluster_size=512", "4M", PATTERN).await;
}

#[tokio::test]
async fn reads_v3_image_with_2m_clusters() {
    check_qcow2(&Dir::new(), "cluster_size=2M", "8M", PATTERN).await;
}

#[tokio::test]
async fn reads_image_with_1_bit_refcounts() {
    check_qcow2(&Dir::new(), "refcount_bits=1", "4M", PATTERN).await;
}

#[tokio::test]
async fn reads_image_with_16_bit_refcounts() {
    check_qcow2(&Dir::new(), "refcount_bits=16", "4M", PATTERN).await;
}

#[tokio::test]
async fn reads_image_with_64_bit_refcounts() {
    check_qcow2(&Dir::new(), "refcount_bits=64", "4M", PATTERN).await;
}

#[tokio::test]
async fn reads_extended_l2_image_with_subcluster_writes() {
    let cmds = [PATTERN, &["write -P 0x44 1030k 1k", "write -z 1032k 2k"]].concat();
    check_qcow2(&Dir::new(), "extended_l2=on", "4M", &cmds).await;
}

#[tokio::test]
async fn reads_extended_l2_image_with_2m_clusters() {
    check_qcow2(&Dir::new(), "extended_l2=on,cluster_size=2M", "8M", PATTERN).await;
}

#[tokio::test]
async fn reads_lazy_refcounts_image() {
    check_qcow2(&Dir::new(), "lazy_refcounts=on", "4M", PATTERN).await;
}

async fn check_compressed(kind: &str) {
    let dir = Dir::new();
    let raw = dir.path("src.raw");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    qemu_io(
        "raw",
        &raw,
        &[
            "write -P 0xaa 0 200k",
            "write -P 0x5c 1M 70k",
            "write -P 0x01 3M 4k",
        ],
    );
    // Some incompressible data too, which qemu-img stores uncompressed.
    let mut bytes = std::fs::read(&raw).unwrap();
    let mut x = 0x12345678u32;
    for b in &mut bytes[2 << 20..(2 << 20) + 100_000] {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let img = dir.path("c.qcow2");
    let opt = format!("compression_type={kind}");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &opt,
        &dir.s("src.raw"),
        &dir.s("c.qcow2"),
    ]);
    let image = open(&img, true).await;
    assert_same(&read_all(&image, 100_000).await, &bytes);
}

#[tokio::test]
async fn reads_deflate_compressed_image() {
    check_compressed("zlib").await;
}

#[tokio::test]
async fn reads_zstd_compressed_image() {
    check_compressed("zstd").await;
}

#[tokio::test]
async fn reads_external_data_file_image() {
    let dir = Dir::new();
    let img = dir.path("d.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", dir.s("d.data")),
        &dir.s("d.qcow2"),
        "4M",
    ]);
    qemu_io("qcow2", &img, PATTERN);
    let theirs = qemu_raw(&img, dir.tmp.path());
    let st: std::sync::Arc<dyn qcow2::Storage> =
        std::sync::Arc::new(qcow2::FileStorage::open(&img, false).unwrap());
    let data: std::sync::Arc<dyn qcow2::Storage> =
        std::sync::Arc::new(qcow2::FileStorage::open(dir.path("d.data"), false).unwrap());
    let opts = qcow2::OpenOptions {
        read_only: true,
        data_file: Some(data),
        ..Default::default()
    };
    let image = qcow2::Image::open(st, opts).await.unwrap();
    assert_same(&read_all(&image, 1 << 20).await, &theirs);
}

#[tokio::test]
async fn reads_overlay_reporting_unallocated_ranges_for_the_backing_file() {
    let dir = Dir::new();
    qemu_img(&["create", "-q", "-f", "qcow2", &dir.s("base.qcow2"), "4M"]);
    qemu_io("qcow2", &dir.path("base.qcow2"), &["write -P 0x77 0 4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &dir.s("top.qcow2"),
    ]);
    qemu_io("qcow2", &dir.path("top.qcow2"), PATTERN);
    let theirs = qemu_raw(&dir.path("top.qcow2"), dir.tmp.path());
    let top = open(&dir.path("top.qcow2"), true).await;
    let base = open(&dir.path("base.qcow2"), true).await;
    let mut ours = vec![0u8; 4 << 20];
    let holes = top.read(0, &mut ours).await.unwrap();
    for h in holes {
        base.read(h.start, &mut ours[h.start as usize..h.end as usize])
            .await
            .unwrap();
    }
    assert_same(&ours, &theirs);
}

#[tokio::test]
async fn reads_backing_name_and_format_from_the_header() {
    let dir = Dir::new();
    qemu_img(&["create", "-q", "-f", "qcow2", &dir.s("base.qcow2"), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &dir.s("top.qcow2"),
    ]);
    let h = open(&dir.path("top.qcow2"), true).await.header().await;
    assert_eq!(
        (
            h.backing_file.as_deref(),
            h.extensions.backing_format.as_deref()
        ),
        (Some("base.qcow2"), Some("qcow2"))
    );
}

#[tokio::test]
async fn block_status_reports_data_zero_and_unallocated() {
    let dir = Dir::new();
    let img = dir.path("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 128k", "write -z 128k 64k"]);
    let image = open(&img, true).await;
    let a = image.block_status(0, 1 << 20).await.unwrap();
    let b = image.block_status(128 << 10, 1 << 19).await.unwrap();
    let c = image.block_status(192 << 10, 1 << 19).await.unwrap();
    assert!(matches!(a.kind, qcow2::BlockKind::Data { .. }) && a.len == 128 << 10);
    assert_eq!((b.kind, b.len), (qcow2::BlockKind::Zero, 64 << 10));
    assert_eq!((c.kind, c.len), (qcow2::BlockKind::Unallocated, 1 << 19));
}
