//! One suite every driver runs through a graph node; only the constructor differs.

use serde_json::json;
use std::sync::Arc;

use crate::{BlockGraph, BlockdevOptions, Node, WriteFlags, ZeroFlags};

const SIZE: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    _graph: BlockGraph,
    node: Arc<Node>,
    stores_data: bool,
}

async fn open(make: fn(&str) -> serde_json::Value, stores_data: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let opts: BlockdevOptions = serde_json::from_value(make(path.to_str().unwrap())).unwrap();
    let mut graph = BlockGraph::new();
    let node = graph.add(opts).await.unwrap();
    Fixture {
        _dir: dir,
        _graph: graph,
        node,
        stores_data,
    }
}

fn file(path: &str) -> serde_json::Value {
    json!({"driver": "file", "node-name": "n", "filename": path, "discard": "unmap"})
}
fn file_direct(path: &str) -> serde_json::Value {
    json!({"driver": "file", "node-name": "n", "filename": path, "discard": "unmap",
           "cache": {"direct": true}})
}
fn raw(path: &str) -> serde_json::Value {
    json!({"driver": "raw", "node-name": "n", "discard": "unmap",
           "file": {"driver": "file", "filename": path, "discard": "unmap"}})
}
fn raw_window(path: &str) -> serde_json::Value {
    json!({"driver": "raw", "node-name": "n", "offset": 4096, "size": SIZE - 8192,
           "discard": "unmap",
           "file": {"driver": "file", "filename": path, "discard": "unmap"}})
}
fn blkdebug(path: &str) -> serde_json::Value {
    json!({"driver": "blkdebug", "node-name": "n", "discard": "unmap",
           "image": {"driver": "file", "filename": path, "discard": "unmap"}})
}
fn blkdebug_limits(path: &str) -> serde_json::Value {
    json!({"driver": "blkdebug", "node-name": "n", "discard": "unmap", "align": 4096,
           "max-transfer": 8192, "opt-write-zero": 8192, "max-write-zero": 16384,
           "opt-discard": 8192, "max-discard": 16384,
           "image": {"driver": "file", "filename": path, "discard": "unmap"}})
}
fn null(_: &str) -> serde_json::Value {
    json!({"driver": "null-co", "node-name": "n", "size": SIZE, "read-zeroes": true})
}

async fn write_then_read_back(f: Fixture) {
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 + 1).collect();
    f.node
        .write(1234, &data, WriteFlags::default())
        .await
        .unwrap();
    let mut back = vec![0u8; data.len()];
    f.node.read(1234, &mut back).await.unwrap();
    if f.stores_data {
        assert_eq!(back, data);
    } else {
        assert!(back.iter().all(|&b| b == 0));
    }
}

async fn zeroes_read_as_zero(f: Fixture) {
    f.node
        .write(0, &[7u8; 8192], WriteFlags { fua: true })
        .await
        .unwrap();
    f.node
        .write_zeroes(100, 5000, ZeroFlags::default())
        .await
        .unwrap();
    let mut back = vec![1u8; 8192];
    f.node.read(0, &mut back).await.unwrap();
    assert!(back[100..5100].iter().all(|&b| b == 0));
    if f.stores_data {
        assert_eq!(back[99], 7);
        assert_eq!(back[5100], 7);
    }
}

async fn discard_leaves_zero_status(f: Fixture) {
    f.node
        .write(65536, &[9u8; 65536], WriteFlags::default())
        .await
        .unwrap();
    f.node.discard(65536, 65536).await.unwrap();
    f.node.flush().await.unwrap();
    let extent = f.node.block_status(65536, 65536).await.unwrap();
    assert!(extent.zero);
    assert!(!extent.data);
}

async fn status_reports_written_data(f: Fixture) {
    f.node
        .write(0, &[5u8; 4096], WriteFlags::default())
        .await
        .unwrap();
    let extent = f.node.block_status(0, SIZE).await.unwrap();
    assert_eq!(extent.data, f.stores_data);
    assert!(extent.len >= 1 && extent.len <= f.node.size());
}

async fn out_of_range_is_refused(f: Fixture) {
    let size = f.node.size();
    let mut buf = [0u8; 512];
    assert!(f.node.read(size - 256, &mut buf).await.is_err());
    assert!(f
        .node
        .write(size, &buf, WriteFlags::default())
        .await
        .is_err());
    assert!(f.node.block_status(size, 1).await.is_err());
}

macro_rules! suite {
    ($($module:ident: $make:expr, $stores:expr;)*) => {$(
        mod $module {
            use super::*;
            #[tokio::test]
            async fn write_then_read_back() { super::write_then_read_back(open($make, $stores).await).await }
            #[tokio::test]
            async fn zeroes_read_as_zero() { super::zeroes_read_as_zero(open($make, $stores).await).await }
            #[tokio::test]
            async fn discard_leaves_zero_status() { super::discard_leaves_zero_status(open($make, $stores).await).await }
            #[tokio::test]
            async fn status_reports_written_data() { super::status_reports_written_data(open($make, $stores).await).await }
            #[tokio::test]
            async fn out_of_range_is_refused() { super::out_of_range_is_refused(open($make, $stores).await).await }
        }
    )*};
}

suite! {
    file_threads: file, true;
    file_o_direct: file_direct, true;
    raw_passthrough: raw, true;
    raw_with_window: raw_window, true;
    null_co: null, false;
    blkdebug_passthrough: blkdebug, true;
    blkdebug_with_limits: blkdebug_limits, true;
}
