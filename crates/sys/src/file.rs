//! File system calls the `file` block driver needs beyond `std`: open-file-description
//! byte-range locks (QEMU's image locking protocol), `fallocate` modes, `SEEK_DATA` /
//! `SEEK_HOLE`, and buffers aligned for `O_DIRECT`.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// How `fallocate` changes a byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocMode {
    /// Allocate blocks (and extend the file if the range ends past it).
    Allocate,
    /// Make the range read as zeroes without deallocating it; the size is kept.
    ZeroRange,
    /// Deallocate the range (it reads as zeroes); the size is kept.
    PunchHole,
}

/// `fallocate(2)` on `file`.
pub fn fallocate(file: &File, mode: FallocMode, offset: u64, len: u64) -> io::Result<()> {
    let flags = match mode {
        FallocMode::Allocate => 0,
        FallocMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        FallocMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    };
    let offset = off_t(offset)?;
    let len = off_t(len)?;
    // SAFETY: the descriptor is owned by `file`, which outlives the call; fallocate takes
    // only integers and touches no memory of ours.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), flags, offset, len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `preadv2(2)` with `RWF_NOWAIT`: read what the page cache holds at `offset` without
/// blocking. Returns the bytes read (0 at end of file); `WouldBlock` when the data is not
/// cached (or the kernel cannot tell without blocking), `Unsupported`-like errors on kernels
/// or files without the flag.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let offset = off_t(offset)?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the descriptor is owned by `file`, which outlives the call; the one iovec
    // describes `buf`, which is exclusively borrowed for the duration of the call, and the
    // kernel writes at most `iov_len` bytes into it.
    let ret = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EIO))
}

/// Which kind of region `seek` looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    /// `SEEK_DATA`: the next offset at or after the start that holds data.
    Data,
    /// `SEEK_HOLE`: the next offset at or after the start inside a hole (EOF counts as one).
    Hole,
}

/// `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE`; `Ok(None)` when nothing follows (`ENXIO`).
pub fn seek(file: &File, what: Seek, offset: u64) -> io::Result<Option<u64>> {
    let whence = match what {
        Seek::Data => libc::SEEK_DATA,
        Seek::Hole => libc::SEEK_HOLE,
    };
    let offset = off_t(offset)?;
    // SAFETY: the descriptor is owned by `file`; lseek only moves the file position of the
    // description, which no other code of ours relies on (all I/O is positional).
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(err);
    }
    Ok(u64::try_from(ret).ok())
}

fn off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn flock_for(kind: libc::c_short, byte: u64) -> io::Result<libc::flock> {
    Ok(libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: off_t(byte)?,
        l_len: 1,
        l_pid: 0,
    })
}

/// Takes (`locked = true`) or drops a shared open-file-description lock on one byte.
pub fn ofd_lock_byte(file: &File, byte: u64, locked: bool) -> io::Result<()> {
    let kind = if locked { libc::F_RDLCK } else { libc::F_UNLCK };
    let mut fl = flock_for(kind as libc::c_short, byte)?;
    // SAFETY: `fl` is a valid, initialised flock that lives across the call; the descriptor
    // is owned by `file`.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte` that would conflict
/// with an exclusive lock (that is, anyone but us has it locked at all).
pub fn ofd_byte_is_locked(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = flock_for(libc::F_WRLCK as libc::c_short, byte)?;
    // SAFETY: `fl` is a valid flock that the kernel overwrites in place; the descriptor is
    // owned by `file`.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// A zero-filled heap buffer whose address and length are multiples of `align`, as
/// `O_DIRECT` needs.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two); `len` is rounded
    /// up to a multiple of `align` and to at least `align`.
    pub fn new(len: usize, align: usize) -> io::Result<Self> {
        let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
        let align = align.max(1);
        let rounded = len
            .max(1)
            .checked_next_multiple_of(align)
            .ok_or_else(invalid)?;
        let layout = Layout::from_size_align(rounded, align).map_err(|_| invalid())?;
        // SAFETY: `layout` has a non-zero size (rounded >= 1).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Self { ptr, layout })
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Never true: a buffer holds at least one aligned block.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with this exact `layout`.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.layout.size())
            .field("align", &self.layout.align())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn aligned_buf_is_aligned_and_rounded() {
        let buf = AlignedBuf::new(100, 4096).unwrap();
        assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0);
        assert_eq!(buf.len(), 4096);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn nowait_read_returns_cached_data_and_stops_at_eof() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 10_000]).unwrap();
        let mut buf = vec![0u8; 8192];
        match pread_nowait(&f, &mut buf, 4096) {
            Ok(n) => {
                assert_eq!(n, 8192 - (12_288 - 10_000));
                assert!(buf[..n].iter().all(|&b| b == 7));
            }
            // Kernels or file systems without RWF_NOWAIT refuse it; callers fall back.
            Err(e) => assert!(
                matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EAGAIN)
                ),
                "{e}"
            ),
        }
        assert_eq!(pread_nowait(&f, &mut buf, 20_000).unwrap_or(0), 0);
    }

    #[test]
    fn punch_hole_then_seek_finds_hole() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        fallocate(&f, FallocMode::PunchHole, 0, 1 << 20).unwrap();
        assert_eq!(seek(&f, Seek::Data, 0).unwrap(), None);
        assert_eq!(seek(&f, Seek::Hole, 0).unwrap(), Some(0));
    }

    #[test]
    fn ofd_lock_is_seen_by_another_description() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let a = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let b = File::open(&path).unwrap();
        ofd_lock_byte(&a, 101, true).unwrap();
        assert!(ofd_byte_is_locked(&b, 101).unwrap());
        assert!(!ofd_byte_is_locked(&b, 102).unwrap());
        ofd_lock_byte(&a, 101, false).unwrap();
        assert!(!ofd_byte_is_locked(&b, 101).unwrap());
    }
}
