//! Arbitrary bytes as everything an NBD client sends, handshake and requests, to a server
//! with one writable 1 MiB export in memory. The server's replies are read and dropped.
//!
//! Besides "no panic", libFuzzer's timeout and memory limit catch hangs and huge
//! allocations driven by option lengths, request lengths or counts. To reach the
//! transmission phase often, an input whose first byte is odd gets a valid greeting
//! reply and `EXPORT_NAME "disk"` put in front of it.

#![no_main]

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use libfuzzer_sys::fuzz_target;
use nbd::{Backend, Export, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 1 << 20;

struct Mem(Mutex<Vec<u8>>);

#[async_trait]
impl Backend for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    async fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _u: bool, _f: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    async fn allocation(&self, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        // Alternating 4 KiB data and holes.
        let end = ((offset / 4096) + 1) * 4096;
        Ok(((end - offset).min(len), if offset / 4096 % 2 == 0 { 0 } else { 3 }))
    }
    async fn depth(&self, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        Ok((len.min(65536 - offset % 65536), 1))
    }
    async fn dirty(&self, _index: usize, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        // Every other 64 KiB chunk is dirty.
        let flags = if (offset / 65536) % 2 == 0 { 1 } else { 0 };
        Ok((len.min(65536 - offset % 65536), flags))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Vec::new();
    if data.first().is_some_and(|b| b & 1 == 1) {
        input.extend_from_slice(&3u32.to_be_bytes());
        input.extend_from_slice(&nbd::proto::IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&nbd::proto::OPT_EXPORT_NAME.to_be_bytes());
        input.extend_from_slice(&4u32.to_be_bytes());
        input.extend_from_slice(b"disk");
        input.extend_from_slice(&data[1..]);
    } else {
        input.extend_from_slice(data);
    }
    runtime().block_on(async move {
        let server = Server::new(true);
        let backend = Arc::new(Mem(Mutex::new(vec![0; SIZE as usize])));
        server
            .add_export(Export {
                name: "disk".into(),
                description: Some("d".into()),
                writable: true,
                allocation_depth: true,
                bitmaps: vec!["b".into()],
                backend,
            })
            .unwrap();
        let (client, srv_side) = tokio::io::duplex(1 << 16);
        let serving = tokio::spawn(server.clone().serve(srv_side));
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
        drop(wr);
        let _ = serving.await;
        drain.abort();
    });
});
