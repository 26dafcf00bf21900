//! Backing children attached after open, what `blockdev-snapshot` builds on: the edge at
//! the backing node and its permissions, reads falling through to the new backing node,
//! the overlay's filename, detaching again, overlays appended above a used node and
//! undone, and the refusals (no backing support, cycles, permission conflicts), each
//! leaving the graph as it was.

use std::path::Path;

use block::node::ParentKey;
use block::{
    BlockGraph, BlockdevOptions, Error, FileCreateOptions, Perm, Qcow2CreateOptions, WriteFlags,
};
use serde_json::{json, Value};

const SIZE: u64 = 1 << 20;

fn options(v: Value) -> BlockdevOptions {
    serde_json::from_value(v).expect("valid blockdev options")
}

/// A new empty qcow2 image `name` in `dir`, made through the driver.
async fn make_qcow2(dir: &Path, name: &str) -> String {
    let path = dir.join(name).to_string_lossy().into_owned();
    let file: FileCreateOptions =
        serde_json::from_value(json!({"filename": path, "size": 0})).unwrap();
    block::create_file(&file).await.unwrap();
    let mut graph = BlockGraph::new();
    let node = graph
        .add(options(
            json!({"driver": "file", "node-name": "f", "filename": path}),
        ))
        .await
        .unwrap();
    let create: Qcow2CreateOptions =
        serde_json::from_value(json!({"file": "f", "size": SIZE})).unwrap();
    block::create_qcow2(node, None, &create).await.unwrap();
    graph.close_all().await;
    path
}

/// A graph with qcow2 nodes `base` (0x11 over its first 64 KiB) and `top` (no backing
/// file), and a raw node `raw`.
async fn graph(dir: &Path) -> BlockGraph {
    let base = make_qcow2(dir, "base.qcow2").await;
    let top = make_qcow2(dir, "top.qcow2").await;
    let raw = make_qcow2(dir, "raw.img").await;
    let mut graph = BlockGraph::new();
    for (name, path, driver) in [
        ("base", &base, "qcow2"),
        ("top", &top, "qcow2"),
        ("raw", &raw, "raw"),
    ] {
        let mut opts = json!({"driver": driver, "node-name": name,
                              "file": {"driver": "file", "filename": path}});
        if driver == "qcow2" {
            opts["backing"] = Value::Null;
        }
        graph.add(options(opts)).await.unwrap();
    }
    let writer = graph.attach("base", Perm::ALL, Perm::ALL, "").unwrap();
    writer
        .write(0, &[0x11; 64 << 10], WriteFlags::default())
        .await
        .unwrap();
    graph
}

fn backing_edge(graph: &BlockGraph, below: &str, above: &str) -> Option<(Perm, Perm)> {
    let key = ParentKey::Node(above.to_string());
    graph
        .get(below)
        .unwrap()
        .parents()
        .into_iter()
        .find(|e| e.key == key && e.role == "backing")
        .map(|e| (e.perm, e.shared))
}

async fn read(graph: &BlockGraph, node: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xff; len];
    graph
        .get(node)
        .unwrap()
        .read(offset, &mut buf)
        .await
        .unwrap();
    buf
}

#[tokio::test]
async fn an_attached_backing_node_serves_what_the_overlay_does_not_hold() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = graph(dir.path()).await;
    assert_eq!(read(&g, "top", 0, 4096).await, vec![0; 4096]);
    g.attach_backing("top", Some("base")).await.unwrap();
    let top = g.get("top").unwrap();
    assert_eq!(
        top.backing().map(|b| b.name().to_string()).as_deref(),
        Some("base")
    );
    assert_eq!(
        top.children()[0].name,
        "backing",
        "the backing child comes first"
    );
    // Nobody reads the overlay yet: the edge takes nothing and shares everything.
    assert_eq!(
        backing_edge(&g, "base", "top"),
        Some((Perm::NONE, Perm::ALL))
    );
    assert_eq!(read(&g, "top", 0, 64 << 10).await, vec![0x11; 64 << 10]);
    assert_eq!(read(&g, "top", 64 << 10, 4096).await, vec![0; 4096]);
    // A user of the overlay that does not share writes: the base is read for it and no
    // one may write the base any more.
    let user = g
        .attach(
            "top",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            "",
        )
        .unwrap();
    assert_eq!(
        backing_edge(&g, "base", "top"),
        Some((
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
        ))
    );
    user.write(0, &[0x22; 4096], WriteFlags::default())
        .await
        .unwrap();
    let mut expected = vec![0x11; 64 << 10];
    expected[..4096].fill(0x22);
    assert_eq!(read(&g, "top", 0, 64 << 10).await, expected);
    assert_eq!(read(&g, "base", 0, 4096).await, vec![0x11; 4096]);
    let filename = top.filename();
    assert!(
        filename.starts_with("json:{\"backing\": {\"driver\": \"qcow2\""),
        "the header names no backing file, so the filename shows it: {filename}"
    );
    assert_eq!(
        top.info().backing_file,
        Some(g.get("base").unwrap().filename())
    );
    drop(user);
    g.close_all().await;
}

#[tokio::test]
async fn detaching_the_backing_node_restores_the_overlay_as_opened() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = graph(dir.path()).await;
    let plain = g.get("top").unwrap().filename();
    g.attach_backing("top", Some("base")).await.unwrap();
    g.attach_backing("top", None).await.unwrap();
    let top = g.get("top").unwrap();
    assert!(top.backing().is_none());
    assert_eq!(top.children().len(), 1);
    assert_eq!(backing_edge(&g, "base", "top"), None);
    assert_eq!(top.filename(), plain);
    assert_eq!(read(&g, "top", 0, 4096).await, vec![0; 4096]);
    g.close_all().await;
}

#[tokio::test]
async fn refusals_leave_the_graph_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = graph(dir.path()).await;
    let err = g.attach_backing("raw", Some("base")).await.unwrap_err();
    assert!(matches!(err, Error::BackingNotSupported), "{err}");
    assert_eq!(
        err.to_string(),
        "The overlay does not support backing images"
    );
    let err = g.attach_backing("top", Some("top")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Making 'top' a backing child of 'top' would create a cycle"
    );
    let err = g.attach_backing("top", Some("nope")).await.unwrap_err();
    assert!(matches!(err, Error::NodeNotFound(_)), "{err}");
    g.attach_backing("top", Some("base")).await.unwrap();
    let err = g.attach_backing("base", Some("top")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Making 'top' a backing child of 'base' would create a cycle"
    );
    assert!(g.get("base").unwrap().backing().is_none());
    g.attach_backing("top", None).await.unwrap();
    // A reader of the overlay needs consistent reads of the base, which a user of the
    // base does not share.
    let _reader = g
        .attach("top", Perm::CONSISTENT_READ, Perm::ALL, "")
        .unwrap();
    let _exclusive = g.attach("base", Perm::NONE, Perm::WRITE, "").unwrap();
    let err = g.attach_backing("top", Some("base")).await.unwrap_err();
    assert!(matches!(err, Error::PermissionConflict(_)), "{err}");
    assert!(g.get("top").unwrap().backing().is_none());
    assert_eq!(backing_edge(&g, "base", "top"), None);
    drop(_reader);
    drop(_exclusive);
    g.close_all().await;
}

#[tokio::test]
async fn an_appended_overlay_takes_the_users_and_undoing_it_gives_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = graph(dir.path()).await;
    let user = g
        .attach(
            "base",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED,
            "",
        )
        .unwrap();
    let appended = g.append_overlay("base", "top").await.unwrap();
    assert_eq!(user.node().name(), "top");
    assert_eq!(
        backing_edge(&g, "base", "top"),
        Some((Perm::CONSISTENT_READ, Perm::ALL))
    );
    user.write(0, &[0x33; 4096], WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(read(&g, "base", 0, 4096).await, vec![0x11; 4096]);
    g.undo_overlay(appended).await;
    assert_eq!(user.node().name(), "base");
    assert!(g.get("top").unwrap().backing().is_none());
    assert_eq!(backing_edge(&g, "base", "top"), None);
    // The raw node cannot take a backing node: the users stay where they were.
    let err = g.append_overlay("base", "raw").await.unwrap_err();
    assert!(matches!(err, Error::BackingNotSupported), "{err}");
    assert_eq!(user.node().name(), "base");
    drop(user);
    g.close_all().await;
}
