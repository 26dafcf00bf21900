//! Persistent dirty bitmaps of an open image (qcow2.txt, "Bitmaps"), as QEMU 10.0.2 keeps them
//! (`block/qcow2-bitmap.c`).
//!
//! The image does not track writes: the caller (the block layer) owns the live bitmaps. On open
//! the image reads and checks the bitmap directory and the data of every bitmap; the caller
//! takes them with [`Image::take_bitmaps`], marks its writes in them, and hands them back to
//! [`Image::store_bitmaps`] when the writes stop (close, inactivation).
//!
//! States of a bitmap in the directory of a read-write image:
//! - *in use*: `in_use` is set on disk, so the data there is stale; the caller's copy is the
//!   truth. Open moves every stored bitmap here before it returns, so before any guest write.
//! - *stored*: `in_use` is clear and the data on disk is what the caller last stored.
//!   [`Image::store_bitmaps`] moves the bitmaps it is given here. The next guest write
//!   (write, write_zeroes, discard, truncate, compressed write) moves them back to in use
//!   before it changes anything.
//! - *inconsistent*: `in_use` was already set when the image was opened (a crash, or another
//!   program still has it open): the data is lost. It stays so until removed or replaced by a
//!   store.
//!
//! Invariant: in a read-write image no bitmap is stored while a guest write can land, so a
//! crash leaves bitmaps inconsistent, never wrong. A read-only image changes nothing.
//!
//! Write intent: every guest write passes [`Image::begin_write`] before it changes anything,
//! and that is the one place the on-disk state of the bitmaps is made safe for it. Today it
//! marks them in use ([`BitmapTracking::InUseWhileOpen`], QEMU's scheme). A write-intent
//! scheme (recording the ranges about to be written, so a crash costs only those) becomes a
//! new [`BitmapTracking`] variant handled there and at open; the load, store and remove calls
//! and the caller's side stay as they are.
//!
//! Crash safety of a store or remove: new data clusters, tables and directory go to newly
//! allocated clusters; their refcounts and contents are flushed before the header points at
//! the new directory (one synced header write); the old directory, tables and data are freed
//! only after that. A crash leaves the old or the new bitmaps, and at worst leaked clusters.

use std::sync::atomic::Ordering;

use bitmap::{DirtyBitmap, Granularity};

use crate::bitmap_dir::{self, flags, table_entry, table_size_for, DirEntry, TableEntry};
use crate::error::{Error, IoContext, Result};
use crate::ext::BitmapsExt;
use crate::header::{autoclear, validate_table};
use crate::image::{check_in_file, Image, Meta};
use crate::l2::{words_from_be, words_to_be};

/// How a read-write image keeps its persistent bitmaps safe from writes the caller may not
/// get to store (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BitmapTracking {
    /// QEMU's scheme: every bitmap is marked in use on disk while writes can happen.
    #[default]
    InUseWhileOpen,
}

/// A bitmap of the image's directory, as `qemu-img info` lists it. Every one is persistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Unique name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: Granularity,
    /// The `in_use` flag as it is on disk now.
    pub in_use: bool,
    /// The `auto` flag: the bitmap is enabled and tracks writes.
    pub enabled: bool,
    /// `in_use` was set when the image was opened: the data is lost.
    pub inconsistent: bool,
}

/// A bitmap loaded from the image on open, for the caller to own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedBitmap {
    /// Unique name.
    pub name: String,
    /// The `auto` flag: the bitmap tracks writes.
    pub enabled: bool,
    /// The data was lost (`in_use` was set on open); `bitmap` is then empty.
    pub inconsistent: bool,
    /// The bits, over the whole disk.
    pub bitmap: DirtyBitmap,
}

impl LoadedBitmap {
    /// This bitmap, to store back as it is now.
    pub fn as_store(&self) -> StoreBitmap<'_> {
        StoreBitmap {
            name: &self.name,
            enabled: self.enabled,
            bitmap: &self.bitmap,
        }
    }
}

/// A bitmap to write into the image.
#[derive(Debug, Clone, Copy)]
pub struct StoreBitmap<'a> {
    /// Its name; a bitmap of that name in the image is replaced.
    pub name: &'a str,
    /// Stored as the `auto` flag.
    pub enabled: bool,
    /// The bits; they must cover the whole disk.
    pub bitmap: &'a DirtyBitmap,
}

impl Image {
    /// The bitmaps in the image's directory, in directory order.
    pub async fn bitmaps(&self) -> Vec<BitmapInfo> {
        let meta = self.meta.lock().await;
        meta.bitmaps
            .iter()
            .map(|e| BitmapInfo {
                name: e.name.clone(),
                granularity: e.granularity,
                in_use: e.in_use(),
                enabled: e.flags & flags::AUTO != 0,
                inconsistent: e.inconsistent,
            })
            .collect()
    }

    /// Hand over the bitmaps loaded on open (once; later calls return nothing).
    pub async fn take_bitmaps(&self) -> Vec<LoadedBitmap> {
        std::mem::take(&mut self.meta.lock().await.loaded)
    }

    /// Write `bitmaps` into the image with `in_use` clear, replacing those of the same name;
    /// the other bitmaps of the directory stay as they are. Call it when the writes the
    /// bitmaps track have stopped: a later write marks them in use again.
    pub async fn store_bitmaps(&self, bitmaps: &[StoreBitmap<'_>]) -> Result<()> {
        self.check_writable()?;
        if bitmaps.is_empty() {
            return Ok(());
        }
        let mut meta = self.meta.lock().await;
        if meta.header.version < 3 {
            return Err(Error::Unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        self.check_store(bitmaps)?;
        let mut allocated = Vec::new();
        let (entries, replaced) = match self.write_bitmaps(&mut meta, bitmaps, &mut allocated).await
        {
            Ok(r) => r,
            Err(err) => {
                for (off, bytes) in allocated {
                    // Nothing points at these yet; a failure here only leaks them.
                    let _ = self.free_clusters(&mut meta, off, bytes).await;
                }
                return Err(err);
            }
        };
        self.publish_directory(&mut meta, entries).await?;
        for old in &replaced {
            self.free_bitmap(&mut meta, old).await?;
        }
        meta.rc.write_dirty(self.file.as_ref()).await?;
        self.bitmaps_unmarked.store(true, Ordering::Release);
        Ok(())
    }

    /// Delete the bitmap `name` from the image; returns whether it was there.
    pub async fn remove_bitmap(&self, name: &str) -> Result<bool> {
        self.check_writable()?;
        let mut meta = self.meta.lock().await;
        let Some(i) = meta.bitmaps.iter().position(|e| e.name == name) else {
            return Ok(false);
        };
        let mut entries = meta.bitmaps.clone();
        let gone = entries.remove(i);
        self.publish_directory(&mut meta, entries).await?;
        meta.loaded.retain(|b| b.name != name);
        self.free_bitmap(&mut meta, &gone).await?;
        meta.rc.write_dirty(self.file.as_ref()).await?;
        Ok(true)
    }

    /// What every guest write does first: refuse when the image is not writable, and make
    /// the on-disk bitmaps safe for the write (see the module documentation).
    pub(crate) async fn begin_write(&self) -> Result<()> {
        self.check_writable()?;
        if self.bitmaps_unmarked.load(Ordering::Acquire) {
            let mut meta = self.meta.lock().await;
            self.mark_bitmaps_in_use(&mut meta).await?;
        }
        Ok(())
    }

    /// Read and check the bitmap directory and load every bitmap's data (on open). The
    /// extension counts only with the autoclear bit: without it a program that knows no
    /// bitmaps wrote the image.
    pub(crate) async fn open_bitmaps(&self, meta: &mut Meta, file_len: u64) -> Result<()> {
        let h = &meta.header;
        let Some(ext) = h.extensions.bitmaps else {
            return Ok(());
        };
        if h.autoclear_features & autoclear::BITMAPS == 0 {
            return Ok(());
        }
        ext.check()?;
        let cs = self.geo.cluster_size();
        let (off, bytes) = (ext.directory_offset, ext.directory_size);
        validate_table("bitmap directory", off, bytes, cs)?;
        check_in_file("bitmap directory", off, bytes, file_len, cs)?;
        let mut dir = vec![0u8; bytes as usize];
        self.file
            .read_at(off, &mut dir)
            .await
            .ctx("cannot read the bitmap directory")?;
        let disk = h.size;
        let entries = bitmap_dir::parse(&dir, ext.nb_bitmaps, cs, disk)?;
        for e in &entries {
            let bitmap = if e.inconsistent {
                DirtyBitmap::new(disk, e.granularity)
            } else {
                self.load_bitmap(e, disk).await?
            };
            meta.loaded.push(LoadedBitmap {
                name: e.name.clone(),
                enabled: e.flags & flags::AUTO != 0,
                inconsistent: e.inconsistent,
                bitmap,
            });
        }
        meta.bitmaps = entries;
        Ok(())
    }

    /// Set `in_use` on every bitmap of the directory, in place, synced. Only flag words
    /// change, so any mix of old and new sectors after a crash is a valid directory in which
    /// some bitmaps are in use: unlike QEMU, no autoclear round trip is needed (and a crash
    /// cannot drop every bitmap).
    pub(crate) async fn mark_bitmaps_in_use(&self, meta: &mut Meta) -> Result<()> {
        let ext = meta.header.extensions.bitmaps;
        let (Some(ext), false) = (ext, meta.bitmaps.iter().all(DirEntry::in_use)) else {
            self.bitmaps_unmarked.store(false, Ordering::Release);
            return Ok(());
        };
        let mut entries = meta.bitmaps.clone();
        entries.iter_mut().for_each(|e| e.flags |= flags::IN_USE);
        let bytes = bitmap_dir::to_bytes(&entries, self.geo.cluster_size(), self.size())?;
        if bytes.len() as u64 != ext.directory_size {
            return Err(Error::Corrupt(
                "bitmap directory changed size while marking it in use".into(),
            ));
        }
        self.file
            .write_at(ext.directory_offset, &bytes)
            .await
            .ctx("cannot write the bitmap directory")?;
        self.file.flush().await.ctx("cannot flush the image")?;
        meta.bitmaps = entries;
        self.bitmaps_unmarked.store(false, Ordering::Release);
        Ok(())
    }

    /// A bitmap table, as big-endian words decoded.
    pub(crate) async fn read_bitmap_table(&self, e: &DirEntry) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; e.table_size as usize * 8];
        self.file
            .read_at(e.table_offset, &mut raw)
            .await
            .ctx("cannot read a bitmap table")?;
        Ok(words_from_be(&raw))
    }

    /// The data of a consistent bitmap over a disk of `disk` bytes.
    async fn load_bitmap(&self, e: &DirEntry, disk: u64) -> Result<DirtyBitmap> {
        let cs = self.geo.cluster_size();
        let want = table_size_for(disk, e.granularity, cs);
        if want != u64::from(e.table_size) {
            return Err(Error::Invalid(format!(
                "Could not read bitmap '{}' from image: its table has {} entries instead of {want}",
                e.name, e.table_size
            )));
        }
        let mut bitmap = DirtyBitmap::new(disk, e.granularity);
        let cover = (cs * 8) << e.granularity.bits();
        let mut buf = vec![0u8; cs as usize];
        for (i, &word) in self.read_bitmap_table(e).await?.iter().enumerate() {
            let i = i as u64;
            let entry = table_entry(word, cs).map_err(|err| {
                Error::Invalid(format!(
                    "Could not read bitmap '{}' from image: {err}",
                    e.name
                ))
            })?;
            match entry {
                TableEntry::Zeros => {}
                TableEntry::Ones => bitmap.set(i * cover, cover),
                TableEntry::Data(off) => {
                    self.file
                        .read_at(off, &mut buf)
                        .await
                        .ctx("cannot read bitmap data")?;
                    bitmap.deserialize(i * cs, &buf);
                }
            }
        }
        Ok(bitmap)
    }

    /// QEMU's constraints on bitmaps to store (`check_constraints_on_bitmap`).
    fn check_store(&self, bitmaps: &[StoreBitmap<'_>]) -> Result<()> {
        let cs = self.geo.cluster_size();
        for (i, b) in bitmaps.iter().enumerate() {
            let bad = |why: String| {
                Error::InvalidOption(format!(
                    "Bitmap '{}' doesn't satisfy the constraints: {why}",
                    b.name
                ))
            };
            if b.name.is_empty() || b.name.contains('\0') {
                return Err(bad("bad name".into()));
            }
            if b.name.len() > bitmap_dir::MAX_NAME_BYTES {
                return Err(bad(format!(
                    "Name length exceeds maximum ({} characters)",
                    bitmap_dir::MAX_NAME_BYTES
                )));
            }
            if bitmaps[..i].iter().any(|o| o.name == b.name) {
                return Err(bad("given twice".into()));
            }
            if b.bitmap.size() != self.size() {
                return Err(bad(format!(
                    "it covers {} bytes, the disk {}",
                    b.bitmap.size(),
                    self.size()
                )));
            }
            let entries = table_size_for(self.size(), b.bitmap.granularity(), cs);
            if entries == 0 {
                return Err(bad("the disk is empty".into()));
            }
            if entries > u64::from(bitmap_dir::MAX_TABLE_ENTRIES)
                || entries * cs > bitmap_dir::MAX_DATA_BYTES
            {
                return Err(bad(
                    "Too much space will be occupied by the bitmap. Use larger granularity".into(),
                ));
            }
        }
        Ok(())
    }

    /// Write the data and tables of `bitmaps` to new clusters (listed in `allocated` as they
    /// are allocated); returns the new directory entries and the entries they replace.
    async fn write_bitmaps(
        &self,
        meta: &mut Meta,
        bitmaps: &[StoreBitmap<'_>],
        allocated: &mut Vec<(u64, u64)>,
    ) -> Result<(Vec<DirEntry>, Vec<DirEntry>)> {
        let mut entries = meta.bitmaps.clone();
        let mut replaced = Vec::new();
        for b in bitmaps {
            let (table_offset, table_size) = self.write_bitmap(meta, b.bitmap, allocated).await?;
            let entry = DirEntry {
                table_offset,
                table_size,
                flags: if b.enabled { flags::AUTO } else { 0 },
                granularity: b.bitmap.granularity(),
                name: b.name.to_string(),
                inconsistent: false,
            };
            match entries.iter_mut().find(|e| e.name == b.name) {
                Some(old) => replaced.push(std::mem::replace(old, entry)),
                None => entries.push(entry),
            }
        }
        Ok((entries, replaced))
    }

    /// Write one bitmap's dirty data clusters and its table; returns the table's offset and
    /// entries. Clean clusters get no data cluster (a zero entry), as QEMU stores them.
    async fn write_bitmap(
        &self,
        meta: &mut Meta,
        bitmap: &DirtyBitmap,
        allocated: &mut Vec<(u64, u64)>,
    ) -> Result<(u64, u32)> {
        let cs = self.geo.cluster_size();
        let file = self.file.as_ref();
        let entries = table_size_for(bitmap.size(), bitmap.granularity(), cs);
        let mut table = vec![0u64; entries as usize];
        // Disk bytes whose bits fill one data cluster.
        let cover = (cs * 8) << bitmap.granularity().bits();
        let mut buf = vec![0u8; cs as usize];
        let mut pos = 0;
        while let Some(dirty) = bitmap.next_dirty(pos) {
            let i = dirty / cover;
            bitmap.serialize(i * cs, &mut buf);
            let off = meta.rc.alloc(file, 1).await?;
            allocated.push((off, cs));
            file.write_at(off, &buf)
                .await
                .ctx("cannot write bitmap data")?;
            table[i as usize] = off;
            pos = (i + 1).saturating_mul(cover);
        }
        let bytes = entries * 8;
        let off = meta.rc.alloc(file, bytes.div_ceil(cs)).await?;
        allocated.push((off, bytes));
        file.write_at(off, &words_to_be(&table))
            .await
            .ctx("cannot write a bitmap table")?;
        Ok((off, entries as u32))
    }

    /// Make `entries` the bitmap directory: write it to new clusters, make it and everything
    /// it points at durable, switch the header (synced), then free the old directory. No
    /// entries: the extension and its autoclear bit go.
    async fn publish_directory(&self, meta: &mut Meta, entries: Vec<DirEntry>) -> Result<()> {
        let cs = self.geo.cluster_size();
        let old = meta.header.extensions.bitmaps;
        let new = match entries.is_empty() {
            true => None,
            false => {
                let bytes = bitmap_dir::to_bytes(&entries, cs, self.size())?;
                let len = bytes.len() as u64;
                let off = meta.rc.alloc(self.file.as_ref(), len.div_ceil(cs)).await?;
                if let Err(err) = self.file.write_at(off, &bytes).await {
                    let _ = self.free_clusters(meta, off, len).await;
                    return Err(Error::Io("cannot write the bitmap directory", err));
                }
                Some(BitmapsExt {
                    nb_bitmaps: entries.len() as u32,
                    directory_size: len,
                    directory_offset: off,
                })
            }
        };
        meta.rc.write_dirty(self.file.as_ref()).await?;
        self.file.flush().await.ctx("cannot flush the image")?;
        let old_autoclear = meta.header.autoclear_features;
        meta.header.extensions.bitmaps = new;
        match new {
            Some(_) => meta.header.autoclear_features |= autoclear::BITMAPS,
            None => meta.header.autoclear_features &= !autoclear::BITMAPS,
        }
        if let Err(err) = self.write_header(meta).await {
            // The header on disk may be either; the new directory stays allocated (a leak).
            meta.header.extensions.bitmaps = old;
            meta.header.autoclear_features = old_autoclear;
            return Err(err);
        }
        meta.bitmaps = entries;
        if let Some(old) = old {
            self.free_clusters(meta, old.directory_offset, old.directory_size)
                .await?;
        }
        Ok(())
    }

    /// Release the data clusters and the table of a bitmap no longer in the directory. Data
    /// entries that are invalid or point at the image's own metadata (a hostile table left
    /// in use is never checked on open) are leaked rather than freed.
    async fn free_bitmap(&self, meta: &mut Meta, e: &DirEntry) -> Result<()> {
        let cs = self.geo.cluster_size();
        for word in self.read_bitmap_table(e).await? {
            let Ok(TableEntry::Data(off)) = table_entry(word, cs) else {
                continue;
            };
            if meta.rc.overlaps_protected(off, cs).is_none() && !meta.rc.is_block(off) {
                self.free_clusters(meta, off, cs).await?;
            }
        }
        let bytes = u64::from(e.table_size) * 8;
        if meta.rc.overlaps_protected(e.table_offset, bytes).is_some() {
            return Ok(());
        }
        self.free_clusters(meta, e.table_offset, bytes).await
    }

    /// Drop one reference to every cluster of host bytes `off..off + bytes`.
    pub(crate) async fn free_clusters(&self, meta: &mut Meta, off: u64, bytes: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        for c in off / cs..(off + bytes).div_ceil(cs) {
            meta.rc.adjust(self.file.as_ref(), c, -1).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
