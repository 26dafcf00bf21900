//! Process control: fork, setsid, descriptors, pid-file locks.
//!
//! These wrappers exist for `--daemonize` and `--pidfile`. `fork` is only sound while the
//! process has a single thread, so the daemon calls [`fork`] before it builds its runtime.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Which side of a [`fork`] the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    /// The original process; holds the child's pid.
    Parent(libc::pid_t),
    /// The new process.
    Child,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Forks the process.
///
/// Call it only while the process has one thread (before any runtime or thread pool is
/// started): the child gets a copy of the caller's thread only, and a lock held by
/// another thread would stay locked forever in the child.
pub fn fork() -> io::Result<Fork> {
    // SAFETY: fork has no memory-safety preconditions of its own; the single-thread
    // requirement that keeps the child's heap and locks consistent is documented above
    // and is the caller's to uphold (the daemon forks before it starts any thread).
    let pid = check(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Fork::Child
    } else {
        Fork::Parent(pid)
    })
}

/// Starts a new session with the calling process as its leader (detaches the terminal).
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments and only changes the process's session.
    check(unsafe { libc::setsid() })?;
    Ok(())
}

/// Sets the file mode creation mask and returns the previous one.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail and touches no memory of ours.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// The id of the calling process.
pub fn getpid() -> u32 {
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    pid.unsigned_abs()
}

/// The real user id of the calling process.
pub fn getuid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// Ends the process at once with `code`, without running atexit handlers or destructors:
/// what a forked parent does after handing over to its child.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Ignores the terminal job-control signals (SIGTSTP, SIGTTIN, SIGTTOU), as a daemon
/// that has left its terminal should.
pub fn ignore_job_control_signals() {
    for sig in [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
        // SAFETY: SIG_IGN installs no handler code; changing the disposition of these
        // signals affects no memory of ours. signal fails only for invalid numbers.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

/// Makes `target` (0, 1 or 2 for the standard streams) a copy of `src`.
pub fn dup2(src: BorrowedFd<'_>, target: libc::c_int) -> io::Result<()> {
    // SAFETY: both are plain descriptor numbers; `src` is open for the duration of the
    // call because it is borrowed. Replacing `target` is the point of the call: callers
    // pass only standard-stream numbers, which no Rust object owns exclusively.
    check(unsafe { libc::dup2(src.as_raw_fd(), target) })?;
    Ok(())
}

/// Creates a pipe whose both ends are close-on-exec.
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill in.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(read), File::from(write)))
}

/// Tries to take a whole-file write lock (`fcntl(F_SETLK)`, a POSIX record lock) without
/// waiting. Fails with `EAGAIN`/`EACCES` when another process holds a conflicting lock.
/// The lock lasts as long as the process keeps any descriptor of the file open.
pub fn try_lock_write(file: &impl AsFd) -> io::Result<()> {
    // SAFETY: flock is plain old data; all-zero is a valid value for it.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 0;
    let fd = file.as_fd().as_raw_fd();
    // SAFETY: `fd` is open (borrowed from `file`) and `lock` is a valid flock that
    // outlives the call.
    check(unsafe { libc::fcntl(fd, libc::F_SETLK, &lock) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getpid_matches_std() {
        assert_eq!(getpid(), std::process::id());
    }

    #[test]
    fn pipe_carries_bytes() {
        use std::io::{Read, Write};
        let (mut r, mut w) = pipe().unwrap();
        w.write_all(b"ok").unwrap();
        drop(w);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "ok");
    }

    #[test]
    fn write_lock_is_granted_on_fresh_file() {
        let file = tempfile::tempfile().unwrap();
        try_lock_write(&file).unwrap();
    }
}
