//! `qcow2`: the format driver over the `qcow2` library.
//!
//! The image lives on the `file` child (and, for images with an external data file, on
//! the `data-file` child); both are reached through [`NodeStorage`], which reads zeroes
//! past a child's end and grows it for writes past its end, as the library expects. Both
//! can be re-pointed after open (an overlay put in the child's place by an external
//! snapshot): each storage call takes its node once.
//! Ranges the image does not allocate are read from the `backing` child (zeroes past its
//! end, or without one); partial-cluster writes copy from it through [`BackingReader`].
//!
//! The graph opens the children; this module opens the image over them, and
//! [`Qcow2Driver::close`] leaves it clean (dirty bit cleared) when the node goes away.

use async_trait::async_trait;
use serde_json::{Map, Value};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use super::{
    BlockDriver, ChildSlot, DriverInfo, Extent, FormatSpecific, Qcow2Info, WriteFlags, ZeroFlags,
};
use crate::debug::DebugEvent;
use crate::error::{Errno, Error, Result};
use crate::filename::Filename;
use crate::node::Node;
use crate::options::Qcow2Options;

/// How much of cluster 0 is read to parse the header (the largest cluster size).
const MAX_CLUSTER_BYTES: u64 = 2 << 20;
/// Offset of `cluster_bits` in the header.
const HEADER_CLUSTER_BITS: usize = 20;

/// A child node seen as the library's byte storage.
pub struct NodeStorage {
    node: ChildSlot,
    /// Ignore requests to shrink (`blockdev-create` writes a new image over whatever
    /// the node holds and, as QEMU, leaves the old tail in place).
    never_shrink: bool,
    /// Serializes growing, so two writes past the end never shrink each other's growth.
    grow: tokio::sync::Mutex<()>,
}

impl NodeStorage {
    /// Storage over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self {
            node: ChildSlot::new(node),
            never_shrink: false,
            grow: tokio::sync::Mutex::new(()),
        }
    }

    /// Storage over `node` that only ever grows it.
    pub fn growing_only(node: Arc<Node>) -> Self {
        Self {
            never_shrink: true,
            ..Self::new(node)
        }
    }

    /// The node now.
    pub fn node(&self) -> Arc<Node> {
        self.node.get()
    }
}

fn io_error(err: Error) -> io::Error {
    match err {
        Error::Io(e) => e,
        other => match other.errno() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::other(other.to_string()),
        },
    }
}

#[async_trait]
impl qcow2::Storage for NodeStorage {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let node = self.node.get();
        node.read_padded(offset, buf).await.map_err(io_error)
    }

    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let node = self.node.get();
        if node.write_growing(offset, buf).await.map_err(io_error)? {
            return Ok(());
        }
        {
            let _growing = self.grow.lock().await;
            if end > node.size() {
                node.truncate(end).await.map_err(io_error)?;
            }
        }
        node.write(offset, buf, WriteFlags::default())
            .await
            .map_err(io_error)
    }

    async fn flush(&self) -> io::Result<()> {
        self.node.get().flush().await.map_err(io_error)
    }

    async fn len(&self) -> io::Result<u64> {
        Ok(self.node.get().size())
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        let _growing = self.grow.lock().await;
        let node = self.node.get();
        if self.never_shrink && len <= node.size() {
            return Ok(());
        }
        node.truncate(len).await.map_err(io_error)
    }
}

/// The backing child as the library's copy-on-write source.
struct BackingReader(Arc<Node>);

#[async_trait]
impl qcow2::Backing for BackingReader {
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_padded(offset, buf).await.map_err(io_error)
    }
}

/// A library error as one message: the error and its causes, joined by ": ".
pub(crate) fn format_error(err: qcow2::Error) -> Error {
    use std::error::Error as _;
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let part = match cause.downcast_ref::<io::Error>() {
            Some(e) => Errno(e).to_string(),
            None => cause.to_string(),
        };
        text.push_str(": ");
        text.push_str(&part);
        source = cause.source();
    }
    Error::Format(text)
}

/// Reads and parses the header through `file`, without opening the image.
pub async fn read_header(file: &Arc<Node>) -> Result<qcow2::Header> {
    let mut first = vec![0u8; 512];
    file.read_padded(0, &mut first).await?;
    let bits = first
        .get(HEADER_CLUSTER_BITS..HEADER_CLUSTER_BITS + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_be_bytes);
    let cluster = 1u64
        .checked_shl(bits)
        .unwrap_or(0)
        .clamp(512, MAX_CLUSTER_BYTES);
    let mut cluster0 = vec![0u8; usize::try_from(cluster).unwrap_or(512)];
    file.read_padded(0, &mut cluster0).await?;
    qcow2::Header::parse(&cluster0).map_err(format_error)
}

/// `name` (a backing or data file name from a header) resolved against the folder of
/// the image whose filename is `image`, as QEMU combines them.
pub fn resolve_relative(image: Option<&str>, name: &str) -> Option<String> {
    if name.starts_with('/') {
        return Some(name.to_string());
    }
    let image = image?;
    if image.starts_with("json:") {
        return None;
    }
    match Path::new(image).parent() {
        Some(dir) if image.contains('/') => Some(dir.join(name).to_string_lossy().into_owned()),
        _ => Some(name.to_string()),
    }
}

/// Whether a backing child given by the user (`backing` in the options, or attached later)
/// differs from the file the header names as `named`: with none, whether the header names
/// one at all.
pub(crate) fn backing_overridden(named: Option<&str>, backing: Option<&Node>) -> bool {
    match backing {
        Some(node) => named != Some(node.filename().as_str()),
        None => named.is_some(),
    }
}

/// Checks the cache options as QEMU does and works out the L2 cache size in bytes.
fn l2_cache_bytes(opts: &Qcow2Options) -> Result<u64> {
    let bad = |m: &str| Err(Error::FormatOption(m.to_string()));
    let (total, l2, rc) = (
        opts.cache_size,
        opts.l2_cache_size,
        opts.refcount_cache_size,
    );
    if total.is_some() && l2.is_some() && rc.is_some() {
        return bad(
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
        );
    }
    if let (Some(total), Some(l2)) = (total, l2) {
        if l2 > total {
            return bad("l2-cache-size may not exceed cache-size");
        }
    }
    if let (Some(total), Some(rc)) = (total, rc) {
        if rc > total {
            return bad("refcount-cache-size may not exceed cache-size");
        }
    }
    let chosen = l2.or(total).map_or(qcow2::DEFAULT_L2_CACHE_BYTES, |v| {
        u64::try_from(v).unwrap_or(0)
    });
    Ok(chosen.min(qcow2::DEFAULT_L2_CACHE_BYTES))
}

/// The backing child as the driver sees it.
#[derive(Clone, Default)]
struct Backing {
    node: Option<Arc<Node>>,
    /// The backing child differs from what the header names (or was suppressed):
    /// the filename then shows it in `json:{...}`.
    overridden: bool,
}

/// The `qcow2` driver.
pub struct Qcow2Driver {
    image: qcow2::Image,
    /// The `file` child, shared with the image as its storage.
    file: Arc<NodeStorage>,
    /// The `data-file` child of an image with an external data file, likewise.
    data_file: Option<Arc<NodeStorage>>,
    /// Set at open; an overlay added without one gets it later (`blockdev-snapshot`).
    /// Requests take a clone of the node once, so a swap under a drain is safe.
    backing: RwLock<Backing>,
    header: Mutex<qcow2::Header>,
    /// The bitmap directory as last read (for `format-specific`).
    bitmap_dir: Mutex<Vec<qcow2::BitmapInfo>>,
    /// The snapshot table as last read (for `snapshots` in the image info).
    snapshot_list: Mutex<Vec<qcow2::SnapshotInfo>>,
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("file", &self.file.node().name())
            .field(
                "backing",
                &self.backing_node().map(|b| b.name().to_string()),
            )
            .finish()
    }
}

impl Qcow2Driver {
    /// Opens the image on `file` (and `data_file`); the backing child comes later
    /// through [`Qcow2Driver::set_backing`].
    pub async fn open(
        file: Arc<Node>,
        data_file: Option<Arc<Node>>,
        opts: &Qcow2Options,
        header: &qcow2::Header,
        read_only: bool,
    ) -> Result<Self> {
        if let Some(format) = opts
            .encrypt
            .as_ref()
            .and_then(|e| e.get("format"))
            .and_then(Value::as_str)
        {
            return Err(Error::FormatOption(format!(
                "No encryption in image header, but options specified format '{format}'"
            )));
        }
        if opts.data_file.is_some() && !header.has_data_file() {
            return Err(Error::FormatOption(
                "'data-file' can only be set for images with an external data file".into(),
            ));
        }
        let l2_cache_bytes = l2_cache_bytes(opts)?;
        let data_file = data_file.map(|node| Arc::new(NodeStorage::new(node)));
        let data = data_file.clone().map(|d| -> Arc<dyn qcow2::Storage> { d });
        let file = Arc::new(NodeStorage::new(file));
        let image = qcow2::Image::open(
            file.clone(),
            qcow2::OpenOptions {
                read_only,
                l2_cache_bytes,
                lazy_refcounts: opts.lazy_refcounts,
                data_file: data,
                ..qcow2::OpenOptions::default()
            },
        )
        .await
        .map_err(format_error)?;
        let header = image.header().await;
        let bitmap_dir = image.bitmaps().await;
        let snapshot_list = image.snapshots().await;
        Ok(Self {
            image,
            file,
            data_file,
            backing: RwLock::new(Backing::default()),
            header: Mutex::new(header),
            bitmap_dir: Mutex::new(bitmap_dir),
            snapshot_list: Mutex::new(snapshot_list),
        })
    }

    /// Attaches the backing node (before the driver is shared); `overridden` when it is
    /// not the one the header names (or `None` although the header names one).
    pub fn set_backing(&mut self, backing: Option<Arc<Node>>, overridden: bool) {
        let slot = self.backing.get_mut().unwrap_or_else(|e| e.into_inner());
        *slot = Backing {
            node: backing,
            overridden,
        };
    }

    fn backing_state(&self) -> Backing {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The backing node now (one lock and one reference count per request).
    fn backing_node(&self) -> Option<Arc<Node>> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .node
            .clone()
    }

    /// The header as of the last open, flush or close.
    fn header(&self) -> qcow2::Header {
        match self.header.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    async fn refresh_header(&self) {
        let header = self.image.header().await;
        match self.header.lock() {
            Ok(mut guard) => *guard = header,
            Err(poisoned) => *poisoned.into_inner() = header,
        }
        let dir = self.image.bitmaps().await;
        *self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner()) = dir;
        let list = self.image.snapshots().await;
        *self.snapshot_list.lock().unwrap_or_else(|e| e.into_inner()) = list;
    }

    fn backing_reader(&self) -> Option<BackingReader> {
        self.backing_node().map(BackingReader)
    }

    /// The storage of child `role_name`, if the driver has one that can be re-pointed.
    fn storage(&self, role_name: &str) -> Option<&NodeStorage> {
        match role_name {
            "file" => Some(&self.file),
            "data-file" => self.data_file.as_deref(),
            _ => None,
        }
    }
}

#[async_trait]
impl BlockDriver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.image.size()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // Debug events go to the `file` child at request granularity (QEMU raises them
        // per cluster run, just before the data I/O).
        self.file.node().debug_event(DebugEvent::ReadAio);
        let holes = self.image.read(offset, buf).await.map_err(format_error)?;
        if holes.is_empty() {
            return Ok(());
        }
        let Some(backing) = self.backing_node() else {
            return Ok(());
        };
        self.file.node().debug_event(DebugEvent::ReadBackingAio);
        for hole in holes {
            let (Ok(start), Ok(end)) = (
                usize::try_from(hole.start.saturating_sub(offset)),
                usize::try_from(hole.end.saturating_sub(offset)),
            ) else {
                continue;
            };
            if let Some(part) = buf.get_mut(start..end) {
                backing.read_padded(hole.start, part).await?;
            }
        }
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.file.node().debug_event(DebugEvent::WriteAio);
        let reader = self.backing_reader();
        let backing = reader.as_ref().map(|r| r as &dyn qcow2::Backing);
        self.image
            .write(offset, buf, backing)
            .await
            .map_err(format_error)?;
        if flags.fua {
            self.image.flush().await.map_err(format_error)?;
        }
        Ok(())
    }

    fn can_compress(&self) -> bool {
        true
    }

    async fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        // One cluster at a time, as the format stores them.
        let cs = self.image.cluster_size() as usize;
        for (i, cluster) in buf.chunks(cs).enumerate() {
            self.file.node().debug_event(DebugEvent::WriteCompressed);
            self.image
                .write_compressed(offset + (i * cs) as u64, cluster)
                .await
                .map_err(format_error)?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let reader = self.backing_reader();
        let backing = reader.as_ref().map(|r| r as &dyn qcow2::Backing);
        self.image
            .write_zeroes(offset, len, flags.may_unmap, backing)
            .await
            .map_err(format_error)?;
        if flags.fua {
            self.image.flush().await.map_err(format_error)?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.image
            .discard(offset, len, self.backing_node().is_some())
            .await
            .map_err(format_error)
    }

    async fn flush(&self) -> Result<()> {
        self.image.flush().await.map_err(format_error)?;
        self.refresh_header().await;
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let status = self
            .image
            .block_status(offset, len)
            .await
            .map_err(format_error)?;
        let (data, zero, allocated) = match status.kind {
            qcow2::BlockKind::Data { .. } | qcow2::BlockKind::Compressed => (true, false, true),
            qcow2::BlockKind::Zero => (false, true, true),
            qcow2::BlockKind::Unallocated => (false, self.backing_node().is_none(), false),
        };
        Ok(Extent {
            data,
            zero,
            allocated,
            len: status.len,
        })
    }

    async fn truncate(&self, size: u64) -> Result<()> {
        self.image.truncate(size).await.map_err(format_error)?;
        self.refresh_header().await;
        Ok(())
    }

    fn filename(&self) -> Filename {
        let file = self.file.node();
        let child = file.driver().filename();
        let mut options = Map::new();
        options.insert("driver".into(), Value::from("qcow2"));
        options.insert("file".into(), Value::Object(child.options));
        let backing = self.backing_state();
        if backing.overridden {
            let node = match &backing.node {
                Some(node) => Value::Object(node.driver().filename().options),
                None => Value::Null,
            };
            options.insert("backing".into(), node);
        }
        Filename {
            exact: if backing.overridden || !file.driver().is_protocol() {
                None
            } else {
                child.exact
            },
            options,
        }
    }

    fn can_store_bitmap(
        &self,
        _name: &str,
        _granularity: u64,
    ) -> Option<std::result::Result<(), String>> {
        if self.header().version < 3 {
            return Some(Err("Cannot store dirty bitmaps in qcow2 v2 files".into()));
        }
        Some(Ok(()))
    }

    fn info(&self) -> DriverInfo {
        let header = self.header();
        let v3 = header.version >= 3;
        let compression_type = match header.compression_type {
            qcow2::CompressionType::Deflate => "zlib",
            qcow2::CompressionType::Zstd => "zstd",
        };
        let data_file_raw = header.autoclear_features & qcow2::autoclear::DATA_FILE_RAW != 0;
        let specific = Qcow2Info {
            compat: if v3 { "1.1" } else { "0.10" },
            data_file: header.extensions.data_file.clone(),
            data_file_raw: (v3 && header.has_data_file()).then_some(data_file_raw),
            extended_l2: v3.then_some(header.has_extended_l2()),
            lazy_refcounts: v3.then_some(header.has_lazy_refcounts()),
            corrupt: v3.then_some(header.is_corrupt()),
            refcount_bits: header.refcount_bits(),
            compression_type,
            bitmaps: self
                .bitmap_dir
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.in_use {
                        flags.push("in-use");
                    }
                    if b.enabled {
                        flags.push("auto");
                    }
                    (b.name.clone(), b.granularity.bytes(), flags)
                })
                .collect(),
        };
        let file = self.file.node();
        let own_name = file.driver().filename().exact;
        let full = header
            .backing_file
            .as_deref()
            .and_then(|name| resolve_relative(own_name.as_deref(), name));
        DriverInfo {
            actual_size: file.driver().info().actual_size,
            dirty_flag: Some(header.is_dirty()),
            format_specific: Some(FormatSpecific::Qcow2(specific)),
            cluster_size: Some(self.image.cluster_size()),
            backing_filename: header.backing_file.clone(),
            full_backing_filename: full,
            backing_filename_format: header.extensions.backing_format.clone(),
            dirty_bitmaps: Vec::new(),
            snapshots: self
                .snapshot_list
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn supports_backing(&self) -> bool {
        true
    }

    /// As at open with `backing` given: overridden unless the node is the file the header
    /// names (with none, unless the header names none).
    fn replace_backing(&self, backing: Option<Arc<Node>>) -> Result<()> {
        let overridden =
            backing_overridden(self.header().backing_file.as_deref(), backing.as_deref());
        let mut slot = self.backing.write().unwrap_or_else(|e| e.into_inner());
        *slot = Backing {
            node: backing,
            overridden,
        };
        Ok(())
    }

    fn can_replace_child(&self, role_name: &str) -> bool {
        self.storage(role_name).is_some()
    }

    /// The image's metadata stays cached: the new node shows the same bytes (an overlay
    /// over the old child reads through to it).
    fn replace_child(&self, role_name: &str, node: Arc<Node>) -> Result<()> {
        let storage = self
            .storage(role_name)
            .ok_or(Error::OperationNotSupported)?;
        storage.node.set(node);
        Ok(())
    }

    fn can_amend(&self) -> bool {
        true
    }

    /// QMP's qcow2 branch has one member, `encrypt` (LUKS key slots). The format library
    /// opens only images without encryption, so any `encrypt` is refused as QEMU refuses
    /// it on a plain image, and an amend without it changes nothing. (`qemu-img amend`'s
    /// compat, refcount_bits, lazy_refcounts, size, backing and data file options are not
    /// in QMP.)
    async fn amend(&self, options: &Value, _force: bool) -> Result<()> {
        if options.get("encrypt").is_some() {
            return Err(Error::FormatOption(
                "image is not encrypted, can't amend".into(),
            ));
        }
        Ok(())
    }

    async fn take_persistent_bitmaps(&self) -> Vec<crate::dirty::PersistentBitmap> {
        self.image
            .take_bitmaps()
            .await
            .into_iter()
            .map(|b| crate::dirty::PersistentBitmap {
                name: b.name,
                enabled: b.enabled,
                inconsistent: b.inconsistent,
                bits: b.bitmap,
            })
            .collect()
    }

    async fn store_persistent_bitmaps(
        &self,
        bitmaps: &[crate::dirty::PersistentBitmap],
    ) -> Result<()> {
        let store: Vec<qcow2::StoreBitmap<'_>> = bitmaps
            .iter()
            .map(|b| qcow2::StoreBitmap {
                name: &b.name,
                enabled: b.enabled,
                bitmap: &b.bits,
            })
            .collect();
        let result = self.image.store_bitmaps(&store).await.map_err(format_error);
        self.refresh_header().await;
        result
    }

    fn can_snapshot(&self) -> bool {
        true
    }

    fn snapshot_list(&self) -> Vec<qcow2::SnapshotInfo> {
        self.snapshot_list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn snapshot_revert(&self, id: &str) -> Result<qcow2::SnapshotInfo> {
        let result = self.image.revert_snapshot(id).await.map_err(format_error);
        self.refresh_header().await;
        result
    }

    async fn snapshot_vm_state(&self, id: &str, buf: &mut [u8]) -> Result<()> {
        self.image
            .read_vm_state(id, 0, buf)
            .await
            .map_err(format_error)
    }

    async fn snapshot_create(&self, name: &str, vm_state: &[u8]) -> Result<qcow2::SnapshotInfo> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // blockd runs no guest: the VM clock is the wall clock, as qemu-storage-daemon's.
        let mut new = qcow2::NewSnapshot::new(name);
        new.vm_state = vm_state;
        new.date_sec = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        new.date_nsec = now.subsec_nanos();
        new.vm_clock_nsec = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let result = self.image.create_snapshot(&new).await.map_err(format_error);
        self.refresh_header().await;
        result
    }

    async fn snapshot_delete(
        &self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<qcow2::SnapshotInfo> {
        let result = self
            .image
            .delete_snapshot(id, name)
            .await
            .map_err(format_error);
        self.refresh_header().await;
        result
    }

    async fn remove_persistent_bitmap(&self, name: &str) -> Result<()> {
        let result = self
            .image
            .remove_bitmap(name)
            .await
            .map(|_| ())
            .map_err(format_error);
        self.refresh_header().await;
        result
    }

    async fn close(&self) -> Result<()> {
        let result = self.image.close().await.map_err(format_error);
        self.refresh_header().await;
        result
    }
}

/// `blockdev-create` for `qcow2`: checks the options in QEMU's order and words, then
/// writes a new image on `file` (and sizes `data_file`), as `qemu-img create` lays it out.
pub async fn create(
    file: Arc<Node>,
    data_file: Option<Arc<Node>>,
    opts: &crate::options::Qcow2CreateOptions,
) -> Result<()> {
    let create = create_options(opts, data_file.as_ref().map(|d| d.filename()))?;
    let storage: Arc<dyn qcow2::Storage> = Arc::new(NodeStorage::growing_only(file));
    let data: Option<Arc<dyn qcow2::Storage>> = match data_file {
        Some(node) => Some(Arc::new(NodeStorage::growing_only(node))),
        None => None,
    };
    qcow2::create(storage, data, &create)
        .await
        .map_err(format_error)
}

/// The library's create options from QMP's, refused as QEMU refuses them.
fn create_options(
    opts: &crate::options::Qcow2CreateOptions,
    data_file: Option<String>,
) -> Result<qcow2::CreateOptions> {
    use crate::options::{PreallocMode, Qcow2CompressionType, Qcow2Version};
    let bad = |m: &str| Err(Error::FormatOption(m.to_string()));
    let v3_only = |what: &str| {
        Err(Error::FormatOption(format!(
            "{what} only supported with compatibility level 1.1 and above (use version=v3 or greater)"
        )))
    };
    if !opts.size.is_multiple_of(512) {
        return bad("Image size must be a multiple of 512 bytes");
    }
    let v3 = opts.version != Some(Qcow2Version::V2);
    let extended_l2 = opts.extended_l2.unwrap_or(false);
    let cluster_size = opts.cluster_size.unwrap_or(64 << 10);
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return bad("Cluster size must be a power of two between 512 and 2048k");
    }
    if extended_l2 {
        if !v3 {
            return v3_only("Extended L2 entries are");
        }
        if cluster_size < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
    }
    let lazy_refcounts = opts.lazy_refcounts.unwrap_or(false);
    if lazy_refcounts && !v3 {
        return v3_only("Lazy refcounts");
    }
    let refcount_bits = opts.refcount_bits.unwrap_or(16);
    if !(1..=64).contains(&refcount_bits) || refcount_bits.count_ones() != 1 {
        return bad("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if !v3 && refcount_bits != 16 {
        return bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
    }
    if data_file.is_some() && !v3 {
        return v3_only("External data files are");
    }
    let data_file_raw = opts.data_file_raw.unwrap_or(false);
    if data_file_raw && data_file.is_none() {
        return bad("data-file-raw requires data-file");
    }
    if data_file_raw && opts.backing_file.is_some() {
        return bad("Backing file and data-file-raw cannot be used at the same time");
    }
    let compression_type = match opts.compression_type {
        Some(Qcow2CompressionType::Zstd) if !v3 => return v3_only("Non-zlib compression type is"),
        Some(Qcow2CompressionType::Zstd) => qcow2::CompressionType::Zstd,
        _ => qcow2::CompressionType::Deflate,
    };
    let preallocation = match opts.preallocation.unwrap_or_default() {
        PreallocMode::Off => qcow2::Preallocation::Off,
        PreallocMode::Metadata => qcow2::Preallocation::Metadata,
        PreallocMode::Falloc => qcow2::Preallocation::Falloc,
        PreallocMode::Full => qcow2::Preallocation::Full,
    };
    if opts.backing_file.is_some() && preallocation != qcow2::Preallocation::Off && !extended_l2 {
        return bad(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        );
    }
    if opts.backing_fmt.is_some() && opts.backing_file.is_none() {
        return bad("Backing format cannot be used without backing file");
    }
    if opts.encrypt.is_some() {
        return bad("blockd does not create encrypted qcow2 images");
    }
    Ok(qcow2::CreateOptions {
        size: opts.size,
        version: if v3 { 3 } else { 2 },
        cluster_size,
        refcount_bits: u32::try_from(refcount_bits).unwrap_or(16),
        lazy_refcounts,
        extended_l2,
        compression_type,
        backing_file: opts.backing_file.clone(),
        backing_fmt: opts.backing_fmt.clone(),
        data_file,
        data_file_raw,
        preallocation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names_resolve_against_the_image_folder() {
        assert_eq!(
            resolve_relative(Some("/d/top.qcow2"), "base.qcow2").as_deref(),
            Some("/d/base.qcow2")
        );
        assert_eq!(
            resolve_relative(Some("/d/top.qcow2"), "/e/b.qcow2").as_deref(),
            Some("/e/b.qcow2")
        );
        assert_eq!(
            resolve_relative(Some("top.qcow2"), "b.qcow2").as_deref(),
            Some("b.qcow2")
        );
        assert_eq!(resolve_relative(Some("json:{}"), "b.qcow2"), None);
    }
}
