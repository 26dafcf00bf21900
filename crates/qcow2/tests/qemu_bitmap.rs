//! Persistent dirty bitmaps against QEMU: bitmaps qemu-img and qemu-io made load with the bits
//! qemu-storage-daemon sees (`x-debug-block-dirty-bitmap-sha256`), and bitmaps this library
//! stores are listed by `qemu-img info`, pass `qemu-img check` and hash the same in QSD.

mod common;

use std::path::Path;

use common::*;
use qcow2::{DirtyBitmap, Granularity, Image, LoadedBitmap, StoreBitmap};
use serde_json::{json, Value};
use testkit::daemon::{start_qsd, Session};

/// A 64 MiB image with bitmaps `b0` (64 KiB, enabled), `b1` (512 bytes, enabled) and `b2`
/// (64 KiB, disabled) that qemu-io's writes at 0 (4 KiB) and 1 MiB (100 KiB) populated.
fn qemu_image(dir: &Dir) -> String {
    let img = dir.s("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "64M"]);
    qemu_img(&["bitmap", "--add", &img, "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512", &img, "b1"]);
    qemu_img(&["bitmap", "--add", "--disable", &img, "b2"]);
    qemu_io("qcow2", Path::new(&img), &["write 0 4k", "write 1M 100k"]);
    img
}

/// What qemu-storage-daemon reports for bitmap `name` of the image opened read-only: its
/// sha256 and its `query-named-block-nodes` entry.
fn qsd_view(img: &str, names: &[&str]) -> Vec<(String, Value)> {
    let file = format!("driver=file,filename={img},node-name=f0,read-only=on");
    let fmt = "driver=qcow2,file=f0,node-name=q0,read-only=on";
    let args = ["--blockdev", file.as_str(), "--blockdev", fmt];
    let (_daemon, mut qmp) = start_qsd(None, &args, Session::Negotiated).unwrap();
    let nodes = qmp.execute("query-named-block-nodes", json!({})).unwrap();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q0")
        .unwrap()
        .clone();
    names
        .iter()
        .map(|name| {
            let args = json!({"node": "q0", "name": name});
            let r = qmp
                .execute("x-debug-block-dirty-bitmap-sha256", args)
                .unwrap();
            let info = node["dirty-bitmaps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == *name)
                .unwrap()
                .clone();
            (r["sha256"].as_str().unwrap().to_string(), info)
        })
        .collect()
}

/// `qemu-img info`'s bitmap list: (name, granularity, flags).
fn qemu_img_bitmaps(img: &str) -> Vec<(String, u64, Vec<String>)> {
    let out = qemu_img(&["info", "-U", "--output=json", img]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let flags = b["flags"].as_array().unwrap();
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                flags
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// `qemu-img check` finds nothing at all (exit status 0).
fn assert_qemu_check_clean(img: &str) {
    let out = run("qemu-img", &["check", img]);
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn by_name<'a>(loaded: &'a [LoadedBitmap], name: &str) -> &'a LoadedBitmap {
    loaded.iter().find(|b| b.name == name).unwrap()
}

/// A blockd-made 64 MiB image holding bitmap `a` (64 KiB, enabled, two dirty ranges) and `b`
/// (512 bytes, disabled, the last byte of the disk dirty), stored and closed.
async fn blockd_image(dir: &Dir) -> (String, DirtyBitmap, DirtyBitmap) {
    let img = dir.s("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "64M"]);
    let image = open(Path::new(&img), false).await;
    image.write(3 << 20, &[7; 8192], None).await.unwrap();
    let mut a = DirtyBitmap::new(64 << 20, Granularity::new(65536).unwrap());
    a.set(100, 1);
    a.set(40 << 20, 3 << 20);
    let mut b = DirtyBitmap::new(64 << 20, Granularity::new(512).unwrap());
    b.set((64 << 20) - 1, 1);
    let stores = [
        StoreBitmap {
            name: "a",
            enabled: true,
            bitmap: &a,
        },
        StoreBitmap {
            name: "b",
            enabled: false,
            bitmap: &b,
        },
    ];
    image.store_bitmaps(&stores).await.unwrap();
    image.close().await.unwrap();
    (img, a, b)
}

async fn take(img: &str, read_only: bool) -> (Image, Vec<LoadedBitmap>) {
    let image = open(Path::new(img), read_only).await;
    let loaded = image.take_bitmaps().await;
    (image, loaded)
}

#[tokio::test]
async fn bitmaps_qemu_io_populated_load_with_qsds_hashes() {
    let dir = Dir::new();
    let img = qemu_image(&dir);
    let (_image, loaded) = take(&img, true).await;
    let theirs: Vec<String> = qsd_view(&img, &["b0", "b1", "b2"])
        .into_iter()
        .map(|(h, _)| h)
        .collect();
    let ours: Vec<String> = ["b0", "b1", "b2"]
        .iter()
        .map(|n| by_name(&loaded, n).bitmap.sha256())
        .collect();
    assert_eq!(ours, theirs);
}

#[tokio::test]
async fn bitmap_qemu_io_populated_has_the_written_chunks() {
    let dir = Dir::new();
    let img = qemu_image(&dir);
    let (_image, loaded) = take(&img, true).await;
    let b0 = &by_name(&loaded, "b0").bitmap;
    let extents: Vec<_> = b0.dirty_extents(0, u64::MAX).collect();
    assert_eq!(extents, vec![0..65536, (1 << 20)..(1 << 20) + 2 * 65536]);
}

#[tokio::test]
async fn disabled_qemu_bitmap_loads_disabled_and_clean() {
    let dir = Dir::new();
    let img = qemu_image(&dir);
    let (_image, loaded) = take(&img, true).await;
    let b2 = by_name(&loaded, "b2");
    assert_eq!(
        (b2.enabled, b2.inconsistent, b2.bitmap.count()),
        (false, false, 0)
    );
}

#[tokio::test]
async fn qemu_merged_bitmap_loads_with_qsds_hash() {
    let dir = Dir::new();
    let img = qemu_image(&dir);
    qemu_img(&["bitmap", "--merge", "b1", &img, "b2"]);
    let (_image, loaded) = take(&img, true).await;
    let (theirs, _) = qsd_view(&img, &["b2"]).remove(0);
    assert_eq!(by_name(&loaded, "b2").bitmap.sha256(), theirs);
}

#[tokio::test]
async fn stored_bitmaps_are_listed_by_qemu_img_info() {
    let dir = Dir::new();
    let (img, _, _) = blockd_image(&dir).await;
    assert_eq!(
        qemu_img_bitmaps(&img),
        vec![
            ("a".to_string(), 65536, vec!["auto".to_string()]),
            ("b".to_string(), 512, vec![]),
        ]
    );
}

#[tokio::test]
async fn stored_bitmaps_pass_qemu_img_check() {
    let dir = Dir::new();
    let (img, _, _) = blockd_image(&dir).await;
    assert_qemu_check_clean(&img);
}

#[tokio::test]
async fn stored_bitmaps_hash_the_same_in_qsd() {
    let dir = Dir::new();
    let (img, a, b) = blockd_image(&dir).await;
    let view = qsd_view(&img, &["a", "b"]);
    let theirs: Vec<(String, u64, bool)> = view
        .iter()
        .map(|(h, i)| {
            (
                h.clone(),
                i["count"].as_u64().unwrap(),
                i["recording"] == true,
            )
        })
        .collect();
    assert_eq!(
        theirs,
        vec![
            (a.sha256(), a.count(), true),
            (b.sha256(), b.count(), false)
        ]
    );
}

#[tokio::test]
async fn read_write_open_marks_bitmaps_in_use_before_returning() {
    let dir = Dir::new();
    let img = qemu_image(&dir);
    let _image = open(Path::new(&img), false).await;
    let flags: Vec<Vec<String>> = qemu_img_bitmaps(&img).into_iter().map(|b| b.2).collect();
    assert_eq!(
        flags,
        vec![
            vec!["in-use".to_string(), "auto".to_string()],
            vec!["in-use".to_string(), "auto".to_string()],
            vec!["in-use".to_string()],
        ]
    );
}

#[tokio::test]
async fn bitmaps_not_stored_before_close_are_inconsistent_in_qsd() {
    let dir = Dir::new();
    let img = qemu_image(&dir);
    open(Path::new(&img), false).await.close().await.unwrap();
    let view = qsd_view(&img, &["b0"]);
    assert_eq!(view[0].1["inconsistent"], true);
}

#[tokio::test]
async fn bitmaps_left_in_use_load_inconsistent() {
    let dir = Dir::new();
    let img = qemu_image(&dir);
    open(Path::new(&img), false).await.close().await.unwrap();
    let (image, loaded) = take(&img, true).await;
    let flags: Vec<(bool, bool)> = image
        .bitmaps()
        .await
        .iter()
        .map(|b| (b.in_use, b.inconsistent))
        .collect();
    assert_eq!(flags, vec![(true, true); 3]);
    assert!(loaded.iter().all(|b| b.inconsistent && b.bitmap.is_empty()));
}

#[tokio::test]
async fn write_after_a_store_marks_bitmaps_in_use_again() {
    let dir = Dir::new();
    let (img, _, _) = blockd_image(&dir).await;
    let image = open(Path::new(&img), false).await;
    let loaded = image.take_bitmaps().await;
    let stores: Vec<StoreBitmap> = loaded.iter().map(LoadedBitmap::as_store).collect();
    image.store_bitmaps(&stores).await.unwrap();
    image.write(0, &[1; 512], None).await.unwrap();
    let in_use: Vec<bool> = qemu_img_bitmaps(&img)
        .iter()
        .map(|b| b.2.contains(&"in-use".to_string()))
        .collect();
    assert_eq!(in_use, vec![true, true]);
}

#[tokio::test]
async fn qemu_bitmaps_changed_and_stored_hash_the_same_in_qsd() {
    let dir = Dir::new();
    let img = qemu_image(&dir);
    let image = open(Path::new(&img), false).await;
    let mut loaded = image.take_bitmaps().await;
    for b in &mut loaded {
        b.bitmap.set(30 << 20, 5000);
    }
    let stores: Vec<StoreBitmap> = loaded.iter().map(LoadedBitmap::as_store).collect();
    image.store_bitmaps(&stores).await.unwrap();
    image.close().await.unwrap();
    let theirs: Vec<String> = qsd_view(&img, &["b0", "b1", "b2"])
        .into_iter()
        .map(|(h, _)| h)
        .collect();
    let ours: Vec<String> = loaded.iter().map(|b| b.bitmap.sha256()).collect();
    assert_eq!(ours, theirs);
}

#[tokio::test]
async fn replacing_stored_bitmaps_frees_the_old_clusters() {
    let dir = Dir::new();
    let img = qemu_image(&dir);
    let image = open(Path::new(&img), false).await;
    let loaded = image.take_bitmaps().await;
    for _ in 0..3 {
        let stores: Vec<StoreBitmap> = loaded.iter().map(LoadedBitmap::as_store).collect();
        image.store_bitmaps(&stores).await.unwrap();
    }
    image.close().await.unwrap();
    assert_qemu_check_clean(&img);
}

#[tokio::test]
async fn removed_bitmap_is_gone_for_qemu_img() {
    let dir = Dir::new();
    let (img, _, _) = blockd_image(&dir).await;
    let image = open(Path::new(&img), false).await;
    assert!(image.remove_bitmap("a").await.unwrap());
    image.close().await.unwrap();
    let names: Vec<String> = qemu_img_bitmaps(&img).into_iter().map(|b| b.0).collect();
    assert_eq!(names, vec!["b".to_string()]);
    assert_qemu_check_clean(&img);
}

#[tokio::test]
async fn removing_the_last_bitmap_drops_the_extension() {
    let dir = Dir::new();
    let (img, _, _) = blockd_image(&dir).await;
    let image = open(Path::new(&img), false).await;
    image.remove_bitmap("a").await.unwrap();
    image.remove_bitmap("b").await.unwrap();
    image.close().await.unwrap();
    assert_eq!(qemu_img_bitmaps(&img), vec![]);
    assert_qemu_check_clean(&img);
}
