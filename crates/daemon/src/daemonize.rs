//! `--daemonize`: detach from the terminal the way QSD does (QEMU's `os_daemonize` and
//! `os_setup_post`).
//!
//! States of the original process tree:
//! 1. [`daemonize`] (still single-threaded, before the tokio runtime is built) opens a
//!    pipe and forks. The original parent blocks reading one byte from it and exits 0 only
//!    if that byte is 0; an empty read (the daemon died or gave up) means exit 1.
//! 2. The child calls `setsid`, forks again and exits 0, so that the grandchild (the
//!    daemon) is no session leader and can never acquire a controlling terminal. The
//!    daemon sets umask 027 and ignores the job-control signals.
//! 3. The daemon processes all options with stderr still attached, so start-up errors
//!    reach the user. Once started (after the pid file), [`Readiness::ready`] changes to
//!    `/`, points stdin, stdout and stderr at `/dev/null` and writes the 0 byte.
//!    [`Readiness::failed`] (or dropping the value) closes the pipe instead.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;

use sys::process::{self, Fork};

/// The daemon's end of the start-up pipe, held until start-up has succeeded or failed.
#[derive(Debug)]
#[must_use = "the waiting parent exits 1 unless ready() is called"]
pub struct Readiness {
    pipe: File,
}

/// Detaches the process. Returns only in the daemon; the original process exits with the
/// daemon's start-up status, and the intermediate one exits 0.
///
/// Must be called while the process has a single thread.
pub fn daemonize() -> io::Result<Readiness> {
    let (mut read_end, write_end) = process::pipe()?;
    match process::fork()? {
        Fork::Parent(_) => {
            drop(write_end);
            let mut status = [0u8; 1];
            let ok = loop {
                match read_end.read(&mut status) {
                    Ok(1) => break status[0] == 0,
                    Ok(_) => break false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break false,
                }
            };
            process::exit_now(if ok { 0 } else { 1 });
        }
        Fork::Child => {}
    }
    drop(read_end);
    if process::setsid().is_err() {
        process::exit_now(1);
    }
    match process::fork() {
        Ok(Fork::Parent(_)) => process::exit_now(0),
        Ok(Fork::Child) => {}
        Err(_) => process::exit_now(1),
    }
    process::umask(0o027);
    process::ignore_job_control_signals();
    Ok(Readiness { pipe: write_end })
}

impl Readiness {
    /// Start-up succeeded: change to `/`, detach the standard streams and let the waiting
    /// parent exit 0.
    pub fn ready(mut self) -> io::Result<()> {
        std::env::set_current_dir("/")?;
        let null: File = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        for target in 0..=2 {
            process::dup2(null.as_fd(), target)?;
        }
        drop(null);
        loop {
            match self.pipe.write(&[0]) {
                Ok(1) => return Ok(()),
                Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Start-up failed: the waiting parent exits 1. The daemon should report its error
    /// on stderr (still attached) and exit 1 itself.
    pub fn failed(self) {
        drop(self);
    }
}
