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
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

use super::{BlockDriver, DriverInfo, Extent, WriteFlags, ZeroFlags};
use crate::error::{Error, Result};
use crate::filename::Filename;
use crate::node::{Child, Node};
use crate::perm::ChildRole;

/// What happens to a guest write whose copy to the target fails (QEMU's `on-cbw-error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

impl Inner {
    fn is_todo(&self, c: u64) -> bool {
        self.todo
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    fn set_todo(&mut self, c: u64, on: bool) {
        if let Some(w) = self.todo.get_mut((c / 64) as usize) {
            if on {
                *w |= 1 << (c % 64);
            } else {
                *w &= !(1 << (c % 64));
            }
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
                todo,
                copying: HashSet::new(),
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

    /// Whether cluster `c` still has to be copied.
    pub fn needs_copy(&self, c: u64) -> bool {
        self.lock().is_todo(c)
    }

    /// Clusters still to copy.
    pub fn remaining(&self) -> u64 {
        self.lock()
            .todo
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
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
        if inner.copying.contains(&c) {
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
        let result = self.copy_now(first, n).await;
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
                    return self
                        .copy_claimed(c, 1)
                        .await
                        .map(|_| true)
                        .map_err(|(_, e)| e);
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
        DriverInfo {
            actual_size: self.source.driver().info().actual_size,
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }
}
