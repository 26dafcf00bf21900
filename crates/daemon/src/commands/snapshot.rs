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

/// `SnapshotInfo` as QEMU prints it.
pub fn snapshot_info(s: &qcow2::SnapshotInfo) -> Value {
    let mut v = json!({
        "id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec, "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    });
    if let Some(icount) = s.icount {
        v["icount"] = json!(icount);
    }
    v
}

/// The node a snapshot command names: found by node name and a root (no node parents).
fn root_node(state: &State, device: &str) -> Result<Arc<block::Node>, QmpError> {
    let node = state.graph.get(device).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ))
    })?;
    let has_node_parent = node
        .parents()
        .iter()
        .any(|e| matches!(e.key, block::node::ParentKey::Node(_)));
    if has_node_parent {
        return Err(QmpError::generic("Need a root block node"));
    }
    Ok(node)
}

/// QEMU's snapshot messages name the device.
fn on_device(err: block::Error, device: &str) -> QmpError {
    let text = err.to_string();
    if text.starts_with("Snapshot with") {
        QmpError::generic(format!("{text} on device '{device}'"))
    } else {
        QmpError::generic(text)
    }
}

#[derive(Deserialize)]
struct InternalArgs {
    device: String,
    name: String,
}

/// A snapshot taken inside a transaction: an abort deletes it again.
pub struct InternalPrepared {
    node: Arc<block::Node>,
    id: String,
}

impl InternalPrepared {
    pub async fn abort(self) {
        // QEMU only reports a failure here; the snapshot stays.
        let _ = self
            .node
            .driver()
            .snapshot_delete(Some(&self.id), None)
            .await;
    }
}

pub async fn prepare_internal(state: &mut State, a: Value) -> Result<InternalPrepared, QmpError> {
    let a: InternalArgs = args(a)?;
    let node = root_node(state, &a.device)?;
    if node.is_read_only() {
        return Err(QmpError::generic(format!(
            "Device '{}' is read only",
            a.device
        )));
    }
    if !node.driver().can_snapshot() {
        return Err(QmpError::generic(format!(
            "Block format '{}' used by device '{}' does not support internal snapshots",
            node.driver_name(),
            a.device
        )));
    }
    if a.name.is_empty() {
        return Err(QmpError::generic("Name is empty"));
    }
    // No request may be half way through the image while its tables change.
    node.gate().drain().await;
    let taken = node.driver().snapshot_create(&a.name).await;
    node.gate().undrain();
    let info = taken.map_err(|e| on_device(e, &a.device))?;
    Ok(InternalPrepared { node, id: info.id })
}

pub fn blockdev_snapshot_internal_sync(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        prepare_internal(state, a).await?;
        Ok(empty())
    })
}

#[derive(Deserialize)]
struct DeleteArgs {
    device: String,
    id: Option<String>,
    name: Option<String>,
}

pub fn blockdev_snapshot_delete_internal_sync(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: DeleteArgs = args(a)?;
        let node = root_node(state, &a.device)?;
        if a.id.is_none() && a.name.is_none() {
            return Err(QmpError::generic("Name or id must be provided"));
        }
        if !node.driver().can_snapshot() {
            return Err(QmpError::generic(
                "Failed to get a snapshot list: Operation not supported",
            ));
        }
        node.gate().drain().await;
        let deleted = node
            .driver()
            .snapshot_delete(a.id.as_deref(), a.name.as_deref())
            .await;
        node.gate().undrain();
        let info = deleted.map_err(|e| on_device(e, &a.device))?;
        Ok(snapshot_info(&info))
    })
}
