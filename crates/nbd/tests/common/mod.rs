//! What the NBD tests share: an in-memory export that keeps track of which 64 KiB blocks
//! hold data, and a server with it on a unix socket.
#![allow(dead_code)] // each test file uses part of it

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nbd::proto::{STATE_HOLE, STATE_ZERO};
use nbd::{Backend, Export, Server};

const BLOCK: u64 = 64 << 10;

/// Memory with a data bit per 64 KiB block.
pub struct Mem {
    data: Mutex<(Vec<u8>, Vec<bool>)>,
}

impl Mem {
    pub fn new(size: u64) -> Self {
        Self {
            data: Mutex::new((
                vec![0; size as usize],
                vec![false; size.div_ceil(BLOCK) as usize],
            )),
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
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub server: Arc<Server>,
    pub rt: tokio::runtime::Runtime,
}

impl Fixture {
    /// A server with export `disk` (16 MiB, writable, allocation depth) on a unix socket.
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
