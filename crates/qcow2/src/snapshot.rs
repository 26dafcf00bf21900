//! Internal snapshots (qcow2.txt, "Snapshots"), as QEMU 10.0.2 keeps them
//! (`block/qcow2-snapshot.c`): listed from the table loaded on open, created, deleted and
//! reverted to, with the VM state stored where QEMU stores it.
//!
//! A snapshot is an L1 table of its own plus a table entry. Every L2 table and every host
//! cluster the snapshot's tree reaches holds one reference per path to it, so a cluster
//! shared with the active image has a refcount above 1 and no COPIED flag in the active
//! tables: the next guest write to it copies it first (`write.rs`).
//!
//! Callers quiesce guest I/O first, as QEMU drains; each operation also waits for the
//! writes that are changing L2 entries and writes all cached metadata back before it starts.
//!
//! Crash safety of create, delete and revert. All three change refcounts and the COPIED flags that
//! describe them, which `qemu-img check` counts as corruption when they disagree, so none
//! writes live metadata in place: each is one metadata switch (`switch.rs`). Create records
//! one more reference to every cluster and L2 table the active L1 reaches (the new snapshot's
//! paths); delete one fewer for the snapshot's tree and its L1 table. Then every active L2
//! table with an entry whose flag would be wrong afterwards is copied with the flag fixed
//! (the copy takes the active path from the original), and the new active L1, the new
//! snapshot's L1 copy, the new snapshot table, copies of the changed refcount blocks and a
//! new refcount table go to free clusters and are flushed. One write of the header's first
//! sector then switches the L1 table, the refcount table and the snapshot table together:
//! that write is the commit point. A crash before it leaves the old image with unused free
//! clusters, after it the new one, so the snapshot is there entirely or not at all and
//! `qemu-img check` finds neither corruption nor leaks. The snapshot table may grow or move
//! freely: it is always written to new clusters. Only VM state is written before the switch
//! (to clusters allocated the usual way), so a crash with VM state can leak it.
//!
//! Revert is a switch as well: the snapshot's tree gains a reference, the active tree loses
//! one, and the snapshot's L1 table (flags fixed through copies as above) becomes the new
//! active L1 with the snapshot's virtual size, all in the same header write.
//!
//! The VM state lives in the snapshot's own tree past the guest's data: from the first L1
//! entry the disk does not use (QEMU's `qcow2_vm_state_offset`). QEMU writes it through the
//! active table and discards it there once the snapshot holds it; this library writes it
//! into new clusters only the snapshot's L1 table points at, which leaves the same image.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::MutexGuard;

use crate::error::{Error, IoContext, Result};
use crate::header::{validate_table, MAX_HOST_OFFSET, MAX_L1_BYTES, MAX_SNAPSHOTS};
use crate::image::{check_in_file, Image, Meta};
use crate::l2::{
    entry_at, words_from_be, words_to_be, L2Entry, COMPRESSED, COPIED, L1_OFFSET_MASK,
    L1_RESERVED_MASK, L2_OFFSET_MASK,
};
use crate::snapshot_table::{self, c_str, Entry, ParseError};
use crate::switch::{HeaderTables, Switch};

/// Header offset of `nb_snapshots` (followed by `snapshots_offset`).
/// Bytes of the snapshot table read first on open (more when it is longer).
const FIRST_READ_BYTES: usize = 64 << 10;

/// A snapshot as QMP's `SnapshotInfo` and `qemu-img snapshot -l` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The ID string (QEMU numbers snapshots "1", "2", …).
    pub id: String,
    /// The name (QEMU's "tag").
    pub name: String,
    /// Wall clock when it was taken: seconds since the epoch.
    pub date_sec: u32,
    /// … and nanoseconds.
    pub date_nsec: u32,
    /// Guest run time when it was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state (0: a disk-only snapshot).
    pub vm_state_size: u64,
    /// Instructions executed under record/replay, when recorded.
    pub icount: Option<u64>,
    /// Virtual disk size when it was taken.
    pub disk_size: u64,
}

impl SnapshotInfo {
    fn from_entry(e: &Entry) -> Self {
        Self {
            id: String::from_utf8_lossy(c_str(&e.id)).into_owned(),
            name: String::from_utf8_lossy(c_str(&e.name)).into_owned(),
            date_sec: e.date_sec,
            date_nsec: e.date_nsec,
            vm_clock_nsec: e.vm_clock_nsec,
            vm_state_size: e.vm_state_size,
            icount: e.icount,
            disk_size: e.disk_size,
        }
    }
}

/// What to record in a new snapshot; its ID is chosen as QEMU chooses it.
#[derive(Debug, Clone)]
pub struct NewSnapshot<'a> {
    /// The name; it must be new and not empty.
    pub name: &'a str,
    /// Wall clock: seconds since the epoch.
    pub date_sec: u32,
    /// … and nanoseconds.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instructions executed under record/replay (`None`: not recorded).
    pub icount: Option<u64>,
    /// The VM state to store with it (empty: a disk-only snapshot).
    pub vm_state: &'a [u8],
}

impl<'a> NewSnapshot<'a> {
    /// A disk-only snapshot named `name`, dated now, VM clock 0, no icount.
    pub fn new(name: &'a str) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            name,
            date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            icount: None,
            vm_state: &[],
        }
    }
}

/// One snapshot table change, as [`Image::switch_snapshots`] carries it out.
struct Plan {
    /// Refcount changes of the snapshot trees added or removed.
    sw: Switch,
    /// The snapshot table after the change (a new snapshot last, its L1 offset still 0).
    entries: Vec<Entry>,
    /// Active L1 entries whose tables may need other COPIED flags.
    active_upto: usize,
    /// The L1 table of a new snapshot.
    sn_l1: Option<Vec<u64>>,
    /// A new active L1 table (a revert) instead of the current one, and the virtual size
    /// that goes with it.
    active: Option<(Vec<u64>, u64)>,
}

/// QEMU's lookup for goto: the ID first, then the name.
fn find_id_or_name(entries: &[Entry], key: &str) -> Option<usize> {
    entries
        .iter()
        .position(|e| e.has_id(key))
        .or_else(|| entries.iter().position(|e| e.has_name(key)))
}

/// QEMU's lookup for delete: every field given must match.
fn find_id_and_name(entries: &[Entry], id: Option<&str>, name: Option<&str>) -> Option<usize> {
    entries
        .iter()
        .position(|e| id.is_none_or(|id| e.has_id(id)) && name.is_none_or(|name| e.has_name(name)))
}

impl Image {
    /// Read and check the snapshot table (on open), with QEMU's limits and messages.
    pub(crate) async fn open_snapshots(&self, meta: &mut Meta) -> Result<()> {
        let (nb, off) = (meta.header.nb_snapshots, meta.header.snapshots_offset);
        if nb == 0 {
            return Ok(());
        }
        let min_bytes = u64::from(nb) * snapshot_table::FIXED_BYTES as u64;
        validate_table("Snapshot table", off, min_bytes, self.geo.cluster_size())?;
        let cap = snapshot_table::MAX_TABLE_BYTES as usize + 64;
        let mut want = FIRST_READ_BYTES.min(nb as usize * 128);
        loop {
            let mut buf = vec![0u8; want];
            self.file
                .read_at(off, &mut buf)
                .await
                .ctx("Failed to read snapshot table")?;
            match snapshot_table::parse(&buf, nb, meta.header.size) {
                Ok((entries, bytes)) => {
                    meta.snapshots = entries;
                    meta.snapshots_bytes = bytes;
                    return Ok(());
                }
                Err(ParseError::Invalid(e)) => return Err(e),
                Err(ParseError::Short(n)) => want = n.max(want * 2).min(cap),
            }
        }
    }

    /// The snapshots, in table order.
    pub async fn snapshots(&self) -> Vec<SnapshotInfo> {
        let meta = self.meta.lock().await;
        meta.snapshots
            .iter()
            .map(SnapshotInfo::from_entry)
            .collect()
    }

    /// Take a snapshot of the disk as it is now (and store `new.vm_state` with it).
    pub async fn create_snapshot(&self, new: &NewSnapshot<'_>) -> Result<SnapshotInfo> {
        self.check_writable()?;
        // An empty name is valid (QEMU's `snapshot-save` takes one); QMP's
        // `blockdev-snapshot-internal-sync` refuses it before it gets here.
        if new.name.len() > usize::from(u16::MAX) {
            return Err(Error::InvalidOption(
                "snapshot name longer than 65535 bytes".into(),
            ));
        }
        let mut meta = self.quiesce().await?;
        self.check_snapshots_supported()?;
        if meta.snapshots.iter().any(|e| e.has_name(new.name)) {
            return Err(Error::SnapshotExists(new.name.to_string()));
        }
        if meta.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::TooManySnapshots);
        }
        let guest_l1 = meta.header.l1_entries_for(self.size()) as usize;
        // With a VM state the snapshot's own tree replaces whatever the active table holds
        // past the guest's data (left there by a revert to a snapshot with VM state).
        let copied = match new.vm_state.is_empty() {
            true => meta.l1.len(),
            false => guest_l1.min(meta.l1.len()),
        };
        let shared = meta.l1[..copied].to_vec();
        let tree = self.tree_clusters(&mut meta, &shared).await?;
        self.check_clusters(&mut meta, &tree, true).await?;
        // The snapshot takes the active tables as they are, COPIED flags and all (`qemu-img
        // check` looks at the flags of the active tables only).
        let mut sn_l1: Vec<u64> = shared.iter().map(|e| e & !COPIED).collect();
        if !new.vm_state.is_empty() {
            // New clusters only the snapshot will name: a crash before the switch leaks them.
            sn_l1.resize(guest_l1, 0);
            let vm = self
                .write_vm_state(&mut meta, guest_l1, new.vm_state)
                .await?;
            sn_l1.extend(vm);
        }
        let mut sw = Switch::new(meta.rc.block_entries());
        for c in tree {
            sw.add(c, 1);
        }
        let mut entries = meta.snapshots.clone();
        entries.push(self.new_entry(&meta, new, sn_l1.len()));
        let plan = Plan {
            sw,
            entries,
            active_upto: copied,
            sn_l1: Some(sn_l1),
            active: None,
        };
        let entries = self.switch_snapshots(&mut meta, plan).await?;
        let entry = entries.last().expect("the new snapshot was pushed last");
        Ok(SnapshotInfo::from_entry(entry))
    }

    /// Delete the snapshot matching every field given (QMP's
    /// `blockdev-snapshot-delete-internal-sync`); returns what it was.
    pub async fn delete_snapshot(
        &self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<SnapshotInfo> {
        self.check_writable()?;
        if id.is_none() && name.is_none() {
            return Err(Error::SnapshotUnnamed);
        }
        let mut meta = self.quiesce().await?;
        self.check_snapshots_supported()?;
        let i =
            find_id_and_name(&meta.snapshots, id, name).ok_or_else(|| Error::SnapshotNotFound {
                id: id.map(str::to_string),
                name: name.map(str::to_string),
            })?;
        let entry = meta.snapshots[i].clone();
        let l1 = self.snapshot_l1(&entry).await?;
        let tree = self.tree_clusters(&mut meta, &l1).await?;
        self.check_clusters(&mut meta, &tree, false).await?;
        let mut sw = Switch::new(meta.rc.block_entries());
        for c in tree {
            sw.add(c, -1);
        }
        let bytes = u64::from(entry.l1_size) * 8;
        if bytes > 0 && meta.rc.overlaps_protected(entry.l1_offset, bytes).is_none() {
            sw.free(entry.l1_offset, bytes, self.geo.cluster_size());
        }
        let mut entries = meta.snapshots.clone();
        entries.remove(i);
        let upto = meta.l1.len();
        let plan = Plan {
            sw,
            entries,
            active_upto: upto,
            sn_l1: None,
            active: None,
        };
        self.switch_snapshots(&mut meta, plan).await?;
        Ok(SnapshotInfo::from_entry(&entry))
    }

    /// Make the disk what it was when snapshot `id_or_name` (an ID, else a name, as QEMU
    /// looks it up) was taken, its size included. The snapshot stays.
    ///
    /// One metadata switch (`switch.rs`): the snapshot's tree gains a reference and the
    /// active tree loses one, a new active L1 table (the snapshot's, with L2 tables whose
    /// COPIED flags change copied and fixed) and the size become live with one header write.
    /// A crash leaves the image before or after the revert, without leaks.
    pub async fn revert_snapshot(&self, id_or_name: &str) -> Result<SnapshotInfo> {
        self.begin_write().await?;
        let mut meta = self.quiesce().await?;
        self.check_snapshots_supported()?;
        let entry = self.find_for_goto(&meta, id_or_name)?;
        let needed = crate::write::l1_entries_checked(&meta.header, entry.disk_size)?;
        let mut l1 = self.snapshot_l1(&entry).await?;
        let sn_tree = self.tree_clusters(&mut meta, &l1).await?;
        self.check_clusters(&mut meta, &sn_tree, true).await?;
        let old = meta.l1.clone();
        let old_tree = self.tree_clusters(&mut meta, &old).await?;
        self.check_clusters(&mut meta, &old_tree, false).await?;
        let mut sw = Switch::new(meta.rc.block_entries());
        for c in sn_tree {
            sw.add(c, 1);
        }
        for c in old_tree {
            sw.add(c, -1);
        }
        l1.resize(l1.len().max(needed as usize), 0);
        let plan = Plan {
            sw,
            entries: meta.snapshots.clone(),
            active_upto: l1.len(),
            sn_l1: None,
            active: Some((l1, entry.disk_size)),
        };
        self.switch_snapshots(&mut meta, plan).await?;
        Ok(SnapshotInfo::from_entry(&entry))
    }

    /// Read `buf.len()` bytes of snapshot `id_or_name`'s VM state from byte `pos`.
    pub async fn read_vm_state(&self, id_or_name: &str, pos: u64, buf: &mut [u8]) -> Result<()> {
        let mut meta = self.meta.lock().await;
        let entry = self.find_for_goto(&meta, id_or_name)?;
        let len = buf.len() as u64;
        if pos
            .checked_add(len)
            .is_none_or(|end| end > entry.vm_state_size)
        {
            return Err(Error::OutOfRange {
                offset: pos,
                len,
                size: entry.vm_state_size,
            });
        }
        let l1 = self.snapshot_l1(&entry).await?;
        let (cs, per) = (self.geo.cluster_size(), self.geo.l2_entries());
        let span = meta.header.l1_span();
        let start = entry
            .disk_size
            .div_ceil(span)
            .checked_mul(span)
            .and_then(|v| v.checked_add(pos))
            .ok_or_else(|| Error::Corrupt("VM state offset overflows".into()))?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = start + done as u64;
            let (gc, a) = (at / cs, at % cs);
            let n = ((cs - a) as usize).min(buf.len() - done);
            let e = self.tree_entry(&mut meta, &l1, gc / per, gc % per).await?;
            let data = self.read_old(e, gc, a, a + n as u64, None).await?;
            buf[done..done + n].copy_from_slice(&data);
            done += n;
        }
        Ok(())
    }

    fn find_for_goto(&self, meta: &Meta, key: &str) -> Result<Entry> {
        let i = find_id_or_name(&meta.snapshots, key).ok_or_else(|| Error::SnapshotNotFound {
            id: None,
            name: Some(key.to_string()),
        })?;
        Ok(meta.snapshots[i].clone())
    }

    fn check_snapshots_supported(&self) -> Result<()> {
        if self.geo.data_file {
            return Err(Error::Unsupported(
                "internal snapshots are not supported with an external data file".into(),
            ));
        }
        Ok(())
    }

    /// The metadata lock once no write is changing an L2 entry and all cached metadata is
    /// written back and flushed.
    async fn quiesce(&self) -> Result<MutexGuard<'_, Meta>> {
        let mut meta = self.meta.lock().await;
        while let Some(&gc) = meta.inflight.keys().next() {
            meta = self.wait_idle(meta, gc).await;
        }
        self.writeback(&mut meta).await?;
        self.sync_storages().await?;
        // Compressed clusters are not packed into a cluster a snapshot may now share.
        meta.compress_tail = 0;
        Ok(meta)
    }

    /// A snapshot's L1 table, checked as QEMU checks it before use.
    async fn snapshot_l1(&self, e: &Entry) -> Result<Vec<u64>> {
        let bytes = u64::from(e.l1_size) * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::TooLarge("Snapshot L1 table"));
        }
        let cs = self.geo.cluster_size();
        validate_table("Snapshot L1 table", e.l1_offset, bytes, cs)?;
        let file_len = self.file.len().await.ctx("cannot get the image size")?;
        check_in_file("Snapshot L1 table", e.l1_offset, bytes, file_len, cs)?;
        let mut raw = vec![0u8; bytes as usize];
        self.file
            .read_at(e.l1_offset, &mut raw)
            .await
            .ctx("cannot read a snapshot L1 table")?;
        Ok(words_from_be(&raw))
    }

    /// The entry for index `idx` of the L2 table behind `l1[l1i]` (zero when there is none).
    async fn tree_entry(&self, meta: &mut Meta, l1: &[u64], l1i: u64, idx: u64) -> Result<L2Entry> {
        let e = usize::try_from(l1i)
            .ok()
            .and_then(|i| l1.get(i).copied())
            .unwrap_or(0);
        let Some(off) = self.l2_of(e)? else {
            return Ok(L2Entry::default());
        };
        let table = self.l2_table(meta, off).await?;
        let entry = entry_at(&table, idx as usize, self.geo.extended);
        self.geo.validate(entry)?;
        Ok(entry)
    }

    /// The L2 table offset an L1 entry names, if any; checks the entry.
    fn l2_of(&self, e: u64) -> Result<Option<u64>> {
        let off = e & L1_OFFSET_MASK;
        if e & L1_RESERVED_MASK != 0 || !off.is_multiple_of(self.geo.cluster_size()) {
            return Err(Error::Corrupt(format!("invalid L1 entry {e:#x}")));
        }
        Ok((off != 0).then_some(off))
    }

    /// The host clusters an L2 entry uses (compressed data may span two).
    fn entry_clusters(&self, e: L2Entry) -> Option<(u64, u64)> {
        let cb = self.geo.cluster_bits;
        if e.word & COMPRESSED != 0 {
            let (off, len) = self.geo.compressed_extent(e.word);
            Some((off >> cb, (off + len - 1) >> cb))
        } else if self.geo.is_allocated(e) {
            let c = (e.word & L2_OFFSET_MASK) >> cb;
            Some((c, c))
        } else {
            None
        }
    }

    /// Every cluster the tree under `l1` uses, once per path to it: each L2 table's data
    /// clusters, then the table.
    async fn tree_clusters(&self, meta: &mut Meta, l1: &[u64]) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for &e in l1 {
            let Some(off) = self.l2_of(e)? else {
                continue;
            };
            let table = self.l2_table(meta, off).await?;
            for j in 0..self.geo.l2_entries() as usize {
                let entry = entry_at(&table, j, self.geo.extended);
                self.geo.validate(entry)?;
                if let Some((first, last)) = self.entry_clusters(entry) {
                    out.extend(first..=last);
                }
            }
            out.push(off >> self.geo.cluster_bits);
        }
        Ok(out)
    }

    /// Check every cluster of a tree: entries are valid (the caller read them), every
    /// cluster is counted and is no metadata of the image's own, and (`raise`) one more
    /// reference fits.
    async fn check_clusters(&self, meta: &mut Meta, tree: &[u64], raise: bool) -> Result<()> {
        let cs = self.geo.cluster_size();
        let file = self.file.as_ref();
        for &c in tree {
            let off = c.checked_mul(cs).filter(|o| *o < MAX_HOST_OFFSET);
            let own = off
                .is_none_or(|o| meta.rc.overlaps_protected(o, cs).is_some() || meta.rc.is_block(o));
            let rc = meta.rc.get(file, c).await?;
            if own || rc == 0 {
                return Err(Error::Corrupt(format!(
                    "snapshot tree references cluster {c:#x} (refcount {rc})"
                )));
            }
            if raise && rc >= meta.rc.max_value() {
                return Err(Error::Unsupported(format!(
                    "refcount of cluster {c:#x} would overflow"
                )));
            }
        }
        Ok(())
    }

    /// Store `data` as VM state in new clusters and new L2 tables; returns the L1 entries
    /// that map it, for the L1 indexes from `first_l1` on.
    async fn write_vm_state(
        &self,
        meta: &mut Meta,
        first_l1: usize,
        data: &[u8],
    ) -> Result<Vec<u64>> {
        let (cs, per) = (
            self.geo.cluster_size() as usize,
            self.geo.l2_entries() as usize,
        );
        let clusters = data.len().div_ceil(cs);
        let tables = clusters.div_ceil(per);
        if (first_l1 + tables) as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidOption("VM state too large".into()));
        }
        let words = self.geo.entry_words();
        let mut l1 = Vec::with_capacity(tables);
        for t in 0..tables {
            let mut table = vec![0u64; cs / 8];
            for (k, chunk) in data[t * per * cs..].chunks(cs).take(per).enumerate() {
                let host = meta.rc.alloc(self.file.as_ref(), 1).await?;
                self.file
                    .write_at(host, chunk)
                    .await
                    .ctx("cannot write the VM state")?;
                table[k * words] = host | COPIED;
                if self.geo.extended {
                    table[k * words + 1] = u64::from(u32::MAX);
                }
            }
            let off = meta.rc.alloc(self.file.as_ref(), 1).await?;
            self.cache_l2(meta, off, Arc::new(table), true).await?;
            l1.push(off | COPIED);
        }
        // Data, refcounts and tables are durable before an L1 table names them.
        self.writeback(meta).await?;
        self.sync_storages().await?;
        Ok(l1)
    }

    /// The table entry for a new snapshot whose L1 table has `l1_size` entries (its offset
    /// is filled in once placed).
    fn new_entry(&self, meta: &Meta, new: &NewSnapshot<'_>, l1_size: usize) -> Entry {
        Entry {
            l1_offset: 0,
            l1_size: l1_size as u32,
            id: snapshot_table::next_id(&meta.snapshots).into_bytes(),
            name: new.name.as_bytes().to_vec(),
            date_sec: new.date_sec,
            date_nsec: new.date_nsec,
            vm_clock_nsec: new.vm_clock_nsec,
            vm_state_size: new.vm_state.len() as u64,
            disk_size: self.size(),
            icount: new.icount,
            extra_bytes: snapshot_table::KNOWN_EXTRA_BYTES as u32,
            unknown_extra: Vec::new(),
        }
    }

    /// Point the active L1 entries below `upto` at tables whose COPIED flags match the
    /// refcounts `sw` leaves. A table with an entry to change is copied with the flags fixed
    /// (it stays live until the switch, so it is not rewritten): the copy takes the active
    /// path, the original loses it. Returns the new active L1, where each copy's entry is
    /// filled in once placed, and the copies as (L1 index, switch table, entries).
    async fn retarget_active(
        &self,
        meta: &mut Meta,
        sw: &mut Switch,
        mut l1: Vec<u64>,
        upto: usize,
    ) -> Result<(Vec<u64>, Vec<(usize, usize, Vec<u64>)>)> {
        let cb = self.geo.cluster_bits;
        let words = self.geo.entry_words();
        let mut copies = Vec::new();
        for (i, e) in l1.iter_mut().enumerate().take(upto) {
            let Some(off) = self.l2_of(*e)? else {
                continue;
            };
            let table = self.l2_table(meta, off).await?;
            let mut fixed: Option<Vec<u64>> = None;
            for j in 0..self.geo.l2_entries() as usize {
                let entry = entry_at(&table, j, self.geo.extended);
                if entry.word & COMPRESSED != 0 || !self.geo.is_allocated(entry) {
                    continue;
                }
                let alone = self.alone_after(meta, sw, (entry.word & L2_OFFSET_MASK) >> cb);
                if (entry.word & COPIED != 0) != alone.await? {
                    let t = fixed.get_or_insert_with(|| table.to_vec());
                    t[j * words] = entry.word ^ COPIED;
                }
            }
            match fixed {
                Some(t) => {
                    sw.add(off >> cb, -1);
                    copies.push((i, sw.table(self.geo.cluster_size()), t));
                }
                None => {
                    let alone = self.alone_after(meta, sw, off >> cb).await?;
                    *e = (*e & !COPIED) | if alone { COPIED } else { 0 };
                }
            }
        }
        Ok((l1, copies))
    }

    /// Whether cluster `c` has refcount 1 once `sw` is applied.
    async fn alone_after(&self, meta: &mut Meta, sw: &Switch, c: u64) -> Result<bool> {
        let rc = meta.rc.get(self.file.as_ref(), c).await?;
        Ok(rc.checked_add_signed(sw.delta(c)) == Some(1))
    }

    /// Carry out `plan` as one metadata switch (`switch.rs`): the new snapshot table, a new
    /// snapshot's L1 table, and the active tables retargeted so their COPIED flags match.
    /// Returns the snapshot table now live.
    async fn switch_snapshots(&self, meta: &mut Meta, plan: Plan) -> Result<Vec<Entry>> {
        let Plan {
            mut sw,
            mut entries,
            active_upto,
            sn_l1,
            active,
        } = plan;
        let cs = self.geo.cluster_size();
        let (base, size) = match active {
            Some((l1, size)) => (l1, Some(size)),
            None => (meta.l1.clone(), None),
        };
        let (mut l1, copies) = self
            .retarget_active(meta, &mut sw, base, active_upto)
            .await?;
        let new_l1 = (size.is_some() || l1 != meta.l1 || !copies.is_empty()).then(|| {
            let (off, bytes) = (meta.header.l1_table_offset, meta.l1.len() as u64 * 8);
            if bytes > 0 {
                sw.free(off, bytes, cs);
            }
            sw.table(l1.len() as u64 * 8)
        });
        let sn = sn_l1.map(|t| (sw.table(t.len() as u64 * 8), t));
        let table_bytes = snapshot_table::to_bytes(&entries)?.len() as u64;
        let table = sw.table(table_bytes);
        let (old_off, old_len) = (meta.header.snapshots_offset, meta.snapshots_bytes);
        if old_len > 0 && meta.rc.overlaps_protected(old_off, old_len).is_none() {
            sw.free(old_off, old_len, cs);
        }
        let placed = sw.place(&mut meta.rc, self.file.as_ref()).await?;
        let mut contents = vec![Vec::new(); placed.offsets.len()];
        for (i, t, words) in &copies {
            l1[*i] = placed.offsets[*t] | COPIED;
            contents[*t] = words_to_be(words);
        }
        if let Some((t, words)) = &sn {
            if let Some(e) = entries.last_mut() {
                e.l1_offset = placed.offsets[*t];
            }
            contents[*t] = words_to_be(words);
        }
        if let Some(t) = new_l1 {
            contents[t] = words_to_be(&l1);
        }
        contents[table] = snapshot_table::to_bytes(&entries)?;
        let tables = HeaderTables {
            size: size.filter(|s| *s != meta.header.size),
            l1_size: l1.len() as u32,
            l1_offset: new_l1.map_or(meta.header.l1_table_offset, |t| placed.offsets[t]),
            nb_snapshots: entries.len() as u32,
            snapshots_offset: placed.offsets[table],
        };
        let new_offsets: Vec<u64> = copies.iter().map(|(_, t, _)| placed.offsets[*t]).collect();
        self.commit_switch(meta, placed, &contents, tables).await?;
        meta.l1 = l1;
        meta.snapshots = entries.clone();
        meta.snapshots_bytes = table_bytes;
        for (off, (_, _, words)) in new_offsets.into_iter().zip(copies) {
            self.cache_l2(meta, off, Arc::new(words), false).await?;
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;
