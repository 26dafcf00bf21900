//! Block drivers: what one node does with a request. The [`crate::Node`] in front of
//! every driver has already counted the request, checked bounds, read-only state and
//! the drain gate, so drivers see only in-range requests.

use async_trait::async_trait;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::debug::DebugEvent;
use crate::error::{Error, Result};
use crate::filename::Filename;
use crate::node::Node;
use crate::perm::Perm;

pub mod blkdebug;
pub mod cbw;
pub mod create;
pub mod file;
pub mod null;
pub mod qcow2;
pub mod raw;
#[cfg(test)]
mod tests;

/// A child a driver reaches through a slot the graph can re-point after open (an overlay
/// put in the child's place): each use takes one read lock and one reference count, and a
/// request keeps the node it took to its end.
#[derive(Debug)]
pub struct ChildSlot(RwLock<Arc<Node>>);

impl ChildSlot {
    /// A slot holding `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self(RwLock::new(node))
    }

    /// The child now.
    pub fn get(&self) -> Arc<Node> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `node` the child from now on.
    pub fn set(&self, node: Arc<Node>) {
        match self.0.write() {
            Ok(mut guard) => *guard = node,
            Err(poisoned) => *poisoned.into_inner() = node,
        }
    }

    /// [`BlockDriver::replace_child`] for a driver whose only child is this one, named
    /// `own`.
    pub fn replace(&self, own: &str, role_name: &str, node: Arc<Node>) -> Result<()> {
        if role_name != own {
            return Err(Error::OperationNotSupported);
        }
        self.set(node);
        Ok(())
    }
}

/// Flags of a data write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is on stable storage when the write completes.
    pub fua: bool,
}

/// Flags of a write-zeroes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated instead of written (a hole reads as zeroes).
    pub may_unmap: bool,
    /// Fail with `ENOTSUP` rather than writing a buffer of zeroes.
    pub no_fallback: bool,
    /// Force unit access.
    pub fua: bool,
}

/// Allocation status of a run of bytes starting at the queried offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The range holds data (not a hole).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// The range is allocated at this layer (as opposed to coming from a backing file).
    pub allocated: bool,
    /// Length of the run; at least 1 and at most the queried length.
    pub len: u64,
}

/// `format-specific` part of the image info, per driver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatSpecific {
    /// `{"type": "file", "data": {}}`.
    File,
    /// `{"type": "qcow2", "data": {...}}`.
    Qcow2(Qcow2Info),
}

/// `ImageInfoSpecificQCow2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Info {
    /// `0.10` (v2) or `1.1` (v3).
    pub compat: &'static str,
    /// The external data file's name, if any.
    pub data_file: Option<String>,
    /// Whether the data file is a raw image (v3 with a data file only).
    pub data_file_raw: Option<bool>,
    /// v3 only.
    pub extended_l2: Option<bool>,
    /// v3 only.
    pub lazy_refcounts: Option<bool>,
    /// v3 only.
    pub corrupt: Option<bool>,
    pub refcount_bits: u32,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// The image's persistent bitmaps: name, granularity and flags (`in-use`, `auto`).
    pub bitmaps: Vec<(String, u64, Vec<&'static str>)>,
}

/// Image details a driver contributes to `query-named-block-nodes`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverInfo {
    /// Bytes allocated on the host (`st_blocks * 512`), when known.
    pub actual_size: Option<u64>,
    /// `dirty-flag`, when the format has one (file and raw show `false`).
    pub dirty_flag: Option<bool>,
    /// `format-specific`, when present.
    pub format_specific: Option<FormatSpecific>,
    /// `cluster-size`, for formats with clusters.
    pub cluster_size: Option<u64>,
    /// The backing file name as the image header stores it.
    pub backing_filename: Option<String>,
    /// That name resolved against the image's folder.
    pub full_backing_filename: Option<String>,
    /// The backing format the image header stores.
    pub backing_filename_format: Option<String>,
    /// Anonymous bitmaps the driver keeps (`dirty-bitmaps`; copy-before-write has three).
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
    /// Internal snapshots the image holds.
    pub snapshots: Vec<::qcow2::SnapshotInfo>,
}

/// One entry of `dirty-bitmaps`: an anonymous bitmap, not recording, not persistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyBitmapInfo {
    /// Bytes per bit.
    pub granularity: u64,
    /// Bytes set.
    pub count: u64,
}

/// What a node's driver can do. One implementation per QMP `driver` value.
#[async_trait]
pub trait BlockDriver: Send + Sync + fmt::Debug {
    /// The driver name as QMP spells it (`file`, `raw`, `null-co`).
    fn name(&self) -> &'static str;
    /// Whether the driver is a protocol (QEMU's drivers with a protocol name: `file`,
    /// `null-co`, `blkdebug`): a format node over a protocol node may show the child's plain
    /// filename as its own, over anything else it shows `json:{...}`.
    fn is_protocol(&self) -> bool {
        false
    }
    /// Current virtual size in bytes.
    fn size(&self) -> u64;
    /// Alignment requests must have to reach the host unchanged (1 = any).
    fn alignment(&self) -> u64 {
        1
    }
    /// Reads `buf.len()` bytes at `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `buf` at `offset`.
    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()>;
    /// Whether a write may run past the end and grow the node (a file does; its size then
    /// covers the write). Parent format drivers use it to append without a resize each time.
    fn grows_on_write(&self) -> bool {
        false
    }
    /// Whether the driver writes compressed clusters (QEMU: it has compressed writes), which
    /// backup's `compress` needs of its target.
    fn can_compress(&self) -> bool {
        false
    }
    /// Writes `buf` at `offset` compressed: `offset` is cluster aligned and `buf` whole
    /// clusters, the last one possibly ending at the end of the disk. A cluster that does not
    /// compress is written as it is.
    async fn write_compressed(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(Error::OperationNotSupported)
    }
    /// Makes `len` bytes at `offset` read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;
    /// Hints that `len` bytes at `offset` are no longer needed.
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes completed writes stable.
    async fn flush(&self) -> Result<()>;
    /// Status of the run starting at `offset` (at most `len` bytes).
    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;
    /// Changes the virtual size.
    async fn truncate(&self, size: u64) -> Result<()>;
    /// The node's filename and strong options.
    fn filename(&self) -> Filename;
    /// Extra image details for `query-named-block-nodes`.
    fn info(&self) -> DriverInfo {
        DriverInfo::default()
    }
    /// Checks that the node may hold `perm` while sharing `shared` (e.g. image locks of
    /// other processes); changes nothing.
    fn check_perm(&self, _perm: Perm, _shared: Perm) -> Result<()> {
        Ok(())
    }
    /// Records the node's new cumulative permissions (after `check_perm` passed).
    fn set_perm(&self, _perm: Perm, _shared: Perm) {}
    /// A debug event raised on this node (by the node itself, a parent or the block
    /// layer); only `blkdebug` acts on it.
    fn debug_event(&self, _event: DebugEvent) {}
    /// The point-in-time view a copy-before-write filter keeps, which `snapshot-access`
    /// nodes above it read.
    fn snapshot(&self) -> Option<Arc<cbw::CbwState>> {
        None
    }
    /// Whether the format can have a backing file, so one can be attached after open.
    fn supports_backing(&self) -> bool {
        false
    }
    /// Reads unallocated ranges from `backing` from now on (with `None`, from nothing):
    /// the graph calls this with the node drained and the child edge in place.
    fn replace_backing(&self, _backing: Option<Arc<Node>>) -> Result<()> {
        Err(Error::BackingNotSupported)
    }
    /// Whether [`Self::replace_child`] can re-point child `role_name`: the graph asks
    /// before it changes anything.
    fn can_replace_child(&self, _role_name: &str) -> bool {
        false
    }
    /// Uses `node` as child `role_name` from now on (an overlay taking the child's place,
    /// or the child coming back when that is undone): the graph calls this with this node
    /// and the old child drained and the parent edge already on `node`.
    fn replace_child(&self, _role_name: &str, _node: Arc<Node>) -> Result<()> {
        Err(Error::OperationNotSupported)
    }
    /// Whether the driver implements `x-blockdev-amend`.
    fn can_amend(&self) -> bool {
        false
    }
    /// `x-blockdev-amend`: makes the changes the driver's branch of
    /// `BlockdevAmendOptions` (`options`, already checked against the schema) asks for.
    async fn amend(&self, _options: &serde_json::Value, _force: bool) -> Result<()> {
        Err(Error::AmendNotSupported)
    }
    /// Whether a persistent bitmap of `granularity` bytes could be stored in the image
    /// (QEMU's `can_store_new_dirty_bitmap`); `None` when the format stores no bitmaps.
    fn can_store_bitmap(
        &self,
        _name: &str,
        _granularity: u64,
    ) -> Option<std::result::Result<(), String>> {
        None
    }
    /// The persistent bitmaps the image holds, handed over once after open (the node tracks
    /// writes in them from then on).
    async fn take_persistent_bitmaps(&self) -> Vec<crate::dirty::PersistentBitmap> {
        Vec::new()
    }
    /// Stores `bitmaps` in the image (replacing those of the same names); called when the
    /// node closes.
    async fn store_persistent_bitmaps(
        &self,
        _bitmaps: &[crate::dirty::PersistentBitmap],
    ) -> Result<()> {
        Ok(())
    }
    /// Deletes the persistent bitmap `name` from the image, if it is there.
    async fn remove_persistent_bitmap(&self, _name: &str) -> Result<()> {
        Ok(())
    }
    /// Whether the format keeps internal snapshots (QEMU's `bdrv_can_snapshot`).
    fn can_snapshot(&self) -> bool {
        false
    }
    /// The internal snapshots, in table order.
    fn snapshot_list(&self) -> Vec<::qcow2::SnapshotInfo> {
        Vec::new()
    }
    /// Takes an internal snapshot called `name` holding `vm_state` as its VM state
    /// (empty for a disk-only snapshot); the caller drained the node.
    async fn snapshot_create(
        &self,
        _name: &str,
        _vm_state: &[u8],
    ) -> Result<::qcow2::SnapshotInfo> {
        Err(Error::OperationNotSupported)
    }
    /// Makes the disk what it was when snapshot `id` was taken (the caller drained the
    /// node); the snapshot stays.
    async fn snapshot_revert(&self, _id: &str) -> Result<::qcow2::SnapshotInfo> {
        Err(Error::OperationNotSupported)
    }
    /// Reads `buf.len()` bytes of snapshot `id`'s VM state from its start.
    async fn snapshot_vm_state(&self, _id: &str, _buf: &mut [u8]) -> Result<()> {
        Err(Error::OperationNotSupported)
    }
    /// Deletes the internal snapshot matching `id` and `name` (QEMU's rules); returns it.
    async fn snapshot_delete(
        &self,
        _id: Option<&str>,
        _name: Option<&str>,
    ) -> Result<::qcow2::SnapshotInfo> {
        Err(Error::OperationNotSupported)
    }
    /// Writes back what the driver keeps in memory and leaves the image consistent
    /// (clean) on its storage; called once, when the node leaves the graph.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
