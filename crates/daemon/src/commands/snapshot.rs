//! External snapshots: `blockdev-snapshot-sync` creates (or, with `mode: existing`, opens)
//! an overlay whose backing file is the node, and puts it in the node's place for every
//! user (exports, jobs); the old node becomes read-only. Also a transaction action.

use std::sync::Arc;

use qapi::QmpError;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, block_error, empty, Reply};
use crate::control::State;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SnapshotSyncArgs {
    device: Option<String>,
    node_name: Option<String>,
    snapshot_file: String,
    snapshot_node_name: Option<String>,
    format: Option<String>,
    mode: Option<String>,
}

/// A prepared external snapshot: the overlay is in place; commit makes the old node
/// read-only, abort takes the overlay out again.
pub struct Prepared {
    base: Arc<block::Node>,
    overlay: String,
}

impl Prepared {
    /// The old node becomes read-only. The overlay belongs to its users, as in QEMU: with
    /// none it goes away at once (the caller reaps), and it goes with the last of them.
    pub fn commit(self, state: &mut State) {
        // The node is there and was writable: the file edge only loses permissions.
        let _ = state.graph.reopen_read_only(self.base.name());
        state.graph.release_later(&self.overlay);
    }

    pub async fn abort(self, state: &mut State) {
        let base = self.base.name().to_string();
        // Both were in this very arrangement a moment ago, so the moves fit.
        let _ = state.graph.replace_for_users(&self.overlay, &base).await;
        state.graph.release_later(&self.overlay);
    }
}

pub async fn prepare_snapshot_sync(state: &mut State, a: Value) -> Result<Prepared, QmpError> {
    let a: SnapshotSyncArgs = args(a)?;
    let base = a
        .device
        .as_deref()
        .or(a.node_name.as_deref())
        .and_then(|n| state.graph.get(n))
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                a.device.as_deref().unwrap_or(""),
                a.node_name.as_deref().unwrap_or("")
            ))
        })?;
    let Some(name) = a.snapshot_node_name.clone() else {
        return Err(QmpError::generic("New overlay node-name missing"));
    };
    if state.graph.get(&name).is_some() {
        return Err(QmpError::generic("New overlay node-name already in use"));
    }
    let format = a.format.clone().unwrap_or_else(|| "qcow2".to_string());
    let existing = a.mode.as_deref() == Some("existing");
    if !existing {
        if format != "qcow2" {
            return Err(QmpError::generic(format!(
                "Backing file not supported for file format '{format}'"
            )));
        }
        super::backup::create_image(state, &a.snapshot_file, &format, base.size(), Some(&base))
            .await?;
        // QEMU opens two more nodes of its own while it creates the image.
        state.graph.consume_anonymous_name();
        state.graph.consume_anonymous_name();
    }
    // The overlay is opened without its own idea of a backing file: the node is it.
    let mut opts = json!({"driver": format, "node-name": name,
                          "file": {"driver": "file", "filename": a.snapshot_file}});
    if format == "qcow2" {
        opts["backing"] = json!(base.name());
    }
    let opts: block::BlockdevOptions = args(opts)?;
    if let Err(e) = state.graph.add_implicit(opts).await {
        // QEMU named the overlay's file node before its open failed.
        state.graph.consume_anonymous_name();
        return Err(block_error(e));
    }
    if let Err(e) = state.graph.replace_for_users(base.name(), &name).await {
        state.graph.release_later(&name);
        state.graph.reap().await;
        return Err(block_error(e));
    }
    Ok(Prepared {
        base,
        overlay: name,
    })
}

pub fn blockdev_snapshot_sync(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        prepare_snapshot_sync(state, a).await?.commit(state);
        state.graph.reap().await;
        Ok(empty())
    })
}
