//! Consistency check and repair, counting as `qemu-img check` counts: every cluster the
//! metadata references is counted in memory, then compared with the stored refcounts.
//! A stored refcount above the count is a leak; below it, a corruption.

use crate::bitmap_dir::{table_entry, TableEntry};
use crate::error::{IoContext, Result};
use crate::header::{autoclear, incompat, MAX_L1_BYTES};
use crate::image::{Image, Meta};
use crate::l2::{
    entry_at, words_from_be, COMPRESSED, COPIED, L1_OFFSET_MASK, L1_RESERVED_MASK, L2_OFFSET_MASK,
    L2_RESERVED_MASK,
};
use crate::refcount::REFT_OFFSET_MASK;
use crate::snapshot_table::V3_MIN_EXTRA_BYTES;

/// What a check found, named after `qemu-img check --output=json`'s fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that can lose data (refcount too low, bad entries, bad COPIED flags).
    pub corruptions: u64,
    /// Clusters with a refcount higher than their references.
    pub leaks: u64,
    /// Errors that stopped part of the check (I/O).
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with data in this image.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// One past the last used host cluster, in bytes.
    pub image_end_offset: u64,
    /// One line per finding, in QEMU's style.
    pub messages: Vec<String>,
}

/// Reference counting state of one check.
struct Counter {
    refs: Vec<u32>,
    cluster_bits: u32,
    report: CheckReport,
    next_contiguous: u64,
}

impl Counter {
    fn corrupt(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.messages.push(format!("ERROR {msg}"));
    }

    /// Count one reference to every cluster of host bytes `off..off + len`. A range that runs
    /// past the image's end is one corruption, however far it runs (offsets come from the file).
    fn add(&mut self, what: &str, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off >> self.cluster_bits;
        let last = off.saturating_add(len - 1) >> self.cluster_bits;
        let n = self.refs.len() as u64;
        for c in first..=last.min(n.saturating_sub(1)) {
            if let Some(r) = usize::try_from(c).ok().and_then(|i| self.refs.get_mut(i)) {
                *r = r.saturating_add(1);
            }
        }
        if last >= n {
            let c = first.max(n);
            self.corrupt(format!("{what} cluster {c} is past the end of the image"));
        }
    }
}

impl Image {
    /// Check the image as `qemu-img check` does, without changing it.
    pub async fn check(&self) -> Result<CheckReport> {
        let mut meta = self.meta.lock().await;
        if !self.read_only {
            // Deferred decrements would count as leaks.
            self.writeback(&mut meta).await?;
        }
        Ok(self.count(&mut meta).await?.report)
    }

    /// Check, then repair leaks (lower refcounts to their references); with `all`, also raise
    /// refcounts that are too low (the rebuild a dirty image needs).
    pub async fn check_and_repair(&self, all: bool) -> Result<CheckReport> {
        self.check_writable_for_repair()?;
        let mut meta = self.meta.lock().await;
        // Deferred decrements first, or the repair would count them twice.
        self.writeback(&mut meta).await?;
        let counter = self.count(&mut meta).await?;
        let mut report = counter.report.clone();
        // New refcount blocks must not land on clusters whose refcount is wrongly zero.
        let saved_hint = meta.rc.free_hint;
        meta.rc.free_hint = counter.refs.len() as u64;
        meta.rc.alloc_end = meta.rc.alloc_end.max(counter.refs.len() as u64);
        for (c, &want) in counter.refs.iter().enumerate() {
            let have = meta.rc.get(self.file.as_ref(), c as u64).await?;
            let want = u64::from(want);
            if have > want {
                meta.rc.set(self.file.as_ref(), c as u64, want).await?;
                report.leaks_fixed += 1;
            } else if have < want && all {
                meta.rc.set(self.file.as_ref(), c as u64, want).await?;
                report.corruptions_fixed += 1;
            }
        }
        meta.rc.free_hint = saved_hint.min(meta.rc.free_hint);
        self.writeback(&mut meta).await?;
        self.file.flush().await.ctx("cannot flush the image")?;
        let after = self.count(&mut meta).await?.report;
        report.leaks = after.leaks;
        report.corruptions = after.corruptions;
        if all && after.corruptions == 0 && meta.header.incompatible_features & incompat::DIRTY != 0
        {
            meta.header.incompatible_features &= !(incompat::DIRTY | incompat::CORRUPT);
            self.sync_incompat(&meta).await?;
        }
        Ok(report)
    }

    fn check_writable_for_repair(&self) -> Result<()> {
        if self.read_only {
            return Err(crate::error::Error::ReadOnly);
        }
        Ok(())
    }

    /// Rebuild refcounts of a dirty image (lazy refcounts), as QEMU does on a writable open.
    pub(crate) async fn repair_refcounts(&self) -> Result<()> {
        self.check_and_repair(true).await.map(|_| ())
    }

    async fn count(&self, meta: &mut Meta) -> Result<Counter> {
        let cs = self.geo.cluster_size();
        let file_len = self.file.len().await.ctx("cannot get the image size")?;
        let n = file_len.div_ceil(cs).max(1);
        let mut k = Counter {
            refs: vec![0; usize::try_from(n).unwrap_or(usize::MAX)],
            cluster_bits: self.geo.cluster_bits,
            report: CheckReport::default(),
            next_contiguous: 0,
        };
        k.report.total_clusters = self.size().div_ceil(cs);
        k.add("header", 0, cs);
        let h = meta.header.clone();
        k.add("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8);
        let l1 = meta.l1.clone();
        self.count_l1(meta, &mut k, &l1, true).await?;
        self.count_snapshots(meta, &mut k).await?;
        k.add(
            "refcount table",
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        for (i, e) in meta.rc.table.clone().iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            if e & !REFT_OFFSET_MASK != 0 || !off.is_multiple_of(cs) {
                k.corrupt(format!("refcount table entry {i} is invalid ({e:#x})"));
            } else if off != 0 {
                k.add("refcount block", off, cs);
            }
        }
        if h.autoclear_features & autoclear::BITMAPS != 0 {
            self.count_bitmaps(meta, &mut k).await?;
        }
        self.compare(meta, &mut k).await?;
        Ok(k)
    }

    /// Count an L1 table's L2 tables and data; `active` adds the COPIED check and statistics.
    async fn count_l1(
        &self,
        meta: &mut Meta,
        k: &mut Counter,
        l1: &[u64],
        active: bool,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        for (i, &e) in l1.iter().enumerate() {
            let off = e & L1_OFFSET_MASK;
            if e & L1_RESERVED_MASK != 0 {
                k.corrupt(format!("L1 entry {i} has reserved bits set ({e:#x})"));
                continue;
            }
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                k.corrupt(format!("L2 table offset {off:#x} unaligned (L1 index {i})"));
                continue;
            }
            k.add("L2 table", off, cs);
            let table = self.l2_table(meta, off).await?;
            for j in 0..self.geo.l2_entries() as usize {
                let entry = entry_at(&table, j, self.geo.extended);
                if let Err(err) = self.geo.validate(entry) {
                    k.corrupt(format!("{err} (L2 table {off:#x} entry {j})"));
                    continue;
                }
                if entry.word & COMPRESSED != 0 {
                    let (c_off, c_len) = self.geo.compressed_extent(entry.word);
                    k.add("compressed data", c_off, c_len);
                    if active {
                        k.report.allocated_clusters += 1;
                        k.report.compressed_clusters += 1;
                        // As QEMU counts them: compressed clusters are fragmented by nature.
                        k.report.fragmented_clusters += 1;
                    }
                    continue;
                }
                if entry.word & L2_RESERVED_MASK != 0 {
                    k.corrupt(format!("L2 entry {j} of {off:#x} has reserved bits set"));
                    continue;
                }
                if !self.geo.is_allocated(entry) {
                    continue;
                }
                let host = entry.word & L2_OFFSET_MASK;
                if !self.geo.data_file {
                    k.add("data", host, cs);
                }
                if active {
                    k.report.allocated_clusters += 1;
                    if k.next_contiguous != 0 && host != k.next_contiguous {
                        k.report.fragmented_clusters += 1;
                    }
                    k.next_contiguous = host + cs;
                }
            }
        }
        Ok(())
    }

    /// Count the snapshot table and every snapshot's L1 tree (qcow2.txt, "Snapshots"), with
    /// `qemu-img check`'s findings on the entries.
    async fn count_snapshots(&self, meta: &mut Meta, k: &mut Counter) -> Result<()> {
        let cs = self.geo.cluster_size();
        if !meta.snapshots.is_empty() && self.geo.data_file {
            k.corrupt("internal snapshots in an image with an external data file".into());
        }
        for (i, e) in meta.snapshots.clone().iter().enumerate() {
            if meta.header.version >= 3 && e.extra_bytes < V3_MIN_EXTRA_BYTES {
                k.corrupt(format!("snapshot table entry {i} is incomplete"));
            }
            let bytes = u64::from(e.l1_size) * 8;
            let what = format!(
                "snapshot {} ({})",
                String::from_utf8_lossy(&e.id),
                String::from_utf8_lossy(&e.name)
            );
            if !e.l1_offset.is_multiple_of(cs) {
                k.corrupt(format!(
                    "{what} l1_offset={:#x}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    e.l1_offset
                ));
                continue;
            }
            if bytes > MAX_L1_BYTES {
                k.corrupt(format!(
                    "{what} l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    e.l1_size
                ));
                continue;
            }
            let mut raw = vec![0u8; bytes as usize];
            self.file
                .read_at(e.l1_offset, &mut raw)
                .await
                .ctx("cannot read a snapshot L1 table")?;
            k.add("snapshot L1 table", e.l1_offset, bytes);
            self.count_l1(meta, k, &words_from_be(&raw), false).await?;
        }
        let (off, bytes) = (meta.header.snapshots_offset, meta.snapshots_bytes);
        k.add("snapshot table", off, bytes);
        Ok(())
    }

    /// Count the bitmap directory, bitmap tables and bitmap data clusters.
    async fn count_bitmaps(&self, meta: &mut Meta, k: &mut Counter) -> Result<()> {
        let Some(ext) = meta.header.extensions.bitmaps else {
            return Ok(());
        };
        let cs = self.geo.cluster_size();
        k.add("bitmap directory", ext.directory_offset, ext.directory_size);
        for e in &meta.bitmaps {
            k.add("bitmap table", e.table_offset, u64::from(e.table_size) * 8);
            for word in self.read_bitmap_table(e).await? {
                match table_entry(word, cs) {
                    Ok(TableEntry::Data(off)) => k.add("bitmap data", off, cs),
                    Ok(_) => {}
                    Err(err) => k.corrupt(format!("{err} (bitmap '{}')", e.name)),
                }
            }
        }
        Ok(())
    }

    /// Compare counted references with stored refcounts and check COPIED flags.
    async fn compare(&self, meta: &mut Meta, k: &mut Counter) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut highest = 0;
        for c in 0..k.refs.len() {
            let want = u64::from(k.refs[c]);
            let have = meta.rc.get(self.file.as_ref(), c as u64).await?;
            if want > 0 {
                highest = c as u64 + 1;
            }
            if have > want {
                k.report.leaks += 1;
                k.report.messages.push(format!(
                    "Leaked cluster {c} refcount={have} reference={want}"
                ));
            } else if have < want {
                k.corrupt(format!("cluster {c} refcount={have} reference={want}"));
            }
        }
        k.report.image_end_offset = highest * cs;
        // COPIED must say "refcount is exactly 1" in the active tables.
        for (i, &e) in meta.l1.clone().iter().enumerate() {
            let off = e & L1_OFFSET_MASK;
            if off == 0 || !off.is_multiple_of(cs) || e & L1_RESERVED_MASK != 0 {
                continue;
            }
            let rc = meta.rc.get(self.file.as_ref(), off / cs).await?;
            if (e & COPIED != 0) != (rc == 1) {
                k.corrupt(format!(
                    "OFLAG_COPIED L2 cluster: l1_index={i} refcount={rc}"
                ));
            }
            if self.geo.data_file {
                continue;
            }
            let table = self.l2_table(meta, off).await?;
            for j in 0..self.geo.l2_entries() as usize {
                let entry = entry_at(&table, j, self.geo.extended);
                if self.geo.validate(entry).is_err() || !self.geo.is_allocated(entry) {
                    continue;
                }
                let rc = meta
                    .rc
                    .get(self.file.as_ref(), (entry.word & L2_OFFSET_MASK) / cs)
                    .await?;
                if (entry.word & COPIED != 0) != (rc == 1) {
                    k.corrupt(format!(
                        "OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}",
                        entry.word
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{create, CreateOptions, Header, Image, MemStorage, OpenOptions, Storage};

    /// Found by the `qcow2_open` fuzz target: a refcount table entry of 0xffff_ffff_ffff_fe00
    /// overflowed the end of the block's range while counting it.
    #[tokio::test]
    async fn refcount_block_at_the_top_of_the_address_space_is_one_corruption() {
        let st = MemStorage::new();
        let opts = CreateOptions {
            cluster_size: 512,
            ..CreateOptions::new(64 << 10)
        };
        create(Arc::new(st.clone()), None, &opts).await.unwrap();
        let mut bytes = st.to_bytes();
        let h = Header::parse(&bytes).unwrap();
        let at = h.refcount_table_offset as usize + 8;
        bytes[at..at + 8].copy_from_slice(&0xffff_ffff_ffff_fe00u64.to_be_bytes());
        let file: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
        let ro = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let image = Image::open(file, ro).await.unwrap();
        let report = image.check().await.unwrap();
        assert_eq!(report.corruptions, 1, "{:?}", report.messages);
    }
}
