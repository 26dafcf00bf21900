//! Starting and stopping a daemon process.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::qmp::Qmp;

/// How long a daemon may take to create its QMP socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds `tool` in `PATH`; panics naming the package to install when missing.
pub fn find_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{tool}` not found in PATH: install the {package} package");
}

/// Path of QEMU's `qemu-storage-daemon`, the reference implementation.
pub fn qsd_path() -> PathBuf {
    find_tool("qemu-storage-daemon", "qemu-utils")
}

/// A running daemon with a QMP unix-socket monitor at `dir/qmp.sock`.
///
/// The process is killed when this is dropped, so no daemon outlives a test.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    status: Option<ExitStatus>,
    dir: PathBuf,
    _tempdir: Option<TempDir>,
    socket: PathBuf,
    stderr_path: PathBuf,
    started: Instant,
}

impl Daemon {
    /// Starts `binary` in a fresh temporary directory with a QMP monitor plus
    /// `extra_args`, and waits for the socket.
    pub fn start<S: AsRef<std::ffi::OsStr>>(binary: &Path, extra_args: &[S]) -> Result<Self> {
        let tempdir = tempfile::Builder::new()
            .prefix("testkit-")
            .tempdir()
            .context("cannot create temporary directory")?;
        let dir = tempdir.path().to_path_buf();
        let mut daemon = Self::start_in(binary, &dir, extra_args)?;
        daemon._tempdir = Some(tempdir);
        Ok(daemon)
    }

    /// Starts `binary` in an existing directory `dir` (which the caller owns).
    pub fn start_in<S: AsRef<std::ffi::OsStr>>(
        binary: &Path,
        dir: &Path,
        extra_args: &[S],
    ) -> Result<Self> {
        let mut daemon = Self::spawn_in(binary, dir, extra_args)?;
        daemon.wait_socket(START_TIMEOUT)?;
        Ok(daemon)
    }

    /// Spawns `binary` without waiting for its socket.
    pub fn spawn_in<S: AsRef<std::ffi::OsStr>>(
        binary: &Path,
        dir: &Path,
        extra_args: &[S],
    ) -> Result<Self> {
        let socket = dir.join("qmp.sock");
        let stderr_path = dir.join("daemon.stderr");
        let stderr = File::create(&stderr_path).context("cannot create stderr file")?;
        let mut args: Vec<OsString> = vec![
            "--chardev".into(),
            format!(
                "socket,id=m0,path={},server=on,wait=off",
                socket.to_str().context("non-UTF-8 socket path")?
            )
            .into(),
            "--monitor".into(),
            "chardev=m0".into(),
        ];
        args.extend(extra_args.iter().map(|a| a.as_ref().to_os_string()));
        let started = Instant::now();
        let child = Command::new(binary)
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Self {
            child: Some(child),
            status: None,
            dir: dir.to_path_buf(),
            _tempdir: None,
            socket,
            stderr_path,
            started,
        })
    }

    /// Waits until the QMP socket exists (or the process dies).
    pub fn wait_socket(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.socket.exists() {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "daemon exited ({status}) before creating its QMP socket; stderr: {}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "daemon did not create {} within {timeout:?}; stderr: {}",
                    self.socket.display(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Connects a QMP client (retrying while the socket refuses) and reads
    /// the greeting. Does not negotiate.
    pub fn connect(&mut self) -> Result<Qmp> {
        let stream = self.connect_stream(START_TIMEOUT)?;
        Qmp::from_stream(stream)
    }

    /// Connects and negotiates capabilities.
    pub fn qmp(&mut self) -> Result<Qmp> {
        let mut qmp = self.connect()?;
        qmp.negotiate()?;
        Ok(qmp)
    }

    /// Raw connection to the QMP socket, retried until `timeout`.
    pub fn connect_stream(&mut self, timeout: Duration) -> Result<UnixStream> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(stream) => return Ok(stream),
                Err(err) => {
                    if let Some(status) = self.try_wait()? {
                        bail!("daemon exited ({status}); stderr: {}", self.stderr());
                    }
                    if Instant::now() > deadline {
                        return Err(err).with_context(|| {
                            format!("cannot connect to {}", self.socket.display())
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// The directory the daemon runs in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the QMP socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// When the process was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(self.status);
        };
        let status = child.try_wait().context("cannot wait for daemon")?;
        if status.is_some() {
            self.status = status;
        }
        Ok(status)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("daemon did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.status.is_none() {
                let _ = child.kill();
                if let Ok(status) = child.wait() {
                    self.status = Some(status);
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
