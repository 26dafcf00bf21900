//! The `block-dirty-bitmap-*` commands and `x-debug-block-dirty-bitmap-sha256`.
//!
//! Each change is split as a transaction action needs it: a `prepare_*` function checks and
//! makes the change, returning a [`BitmapUndo`] that the `transaction` command commits or
//! rolls back; the plain commands prepare and commit at once.

use std::sync::Arc;

use bitmap::{DirtyBitmap, Granularity};
use block::dirty::{Check, NodeBitmap, MAX_NAME_LEN};
use block::{BlockGraph, Node};
use qapi::QmpError;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, empty, Reply};
use crate::control::State;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddArgs {
    node: String,
    name: String,
    granularity: Option<u64>,
    persistent: Option<bool>,
    disabled: Option<bool>,
}

#[derive(Deserialize)]
pub struct NameArgs {
    node: String,
    name: String,
}

/// A merge source: a bitmap of the target's node, or of any node.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Source {
    Local(String),
    External { node: String, name: String },
}

#[derive(Deserialize)]
pub struct MergeArgs {
    node: String,
    target: String,
    bitmaps: Vec<Source>,
}

/// How to take back a prepared bitmap change, or to finish it.
pub enum BitmapUndo {
    Added {
        node: Arc<Node>,
        name: String,
    },
    /// A removal waits for commit with the bitmap busy, as QEMU's.
    Removing {
        node: Arc<Node>,
        bitmap: Arc<NodeBitmap>,
    },
    /// The bits before a clear or a merge.
    Bits {
        bitmap: Arc<NodeBitmap>,
        old: DirtyBitmap,
    },
    /// The recording state before an enable or a disable.
    Enabled {
        bitmap: Arc<NodeBitmap>,
        old: bool,
    },
}

impl BitmapUndo {
    pub fn commit(self) {
        if let BitmapUndo::Removing { node, bitmap } = self {
            bitmap.lock().busy = false;
            node.bitmaps().remove(bitmap.name());
        }
    }

    pub fn abort(self) {
        match self {
            BitmapUndo::Added { node, name } => {
                node.bitmaps().remove(&name);
            }
            BitmapUndo::Removing { bitmap, .. } => bitmap.lock().busy = false,
            BitmapUndo::Bits { bitmap, old } => bitmap.lock().bits = old,
            BitmapUndo::Enabled { bitmap, old } => bitmap.lock().enabled = old,
        }
    }
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg.into())
}

/// A node by node name, as the bitmap commands other than `-add` look it up.
fn node(graph: &BlockGraph, name: &str) -> Result<Arc<Node>, QmpError> {
    graph
        .get(name)
        .ok_or_else(|| generic(format!("Node '{name}' not found")))
}

/// The node and its bitmap called `name`.
pub fn lookup(
    graph: &BlockGraph,
    node_name: &str,
    name: &str,
) -> Result<(Arc<Node>, Arc<NodeBitmap>), QmpError> {
    let node = node(graph, node_name)?;
    let bitmap = node
        .bitmaps()
        .get(name)
        .ok_or_else(|| generic(format!("Dirty bitmap '{name}' not found")))?;
    Ok((node, bitmap))
}

fn checked(bitmap: &NodeBitmap, check: Check) -> Result<(), QmpError> {
    bitmap.check(check).map_err(generic)
}

/// QEMU's default granularity: the node's cluster size within 4 KiB..64 KiB, else 64 KiB.
fn default_granularity(node: &Node) -> u64 {
    node.driver()
        .info()
        .cluster_size
        .map_or(65536, |c| c.clamp(4096, 65536))
}

pub fn prepare_add(state: &mut State, a: Value) -> Result<BitmapUndo, QmpError> {
    let a: AddArgs = args(a)?;
    if a.name.is_empty() {
        return Err(generic("Bitmap name cannot be empty"));
    }
    let node = state.graph.get(&a.node).ok_or_else(|| {
        generic(format!(
            "Cannot find device='{0}' nor node-name='{0}'",
            a.node
        ))
    })?;
    if a.name.len() > MAX_NAME_LEN {
        return Err(generic(format!("Bitmap name too long: {}", a.name)));
    }
    let bytes = a.granularity.unwrap_or_else(|| default_granularity(&node));
    let granularity = Granularity::new(bytes)
        .map_err(|_| generic("Granularity must be power of 2 and at least 512"))?;
    if node.bitmaps().get(&a.name).is_some() {
        return Err(generic(format!("Bitmap already exists: {}", a.name)));
    }
    let persistent = a.persistent.unwrap_or(false);
    if persistent {
        match node.driver().can_store_bitmap(&a.name, bytes) {
            None => {
                return Err(generic(format!(
                    "Can't store persistent bitmaps to {}: Operation not supported",
                    node.name()
                )))
            }
            Some(Err(why)) => {
                return Err(generic(format!(
                    "Can't make bitmap '{}' persistent in '{}': {why}",
                    a.name,
                    node.name()
                )))
            }
            Some(Ok(())) => {}
        }
    }
    let bitmap = NodeBitmap::new(
        a.name.clone(),
        node.size(),
        granularity,
        !a.disabled.unwrap_or(false),
    );
    bitmap.lock().persistent = persistent;
    node.bitmaps().add(Arc::new(bitmap));
    Ok(BitmapUndo::Added { node, name: a.name })
}

/// Refuses a busy or readonly bitmap; a persistent one leaves the image at once (an abort
/// keeps it in memory, and it is stored again when the node closes).
pub async fn prepare_remove(state: &mut State, a: Value) -> Result<BitmapUndo, QmpError> {
    let a: NameArgs = args(a)?;
    let (node, bitmap) = lookup(&state.graph, &a.node, &a.name)?;
    checked(&bitmap, Check::BusyReadonly)?;
    if bitmap.lock().persistent {
        node.driver()
            .remove_persistent_bitmap(bitmap.name())
            .await
            .map_err(|e| generic(e.to_string()))?;
    }
    bitmap.lock().busy = true;
    Ok(BitmapUndo::Removing { node, bitmap })
}

pub fn prepare_clear(state: &mut State, a: Value) -> Result<BitmapUndo, QmpError> {
    let a: NameArgs = args(a)?;
    let (_, bitmap) = lookup(&state.graph, &a.node, &a.name)?;
    checked(&bitmap, Check::All)?;
    let old = {
        let mut s = bitmap.lock();
        let old = s.bits.clone();
        s.bits.clear();
        old
    };
    Ok(BitmapUndo::Bits { bitmap, old })
}

fn prepare_recording(state: &mut State, a: Value, enable: bool) -> Result<BitmapUndo, QmpError> {
    let a: NameArgs = args(a)?;
    let (_, bitmap) = lookup(&state.graph, &a.node, &a.name)?;
    checked(&bitmap, Check::BusyInconsistent)?;
    let old = std::mem::replace(&mut bitmap.lock().enabled, enable);
    Ok(BitmapUndo::Enabled { bitmap, old })
}

pub fn prepare_enable(state: &mut State, a: Value) -> Result<BitmapUndo, QmpError> {
    prepare_recording(state, a, true)
}

pub fn prepare_disable(state: &mut State, a: Value) -> Result<BitmapUndo, QmpError> {
    prepare_recording(state, a, false)
}

pub fn prepare_merge(state: &mut State, a: Value) -> Result<BitmapUndo, QmpError> {
    let a: MergeArgs = args(a)?;
    let (_, target) = lookup(&state.graph, &a.node, &a.target)?;
    checked(&target, Check::All)?;
    // Every source is found and checked before the target changes.
    let mut merged = target.lock().bits.clone();
    for source in &a.bitmaps {
        let (node, name) = match source {
            Source::Local(name) => (a.node.as_str(), name.as_str()),
            Source::External { node, name } => (node.as_str(), name.as_str()),
        };
        let (_, src) = lookup(&state.graph, node, name)?;
        // Busy sources (exported, or frozen by a job) and inconsistent ones are refused.
        checked(&src, Check::BusyInconsistent)?;
        let bits = src.lock().bits.clone();
        merged.merge(&bits).map_err(|_| {
            generic(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                merged.size(),
                bits.size()
            ))
        })?;
    }
    let old = std::mem::replace(&mut target.lock().bits, merged);
    Ok(BitmapUndo::Bits {
        bitmap: target,
        old,
    })
}

/// Runs a prepare step as a command of its own: prepared, then committed.
fn command(
    state: &mut State,
    a: Value,
    prepare: fn(&mut State, Value) -> Result<BitmapUndo, QmpError>,
) -> Reply<'_> {
    Box::pin(async move {
        prepare(state, a)?.commit();
        Ok(empty())
    })
}

pub fn add(state: &mut State, a: Value) -> Reply<'_> {
    command(state, a, prepare_add)
}

pub fn remove(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        prepare_remove(state, a).await?.commit();
        Ok(empty())
    })
}

pub fn clear(state: &mut State, a: Value) -> Reply<'_> {
    command(state, a, prepare_clear)
}

pub fn enable(state: &mut State, a: Value) -> Reply<'_> {
    command(state, a, prepare_enable)
}

pub fn disable(state: &mut State, a: Value) -> Reply<'_> {
    command(state, a, prepare_disable)
}

pub fn merge(state: &mut State, a: Value) -> Reply<'_> {
    command(state, a, prepare_merge)
}

pub fn sha256(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: NameArgs = args(a)?;
        let (_, bitmap) = lookup(&state.graph, &a.node, &a.name)?;
        let hash = bitmap.lock().bits.sha256();
        Ok(json!({ "sha256": hash }))
    })
}
