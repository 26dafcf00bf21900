//! Running a program to completion with a time limit, signalling processes that
//! are not our children, and raw (line or pretty-printed) QMP reads on any
//! stream, for black-box tests of the daemon binary.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a finished program left behind.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// The exit code, or `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `binary` with `args` in `dir` (stdin from `/dev/null`) until it exits,
/// killing it after `timeout`, which is an error. `env` adds or replaces
/// environment variables.
pub fn run_to_exit<S: AsRef<OsStr>>(
    binary: &Path,
    args: &[S],
    dir: &Path,
    env: &[(&str, &OsStr)],
    timeout: Duration,
) -> Result<Outcome> {
    let out_path = dir.join(format!(".run-{}.stdout", unique()));
    let err_path = dir.join(format!(".run-{}.stderr", unique()));
    let mut command = Command::new(binary);
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).context("cannot create stdout file")?)
        .stderr(File::create(&err_path).context("cannot create stderr file")?);
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let mut guard = ChildGuard::new(child);
    let status = guard.wait_timeout(timeout);
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    let Some(status) = status? else {
        bail!(
            "{} did not exit within {timeout:?}; stdout: {stdout:?}; stderr: {stderr:?}",
            binary.display()
        );
    };
    Ok(Outcome {
        status,
        stdout,
        stderr,
    })
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self {
            child: Some(child),
            status: None,
        }
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits up to `timeout`; `Ok(None)` if still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.status {
                return Ok(Some(status));
            }
            let Some(child) = self.child.as_mut() else {
                return Ok(None);
            };
            if let Some(status) = child.try_wait().context("cannot wait for child")? {
                self.status = Some(status);
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Sends `signal` (a name such as `TERM`) to process `pid` with `kill(1)`.
pub fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let kill = crate::find_tool("kill", "procps");
    let status = Command::new(kill)
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed: {status}");
    }
    Ok(())
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Waits up to `timeout` for process `pid` to be gone.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// A process that is not our child (e.g. a daemonized one), killed with
/// SIGKILL when dropped unless it is already gone.
#[derive(Debug)]
pub struct PidGuard(pub u32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if self.0 != 0 && process_alive(self.0) {
            let _ = send_signal(self.0, "KILL");
            wait_gone(self.0, Duration::from_secs(5));
        }
    }
}

/// A stream whose reads can time out.
pub trait TimeoutStream: Read + Write {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimeoutStream for UnixStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl TimeoutStream for TcpStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// Raw byte-level QMP reads on any stream, each bounded by a deadline.
#[derive(Debug)]
pub struct RawConn<S: TimeoutStream> {
    stream: S,
    buf: Vec<u8>,
    timeout: Duration,
}

impl<S: TimeoutStream> RawConn<S> {
    pub fn new(stream: S, timeout: Duration) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            timeout,
        }
    }

    /// Like [`RawConn::new`], with `buffered` bytes already read from `stream`
    /// coming first.
    pub fn with_buffered(stream: S, buffered: Vec<u8>, timeout: Duration) -> Self {
        Self {
            stream,
            buf: buffered,
            timeout,
        }
    }

    /// The underlying stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Writes all of `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream
            .write_all(bytes)
            .context("cannot write to the connection")
    }

    /// Reads until `done(buffered)` returns the length of a complete message,
    /// and returns those bytes. End of stream before that is an error.
    fn read_until(&mut self, done: impl Fn(&[u8]) -> Option<usize>) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(len) = done(&self.buf) {
                return Ok(self.buf.drain(..len).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no complete message within {:?}; buffered: {:?}",
                    self.timeout,
                    String::from_utf8_lossy(&self.buf)
                );
            }
            self.stream
                .set_timeout(Some(left))
                .context("cannot set read timeout")?;
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!(
                    "connection closed; buffered: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("cannot read from the connection"),
            }
        }
    }

    /// One compact message: bytes up to and including the first `\n`.
    pub fn read_line(&mut self) -> Result<Vec<u8>> {
        self.read_until(|buf| buf.iter().position(|&b| b == b'\n').map(|at| at + 1))
    }

    /// One compact message parsed as JSON.
    pub fn read_json(&mut self) -> Result<serde_json::Value> {
        let line = self.read_line()?;
        serde_json::from_slice(&line)
            .with_context(|| format!("not JSON: {:?}", String::from_utf8_lossy(&line)))
    }

    /// One message, compact or pretty-printed: bytes up to and including the
    /// first line end at which they form a JSON value.
    pub fn read_message(&mut self) -> Result<Vec<u8>> {
        self.read_until(|buf| {
            buf.iter()
                .enumerate()
                .filter(|&(_, &b)| b == b'\n')
                .map(|(at, _)| at + 1)
                .find(|&len| serde_json::from_slice::<serde_json::Value>(&buf[..len]).is_ok())
        })
    }

    /// One pretty-printed message: bytes up to and including the line `}\r\n`
    /// that closes the top-level object.
    pub fn read_pretty(&mut self) -> Result<Vec<u8>> {
        self.read_until(|buf| {
            let end = b"\n}\r\n";
            buf.windows(end.len())
                .position(|w| w == end)
                .map(|at| at + end.len())
        })
    }
}
