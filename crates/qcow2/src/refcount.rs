//! Refcount table, refcount blocks and the cluster allocator.
//!
//! State: the refcount table (in memory, mirrored on disk), a bounded write-back cache of
//! refcount blocks, and a hint below which no cluster is free.
//! Invariants: a cluster the allocator hands out has refcount 1 in the cache at once; the
//! image's metadata write-back writes dirty blocks (and flushes) before any L2 table that links
//! such a cluster, and applies decrements only after the L2 tables that dropped the references
//! are durable, so a dirty block may be written at any time (at worst a leak after a crash).
//! New refcount blocks describe themselves when they can; a grown refcount table is written and
//! flushed before the header points at it.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::header::{MAX_HOST_OFFSET, MAX_REFTABLE_BYTES};
use crate::l2::{words_from_be, words_to_be};
use crate::pin::Pins;
use crate::storage::Storage;

/// Refcount table entry bits 9..63 hold the block offset; bits 0..8 are reserved.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Header offset of `refcount_table_offset` (followed by `refcount_table_clusters`).
const HEADER_REFTABLE_FIELD: u64 = 48;
/// Most refcount blocks kept in memory.
const BLOCK_CACHE_MAX: usize = 256;
/// Most refcount entries one free-cluster search looks at before it gives up on the used area
/// and appends at the end of the image (a hostile image can claim terabytes are in use).
pub(crate) const SCAN_BUDGET: u64 = 1 << 16;

/// A hasher for host offsets and cluster indexes: one multiply (Fibonacci hashing), far
/// cheaper than SipHash on the per-cluster lookups of the allocator. Keys come from the
/// image's own tables, which the library validates; a hostile image can at worst make the
/// map slow, never wrong.
#[derive(Default)]
pub(crate) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(26);
    }
}

/// [`OffsetHasher`] as a map's hasher.
pub(crate) type OffsetHash = BuildHasherDefault<OffsetHasher>;

/// One cached refcount block.
#[derive(Debug)]
struct Block {
    data: Vec<u8>,
    dirty: bool,
}

/// The refcount structures of an open image.
#[derive(Debug)]
pub(crate) struct Refcounts {
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u32,
    blocks: HashMap<u64, Block, OffsetHash>,
    /// Host offsets of the refcount blocks the table points at.
    block_set: HashSet<u64, OffsetHash>,
    order: u32,
    cluster_bits: u32,
    /// No cluster below this index is free.
    pub free_hint: u64,
    /// Host ranges the allocator must never hand out (header, L1 table, refcount table).
    pub protected: Vec<(u64, u64)>,
    /// One past the highest cluster handed out since open (it may lie past the file's end).
    pub alloc_end: u64,
    /// Host clusters that reads mapped and still use: never handed out, even when free.
    pub pins: Arc<Pins>,
    /// Refcount entries the free-cluster searches looked at (their work, for tests).
    pub scanned: u64,
}

impl Refcounts {
    /// Load the refcount table described by the header fields.
    pub async fn load(
        file: &dyn Storage,
        table_offset: u64,
        table_clusters: u32,
        order: u32,
        cluster_bits: u32,
    ) -> Result<Self> {
        let bytes = (u64::from(table_clusters) << cluster_bits).min(MAX_REFTABLE_BYTES);
        let mut raw = vec![0u8; bytes as usize];
        file.read_at(table_offset, &mut raw)
            .await
            .ctx("cannot read the refcount table")?;
        let table = words_from_be(&raw);
        Ok(Self {
            block_set: block_set(&table),
            table,
            table_offset,
            table_clusters,
            blocks: HashMap::default(),
            order,
            cluster_bits,
            free_hint: 0,
            protected: Vec::new(),
            alloc_end: 0,
            pins: Arc::default(),
            scanned: 0,
        })
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refuse refcount blocks outside the file (`file_len` bytes): updating them would write
    /// far past the image's end (`qemu-img check`: "refcount block is outside image").
    pub fn check_blocks_in_file(&self, file_len: u64) -> Result<()> {
        let end = file_len.div_ceil(self.cluster_size()) * self.cluster_size();
        for ti in 0..self.table.len() as u64 {
            if let Some(off) = self.block_offset(ti)? {
                if off >= end {
                    return Err(Error::Corrupt(format!(
                        "refcount block {ti} at {off:#x} is outside the image"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Bits per refcount entry, as a power of two.
    pub fn order(&self) -> u32 {
        self.order
    }

    /// A copy of the refcount block for table index `ti` (`None`: the table names none).
    pub async fn block_copy(&mut self, file: &dyn Storage, ti: u64) -> Result<Option<Vec<u8>>> {
        let Some(off) = self.block_offset(ti)? else {
            return Ok(None);
        };
        Ok(Some(self.block(file, off).await?.data.clone()))
    }

    /// Take over refcount structures a metadata switch has made live: `table` at
    /// `table_offset`, with `blocks` (offset, contents) as written. Cached blocks are dropped
    /// (the switch replaced every block it changed), the new ones cached clean.
    pub fn install(&mut self, table: Vec<u64>, table_offset: u64, blocks: Vec<(u64, Vec<u8>)>) {
        let cs = self.cluster_size();
        let old = self.table_offset;
        self.protected.retain(|(s, _)| *s != old);
        let clusters = (table.len() as u64 * 8).div_ceil(cs);
        self.protected
            .push((table_offset, table_offset + clusters * cs));
        self.block_set = block_set(&table);
        self.table = table;
        self.table_offset = table_offset;
        self.table_clusters = clusters as u32;
        self.blocks.clear();
        for (off, data) in blocks.into_iter().take(BLOCK_CACHE_MAX) {
            self.blocks.insert(off, Block { data, dirty: false });
        }
    }

    /// Refcount entries in one block.
    pub fn block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    pub fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    /// The block offset for table index `ti`, if allocated; checks the entry.
    pub fn block_offset(&self, ti: u64) -> Result<Option<u64>> {
        let Some(entry) = usize::try_from(ti).ok().and_then(|i| self.table.get(i)) else {
            return Ok(None);
        };
        let off = entry & REFT_OFFSET_MASK;
        if entry & !REFT_OFFSET_MASK != 0 || !off.is_multiple_of(self.cluster_size()) {
            return Err(Error::Corrupt(format!(
                "refcount table entry {ti} ({entry:#x}) is invalid"
            )));
        }
        Ok((off != 0).then_some(off))
    }

    async fn block<'a>(&'a mut self, file: &dyn Storage, off: u64) -> Result<&'a mut Block> {
        if !self.blocks.contains_key(&off) {
            if self.blocks.len() >= BLOCK_CACHE_MAX {
                self.write_dirty(file).await?;
                self.blocks.clear();
            }
            let mut data = vec![0u8; self.cluster_size() as usize];
            file.read_at(off, &mut data)
                .await
                .ctx("cannot read a refcount block")?;
            self.blocks.insert(off, Block { data, dirty: false });
        }
        self.blocks
            .get_mut(&off)
            .ok_or_else(|| Error::Corrupt("refcount block cache".into()))
    }

    /// Write every dirty cached block (not flushed); returns whether any was written.
    pub async fn write_dirty(&mut self, file: &dyn Storage) -> Result<bool> {
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(k, _)| *k)
            .collect();
        dirty.sort_unstable();
        for off in &dirty {
            if let Some(what) = self.overlaps_protected(*off, self.cluster_size()) {
                return Err(Error::Corrupt(format!(
                    "Preventing invalid write on metadata (refcount block at {off:#x} \
                     overlaps with {what})"
                )));
            }
            let Some(b) = self.blocks.get_mut(off) else {
                continue;
            };
            file.write_at(*off, &b.data)
                .await
                .ctx("cannot write a refcount block")?;
            b.dirty = false;
        }
        Ok(!dirty.is_empty())
    }

    /// Whether any cached block waits to be written.
    pub fn has_dirty(&self) -> bool {
        self.blocks.values().any(|b| b.dirty)
    }

    /// The refcount of host cluster `cluster`.
    pub async fn get(&mut self, file: &dyn Storage, cluster: u64) -> Result<u64> {
        let per = self.block_entries();
        let Some(off) = self.block_offset(cluster / per)? else {
            return Ok(0);
        };
        let order = self.order;
        if let Some(block) = self.blocks.get(&off) {
            return Ok(read_entry(&block.data, order, cluster % per));
        }
        let block = self.block(file, off).await?;
        Ok(read_entry(&block.data, order, cluster % per))
    }

    /// Set the refcount of `cluster`, whose block must exist, in the cache (marked dirty).
    async fn put(
        &mut self,
        file: &dyn Storage,
        block_off: u64,
        cluster: u64,
        value: u64,
    ) -> Result<()> {
        if let Some(what) = self.overlaps_protected(block_off, self.cluster_size()) {
            return Err(Error::Corrupt(format!(
                "Preventing invalid write on metadata (refcount block at {block_off:#x} \
                 overlaps with {what})"
            )));
        }
        let per = self.block_entries();
        let order = self.order;
        let idx = cluster % per;
        let block = self.block(file, block_off).await?;
        write_entry(&mut block.data, order, idx, value);
        block.dirty = true;
        Ok(())
    }

    /// Set the refcount of `cluster`, creating its refcount block (and growing the table) when
    /// missing. Changes stay in the cache until the image writes its metadata back.
    pub async fn set(&mut self, file: &dyn Storage, cluster: u64, value: u64) -> Result<()> {
        if value > self.max_value() {
            return Err(Error::Corrupt(format!(
                "refcount of cluster {cluster} would overflow"
            )));
        }
        let ti = cluster / self.block_entries();
        let off = match self.block_offset(ti)? {
            Some(off) => off,
            None if value == 0 => return Ok(()),
            None => self.new_block(file, ti).await?,
        };
        self.put(file, off, cluster, value).await?;
        if value == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Add `delta` to the refcount of `cluster`.
    pub async fn adjust(&mut self, file: &dyn Storage, cluster: u64, delta: i64) -> Result<()> {
        let old = self.get(file, cluster).await?;
        let new = old.checked_add_signed(delta).ok_or_else(|| {
            Error::Corrupt(format!("refcount of cluster {cluster} would underflow"))
        })?;
        self.set(file, cluster, new).await
    }

    fn is_protected(&self, cluster: u64) -> bool {
        let off = cluster << self.cluster_bits;
        off == 0 || self.protected.iter().any(|(s, e)| off >= *s && off < *e)
    }

    /// Which protected metadata (header, L1 table, refcount table) `off..off + len` overlaps.
    pub fn overlaps_protected(&self, off: u64, len: u64) -> Option<&'static str> {
        let end = off.saturating_add(len);
        if off < self.cluster_size() {
            return Some("qcow2_header");
        }
        if off < self.table_offset + u64::from(self.table_clusters) * self.cluster_size()
            && end > self.table_offset
        {
            return Some("refcount table");
        }
        self.protected
            .iter()
            .any(|(s, e)| off < *e && end > *s)
            .then_some("active L1 table")
    }

    /// Whether the refcount table points at a block at host offset `off`.
    pub fn is_block(&self, off: u64) -> bool {
        off != 0 && self.block_set.contains(&off)
    }

    /// Find `n` contiguous free clusters at or after the hint (no refcounts changed). The
    /// search looks at most [`SCAN_BUDGET`] entries from the hint, moving the hint past the
    /// used clusters it saw; when that finds nothing it appends after the end of the image
    /// (and of everything allocated since open), where a refcount claiming use can only be a
    /// leak, and the hint moves there.
    pub(crate) async fn find_free(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let file_end = file
            .len()
            .await
            .ctx("cannot get the image size")?
            .div_ceil(cs);
        let end = file_end.max(self.alloc_end).max(1);
        let from = self.free_hint.max(1);
        if from < end {
            if let Some(c) = self.scan(file, from, end, n, false).await? {
                return Ok(c);
            }
        }
        let at = from.max(end);
        let c = self
            .scan(file, at, u64::MAX, n, true)
            .await?
            .ok_or_else(|| Error::Unsupported("no free cluster found in the image".into()))?;
        if end.saturating_sub(from) > SCAN_BUDGET {
            // The used area was too long to search: later searches start here. A pinned free
            // cluster in a searched area keeps the hint below it instead.
            self.free_hint = c;
        }
        Ok(c)
    }

    /// Look for `n` free clusters from cluster `from` up to `limit`, at most [`SCAN_BUDGET`]
    /// entries. `past_end`: refcounts do not matter (the clusters lie past everything in use).
    async fn scan(
        &mut self,
        file: &dyn Storage,
        from: u64,
        limit: u64,
        n: u64,
        past_end: bool,
    ) -> Result<Option<u64>> {
        let mut start = from;
        let mut run = 0;
        let mut used_prefix = !past_end && from == self.free_hint.max(1);
        for c in from..from.saturating_add(SCAN_BUDGET).min(limit) {
            if (c + 1) << self.cluster_bits > MAX_HOST_OFFSET {
                return Err(Error::Unsupported("image is full".into()));
            }
            self.scanned += 1;
            let blocked = self.is_protected(c) || self.pins.is_pinned(c);
            let used = !past_end && !blocked && self.get(file, c).await? != 0;
            if !blocked && !used {
                if run == 0 {
                    start = c;
                }
                run += 1;
                if run == n {
                    return Ok(Some(start));
                }
            } else {
                run = 0;
            }
            if used_prefix {
                if used || self.is_protected(c) {
                    // Everything up to here is in use: later searches start after it.
                    self.free_hint = c + 1;
                } else {
                    used_prefix = false;
                }
            }
        }
        Ok(None)
    }

    /// Allocate `n` contiguous clusters with refcount 1 and return the first host offset.
    /// The refcount writes are not flushed: the caller flushes before linking the clusters.
    pub async fn alloc(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        'retry: loop {
            let first = self.find_free(file, n).await?;
            for c in first..first + n {
                let ti = c / self.block_entries();
                if usize::try_from(ti).map_or(true, |i| i >= self.table.len()) {
                    self.grow_table(file, ti).await?;
                    continue 'retry;
                }
                if self.block_offset(ti)?.is_none() {
                    // The block goes to the first free cluster (describing itself when that
                    // lies in its own range), as QEMU places it, then the search starts
                    // again. Putting it at `c` instead could march forever: a run as long
                    // as a block's range, starting right after a new block, always ends
                    // on the next range's first cluster.
                    Box::pin(self.new_block(file, ti)).await?;
                    continue 'retry;
                }
            }
            for c in first..first + n {
                let ti = c / self.block_entries();
                let off = self.block_offset(ti)?.ok_or_else(|| {
                    Error::Corrupt(format!("refcount block for cluster {c} vanished"))
                })?;
                self.put(file, off, c, 1).await?;
            }
            if first == self.free_hint.max(1) {
                self.free_hint = first + n;
            }
            self.alloc_end = self.alloc_end.max(first + n);
            return Ok(first << self.cluster_bits);
        }
    }

    /// Create the refcount block for table index `ti` somewhere free and return its offset.
    async fn new_block(&mut self, file: &dyn Storage, ti: u64) -> Result<u64> {
        if usize::try_from(ti).map_or(true, |i| i >= self.table.len()) {
            Box::pin(self.grow_table(file, ti)).await?;
            if let Some(off) = self.block_offset(ti)? {
                return Ok(off);
            }
        }
        let c = self.find_free(file, 1).await?;
        if c / self.block_entries() == ti {
            return self.install_block(file, ti, c).await;
        }
        // Elsewhere: the block's own cluster is counted in another block.
        let off = Box::pin(self.alloc(file, 1)).await?;
        self.install_block_at(file, ti, off, None).await
    }

    /// Make cluster `c` (in range `ti`) the refcount block for `ti`, describing itself.
    async fn install_block(&mut self, file: &dyn Storage, ti: u64, c: u64) -> Result<u64> {
        let off = c << self.cluster_bits;
        self.install_block_at(file, ti, off, Some(c % self.block_entries()))
            .await
    }

    async fn install_block_at(
        &mut self,
        file: &dyn Storage,
        ti: u64,
        off: u64,
        self_index: Option<u64>,
    ) -> Result<u64> {
        if usize::try_from(ti).map_or(true, |i| i >= self.table.len()) {
            return Err(Error::Corrupt(format!("refcount table has no entry {ti}")));
        }
        self.alloc_end = self.alloc_end.max((off >> self.cluster_bits) + 1);
        // The block's own refcount (in another block) is durable before the table points at it.
        self.write_dirty(file).await?;
        let mut block = vec![0u8; self.cluster_size() as usize];
        if let Some(i) = self_index {
            write_entry(&mut block, self.order, i, 1);
        }
        file.write_at(off, &block)
            .await
            .ctx("cannot write a refcount block")?;
        file.flush().await.ctx("cannot flush the image")?;
        self.table[ti as usize] = off;
        self.block_set.insert(off);
        file.write_at(self.table_offset + ti * 8, &off.to_be_bytes())
            .await
            .ctx("cannot write the refcount table")?;
        file.flush().await.ctx("cannot flush the image")?;
        self.blocks.insert(
            off,
            Block {
                data: block,
                dirty: false,
            },
        );
        Ok(off)
    }

    /// Build a larger refcount table at the end of the used area, covering index `ti`, with
    /// refcount blocks for its own clusters; flush it, switch the header, free the old one.
    async fn grow_table(&mut self, file: &dyn Storage, ti: u64) -> Result<()> {
        let per = self.block_entries();
        let cs = self.cluster_size();
        let file_end = file
            .len()
            .await
            .ctx("cannot get the image size")?
            .div_ceil(cs);
        // Past every range the old table covers, so each new block's range is new.
        let start = file_end
            .max(self.alloc_end)
            .max(self.free_hint)
            .max(self.table.len() as u64 * per);
        // Fixed point: blocks then table at `start`, big enough to describe themselves.
        let (mut nblocks, mut tclusters) = (1u64, 1u64);
        loop {
            let end = start + nblocks + tclusters;
            let first_ti = start / per;
            let last_ti = (end - 1) / per;
            let entries = (last_ti + 1).max(ti + 1).max(self.table.len() as u64);
            let entries = entries + entries / 2; // room to grow, as QEMU leaves some
            let need_t = (entries * 8).div_ceil(cs);
            let need_b = last_ti - first_ti + 1;
            if need_t == tclusters && need_b == nblocks {
                break;
            }
            (nblocks, tclusters) = (need_b, need_t);
        }
        if tclusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge("Reference count table"));
        }
        let mut table = self.table.clone();
        table.resize((tclusters * cs / 8) as usize, 0);
        let first_ti = start / per;
        let meta_end = start + nblocks + tclusters;
        for b in 0..nblocks {
            let bti = first_ti + b;
            let mut block = vec![0u8; cs as usize];
            for c in (bti * per).max(start)..((bti + 1) * per).min(meta_end) {
                write_entry(&mut block, self.order, c % per, 1);
            }
            let off = (start + b) * cs;
            file.write_at(off, &block)
                .await
                .ctx("cannot write a refcount block")?;
            table[bti as usize] = off;
        }
        let new_off = (start + nblocks) * cs;
        file.write_at(new_off, &words_to_be(&table))
            .await
            .ctx("cannot write the refcount table")?;
        file.flush().await.ctx("cannot flush the image")?;
        let mut field = new_off.to_be_bytes().to_vec();
        field.extend_from_slice(&(tclusters as u32).to_be_bytes());
        file.write_at(HEADER_REFTABLE_FIELD, &field)
            .await
            .ctx("cannot write the image header")?;
        file.flush().await.ctx("cannot flush the image")?;
        let (old_off, old_clusters) = (self.table_offset, u64::from(self.table_clusters));
        self.protected.retain(|(s, _)| *s != old_off);
        self.protected.push((new_off, new_off + tclusters * cs));
        self.block_set = block_set(&table);
        self.table = table;
        self.table_offset = new_off;
        self.table_clusters = tclusters as u32;
        self.alloc_end = self.alloc_end.max(meta_end);
        for c in 0..old_clusters {
            Box::pin(self.set(file, (old_off >> self.cluster_bits) + c, 0)).await?;
        }
        Ok(())
    }
}

/// The block offsets a refcount table points at.
fn block_set(table: &[u64]) -> HashSet<u64, OffsetHash> {
    table
        .iter()
        .map(|e| e & REFT_OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect()
}

/// Read entry `i` of a refcount block of width `1 << order` bits.
pub(crate) fn read_entry(block: &[u8], order: u32, i: u64) -> u64 {
    let i = i as usize;
    match order {
        0..=2 => {
            let width = 1usize << order;
            let per_byte = 8 / width;
            let byte = block.get(i / per_byte).copied().unwrap_or(0);
            u64::from(byte >> ((i % per_byte) * width)) & ((1 << width) - 1)
        }
        _ => {
            let n = 1usize << (order - 3);
            let Some(b) = block.get(i * n..i * n + n) else {
                return 0;
            };
            b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
        }
    }
}

/// Write entry `i`; returns the byte range that changed.
pub(crate) fn write_entry(block: &mut [u8], order: u32, i: u64, value: u64) -> (usize, usize) {
    let i = i as usize;
    match order {
        0..=2 => {
            let width = 1usize << order;
            let per_byte = 8 / width;
            let shift = (i % per_byte) * width;
            let mask = (((1u16 << width) - 1) as u8) << shift;
            let at = i / per_byte;
            if let Some(b) = block.get_mut(at) {
                *b = (*b & !mask) | (((value as u8) << shift) & mask);
            }
            (at, at + 1)
        }
        _ => {
            let n = 1usize << (order - 3);
            let bytes = value.to_be_bytes();
            if let Some(b) = block.get_mut(i * n..i * n + n) {
                b.copy_from_slice(&bytes[8 - n..]);
            }
            (i * n, i * n + n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bit_entries_pack_lsb_first() {
        let mut b = vec![0u8; 2];
        write_entry(&mut b, 0, 1, 1);
        write_entry(&mut b, 0, 9, 1);
        assert_eq!(b, vec![0b10, 0b10]);
    }

    #[test]
    fn sixteen_bit_entries_are_big_endian() {
        let mut b = vec![0u8; 8];
        write_entry(&mut b, 4, 2, 0x1234);
        assert_eq!((read_entry(&b, 4, 2), b[4], b[5]), (0x1234, 0x12, 0x34));
    }

    #[test]
    fn four_bit_entries_round_trip() {
        let mut b = vec![0u8; 4];
        write_entry(&mut b, 2, 3, 0xf);
        write_entry(&mut b, 2, 2, 0x5);
        assert_eq!((read_entry(&b, 2, 3), read_entry(&b, 2, 2)), (0xf, 0x5));
    }
}
