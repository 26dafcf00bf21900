//! Graph behaviour and error texts, pinned to what qemu-storage-daemon 10.0.2 answered
//! to the same blockdev-add / blockdev-del / block_resize sequence.

use block::{BlockGraph, BlockdevOptions, DumpNodeType, ErrorKind, Perm};
use serde_json::json;

fn opts(value: serde_json::Value) -> BlockdevOptions {
    serde_json::from_value(value).unwrap()
}

struct Env {
    _dir: tempfile::TempDir,
    img: String,
    graph: BlockGraph,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    Env {
        img: path.to_str().unwrap().to_string(),
        _dir: dir,
        graph: BlockGraph::new(),
    }
}

async fn add(env: &mut Env, value: serde_json::Value) -> Result<(), block::Error> {
    env.graph.add(opts(value)).await.map(|_| ())
}

async fn err(env: &mut Env, value: serde_json::Value) -> String {
    add(env, value).await.unwrap_err().to_string()
}

#[tokio::test]
async fn blockdev_add_errors_match_qsd() {
    let mut e = env();
    let img = e.img.clone();
    assert_eq!(
        err(&mut e, json!({"driver": "file", "filename": img})).await,
        "'node-name' must be specified for the root node"
    );
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "file", "node-name": "x", "filename": "nope.img"})
        )
        .await,
        "Could not open 'nope.img': No such file or directory"
    );
    add(
        &mut e,
        json!({"driver": "file", "node-name": "f0", "filename": img}),
    )
    .await
    .unwrap();
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "file", "node-name": "f0", "filename": img})
        )
        .await,
        "Duplicate nodes with node-name='f0'"
    );
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "file", "node-name": "1bad", "filename": img})
        )
        .await,
        "Invalid node-name: '1bad'"
    );
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "file", "node-name": "a".repeat(32), "filename": img})
        )
        .await,
        "Node name too long"
    );
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "file", "node-name": "fs", "filename": img, "force-share": true})
        )
        .await,
        "force-share=on can only be used with read-only images"
    );
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "file", "node-name": "fs", "filename": img, "detect-zeroes": "unmap"})
        )
        .await,
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
    );
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "file", "node-name": "fs", "filename": img, "aio": "native"})
        )
        .await,
        "aio=native was specified, but it requires cache.direct=on, which was not specified."
    );
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "raw", "node-name": "r1", "file": "f0", "offset": 2097152})
        )
        .await,
        "Offset (2097152) cannot be greater than size of the containing file (1048576)"
    );
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "raw", "node-name": "r1", "file": "f0", "size": 1000})
        )
        .await,
        "Specified size is not multiple of 512"
    );
    assert_eq!(err(&mut e, json!({"driver": "raw", "node-name": "r1", "file": "f0", "offset": 524288, "size": 1048576})).await,
        "The sum of offset (524288) and size (1048576) has to be smaller or equal to the  actual size of the containing file (1048576)");
    assert_eq!(
        err(
            &mut e,
            json!({"driver": "raw", "node-name": "r4", "file": "nosuch"})
        )
        .await,
        "Cannot find device='nosuch' nor node-name='nosuch'"
    );
}

#[tokio::test]
async fn blockdev_del_errors_match_qsd() {
    let mut e = env();
    let img = e.img.clone();
    add(
        &mut e,
        json!({"driver": "file", "node-name": "f0", "filename": img}),
    )
    .await
    .unwrap();
    add(
        &mut e,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    )
    .await
    .unwrap();
    add(
        &mut e,
        json!({"driver": "raw", "node-name": "r3", "file": {"driver": "file", "filename": img}}),
    )
    .await
    .unwrap();
    let implicit = e.graph.nodes()[1].name().to_string();
    assert!(implicit.starts_with("#block"));
    let del = e.graph.remove("f0").await.unwrap_err();
    assert_eq!(del.to_string(), "Block device f0 is in use");
    assert_eq!(del.kind(), ErrorKind::InUse);
    assert_eq!(
        e.graph.remove("zz").await.unwrap_err().to_string(),
        "Failed to find node with node-name='zz'"
    );
    assert_eq!(
        e.graph.remove(&implicit).await.unwrap_err().to_string(),
        format!("Node {implicit} is not owned by the monitor")
    );
    let user = e
        .graph
        .attach("r3", Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL, "")
        .unwrap();
    assert_eq!(
        e.graph.remove("r3").await.unwrap_err().to_string(),
        "Node r3 is in use"
    );
    drop(user);
    e.graph.remove("r3").await.unwrap();
    assert!(
        e.graph.get(&implicit).is_none(),
        "implicit child goes with its parent"
    );
    e.graph.remove("r0").await.unwrap();
    e.graph.remove("f0").await.unwrap();
    assert!(e.graph.nodes().is_empty());
}

#[tokio::test]
async fn debug_graph_matches_qsd_for_raw_over_file() {
    let mut e = env();
    let img = e.img.clone();
    add(
        &mut e,
        json!({"driver": "file", "node-name": "f0", "filename": img}),
    )
    .await
    .unwrap();
    add(
        &mut e,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    )
    .await
    .unwrap();
    add(&mut e, json!({"driver": "null-co", "node-name": "n0"}))
        .await
        .unwrap();
    let dump = e.graph.debug_graph();
    let names: Vec<_> = dump.nodes.iter().map(|n| (n.name.as_str(), n.id)).collect();
    assert_eq!(names, [("n0", 3), ("r0", 2), ("f0", 1)]);
    assert!(dump
        .nodes
        .iter()
        .all(|n| n.node_type == DumpNodeType::BlockDriver));
    assert_eq!(dump.edges.len(), 1);
    let edge = &dump.edges[0];
    assert_eq!(
        (edge.parent, edge.child, edge.name.as_str()),
        (2, 1, "file")
    );
    assert!(edge.perm.is_empty());
    assert_eq!(
        edge.shared_perm,
        ["resize", "write-unchanged", "write", "consistent-read"]
    );
}

#[tokio::test]
async fn debug_graph_shows_user_and_propagated_perms() {
    let mut e = env();
    let img = e.img.clone();
    add(
        &mut e,
        json!({"driver": "raw", "node-name": "r3", "file": {"driver": "file", "filename": img}}),
    )
    .await
    .unwrap();
    let _user = e
        .graph
        .attach(
            "r3",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED,
            "",
        )
        .unwrap();
    let dump = e.graph.debug_graph();
    let backend = dump.nodes.last().unwrap();
    assert_eq!(
        (backend.id, backend.node_type, backend.name.as_str()),
        (1, DumpNodeType::BlockBackend, "")
    );
    let root = dump.edges.last().unwrap();
    assert_eq!(
        (root.parent, root.child, root.name.as_str()),
        (1, 2, "root")
    );
    let file = &dump.edges[0];
    assert_eq!((file.parent, file.child), (2, 3));
    assert_eq!(file.perm, ["write", "consistent-read"]);
}

#[tokio::test]
async fn filenames_match_qsd() {
    let mut e = env();
    let img = e.img.clone();
    add(
        &mut e,
        json!({"driver": "file", "node-name": "f0", "filename": img}),
    )
    .await
    .unwrap();
    add(
        &mut e,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    )
    .await
    .unwrap();
    add(
        &mut e,
        json!({"driver": "raw", "node-name": "r1", "file": "f0", "offset": 4096, "size": 4096}),
    )
    .await
    .unwrap();
    add(&mut e, json!({"driver": "null-co", "node-name": "n0"}))
        .await
        .unwrap();
    add(
        &mut e,
        json!({"driver": "null-co", "node-name": "n1", "size": 4096}),
    )
    .await
    .unwrap();
    add(&mut e, json!({"driver": "null-co", "node-name": "n3", "size": 4096, "read-zeroes": false, "latency-ns": 5})).await.unwrap();
    let g = &e.graph;
    assert_eq!(g.get("r0").unwrap().filename(), img);
    assert_eq!(
        g.get("r1").unwrap().filename(),
        format!(
            r#"json:{{"offset": 4096, "driver": "raw", "size": 4096, "file": {{"driver": "file", "filename": "{img}"}}}}"#
        )
    );
    assert_eq!(g.get("n0").unwrap().filename(), "null-co://");
    assert_eq!(
        g.get("n1").unwrap().filename(),
        r#"json:{"driver": "null-co", "size": 4096}"#
    );
    assert_eq!(
        g.get("n3").unwrap().filename(),
        r#"json:{"read-zeroes": false, "driver": "null-co", "size": 4096}"#
    );
    let info = g.get("r1").unwrap().info();
    assert_eq!(
        (info.drv, info.image.format, info.image.virtual_size),
        ("raw", "raw", 4096)
    );
    assert_eq!(info.image.dirty_flag, Some(false));
    let info = g.get("n0").unwrap().info();
    assert_eq!(
        (
            info.image.virtual_size,
            info.image.actual_size,
            info.image.dirty_flag
        ),
        (1 << 30, Some(0), None)
    );
    let names: Vec<_> = g.nodes().iter().map(|n| n.name().to_string()).collect();
    assert_eq!(names, ["n3", "n1", "n0", "r1", "r0", "f0"]);
}

#[tokio::test]
async fn block_resize_errors_match_qsd() {
    let mut e = env();
    let img = e.img.clone();
    add(
        &mut e,
        json!({"driver": "file", "node-name": "ro", "filename": img, "read-only": true}),
    )
    .await
    .unwrap();
    add(
        &mut e,
        json!({"driver": "file", "node-name": "f0", "filename": img}),
    )
    .await
    .unwrap();
    add(
        &mut e,
        json!({"driver": "raw", "node-name": "rr", "file": "f0", "offset": 512, "size": 512}),
    )
    .await
    .unwrap();
    let g = &mut e.graph;
    assert_eq!(
        g.resize(None, Some("ro"), 4096)
            .await
            .unwrap_err()
            .to_string(),
        "Image is read-only"
    );
    assert_eq!(
        g.resize(None, Some("zz"), 4096)
            .await
            .unwrap_err()
            .to_string(),
        "Cannot find device='' nor node-name='zz'"
    );
    assert_eq!(
        g.resize(Some("zz"), None, 4096)
            .await
            .unwrap_err()
            .to_string(),
        "Cannot find device='zz' nor node-name=''"
    );
    assert_eq!(
        g.resize(None, Some("f0"), -1)
            .await
            .unwrap_err()
            .to_string(),
        "Parameter 'size' expects a >0 size"
    );
    assert_eq!(
        g.resize(None, Some("rr"), 1024)
            .await
            .unwrap_err()
            .to_string(),
        "Cannot resize fixed-size raw disks"
    );
    assert_eq!(g.resize(None, Some("f0"), 1023).await.unwrap_err().to_string(),
        "Permission conflict on node 'f0': permissions 'resize' are both required by an unnamed block device (uses node 'f0' as 'root' child) and unshared by node 'rr' (uses node 'f0' as 'file' child).");
    g.remove("rr").await.unwrap();
    g.resize(None, Some("f0"), 2 << 20).await.unwrap();
    assert_eq!(g.get("f0").unwrap().size(), 2 << 20);
}

#[tokio::test]
async fn read_only_node_refuses_writers() {
    let mut e = env();
    let img = e.img.clone();
    add(
        &mut e,
        json!({"driver": "file", "node-name": "ro", "filename": img, "read-only": true}),
    )
    .await
    .unwrap();
    add(
        &mut e,
        json!({"driver": "raw", "node-name": "rw", "file": "ro"}),
    )
    .await
    .unwrap();
    let err = e
        .graph
        .attach("rw", Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL, "")
        .unwrap_err();
    assert_eq!(err.to_string(), "Block node is read-only");
    let node = e.graph.get("ro").unwrap();
    let write = node
        .write(0, &[1; 512], Default::default())
        .await
        .unwrap_err();
    assert_eq!(write.kind(), ErrorKind::ReadOnly);
}

#[tokio::test]
async fn detect_zeroes_unmap_punches_holes() {
    let mut e = env();
    let img = e.img.clone();
    add(
        &mut e,
        json!({"driver": "file", "node-name": "f0", "filename": img,
        "discard": "unmap", "detect-zeroes": "unmap"}),
    )
    .await
    .unwrap();
    let node = e.graph.get("f0").unwrap();
    node.write(0, &[3; 65536], Default::default())
        .await
        .unwrap();
    assert!(node.block_status(0, 65536).await.unwrap().data);
    node.write(0, &[0; 65536], Default::default())
        .await
        .unwrap();
    let extent = node.block_status(0, 65536).await.unwrap();
    assert!(!extent.data && extent.zero);
}
