//! Metadata switches: refcount changes and new tables that become live together, with one
//! header write.
//!
//! `qemu-img check` wants the COPIED flag of every active L1 and L2 entry to say exactly
//! "refcount is 1" (qcow2.txt, "Cluster mapping"), and counts any mismatch as corruption. An
//! operation that changes a cluster's refcount and the flag describing it (taking or deleting
//! an internal snapshot) therefore cannot write the two in place one after the other: a crash
//! between them leaves an error whichever lands first. A switch never writes live metadata.
//!
//! Order of the writes:
//! 1. New tables (active L1 and L2 tables, a snapshot's L1 table, the snapshot table) go to
//!    clusters that are free in the current image.
//! 2. A copy of every refcount block the operation changes, and a new refcount table that
//!    points at the copies, go to free clusters too. The copies already describe the image
//!    after the switch: the new clusters counted, the clusters the switch replaces (old
//!    tables, old refcount blocks, the old refcount table) counted free.
//! 3. A flush; then the header's bytes 36..72 (L1 size and offset, refcount table offset and
//!    size, snapshot count and offset; from byte 24 when the virtual size changes too), which
//!    lie in its first sector, in one write; a flush.
//!
//! A crash before the header write leaves the old image, in which the new clusters are free
//! space (refcount 0) that nothing names; a crash after it, the new image. Neither holds a
//! leak or a wrong flag. This relies on a sector write being atomic, as every header update
//! does.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use crate::error::{Error, IoContext, Result};
use crate::header::MAX_REFTABLE_BYTES;
use crate::image::{Image, Meta};
use crate::l2::words_to_be;
use crate::refcount::{read_entry, write_entry, OffsetHash, Refcounts};
use crate::storage::Storage;

/// Header offset of the virtual disk size, which a revert may change with the tables.
const HEADER_SIZE: u64 = 24;
/// Header offset of `l1_size`; the table fields a switch writes end at byte 72.
const HEADER_TABLES: u64 = 36;
/// Placement attempts before giving up (each one only grows the refcount area).
const MAX_PLACEMENTS: usize = 64;

/// Refcount changes and new tables that become live together.
#[derive(Debug)]
pub(crate) struct Switch {
    /// Refcount changes by refcount table index: one entry per cluster of that block's range
    /// (dense, as snapshot operations touch nearly every cluster of the ranges they touch).
    deltas: Deltas,
    /// Bytes of each new table, in the order they are asked for.
    tables: Vec<u64>,
}

/// Refcount changes, by refcount table index, then by index in the block.
#[derive(Debug, Clone)]
struct Deltas {
    per: u64,
    blocks: HashMap<u64, Vec<i64>, OffsetHash>,
}

impl Deltas {
    fn add(&mut self, cluster: u64, delta: i64) {
        let per = self.per;
        let block = self
            .blocks
            .entry(cluster / per)
            .or_insert_with(|| vec![0; per as usize]);
        let d = &mut block[(cluster % per) as usize];
        *d = d.saturating_add(delta);
    }

    fn get(&self, cluster: u64) -> i64 {
        self.blocks
            .get(&(cluster / self.per))
            .map_or(0, |b| b[(cluster % self.per) as usize])
    }

    /// The refcount table indexes with a change.
    fn touched(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks
            .iter()
            .filter(|(_, b)| b.iter().any(|d| *d != 0))
            .map(|(ti, _)| *ti)
    }
}

/// Where a switch puts its new tables, and the refcount structures that describe the result.
#[derive(Debug)]
pub(crate) struct Placed {
    /// Host offset of each new table, in the order asked for (0 for an empty one).
    pub offsets: Vec<u64>,
    blocks: Vec<(u64, Vec<u8>)>,
    table: Vec<u64>,
    table_offset: u64,
    /// Clusters whose last reference the switch drops.
    freed: Vec<u64>,
    /// One past the last cluster the switch uses.
    end: u64,
}

/// The header's L1 and snapshot table fields after a switch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeaderTables {
    /// A new virtual disk size (a revert to a snapshot of another size): the write then
    /// starts at the size field (byte 24; the encryption method between stays 0).
    pub size: Option<u64>,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
}

/// Which refcount blocks a placement rewrites and how large the refcount area is.
struct Layout {
    /// Refcount table indexes whose blocks are copied (or created).
    touched: BTreeSet<u64>,
    table_clusters: u64,
    /// Clusters of the refcount area: the blocks, then the table.
    used: u64,
}

impl Switch {
    /// A switch for refcount blocks of `block_entries` entries.
    pub fn new(block_entries: u64) -> Self {
        Self {
            deltas: Deltas {
                per: block_entries,
                blocks: HashMap::default(),
            },
            tables: Vec::new(),
        }
    }

    /// Add `delta` to the refcount of `cluster` (a cluster in use now).
    pub fn add(&mut self, cluster: u64, delta: i64) {
        self.deltas.add(cluster, delta);
    }

    /// The change recorded so far for `cluster`.
    pub fn delta(&self, cluster: u64) -> i64 {
        self.deltas.get(cluster)
    }

    /// Drop one reference to every cluster of host bytes `off..off + bytes`.
    pub fn free(&mut self, off: u64, bytes: u64, cs: u64) {
        for c in off / cs..off.saturating_add(bytes).div_ceil(cs) {
            self.add(c, -1);
        }
    }

    /// Ask for a new table of `bytes`; returns its index in [`Placed::offsets`].
    pub fn table(&mut self, bytes: u64) -> usize {
        self.tables.push(bytes);
        self.tables.len() - 1
    }

    /// Choose free clusters for the new tables and the refcount area, and compute the
    /// refcount blocks and table of the image after the switch. Nothing is written; an error
    /// (a refcount leaving its range on a corrupt image) leaves everything as it was.
    pub async fn place(&self, rc: &mut Refcounts, file: &dyn Storage) -> Result<Placed> {
        let cs = rc.cluster_size();
        let n: u64 = self.tables.iter().map(|b| b.div_ceil(cs)).sum();
        let mut k = 1;
        for _ in 0..MAX_PLACEMENTS {
            let start = rc.find_free(file, n + k).await?;
            let layout = self.layout(rc, start, n)?;
            if layout.used <= k {
                return self.build(rc, file, start, n, layout).await;
            }
            k = layout.used;
        }
        Err(Error::Unsupported(
            "no room found for the refcount structures".into(),
        ))
    }

    /// The refcount blocks to rewrite when the new tables take clusters `start..start + n`
    /// and the refcount area follows them: a fixed point, since the area and the old blocks
    /// it replaces change refcounts in more blocks.
    fn layout(&self, rc: &Refcounts, start: u64, n: u64) -> Result<Layout> {
        let (cs, per) = (rc.cluster_size(), rc.block_entries());
        let old_table = rc.table_offset / cs..rc.table_offset / cs + u64::from(rc.table_clusters);
        let mut touched: BTreeSet<u64> = self
            .deltas
            .touched()
            .chain((start..start + n).map(|c| c / per))
            .chain(old_table.map(|c| c / per))
            .collect();
        loop {
            let last = touched.last().copied().unwrap_or(0);
            let old_len = rc.table.len() as u64;
            let entries = if last >= old_len {
                (last + 1) * 3 / 2
            } else {
                old_len
            };
            let table_clusters = (entries * 8).div_ceil(cs).max(u64::from(rc.table_clusters));
            if table_clusters * cs > MAX_REFTABLE_BYTES {
                return Err(Error::TooLarge("Reference count table"));
            }
            let used = touched.len() as u64 + table_clusters;
            let mut next = touched.clone();
            let area = start + n;
            next.extend((area..area + used).map(|c| c / per));
            for &ti in &touched {
                if let Some(off) = rc.block_offset(ti)? {
                    next.insert(off / cs / per);
                }
            }
            if next.len() == touched.len() {
                return Ok(Layout {
                    touched,
                    table_clusters,
                    used,
                });
            }
            touched = next;
        }
    }

    async fn build(
        &self,
        rc: &mut Refcounts,
        file: &dyn Storage,
        start: u64,
        n: u64,
        layout: Layout,
    ) -> Result<Placed> {
        let (cs, per) = (rc.cluster_size(), rc.block_entries());
        let area = start + n;
        let mut deltas = self.deltas.clone();
        (start..area + layout.used).for_each(|c| deltas.add(c, 1));
        for &ti in &layout.touched {
            if let Some(off) = rc.block_offset(ti)? {
                deltas.add(off / cs, -1);
            }
        }
        let old_table = rc.table_offset / cs;
        (old_table..old_table + u64::from(rc.table_clusters)).for_each(|c| deltas.add(c, -1));
        let mut table = rc.table.clone();
        table.resize((layout.table_clusters * cs / 8) as usize, 0);
        let mut blocks: HashMap<u64, (u64, Vec<u8>), OffsetHash> = HashMap::default();
        for (i, &ti) in layout.touched.iter().enumerate() {
            let data = rc
                .block_copy(file, ti)
                .await?
                .unwrap_or_else(|| vec![0; cs as usize]);
            let off = (area + i as u64) * cs;
            table[ti as usize] = off;
            blocks.insert(ti, (off, data));
        }
        let (order, max) = (rc.order(), rc.max_value());
        let mut freed = Vec::new();
        for (&ti, changes) in &deltas.blocks {
            let Some((_, data)) = blocks.get_mut(&ti) else {
                if changes.iter().all(|d| *d == 0) {
                    continue;
                }
                return Err(Error::Corrupt(format!(
                    "no refcount block {ti} in the switch"
                )));
            };
            for (i, &d) in changes.iter().enumerate().filter(|(_, d)| **d != 0) {
                let (c, i) = (ti * per + i as u64, i as u64);
                let old = read_entry(data, order, i);
                let new = old
                    .checked_add_signed(d)
                    .filter(|v| *v <= max)
                    .ok_or_else(|| {
                        Error::Corrupt(format!(
                            "refcount of cluster {c:#x} would leave its range ({old} {d:+})"
                        ))
                    })?;
                write_entry(data, order, i, new);
                if new == 0 {
                    freed.push(c);
                }
            }
        }
        let mut offsets = Vec::with_capacity(self.tables.len());
        let mut at = start;
        for bytes in &self.tables {
            offsets.push(if *bytes == 0 { 0 } else { at * cs });
            at += bytes.div_ceil(cs);
        }
        Ok(Placed {
            offsets,
            blocks: blocks.into_values().collect(),
            table,
            table_offset: (area + layout.touched.len() as u64) * cs,
            freed,
            end: area + layout.used,
        })
    }
}

impl Image {
    /// Write `contents` (one per table asked for, in order) where `placed` says, then the
    /// refcount structures, and switch the header to them (see the module documentation).
    /// Updates the cached header, L1 protection and refcounts; the caller updates the rest.
    pub(crate) async fn commit_switch(
        &self,
        meta: &mut Meta,
        placed: Placed,
        contents: &[Vec<u8>],
        tables: HeaderTables,
    ) -> Result<()> {
        let file = self.file.as_ref();
        for (off, bytes) in placed.offsets.iter().zip(contents) {
            if !bytes.is_empty() {
                file.write_at(*off, bytes)
                    .await
                    .ctx("cannot write a metadata table")?;
            }
        }
        for (off, data) in &placed.blocks {
            file.write_at(*off, data)
                .await
                .ctx("cannot write a refcount block")?;
        }
        file.write_at(placed.table_offset, &words_to_be(&placed.table))
            .await
            .ctx("cannot write the refcount table")?;
        file.flush().await.ctx("cannot flush the image")?;
        let cs = self.geo.cluster_size();
        let rt_clusters = (placed.table.len() as u64 * 8).div_ceil(cs) as u32;
        let mut field = Vec::with_capacity(48);
        if let Some(size) = tables.size {
            field.extend_from_slice(&size.to_be_bytes());
            field.extend_from_slice(&0u32.to_be_bytes());
        }
        field.extend_from_slice(&tables.l1_size.to_be_bytes());
        field.extend_from_slice(&tables.l1_offset.to_be_bytes());
        field.extend_from_slice(&placed.table_offset.to_be_bytes());
        field.extend_from_slice(&rt_clusters.to_be_bytes());
        field.extend_from_slice(&tables.nb_snapshots.to_be_bytes());
        field.extend_from_slice(&tables.snapshots_offset.to_be_bytes());
        let at = match tables.size {
            Some(_) => HEADER_SIZE,
            None => HEADER_TABLES,
        };
        let written = match file.write_at(at, &field).await {
            Ok(()) => file.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            // The header on disk may be either version now: no metadata write may follow.
            self.corrupt.store(true, Ordering::Release);
            return Err(Error::Io("cannot write the image header", e));
        }
        self.adopt_switch(meta, placed, tables);
        Ok(())
    }

    /// The cached state after a switch is live.
    fn adopt_switch(&self, meta: &mut Meta, placed: Placed, tables: HeaderTables) {
        let cs = self.geo.cluster_size();
        let old_l1 = meta.header.l1_table_offset;
        if tables.l1_offset != old_l1 {
            meta.rc
                .protected
                .retain(|(s, _)| *s != old_l1 || old_l1 == 0);
            let bytes = u64::from(tables.l1_size) * 8;
            meta.rc
                .protected
                .push((tables.l1_offset, tables.l1_offset + bytes));
        }
        if let Some(size) = tables.size {
            meta.header.size = size;
            self.size.store(size, Ordering::Release);
        }
        let h = &mut meta.header;
        h.l1_size = tables.l1_size;
        h.l1_table_offset = tables.l1_offset;
        h.refcount_table_offset = placed.table_offset;
        h.refcount_table_clusters = (placed.table.len() as u64 * 8).div_ceil(cs) as u32;
        h.nb_snapshots = tables.nb_snapshots;
        h.snapshots_offset = tables.snapshots_offset;
        meta.rc
            .install(placed.table, placed.table_offset, placed.blocks);
        meta.rc.alloc_end = meta.rc.alloc_end.max(placed.end);
        if let Some(&low) = placed.freed.iter().min() {
            meta.rc.free_hint = meta.rc.free_hint.min(low);
        }
        for c in placed.freed {
            meta.l2.remove(c * cs);
        }
    }
}
