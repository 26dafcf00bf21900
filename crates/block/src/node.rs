//! A node of the block graph and its request API.
//!
//! Every request passes, in this order: the zero-length shortcut, the read-only check,
//! the bounds check against the node's current size, the drain gate (which counts it in
//! flight), then the driver. `detect-zeroes` and `discard` are applied here so drivers
//! never see them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::debug::DebugEvent;
use crate::dirty::Bitmaps;
use crate::drain::Gate;
use crate::driver::{BlockDriver, Extent, FormatSpecific, WriteFlags, ZeroFlags};
use crate::error::{Error, Result};
use crate::options::{DetectZeroes, Discard};
use crate::perm::{ChildRole, Perm};

/// Node-level settings from the common `blockdev-add` members.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeFlags {
    pub read_only: bool,
    pub auto_read_only: bool,
    pub force_share: bool,
    pub active: bool,
    pub discard: Discard,
    pub detect_zeroes: DetectZeroes,
    pub direct: bool,
    pub no_flush: bool,
}

/// A child edge, owned by the parent.
#[derive(Debug, Clone)]
pub struct Child {
    /// The child's role name as QEMU prints it (`file`, `backing`, ...).
    pub name: String,
    /// The child node.
    pub node: Arc<Node>,
    /// How the parent's permissions translate to the child's.
    pub role: ChildRole,
}

/// Who holds a parent edge on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentKey {
    /// Another node (by node-name).
    Node(String),
    /// A user handle ([`crate::Backend`]) by its id.
    User(u64),
}

/// A parent's claim on a node: stored at the child, the one place it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentEdge {
    pub key: ParentKey,
    /// How messages name the parent ("node 'r0'", "an unnamed block device").
    pub desc: String,
    /// The edge name (`file`, `root`, ...).
    pub role: String,
    pub perm: Perm,
    pub shared: Perm,
}

/// One node of the graph: a driver plus its edges, flags and request gate.
#[derive(Debug)]
pub struct Node {
    name: String,
    implicit: bool,
    driver: Box<dyn BlockDriver>,
    flags: NodeFlags,
    /// Fixed at open, except that an overlay gets a `backing` child (or loses it again)
    /// and a child can be replaced by an overlay put in its place, both under a drain
    /// (see [`crate::BlockGraph::append_overlay`]).
    children: RwLock<Vec<Child>>,
    parents: Mutex<Vec<ParentEdge>>,
    gate: Gate,
    write_threshold: AtomicU64,
    /// Live [`NodeHold`]s: references without an edge (a job's), which keep
    /// `blockdev-del` off the node.
    holds: AtomicUsize,
    /// Writes (data, zeroes, discards, resizes) started on the node, and that count at
    /// the last successful flush: a flush raises `flush_to_disk` only when they differ.
    write_gen: AtomicU64,
    flushed_gen: AtomicU64,
    /// Named dirty bitmaps; every finished write marks them.
    bitmaps: Bitmaps,
    /// Made read-only after it was opened (it became an overlay's backing file).
    reopened_ro: std::sync::atomic::AtomicBool,
}

/// A reference to a node that is no edge of the graph (QEMU's plain reference count, as
/// `x-blockdev-amend`'s job takes it): while one lives, `blockdev-del` refuses the node.
#[derive(Debug)]
pub struct NodeHold {
    node: Arc<Node>,
}

impl NodeHold {
    /// Takes a hold on `node`.
    pub fn new(node: Arc<Node>) -> Self {
        node.holds.fetch_add(1, Ordering::SeqCst);
        Self { node }
    }

    /// The held node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

impl Drop for NodeHold {
    fn drop(&mut self) {
        self.node.holds.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `cache` in query-named-block-nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheInfo {
    pub writeback: bool,
    pub direct: bool,
    pub no_flush: bool,
}

/// `ImageInfo` as query-named-block-nodes shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub filename: String,
    pub format: &'static str,
    pub virtual_size: u64,
    pub actual_size: Option<u64>,
    pub dirty_flag: Option<bool>,
    pub format_specific: Option<FormatSpecific>,
    pub cluster_size: Option<u64>,
    pub backing_filename: Option<String>,
    pub full_backing_filename: Option<String>,
    pub backing_filename_format: Option<String>,
    /// Internal snapshots (qcow2), oldest first.
    pub snapshots: Vec<::qcow2::SnapshotInfo>,
    pub backing_image: Option<Box<ImageInfo>>,
}

/// `BlockDeviceInfo` as query-named-block-nodes shows it (the daemon adds the
/// always-zero throttling fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_name: String,
    pub file: String,
    pub ro: bool,
    pub drv: &'static str,
    pub backing_file: Option<String>,
    pub backing_file_depth: u32,
    pub active: bool,
    pub encrypted: bool,
    pub detect_zeroes: DetectZeroes,
    pub cache: CacheInfo,
    pub write_threshold: u64,
    /// `dirty-bitmaps`, left out when empty.
    pub image: ImageInfo,
    /// The node's dirty bitmaps, newest first.
    pub dirty_bitmaps: Vec<crate::dirty::BitmapInfo>,
}

impl Node {
    pub(crate) fn new(
        name: String,
        implicit: bool,
        driver: Box<dyn BlockDriver>,
        flags: NodeFlags,
        children: Vec<Child>,
    ) -> Self {
        Self {
            name,
            implicit,
            driver,
            flags,
            children: RwLock::new(children),
            parents: Mutex::new(Vec::new()),
            gate: Gate::new(),
            write_threshold: AtomicU64::new(0),
            holds: AtomicUsize::new(0),
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
            bitmaps: Bitmaps::default(),
            reopened_ro: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Takes over the bitmaps the image stores (after open).
    pub(crate) async fn load_bitmaps(&self) {
        for b in self.driver.take_persistent_bitmaps().await {
            let readonly = self.flags.read_only;
            self.bitmaps
                .add(Arc::new(crate::dirty::NodeBitmap::loaded(b, readonly)));
        }
    }

    /// Closes the node's driver, storing its persistent bitmaps in the image first. A
    /// store that fails is reported and the close goes on, as QEMU does.
    pub(crate) async fn close(&self) -> Result<()> {
        let store: Vec<_> = self
            .bitmaps
            .all()
            .iter()
            .rev()
            .filter_map(|b| b.to_store())
            .collect();
        if !store.is_empty() {
            let stored = if self.flags.read_only {
                Err("No write access".to_string())
            } else {
                let r = self.driver.store_persistent_bitmaps(&store).await;
                r.map_err(|e| e.to_string())
            };
            if let Err(e) = stored {
                // QEMU's words.
                eprintln!(
                    "Lost persistent bitmaps during inactivation of node '{}': {e}",
                    self.name
                );
            }
        }
        self.driver.close().await
    }

    /// The node's dirty bitmaps.
    pub fn bitmaps(&self) -> &Bitmaps {
        &self.bitmaps
    }

    /// Whether a [`NodeHold`] references the node.
    pub fn is_held(&self) -> bool {
        self.holds.load(Ordering::SeqCst) > 0
    }

    /// The node-name (generated `#block…` names for implicit children).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the node was created implicitly as an inline child (not monitor-owned).
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// The driver name as QMP spells it.
    pub fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    /// The node's flags.
    pub fn flags(&self) -> NodeFlags {
        self.flags
    }

    /// Whether the node is read-only.
    pub fn is_read_only(&self) -> bool {
        self.flags.read_only || self.reopened_ro.load(Ordering::SeqCst)
    }

    /// How the node uses `child` now: a node made read-only after it was opened no longer
    /// writes its file.
    pub fn role_of(&self, child: &Child) -> ChildRole {
        match child.role {
            ChildRole::Metadata { .. } if self.is_read_only() => {
                ChildRole::Metadata { writable: false }
            }
            role => role,
        }
    }

    /// Makes the node read-only (`true`) or writable again (`false`, only for a node that
    /// was opened writable): QEMU reopens a snapshot's old image read-only.
    pub fn set_reopened_read_only(&self, read_only: bool) {
        self.reopened_ro.store(read_only, Ordering::SeqCst);
    }

    /// The child edges as they are now.
    pub fn children(&self) -> Vec<Child> {
        self.read_children().clone()
    }

    fn read_children(&self) -> RwLockReadGuard<'_, Vec<Child>> {
        match self.children.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn write_children(&self) -> RwLockWriteGuard<'_, Vec<Child>> {
        match self.children.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Replaces the `backing` child edge (with `None`, removes it). A backing child comes
    /// first, as it does for a node opened with one. Only the edge list changes: the graph
    /// keeps the driver and the parent edge at the child in step.
    pub(crate) fn set_backing_child(&self, backing: Option<Arc<Node>>) {
        let mut children = self.write_children();
        children.retain(|c| c.name != "backing");
        if let Some(node) = backing {
            children.insert(
                0,
                Child {
                    name: "backing".into(),
                    node,
                    role: ChildRole::Cow,
                },
            );
        }
    }

    /// Points child edge `role_name` at `node` (an overlay took the child's place, or the
    /// child came back); the graph keeps the driver and the parent edges in step.
    pub(crate) fn set_child_node(&self, role_name: &str, node: Arc<Node>) {
        let mut children = self.write_children();
        if let Some(child) = children.iter_mut().find(|c| c.name == role_name) {
            child.node = node;
        }
    }

    /// Whether `other` is this node or lies anywhere below it.
    pub fn reaches(&self, other: &Node) -> bool {
        std::ptr::eq(self, other) || self.children().iter().any(|c| c.node.reaches(other))
    }

    /// The node that reads this one as its backing file, if one does.
    pub fn backing_parent(&self) -> Option<String> {
        self.lock_parents().iter().find_map(|e| match &e.key {
            ParentKey::Node(parent) if e.role == "backing" => Some(parent.clone()),
            _ => None,
        })
    }

    /// A snapshot of the parent edges.
    pub fn parents(&self) -> Vec<ParentEdge> {
        self.lock_parents().clone()
    }

    pub(crate) fn lock_parents(&self) -> MutexGuard<'_, Vec<ParentEdge>> {
        match self.parents.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The union of the parents' perms and the intersection of their shared perms.
    pub fn cumulative_perms(&self) -> (Perm, Perm) {
        cumulative(&self.lock_parents())
    }

    /// The drain gate.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The driver (for drivers stacking on this node and for tests).
    pub fn driver(&self) -> &dyn BlockDriver {
        self.driver.as_ref()
    }

    /// Current virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// `write_threshold` in bytes (0 = off).
    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.load(Ordering::Relaxed)
    }

    /// Arms (or with 0 disarms) the write threshold.
    pub fn set_write_threshold(&self, bytes: u64) {
        self.write_threshold.store(bytes, Ordering::Relaxed);
    }

    /// Raises a debug event on this node (see [`crate::debug`]).
    pub fn debug_event(&self, event: DebugEvent) {
        self.driver.debug_event(event);
    }

    /// The child a flush raises its events on (QEMU's primary child).
    fn primary_child(&self) -> Option<Arc<Node>> {
        self.read_children()
            .iter()
            .find(|c| matches!(c.name.as_str(), "file" | "image"))
            .map(|c| c.node.clone())
    }

    fn wrote(&self) {
        self.write_gen.fetch_add(1, Ordering::SeqCst);
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::NodeReadOnly);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.check_range(offset, buf.len() as u64)?;
        let _in = self.gate.enter().await;
        self.driver.read(offset, buf).await
    }

    /// Writes `buf` at `offset`; with `detect-zeroes` an all-zero buffer becomes a
    /// write-zeroes request (allowed to unmap with `detect-zeroes=unmap`).
    pub async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if self.flags.detect_zeroes != DetectZeroes::Off && buf.iter().all(|&b| b == 0) {
            let zero = ZeroFlags {
                may_unmap: self.flags.detect_zeroes == DetectZeroes::Unmap,
                no_fallback: false,
                fua: flags.fua,
            };
            return self.write_zeroes(offset, buf.len() as u64, zero).await;
        }
        let _in = self.gate.enter().await;
        self.wrote();
        let r = self.driver.write(offset, buf, flags).await;
        self.bitmaps.mark(offset, buf.len() as u64);
        r
    }

    /// Writes whole clusters compressed (see [`BlockDriver::write_compressed`]).
    pub async fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let _in = self.gate.enter().await;
        self.wrote();
        self.driver.write_compressed(offset, buf).await
    }

    /// Writes `buf` at `offset` for a parent format driver, growing the node when the write
    /// runs past its end and the driver can grow that way (see
    /// [`BlockDriver::grows_on_write`]); `false` when it cannot, so the caller resizes first.
    pub(crate) async fn write_growing(&self, offset: u64, buf: &[u8]) -> Result<bool> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_some_and(|end| end <= self.size()) {
            self.write(offset, buf, WriteFlags::default()).await?;
            return Ok(true);
        }
        if end.is_none() || !self.driver.grows_on_write() {
            return Ok(false);
        }
        self.check_writable()?;
        let _in = self.gate.enter().await;
        self.wrote();
        let r = self.driver.write(offset, buf, WriteFlags::default()).await;
        self.bitmaps.mark(offset, buf.len() as u64);
        r?;
        Ok(true)
    }

    /// Makes `len` bytes at `offset` read as zeroes. `may_unmap` is dropped unless the
    /// node has `discard=unmap`.
    pub async fn write_zeroes(&self, offset: u64, len: u64, mut flags: ZeroFlags) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_writable()?;
        self.check_range(offset, len)?;
        flags.may_unmap &= self.flags.discard == Discard::Unmap;
        let _in = self.gate.enter().await;
        self.wrote();
        let r = self.driver.write_zeroes(offset, len, flags).await;
        self.bitmaps.mark(offset, len);
        r
    }

    /// Discards `len` bytes at `offset`; a no-op with `discard=ignore`.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_writable()?;
        self.check_range(offset, len)?;
        if self.flags.discard == Discard::Ignore {
            return Ok(());
        }
        let _in = self.gate.enter().await;
        self.wrote();
        let r = self.driver.discard(offset, len).await;
        self.bitmaps.mark(offset, len);
        r
    }

    /// Flushes; a no-op with `cache.no-flush` and on read-only nodes. As in QEMU, the
    /// primary child hears `flush_to_os`, then `flush_to_disk` when the node was written
    /// since its last flush.
    pub async fn flush(&self) -> Result<()> {
        if self.flags.read_only {
            return Ok(());
        }
        let generation = self.write_gen.load(Ordering::SeqCst);
        let primary = self.primary_child();
        if let Some(child) = &primary {
            child.debug_event(DebugEvent::FlushToOs);
        }
        if self.flags.no_flush {
            return Ok(());
        }
        if let Some(child) =
            primary.filter(|_| self.flushed_gen.load(Ordering::SeqCst) != generation)
        {
            child.debug_event(DebugEvent::FlushToDisk);
        }
        let _in = self.gate.enter().await;
        self.driver.flush().await?;
        self.flushed_gen.store(generation, Ordering::SeqCst);
        Ok(())
    }

    /// Status of the run at `offset`, at most `len` bytes (clamped to the node's end).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.size();
        if offset >= size || len == 0 {
            return Err(Error::OutOfRange { offset, len, size });
        }
        let len = len.min(size - offset);
        let _in = self.gate.enter().await;
        let mut extent = self.driver.block_status(offset, len).await?;
        extent.len = extent.len.clamp(1, len);
        Ok(extent)
    }

    /// Resizes without permission checks or draining: the graph (or a parent driver
    /// that the graph already drained) calls this.
    pub(crate) async fn truncate(&self, size: u64) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ImageReadOnly);
        }
        self.wrote();
        self.driver.truncate(size).await?;
        self.bitmaps.resize(self.size());
        Ok(())
    }

    /// Reverts the image to internal snapshot `id` (the caller drained the node); the
    /// node's size and its bitmaps follow the snapshot's disk size.
    pub async fn revert_snapshot(&self, id: &str) -> Result<::qcow2::SnapshotInfo> {
        self.check_writable()?;
        self.wrote();
        let reverted = self.driver.snapshot_revert(id).await;
        self.bitmaps.resize(self.size());
        reverted
    }

    /// The filename as QEMU shows it (`a.img`, `null-co://`, `json:{...}`).
    pub fn filename(&self) -> String {
        self.driver.filename().display()
    }

    /// The `backing` child, if the node has one.
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.read_children()
            .iter()
            .find(|c| c.name == "backing")
            .map(|c| c.node.clone())
    }

    /// The child a filter driver passes requests to (blkdebug's `image`, copy-before-write's
    /// `file`).
    pub fn filtered(&self) -> Option<Arc<Node>> {
        self.read_children()
            .iter()
            .find(|c| {
                matches!(
                    c.role,
                    ChildRole::Debug { .. } | ChildRole::CbwSource { .. }
                )
            })
            .map(|c| c.node.clone())
    }

    /// Reads `buf.len()` bytes at `offset` for a parent driver: bytes past the node's
    /// end read as zeroes.
    pub(crate) async fn read_padded(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size();
        let inside = usize::try_from(size.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        buf[inside..].fill(0);
        self.read(offset, &mut buf[..inside]).await
    }

    /// What query-named-block-nodes shows for this node (with the whole backing chain:
    /// the `flat` form drops `backing-image` and the depth).
    pub fn info(&self) -> NodeInfo {
        let filename = self.filename();
        let extra = self.driver.info();
        let named = self.bitmaps.all();
        // QEMU walks the chain through filters too (blkdebug's `image`), but names only a
        // real backing file in `backing_file`.
        let real_backing = self.backing().is_some();
        let backing = self.backing().or_else(|| self.filtered()).map(|b| b.info());
        NodeInfo {
            node_name: self.name.clone(),
            file: filename.clone(),
            ro: self.is_read_only(),
            drv: self.driver.name(),
            backing_file: backing
                .as_ref()
                .filter(|_| real_backing)
                .map(|b| b.file.clone()),
            backing_file_depth: backing.as_ref().map_or(0, |b| b.backing_file_depth + 1),
            active: self.flags.active,
            encrypted: false,
            detect_zeroes: self.flags.detect_zeroes,
            cache: CacheInfo {
                writeback: true,
                direct: self.flags.direct,
                no_flush: self.flags.no_flush,
            },
            write_threshold: self.write_threshold(),
            // Named bitmaps are newer than the driver's own (a filter's), so they come first.
            // A frozen bitmap's successor is the newest of all.
            dirty_bitmaps: named
                .iter()
                .filter_map(|b| b.successor_info())
                .chain(named.iter().map(|b| b.info()))
                .chain(
                    extra
                        .dirty_bitmaps
                        .iter()
                        .map(crate::dirty::BitmapInfo::anonymous),
                )
                .collect(),
            image: ImageInfo {
                filename,
                format: self.driver.name(),
                virtual_size: self.size(),
                actual_size: extra.actual_size,
                dirty_flag: extra.dirty_flag,
                format_specific: extra.format_specific,
                cluster_size: extra.cluster_size,
                backing_filename: extra.backing_filename,
                full_backing_filename: extra.full_backing_filename,
                backing_filename_format: extra.backing_filename_format,
                snapshots: extra.snapshots,
                backing_image: backing.map(|b| Box::new(b.image)),
            },
        }
    }
}

pub(crate) fn cumulative(parents: &[ParentEdge]) -> (Perm, Perm) {
    parents.iter().fold((Perm::NONE, Perm::ALL), |(p, s), e| {
        (p | e.perm, s & e.shared)
    })
}
