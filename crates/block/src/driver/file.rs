//! `file`: a host file (or block device) as a node.
//!
//! System calls that may block run on tokio's blocking pool. Two kinds of call that only
//! touch the page cache run on the calling thread, which saves two thread hand-offs per
//! request: reads of cached data (`preadv2` with `RWF_NOWAIT`, which fails instead of
//! blocking; the rest of the read goes to the pool) and small page-aligned buffered writes
//! while they stay fast (see `InlineWrites`: one slow write sends writes to the pool for a
//! while). With `cache.direct` the file is opened `O_DIRECT`; the request alignment is probed at
//! open and every transfer goes through an aligned bounce buffer, unaligned writes as
//! read-modify-write of the covering blocks (serialized against other writes).
//!
//! Image locking follows QEMU's protocol so that QEMU tools and blockd see each other:
//! one byte per permission bit *i*, byte `100 + i` shared-locked while this node holds
//! permission *i*, byte `200 + i` while it refuses to share it (OFD locks).

use async_trait::async_trait;
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::{BlockDriver, DriverInfo, Extent, FormatSpecific, WriteFlags, ZeroFlags};
use crate::error::{Error, Result};
use crate::filename::Filename;
use crate::options::{Aio, FileOptions, OnOffAuto};
use crate::perm::Perm;
use sys::file::{AlignedBuf, FallocMode, Seek};

/// First lock byte for "holds permission i".
const LOCK_PERM_BASE: u64 = 100;
/// First lock byte for "does not share permission i".
const LOCK_SHARED_BASE: u64 = 200;
/// Largest chunk of zeroes written at once when falling back to plain writes.
const ZERO_CHUNK: u64 = 1 << 20;

/// Node-level flags the file driver needs at open.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOpenFlags {
    pub read_only: bool,
    pub auto_read_only: bool,
    pub direct: bool,
    pub force_share: bool,
}

/// The `file` driver.
#[derive(Debug)]
pub struct FileDriver {
    path: String,
    file: Arc<File>,
    size: AtomicU64,
    align: u64,
    direct: bool,
    locking: bool,
    force_share: bool,
    read_only: bool,
    /// Aligned writes take it shared, read-modify-write cycles exclusively.
    rmw: tokio::sync::RwLock<()>,
    /// Reads try the page cache on the calling thread first (`RWF_NOWAIT`); cleared when
    /// the kernel or file system refuses the flag.
    nowait: AtomicBool,
    inline: InlineWrites,
}

/// When buffered writes run on the calling thread: page-aligned, at most
/// [`InlineWrites::MAX_LEN`] bytes, and none of them slow lately. A write that took longer than
/// [`InlineWrites::SLOW`] (the kernel throttled dirty pages, or had to read a page in) sends
/// the following writes to the worker pool for [`InlineWrites::BACKOFF`], so the daemon's
/// thread is never held up for long.
#[derive(Debug)]
struct InlineWrites {
    enabled: bool,
    /// Microseconds since `epoch` before which writes go to the pool.
    pool_until: AtomicU64,
    epoch: std::time::Instant,
}

impl InlineWrites {
    const MAX_LEN: usize = 1 << 20;
    /// Dirty-page throttling sleeps 10 ms and more; a loaded machine can preempt a write
    /// for a few milliseconds without the write itself being slow.
    const SLOW: std::time::Duration = std::time::Duration::from_millis(5);
    const BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            pool_until: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn may_write(&self, offset: u64, len: usize) -> bool {
        self.enabled
            && len <= Self::MAX_LEN
            && offset.is_multiple_of(4096)
            && len.is_multiple_of(4096)
            && self.now_us() >= self.pool_until.load(Ordering::Relaxed)
    }

    fn took(&self, elapsed: std::time::Duration) {
        if elapsed > Self::SLOW {
            let until = self
                .now_us()
                .saturating_add(Self::BACKOFF.as_micros() as u64);
            self.pool_until.store(until, Ordering::Relaxed);
        }
    }
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> io::Result<R> + Send + 'static,
) -> Result<R> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(Error::Io),
        Err(_) => Err(Error::Io(io::Error::other("blocking I/O task failed"))),
    }
}

/// Reads into `buf` at `offset`; bytes past the end of the file read as zeroes.
/// QEMU counts a file's length in whole 512-byte sectors; the tail past the real end
/// reads as zeroes.
fn sector_rounded(len: u64) -> u64 {
    len.div_ceil(512).saturating_mul(512)
}

fn pread_full(file: &File, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP))
}

fn to_usize(len: u64) -> Result<usize> {
    usize::try_from(len).map_err(|_| Error::Io(io::Error::from_raw_os_error(libc::EINVAL)))
}

/// Finds the smallest transfer size `O_DIRECT` accepts on this file.
fn probe_alignment(file: &File) -> u64 {
    let Ok(mut buf) = AlignedBuf::new(4096, 4096) else {
        return 4096;
    };
    for align in [512usize, 1024, 2048, 4096] {
        match file.read_at(&mut buf.as_mut_slice()[..align], 0) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            _ => return align as u64,
        }
    }
    4096
}

fn open_file(path: &str, writable: bool, direct: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(writable);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path).map_err(|e| {
        // QEMU reports a read-only file system as "Permission denied".
        if e.raw_os_error() == Some(libc::EROFS) {
            io::Error::from_raw_os_error(libc::EACCES)
        } else {
            e
        }
    })
}

impl FileDriver {
    /// Opens the file named in `opts`. Returns the driver and whether it ended up
    /// read-only (auto-read-only falls back to read-only when writing is refused).
    pub async fn open(opts: &FileOptions, flags: FileOpenFlags) -> Result<(Self, bool)> {
        if opts.aio == Some(Aio::Native) && !flags.direct {
            return Err(Error::AioNativeNeedsDirect);
        }
        let path = opts.filename.clone();
        let p = path.clone();
        let direct = flags.direct;
        let (file, read_only) = match tokio::task::spawn_blocking(move || {
            match open_file(&p, !flags.read_only, direct) {
                Ok(file) => Ok((file, flags.read_only)),
                Err(e)
                    if flags.auto_read_only
                        && matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) =>
                {
                    open_file(&p, false, direct).map(|f| (f, true))
                }
                Err(e) => Err(e),
            }
        })
        .await
        {
            Ok(Ok(opened)) => opened,
            Ok(Err(source)) => return Err(Error::Open { path, source }),
            Err(_) => {
                return Err(Error::Open {
                    path,
                    source: io::Error::other("open task failed"),
                })
            }
        };
        let file = Arc::new(file);
        let f = file.clone();
        let (size, align) = blocking(move || {
            let size = f.metadata()?.len();
            let align = if direct { probe_alignment(&f) } else { 1 };
            Ok((size, align))
        })
        .await?;
        let driver = Self {
            path,
            file,
            size: AtomicU64::new(sector_rounded(size)),
            align,
            direct,
            locking: opts.locking != Some(OnOffAuto::Off),
            force_share: flags.force_share,
            read_only,
            rmw: tokio::sync::RwLock::new(()),
            nowait: AtomicBool::new(!direct),
            inline: InlineWrites::new(!direct),
        };
        Ok((driver, read_only))
    }

    fn aligned_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset - offset % self.align;
        let end = (offset + len).div_ceil(self.align) * self.align;
        (start, end)
    }

    async fn sync(&self) -> Result<()> {
        let file = self.file.clone();
        blocking(move || file.sync_data()).await
    }

    async fn write_direct(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let len = buf.len() as u64;
        let (start, end) = self.aligned_range(offset, len);
        let aligned = start == offset && end == offset + len;
        let mut bounce = AlignedBuf::new(to_usize(end - start)?, to_usize(self.align)?)?;
        let file = self.file.clone();
        let size = self.size.load(Ordering::Acquire);
        if aligned {
            let _shared = self.rmw.read().await;
            bounce.as_mut_slice()[..buf.len()].copy_from_slice(buf);
            return blocking(move || file.write_all_at(bounce.as_slice(), start)).await;
        }
        let _exclusive = self.rmw.write().await;
        let data = buf.to_vec();
        let head = to_usize(offset - start)?;
        blocking(move || {
            pread_full(&file, start, bounce.as_mut_slice())?;
            bounce.as_mut_slice()[head..head + data.len()].copy_from_slice(&data);
            file.write_all_at(bounce.as_slice(), start)?;
            // The covering block may reach past the end of the file: keep the size.
            if end > size {
                file.set_len(size.max(offset + data.len() as u64))?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zero_buffer(&self, offset: u64, len: u64) -> Result<()> {
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(ZERO_CHUNK);
            let zeroes = vec![0u8; to_usize(chunk)?];
            self.write(offset + done, &zeroes, WriteFlags::default())
                .await?;
            done += chunk;
        }
        Ok(())
    }

    /// A buffered write: small page-aligned ones on this thread while such writes stay fast
    /// (they only copy into the page cache), everything else on the worker pool.
    async fn write_buffered(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.inline.may_write(offset, buf.len()) {
            let started = std::time::Instant::now();
            let result = self.file.write_all_at(buf, offset);
            self.inline.took(started.elapsed());
            return result.map_err(Error::Io);
        }
        let file = self.file.clone();
        let data = buf.to_vec();
        blocking(move || file.write_all_at(&data, offset)).await
    }

    /// Reads what the page cache holds from `offset` on this thread, without blocking, and
    /// returns how many bytes of `buf` are done (all of it at the end of the file, which
    /// reads as zeroes). The rest goes to the worker pool.
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> usize {
        if !self.nowait.load(Ordering::Relaxed) {
            return 0;
        }
        let mut done = 0;
        while done < buf.len() {
            match sys::file::pread_nowait(&self.file, &mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return buf.len();
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.nowait.store(false, Ordering::Relaxed);
                    break;
                }
                // Not cached, or a real error the pool's read reports.
                Err(_) => break,
            }
        }
        done
    }

    fn lock_bytes(&self, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let shared = if self.force_share { Perm::ALL } else { shared };
        (perm, !shared)
    }
}

#[async_trait]
impl BlockDriver for FileDriver {
    fn name(&self) -> &'static str {
        "file"
    }

    fn is_protocol(&self) -> bool {
        true
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn alignment(&self) -> u64 {
        self.align
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = self.file.clone();
        if !self.direct {
            let done = self.read_cached(offset, buf);
            if done == buf.len() {
                return Ok(());
            }
            let rest = &mut buf[done..];
            let (at, len) = (offset + done as u64, rest.len());
            let data = blocking(move || {
                let mut data = vec![0u8; len];
                pread_full(&file, at, &mut data)?;
                Ok(data)
            })
            .await?;
            rest.copy_from_slice(&data);
            return Ok(());
        }
        let (start, end) = self.aligned_range(offset, buf.len() as u64);
        let mut bounce = AlignedBuf::new(to_usize(end - start)?, to_usize(self.align)?)?;
        let bounce = blocking(move || {
            pread_full(&file, start, bounce.as_mut_slice())?;
            Ok(bounce)
        })
        .await?;
        let head = to_usize(offset - start)?;
        buf.copy_from_slice(&bounce.as_slice()[head..head + buf.len()]);
        Ok(())
    }

    fn grows_on_write(&self) -> bool {
        !self.read_only
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        if self.direct {
            self.write_direct(offset, buf).await?;
        } else {
            self.write_buffered(offset, buf).await?;
        }
        let end = offset.saturating_add(buf.len() as u64);
        self.size.fetch_max(sector_rounded(end), Ordering::AcqRel);
        if flags.fua {
            self.sync().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let file = self.file.clone();
        let mode = if flags.may_unmap {
            FallocMode::PunchHole
        } else {
            FallocMode::ZeroRange
        };
        let result = blocking(
            move || match sys::file::fallocate(&file, mode, offset, len) {
                Err(e) if mode == FallocMode::PunchHole && is_unsupported(&e) => {
                    sys::file::fallocate(&file, FallocMode::ZeroRange, offset, len)
                }
                other => other,
            },
        )
        .await;
        match result {
            Ok(()) => {}
            Err(Error::Io(e)) if is_unsupported(&e) && !flags.no_fallback => {
                self.write_zero_buffer(offset, len).await?;
            }
            Err(Error::Io(e)) if is_unsupported(&e) => {
                return Err(Error::Io(io::Error::from_raw_os_error(libc::ENOTSUP)))
            }
            Err(e) => return Err(e),
        }
        if flags.fua {
            self.sync().await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let file = self.file.clone();
        blocking(
            move || match sys::file::fallocate(&file, FallocMode::PunchHole, offset, len) {
                Err(e) if is_unsupported(&e) => Ok(()),
                other => other,
            },
        )
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.sync().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let file = self.file.clone();
        let size = self.size();
        let len = len.min(size.saturating_sub(offset)).max(1);
        let (data, run) = blocking(move || {
            let data_at = sys::file::seek(&file, Seek::Data, offset)?;
            match data_at {
                Some(d) if d == offset => {
                    let hole = sys::file::seek(&file, Seek::Hole, offset)?.unwrap_or(size);
                    Ok((true, hole.saturating_sub(offset)))
                }
                Some(d) => Ok((false, d - offset)),
                None => Ok((false, size.saturating_sub(offset))),
            }
        })
        .await?;
        // A protocol node determines all of its contents: holes too are allocated here
        // (they read as zeroes), as QEMU counts them.
        Ok(Extent {
            data,
            zero: !data,
            allocated: true,
            len: run.clamp(1, len),
        })
    }

    async fn truncate(&self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ImageReadOnly);
        }
        let file = self.file.clone();
        blocking(move || file.set_len(size)).await?;
        self.size.store(sector_rounded(size), Ordering::Release);
        Ok(())
    }

    fn filename(&self) -> Filename {
        let mut options = Map::new();
        options.insert("driver".into(), Value::from("file"));
        options.insert("filename".into(), Value::from(self.path.clone()));
        Filename {
            exact: Some(self.path.clone()),
            options,
        }
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            actual_size: self.file.metadata().ok().map(|m| m.blocks() * 512),
            dirty_flag: Some(false),
            format_specific: Some(FormatSpecific::File),
            ..DriverInfo::default()
        }
    }

    fn check_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        if !self.locking {
            return Ok(());
        }
        let (held, unshared) = self.lock_bytes(perm, shared);
        for (i, name) in Perm::NAMES.iter().enumerate() {
            if held.bits() & (1 << i) != 0
                && sys::file::ofd_byte_is_locked(&self.file, LOCK_SHARED_BASE + i as u64)?
            {
                return Err(Error::LockFailed {
                    perm: name,
                    path: self.path.clone(),
                });
            }
        }
        for (i, name) in Perm::NAMES.iter().enumerate() {
            if unshared.bits() & (1 << i) != 0
                && sys::file::ofd_byte_is_locked(&self.file, LOCK_PERM_BASE + i as u64)?
            {
                return Err(Error::SharedLockFailed {
                    perm: name,
                    path: self.path.clone(),
                });
            }
        }
        Ok(())
    }

    fn set_perm(&self, perm: Perm, shared: Perm) {
        if !self.locking {
            return;
        }
        let (held, unshared) = self.lock_bytes(perm, shared);
        for i in 0..Perm::NAMES.len() {
            let bit = 1u8 << i;
            // Best effort, as QEMU: a lock we fail to drop or take only weakens interop.
            let _ = sys::file::ofd_lock_byte(
                &self.file,
                LOCK_PERM_BASE + i as u64,
                held.bits() & bit != 0,
            );
            let _ = sys::file::ofd_lock_byte(
                &self.file,
                LOCK_SHARED_BASE + i as u64,
                unshared.bits() & bit != 0,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InlineWrites;
    use std::time::Duration;

    #[test]
    fn only_small_page_aligned_writes_run_inline() {
        let w = InlineWrites::new(true);
        assert!(w.may_write(0, 4096));
        assert!(w.may_write(1 << 30, InlineWrites::MAX_LEN));
        assert!(!w.may_write(512, 4096));
        assert!(!w.may_write(0, 4000));
        assert!(!w.may_write(0, InlineWrites::MAX_LEN + 4096));
        assert!(!InlineWrites::new(false).may_write(0, 4096));
    }

    #[test]
    fn a_slow_write_sends_writes_to_the_pool_for_a_while() {
        let w = InlineWrites::new(true);
        w.took(Duration::from_micros(100));
        assert!(w.may_write(0, 4096));
        w.took(InlineWrites::SLOW + Duration::from_millis(1));
        assert!(!w.may_write(0, 4096));
        std::thread::sleep(InlineWrites::BACKOFF + Duration::from_millis(20));
        assert!(w.may_write(0, 4096));
    }
}
