//! Block exports: the NBD server of the daemon and its exports, owned by the control task.
//!
//! The server listens on a unix or TCP socket and hands each client to [`nbd::Server`]. An
//! export is a block backend (a user edge on the node, holding read and, if writable,
//! write, and refusing to share resize, as QEMU's export does) served through
//! [`NodeBackend`]. The bitmaps an export offers (`qemu:dirty-bitmap:NAME`) are busy while
//! the backend lives: until the export is gone and its last client with it.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use block::dirty::NodeBitmap;
use block::driver::{WriteFlags, ZeroFlags};
use block::{Backend, Node};
use indexmap::IndexMap;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Where the server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp { host: String, port: String },
}

/// The running NBD server.
pub struct NbdServer {
    pub server: Arc<nbd::Server>,
    accept: JoinHandle<()>,
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.server.stop();
    }
}

/// One export.
pub struct ExportRecord {
    pub id: String,
    pub node_name: String,
    /// Follows the node the export serves (an overlay or a filter can take its place).
    pub user: Option<block::UserHandle>,
    /// The name NBD clients ask for (its edge on the node lives in the NBD export's
    /// backend, which goes when the export and its last connection do).
    pub name: String,
}

/// The daemon's exports, newest last.
#[derive(Default)]
pub struct Exports {
    pub nbd: Option<NbdServer>,
    pub list: IndexMap<String, ExportRecord>,
}

fn bind_error(what: &str, err: &io::Error) -> String {
    // The system error as C's strerror words it, as QEMU prints it.
    let text = match err.raw_os_error() {
        Some(n) => block::Error::Io(io::Error::from_raw_os_error(n)).to_string(),
        None => err.to_string(),
    };
    format!("Failed to bind socket to {what}: {text}")
}

/// Starts listening and accepting; `max_connections` 0 is unlimited.
pub async fn start(
    listen: &Listen,
    max_connections: u32,
    tls: Option<nbd::Tls>,
) -> Result<NbdServer, String> {
    let server = nbd::Server::with_tls(max_connections != 1, tls);
    let limit = Arc::new(Semaphore::new(if max_connections == 0 {
        Semaphore::MAX_PERMITS
    } else {
        max_connections as usize
    }));
    let listener = match listen {
        Listen::Unix(path) => {
            // As QEMU does: a stale socket file is replaced.
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path)
                .map_err(|e| bind_error(&path.display().to_string(), &e))?;
            Listener::Unix(l)
        }
        Listen::Tcp { host, port } => {
            let addr = format!("{host}:{port}");
            let l = TcpListener::bind(&addr)
                .await
                .map_err(|e| bind_error(&addr, &e))?;
            Listener::Tcp(l)
        }
    };
    let accept = tokio::spawn(accept_loop(listener, server.clone(), limit));
    Ok(NbdServer { server, accept })
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Accepts clients while fewer than the limit are connected (at the limit they wait in
/// the backlog, as with QEMU) and serves each in its own task.
async fn accept_loop(listener: Listener, srv: Arc<nbd::Server>, limit: Arc<Semaphore>) {
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let srv = srv.clone();
        match &listener {
            Listener::Unix(l) => {
                if let Ok((stream, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let _ = srv.serve(stream).await;
                        drop(permit);
                    });
                }
            }
            Listener::Tcp(l) => {
                if let Ok((stream, _)) = l.accept().await {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let _ = srv.serve(stream).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

fn to_io(err: block::Error) -> io::Error {
    match err {
        block::Error::Io(e) => e,
        other => io::Error::from_raw_os_error(other.errno().unwrap_or(libc::EIO)),
    }
}

/// An export's view of its node.
pub struct NodeBackend {
    pub user: Backend,
    /// The exported bitmaps, in the export's order; each was marked busy for the export.
    pub bitmaps: Vec<Arc<NodeBitmap>>,
}

impl Drop for NodeBackend {
    fn drop(&mut self) {
        for bitmap in &self.bitmaps {
            bitmap.lock().busy = false;
        }
    }
}

#[async_trait]
impl nbd::Backend for NodeBackend {
    fn size(&self) -> u64 {
        self.user.size()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.user.read(offset, buf).await.map_err(to_io)
    }

    async fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.user
            .write(offset, buf, WriteFlags { fua })
            .await
            .map_err(to_io)
    }

    async fn flush(&self) -> io::Result<()> {
        self.user.flush().await.map_err(to_io)
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.user.discard(offset, len).await.map_err(to_io)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast: bool,
    ) -> io::Result<()> {
        let flags = ZeroFlags {
            may_unmap,
            no_fallback: fast,
            fua: false,
        };
        self.user
            .write_zeroes(offset, len, flags)
            .await
            .map_err(to_io)
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        // As QEMU answers it: the whole backing chain, so data from a backing file is data.
        let mut node: Arc<Node> = self.user.node();
        let mut len = len;
        loop {
            let ext = node.block_status(offset, len).await.map_err(to_io)?;
            len = ext.len;
            let below = node.backing();
            match below {
                Some(b) if !ext.allocated && offset < b.size() => {
                    len = len.min(b.size() - offset);
                    node = b;
                }
                // Unallocated past a shorter backing file, or with none: zeros.
                Some(_) | None if !ext.allocated => {
                    return Ok((len, nbd::proto::STATE_HOLE | nbd::proto::STATE_ZERO));
                }
                _ => {
                    let mut flags = 0;
                    if !ext.data {
                        flags |= nbd::proto::STATE_HOLE;
                    }
                    if ext.zero {
                        flags |= nbd::proto::STATE_ZERO;
                    }
                    return Ok((len, flags));
                }
            }
        }
    }

    async fn dirty(&self, index: usize, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        let bitmap = self
            .bitmaps
            .get(index)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let state = bitmap.lock();
        let bits = &state.bits;
        let end = offset + len;
        // Past the bitmap's end (a bitmap of a shorter node) everything is clean.
        if bits.get(offset) {
            let run_end = bits.next_clean(offset).unwrap_or(bits.size()).min(end);
            Ok((run_end - offset, nbd::proto::STATE_DIRTY))
        } else {
            let run_end = bits.next_dirty(offset).unwrap_or(end).min(end);
            Ok((run_end - offset, 0))
        }
    }

    async fn depth(&self, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        let mut node: Arc<Node> = self.user.node();
        let mut depth = 1;
        let mut len = len;
        loop {
            let ext = node.block_status(offset, len).await.map_err(to_io)?;
            len = ext.len;
            if ext.allocated {
                return Ok((len, depth));
            }
            match node.backing() {
                Some(b) if offset < b.size() => {
                    len = len.min(b.size() - offset);
                    node = b.clone();
                    depth += 1;
                }
                // Past a shorter backing file: QEMU counts that file's layer.
                Some(_) => return Ok((len, depth + 1)),
                None => return Ok((len, 0)),
            }
        }
    }
}
