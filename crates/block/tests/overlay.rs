//! Backing children attached after open, what `blockdev-snapshot` builds on: the edge at
//! the backing node and its permissions, reads falling through to the new backing node,
//! the overlay's filename, detaching again, overlays appended above a used node and
//! undone (its users and the nodes opened on it moving onto the overlay and back), and the
//! refusals (no backing support, cycles, permission conflicts, a parent that cannot change
//! its child), each leaving the graph as it was.

use std::path::Path;

use block::node::{ParentEdge, ParentKey};
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

/// The parent edges of `node`, keyed by who holds them.
fn parent_keys(graph: &BlockGraph, node: &str) -> Vec<ParentKey> {
    let mut keys: Vec<ParentKey> = graph
        .get(node)
        .unwrap()
        .parents()
        .into_iter()
        .map(|e: ParentEdge| e.key)
        .collect();
    keys.sort_by_key(|k| format!("{k:?}"));
    keys
}

/// The node child `role` of node `parent` is on.
fn child_of(graph: &BlockGraph, parent: &str, role: &str) -> String {
    graph
        .get(parent)
        .unwrap()
        .children()
        .into_iter()
        .find(|c| c.name == role)
        .map(|c| c.node.name().to_string())
        .unwrap()
}

fn node_key(name: &str) -> ParentKey {
    ParentKey::Node(name.to_string())
}

/// `raw` node `r` and `blkdebug` node `d` opened on node `base`, and a user writing
/// through `r`.
async fn with_node_parents(g: &mut BlockGraph) -> block::Backend {
    g.add(options(
        json!({"driver": "raw", "node-name": "r", "file": "base"}),
    ))
    .await
    .unwrap();
    g.add(options(
        json!({"driver": "blkdebug", "node-name": "d", "image": "base"}),
    ))
    .await
    .unwrap();
    g.attach(
        "r",
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED,
        "",
    )
    .unwrap()
}

/// Checks that `r` and `d` are on `base` as they were, with the edges `before` there, and
/// that `top` has no backing child and the edges `top_before`.
fn assert_in_place(g: &BlockGraph, before: &[ParentKey], top_before: &[ParentKey]) {
    assert_eq!(child_of(g, "r", "file"), "base");
    assert_eq!(child_of(g, "d", "image"), "base");
    assert_eq!(parent_keys(g, "base"), before);
    assert_eq!(parent_keys(g, "top"), top_before);
    assert!(g.get("top").unwrap().backing().is_none());
}

#[tokio::test]
async fn node_parents_move_onto_the_overlay_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = graph(dir.path()).await;
    let writer = with_node_parents(&mut g).await;
    let before = parent_keys(&g, "base");
    let r_filename = g.get("r").unwrap().filename();
    g.check_replaceable("base").unwrap();
    let appended = g.append_overlay("base", "top").await.unwrap();
    assert_eq!(child_of(&g, "r", "file"), "top");
    assert_eq!(child_of(&g, "d", "image"), "top");
    assert_eq!(parent_keys(&g, "base"), vec![node_key("top")]);
    assert_eq!(
        parent_keys(&g, "top"),
        vec![node_key("d"), node_key("r")],
        "the parents' edges moved to the overlay"
    );
    // The raw node's edge kept its permissions, and the overlay passes them down.
    let edge = g
        .get("top")
        .unwrap()
        .parents()
        .into_iter()
        .find(|e| e.key == node_key("r"))
        .unwrap();
    assert!(edge.perm.contains(Perm::WRITE), "{edge:?}");
    let r = g.get("r").unwrap();
    assert!(
        r.filename().contains("top.qcow2") && r.filename().starts_with("json:"),
        "a raw node over a qcow2 node shows it in json: {}",
        r.filename()
    );
    // Writes through the parent land in the overlay; both parents read them there and the
    // base keeps what it held.
    writer
        .write(0, &[0x44; 4096], WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(read(&g, "d", 0, 4096).await, vec![0x44; 4096]);
    assert_eq!(read(&g, "top", 4096, 4096).await, vec![0x11; 4096]);
    assert_eq!(read(&g, "base", 0, 4096).await, vec![0x11; 4096]);

    g.undo_overlay(appended).await;
    assert_in_place(&g, &before, &[]);
    assert_eq!(g.get("r").unwrap().filename(), r_filename);
    assert_eq!(read(&g, "r", 0, 4096).await, vec![0x11; 4096]);
    writer
        .write(0, &[0x55; 4096], WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(read(&g, "base", 0, 4096).await, vec![0x55; 4096]);
    drop(writer);
    g.close_all().await;
}

#[tokio::test]
async fn a_qcow2_node_moves_onto_an_overlay_of_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = graph(dir.path()).await;
    let path = make_qcow2(dir.path(), "p.qcow2").await;
    g.add(options(
        json!({"driver": "file", "node-name": "pf", "filename": path}),
    ))
    .await
    .unwrap();
    g.add(options(
        json!({"driver": "qcow2", "node-name": "p", "file": "pf"}),
    ))
    .await
    .unwrap();
    let file_size = g.get("pf").unwrap().size();
    let mut image = vec![0; usize::try_from(file_size).unwrap()];
    g.get("pf").unwrap().read(0, &mut image).await.unwrap();
    let appended = g.append_overlay("pf", "top").await.unwrap();
    assert_eq!(child_of(&g, "p", "file"), "top");
    let writer = g.attach("p", Perm::ALL, Perm::ALL, "").unwrap();
    // The image's clusters are now allocated in the overlay: the file keeps the image as
    // it was, and the qcow2 node reads what it wrote.
    writer
        .write(128 << 10, &[0x66; 64 << 10], WriteFlags::default())
        .await
        .unwrap();
    writer.flush().await.unwrap();
    assert_eq!(
        read(&g, "p", 128 << 10, 64 << 10).await,
        vec![0x66; 64 << 10]
    );
    let mut now = vec![0; image.len()];
    g.get("pf").unwrap().read(0, &mut now).await.unwrap();
    assert!(now == image, "the file node was not written");
    assert!(g.get("p").unwrap().filename().starts_with("json:"));
    drop(writer);
    g.undo_overlay(appended).await;
    assert_eq!(child_of(&g, "p", "file"), "pf");
    g.close_all().await;
}

#[tokio::test]
async fn a_parent_that_cannot_change_its_child_is_refused_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = graph(dir.path()).await;
    g.add(options(
        json!({"driver": "null-co", "node-name": "tgt", "size": SIZE}),
    ))
    .await
    .unwrap();
    g.add(options(
        json!({"driver": "copy-before-write", "node-name": "cbw",
                          "file": "base", "target": "tgt"}),
    ))
    .await
    .unwrap();
    let writer = with_node_parents(&mut g).await;
    let before = parent_keys(&g, "base");
    let expected = "Cannot replace node 'base': it is the 'file' child of node 'cbw', \
                    and a copy-before-write node cannot change its children";
    let err = g.check_replaceable("base").unwrap_err();
    assert_eq!(err.to_string(), expected);
    let err = g.append_overlay("base", "top").await.unwrap_err();
    assert!(matches!(err, Error::ChildNotReplaceable { .. }), "{err}");
    assert_in_place(&g, &before, &[]);
    drop(writer);
    g.close_all().await;
}

#[tokio::test]
async fn a_conflict_on_the_overlay_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = graph(dir.path()).await;
    let writer = with_node_parents(&mut g).await;
    // A user of the overlay that reads nothing but lets nobody write.
    let blocker = g
        .attach(
            "top",
            Perm::NONE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::RESIZE,
            "",
        )
        .unwrap();
    let before = parent_keys(&g, "base");
    let top_before = parent_keys(&g, "top");
    let err = g.append_overlay("base", "top").await.unwrap_err();
    assert!(matches!(err, Error::PermissionConflict(_)), "{err}");
    assert_in_place(&g, &before, &top_before);
    assert_eq!(writer.node().name(), "r");
    writer
        .write(0, &[0x77; 4096], WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(read(&g, "base", 0, 4096).await, vec![0x77; 4096]);
    drop(blocker);
    drop(writer);
    g.close_all().await;
}
