//! Crash points of snapshot creation, deletion and revert: every image a crash can leave (each
//! prefix of the writes, and each write alone on top of the last flush) passes `qemu-img
//! check` without corruption, lists the snapshot entirely or not at all, and holds the same
//! guest data in the active layer and in every snapshot it lists.

use std::collections::HashSet;
use std::path::Path;

use testkit::tools::{
    assert_no_corruption, create_qcow2, path, qcow2_to_raw as raw_of, snapshot_names, tool,
};

use crate::crash::crashes_of;
use crate::NewSnapshot;

/// 512-byte clusters: 64 entries per L2 table and 256 per refcount block, so a 256 KiB
/// disk spans 8 L2 tables and several refcount blocks.
const SIZE: &str = "256K";

/// An image made by QEMU in `dir`: written, snapshot "old" (sharing its tables, as QEMU
/// shares them), then its first 64 KiB overwritten. Returns its bytes; `active.raw` and
/// `old.raw` hold the guest data of the active layer and of "old".
fn qemu_image(dir: &Path) -> Vec<u8> {
    let img = path(dir, "base.qcow2");
    create_qcow2(&img, "cluster_size=512", SIZE);
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 256k", &img],
    );
    tool("qemu-img", &["snapshot", "-c", "old", &img]);
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 0 64k", &img],
    );
    raw_of(&img, None, &path(dir, "active.raw"));
    raw_of(&img, Some("old"), &path(dir, "old.raw"));
    std::fs::read(&img).unwrap()
}

/// Check one crash state: no corruption, only snapshots from `may` (those in `must` always),
/// and the data of the active layer and of each listed snapshot as expected. `expected`
/// names the raw file each snapshot must match. Returns the snapshots listed.
fn check_state(dir: &Path, state: &[u8], must: &[&str], expected: &[(&str, &str)]) -> Vec<String> {
    let img = path(dir, "state.qcow2");
    std::fs::write(&img, state).unwrap();
    assert_no_corruption(&img);
    let names = snapshot_names(&img);
    for m in must {
        assert!(names.iter().any(|n| n == m), "{m} missing: {names:?}");
    }
    let active = path(dir, "active.raw");
    tool(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", &img, &active],
    );
    for name in &names {
        let want = expected
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("unexpected snapshot {name}"));
        let got = path(dir, "snapshot.raw");
        raw_of(&img, Some(name), &got);
        let want = path(dir, want.1);
        tool(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &got, &want],
        );
    }
    names
}

/// The distinct states, the last (everything written) included.
fn distinct(states: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut seen = HashSet::new();
    states
        .into_iter()
        .filter(|s| seen.insert(s.clone()))
        .collect()
}

#[tokio::test]
async fn crash_during_create_leaves_the_snapshot_whole_or_absent_and_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_image(dir.path());
    let states = crashes_of(&base, |image| async move {
        image
            .create_snapshot(&NewSnapshot::new("new"))
            .await
            .unwrap();
        image.close().await.unwrap();
    })
    .await;
    let expected = [("old", "old.raw"), ("new", "active.raw")];
    let mut seen_new = HashSet::new();
    let last = states.last().cloned().unwrap();
    for state in distinct(states) {
        let names = check_state(dir.path(), &state, &["old"], &expected);
        seen_new.insert(names.iter().any(|n| n == "new"));
    }
    let names = check_state(dir.path(), &last, &["old", "new"], &expected);
    assert_eq!((names.len(), seen_new.len()), (2, 2), "{names:?}");
}

#[tokio::test]
async fn crash_during_delete_leaves_the_snapshot_whole_or_absent_and_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_image(dir.path());
    let states = crashes_of(&base, |image| async move {
        image.delete_snapshot(None, Some("old")).await.unwrap();
        image.close().await.unwrap();
    })
    .await;
    let expected = [("old", "old.raw")];
    let mut seen_old = HashSet::new();
    let last = states.last().cloned().unwrap();
    for state in distinct(states) {
        let names = check_state(dir.path(), &state, &[], &expected);
        seen_old.insert(names.iter().any(|n| n == "old"));
    }
    assert!(check_state(dir.path(), &last, &[], &expected).is_empty());
    assert_eq!(seen_old.len(), 2);
}

#[tokio::test]
async fn crash_during_delete_of_its_own_snapshot_leaves_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_image(dir.path());
    let taken = crashes_of(&base, |image| async move {
        image
            .create_snapshot(&NewSnapshot::new("new"))
            .await
            .unwrap();
        image.write(0, &[0x33; 4096], None).await.unwrap();
        image.close().await.unwrap();
    })
    .await;
    let with_new = taken.last().cloned().unwrap();
    let img = path(dir.path(), "with_new.qcow2");
    std::fs::write(&img, &with_new).unwrap();
    raw_of(&img, None, &path(dir.path(), "active.raw"));
    raw_of(&img, Some("new"), &path(dir.path(), "new.raw"));
    let states = crashes_of(&with_new, |image| async move {
        image.delete_snapshot(None, Some("new")).await.unwrap();
        image.close().await.unwrap();
    })
    .await;
    let expected = [("old", "old.raw"), ("new", "new.raw")];
    for state in distinct(states) {
        check_state(dir.path(), &state, &["old"], &expected);
    }
}

/// Whether the active layer of the image `img` holds the guest data of the raw file `raw`
/// (the same virtual size included).
fn active_is(img: &str, raw: &str) -> bool {
    let info = tool("qemu-img", &["info", "--output=json", "-f", "qcow2", img]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let size = std::fs::metadata(raw).unwrap().len();
    info["virtual-size"].as_u64() == Some(size) && same_data(img, "qcow2", raw)
}

/// Whether `left` (in `format`) and the raw file `right` hold the same data.
fn same_data(left: &str, format: &str, right: &str) -> bool {
    std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", format, "-F", "raw", left, right])
        .status()
        .expect("qemu-img is needed (install qemu-utils)")
        .success()
}

/// Every crash state of reverting the image `base` to "old": no corruption, "old" still
/// listed with its data, the active layer either as before or as "old" (both seen), and
/// "old" in the end.
async fn check_revert_crashes(dir: &Path, base: Vec<u8>, before: &str) {
    let states = crashes_of(&base, |image| async move {
        image.revert_snapshot("old").await.unwrap();
        image.close().await.unwrap();
    })
    .await;
    let last = states.last().cloned().unwrap();
    let (old, img) = (path(dir, "old.raw"), path(dir, "state.qcow2"));
    let mut seen = HashSet::new();
    for state in distinct(states) {
        std::fs::write(&img, &state).unwrap();
        assert_no_corruption(&img);
        assert_eq!(snapshot_names(&img), ["old"]);
        let got = path(dir, "snapshot.raw");
        raw_of(&img, Some("old"), &got);
        assert!(same_data(&got, "raw", &old), "the snapshot changed");
        let reverted = active_is(&img, &old);
        assert!(reverted || active_is(&img, before), "a mixed active layer");
        seen.insert(reverted);
    }
    std::fs::write(&img, &last).unwrap();
    assert!(active_is(&img, &old), "not reverted in the end");
    assert_eq!(seen.len(), 2);
}

#[tokio::test]
async fn crash_during_revert_leaves_the_image_before_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_image(dir.path());
    let before = path(dir.path(), "active.raw");
    check_revert_crashes(dir.path(), base, &before).await;
}

#[tokio::test]
async fn crash_during_revert_to_another_size_leaves_the_image_before_or_after() {
    let dir = tempfile::tempdir().unwrap();
    qemu_image(dir.path());
    let img = path(dir.path(), "base.qcow2");
    tool("qemu-img", &["resize", "-q", &img, "384K"]);
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 256k 128k", &img],
    );
    let before = path(dir.path(), "grown.raw");
    raw_of(&img, None, &before);
    check_revert_crashes(dir.path(), std::fs::read(&img).unwrap(), &before).await;
}
