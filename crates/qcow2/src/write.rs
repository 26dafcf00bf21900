//! Guest writes, write_zeroes, discard and growing the disk.
//!
//! Metadata changes run with the metadata lock held and land in the write-back caches; the
//! image's write-back (`image.rs`) writes them in an order that leaves at worst leaked clusters
//! after a crash (`docs/interop/qcow2.txt`, and DESIGN.md): a cluster's refcount is durable
//! before an L2 table that uses it is written, copied-on-write data is durable before the L2
//! table that exposes it, a new L2 table is durable before the L1 entry points at it, and a
//! reference is dropped only after the table that stopped using it is durable. With lazy
//! refcounts the dirty bit (set first) covers the refcounts.
//!
//! Guest data is written with the lock released. A write into a cluster whose entry stays as
//! it is (allocated, refcount 1, no zero flag) pins the host cluster and writes. A write that
//! changes the entry (allocation, copy-on-write, clearing a zero flag) plans under the lock,
//! allocates, marks the guest cluster in flight, writes unlocked, then updates the entry under
//! the lock again; requests that would change the same entry wait for it.

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::{Error, IoContext, Result};
use crate::image::{Image, Meta};
use crate::l2::{
    words_to_be, L2Entry, Mapping, ALL_ZERO_BITMAP, COMPRESSED, COPIED, L2_OFFSET_MASK, ZERO_FLAG,
};
use crate::pin::Pin;
use crate::storage::Backing;

/// Header offset of `size`.
const HEADER_SIZE: u64 = 24;
/// Header offset of `l1_size` (followed by `l1_table_offset`).
const HEADER_L1: u64 = 36;

/// How a write reaches its cluster.
enum WritePlan {
    /// The entry stays as it is: write the data at `host` (pinned until written).
    InPlace { host: u64, pin: Option<Pin> },
    /// The entry changes: see [`Update`].
    Update(Update),
}

/// A write that changes its cluster's entry, planned under the metadata lock.
struct Update {
    /// The entry when planned (nothing else changes it while the cluster is in flight).
    old: L2Entry,
    /// The entry once the data is written.
    new: L2Entry,
    /// Host cluster the data goes to.
    host: u64,
    /// `host` was allocated for this write.
    fresh: bool,
    /// The copied-on-write parts would be zeros and `host` lies past the end of the file,
    /// where unwritten bytes read as zeros: only the request's bytes are written.
    skip_cow: bool,
    /// Bytes of the cluster written (the request plus what is copied on write).
    ra: u64,
    rb: u64,
    /// Held until the entry is updated; waiters on the in-flight marker wake then.
    _guard: OwnedMutexGuard<()>,
}

/// Bits `s0..=s1` of a subcluster mask.
fn sc_mask(s0: u32, s1: u32) -> u64 {
    let n = s1 - s0 + 1;
    let ones = if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
    u64::from(ones << s0)
}

impl Image {
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Corrupt(
                "image is marked corrupt; writes are refused".into(),
            ));
        }
        Ok(())
    }

    /// Write `buf` at guest `offset`. `backing` supplies the data below this image for the
    /// untouched part of a partially written cluster (zeros without one).
    pub async fn write(
        &self,
        offset: u64,
        buf: &[u8],
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        self.begin_write().await?;
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.geo.cluster_size();
        // Consecutive clusters written in place whose host clusters are adjacent go out in
        // one write: (host offset, start in `buf`, length, the pins that keep them).
        let mut run: Option<(u64, usize, usize, Vec<Option<crate::pin::Pin>>)> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let a = pos % cs;
            let n = ((cs - a) as usize).min(buf.len() - done);
            let plan = self
                .plan_cluster(pos / cs, a, a + n as u64, backing)
                .await?;
            match plan {
                WritePlan::InPlace { host, pin } => match &mut run {
                    Some((h, _, len, pins)) if *h + *len as u64 == host + a => {
                        *len += n;
                        pins.push(pin);
                    }
                    _ => {
                        if let Some((h, at, len, pins)) = run.take() {
                            self.write_run(h, &buf[at..at + len], pins).await?;
                        }
                        run = Some((host + a, done, n, vec![pin]));
                    }
                },
                WritePlan::Update(up) => {
                    if let Some((h, at, len, pins)) = run.take() {
                        self.write_run(h, &buf[at..at + len], pins).await?;
                    }
                    self.write_update(pos / cs, a, &buf[done..done + n], backing, up)
                        .await?;
                }
            }
            done += n;
        }
        if let Some((h, at, len, pins)) = run {
            self.write_run(h, &buf[at..at + len], pins).await?;
        }
        Ok(())
    }

    /// Writes guest data in place at host offset `host`; the pins keep its clusters from
    /// being freed and reused meanwhile.
    async fn write_run(
        &self,
        host: u64,
        data: &[u8],
        pins: Vec<Option<crate::pin::Pin>>,
    ) -> Result<()> {
        let r = self
            .data()
            .write_at(host, data)
            .await
            .ctx("cannot write guest data");
        drop(pins);
        r
    }

    /// The guest contents of cluster `gc` bytes `a..b` as the entry `e` describes them.
    pub(crate) async fn read_old(
        &self,
        e: L2Entry,
        gc: u64,
        a: u64,
        b: u64,
        backing: Option<&dyn Backing>,
    ) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size();
        let mut out = vec![0u8; (b - a) as usize];
        if e.word & COMPRESSED != 0 {
            let (off, len) = self.geo.compressed_extent(e.word);
            let data = self.read_compressed(off, len).await?;
            out.copy_from_slice(&data[a as usize..b as usize]);
            return Ok(out);
        }
        let scs = self.geo.subcluster_size();
        let mut pos = a;
        while pos < b {
            let end = ((pos / scs + 1) * scs).min(b);
            let dst = &mut out[(pos - a) as usize..(end - a) as usize];
            match self.geo.mapping(e, (pos / scs) as u32) {
                Mapping::Data(h) => self
                    .data()
                    .read_at(h + pos, dst)
                    .await
                    .ctx("cannot read guest data")?,
                Mapping::Unallocated => {
                    if let Some(bk) = backing {
                        bk.read(gc * cs + pos, dst)
                            .await
                            .ctx("cannot read the backing data")?;
                    }
                }
                Mapping::Zero | Mapping::Compressed { .. } => {}
            }
            pos = end;
        }
        Ok(out)
    }

    /// Plans a write of bytes `a..b` of guest cluster `gc` (see [`Self::plan_write`]).
    async fn plan_cluster(
        &self,
        gc: u64,
        a: u64,
        b: u64,
        backing: Option<&dyn Backing>,
    ) -> Result<WritePlan> {
        let meta = self.meta.lock().await;
        let mut meta = self.wait_idle(meta, gc).await;
        let r = self
            .plan_write(&mut meta, gc, a, b, backing.is_some())
            .await;
        match r {
            Ok(plan) => Ok(plan),
            Err(e) => self.settle(&mut meta, Err(e)).await,
        }
    }

    /// Decide how to write bytes `a..b` of guest cluster `gc` (lock held). For an update,
    /// allocates the new host cluster and marks `gc` in flight.
    async fn plan_write(
        &self,
        meta: &mut Meta,
        gc: u64,
        a: u64,
        b: u64,
        has_backing: bool,
    ) -> Result<WritePlan> {
        let cs = self.geo.cluster_size();
        let scs = self.geo.subcluster_size();
        self.mark_dirty(meta).await?;
        // The L2 table is checked (and allocated or unshared) before any data is written.
        self.l2_for_write(meta, gc).await?;
        let e = self.entry_of(meta, gc).await?;
        let compressed = e.word & COMPRESSED != 0;
        let allocated = self.geo.is_allocated(e);
        let in_place = allocated && e.word & COPIED != 0;
        let old_host = e.word & L2_OFFSET_MASK;
        let (s0, s1) = ((a / scs) as u32, ((b - 1) / scs) as u32);
        let touched = sc_mask(s0, s1);

        // Which bytes of the cluster get written, and the entry afterwards.
        let (ra, rb, mut new) = if !self.geo.extended {
            let word = if in_place { e.word & !ZERO_FLAG } else { 0 };
            if in_place && e.word & ZERO_FLAG == 0 {
                (a, b, e)
            } else if in_place || a > 0 || b < cs {
                (0, cs, L2Entry { word, bitmap: 0 })
            } else {
                (a, b, L2Entry { word, bitmap: 0 })
            }
        } else if compressed {
            (
                0,
                cs,
                L2Entry {
                    word: 0,
                    bitmap: u64::from(u32::MAX),
                },
            )
        } else if allocated && !in_place {
            let bitmap = (e.bitmap | touched) & !(touched << 32);
            (0, cs, L2Entry { word: 0, bitmap })
        } else if in_place && e.bitmap & touched == touched {
            (a, b, e)
        } else {
            let bitmap = (e.bitmap | touched) & !(touched << 32);
            let word = if in_place { e.word } else { 0 };
            (
                u64::from(s0) * scs,
                (u64::from(s1) + 1) * scs,
                L2Entry { word, bitmap },
            )
        };
        if in_place && !self.geo.data_file {
            self.check_overlap(meta, "data cluster", old_host, cs)?;
        }
        if in_place && new == e {
            let cb = self.geo.cluster_bits;
            let pin =
                (!self.geo.data_file).then(|| meta.rc.pins.pin(old_host >> cb, old_host >> cb));
            return Ok(WritePlan::InPlace {
                host: old_host,
                pin,
            });
        }
        let (host, fresh) = if in_place {
            (old_host, false)
        } else if self.geo.data_file {
            (gc * cs, false)
        } else {
            (meta.rc.alloc(self.file.as_ref(), 1).await?, true)
        };
        let zero_cow = !allocated
            && !compressed
            && (!has_backing
                || if self.geo.extended {
                    (e.bitmap >> 32) & touched == touched
                } else {
                    e.word & ZERO_FLAG != 0
                });
        let skip_cow =
            fresh && zero_cow && host >= self.file.len().await.ctx("cannot get the image size")?;
        if !in_place {
            new.word = host | COPIED;
        }
        let owner = Arc::new(Mutex::new(()));
        let guard = Arc::clone(&owner)
            .try_lock_owned()
            .map_err(|_| Error::Corrupt("in-flight marker".into()))?;
        meta.inflight.insert(gc, owner);
        Ok(WritePlan::Update(Update {
            old: e,
            new,
            host,
            fresh,
            skip_cow,
            ra,
            rb,
            _guard: guard,
        }))
    }

    /// Carry out an update plan: write the data (with the copied-on-write parts) unlocked,
    /// then point the entry at it and drop the old entry's references.
    async fn write_update(
        &self,
        gc: u64,
        a: u64,
        data: &[u8],
        backing: Option<&dyn Backing>,
        up: Update,
    ) -> Result<()> {
        let b = a + data.len() as u64;
        let (ra, rb) = if up.skip_cow { (a, b) } else { (up.ra, up.rb) };
        let copied_old = ra < a || rb > b;
        let written = async {
            if copied_old {
                let mut buf = self.read_old(up.old, gc, ra, rb, backing).await?;
                buf[(a - ra) as usize..(b - ra) as usize].copy_from_slice(data);
                self.data().write_at(up.host + ra, &buf).await
            } else {
                self.data().write_at(up.host + ra, data).await
            }
            .ctx("cannot write guest data")
        }
        .await;
        let mut meta = self.meta.lock().await;
        meta.inflight.remove(&gc);
        let r = match written {
            Ok(()) => self.finish_update(&mut meta, gc, &up).await,
            Err(e) => {
                if up.fresh {
                    // Nothing links the new cluster: give it back.
                    meta.rc
                        .adjust(self.file.as_ref(), up.host >> self.geo.cluster_bits, -1)
                        .await?;
                }
                Err(e)
            }
        };
        drop(up);
        self.settle(&mut meta, r).await
    }

    async fn finish_update(&self, meta: &mut Meta, gc: u64, up: &Update) -> Result<()> {
        let (l2_off, idx) = self.l2_for_write(meta, gc).await?;
        self.set_l2_entry(meta, l2_off, idx, up.new).await?;
        let moved = up.new.word & L2_OFFSET_MASK != up.old.word & L2_OFFSET_MASK;
        if moved && (self.geo.is_allocated(up.old) || up.old.word & COMPRESSED != 0) {
            self.unref_entry(meta, up.old);
        }
        Ok(())
    }

    /// Drop one reference from every host cluster entry `e` uses, once the L2 table that
    /// stopped using them is durable (the write-back applies it).
    pub(crate) fn unref_entry(&self, meta: &mut Meta, e: L2Entry) {
        if self.geo.data_file {
            return;
        }
        let cb = self.geo.cluster_bits;
        let (first, last) = if e.word & COMPRESSED != 0 {
            let (off, len) = self.geo.compressed_extent(e.word);
            (off >> cb, (off + len - 1) >> cb)
        } else if self.geo.is_allocated(e) {
            let c = (e.word & L2_OFFSET_MASK) >> cb;
            (c, c)
        } else {
            return;
        };
        let tail = meta.compress_tail;
        for c in first..=last {
            if tail != 0 && c == (tail - 1) >> cb {
                // Stop packing into a cluster that may be freed now.
                meta.compress_tail = 0;
            }
            meta.pending_unref.push(c);
        }
    }

    /// Change one L2 entry in the cache (written back later).
    pub(crate) async fn set_l2_entry(
        &self,
        meta: &mut Meta,
        l2_off: u64,
        idx: u64,
        e: L2Entry,
    ) -> Result<()> {
        if !meta.l2.update(l2_off, idx as usize, e, self.geo.extended) {
            self.l2_table(meta, l2_off).await?;
            meta.l2.update(l2_off, idx as usize, e, self.geo.extended);
        }
        Ok(())
    }

    /// The L2 table for guest cluster `gc`, allocated or unshared first if needed; returns
    /// its offset and the entry index.
    pub(crate) async fn l2_for_write(&self, meta: &mut Meta, gc: u64) -> Result<(u64, u64)> {
        let cs = self.geo.cluster_size();
        let per = self.geo.l2_entries();
        let (l1i, idx) = (gc / per, gc % per);
        let entry = usize::try_from(l1i)
            .ok()
            .and_then(|i| meta.l1.get(i).copied())
            .ok_or_else(|| Error::Corrupt(format!("L1 table has no entry {l1i}")))?;
        let old = meta.l2_offset(l1i, cs)?;
        if let (Some(off), true) = (old, entry & COPIED != 0) {
            // Written in place: it must be a real L2 table in the file, not other metadata.
            self.l2_table(meta, off).await?;
            self.check_overlap(meta, "L2 table", off, cs)?;
            return Ok((off, idx));
        }
        let table = match old {
            Some(off) => self.l2_table(meta, off).await?.to_vec(),
            None => vec![0u64; (cs / 8) as usize],
        };
        let new_off = meta.rc.alloc(self.file.as_ref(), 1).await?;
        self.cache_l2(meta, new_off, Arc::new(table), true).await?;
        // The new table and its refcount are durable before the L1 entry points at it.
        self.writeback(meta).await?;
        self.file.flush().await.ctx("cannot flush the image")?;
        self.set_l1_entry(meta, l1i, new_off | COPIED).await?;
        if let Some(off) = old {
            meta.l2.remove(off);
            meta.pending_unref.push(off / cs);
        }
        Ok((new_off, idx))
    }

    async fn set_l1_entry(&self, meta: &mut Meta, l1i: u64, v: u64) -> Result<()> {
        let at = meta.header.l1_table_offset + l1i * 8;
        self.file
            .write_at(at, &v.to_be_bytes())
            .await
            .ctx("cannot write the L1 table")?;
        if let Some(slot) = meta.l1.get_mut(l1i as usize) {
            *slot = v;
        }
        Ok(())
    }

    /// Make `offset..offset + len` read as zeros, with the zero flag where whole (sub)clusters
    /// allow it and written zeros elsewhere. `unmap` lets host clusters be released.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        self.begin_write().await?;
        self.check_range(offset, len)?;
        let cs = self.geo.cluster_size();
        let scs = self.geo.subcluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos / cs;
            let a = pos % cs;
            let b = (cs.min(end - gc * cs)).max(a);
            // Whole subclusters inside a..b go through the entry; the edges get zero data.
            let (za, zb) = (a.div_ceil(scs) * scs, b / scs * scs);
            let by_flag = if za < zb {
                let meta = self.meta.lock().await;
                let mut meta = self.wait_idle(meta, gc).await;
                let r = async {
                    self.mark_dirty(&mut meta).await?;
                    self.zero_by_flag(&mut meta, gc, za, zb, unmap, backing)
                        .await
                }
                .await;
                self.settle(&mut meta, r).await?
            } else {
                false
            };
            let parts: &[(u64, u64)] = if by_flag {
                &[(a, za), (zb, b)]
            } else {
                &[(a, b)]
            };
            for &(x, y) in parts {
                if x < y {
                    let zeros = vec![0u8; (y - x) as usize];
                    self.write(gc * cs + x, &zeros, backing).await?;
                }
            }
            pos = gc * cs + b;
        }
        Ok(())
    }

    /// Zero whole subclusters `a..b` of cluster `gc` through its L2 entry; `false` when the
    /// image cannot express it (v2 with a backing file, part of a compressed cluster).
    async fn zero_by_flag(
        &self,
        meta: &mut Meta,
        gc: u64,
        a: u64,
        b: u64,
        unmap: bool,
        backing: Option<&dyn Backing>,
    ) -> Result<bool> {
        let cs = self.geo.cluster_size();
        let whole = a == 0 && b == cs;
        let v3 = meta.header.version >= 3;
        let e = self.entry_of(meta, gc).await?;
        let compressed = e.word & COMPRESSED != 0;
        if (!v3 && backing.is_some()) || (compressed && !whole) {
            return Ok(false);
        }
        let new = if !v3 {
            L2Entry::default()
        } else if !self.geo.extended {
            if unmap || compressed || !self.geo.is_allocated(e) {
                L2Entry {
                    word: ZERO_FLAG,
                    bitmap: 0,
                }
            } else {
                L2Entry {
                    word: e.word | ZERO_FLAG,
                    bitmap: 0,
                }
            }
        } else if whole && (unmap || compressed || !self.geo.is_allocated(e)) {
            L2Entry {
                word: 0,
                bitmap: ALL_ZERO_BITMAP,
            }
        } else {
            let scs = self.geo.subcluster_size();
            let m = sc_mask((a / scs) as u32, ((b - 1) / scs) as u32);
            L2Entry {
                word: e.word,
                bitmap: (e.bitmap & !m) | (m << 32),
            }
        };
        self.replace_entry(meta, gc, e, new).await?;
        Ok(true)
    }

    /// Point guest cluster `gc` at `new` (which uses no new host cluster), then drop the
    /// reference `old` held if `new` no longer uses it.
    async fn replace_entry(
        &self,
        meta: &mut Meta,
        gc: u64,
        old: L2Entry,
        new: L2Entry,
    ) -> Result<()> {
        if old == new {
            return Ok(());
        }
        let (l2_off, idx) = self.l2_for_write(meta, gc).await?;
        self.set_l2_entry(meta, l2_off, idx, new).await?;
        let kept =
            new.word & L2_OFFSET_MASK == old.word & L2_OFFSET_MASK && new.word & COMPRESSED == 0;
        if !kept {
            self.unref_entry(meta, old);
        }
        Ok(())
    }

    /// Discard whole clusters inside `offset..offset + len` (partial clusters are left
    /// alone, as QEMU does). On v3 they read as zeros afterwards; on v2 they fall through to
    /// the backing file. Host clusters are released. `has_backing` says whether a backing
    /// chain would show through an unallocated cluster (then v3 marks it zero).
    pub async fn discard(&self, offset: u64, len: u64, has_backing: bool) -> Result<()> {
        self.begin_write().await?;
        self.check_range(offset, len)?;
        let cs = self.geo.cluster_size();
        let (first, end) = (offset.div_ceil(cs), (offset + len) / cs);
        let end = if offset + len == self.size() {
            (offset + len).div_ceil(cs)
        } else {
            end
        };
        let mut meta = self.meta.lock().await;
        for gc in first..end {
            meta = self.wait_idle(meta, gc).await;
            let r = self.discard_cluster(&mut meta, gc, has_backing).await;
            self.settle(&mut meta, r).await?;
        }
        Ok(())
    }

    async fn discard_cluster(&self, meta: &mut Meta, gc: u64, has_backing: bool) -> Result<()> {
        self.mark_dirty(meta).await?;
        let e = self.entry_of(meta, gc).await?;
        let unallocated = e.word == 0 && e.bitmap == 0;
        if unallocated && (!has_backing || meta.header.version < 3) {
            return Ok(());
        }
        let new = if meta.header.version < 3 {
            L2Entry::default()
        } else if self.geo.extended {
            L2Entry {
                word: 0,
                bitmap: ALL_ZERO_BITMAP,
            }
        } else {
            L2Entry {
                word: ZERO_FLAG,
                bitmap: 0,
            }
        };
        self.replace_entry(meta, gc, e, new).await
    }

    /// Grow the virtual disk to `new_size` bytes (shrinking is refused).
    pub async fn truncate(&self, new_size: u64) -> Result<()> {
        self.begin_write().await?;
        let mut meta = self.meta.lock().await;
        if new_size < meta.header.size {
            return Err(Error::Unsupported(
                "qcow2 images cannot be shrunk by this library".into(),
            ));
        }
        self.set_size(&mut meta, new_size).await
    }

    /// Make the virtual disk `new_size` bytes (synced), growing the L1 table first when it
    /// cannot map that much.
    pub(crate) async fn set_size(&self, meta: &mut Meta, new_size: u64) -> Result<()> {
        let needed = l1_entries_checked(&meta.header, new_size)?;
        if needed > u64::from(meta.header.l1_size) {
            self.grow_l1(meta, needed).await?;
        }
        self.file
            .write_at(HEADER_SIZE, &new_size.to_be_bytes())
            .await
            .ctx("cannot write the image header")?;
        self.file.flush().await.ctx("cannot flush the image")?;
        meta.header.size = new_size;
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Move the L1 table to new clusters holding `entries` entries; switch the header with one
    /// synced write, then free the old table.
    pub(crate) async fn grow_l1(&self, meta: &mut Meta, entries: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(cs);
        let new_off = meta.rc.alloc(self.file.as_ref(), clusters).await?;
        let mut l1 = meta.l1.clone();
        l1.resize(entries as usize, 0);
        // Only the entries: qemu-img leaves the last cluster unpadded too.
        let raw = words_to_be(&l1);
        self.file
            .write_at(new_off, &raw)
            .await
            .ctx("cannot write the L1 table")?;
        self.switch_table(meta, HEADER_L1, entries as u32, new_off)
            .await?;
        let (old_off, old_bytes) = (
            meta.header.l1_table_offset,
            u64::from(meta.header.l1_size) * 8,
        );
        meta.rc
            .protected
            .retain(|(s, _)| *s != old_off || old_off == 0);
        meta.rc.protected.push((new_off, new_off + bytes));
        meta.header.l1_table_offset = new_off;
        meta.header.l1_size = entries as u32;
        meta.l1 = l1;
        for c in 0..old_bytes.div_ceil(cs) {
            meta.rc
                .adjust(self.file.as_ref(), old_off / cs + c, -1)
                .await?;
        }
        Ok(())
    }

    /// Point a header field pair (a u32 count, then a u64 offset, at header offset `at`) at a
    /// table just written to new clusters: their refcounts and the table are made durable
    /// first, then the 12 bytes change in one synced write.
    pub(crate) async fn switch_table(
        &self,
        meta: &mut Meta,
        at: u64,
        count: u32,
        offset: u64,
    ) -> Result<()> {
        meta.rc.write_dirty(self.file.as_ref()).await?;
        self.file.flush().await.ctx("cannot flush the image")?;
        let mut field = count.to_be_bytes().to_vec();
        field.extend_from_slice(&offset.to_be_bytes());
        self.file
            .write_at(at, &field)
            .await
            .ctx("cannot write the image header")?;
        self.file.flush().await.ctx("cannot flush the image")
    }

    /// Write the guest cluster at `offset` compressed, as `qemu-img convert -c` and backup's
    /// `compress` do. `buf` is the whole cluster, or the rest of the disk for a last partial
    /// cluster. Data that does not compress is written uncompressed, as QEMU does.
    pub async fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.begin_write().await?;
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.geo.cluster_size();
        let whole = cs.min(self.size() - offset);
        if !offset.is_multiple_of(cs) || buf.len() as u64 != whole || whole == 0 {
            return Err(Error::InvalidOption(format!(
                "compressed write at {offset:#x} of {:#x} bytes is not one whole cluster",
                buf.len()
            )));
        }
        if self.geo.data_file {
            return Err(Error::Unsupported(
                "compression is not supported with an external data file".into(),
            ));
        }
        let mut cluster = buf.to_vec();
        cluster.resize(cs as usize, 0);
        let Some(packed) = crate::compress::compress(self.compression, &cluster) else {
            return self.write(offset, buf, None).await;
        };
        let gc = offset / cs;
        let meta = self.meta.lock().await;
        let mut meta = self.wait_idle(meta, gc).await;
        let r = async {
            self.mark_dirty(&mut meta).await?;
            let (l2_off, idx) = self.l2_for_write(&mut meta, gc).await?;
            let old = self.entry_of(&mut meta, gc).await?;
            let len = packed.len() as u64;
            let host = self.alloc_compressed(&mut meta, len).await?;
            self.file
                .write_at(host, &packed)
                .await
                .ctx("cannot write a compressed cluster")?;
            let x = 62 - (self.geo.cluster_bits - 8);
            if host >= 1 << x {
                return Err(Error::Unsupported("image is full".into()));
            }
            let sectors = ((host + len - 1) >> 9) - (host >> 9);
            let new = L2Entry {
                word: COMPRESSED | (sectors << x) | host,
                bitmap: 0,
            };
            self.set_l2_entry(&mut meta, l2_off, idx, new).await?;
            if self.geo.is_allocated(old) || old.word & COMPRESSED != 0 {
                self.unref_entry(&mut meta, old);
            }
            Ok(())
        }
        .await;
        self.settle(&mut meta, r).await
    }

    /// Room for `len` bytes of compressed data (less than a cluster): after the previous
    /// compressed cluster when its host cluster has room, which then gains a reference, or at
    /// the start of a new host cluster.
    async fn alloc_compressed(&self, meta: &mut Meta, len: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let tail = meta.compress_tail;
        if tail != 0 && !tail.is_multiple_of(cs) && cs - tail % cs >= len {
            meta.rc
                .adjust(self.file.as_ref(), tail >> self.geo.cluster_bits, 1)
                .await?;
            meta.compress_tail = tail + len;
            return Ok(tail);
        }
        let host = meta.rc.alloc(self.file.as_ref(), 1).await?;
        meta.compress_tail = host + len;
        Ok(host)
    }
}

/// The L1 entries a virtual disk of `size` bytes needs, refused past what an image can map.
pub(crate) fn l1_entries_checked(header: &crate::header::Header, size: u64) -> Result<u64> {
    let needed = header.l1_entries_for(size);
    if needed > crate::header::MAX_L1_BYTES / 8 || size > i64::MAX as u64 {
        return Err(Error::InvalidOption("Image size too large".into()));
    }
    Ok(needed)
}
