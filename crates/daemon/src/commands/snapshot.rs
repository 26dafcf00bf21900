//! External snapshots: `blockdev-snapshot-sync` creates (or, with `mode: existing`, opens)
//! an overlay, `blockdev-snapshot` takes one the monitor added without a backing file;
//! either way the node becomes the overlay's backing file and the overlay takes its place
//! for every parent (exports, jobs, and nodes opened on top of it such as `raw` or
//! `blkdebug`) but the overlays reading it as their backing file; the old node becomes
//! read-only. Both are also
//! transaction actions, run as one-action transactions on their own.

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
    appended: block::Appended,
    /// The overlay was opened for the snapshot (`blockdev-snapshot-sync`) and belongs to
    /// its users, as in QEMU: with none it goes away at once (the caller reaps), and it
    /// goes with the last of them. A `blockdev-add`ed overlay belongs to the monitor.
    opened: bool,
}

impl Prepared {
    /// The old node becomes read-only.
    pub fn commit(self, state: &mut State) {
        // The node is there and was writable: the file edge only loses permissions.
        let _ = state.graph.reopen_read_only(self.appended.base().name());
        if self.opened {
            state.graph.release_later(self.appended.overlay().name());
        }
    }

    /// The parents go back to the old node and the overlay loses its backing file.
    pub async fn abort(self, state: &mut State) {
        let overlay = self.appended.overlay().name().to_string();
        state.graph.undo_overlay(self.appended).await;
        if self.opened {
            state.graph.release_later(&overlay);
        }
    }
}

/// The node `device` (a block device) or `node_name` names, as QEMU looks both up.
fn find(
    state: &State,
    device: Option<&str>,
    node_name: Option<&str>,
) -> Result<Arc<block::Node>, QmpError> {
    device
        .or(node_name)
        .and_then(|n| state.graph.get(n))
        .ok_or_else(|| {
            block_error(block::Error::DeviceNotFound {
                device: device.unwrap_or("").to_string(),
                node: node_name.unwrap_or("").to_string(),
            })
        })
}

/// The node an external snapshot goes above: any node but another node's backing file
/// (QEMU blocks snapshots of those), and, before anything is created, one whose parents
/// can all move onto an overlay (blockd refuses a node under a backup's filter).
fn snapshot_base(
    state: &State,
    device: Option<&str>,
    node_name: Option<&str>,
) -> Result<Arc<block::Node>, QmpError> {
    let base = find(state, device, node_name)?;
    if let Some(parent) = base.backing_parent() {
        return Err(block_error(block::Error::BackingInUse {
            node: base.name().to_string(),
            parent,
        }));
    }
    state
        .graph
        .check_replaceable(base.name())
        .map_err(block_error)?;
    Ok(base)
}

pub async fn prepare_snapshot_sync(state: &mut State, a: Value) -> Result<Prepared, QmpError> {
    let a: SnapshotSyncArgs = args(a)?;
    let base = snapshot_base(state, a.device.as_deref(), a.node_name.as_deref())?;
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
        opts["backing"] = Value::Null;
    }
    let opts: block::BlockdevOptions = args(opts)?;
    if let Err(e) = state.graph.add_implicit(opts).await {
        // QEMU named the overlay's file node before its open failed.
        state.graph.consume_anonymous_name();
        return Err(block_error(e));
    }
    match state.graph.append_overlay(base.name(), &name).await {
        Ok(appended) => Ok(Prepared {
            appended,
            opened: true,
        }),
        Err(e) => {
            state.graph.release_later(&name);
            state.graph.reap().await;
            Err(block_error(e))
        }
    }
}

#[derive(Deserialize)]
struct SnapshotArgs {
    node: String,
    overlay: String,
}

/// `blockdev-snapshot`: the overlay is a node the monitor added, with no backing file (or
/// with `backing: null`), which nothing reads yet.
pub async fn prepare_snapshot(state: &mut State, a: Value) -> Result<Prepared, QmpError> {
    let a: SnapshotArgs = args(a)?;
    let base = snapshot_base(state, Some(&a.node), Some(&a.node))?;
    let overlay = find(state, Some(&a.overlay), Some(&a.overlay))?;
    // A parent that does not read yet (a mirror target's job, say) may stay.
    let (perm, _) = overlay.cumulative_perms();
    if perm.contains(block::Perm::CONSISTENT_READ) {
        return Err(QmpError::generic("The overlay is already in use"));
    }
    if overlay.filtered().is_some() {
        return Err(QmpError::generic("Filters cannot be used as overlays"));
    }
    if overlay.backing().is_some() {
        return Err(QmpError::generic("The overlay already has a backing image"));
    }
    if !overlay.driver().supports_backing() {
        return Err(block_error(block::Error::BackingNotSupported));
    }
    let appended = state
        .graph
        .append_overlay(base.name(), overlay.name())
        .await
        .map_err(block_error)?;
    Ok(Prepared {
        appended,
        opened: false,
    })
}

pub fn blockdev_snapshot_sync(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(super::transaction::single(
        state,
        "blockdev-snapshot-sync",
        a,
    ))
}

pub fn blockdev_snapshot(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(super::transaction::single(state, "blockdev-snapshot", a))
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
    let taken = {
        let _quiet = node.gate().drained().await;
        node.driver().snapshot_create(&a.name, &[]).await
    };
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
        let deleted = {
            let _quiet = node.gate().drained().await;
            node.driver()
                .snapshot_delete(a.id.as_deref(), a.name.as_deref())
                .await
        };
        let info = deleted.map_err(|e| on_device(e, &a.device))?;
        Ok(snapshot_info(&info))
    })
}
