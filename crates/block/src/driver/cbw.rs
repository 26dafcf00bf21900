//! `copy-before-write`: the filter a backup inserts above its source. Reads pass through;
//! a write, write_zeroes or discard to a range whose old contents the backup still needs
//! first copies those clusters to the `target` child, then goes to the source. The backup
//! job copies the remaining clusters through the same [`CbwState`], so each cluster reaches
//! the target exactly once, with the contents it had when the filter was inserted: the
//! point in time.
//!
//! State: a bitmap of clusters still to copy and the set of clusters being copied, behind
//! one `std` mutex that is never held across an `.await`. Invariant: a cluster leaves the
//! bitmap when a copier claims it; anyone else touching it waits until the copy is done
//! (or failed, when it goes back into the bitmap).

use async_trait::async_trait;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

use super::{BlockDriver, DirtyBitmapInfo, DriverInfo, Extent, WriteFlags, ZeroFlags};
use crate::error::{Error, Result};
use crate::filename::Filename;
use crate::node::{Child, Node};
use crate::perm::ChildRole;

/// What happens to a guest write whose copy to the target fails (QEMU's `on-cbw-error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCbwError {
    /// Fail the guest write (the default).
    #[default]
    BreakGuestWrite,
    /// Let the guest write through and fail the snapshot instead.
    BreakSnapshot,
}

/// The copy state shared by the filter and the backup job.
#[derive(Debug)]
pub struct CbwState {
    source: Arc<Node>,
    target: Arc<Node>,
    cluster: u64,
    len: u64,
    on_error: OnCbwError,
    /// Clusters go to the target compressed (backup's `compress`).
    compress: bool,
    /// The source is discarded behind each copy (backup's `discard-source`).
    discard_source: bool,
    inner: Mutex<Inner>,
    done: Notify,
}

#[derive(Debug)]
struct Inner {
    /// Bit `c` set: cluster `c` still has to be copied.
    todo: Vec<u64>,
    copying: HashSet<u64>,
    /// Clusters `snapshot-access` is reading from the source, with the number of readers: a
    /// guest write to them waits.
    reading: HashMap<u64, u32>,
    /// Bit `c` set: the snapshot still shows cluster `c` (`snapshot-access` did not discard it).
    access: Vec<u64>,
    /// Clusters the filter copied before guest writes (not the job's copies).
    copied: u64,
    /// A copy failed with `break-snapshot`: the target is no longer a point in time.
    broken: Option<String>,
    /// The filter stopped copying (the job ended).
    detached: bool,
}

/// What [`CbwState::claim`] found.
enum Claim {
    /// Copy it now: it is ours.
    Mine,
    /// Someone else copies it: wait and look again.
    Busy,
    /// Nothing to copy.
    Done,
}

fn bit(map: &[u64], c: u64) -> bool {
    map.get((c / 64) as usize)
        .is_some_and(|w| w & (1 << (c % 64)) != 0)
}

fn set_bit(map: &mut [u64], c: u64, on: bool) {
    if let Some(w) = map.get_mut((c / 64) as usize) {
        if on {
            *w |= 1 << (c % 64);
        } else {
            *w &= !(1 << (c % 64));
        }
    }
}

fn ones(map: &[u64]) -> u64 {
    map.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl Inner {
    fn is_todo(&self, c: u64) -> bool {
        bit(&self.todo, c)
    }

    fn set_todo(&mut self, c: u64, on: bool) {
        set_bit(&mut self.todo, c, on);
    }
}

/// Claimed clusters whose copy has not finished; dropping it unfinished releases them.
struct ClaimGuard<'a> {
    state: &'a CbwState,
    first: u64,
    n: u64,
    settled: bool,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.state.release(self.first, self.n, false);
        }
    }
}

impl CbwState {
    /// State copying `source` to `target` in `cluster`-byte units; every cluster starts as
    /// to be copied (see [`CbwState::skip`]).
    pub fn new(source: Arc<Node>, target: Arc<Node>, cluster: u64, on_error: OnCbwError) -> Self {
        let len = source.size();
        let clusters = len.div_ceil(cluster);
        let mut todo = vec![u64::MAX; clusters.div_ceil(64) as usize];
        if !clusters.is_multiple_of(64) {
            if let Some(last) = todo.last_mut() {
                *last = (1u64 << (clusters % 64)) - 1;
            }
        }
        Self {
            source,
            target,
            cluster,
            len,
            on_error,
            compress: false,
            discard_source: false,
            inner: Mutex::new(Inner {
                access: todo.clone(),
                todo,
                copying: HashSet::new(),
                reading: HashMap::new(),
                copied: 0,
                broken: None,
                detached: false,
            }),
            done: Notify::new(),
        }
    }

    /// Copies write compressed clusters to the target (which must be able to).
    pub fn with_compress(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// Each copied range is discarded on the source once it is on the target (the filter's
    /// source edge then takes `write`, see [`CbwDriver::children`]).
    pub fn with_discard_source(mut self, on: bool) -> Self {
        self.discard_source = on;
        self
    }

    /// Whether copies write compressed clusters.
    pub fn compresses(&self) -> bool {
        self.compress
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a few plain assignments; a panicking holder leaves them whole.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The copy unit in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// The source length the state covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the source is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of clusters.
    pub fn clusters(&self) -> u64 {
        self.len.div_ceil(self.cluster)
    }

    /// Take cluster `c` out of the set to copy (`sync=top` skips what the top layer does
    /// not allocate, `sync=none` leaves everything to the filter).
    pub fn skip(&self, c: u64) {
        self.lock().set_todo(c, false);
    }

    /// Leaves out of the copy every cluster in which `bits` (a dirty bitmap over the
    /// source) has no dirty byte: an incremental backup. `hide` also takes those clusters
    /// out of the snapshot view (a filter opened with `bitmap`: reading them fails).
    pub fn skip_clean(&self, bits: &bitmap::DirtyBitmap, hide: bool) {
        let cs = self.cluster;
        let clusters = self.clusters();
        let mut inner = self.lock();
        let mut c = 0;
        while c < clusters {
            let dirty = bits.next_dirty(c * cs).map_or(clusters, |pos| pos / cs);
            for clean in c..dirty.min(clusters) {
                inner.set_todo(clean, false);
                if hide {
                    set_bit(&mut inner.access, clean, false);
                }
            }
            c = dirty + 1;
        }
    }

    /// Whether cluster `c` still has to be copied.
    pub fn needs_copy(&self, c: u64) -> bool {
        self.lock().is_todo(c)
    }

    /// Clusters still to copy.
    pub fn remaining(&self) -> u64 {
        ones(&self.lock().todo)
    }

    /// Why the point in time was lost, if a copy failed under `break-snapshot`.
    pub fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    /// Stop copying: the filter passes everything through from now on.
    pub fn detach(&self) {
        self.lock().detached = true;
        self.done.notify_waiters();
    }

    fn claim(&self, c: u64) -> Claim {
        let mut inner = self.lock();
        if inner.detached {
            return Claim::Done;
        }
        if inner.copying.contains(&c) || inner.reading.contains_key(&c) {
            return Claim::Busy;
        }
        if !inner.is_todo(c) {
            return Claim::Done;
        }
        inner.set_todo(c, false);
        inner.copying.insert(c);
        Claim::Mine
    }

    fn release(&self, first: u64, n: u64, copied: bool) {
        {
            let mut inner = self.lock();
            for c in first..first + n {
                inner.copying.remove(&c);
                if !copied {
                    inner.set_todo(c, true);
                }
            }
        }
        self.done.notify_waiters();
    }

    /// Claims the run of clusters to copy that starts at `first` (at most `max` of them,
    /// stopping at one that is copied or being copied) and returns its length; 0 when
    /// `first` itself needs nothing. The caller copies them with
    /// [`CbwState::copy_claimed`].
    pub fn claim_run(&self, first: u64, max: u64) -> u64 {
        let mut inner = self.lock();
        if inner.detached {
            return 0;
        }
        let end = first.saturating_add(max).min(self.clusters());
        let mut c = first;
        while c < end && inner.is_todo(c) && !inner.copying.contains(&c) {
            inner.set_todo(c, false);
            inner.copying.insert(c);
            c += 1;
        }
        c - first
    }

    /// Copies `n` clusters from `first`, which [`CbwState::claim_run`] claimed, and releases
    /// them (back to be copied if it failed). Returns the bytes copied, or which side failed
    /// (`true`: reading the source) and how.
    pub async fn copy_claimed(
        &self,
        first: u64,
        n: u64,
    ) -> std::result::Result<u64, (bool, Error)> {
        // A copy dropped half way (its job was aborted) gives its clusters back as still
        // to copy, so nobody waits on them and nothing is counted as copied.
        let mut claim = ClaimGuard {
            state: self,
            first,
            n,
            settled: false,
        };
        let result = self.copy_now(first, n).await;
        claim.settled = true;
        self.release(first, n, result.is_ok());
        result
    }

    /// Copy cluster `c` to the target unless that happened already; waits for a copy of it
    /// in progress. Returns whether this call copied it (and so owns its progress).
    pub async fn copy_cluster(&self, c: u64) -> Result<bool> {
        loop {
            let woken = self.done.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.claim(c) {
                Claim::Done => return Ok(false),
                Claim::Busy => woken.await,
                Claim::Mine => {
                    self.copy_claimed(c, 1).await.map_err(|(_, e)| e)?;
                    // Only the filter's own copies count as done (QEMU's done bitmap);
                    // the job's copies do not.
                    self.lock().copied += 1;
                    return Ok(true);
                }
            }
        }
    }

    async fn copy_now(&self, first: u64, n: u64) -> std::result::Result<u64, (bool, Error)> {
        let start = first * self.cluster;
        let end = ((first + n) * self.cluster).min(self.len);
        let read = |e| (true, e);
        let write = |e| (false, e);
        let mut pos = start;
        while pos < end {
            let status = self
                .source
                .block_status(pos, end - pos)
                .await
                .map_err(read)?;
            // Whole clusters: a run shorter than one is copied as data, a longer one is cut
            // back to whole clusters (the rest is looked at again).
            let mut len = status.len.clamp(1, end - pos);
            let zero = status.zero && (len >= self.cluster || pos + len == end);
            if len < self.cluster {
                len = self.cluster.min(end - pos);
            } else if pos + len < end {
                len -= len % self.cluster;
            }
            if zero {
                let flags = ZeroFlags {
                    may_unmap: true,
                    no_fallback: false,
                    fua: false,
                };
                self.target
                    .write_zeroes(pos, len, flags)
                    .await
                    .map_err(write)?;
            } else {
                let mut buf = vec![0u8; len as usize];
                self.source.read(pos, &mut buf).await.map_err(read)?;
                let written = if self.compress {
                    self.target.write_compressed(pos, &buf).await
                } else {
                    self.target.write(pos, &buf, WriteFlags::default()).await
                };
                written.map_err(write)?;
            }
            pos += len;
        }
        if self.discard_source {
            // The copy is safe on the target; a source that cannot discard keeps its data.
            let _ = self.source.discard(start, end - start).await;
        }
        Ok(end - start)
    }

    /// Bytes of `clusters` clusters counted as QEMU's bitmaps count them (the last cluster
    /// only up to the end of the source).
    fn bytes_of(&self, clusters: u64, last_included: bool) -> u64 {
        let tail = self.clusters() * self.cluster - self.len;
        (clusters * self.cluster).saturating_sub(if last_included { tail } else { 0 })
    }

    /// The filter's three bitmaps as `query-named-block-nodes` lists them: what the snapshot
    /// still shows, what was copied, what is still to copy.
    pub fn bitmaps(&self) -> Vec<DirtyBitmapInfo> {
        let inner = self.lock();
        let last = self.clusters().saturating_sub(1);
        let last_copied = !bit(&inner.todo, last) && bit(&inner.access, last);
        [
            self.bytes_of(ones(&inner.access), bit(&inner.access, last)),
            self.bytes_of(inner.copied, inner.copied > 0 && last_copied),
            self.bytes_of(ones(&inner.todo), bit(&inner.todo, last)),
        ]
        .into_iter()
        .map(|count| DirtyBitmapInfo {
            granularity: self.cluster,
            count,
        })
        .collect()
    }

    /// Reads the point-in-time view (`snapshot-access`): a cluster not copied yet comes from
    /// the source, which no guest write changes meanwhile; a copied one from the target.
    pub async fn snapshot_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let c = pos / self.cluster;
            let stop = ((c + 1) * self.cluster).min(end);
            let part = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            let from_source = loop {
                let woken = self.done.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                {
                    let mut inner = self.lock();
                    if inner.broken.is_some() || !bit(&inner.access, c) {
                        return Err(Error::Io(io::Error::from_raw_os_error(libc::EACCES)));
                    }
                    if !inner.copying.contains(&c) {
                        let todo = inner.is_todo(c);
                        if todo {
                            *inner.reading.entry(c).or_insert(0) += 1;
                        }
                        break todo;
                    }
                }
                woken.await;
            };
            if from_source {
                let read = self.source.read(pos, part).await;
                {
                    let mut inner = self.lock();
                    if let Some(n) = inner.reading.get_mut(&c) {
                        *n -= 1;
                        if *n == 0 {
                            inner.reading.remove(&c);
                        }
                    }
                }
                self.done.notify_waiters();
                read?;
            } else {
                self.target.read(pos, part).await?;
            }
            pos = stop;
        }
        Ok(())
    }

    /// The snapshot no longer needs the whole clusters in `offset..offset + len`: they are
    /// not copied any more and read as an error; the target drops them.
    pub async fn snapshot_discard(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len).min(self.len);
        let first = offset.div_ceil(self.cluster);
        let last = if end == self.len {
            self.clusters()
        } else {
            end / self.cluster
        };
        if first >= last {
            return Ok(());
        }
        {
            let mut inner = self.lock();
            for c in first..last {
                if !inner.copying.contains(&c) {
                    inner.set_todo(c, false);
                }
                set_bit(&mut inner.access, c, false);
            }
        }
        let start = first * self.cluster;
        let stop = (last * self.cluster).min(self.len).min(self.target.size());
        if stop > start {
            self.target.discard(start, stop - start).await?;
        }
        Ok(())
    }

    /// Before the guest changes `offset..offset + len`: copy what the backup still needs.
    async fn before_write(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 || offset >= self.len {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(self.len);
        for c in offset / self.cluster..end.div_ceil(self.cluster) {
            if let Err(err) = self.copy_cluster(c).await {
                match self.on_error {
                    OnCbwError::BreakGuestWrite => return Err(err),
                    OnCbwError::BreakSnapshot => {
                        let mut inner = self.lock();
                        inner.broken.get_or_insert_with(|| err.to_string());
                        inner.detached = true;
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

/// The filter node's driver.
#[derive(Debug)]
pub struct CbwDriver {
    source: Arc<Node>,
    target: Arc<Node>,
    state: Arc<CbwState>,
}

impl CbwDriver {
    /// A filter over `state`'s source copying to its target.
    pub fn new(state: Arc<CbwState>) -> Self {
        Self {
            source: state.source.clone(),
            target: state.target.clone(),
            state,
        }
    }

    /// The filter's child edges, for [`crate::BlockGraph::insert_filter`]: `file` (the
    /// source, which comes first) and `target`.
    pub fn children(&self) -> Vec<Child> {
        vec![
            Child {
                name: "file".into(),
                node: self.source.clone(),
                role: ChildRole::CbwSource {
                    discard: self.state.discard_source,
                },
            },
            Child {
                name: "target".into(),
                node: self.target.clone(),
                role: ChildRole::CbwTarget,
            },
        ]
    }
}

#[async_trait]
impl BlockDriver for CbwDriver {
    fn name(&self) -> &'static str {
        "copy-before-write"
    }

    fn size(&self) -> u64 {
        self.source.size()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.source.read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.state.before_write(offset, buf.len() as u64).await?;
        self.source.write(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.state.before_write(offset, len).await?;
        self.source.write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.state.before_write(offset, len).await?;
        self.source.discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.source.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.source.block_status(offset, len).await
    }

    async fn truncate(&self, _size: u64) -> Result<()> {
        Err(Error::ResizeNotSupported)
    }

    fn filename(&self) -> Filename {
        let source = self.source.driver().filename();
        let target = self.target.driver().filename();
        let mut options = Map::new();
        options.insert("driver".into(), Value::from("copy-before-write"));
        options.insert("file".into(), Value::Object(source.options));
        options.insert("target".into(), Value::Object(target.options));
        Filename {
            exact: source.exact,
            options,
        }
    }

    fn info(&self) -> DriverInfo {
        // QEMU asks the filtered node for the image details.
        let source = self.source.driver().info();
        DriverInfo {
            actual_size: source.actual_size,
            dirty_flag: Some(false),
            cluster_size: source.cluster_size,
            dirty_bitmaps: self.state.bitmaps(),
            ..DriverInfo::default()
        }
    }

    fn snapshot(&self) -> Option<Arc<CbwState>> {
        Some(self.state.clone())
    }
}

/// `snapshot-access`: the point in time a copy-before-write node (its `file`) keeps, read
/// only (fleecing). Discards tell the filter that the snapshot no longer needs a range.
#[derive(Debug)]
pub struct SnapshotAccessDriver {
    file: Arc<Node>,
}

impl SnapshotAccessDriver {
    /// A view of `file`'s snapshot (reads fail unless `file` is a copy-before-write node).
    pub fn new(file: Arc<Node>) -> Self {
        Self { file }
    }

    fn state(&self) -> Result<Arc<CbwState>> {
        self.file
            .driver()
            .snapshot()
            .ok_or(Error::OperationNotSupported)
    }
}

#[async_trait]
impl BlockDriver for SnapshotAccessDriver {
    fn name(&self) -> &'static str {
        "snapshot-access"
    }

    fn size(&self) -> u64 {
        self.file.size()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.state()?.snapshot_read(offset, buf).await
    }

    async fn write(&self, _offset: u64, _buf: &[u8], _flags: WriteFlags) -> Result<()> {
        Err(Error::OperationNotSupported)
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(Error::OperationNotSupported)
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.state()?.snapshot_discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<Extent> {
        Ok(Extent {
            data: true,
            zero: false,
            allocated: true,
            len,
        })
    }

    async fn truncate(&self, _size: u64) -> Result<()> {
        Err(Error::ResizeNotSupported)
    }

    fn filename(&self) -> Filename {
        let file = self.file.driver().filename();
        let mut options = Map::new();
        options.insert("driver".into(), Value::from("snapshot-access"));
        options.insert("file".into(), Value::Object(file.options));
        Filename {
            exact: file.exact,
            options,
        }
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            actual_size: self.file.driver().info().actual_size,
            ..DriverInfo::default()
        }
    }
}
