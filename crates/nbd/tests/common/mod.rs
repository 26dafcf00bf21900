//! What the NBD tests share: an in-memory export that keeps track of which 64 KiB blocks
//! hold data and which were changed (its one dirty bitmap, `writes`), a server with it on a
//! unix socket, and the raw protocol steps of a hand-written client.
#![allow(dead_code)] // each test file uses part of it

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nbd::proto::*;
use nbd::{Backend, Export, Server};

const BLOCK: u64 = 64 << 10;

/// Memory with a data bit per 64 KiB block.
pub struct Mem {
    data: Mutex<(Vec<u8>, Vec<bool>)>,
    /// A dirty bit per 64 KiB block: set by every change.
    dirty: Mutex<Vec<bool>>,
}

impl Mem {
    pub fn new(size: u64) -> Self {
        Self {
            data: Mutex::new((
                vec![0; size as usize],
                vec![false; size.div_ceil(BLOCK) as usize],
            )),
            dirty: Mutex::new(vec![false; size.div_ceil(BLOCK) as usize]),
        }
    }

    fn mark(&self, offset: u64, len: u64) {
        let mut d = self.dirty.lock().unwrap();
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            d[b as usize] = true;
        }
    }
}

#[async_trait]
impl Backend for Mem {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().0.len() as u64
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    async fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        d.0[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        for b in offset / BLOCK..(offset + buf.len() as u64).div_ceil(BLOCK) {
            d.1[b as usize] = true;
        }
        self.mark(offset, buf.len() as u64);
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true, false).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        _fast: bool,
    ) -> io::Result<()> {
        self.mark(offset, len);
        let mut d = self.data.lock().unwrap();
        d.0[offset as usize..(offset + len) as usize].fill(0);
        if may_unmap {
            for b in offset.div_ceil(BLOCK)..(offset + len) / BLOCK {
                d.1[b as usize] = false;
            }
        }
        Ok(())
    }
    async fn allocation(&self, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        let d = self.data.lock().unwrap();
        let first = d.1[(offset / BLOCK) as usize];
        let mut end = (offset / BLOCK + 1) * BLOCK;
        while end < offset + len && d.1[(end / BLOCK) as usize] == first {
            end += BLOCK;
        }
        let flags = if first { 0 } else { STATE_HOLE | STATE_ZERO };
        Ok(((end - offset).min(len), flags))
    }
    async fn depth(&self, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        let (n, flags) = self.allocation(offset, len).await?;
        Ok((n, u32::from(flags == 0)))
    }
    async fn dirty(&self, _index: usize, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        let d = self.dirty.lock().unwrap();
        let first = d[(offset / BLOCK) as usize];
        let mut end = (offset / BLOCK + 1) * BLOCK;
        while end < offset + len && d[(end / BLOCK) as usize] == first {
            end += BLOCK;
        }
        Ok(((end - offset).min(len), u32::from(first) * STATE_DIRTY))
    }
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub server: Arc<Server>,
    pub rt: tokio::runtime::Runtime,
}

impl Fixture {
    /// A server with export `disk` (16 MiB, writable, allocation depth, bitmap `writes`) on
    /// a unix socket.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = Server::new(true);
        server
            .add_export(Export {
                name: "disk".into(),
                description: Some("a test disk".into()),
                writable: true,
                allocation_depth: true,
                bitmaps: vec!["writes".into()],
                backend: Arc::new(Mem::new(16 << 20)),
            })
            .unwrap();
        let listener = {
            let _guard = rt.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        let srv = server.clone();
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(srv.clone().serve(stream));
            }
        });
        Self {
            _dir: dir,
            socket,
            server,
            rt,
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }
}

pub fn connect(f: &Fixture) -> UnixStream {
    let s = UnixStream::connect(&f.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads the greeting and sends the client flags.
pub fn hello(s: &mut UnixStream, flags: u32) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&greeting[16..], &3u16.to_be_bytes());
    s.write_all(&flags.to_be_bytes()).unwrap();
}

pub fn option(s: &mut UnixStream, opt: u32, payload: &[u8]) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).unwrap();
}

/// Reads one option reply: (option, type, payload).
pub fn option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &REPLY_MAGIC.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    (opt, ty, data)
}

pub fn request(s: &mut UnixStream, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    s.write_all(&m).unwrap();
}
