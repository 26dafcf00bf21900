//! `--pidfile PATH`: the daemon's pid, written once start-up has succeeded.
//!
//! As QEMU does (`qemu_write_pidfile`): create the file (mode 0600), take a whole-file
//! `fcntl` write lock so that a second daemon given the same path fails, check that the
//! path still names the file we locked (another daemon may have removed or replaced it in
//! the meantime; then start again), truncate it and write `<pid>\n`. The descriptor stays
//! open, and so the lock held, for as long as the [`PidFile`] lives; dropping it removes
//! the file, but only while the path still names the file we wrote.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why the pid file could not be written. Displayed as QSD's whole message after its
/// program name, e.g. `cannot create PID file: Cannot lock pid file: Resource temporarily
/// unavailable`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PidFileError {
    #[error("cannot create PID file: Could not create '{}': {}", .0.display(), os_text(.1))]
    Create(PathBuf, io::Error),
    #[error("cannot create PID file: Cannot stat file: {}", os_text(.0))]
    Stat(io::Error),
    #[error("cannot create PID file: Cannot lock pid file: {}", os_text(.0))]
    Lock(io::Error),
    #[error("cannot create PID file: Failed to truncate pid file: {}", os_text(.0))]
    Truncate(io::Error),
    #[error("cannot create PID file: Failed to write pid file")]
    Write(io::Error),
    #[error("cannot resolve PID file path: {}: {}", .0.display(), os_text(.1))]
    Resolve(PathBuf, io::Error),
}

/// The strerror text of an OS error, without Rust's " (os error N)" suffix.
pub(crate) fn os_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// A written and locked pid file; removed when dropped.
#[derive(Debug)]
pub struct PidFile {
    /// Absolute path, so that removal works after `chdir("/")`.
    path: PathBuf,
    /// Keeps the lock for the life of the process.
    file: File,
}

impl PidFile {
    /// Creates, locks and fills `path` with this process's pid.
    pub fn create(path: &Path) -> Result<PidFile, PidFileError> {
        let file = loop {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                // Truncating before the lock would wipe another daemon's pid.
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| PidFileError::Create(path.to_path_buf(), e))?;
            let ours = file.metadata().map_err(PidFileError::Stat)?;
            sys::process::try_lock_write(&file).map_err(PidFileError::Lock)?;
            // Someone may have unlinked or replaced the file between open and lock.
            match fs::metadata(path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => break file,
                _ => continue,
            }
        };
        if let Err(e) = file.set_len(0) {
            let _ = fs::remove_file(path);
            return Err(PidFileError::Truncate(e));
        }
        let text = format!("{}\n", sys::process::getpid());
        if let Err(e) = (&file).write_all(text.as_bytes()) {
            let _ = fs::remove_file(path);
            return Err(PidFileError::Write(e));
        }
        let abs = match fs::canonicalize(path) {
            Ok(abs) => abs,
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(PidFileError::Resolve(path.to_path_buf(), e));
            }
        };
        Ok(PidFile { path: abs, file })
    }

    /// The absolute path of the file.
    #[allow(dead_code)] // part of the type's interface; tests use it
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let (Ok(ours), Ok(now)) = (self.file.metadata(), fs::metadata(&self.path)) else {
            return;
        };
        if ours.ino() == now.ino() && ours.dev() == now.dev() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_writes_pid_and_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");

        let pid = PidFile::create(&path).unwrap();

        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o077, 0);
        drop(pid);
    }

    #[test]
    fn create_truncates_longer_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        fs::write(&path, "99999999999999999999\nold\n").unwrap();

        let _pid = PidFile::create(&path).unwrap();

        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn drop_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let pid = PidFile::create(&path).unwrap();

        drop(pid);

        assert!(!path.exists());
    }

    #[test]
    fn drop_keeps_a_file_that_is_no_longer_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let pid = PidFile::create(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, "1\n").unwrap();

        drop(pid);

        assert_eq!(fs::read_to_string(&path).unwrap(), "1\n");
    }

    #[test]
    fn create_in_missing_directory_reports_qsd_message() {
        let err = PidFile::create(Path::new("/nonexistent-dir/p")).unwrap_err();

        assert_eq!(
            err.to_string(),
            "cannot create PID file: Could not create '/nonexistent-dir/p': No such file or directory"
        );
    }

    #[test]
    fn create_on_directory_reports_qsd_message() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("d");
        fs::create_dir(&sub).unwrap();

        let err = PidFile::create(&sub).unwrap_err();

        assert_eq!(
            err.to_string(),
            format!(
                "cannot create PID file: Could not create '{}': Is a directory",
                sub.display()
            )
        );
    }

    /// POSIX record locks are per process, so a second daemon is modelled by a child
    /// process (`flock` via the util-linux tool is not the same lock kind): here a
    /// QSD-compatible holder is the real qemu-storage-daemon when it is installed.
    #[test]
    fn create_fails_while_another_process_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let mut child = std::process::Command::new("qemu-storage-daemon")
            .arg("--pidfile")
            .arg(&path)
            .spawn()
            .expect("qemu-storage-daemon is needed for this test (package qemu-utils)");
        while fs::read_to_string(&path).map_or(true, |s| !s.ends_with('\n')) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }

        let err = PidFile::create(&path).unwrap_err();

        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            err.to_string(),
            "cannot create PID file: Cannot lock pid file: Resource temporarily unavailable"
        );
    }
}
