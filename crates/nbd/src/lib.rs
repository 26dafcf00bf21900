//! The NBD protocol, server side: the fixed-newstyle handshake and the transmission phase as
//! QEMU 10.0's server speaks them (`doc/proto.md` of the NBD project; the project's notes are
//! in `shared/reference/nbd-protocol.md`).
//!
//! This crate knows nothing of QMP or the block graph. A [`Server`] holds named [`Export`]s,
//! each served through a [`Backend`] the daemon implements over a block node, and serves any
//! byte stream (a unix or TCP socket) with [`Server::serve`].
//!
//! Each connection reads requests while earlier ones run: up to [`MAX_IN_FLIGHT`] run at
//! once, each in its own task, and their replies go out as they complete (whole replies,
//! never interleaved). Every value from the client is checked: a bad request gets its error
//! number, a broken stream (bad magic, oversized write) closes the connection, and nothing a
//! client sends can make the server allocate more than one 32 MiB request buffer per request
//! in flight.

mod handshake;
pub mod proto;
mod transmission;

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use indexmap::IndexMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Requests one connection runs at once (QEMU's limit); it stops reading beyond that.
pub const MAX_IN_FLIGHT: usize = 16;

/// What an export serves: the daemon implements it over a block node.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Size in bytes (the export shows it rounded down to 512).
    fn size(&self) -> u64;
    /// The minimum block size to advertise to clients that ask (a power of two).
    fn min_block(&self) -> u32 {
        1
    }
    /// Reads `buf.len()` bytes at `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset`; `fua`: durable before returning.
    async fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    async fn flush(&self) -> io::Result<()>;
    /// Discards `len` bytes at `offset` (advisory).
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes `len` bytes at `offset`: `may_unmap` allows holes, `fast` fails with ENOTSUP
    /// unless zeroing is cheap.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast: bool,
    ) -> io::Result<()>;
    /// Prefetches `len` bytes at `offset` (a hint).
    async fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// `base:allocation`: the length (at least 1, at most `len`) of the run at `offset` and
    /// its flags ([`proto::STATE_HOLE`], [`proto::STATE_ZERO`]).
    async fn allocation(&self, offset: u64, len: u64) -> io::Result<(u64, u32)>;
    /// `qemu:allocation-depth`: the length of the run at `offset` and the depth in the
    /// backing chain where it is allocated (0: nowhere, 1: the exported node, ...).
    async fn depth(&self, offset: u64, len: u64) -> io::Result<(u64, u32)>;
    /// `qemu:dirty-bitmap:NAME` for the export's bitmap `index` (in [`Export::bitmaps`]
    /// order): the length of the run at `offset` and [`proto::STATE_DIRTY`] or 0.
    async fn dirty(&self, index: usize, offset: u64, len: u64) -> io::Result<(u64, u32)>;
}

/// One export.
pub struct Export {
    /// The name clients ask for.
    pub name: String,
    /// Free text shown by `LIST` and `INFO`.
    pub description: Option<String>,
    /// Writes allowed.
    pub writable: bool,
    /// Offer the `qemu:allocation-depth` meta context.
    pub allocation_depth: bool,
    /// The exported dirty bitmaps' names: each is offered as the meta context
    /// `qemu:dirty-bitmap:NAME` and answered by [`Backend::dirty`].
    pub bitmaps: Vec<String>,
    /// What is served.
    pub backend: Arc<dyn Backend>,
}

/// Checks the peer once the TLS handshake is done (its certificate's name against an
/// authorization list, say); an `Err` drops the client with that message.
pub type PeerCheck = Arc<dyn Fn(&openssl::ssl::SslRef) -> Result<(), String> + Send + Sync>;

/// TLS for a server: every client must upgrade with STARTTLS before anything else.
pub struct Tls {
    pub acceptor: openssl::ssl::SslAcceptor,
    pub check: PeerCheck,
}

/// Why an export could not be added or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportError {
    /// An export of this name exists.
    NameInUse(String),
    /// No export of this name.
    NotFound(String),
    /// `safe` removal with clients connected.
    InUse(String),
}

struct Conn {
    export: Option<String>,
    cancel: CancellationToken,
}

/// The exports and the connections of one NBD server.
pub struct Server {
    exports: Mutex<IndexMap<String, Arc<Export>>>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    /// Advertise multi-conn (QEMU does unless `max-connections` is 1).
    multi_conn: bool,
    tls: Option<Tls>,
    stopped: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a single insert or removal.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// A server without exports; `multi_conn` says whether exports advertise multi-conn.
    pub fn new(multi_conn: bool) -> Arc<Self> {
        Self::with_tls(multi_conn, None)
    }

    /// A server that requires TLS when `tls` is given (QEMU's behaviour with `tls-creds`).
    pub fn with_tls(multi_conn: bool, tls: Option<Tls>) -> Arc<Self> {
        Arc::new(Self {
            exports: Mutex::new(IndexMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            multi_conn,
            tls,
            stopped: CancellationToken::new(),
        })
    }

    /// Adds an export.
    pub fn add_export(&self, export: Export) -> Result<(), ExportError> {
        let mut exports = lock(&self.exports);
        if exports.contains_key(&export.name) {
            return Err(ExportError::NameInUse(export.name));
        }
        exports.insert(export.name.clone(), Arc::new(export));
        Ok(())
    }

    /// Whether a client is connected to export `name`.
    pub fn in_use(&self, name: &str) -> bool {
        lock(&self.conns)
            .values()
            .any(|c| c.export.as_deref() == Some(name))
    }

    /// Removes export `name`: `hard` drops its clients, otherwise it is refused while any
    /// is connected.
    pub fn remove_export(&self, name: &str, hard: bool) -> Result<(), ExportError> {
        if !lock(&self.exports).contains_key(name) {
            return Err(ExportError::NotFound(name.to_string()));
        }
        if !hard && self.in_use(name) {
            return Err(ExportError::InUse(name.to_string()));
        }
        lock(&self.exports).shift_remove(name);
        for conn in lock(&self.conns).values() {
            if conn.export.as_deref() == Some(name) {
                conn.cancel.cancel();
            }
        }
        Ok(())
    }

    /// The export names, oldest first.
    pub fn export_names(&self) -> Vec<String> {
        lock(&self.exports).keys().cloned().collect()
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Closes every connection; later [`Server::serve`] calls return at once.
    pub fn stop(&self) {
        self.stopped.cancel();
    }

    fn export(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.exports).get(name).cloned()
    }

    fn exports(&self) -> Vec<Arc<Export>> {
        lock(&self.exports).values().cloned().collect()
    }

    /// Serves one client until it disconnects, breaks the protocol, or the server (or its
    /// export) goes away.
    pub async fn serve<S>(self: Arc<Self>, stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let cancel = self.stopped.child_token();
        lock(&self.conns).insert(
            id,
            Conn {
                export: None,
                cancel: cancel.clone(),
            },
        );
        let result = tokio::select! {
            r = self.clone().serve_inner(stream, id) => r,
            () = cancel.cancelled() => Ok(()),
        };
        lock(&self.conns).remove(&id);
        result
    }

    async fn serve_inner<S>(self: Arc<Self>, mut stream: S, id: u64) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some(flags) = handshake::greet(&mut stream).await? else {
            return Ok(());
        };
        let Some(tls) = &self.tls else {
            return self
                .options_then_transmission(stream, id, flags, false)
                .await;
        };
        if !handshake::until_starttls(&mut stream, flags).await? {
            return Ok(());
        }
        let ssl = openssl::ssl::Ssl::new(tls.acceptor.context()).map_err(io::Error::other)?;
        let mut secure = tokio_openssl::SslStream::new(ssl, stream).map_err(io::Error::other)?;
        Pin::new(&mut secure)
            .accept()
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
        (tls.check)(secure.ssl())
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
        self.options_then_transmission(secure, id, flags, true)
            .await
    }

    async fn options_then_transmission<S>(
        self: Arc<Self>,
        mut stream: S,
        id: u64,
        flags: handshake::ClientFlags,
        tls: bool,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some(session) = handshake::negotiate(&self, &mut stream, flags, tls).await? else {
            return Ok(());
        };
        if let Some(conn) = lock(&self.conns).get_mut(&id) {
            conn.export = Some(session.export.name.clone());
        }
        // The export may have been removed while the client negotiated.
        if self.export(&session.export.name).is_none() {
            return Ok(());
        }
        let (rd, wr) = tokio::io::split(stream);
        transmission::run(session, rd, wr).await
    }
}
