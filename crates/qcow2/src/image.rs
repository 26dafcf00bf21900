//! An open image: the header, the active L1 table, the L2 cache and the refcounts behind one
//! async mutex, plus the storages the data lives on.
//!
//! State: `Meta` is the only mutable state. Its L2 tables and refcount blocks are cached
//! write-back: updates change the caches, and [`Image::writeback`] writes them out in the
//! order crash safety needs (refcount blocks, a flush, L2 tables, a flush, then the deferred
//! refcount decrements), on flush, on close and when a dirty L2 table would be evicted.
//! Requests hold the lock only to map and to update metadata, never across guest data I/O:
//! an in-place write pins its host cluster and writes unlocked; a write that changes its
//! cluster's L2 entry marks the guest cluster as in flight (`Meta::inflight`) so every other
//! request that would change that entry waits for it. Reads take the lock only to map an
//! offset. The dirty bit is set (synced) before the first metadata update when lazy refcounts
//! are on, and cleared by [`Image::close`] after everything is flushed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard};

use crate::bitmap_dir::DirEntry;
use crate::bitmap_ext::{BitmapTracking, LoadedBitmap};
use crate::error::{Error, IoContext, Result};
use crate::header::{self, autoclear, incompat, CompressionType, Header, MAX_HOST_OFFSET};
use crate::l2::{
    words_from_be, words_to_be, Geometry, L2Cache, L2Table, L1_OFFSET_MASK, L1_RESERVED_MASK,
};
use crate::refcount::{OffsetHash, Refcounts};
use crate::storage::Storage;

/// QEMU's default maximum L2 cache on Linux (`DEFAULT_L2_CACHE_MAX_SIZE`, 32 MiB).
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;
/// Header offset of `incompatible_features`.
pub(crate) const HEADER_INCOMPAT: u64 = 72;
/// Header offset of `autoclear_features`.
pub(crate) const HEADER_AUTOCLEAR: u64 = 88;

/// How to open an image.
#[derive(Clone)]
pub struct OpenOptions {
    /// Refuse every write.
    pub read_only: bool,
    /// Bytes of L2 tables to cache (QEMU's `l2-cache-size`).
    pub l2_cache_bytes: u64,
    /// Defer refcount updates behind the dirty bit; `None` follows the image's feature bit.
    pub lazy_refcounts: Option<bool>,
    /// The external data file, for images that have one.
    pub data_file: Option<Arc<dyn Storage>>,
    /// How a read-write open keeps persistent bitmaps safe from writes.
    pub bitmap_tracking: BitmapTracking,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            lazy_refcounts: None,
            data_file: None,
            bitmap_tracking: BitmapTracking::default(),
        }
    }
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("read_only", &self.read_only)
            .field("l2_cache_bytes", &self.l2_cache_bytes)
            .field("lazy_refcounts", &self.lazy_refcounts)
            .field("data_file", &self.data_file.is_some())
            .field("bitmap_tracking", &self.bitmap_tracking)
            .finish()
    }
}

/// Mutable metadata, behind [`Image::meta`].
pub(crate) struct Meta {
    pub header: Header,
    pub l1: Vec<u64>,
    pub l2: L2Cache,
    pub rc: Refcounts,
    /// The dirty bit is set on disk by us and must be cleared on close.
    pub dirty_marked: bool,
    /// Next free byte of the host cluster compressed clusters are being packed into (0: none).
    pub compress_tail: u64,
    /// Host clusters that lose one reference once the L2 tables that dropped it are durable
    /// (applied by [`Image::writeback`]).
    pub pending_unref: Vec<u64>,
    /// Guest clusters whose L2 entry a request is changing with the lock released; the
    /// request holds the mutex until it has updated the entry (see [`Image::wait_idle`]).
    pub inflight: HashMap<u64, Arc<Mutex<()>>, OffsetHash>,
    /// The bitmap directory as it is on disk (empty without a valid bitmaps extension).
    pub bitmaps: Vec<DirEntry>,
    /// Bitmaps loaded on open, until the caller takes them.
    pub loaded: Vec<LoadedBitmap>,
    /// The snapshot table as it is on disk.
    pub snapshots: Vec<crate::snapshot_table::Entry>,
    /// Bytes the snapshot table takes at `header.snapshots_offset`.
    pub snapshots_bytes: u64,
}

/// An open qcow2 image.
pub struct Image {
    pub(crate) file: Arc<dyn Storage>,
    pub(crate) data_file: Option<Arc<dyn Storage>>,
    pub(crate) geo: Geometry,
    pub(crate) compression: CompressionType,
    pub(crate) read_only: bool,
    pub(crate) lazy: bool,
    pub(crate) size: AtomicU64,
    pub(crate) meta: Mutex<Meta>,
    /// A write found corrupt metadata and marked the image corrupt: writes are refused.
    pub(crate) corrupt: AtomicBool,
    /// Some bitmap is stored with `in_use` clear: the next write must mark it in use first.
    pub(crate) bitmaps_unmarked: AtomicBool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("geo", &self.geo)
            .field("read_only", &self.read_only)
            .field("size", &self.size)
            .finish()
    }
}

/// A table must start inside the file (its tail may run past the unpadded last cluster).
pub(crate) fn check_in_file(
    table: &'static str,
    offset: u64,
    bytes: u64,
    file_len: u64,
    cs: u64,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let end = offset.saturating_add(bytes);
    if offset >= file_len || end > file_len.div_ceil(cs).saturating_mul(cs) {
        return Err(Error::PastEof {
            table,
            offset,
            file_len,
        });
    }
    Ok(())
}

impl Image {
    /// Open the image on `file`.
    pub async fn open(file: Arc<dyn Storage>, opts: OpenOptions) -> Result<Image> {
        let file_len = file.len().await.ctx("cannot get the image size")?;
        let mut first = vec![0u8; 512];
        file.read_at(0, &mut first)
            .await
            .ctx("cannot read the image header")?;
        if file_len < u64::from(header::V2_HEADER_LEN) {
            return Err(Error::Truncated(file_len));
        }
        let cluster_bits = header::peek_cluster_bits(&first)?;
        let cs = 1u64 << cluster_bits;
        let mut cluster0 = vec![0u8; cs as usize];
        file.read_at(0, &mut cluster0)
            .await
            .ctx("cannot read the image header")?;
        let header = Header::parse(&cluster0)?;
        if !opts.read_only && header.is_corrupt() {
            return Err(Error::CorruptReadWrite);
        }
        let has_raw = header.autoclear_features & autoclear::DATA_FILE_RAW != 0;
        if has_raw && !header.has_data_file() {
            return Err(Error::Invalid("data-file-raw requires a data file".into()));
        }
        if header.has_data_file() && opts.data_file.is_none() {
            return Err(Error::NoDataFile);
        }
        let l1_bytes = u64::from(header.l1_size) * 8;
        check_in_file("L1 table", header.l1_table_offset, l1_bytes, file_len, cs)?;
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        check_in_file(
            "Reference count table",
            header.refcount_table_offset,
            rt_bytes,
            file_len,
            cs,
        )?;
        if header.nb_snapshots > 0 && header.snapshots_offset >= file_len {
            return Err(Error::PastEof {
                table: "Snapshot table",
                offset: header.snapshots_offset,
                file_len,
            });
        }
        let lazy = opts.lazy_refcounts.unwrap_or(header.has_lazy_refcounts());
        if lazy && header.version < 3 {
            return Err(Error::InvalidOption(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                    .into(),
            ));
        }
        let mut raw_l1 = vec![0u8; l1_bytes as usize];
        file.read_at(header.l1_table_offset, &mut raw_l1)
            .await
            .ctx("cannot read the L1 table")?;
        let mut rc = Refcounts::load(
            file.as_ref(),
            header.refcount_table_offset,
            header.refcount_table_clusters,
            header.refcount_order,
            cluster_bits,
        )
        .await?;
        if !opts.read_only {
            rc.check_blocks_in_file(file_len)?;
        }
        rc.protected = vec![
            (0, cs),
            (header.l1_table_offset, header.l1_table_offset + l1_bytes),
            (
                header.refcount_table_offset,
                header.refcount_table_offset + rt_bytes,
            ),
        ];
        let geo = Geometry {
            cluster_bits,
            extended: header.has_extended_l2(),
            data_file: header.has_data_file(),
        };
        let per_table = cs * geo.l2_entries();
        let needed = header.size.div_ceil(per_table).max(1) * cs;
        let l2_tables = (opts.l2_cache_bytes.min(needed) / cs).max(2);
        let image = Image {
            file,
            data_file: opts.data_file,
            geo,
            compression: header.compression_type,
            read_only: opts.read_only,
            lazy,
            size: AtomicU64::new(header.size),
            corrupt: AtomicBool::new(false),
            bitmaps_unmarked: AtomicBool::new(false),
            meta: Mutex::new(Meta {
                l1: words_from_be(&raw_l1),
                l2: L2Cache::new(usize::try_from(l2_tables).unwrap_or(usize::MAX)),
                rc,
                header,
                dirty_marked: false,
                compress_tail: 0,
                pending_unref: Vec::new(),
                inflight: HashMap::default(),
                bitmaps: Vec::new(),
                loaded: Vec::new(),
                snapshots: Vec::new(),
                snapshots_bytes: 0,
            }),
        };
        image.open_snapshots(&mut *image.meta.lock().await).await?;
        image
            .open_bitmaps(&mut *image.meta.lock().await, file_len)
            .await?;
        if !image.read_only {
            image.prepare_writable(opts.bitmap_tracking).await?;
        }
        Ok(image)
    }

    /// What a read-write open does before the first request: clear autoclear bits this library
    /// does not maintain, drop a bitmaps extension whose autoclear bit a program without bitmap
    /// support cleared (as QEMU does), repair a dirty image, and protect the bitmaps.
    async fn prepare_writable(&self, tracking: BitmapTracking) -> Result<()> {
        let mut meta = self.meta.lock().await;
        let h = &mut meta.header;
        let stale =
            h.extensions.bitmaps.is_some() && h.autoclear_features & autoclear::BITMAPS == 0;
        if stale {
            h.extensions.bitmaps = None;
        }
        let keep = autoclear::DATA_FILE_RAW
            | match h.extensions.bitmaps {
                Some(_) => autoclear::BITMAPS,
                None => 0,
            };
        let unknown = h.version >= 3 && h.autoclear_features & !keep != 0;
        h.autoclear_features &= keep;
        if stale {
            self.write_header(&mut meta).await?;
        } else if unknown {
            self.sync_header_u64(HEADER_AUTOCLEAR, meta.header.autoclear_features)
                .await?;
        }
        if meta.header.is_dirty() {
            drop(meta);
            self.repair_refcounts().await?;
            meta = self.meta.lock().await;
        }
        match tracking {
            BitmapTracking::InUseWhileOpen => self.mark_bitmaps_in_use(&mut meta).await,
        }
    }

    /// Rewrite cluster 0 from the in-memory header (synced), for changes to the extensions.
    pub(crate) async fn write_header(&self, meta: &mut Meta) -> Result<()> {
        // The refcount table may have moved since open (the allocator writes only its field).
        meta.header.refcount_table_offset = meta.rc.table_offset;
        meta.header.refcount_table_clusters = meta.rc.table_clusters;
        let mut bytes = meta.header.to_bytes()?;
        bytes.resize(self.geo.cluster_size() as usize, 0);
        self.file
            .write_at(0, &bytes)
            .await
            .ctx("cannot write the image header")?;
        self.file.flush().await.ctx("cannot flush the image")
    }

    /// A copy of the current header.
    pub async fn header(&self) -> Header {
        self.meta.lock().await.header.clone()
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Whether the image refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The storage guest data lives on: the external data file or the image itself.
    pub(crate) fn data(&self) -> &dyn Storage {
        match &self.data_file {
            Some(d) => d.as_ref(),
            None => self.file.as_ref(),
        }
    }

    /// Flush everything written so far to stable storage: cached metadata first.
    pub async fn flush(&self) -> Result<()> {
        if !self.read_only {
            let mut meta = self.meta.lock().await;
            self.writeback(&mut meta).await?;
        }
        self.sync_storages().await
    }

    pub(crate) async fn sync_storages(&self) -> Result<()> {
        if let Some(d) = &self.data_file {
            d.flush().await.ctx("cannot flush the data file")?;
        }
        self.file.flush().await.ctx("cannot flush the image")
    }

    /// Write the cached metadata out in crash-safe order: dirty refcount blocks; then, if L2
    /// tables are dirty, a flush (so the refcounts of the clusters they link and the data they
    /// expose, copied-on-write parts included, are durable) and the tables; then, if
    /// references were dropped, a flush (the tables that dropped them are durable) and the
    /// decrements, whose blocks the next round writes. Nothing is flushed at the end: the
    /// caller flushes when it needs durability.
    pub(crate) async fn writeback(&self, meta: &mut Meta) -> Result<()> {
        loop {
            meta.rc.write_dirty(self.file.as_ref()).await?;
            let dirty = meta.l2.take_dirty();
            if !dirty.is_empty() {
                if let Err(e) = self.sync_storages().await {
                    dirty.iter().for_each(|(off, _)| meta.l2.mark_dirty(*off));
                    return Err(e);
                }
                for (i, (off, table)) in dirty.iter().enumerate() {
                    let r = self
                        .file
                        .write_at(*off, &words_to_be(table))
                        .await
                        .ctx("cannot write an L2 table");
                    if let Err(e) = r {
                        dirty[i..]
                            .iter()
                            .for_each(|(off, _)| meta.l2.mark_dirty(*off));
                        return Err(e);
                    }
                }
            }
            if meta.pending_unref.is_empty() {
                return Ok(());
            }
            self.file.flush().await.ctx("cannot flush the image")?;
            for c in std::mem::take(&mut meta.pending_unref) {
                meta.rc.adjust(self.file.as_ref(), c, -1).await?;
            }
        }
    }

    /// Wait until no request is changing guest cluster `gc`'s L2 entry with the lock released;
    /// returns the lock again. A marker left by a request that was dropped half way is removed.
    pub(crate) async fn wait_idle<'a>(
        &'a self,
        mut meta: MutexGuard<'a, Meta>,
        gc: u64,
    ) -> MutexGuard<'a, Meta> {
        loop {
            let Some(owner) = meta.inflight.get(&gc).cloned() else {
                return meta;
            };
            drop(meta);
            drop(owner.lock().await);
            meta = self.meta.lock().await;
            let stale = meta
                .inflight
                .get(&gc)
                .is_some_and(|m| Arc::ptr_eq(m, &owner) && m.try_lock().is_ok());
            if stale {
                meta.inflight.remove(&gc);
            }
        }
    }

    /// Flush and clear the dirty bit this library set; the image stays usable.
    pub async fn close(&self) -> Result<()> {
        self.flush().await?;
        let mut meta = self.meta.lock().await;
        if meta.rc.has_dirty() || meta.l2.has_dirty() {
            self.writeback(&mut meta).await?;
            self.sync_storages().await?;
        }
        if meta.dirty_marked {
            meta.header.incompatible_features &= !incompat::DIRTY;
            self.sync_incompat(&meta).await?;
            meta.dirty_marked = false;
        }
        Ok(())
    }

    /// Writes the header's incompatible-feature word and makes it durable.
    pub(crate) async fn sync_incompat(&self, meta: &Meta) -> Result<()> {
        self.sync_header_u64(HEADER_INCOMPAT, meta.header.incompatible_features)
            .await
    }

    /// Writes one 64-bit header field at `at` and makes it durable.
    pub(crate) async fn sync_header_u64(&self, at: u64, v: u64) -> Result<()> {
        self.file
            .write_at(at, &v.to_be_bytes())
            .await
            .ctx("cannot write the image header")?;
        self.file.flush().await.ctx("cannot flush the image")
    }

    /// Set the dirty bit (synced) before the first lazy metadata update.
    pub(crate) async fn mark_dirty(&self, meta: &mut Meta) -> Result<()> {
        if !self.lazy || meta.dirty_marked {
            return Ok(());
        }
        meta.header.incompatible_features |= incompat::DIRTY;
        self.sync_incompat(meta).await?;
        meta.dirty_marked = true;
        Ok(())
    }

    /// After a write request: corrupt metadata it met marks the image corrupt (the header's
    /// corrupt bit, synced), and every later write is refused, as QEMU does.
    pub(crate) async fn settle<T>(&self, meta: &mut Meta, r: Result<T>) -> Result<T> {
        let msg = match r {
            Err(Error::Corrupt(msg)) if !self.corrupt.load(Ordering::Acquire) => msg,
            other => return other,
        };
        self.corrupt.store(true, Ordering::Release);
        meta.header.incompatible_features |= incompat::CORRUPT;
        self.sync_incompat(meta).await?;
        Err(Error::MarkedCorrupt(msg))
    }

    /// Where `off..off + len` is about to be written in place: refuse it when it overlaps
    /// metadata (header, L1 table, refcount table or a refcount block).
    pub(crate) fn check_overlap(&self, meta: &Meta, what: &str, off: u64, len: u64) -> Result<()> {
        let hit = meta.rc.overlaps_protected(off, len).or_else(|| {
            let cs = self.geo.cluster_size();
            let first = off / cs * cs;
            (first..off.saturating_add(len))
                .step_by(cs as usize)
                .any(|c| meta.rc.is_block(c))
                .then_some("refcount block")
        });
        match hit {
            Some(m) => Err(Error::Corrupt(format!(
                "Preventing invalid write on metadata ({what} at {off:#x} overlaps with {m})"
            ))),
            None => Ok(()),
        }
    }
}

impl Meta {
    /// The L2 table offset of L1 index `l1i`, if allocated; checks the entry.
    pub fn l2_offset(&self, l1i: u64, cs: u64) -> Result<Option<u64>> {
        let Some(entry) = usize::try_from(l1i).ok().and_then(|i| self.l1.get(i)) else {
            return Ok(None);
        };
        if entry & L1_RESERVED_MASK != 0 {
            return Err(Error::Corrupt(format!(
                "L1 entry {l1i} ({entry:#x}) has reserved bits set"
            )));
        }
        let off = entry & L1_OFFSET_MASK;
        if !off.is_multiple_of(cs) {
            return Err(Error::Corrupt(format!(
                "L2 table offset {off:#x} is not cluster aligned"
            )));
        }
        Ok((off != 0).then_some(off))
    }
}

impl Image {
    /// The L2 table at host offset `off`, from the cache or the file.
    pub(crate) async fn l2_table(&self, meta: &mut Meta, off: u64) -> Result<L2Table> {
        if let Some(t) = meta.l2.get(off) {
            return Ok(t);
        }
        let cs = self.geo.cluster_size();
        if off >= MAX_HOST_OFFSET {
            return Err(Error::Corrupt(format!(
                "L2 table offset {off:#x} is too large"
            )));
        }
        let file_len = self.file.len().await.ctx("cannot get the image size")?;
        let end = file_len
            .div_ceil(cs)
            .max(meta.rc.alloc_end)
            .saturating_mul(cs);
        if off >= end {
            return Err(Error::Corrupt(format!(
                "L2 table offset {off:#x} lies past the end of the image file ({file_len:#x})"
            )));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file
            .read_at(off, &mut raw)
            .await
            .ctx("cannot read an L2 table")?;
        let table = Arc::new(words_from_be(&raw));
        self.cache_l2(meta, off, Arc::clone(&table), false).await?;
        Ok(table)
    }

    /// Put a table in the L2 cache, writing the metadata back first when it would evict a
    /// dirty table.
    pub(crate) async fn cache_l2(
        &self,
        meta: &mut Meta,
        off: u64,
        table: L2Table,
        dirty: bool,
    ) -> Result<()> {
        if let Some((_, true)) = meta.l2.victim(off) {
            self.writeback(meta).await?;
        }
        meta.l2.insert(off, table, dirty);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create, CreateOptions, MemStorage};

    /// Found by the `qcow2_open` fuzz target: a dirty lazy-refcounts image whose refcount
    /// table points at a block 1 TiB past the end made the repair on a writable open write
    /// there (a MemStorage grew to 1 TiB).
    #[tokio::test]
    async fn refcount_block_past_the_end_refuses_a_writable_open() {
        let st = MemStorage::new();
        let opts = CreateOptions {
            cluster_size: 512,
            lazy_refcounts: true,
            ..CreateOptions::new(64 << 10)
        };
        create(Arc::new(st.clone()), None, &opts).await.unwrap();
        let mut bytes = st.to_bytes();
        let h = Header::parse(&bytes).unwrap();
        let at = h.refcount_table_offset as usize;
        bytes[at..at + 8].copy_from_slice(&0xff_0000_0000u64.to_be_bytes());
        bytes[HEADER_INCOMPAT as usize + 7] |= incompat::DIRTY as u8;
        let open = |read_only| {
            let file: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes.clone()));
            Image::open(
                file,
                OpenOptions {
                    read_only,
                    ..OpenOptions::default()
                },
            )
        };
        let err = open(false).await.unwrap_err();
        assert!(err.to_string().contains("outside the image"), "{err}");
        let image = open(true).await.unwrap();
        assert!(image.check().await.unwrap().corruptions > 0);
    }
}
