//! Internal snapshots against QEMU: snapshots this library takes are listed by
//! `qemu-img snapshot -l` and `qemu-img info`, applied by `qemu-img snapshot -a`; snapshots
//! `qemu-img snapshot -c` took are listed, reverted to and deleted here; `qemu-img check`
//! finds nothing after every step.

mod common;

use std::path::Path;

use common::*;
use qcow2::{Error, Image, NewSnapshot};
use serde_json::Value;

/// `qemu-img check` finds no leak and no corruption.
fn assert_clean(img: &str) {
    let out = run("qemu-img", &["check", img]);
    assert!(
        out.status.success(),
        "qemu-img check {img}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info`'s snapshot list.
fn qemu_snapshots(img: &str) -> Vec<Value> {
    let out = qemu_img(&["info", "--output=json", img]);
    let info: Value = serde_json::from_str(&out).unwrap();
    info["snapshots"].as_array().cloned().unwrap_or_default()
}

/// The guest contents after `qemu-img snapshot -a tag` on a copy of `img`.
fn applied_by_qemu(dir: &Dir, img: &str, tag: &str) -> Vec<u8> {
    let copy = dir.s(&format!("applied-{tag}.qcow2"));
    std::fs::copy(img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", tag, &copy]);
    assert_clean(&copy);
    qemu_raw(Path::new(&copy), dir.tmp.path())
}

/// A 4 MiB image with 512-byte clusters (many L2 tables, a table that grows past a cluster).
fn small_image(dir: &Dir) -> String {
    let img = dir.s("s.qcow2");
    create_qcow2(&img, "cluster_size=512", "4M");
    img
}

async fn write(image: &Image, off: u64, len: usize, byte: u8) {
    image.write(off, &vec![byte; len], None).await.unwrap();
}

#[tokio::test]
async fn qemu_img_lists_and_applies_snapshots_taken_here() {
    let dir = Dir::new();
    let img = small_image(&dir);
    let image = open(Path::new(&img), false).await;
    write(&image, 0, 100_000, 0x11).await;
    let before = read_all(&image, 1 << 20).await;
    let mut s1 = NewSnapshot::new("first");
    s1.vm_clock_nsec = 1_500_000_000;
    let vm_state = vec![0x5a; 3000];
    s1.vm_state = &vm_state;
    let info = image.create_snapshot(&s1).await.unwrap();
    write(&image, 50_000, 100_000, 0x22).await;
    image
        .create_snapshot(&NewSnapshot::new("second"))
        .await
        .unwrap();
    write(&image, 0, 10, 0x33).await;
    let now = read_all(&image, 1 << 20).await;
    image.close().await.unwrap();
    drop(image);

    assert_clean(&img);
    let listed = qemu_snapshots(&img);
    assert_eq!(info.id, "1");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["id"], "1");
    assert_eq!(listed[0]["name"], "first");
    assert_eq!(listed[0]["vm-state-size"], 3000);
    assert_eq!(listed[0]["vm-clock-sec"], 1);
    assert_eq!(listed[0]["vm-clock-nsec"], 500_000_000);
    assert_eq!(listed[0]["date-sec"], info.date_sec);
    assert_eq!(listed[1]["id"], "2");
    assert_eq!(listed[1]["name"], "second");
    assert!(listed[1].get("icount").is_none());
    assert_same(&qemu_raw(Path::new(&img), dir.tmp.path()), &now);
    assert_same(&applied_by_qemu(&dir, &img, "first"), &before);
}

#[tokio::test]
async fn snapshots_taken_by_qemu_img_are_listed_reverted_and_deleted() {
    let dir = Dir::new();
    let img = small_image(&dir);
    qemu_io("qcow2", Path::new(&img), &["write -P 0xaa 0 300k"]);
    qemu_img(&["snapshot", "-c", "a", &img]);
    let at_a = qemu_raw(Path::new(&img), dir.tmp.path());
    qemu_io("qcow2", Path::new(&img), &["write -P 0xbb 100k 300k"]);
    qemu_img(&["snapshot", "-c", "b", &img]);
    qemu_io("qcow2", Path::new(&img), &["write -P 0xcc 1M 64k"]);

    let image = open(Path::new(&img), false).await;
    let list = image.snapshots().await;
    assert_eq!(
        list.iter()
            .map(|s| (s.id.as_str(), s.name.as_str()))
            .collect::<Vec<_>>(),
        [("1", "a"), ("2", "b")]
    );
    assert_eq!(list[0].icount, Some(0));
    assert_eq!(list[0].disk_size, 4 << 20);
    image.revert_snapshot("a").await.unwrap();
    assert_same(&read_all(&image, 1 << 20).await, &at_a);
    write(&image, 0, 4096, 0xdd).await;
    image.close().await.unwrap();
    assert_clean(&img);
    image.delete_snapshot(None, Some("b")).await.unwrap();
    image.close().await.unwrap();
    assert_clean(&img);
    image.delete_snapshot(Some("1"), None).await.unwrap();
    image.close().await.unwrap();
    drop(image);

    assert_clean(&img);
    assert!(qemu_snapshots(&img).is_empty());
    let mut want = at_a;
    want[..4096].fill(0xdd);
    assert_same(&qemu_raw(Path::new(&img), dir.tmp.path()), &want);
}

#[tokio::test]
async fn vm_state_reads_back_and_survives_reopen() {
    let dir = Dir::new();
    let img = small_image(&dir);
    let image = open(Path::new(&img), false).await;
    write(&image, (4 << 20) - 512, 512, 0x44).await;
    let vm_state: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut new = NewSnapshot::new("with-vm");
    new.vm_state = &vm_state;
    image.create_snapshot(&new).await.unwrap();
    image.close().await.unwrap();
    drop(image);
    assert_clean(&img);

    let image = open(Path::new(&img), false).await;
    let mut back = vec![0u8; vm_state.len()];
    image.read_vm_state("with-vm", 0, &mut back).await.unwrap();
    assert_same(&back, &vm_state);
    image.revert_snapshot("1").await.unwrap();
    let mut tail = vec![0u8; 1000];
    image
        .read_vm_state("with-vm", vm_state.len() as u64 - 1000, &mut tail)
        .await
        .unwrap();
    assert_same(&tail, &vm_state[vm_state.len() - 1000..]);
    image.delete_snapshot(None, Some("with-vm")).await.unwrap();
    image.close().await.unwrap();
    drop(image);
    assert_clean(&img);
}

#[tokio::test]
async fn snapshot_table_grows_past_one_cluster_and_moves() {
    let dir = Dir::new();
    let img = small_image(&dir);
    let image = open(Path::new(&img), false).await;
    let names: Vec<String> = (0..40).map(|i| format!("snapshot-number-{i:03}")).collect();
    for (i, name) in names.iter().enumerate() {
        write(&image, i as u64 * 4096, 4096, i as u8).await;
        image
            .create_snapshot(&NewSnapshot::new(name))
            .await
            .unwrap();
    }
    image
        .delete_snapshot(Some("7"), Some(&names[6]))
        .await
        .unwrap();
    image.close().await.unwrap();
    drop(image);

    assert_clean(&img);
    let listed = qemu_snapshots(&img);
    assert_eq!(listed.len(), 39);
    assert_eq!(listed[6]["id"], "8");
    assert_eq!(listed[38]["name"], "snapshot-number-039");
}

#[tokio::test]
async fn revert_restores_the_disk_size_of_the_snapshot() {
    let dir = Dir::new();
    let img = small_image(&dir);
    qemu_io("qcow2", Path::new(&img), &["write -P 0x66 0 1M"]);
    qemu_img(&["snapshot", "-c", "small", &img]);
    qemu_img(&["resize", &img, "64M"]);
    qemu_io("qcow2", Path::new(&img), &["write -P 0x77 60M 1M"]);

    let image = open(Path::new(&img), false).await;
    image.revert_snapshot("small").await.unwrap();
    assert_eq!(image.size(), 4 << 20);
    image
        .create_snapshot(&NewSnapshot::new("again"))
        .await
        .unwrap();
    image.truncate(8 << 20).await.unwrap();
    image.revert_snapshot("again").await.unwrap();
    image.close().await.unwrap();
    drop(image);

    assert_clean(&img);
    let raw = qemu_raw(Path::new(&img), dir.tmp.path());
    let mut want = vec![0u8; 4 << 20];
    want[..1 << 20].fill(0x66);
    assert_same(&raw, &want);
}

#[tokio::test]
async fn errors_carry_qemu_wording() {
    let dir = Dir::new();
    let img = small_image(&dir);
    let image = open(Path::new(&img), false).await;
    image
        .create_snapshot(&NewSnapshot::new("s1"))
        .await
        .unwrap();

    let dup = image.create_snapshot(&NewSnapshot::new("s1")).await;
    let neither = image.delete_snapshot(None, None).await;
    let by_id = image.delete_snapshot(Some("9"), None).await;
    let both = image.delete_snapshot(Some("1"), Some("zz")).await;
    let goto = image.revert_snapshot("nope").await;

    // QSD appends " on device 'NAME'" to the first and the last two (see the daemon).
    let msg = |r: Result<qcow2::SnapshotInfo, Error>| r.unwrap_err().to_string();
    assert_eq!(msg(dup), "Snapshot with name 's1' already exists");
    assert_eq!(msg(neither), "Name or id must be provided");
    assert_eq!(
        msg(by_id),
        "Snapshot with id '9' and name 'null' does not exist"
    );
    assert_eq!(
        msg(both),
        "Snapshot with id '1' and name 'zz' does not exist"
    );
    assert!(matches!(goto, Err(Error::SnapshotNotFound { .. })));
}

#[tokio::test]
async fn snapshot_of_a_v2_image_with_compressed_clusters_checks_clean() {
    let dir = Dir::new();
    let img = dir.s("v2.qcow2");
    let raw = dir.s("src.raw");
    std::fs::write(&raw, vec![0x42u8; 1 << 20]).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10",
        &raw,
        &img,
    ]);
    let image = open(Path::new(&img), false).await;
    image.create_snapshot(&NewSnapshot::new("c")).await.unwrap();
    write(&image, 1000, 70_000, 0x43).await;
    image.close().await.unwrap();
    assert_clean(&img);
    image.revert_snapshot("c").await.unwrap();
    image.delete_snapshot(None, Some("c")).await.unwrap();
    image.close().await.unwrap();
    drop(image);

    assert_clean(&img);
    assert_same(
        &qemu_raw(Path::new(&img), dir.tmp.path()),
        &std::fs::read(&raw).unwrap(),
    );
}
