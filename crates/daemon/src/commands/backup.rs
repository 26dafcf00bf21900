//! `blockdev-backup`: a point-in-time copy of a node to another node.
//!
//! The command inserts a `copy-before-write` filter above the source (every user of the
//! source now writes through it) and starts a `backup` job. The filter copies a cluster's
//! old contents to the target before a guest write changes it; the job copies every other
//! cluster in the background, several at a time, at the job's speed. Both go through one
//! [`CbwState`], so each cluster is copied once. When the job ends, the filter is taken out
//! again (users back on the source) and stops copying.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use block::dirty::NodeBitmap;
use block::driver::cbw::{CbwDriver, CbwState, OnCbwError};
use block::{Backend, BlockGraph, Perm};
use jobs::{ErrorAction, IoOperation, JobContext, JobDriver, JobOptions, JobType, OnError, TxnId};
use qapi::QmpError;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::{args, block_error, empty, job_error, Reply};
use crate::control::State;

/// Copy unit when the target does not ask for another (QEMU's backup default).
const DEFAULT_CLUSTER: u64 = 64 << 10;
/// How often QEMU drains all nodes between a transaction's drain and the job's creation.
const DRAINS_BEFORE_CREATE: u32 = 4;
/// Copies the job runs at once unless `x-perf` says otherwise (QEMU's default workers).
const DEFAULT_WORKERS: usize = 64;
/// Most bytes one copy takes (QEMU's buffer for a read-and-write copy).
const MAX_CHUNK: u64 = 1 << 20;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct BackupArgs {
    job_id: Option<String>,
    device: String,
    target: String,
    sync: String,
    speed: Option<i64>,
    bitmap: Option<String>,
    bitmap_mode: Option<String>,
    compress: Option<bool>,
    /// `drive-backup` only: the new image's format.
    format: Option<String>,
    /// `drive-backup` only: `existing` or `absolute-paths`.
    mode: Option<String>,
    on_source_error: Option<String>,
    on_target_error: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    filter_node_name: Option<String>,
    discard_source: Option<bool>,
    x_perf: Option<Perf>,
}

/// `BackupPerf`: how the job copies.
#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Perf {
    /// Accepted; copies are reads and writes, which is what QEMU falls back to whenever the
    /// two nodes cannot offload the copy.
    #[allow(dead_code)]
    use_copy_range: Option<bool>,
    max_workers: Option<i64>,
    max_chunk: Option<i64>,
}

impl Perf {
    /// QEMU's checks of the values before anything is set up.
    fn check(&self) -> Result<(), QmpError> {
        if self
            .max_workers
            .is_some_and(|w| !(1..=i64::from(i32::MAX)).contains(&w))
        {
            return Err(QmpError::generic(format!(
                "max-workers must be between 1 and {}",
                i32::MAX
            )));
        }
        if self.max_chunk.is_some_and(|c| c < 0) {
            return Err(QmpError::generic(
                "max-chunk must be zero (which means no limit) or positive",
            ));
        }
        Ok(())
    }
}

/// Which part of the source the job copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    /// Everything.
    Full,
    /// What the source's top layer allocates.
    Top,
    /// Nothing but what the filter copies before guest writes.
    None,
    /// What the sync bitmap marks (`incremental` and `bitmap`).
    Bitmap,
}

/// What becomes of the sync bitmap when the job ends (QEMU's `BitmapSyncMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BitmapMode {
    /// Cleared of what was copied only if the job succeeds.
    OnSuccess,
    /// Left as it was, plus the writes made meanwhile.
    Never,
    /// Cleared of what was copied whatever the outcome.
    Always,
}

/// The bitmap a backup reads (`sync=bitmap`) or settles (any sync with `bitmap`). It is
/// frozen while the job runs: writes go to its successor.
struct SyncBitmap {
    bitmap: Arc<NodeBitmap>,
    mode: BitmapMode,
}

/// What the job holds while it runs, released when it ends: its edges on the filter
/// (`main node`) and on the target.
struct Held {
    _main: Backend,
    target: Backend,
}

/// The `backup` job. The filter's name and the job's edges are filled in once the filter
/// is in the graph (the job exists before it, as in QEMU).
struct BackupJob {
    state: Arc<CbwState>,
    /// The node backed up (below the filter).
    source: Arc<block::Node>,
    filter: Mutex<String>,
    sync: Sync,
    on_source_error: OnError,
    on_target_error: OnError,
    /// Copies in flight at most (`x-perf.max-workers`).
    workers: usize,
    /// Clusters one copy takes at most (`x-perf.max-chunk`, 1 with `compress`).
    chunk_clusters: u64,
    held: Mutex<Option<Held>>,
    /// An implicit target node (`drive-backup`) to close when the job ends.
    release_target: Option<String>,
    sync_bitmap: Option<SyncBitmap>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain data set in one assignment.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A failed cluster copy: which side failed, and how.
struct CopyFailure {
    read: bool,
    err: block::Error,
}

fn nospace(err: &block::Error) -> bool {
    err.errno() == Some(libc::ENOSPC)
}

impl BackupJob {
    /// Ends the sync bitmap's freeze as QEMU does: on success (or with `always`) the writes
    /// since the job started replace it, unless the mode is `never`; otherwise they are
    /// merged back in. A failed `always` job keeps what it did not copy.
    fn settle_bitmap(&self, ok: bool) {
        let Some(sb) = &self.sync_bitmap else {
            return;
        };
        let sync = (ok || sb.mode == BitmapMode::Always) && sb.mode != BitmapMode::Never;
        if sync {
            // The successor, the newest bitmap of the node, takes the bitmap's place.
            sb.bitmap.abdicate();
            self.source.bitmaps().move_to_front(sb.bitmap.name());
        } else {
            sb.bitmap.reclaim();
        }
        if !ok && sb.mode == BitmapMode::Always {
            let cs = self.state.cluster_size();
            let mut s = sb.bitmap.lock();
            for c in 0..self.state.clusters() {
                if self.state.needs_copy(c) {
                    s.bits.set(c * cs, cs);
                }
            }
        }
    }

    /// Copies the `n` claimed clusters from `first`; returns the bytes copied.
    async fn copy(state: Arc<CbwState>, first: u64, n: u64) -> Result<u64, CopyFailure> {
        state
            .copy_claimed(first, n)
            .await
            .map_err(|(read, err)| CopyFailure { read, err })
    }

    /// One pass over the clusters still to copy. `Ok(false)`: an error was ignored or the
    /// job was stopped and resumed, so another pass is needed.
    async fn pass(&self, ctx: &JobContext) -> Result<bool, String> {
        let mut set = JoinSet::new();
        let mut next = 0;
        let clusters = self.state.clusters();
        let cs = self.state.cluster_size();
        let mut clean = true;
        loop {
            // Start copies while workers are free and the speed limit allows; a copy's bytes
            // count against the limit when it starts.
            while set.len() < self.workers && next < clusters && ctx.may_start() {
                let n = self.state.claim_run(next, self.chunk_clusters);
                if n > 0 {
                    ctx.account(n * cs);
                    set.spawn(Self::copy(self.state.clone(), next, n));
                }
                next += n.max(1);
            }
            let Some(done) = set.join_next().await else {
                if next >= clusters {
                    return Ok(clean);
                }
                // Nothing in flight: wait until the speed limit lets the next copy start.
                ctx.rate_limit(0).await.map_err(String::from)?;
                continue;
            };
            let done = done.map_err(|e| format!("backup worker failed: {e}"))?;
            match done {
                Ok(bytes) => {
                    if bytes > 0 {
                        ctx.progress_add(bytes);
                    }
                    ctx.pause_point().await.map_err(String::from)?;
                }
                Err(failure) => {
                    let (policy, op) = if failure.read {
                        (self.on_source_error, IoOperation::Read)
                    } else {
                        (self.on_target_error, IoOperation::Write)
                    };
                    let action = ctx.io_error(policy, op, nospace(&failure.err)).await;
                    if action == ErrorAction::Report {
                        set.abort_all();
                        return Err(failure.err.to_string());
                    }
                    clean = false;
                    ctx.pause_point().await.map_err(String::from)?;
                }
            }
        }
    }
}

#[async_trait]
impl JobDriver<BlockGraph> for BackupJob {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        let cs = self.state.cluster_size();
        if self.sync == Sync::Top {
            // Guest writes since the filter went in were copied already; what the top
            // layer still does not allocate is left out.
            skip_unallocated(&self.state, &self.source)
                .await
                .map_err(|e| e.to_string())?;
        }
        ctx.set_progress(0, (self.state.remaining() * cs).min(self.state.len()));
        if self.sync != Sync::None {
            while !self.pass(&ctx).await? {}
        } else {
            // Only the filter copies: wait until the job is cancelled.
            loop {
                ctx.sleep(std::time::Duration::from_millis(100))
                    .await
                    .map_err(String::from)?;
            }
        }
        if let Some(err) = self.state.broken() {
            return Err(err);
        }
        let target = locked(&self.held).as_ref().map(|h| h.target.node());
        if let Some(target) = target {
            target.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn commit(&self, _graph: &mut BlockGraph) {
        self.settle_bitmap(true);
    }

    fn abort(&self, _graph: &mut BlockGraph) {
        self.settle_bitmap(false);
    }

    fn drains(&self) -> (u32, u32) {
        // Taking the filter out and dropping the job's edges, then freeing the job.
        (3, 1)
    }

    fn clean(&self, graph: &mut BlockGraph) {
        self.state.detach();
        drop(locked(&self.held).take());
        // The filter leaves the graph and its users go back to the source; it was put in
        // by this job, so only a graph torn down meanwhile can be missing it.
        let filter = locked(&self.filter).clone();
        if !filter.is_empty() {
            let _ = graph.remove_filter(&filter);
        }
        if let Some(target) = &self.release_target {
            graph.release_later(target);
        }
    }
}

fn policy(name: Option<&str>) -> OnError {
    name.and_then(OnError::parse).unwrap_or(OnError::Report)
}

/// Clusters the source's top layer does not allocate, for `sync=top`.
async fn skip_unallocated(state: &CbwState, source: &block::Node) -> Result<(), block::Error> {
    let cs = state.cluster_size();
    let len = state.len();
    let mut pos = 0;
    while pos < len {
        let ext = source.block_status(pos, len - pos).await?;
        let end = pos + ext.len;
        if !ext.allocated {
            // Whole clusters inside the unallocated run only.
            for c in pos.div_ceil(cs)..end / cs + u64::from(end == len) {
                if c * cs >= pos && (c * cs + cs).min(len) <= end {
                    state.skip(c);
                }
            }
        }
        pos = end;
    }
    Ok(())
}

/// The sync mode, with QEMU's checks that need no node.
fn parse_sync(a: &BackupArgs) -> Result<Sync, QmpError> {
    Ok(match a.sync.as_str() {
        "full" => Sync::Full,
        "top" => Sync::Top,
        "none" => Sync::None,
        mode => {
            if mode == "incremental" && a.bitmap_mode.as_deref().is_some_and(|m| m != "on-success")
            {
                return Err(QmpError::generic(
                    "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
                ));
            }
            if a.bitmap.is_none() {
                return Err(QmpError::generic(format!(
                    "must provide a valid bitmap name for '{mode}' sync mode"
                )));
            }
            Sync::Bitmap
        }
    })
}

/// The sync bitmap, looked up on the source and checked as QEMU does.
fn sync_bitmap(
    a: &BackupArgs,
    source: &block::Node,
    sync: Sync,
) -> Result<Option<SyncBitmap>, QmpError> {
    let Some(name) = &a.bitmap else {
        if a.bitmap_mode.is_some() {
            return Err(QmpError::generic(
                "Cannot specify bitmap sync mode without a bitmap",
            ));
        }
        return Ok(None);
    };
    let bitmap = source
        .bitmaps()
        .get(name)
        .ok_or_else(|| QmpError::generic(format!("Bitmap '{name}' could not be found")))?;
    let mode = match (a.sync.as_str(), a.bitmap_mode.as_deref()) {
        ("incremental", _) | (_, Some("on-success")) => BitmapMode::OnSuccess,
        (_, Some("never")) => BitmapMode::Never,
        (_, Some(_)) => BitmapMode::Always,
        (_, None) => {
            return Err(QmpError::generic(
                "Bitmap sync mode must be given when providing a bitmap",
            ))
        }
    };
    bitmap
        .check(block::dirty::Check::BusyInconsistent)
        .map_err(QmpError::generic)?;
    if sync == Sync::None {
        return Err(QmpError::generic(
            "sync mode 'none' does not produce meaningful bitmap outputs",
        ));
    }
    if mode == BitmapMode::Never && sync != Sync::Bitmap {
        return Err(QmpError::generic(format!(
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{}'",
            a.sync
        )));
    }
    Ok(Some(SyncBitmap { bitmap, mode }))
}

fn not_found(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

/// The job id (QEMU defaults it to the device's block backend name, which a node has not).
fn job_id(a: &BackupArgs) -> Result<String, QmpError> {
    match &a.job_id {
        Some(id) => Ok(id.clone()),
        None => Err(QmpError::generic("Invalid job ID ''")),
    }
}

pub fn blockdev_backup(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        // QEMU runs the command as a transaction of one action, which drains all nodes.
        state.jobs.drain_blip(1);
        let id = prepare_blockdev_backup(state, a, None).await?;
        begin(state, &id)?;
        Ok(empty())
    })
}

/// `blockdev-backup` up to a created job (not started) in transaction `txn`; returns the
/// job's id.
pub async fn prepare_blockdev_backup(
    state: &mut State,
    a: Value,
    txn: Option<TxnId>,
) -> Result<String, QmpError> {
    {
        let a: BackupArgs = args(a)?;
        let sync = parse_sync(&a)?;
        let job_id = job_id(&a)?;
        let source = state
            .graph
            .get(&a.device)
            .ok_or_else(|| not_found(&a.device))?;
        let target = state
            .graph
            .get(&a.target)
            .ok_or_else(|| not_found(&a.target))?;
        if source.name() == target.name() {
            return Err(QmpError::generic("Source and target cannot be the same"));
        }
        let sb = sync_bitmap(&a, &source, sync)?;
        start(state, &a, job_id, (sync, sb), source, target, false, txn).await
    }
}

/// `drive-backup`: creates the target image (unless `mode` is `existing`), opens it as an
/// implicit node, and backs up to it as `blockdev-backup` does; the node goes away with the
/// job.
pub fn drive_backup(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        state.jobs.drain_blip(1);
        let id = prepare_drive_backup(state, a, None).await?;
        begin(state, &id)?;
        Ok(empty())
    })
}

/// `drive-backup` up to a created job (not started) in transaction `txn`; returns the
/// job's id.
pub async fn prepare_drive_backup(
    state: &mut State,
    a: Value,
    txn: Option<TxnId>,
) -> Result<String, QmpError> {
    {
        let a: BackupArgs = args(a)?;
        let mut sync = parse_sync(&a)?;
        let job_id = job_id(&a)?;
        let source = state
            .graph
            .get(&a.device)
            .ok_or_else(|| not_found(&a.device))?;
        // `top` with nothing below is `full`; the new image gets the source's backing file
        // for `top` and the source itself for `none`.
        let backing = match sync {
            Sync::Top => match source.backing() {
                Some(b) => Some(b.clone()),
                None => {
                    sync = Sync::Full;
                    None
                }
            },
            Sync::None => Some(source.clone()),
            Sync::Full | Sync::Bitmap => None,
        };
        let sb = sync_bitmap(&a, &source, sync)?;
        let existing = a.mode.as_deref() == Some("existing");
        // An existing image's format is probed, as QEMU opens it; a new one takes the
        // source's.
        let format = match (&a.format, existing) {
            (Some(f), _) => f.clone(),
            (None, true) => probe_format(&a.target),
            (None, false) => source.driver_name().to_string(),
        };
        if format != "raw" && format != "qcow2" {
            return Err(QmpError::generic(format!(
                "Driver '{format}' does not support image creation"
            )));
        }
        if !existing {
            create_image(state, &a.target, &format, source.size(), backing.as_deref()).await?;
        }
        let mut opts = json!({"driver": format, "file": {"driver": "file", "filename": a.target}});
        if format == "qcow2" && sync != Sync::None {
            // The target's backing chain is the source's business, not the copy's.
            opts["backing"] = Value::Null;
        }
        let opts: block::BlockdevOptions = args(opts)?;
        let target = state.graph.add_implicit(opts).await.map_err(block_error)?;
        let name = target.name().to_string();
        let started = start(state, &a, job_id, (sync, sb), source, target, true, txn).await;
        if started.is_err() {
            state.graph.release_later(&name);
        }
        started
    }
}

/// Starts a job `prepare_*` created. QEMU starts it inside the drained section of the graph
/// change, so it pauses at once and runs again when the section ends.
pub fn begin(state: &mut State, id: &str) -> Result<(), QmpError> {
    start_paused(state, id)?;
    state.jobs.resume_internal(id).map_err(job_error)
}

/// Starts a created job inside a drained section: it pauses at once; the caller resumes it
/// when the section ends.
pub fn start_paused(state: &mut State, id: &str) -> Result<(), QmpError> {
    state.jobs.pause_internal(id).map_err(job_error)?;
    state.jobs.start(id).map_err(job_error)
}

/// `qcow2` if the file starts with the qcow2 magic, else `raw` (a missing file is reported
/// when it is opened).
fn probe_format(path: &str) -> String {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 { "qcow2" } else { "raw" }.to_string()
}

/// Creates the target image of `drive-backup`, printing what `qemu-img create` prints, as
/// QEMU does.
pub(super) async fn create_image(
    state: &mut State,
    path: &str,
    format: &str,
    size: u64,
    backing: Option<&block::Node>,
) -> Result<(), QmpError> {
    let file: block::CreateOptions = args(
        json!({"driver": "file", "filename": path, "size": if format == "raw" { size } else { 0 }}),
    )?;
    let block::CreateOptions::File(file) = file else {
        return Err(QmpError::generic("internal error: not file options"));
    };
    if format == "raw" {
        println!("Formatting '{path}', fmt=raw size={size}");
        return block::create_file(&file).await.map_err(block_error);
    }
    let backing_part = backing
        .map(|b| {
            format!(
                "backing_file={} backing_fmt={} ",
                b.filename(),
                b.driver_name()
            )
        })
        .unwrap_or_default();
    println!(
        "Formatting '{path}', fmt=qcow2 cluster_size=65536 extended_l2=off \
         compression_type=zlib size={size} {backing_part}lazy_refcounts=off refcount_bits=16"
    );
    block::create_file(&file).await.map_err(block_error)?;
    let opts: block::BlockdevOptions = args(json!({"driver": "file", "filename": path}))?;
    let node = state.graph.add_implicit(opts).await.map_err(block_error)?;
    let mut qcow2 = json!({"driver": "qcow2", "file": node.name(), "size": size});
    if let Some(b) = backing {
        qcow2["backing-file"] = json!(b.filename());
        qcow2["backing-fmt"] = json!(b.driver_name());
    }
    let created = match args::<block::CreateOptions>(qcow2)? {
        block::CreateOptions::Qcow2(q) => block::create_qcow2(node.clone(), None, &q)
            .await
            .map_err(block_error),
        _ => Err(QmpError::generic("internal error: not qcow2")),
    };
    let name = node.name().to_string();
    drop(node);
    state.graph.release_later(&name);
    state.graph.reap().await;
    created
}

/// Puts the copy-before-write filter of `cbw` above the source.
async fn insert(
    state: &mut State,
    a: &BackupArgs,
    cbw: &Arc<CbwState>,
) -> Result<Arc<block::Node>, block::Error> {
    let driver = CbwDriver::new(cbw.clone());
    let children = driver.children();
    state
        .graph
        .insert_filter(
            &a.device,
            a.filter_node_name.clone(),
            Box::new(driver),
            children,
        )
        .await
}

/// Everything after the nodes are known: checks, the filter, the job (created in `txn`,
/// not started); returns the job's id.
#[allow(clippy::too_many_arguments)]
async fn start(
    state: &mut State,
    a: &BackupArgs,
    job_id: String,
    (sync, sync_bitmap): (Sync, Option<SyncBitmap>),
    source: Arc<block::Node>,
    target: Arc<block::Node>,
    release_target: bool,
    txn: Option<TxnId>,
) -> Result<String, QmpError> {
    let speed = a.speed.unwrap_or(0);
    let compress = a.compress == Some(true);
    if compress && !target.driver().can_compress() {
        // QEMU names the target's device here, which a node has not.
        return Err(QmpError::generic(
            "Compression is not supported for this drive ",
        ));
    }
    let perf = a.x_perf.unwrap_or_default();
    perf.check()?;
    if source.size() != target.size() {
        return Err(QmpError::generic(
            "Source and target image have different sizes",
        ));
    }
    let cluster = DEFAULT_CLUSTER.max(target.driver().info().cluster_size.unwrap_or(0));
    if sync == Sync::Bitmap && target.driver_name() == "null-co" && target.backing().is_none() {
        // QEMU's warning for a target that tells no cluster size (its words).
        eprintln!(
            "warning: The target block device doesn't provide information about the block size and it doesn't have a backing file. The (default) block size of 65536 bytes is used. If the actual block size of the target exceeds this value, the backup may be unusable"
        );
    }
    // QEMU opens the filter node (so a name in use fails here, before any job exists),
    // creates the job, then attaches the filter's children.
    if let Some(name) = &a.filter_node_name {
        if state.graph.get(name).is_some() {
            return Err(QmpError::generic(format!(
                "Could not create node: Duplicate nodes with node-name='{name}'"
            )));
        }
    }
    let max_chunk = perf.max_chunk.unwrap_or(0) as u64;
    if max_chunk != 0 && max_chunk < cluster {
        // QEMU has opened the filter to learn the cluster size.
        if a.filter_node_name.is_none() {
            state.graph.consume_anonymous_name();
        }
        return Err(QmpError::generic(format!(
            "Required max-chunk ({max_chunk}) is less than backup cluster size ({cluster})"
        )));
    }
    let chunk_clusters = if compress {
        1
    } else {
        let bytes = if max_chunk == 0 {
            MAX_CHUNK
        } else {
            max_chunk.min(MAX_CHUNK)
        };
        (bytes / cluster).max(1)
    };
    let cbw = Arc::new(
        CbwState::new(
            source.clone(),
            target.clone(),
            cluster,
            OnCbwError::BreakGuestWrite,
        )
        .with_compress(compress)
        .with_discard_source(a.discard_source == Some(true)),
    );
    let opts = JobOptions {
        auto_finalize: a.auto_finalize.unwrap_or(true),
        auto_dismiss: a.auto_dismiss.unwrap_or(true),
        speed,
        txn,
        ..JobOptions::new(job_id.clone(), JobType::Backup)
    };
    let on_source_error = policy(a.on_source_error.as_deref());
    let on_target_error = policy(a.on_target_error.as_deref());
    // The job exists before the filter, as QEMU's: a filter that cannot be inserted
    // makes it go from created straight to null.
    let job = Arc::new(BackupJob {
        state: cbw.clone(),
        source: source.clone(),
        filter: Mutex::new(String::new()),
        sync,
        on_source_error,
        on_target_error,
        workers: perf.max_workers.map_or(DEFAULT_WORKERS, |w| w as usize),
        chunk_clusters,
        held: Mutex::new(None),
        release_target: release_target.then(|| target.name().to_string()),
        sync_bitmap,
    });
    // QEMU drains all nodes while it opens the filter, and once more when the filter goes
    // in; other running jobs show each as a pause.
    state.jobs.drain_blip(DRAINS_BEFORE_CREATE);
    let id = state.jobs.create(opts, job.clone()).map_err(job_error)?;
    // The bitmap freezes and the filter goes in with no write to the source between them:
    // a write is either in the frozen bits or recorded by the successor.
    source.gate().drain().await;
    if let Some(sb) = &job.sync_bitmap {
        let frozen = sb.bitmap.freeze();
        if sync == Sync::Bitmap {
            cbw.skip_clean(&frozen, false);
        }
    }
    let inserted = insert(state, a, &cbw).await;
    source.gate().undrain();
    let unfreeze = |job: &BackupJob| {
        if let Some(sb) = &job.sync_bitmap {
            sb.bitmap.reclaim();
        }
    };
    let filter = match inserted {
        Ok(filter) => filter,
        Err(err) => {
            unfreeze(&job);
            let _ = state.jobs.discard(id.as_str());
            let msg = match err {
                block::Error::DuplicateNodeName(_) => {
                    format!("Could not create node: {err}")
                }
                other => other.to_string(),
            };
            return Err(QmpError::generic(msg));
        }
    };
    let held = state
        .graph
        .attach_job(
            filter.name(),
            Perm::NONE,
            Perm::ALL,
            id.as_str(),
            "main node",
        )
        .and_then(|main| {
            state
                .graph
                .attach_job(target.name(), Perm::NONE, Perm::ALL, id.as_str(), "target")
                .map(|target| Held {
                    _main: main,
                    target,
                })
        });
    let held = match held {
        Ok(held) => held,
        Err(err) => {
            unfreeze(&job);
            let _ = state.jobs.discard(id.as_str());
            let _ = state.graph.remove_filter(filter.name());
            return Err(block_error(err));
        }
    };
    *locked(&job.filter) = filter.name().to_string();
    *locked(&job.held) = Some(held);
    state.jobs.drain_blip(1);
    Ok(id.as_str().to_string())
}
