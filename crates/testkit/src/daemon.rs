//! Starting and stopping a daemon process.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::proc::RawConn;
use crate::qmp::{Qmp, READ_TIMEOUT};

/// How long a daemon may take to create its QMP socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`start_qsd`] starts qemu-storage-daemon before giving up.
pub const QSD_ATTEMPTS: usize = 3;

/// How long a freshly started qemu-storage-daemon may take to send its greeting
/// and to answer the probe (except on the last attempt, which gets
/// [`READ_TIMEOUT`] so that a merely slow daemon still passes).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The state in which [`start_qsd`] leaves the monitor connection it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// Capabilities negotiated with `qmp_capabilities` (which is the probe).
    Negotiated,
    /// Still in negotiation mode; the probe is a command QSD refuses there
    /// (`CommandNotFound`), which changes no state.
    Negotiating,
}

/// A request every QMP monitor answers with an error in either mode and
/// without side effects.
const NEGOTIATING_PROBE: &str = r#"{"execute":"testkit-probe","id":"testkit-probe"}"#;

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

/// Path of QEMU's x86 system emulator, the reference for what qemu-storage-daemon lacks
/// (`snapshot-save`, `snapshot-load`, `snapshot-delete`). Installing it would replace
/// the reference tools with another version, so it is unpacked beside them by
/// `tests/tools/fetch-qemu-system` into the workspace's `target/qemu-system` on first use
/// (`BLOCKD_QEMU_SYSTEM` names another binary).
pub fn qemu_system_path() -> PathBuf {
    if let Some(path) = std::env::var_os("BLOCKD_QEMU_SYSTEM") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("testkit lives in crates/testkit")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    let root = target.join("qemu-system");
    let binary = root.join("usr/bin/qemu-system-x86_64");
    if binary.is_file() {
        return binary;
    }
    // Unpacked aside and renamed into place, so tests starting together never see half.
    let partial = target.join(format!("qemu-system.partial-{}", std::process::id()));
    let script = workspace.join("tests/tools/fetch-qemu-system");
    let status = Command::new(&script).arg(&partial).status();
    if !matches!(status, Ok(s) if s.success()) {
        let _ = std::fs::remove_dir_all(&partial);
        panic!(
            "QEMU's system emulator is needed as the reference for the snapshot jobs: \
             `{} {}` failed ({status:?}); it needs curl, network access to deb.debian.org \
             and apt-get (or set BLOCKD_QEMU_SYSTEM to a qemu-system-x86_64 of QEMU 10.0.2)",
            script.display(),
            root.display()
        );
    }
    if std::fs::rename(&partial, &root).is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    assert!(binary.is_file(), "{} missing after fetch", binary.display());
    binary
}

/// Whether `binary` is a QEMU system emulator (it takes `-blockdev` and `-mon`, not
/// qemu-storage-daemon's `--blockdev` and `--monitor`).
pub fn is_system_emulator(binary: &Path) -> bool {
    binary
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("qemu-system-"))
}

/// The command line of a system emulator for qemu-storage-daemon's `args`: no machine,
/// no devices, a `--monitor` as a QMP `-mon`. Only options both programs have translate.
fn system_emulator_args(args: &[OsString]) -> Result<Vec<OsString>> {
    let mut out: Vec<OsString> = ["-machine", "none", "-nodefaults", "-display", "none"]
        .iter()
        .map(OsString::from)
        .collect();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let text = arg.to_str().context("non-UTF-8 argument")?;
        let value = iter.next().context("option without a value")?;
        match text {
            "--blockdev" | "--object" | "--chardev" => {
                out.push(text[1..].into());
                out.push(value.clone());
            }
            "--monitor" => {
                let value = value.to_str().context("non-UTF-8 argument")?;
                out.push("-mon".into());
                out.push(format!("{value},mode=control").into());
            }
            _ => bail!("the system emulator has no equivalent of {text}"),
        }
    }
    Ok(out)
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
        let mut command = Command::new(binary);
        if is_system_emulator(binary) {
            args = system_emulator_args(&args)?;
            // Libraries unpacked beside an emulator that is not installed.
            if let Some(root) = binary.parent().and_then(Path::parent) {
                command.env("LD_LIBRARY_PATH", root.join("lib/x86_64-linux-gnu"));
            }
        }
        let started = Instant::now();
        let child = command
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

/// Starts qemu-storage-daemon like [`Daemon::start`] (in a fresh temporary
/// directory) or [`Daemon::start_in`] (in `dir`), with the same arguments,
/// and returns it with a connection to its `qmp.sock` monitor that is known to
/// be served: the greeting has been read and a probe request answered (see
/// [`Session`]).
///
/// qemu-storage-daemon 10.0.2 occasionally never serves a monitor connection
/// made right after its socket appears: its monitor I/O thread ends up blocked
/// in `accept` on the listening socket after another thread took the client,
/// so the greeting may arrive but no request is ever answered. A daemon whose
/// monitor does not answer within [`PROBE_TIMEOUT`] is therefore killed and
/// started again, up to [`QSD_ATTEMPTS`] times.
///
/// Only the reference daemon gets this: blockd is started with
/// [`Daemon::start`] and a blockd that stops answering fails the test.
pub fn start_qsd<S: AsRef<std::ffi::OsStr>>(
    dir: Option<&Path>,
    extra_args: &[S],
    session: Session,
) -> Result<(Daemon, Qmp)> {
    start_qsd_checked(dir, extra_args, session, |_| Ok(()))
}

/// Like [`start_qsd`], and `check` (given the daemon after the probe) must
/// succeed too, or the daemon is started again; use it to probe further
/// monitors with [`probe_monitor`].
pub fn start_qsd_checked<S: AsRef<std::ffi::OsStr>>(
    dir: Option<&Path>,
    extra_args: &[S],
    session: Session,
    check: impl FnMut(&mut Daemon) -> Result<()>,
) -> Result<(Daemon, Qmp)> {
    start_retrying(&qsd_path(), dir, extra_args, session, check)
}

/// [`start_qsd_checked`] for a given qemu-storage-daemon binary.
pub(crate) fn start_retrying<S: AsRef<std::ffi::OsStr>>(
    qsd: &Path,
    dir: Option<&Path>,
    extra_args: &[S],
    session: Session,
    mut check: impl FnMut(&mut Daemon) -> Result<()>,
) -> Result<(Daemon, Qmp)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last = attempt >= QSD_ATTEMPTS;
        let timeout = if last { READ_TIMEOUT } else { PROBE_TIMEOUT };
        let mut daemon = match dir {
            Some(dir) => {
                if attempt > 1 {
                    // The killed earlier attempt left its socket file behind.
                    let _ = std::fs::remove_file(dir.join("qmp.sock"));
                }
                Daemon::start_in(qsd, dir, extra_args)?
            }
            None => Daemon::start(qsd, extra_args)?,
        };
        let served = probe_qsd(&mut daemon, session, timeout)
            .and_then(|qmp| check(&mut daemon).map(|()| qmp));
        match served {
            Ok(qmp) => return Ok((daemon, qmp)),
            Err(err) => {
                let stderr = daemon.stderr();
                daemon.kill();
                if last {
                    return Err(err.context(format!(
                        "qemu-storage-daemon did not serve its monitor in {attempt} attempts; \
                         stderr: {stderr}"
                    )));
                }
                eprintln!(
                    "qemu-storage-daemon did not serve its monitor ({err:#}); starting it again"
                );
            }
        }
    }
}

/// Connects to the daemon's monitor, reads the greeting and has the probe
/// answered, every read within `timeout`.
fn probe_qsd(daemon: &mut Daemon, session: Session, timeout: Duration) -> Result<Qmp> {
    let stream = daemon.connect_stream(START_TIMEOUT)?;
    let mut qmp = Qmp::from_stream_timeout(stream, timeout)?;
    match session {
        Session::Negotiated => {
            qmp.try_execute("qmp_capabilities", serde_json::json!({}))?
                .map_err(anyhow::Error::from)
                .context("qmp_capabilities failed")?;
        }
        Session::Negotiating => {
            qmp.send_raw(NEGOTIATING_PROBE.as_bytes())?;
            let reply = qmp.read_reply()?;
            if reply["error"]["class"] != "CommandNotFound" {
                bail!("unexpected reply to the probe: {reply}");
            }
        }
    }
    if !qmp.take_events().is_empty() {
        bail!("events before the probe's reply");
    }
    qmp.set_timeout(READ_TIMEOUT);
    Ok(qmp)
}

/// Checks that the monitor listening at `socket` (compact or `pretty=on`)
/// serves a connection: connects, reads the greeting, has a request refused
/// (in negotiation mode, which it stays in) and disconnects, every read
/// within `timeout`. The monitor then accepts the next client as usual.
pub fn probe_monitor(socket: &Path, timeout: Duration) -> Result<()> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut conn = RawConn::new(stream, timeout);
    conn.read_message().context("no greeting")?;
    conn.send(NEGOTIATING_PROBE.as_bytes())?;
    let reply = conn.read_message().context("no reply to the probe")?;
    let reply: serde_json::Value =
        serde_json::from_slice(&reply).context("the probe's reply is not JSON")?;
    if reply["error"]["class"] != "CommandNotFound" {
        bail!("unexpected reply to the probe: {reply}");
    }
    Ok(())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
