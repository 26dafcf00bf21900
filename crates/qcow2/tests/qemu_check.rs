//! check() counts as `qemu-img check` counts, and repairs what it repairs.

mod common;

use std::sync::Arc;

use common::*;
use qcow2::{FileStorage, Image, OpenOptions, Storage};

fn qemu_check_json(path: &str) -> serde_json::Value {
    let out = run("qemu-img", &["check", "--output=json", path]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v.get(name).and_then(|x| x.as_u64()).unwrap_or(0)
}

#[tokio::test]
async fn check_counts_like_qemu_img_on_a_fragmented_compressed_image() {
    let dir = Dir::new();
    let raw = dir.path("s.raw");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    qemu_io("raw", &raw, &["write -P 1 0 1M"]);
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &dir.s("s.raw"),
        &dir.s("c.qcow2"),
    ]);
    qemu_io(
        "qcow2",
        &dir.path("c.qcow2"),
        &[
            "write -P 2 2M 64k",
            "write -P 3 3M 128k",
            "write -P 4 64k 4k",
        ],
    );
    let theirs = qemu_check_json(&dir.s("c.qcow2"));
    let r = open(&dir.path("c.qcow2"), true)
        .await
        .check()
        .await
        .unwrap();
    assert_eq!(
        (
            r.corruptions,
            r.leaks,
            r.allocated_clusters,
            r.fragmented_clusters,
            r.compressed_clusters,
            r.image_end_offset
        ),
        (
            field(&theirs, "corruptions"),
            field(&theirs, "leaks"),
            field(&theirs, "allocated-clusters"),
            field(&theirs, "fragmented-clusters"),
            field(&theirs, "compressed-clusters"),
            field(&theirs, "image-end-offset"),
        )
    );
}

/// An image whose refcount block claims cluster 10, which nothing uses.
fn leaky(dir: &Dir) -> String {
    let img = dir.s("l.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "1M"]);
    let mut b = std::fs::read(&img).unwrap();
    b.resize(11 << 16, 0);
    b[0x20000 + 20..0x20000 + 22].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(&img, b).unwrap();
    img
}

#[tokio::test]
async fn check_reports_a_leak_as_qemu_img_does() {
    let dir = Dir::new();
    let img = leaky(&dir);
    let r = open(std::path::Path::new(&img), true)
        .await
        .check()
        .await
        .unwrap();
    assert_eq!(
        (r.leaks, r.corruptions),
        (field(&qemu_check_json(&img), "leaks"), 0)
    );
}

#[tokio::test]
async fn repair_fixes_leaks_and_qemu_img_check_is_clean() {
    let dir = Dir::new();
    let img = leaky(&dir);
    let r = open(std::path::Path::new(&img), false)
        .await
        .check_and_repair(false)
        .await
        .unwrap();
    assert_eq!((r.leaks_fixed, r.leaks), (1, 0));
    qemu_img(&["check", &img]);
}

#[tokio::test]
async fn dirty_lazy_refcounts_image_is_rebuilt_on_writable_open() {
    let dir = Dir::new();
    let img = dir.s("d.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        &img,
        "8M",
    ]);
    // `abort` kills qemu-io without a clean close: the dirty bit stays set.
    let _ = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 5 0 3M",
            "-c",
            "write -P 6 5M 64k",
            "-c",
            "abort",
            &img,
        ],
    );
    let info = qemu_img(&["info", "--output=json", &img]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&img, true).unwrap());
    let image = Image::open(st, OpenOptions::default()).await.unwrap();
    image.close().await.unwrap();
    qemu_img(&["check", &img]);
    assert!(qemu_img(&["info", "--output=json", &img]).contains("\"dirty-flag\": false"));
}
