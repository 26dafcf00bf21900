//! blkdebug through the graph: injected errors reach the caller as QEMU injects them.

use serde_json::{json, Value};
use std::sync::Arc;

use crate::{BlockGraph, BlockdevOptions, Node, WriteFlags, ZeroFlags};

const SIZE: u64 = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    graph: BlockGraph,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        std::fs::File::create(path).unwrap().set_len(SIZE).unwrap();
        Self {
            dir,
            graph: BlockGraph::new(),
        }
    }

    fn image(&self) -> Value {
        let path = self.dir.path().join("t.img");
        json!({"driver": "file", "filename": path.to_str().unwrap()})
    }

    /// A blkdebug node `d0` over the image with `extra` members.
    async fn blkdebug(&mut self, extra: Value) -> crate::Result<Arc<Node>> {
        let mut opts = json!({"driver": "blkdebug", "node-name": "d0", "image": self.image()});
        opts.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let opts: BlockdevOptions = serde_json::from_value(opts).unwrap();
        self.graph.add(opts).await
    }

    /// `raw` node `r0` over a blkdebug node with `extra` members.
    async fn raw_over_blkdebug(&mut self, extra: Value) -> Arc<Node> {
        self.blkdebug(extra).await.unwrap();
        let opts = json!({"driver": "raw", "node-name": "r0", "file": "d0"});
        self.graph
            .add(serde_json::from_value(opts).unwrap())
            .await
            .unwrap()
    }
}

async fn write(node: &Node, offset: u64, len: usize) -> crate::Result<()> {
    node.write(offset, &vec![0x5a; len], WriteFlags::default())
        .await
}

async fn read(node: &Node, offset: u64, len: usize) -> crate::Result<()> {
    node.read(offset, &mut vec![0; len]).await
}

fn errno(result: crate::Result<()>) -> Option<i32> {
    result.err().and_then(|e| e.errno())
}

#[tokio::test]
async fn write_aio_rule_fails_writes_through_raw_with_the_errno() {
    let mut f = Fixture::new();
    let raw = f
        .raw_over_blkdebug(json!({"inject-error": [{"event": "write_aio", "errno": 5}]}))
        .await;
    assert_eq!(errno(write(&raw, 0, 4096).await), Some(libc::EIO));
    assert_eq!(errno(write(&raw, 8192, 4096).await), Some(libc::EIO));
}

#[tokio::test]
async fn write_aio_rule_never_fires_for_writes_to_the_blkdebug_node_itself() {
    let mut f = Fixture::new();
    let node = f
        .blkdebug(json!({"inject-error": [{"event": "write_aio"}]}))
        .await
        .unwrap();
    assert!(write(&node, 0, 4096).await.is_ok());
}

#[tokio::test]
async fn once_rule_fails_exactly_one_request() {
    let mut f = Fixture::new();
    let raw = f
        .raw_over_blkdebug(json!({"inject-error":
            [{"event": "write_aio", "errno": 28, "once": true}]}))
        .await;
    assert_eq!(errno(write(&raw, 0, 512).await), Some(libc::ENOSPC));
    assert!(write(&raw, 0, 512).await.is_ok());
    assert!(write(&raw, 0, 512).await.is_ok());
}

#[tokio::test]
async fn sector_rule_fails_only_requests_covering_the_sector() {
    let mut f = Fixture::new();
    let node = f
        .blkdebug(json!({"inject-error":
            [{"event": "none", "iotype": "read", "sector": 8, "immediately": true}]}))
        .await
        .unwrap();
    assert!(read(&node, 0, 4096).await.is_ok());
    assert_eq!(errno(read(&node, 4096, 512).await), Some(libc::EIO));
    assert_eq!(errno(read(&node, 0, 8192).await), Some(libc::EIO));
    assert!(write(&node, 4096, 512).await.is_ok());
}

#[tokio::test]
async fn state_rules_arm_errors_only_in_their_state() {
    let mut f = Fixture::new();
    let raw = f
        .raw_over_blkdebug(json!({
            "inject-error": [{"event": "write_aio", "state": 2, "errno": 5}],
            "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}]}))
        .await;
    assert!(write(&raw, 0, 512).await.is_ok());
    raw.flush().await.unwrap();
    assert_eq!(errno(write(&raw, 0, 512).await), Some(libc::EIO));
}

#[tokio::test]
async fn flush_to_disk_fires_only_after_a_write() {
    let mut f = Fixture::new();
    let raw = f
        .raw_over_blkdebug(json!({"inject-error":
            [{"event": "flush_to_disk", "iotype": "flush", "errno": 28, "once": true}]}))
        .await;
    assert!(raw.flush().await.is_ok());
    write(&raw, 0, 512).await.unwrap();
    assert_eq!(errno(raw.flush().await), Some(libc::ENOSPC));
    write(&raw, 0, 512).await.unwrap();
    assert!(raw.flush().await.is_ok());
}

#[tokio::test]
async fn pwritev_rule_fails_writes_to_the_node_and_lets_reads_through_by_iotype() {
    let mut f = Fixture::new();
    let node = f
        .blkdebug(json!({"inject-error": [{"event": "pwritev", "iotype": "write"}]}))
        .await
        .unwrap();
    assert_eq!(errno(write(&node, 0, 512).await), Some(libc::EIO));
    assert!(read(&node, 0, 512).await.is_ok());
}

#[tokio::test]
async fn unaligned_write_reads_the_head_block_with_rmw_events() {
    let mut f = Fixture::new();
    let node = f
        .blkdebug(json!({"align": 4096, "inject-error":
            [{"event": "pwritev_rmw_head", "iotype": "read", "errno": 5, "once": true}]}))
        .await
        .unwrap();
    assert!(write(&node, 0, 4096).await.is_ok());
    assert_eq!(errno(write(&node, 512, 512).await), Some(libc::EIO));
    assert!(write(&node, 512, 512).await.is_ok());
}

#[tokio::test]
async fn max_transfer_splits_requests_so_sector_rules_see_pieces() {
    let mut f = Fixture::new();
    let node = f
        .blkdebug(json!({"max-transfer": 4096, "inject-error":
            [{"event": "none", "iotype": "write", "sector": 16, "errno": 5}]}))
        .await
        .unwrap();
    // The piece 8192..12288 covers sector 16; the data before it was written.
    assert_eq!(errno(write(&node, 0, 16384).await), Some(libc::EIO));
    assert!(write(&node, 0, 8192).await.is_ok());
}

#[tokio::test]
async fn small_zero_writes_fall_back_to_data_writes() {
    let mut f = Fixture::new();
    let node = f
        .blkdebug(json!({"opt-write-zero": 8192, "inject-error":
            [{"event": "none", "iotype": "write-zeroes", "errno": 5}]}))
        .await
        .unwrap();
    assert!(node
        .write_zeroes(0, 4096, ZeroFlags::default())
        .await
        .is_ok());
    assert_eq!(
        errno(node.write_zeroes(0, 8192, ZeroFlags::default()).await),
        Some(libc::EIO)
    );
}

#[tokio::test]
async fn zero_errno_lets_requests_through_and_shadows_later_rules() {
    let mut f = Fixture::new();
    let node = f
        .blkdebug(json!({"inject-error":
            [{"event": "none", "errno": 0}, {"event": "none", "errno": 5}]}))
        .await
        .unwrap();
    assert!(write(&node, 0, 512).await.is_ok());
}

#[tokio::test]
async fn config_file_rules_come_before_the_options_rules() {
    let mut f = Fixture::new();
    let config = f.dir.path().join("rules.cfg");
    std::fs::write(
        &config,
        "[inject-error]\nevent = \"none\"\nerrno = \"28\"\n",
    )
    .unwrap();
    let node = f
        .blkdebug(json!({"config": config.to_str().unwrap(),
            "inject-error": [{"event": "none", "errno": 5}]}))
        .await
        .unwrap();
    assert_eq!(errno(write(&node, 0, 512).await), Some(libc::ENOSPC));
}

#[tokio::test]
async fn bad_limits_are_refused_with_qemus_messages() {
    let mut f = Fixture::new();
    let err = f.blkdebug(json!({"align": 3})).await.unwrap_err();
    assert_eq!(err.to_string(), "Cannot meet constraints with align 3");
    let err = f
        .blkdebug(json!({"align": 4096, "max-write-zero": 2048}))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Cannot meet constraints with max-write-zero 2048"
    );
    let err = f
        .blkdebug(json!({"max-discard": -2, "align": -1}))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Value '-2' is out of range for parameter 'max-discard'"
    );
    // Nothing was left behind by the failed opens.
    assert!(f.graph.nodes().is_empty());
}

#[tokio::test]
async fn missing_config_file_is_refused() {
    let mut f = Fixture::new();
    let missing = f.dir.path().join("missing.cfg");
    let err = f
        .blkdebug(json!({"config": missing.to_str().unwrap()}))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Could not read blkdebug config file: No such file or directory"
    );
}

#[tokio::test]
async fn filename_is_plain_without_rules_and_json_with_them() {
    let mut f = Fixture::new();
    let node = f.blkdebug(json!({})).await.unwrap();
    let path = f.dir.path().join("t.img");
    assert_eq!(node.filename(), format!("blkdebug::{}", path.display()));
    let opts = json!({"driver": "blkdebug", "node-name": "d1", "image": f.image(),
        "read-only": true, "inject-error": [{"event": "write_aio", "errno": 5}]});
    let node = f
        .graph
        .add(serde_json::from_value(opts).unwrap())
        .await
        .unwrap();
    assert_eq!(
        node.filename(),
        format!(
            "json:{{\"image\": {{\"driver\": \"file\", \"filename\": \"{}\"}}, \"driver\": \
             \"blkdebug\", \"inject-error.0.event\": \"write_aio\", \"inject-error.0.errno\": 5}}",
            path.display()
        )
    );
}
