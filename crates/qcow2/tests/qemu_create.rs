//! Images made by `qemu::create` are what `qemu-img create -f qcow2 -o ...` makes.

mod common;

use std::sync::Arc;

use common::*;
use qcow2::{CompressionType, CreateOptions, FileStorage, Preallocation, Storage};

fn info(path: &str) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", path])).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("filename");
    o.remove("actual-size");
    if let Some(c) = o.get_mut("children").and_then(|c| c.as_array_mut()) {
        for child in c {
            child["info"].as_object_mut().unwrap().remove("filename");
            child["info"].as_object_mut().unwrap().remove("actual-size");
        }
    }
    if let Some(d) = o.get_mut("format-specific").and_then(|f| f.get_mut("data")) {
        d.as_object_mut().unwrap().remove("data-file");
    }
    v
}

async fn same_as_qemu(qemu_opts: &str, size: &str, opts: CreateOptions) {
    same_as_qemu_in(&Dir::new(), qemu_opts, size, opts).await;
}

async fn same_as_qemu_in(dir: &Dir, qemu_opts: &str, size: &str, opts: CreateOptions) {
    let theirs = dir.s("theirs.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !qemu_opts.is_empty() {
        args.extend(["-o", qemu_opts]);
    }
    args.extend([theirs.as_str(), size]);
    qemu_img(&args);
    let ours = dir.s("ours.qcow2");
    let file: Arc<dyn Storage> = Arc::new(FileStorage::create(&ours).unwrap());
    let data: Option<Arc<dyn Storage>> = opts
        .data_file
        .as_ref()
        .map(|_| Arc::new(FileStorage::create(dir.path("ours.data")).unwrap()) as Arc<dyn Storage>);
    qcow2::create(file, data, &opts).await.unwrap();
    assert_same_info_and_clean(&ours, &theirs);
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_same(&a, &b);
}

/// `qemu-img info` agrees and `qemu-img check` finds nothing in ours.
fn assert_same_info_and_clean(ours: &str, theirs: &str) {
    assert_eq!(info(ours), info(theirs));
    let check = run("qemu-img", &["check", ours]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

fn mib(n: u64) -> u64 {
    n << 20
}

#[tokio::test]
async fn create_default_v3_matches_qemu_img() {
    same_as_qemu("", "1G", CreateOptions::new(1 << 30)).await;
}

#[tokio::test]
async fn create_v2_matches_qemu_img() {
    let opts = CreateOptions {
        version: 2,
        ..CreateOptions::new(mib(100))
    };
    same_as_qemu("compat=0.10", "100M", opts).await;
}

#[tokio::test]
async fn create_512_byte_clusters_matches_qemu_img() {
    let opts = CreateOptions {
        cluster_size: 512,
        ..CreateOptions::new(mib(64))
    };
    same_as_qemu("cluster_size=512", "64M", opts).await;
}

/// The L1 table needs refcount blocks of its own here, and its 512 clusters span several
/// blocks' ranges (this used to allocate without end). QEMU puts the table first and the
/// new blocks after it, blockd the blocks first: the images have the same size, info and a
/// clean check, but not the same bytes.
#[tokio::test]
async fn create_512_byte_clusters_on_1_gib_agrees_with_qemu_img() {
    let dir = Dir::new();
    let theirs = dir.s("theirs.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        &theirs,
        "1G",
    ]);
    let ours = dir.s("ours.qcow2");
    let file: Arc<dyn Storage> = Arc::new(FileStorage::create(&ours).unwrap());
    let opts = CreateOptions {
        cluster_size: 512,
        ..CreateOptions::new(1 << 30)
    };
    qcow2::create(file, None, &opts).await.unwrap();
    assert_same_info_and_clean(&ours, &theirs);
    let len = |p: &str| std::fs::metadata(p).unwrap().len();
    assert_eq!(len(&ours), len(&theirs));
}

#[tokio::test]
async fn create_2m_clusters_matches_qemu_img() {
    let opts = CreateOptions {
        cluster_size: 2 << 20,
        ..CreateOptions::new(mib(64))
    };
    same_as_qemu("cluster_size=2M", "64M", opts).await;
}

#[tokio::test]
async fn create_1_bit_refcounts_matches_qemu_img() {
    let opts = CreateOptions {
        refcount_bits: 1,
        ..CreateOptions::new(mib(64))
    };
    same_as_qemu("refcount_bits=1", "64M", opts).await;
}

#[tokio::test]
async fn create_64_bit_refcounts_matches_qemu_img() {
    let opts = CreateOptions {
        refcount_bits: 64,
        ..CreateOptions::new(mib(64))
    };
    same_as_qemu("refcount_bits=64", "64M", opts).await;
}

#[tokio::test]
async fn create_extended_l2_zstd_lazy_matches_qemu_img() {
    let opts = CreateOptions {
        extended_l2: true,
        compression_type: CompressionType::Zstd,
        lazy_refcounts: true,
        ..CreateOptions::new(3 << 30)
    };
    same_as_qemu(
        "extended_l2=on,compression_type=zstd,lazy_refcounts=on",
        "3G",
        opts,
    )
    .await;
}

#[tokio::test]
async fn create_with_backing_file_matches_qemu_img() {
    let dir = Dir::new();
    qemu_img(&["create", "-q", "-f", "raw", &dir.s("base.raw"), "8M"]);
    let base = dir.s("base.raw");
    let opts = CreateOptions {
        backing_file: Some(base.clone()),
        backing_fmt: Some("raw".into()),
        ..CreateOptions::new(mib(8))
    };
    same_as_qemu_in(
        &dir,
        &format!("backing_file={base},backing_fmt=raw"),
        "8M",
        opts,
    )
    .await;
}

#[tokio::test]
async fn create_with_raw_data_file_matches_qemu_img() {
    let dir = Dir::new();
    let name = dir.s("theirs.data");
    let opts = CreateOptions {
        data_file: Some(name.clone()),
        data_file_raw: true,
        ..CreateOptions::new(mib(16))
    };
    same_as_qemu_in(
        &dir,
        &format!("data_file={name},data_file_raw=on"),
        "16M",
        opts,
    )
    .await;
}

#[tokio::test]
async fn create_metadata_preallocation_matches_qemu_img() {
    let opts = CreateOptions {
        preallocation: Preallocation::Metadata,
        ..CreateOptions::new(mib(3))
    };
    same_as_qemu("preallocation=metadata", "3M", opts).await;
}

#[tokio::test]
async fn create_empty_image_matches_qemu_img() {
    same_as_qemu("", "0", CreateOptions::new(0)).await;
}

#[tokio::test]
async fn create_refuses_refcount_bits_on_v2() {
    let opts = CreateOptions {
        version: 2,
        refcount_bits: 1,
        ..CreateOptions::new(mib(1))
    };
    let err = qcow2::create(Arc::new(qcow2::MemStorage::new()), None, &opts)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("compatibility level 1.1"));
}
