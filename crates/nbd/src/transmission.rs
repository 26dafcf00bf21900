//! The transmission phase: requests read in order, run concurrently (at most
//! [`crate::MAX_IN_FLIGHT`]), replies written whole as they complete.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf,
};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use crate::handshake::{Session, CTX_BASE, CTX_BITMAP, CTX_DEPTH};
use crate::proto::*;

/// Most extents in one block-status chunk (QEMU's limit).
const MAX_EXTENTS: usize = 131_072;

/// One decoded request.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
}

/// A failed request: the wire error and a message for structured replies.
struct Failure {
    errno: u32,
    msg: String,
}

fn fail(errno: u32, msg: impl Into<String>) -> Failure {
    Failure {
        errno,
        msg: msg.into(),
    }
}

fn io_fail(err: &io::Error) -> Failure {
    fail(errno_to_nbd(err.raw_os_error()), err.to_string())
}

/// What a successful request sends back.
enum Success {
    /// No payload.
    Done,
    /// READ data (the whole range).
    Data(Vec<u8>),
    /// BLOCK_STATUS chunks: context id and (length, flags) extents.
    Status(Vec<(u32, Vec<(u32, u32)>)>),
}

pub(crate) async fn run<S>(s: Session, rd: ReadHalf<S>, wr: WriteHalf<S>) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Requests are small: read them from a buffer, not one system call per field.
    let mut rd = tokio::io::BufReader::with_capacity(256 << 10, rd);
    let s = Arc::new(s);
    // A reply's header and data leave in one system call when they fit the buffer.
    let wr = Arc::new(Mutex::new(tokio::io::BufWriter::with_capacity(
        64 << 10,
        wr,
    )));
    let flush_pending = Arc::new(AtomicBool::new(false));
    let slots = Arc::new(Semaphore::new(crate::MAX_IN_FLIGHT));
    let buffers = Arc::new(Buffers::default());
    let mut tasks = JoinSet::new();
    let result = loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("request slots closed"))?;
        let hlen = if s.extended { 32 } else { 28 };
        let mut header = [0u8; 32];
        // The magic first: a request of the wrong kind is refused before its rest arrives.
        match rd.read_exact(&mut header[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let expected = if s.extended {
            EXT_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if header[..4] != expected.to_be_bytes() {
            break Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request magic",
            ));
        }
        if let Err(e) = rd.read_exact(&mut header[4..hlen]).await {
            break Err(e);
        }
        let be32 =
            |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let be16 = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
        let be64 = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let req = Request {
            flags: be16(4),
            cmd: be16(6),
            cookie: be64(8),
            offset: be64(16),
            len: if s.extended {
                be64(24)
            } else {
                u64::from(be32(24))
            },
        };
        // A payload follows a WRITE (its length is the payload's, with or without
        // PAYLOAD_LEN, as QEMU reads it) and, with extended headers, any request that sets
        // PAYLOAD_LEN.
        let has_payload =
            req.cmd == CMD_WRITE || (s.extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        let mut payload = Vec::new();
        if has_payload {
            if req.len > MAX_BUFFER {
                // The payload cannot be skipped safely: answer and drop the client.
                let f = fail(EINVAL, format!("len ({}) is larger than max len", req.len));
                if send(&s, &wr, req, Err(f)).await.is_ok() {
                    let _ = wr.lock().await.flush().await;
                }
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "payload too large",
                ));
            }
            payload = buffers.take(req.len as usize);
            if let Err(e) = read_payload(&mut rd, &mut payload).await {
                break Err(e);
            }
        }
        if req.cmd == CMD_DISC {
            break Ok(());
        }
        let (s2, wr2, bufs2) = (s.clone(), wr.clone(), buffers.clone());
        let pending = flush_pending.clone();
        tasks.spawn(async move {
            let result = execute(&s2, req, &payload).await;
            bufs2.give(payload);
            send(&s2, &wr2, req, result).await?;
            drop(permit);
            flush_soon(&wr2, &pending).await
        });
        while let Some(done) = tasks.try_join_next() {
            if let Ok(Err(e)) = done {
                return Err(e);
            }
        }
    };
    // Requests already read finish and are answered before the connection closes.
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            return Err(e);
        }
    }
    let _ = wr.lock().await.shutdown().await;
    result
}

/// Reads a WRITE's payload: what the request reader already buffered, then the rest straight
/// from the socket into `buf` (one copy less than going through the reader's buffer).
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut tokio::io::BufReader<R>,
    buf: &mut [u8],
) -> io::Result<()> {
    let buffered = rd.buffer();
    let n = buffered.len().min(buf.len());
    buf[..n].copy_from_slice(&buffered[..n]);
    rd.consume(n);
    if n < buf.len() {
        rd.get_mut().read_exact(&mut buf[n..]).await?;
    }
    Ok(())
}

/// Write payload buffers kept for reuse by one connection: a fresh large allocation costs
/// page faults and zeroing on every request.
#[derive(Default)]
struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    /// Most bytes kept in one buffer (larger ones are freed after use).
    const KEEP_LEN: usize = 4 << 20;

    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = reused.unwrap_or_default();
        // Contents are overwritten by the payload; only growth zeroes new bytes.
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        if buf.capacity() <= Self::KEEP_LEN {
            let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() < crate::MAX_IN_FLIGHT {
                kept.push(buf);
            }
        }
    }
}

fn allowed_flags(cmd: u16, structured: bool, extended: bool) -> Option<u16> {
    let df = if structured { CMD_FLAG_DF } else { 0 };
    Some(match cmd {
        CMD_READ => CMD_FLAG_FUA | df,
        CMD_WRITE if extended => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return None,
    })
}

async fn execute(s: &Session, req: Request, payload: &[u8]) -> Result<Success, Failure> {
    if s.extended && req.cmd != CMD_WRITE && req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        return Err(fail(EINVAL, "unexpected payload"));
    }
    let Some(allowed) = allowed_flags(req.cmd, s.structured, s.extended) else {
        return Err(fail(
            EINVAL,
            format!("invalid request type ({}) received", req.cmd),
        ));
    };
    if matches!(req.cmd, CMD_READ | CMD_WRITE | CMD_CACHE) && req.len > MAX_BUFFER {
        return Err(fail(
            EINVAL,
            format!("len ({}) is larger than max len", req.len),
        ));
    }
    let writes = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && !s.export.writable {
        return Err(fail(EPERM, "Export is read-only"));
    }
    if req.cmd != CMD_FLUSH
        && req
            .offset
            .checked_add(req.len)
            .is_none_or(|end| end > s.size)
    {
        let errno = if matches!(req.cmd, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err(fail(errno, "operation past EOF"));
    }
    if req.flags & !allowed != 0 {
        return Err(fail(EINVAL, format!("unsupported flags {:#x}", req.flags)));
    }
    let b = &s.export.backend;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.cmd {
        CMD_READ => {
            if fua {
                b.flush().await.map_err(|e| io_fail(&e))?;
            }
            let mut buf = vec![0u8; req.len as usize];
            b.read(req.offset, &mut buf)
                .await
                .map_err(|e| io_fail(&e))?;
            Ok(Success::Data(buf))
        }
        CMD_WRITE => {
            b.write(req.offset, payload, fua)
                .await
                .map_err(|e| io_fail(&e))?;
            Ok(Success::Done)
        }
        CMD_FLUSH => {
            b.flush().await.map_err(|e| io_fail(&e))?;
            Ok(Success::Done)
        }
        CMD_TRIM => {
            b.trim(req.offset, req.len).await.map_err(|e| io_fail(&e))?;
            if fua {
                b.flush().await.map_err(|e| io_fail(&e))?;
            }
            Ok(Success::Done)
        }
        CMD_CACHE => {
            b.cache(req.offset, req.len)
                .await
                .map_err(|e| io_fail(&e))?;
            Ok(Success::Done)
        }
        CMD_WRITE_ZEROES => {
            let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            b.write_zeroes(req.offset, req.len, may_unmap, fast)
                .await
                .map_err(|e| io_fail(&e))?;
            if fua {
                b.flush().await.map_err(|e| io_fail(&e))?;
            }
            Ok(Success::Done)
        }
        _ => block_status(s, req).await,
    }
}

async fn block_status(s: &Session, req: Request) -> Result<Success, Failure> {
    if !s.structured || s.contexts.is_empty() {
        return Err(fail(EINVAL, "CMD_BLOCK_STATUS not negotiated"));
    }
    if req.len == 0 {
        return Err(fail(EINVAL, "need non-zero length"));
    }
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let end = req.offset + req.len;
    let mut chunks = Vec::new();
    for &ctx in &s.contexts {
        let mut extents: Vec<(u32, u32)> = Vec::new();
        let mut pos = req.offset;
        while pos < end {
            let want = (end - pos).min(u64::from(u32::MAX) & !511);
            let b = &s.export.backend;
            let (len, flags) = match ctx {
                CTX_BASE => b.allocation(pos, want).await,
                CTX_DEPTH => b.depth(pos, want).await,
                _ => b.dirty((ctx - CTX_BITMAP) as usize, pos, want).await,
            }
            .map_err(|e| io_fail(&e))?;
            let len = len.clamp(1, want);
            match extents.last_mut() {
                Some(last) if last.1 == flags && u64::from(last.0) + len <= u64::from(u32::MAX) => {
                    last.0 += len as u32;
                }
                _ => {
                    if extents.len() == MAX_EXTENTS || (one && !extents.is_empty()) {
                        break;
                    }
                    extents.push((len as u32, flags));
                }
            }
            pos += len;
        }
        chunks.push((ctx, extents));
    }
    Ok(Success::Status(chunks))
}

/// How reply chunks are framed: structured, or extended (which echoes the request's offset
/// and has 64-bit lengths).
#[derive(Clone, Copy)]
struct Framing {
    extended: bool,
    offset: u64,
}

fn chunk_header(out: &mut Vec<u8>, fr: Framing, flags: u16, ty: u16, cookie: u64, len: u64) {
    if fr.extended {
        out.extend_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    if fr.extended {
        out.extend_from_slice(&fr.offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

fn chunk(out: &mut Vec<u8>, fr: Framing, flags: u16, ty: u16, cookie: u64, payload: &[u8]) {
    chunk_header(out, fr, flags, ty, cookie, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn simple(out: &mut Vec<u8>, errno: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Zero runs at least this long (and aligned to it) go out as hole chunks.
const HOLE_MIN: usize = 4096;

/// Splits a READ's data into data and hole pieces: aligned all-zero runs of at least
/// [`HOLE_MIN`] bytes are holes (they read as zeros either way, and the client need not
/// receive them), without asking the backend for block status.
fn pieces(data: &[u8], df: bool) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    if df {
        return vec![(0, data.len(), false)];
    }
    for (i, block) in data.chunks(HOLE_MIN).enumerate() {
        let hole = block.len() == HOLE_MIN && block.iter().all(|&b| b == 0);
        let at = i * HOLE_MIN;
        match out.last_mut() {
            Some(last) if last.2 == hole => last.1 += block.len(),
            _ => out.push((at, block.len(), hole)),
        }
    }
    out
}

/// The chunks of a structured READ reply, as (header bytes, data range) pairs written in
/// order: the data is not copied into the reply.
/// One chunk of a READ reply: its header, and the range of the data that follows it.
type Piece = (Vec<u8>, Option<(usize, usize)>);

fn read_chunks(req: Request, fr: Framing, data: &[u8]) -> Vec<Piece> {
    if data.is_empty() {
        let mut h = Vec::new();
        chunk(
            &mut h,
            fr,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            req.cookie,
            &[],
        );
        return vec![(h, None)];
    }
    let parts = pieces(data, req.flags & CMD_FLAG_DF != 0);
    let n = parts.len();
    let mut out = Vec::with_capacity(n);
    for (i, (at, len, hole)) in parts.into_iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        let off = req.offset + at as u64;
        let mut h = Vec::with_capacity(40);
        if hole {
            let mut payload = off.to_be_bytes().to_vec();
            payload.extend_from_slice(&(len as u32).to_be_bytes());
            chunk(
                &mut h,
                fr,
                flags,
                REPLY_TYPE_OFFSET_HOLE,
                req.cookie,
                &payload,
            );
            out.push((h, None));
        } else {
            // The header announces the offset and the data that follows.
            let ty = REPLY_TYPE_OFFSET_DATA;
            chunk_header(&mut h, fr, flags, ty, req.cookie, len as u64 + 8);
            h.extend_from_slice(&off.to_be_bytes());
            out.push((h, Some((at, at + len))));
        }
    }
    out
}

async fn send<W: AsyncWrite + Unpin>(
    s: &Session,
    wr: &Mutex<W>,
    req: Request,
    result: Result<Success, Failure>,
) -> io::Result<()> {
    let fr = Framing {
        extended: s.extended,
        offset: req.offset,
    };
    let mut out = Vec::new();
    match result {
        Err(f) if s.structured => {
            let msg = f.msg.as_bytes();
            let msg = &msg[..msg.len().min(4096)];
            let mut payload = f.errno.to_be_bytes().to_vec();
            payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            payload.extend_from_slice(msg);
            let ty = REPLY_TYPE_ERROR;
            chunk(&mut out, fr, REPLY_FLAG_DONE, ty, req.cookie, &payload);
        }
        Err(f) => simple(&mut out, f.errno, req.cookie),
        // Extended headers never use simple replies.
        Ok(Success::Done) if s.extended => {
            chunk(
                &mut out,
                fr,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                &[],
            );
        }
        Ok(Success::Done) => simple(&mut out, 0, req.cookie),
        Ok(Success::Data(data)) if s.structured => {
            let chunks = read_chunks(req, fr, &data);
            let mut w = wr.lock().await;
            for (header, range) in chunks {
                w.write_all(&header).await?;
                if let Some((a, b)) = range {
                    w.write_all(&data[a..b]).await?;
                }
            }
            return Ok(());
        }
        Ok(Success::Data(data)) => {
            simple(&mut out, 0, req.cookie);
            let mut w = wr.lock().await;
            w.write_all(&out).await?;
            w.write_all(&data).await?;
            return Ok(());
        }
        Ok(Success::Status(chunks)) => {
            let n = chunks.len();
            for (i, (ctx, extents)) in chunks.into_iter().enumerate() {
                let mut payload = ctx.to_be_bytes().to_vec();
                if s.extended {
                    payload.extend_from_slice(&(extents.len() as u32).to_be_bytes());
                }
                for (len, flags) in extents {
                    if s.extended {
                        payload.extend_from_slice(&u64::from(len).to_be_bytes());
                        payload.extend_from_slice(&u64::from(flags).to_be_bytes());
                    } else {
                        payload.extend_from_slice(&len.to_be_bytes());
                        payload.extend_from_slice(&flags.to_be_bytes());
                    }
                }
                let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                let ty = if s.extended {
                    REPLY_TYPE_BLOCK_STATUS_EXT
                } else {
                    REPLY_TYPE_BLOCK_STATUS
                };
                chunk(&mut out, fr, flags, ty, req.cookie, &payload);
            }
        }
    }
    wr.lock().await.write_all(&out).await
}

/// Sends what replies are buffered, after letting the replies that are ready too join them:
/// one system call (and one wake-up of the client) for a batch of replies instead of one
/// each. Whoever sets `pending` flushes; replies written meanwhile go out with that flush.
async fn flush_soon<W: AsyncWrite + Unpin>(wr: &Mutex<W>, pending: &AtomicBool) -> io::Result<()> {
    if pending.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    tokio::task::yield_now().await;
    pending.store(false, Ordering::Release);
    wr.lock().await.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn payload_after_a_buffered_header_is_read_whole_and_in_order() {
        // Header, a 100 KiB payload, then the next request's first bytes: the reader's
        // buffer holds part of the payload when the payload read starts.
        let payload: Vec<u8> = (0..100 << 10).map(|i| (i % 251) as u8).collect();
        let mut stream = b"HEAD".to_vec();
        stream.extend_from_slice(&payload);
        stream.extend_from_slice(b"NEXT");
        let mut rd = tokio::io::BufReader::with_capacity(4096, &stream[..]);
        let mut head = [0u8; 4];
        rd.read_exact(&mut head).await.unwrap();
        assert!(!rd.buffer().is_empty());
        let buffers = Buffers::default();
        let mut buf = buffers.take(payload.len());
        read_payload(&mut rd, &mut buf).await.unwrap();
        assert_eq!(buf, payload);
        let mut next = [0u8; 4];
        rd.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"NEXT");
    }

    #[test]
    fn buffers_are_reused_and_sized_to_the_request() {
        let buffers = Buffers::default();
        let mut a = buffers.take(8192);
        a.fill(7);
        let ptr = a.as_ptr();
        buffers.give(a);
        let b = buffers.take(4096);
        assert_eq!(b.len(), 4096);
        assert_eq!(b.as_ptr(), ptr);
        buffers.give(b);
        // Huge buffers are not kept.
        buffers.give(vec![0; Buffers::KEEP_LEN + 1]);
        let c = buffers.take(1);
        assert_eq!(c.as_ptr(), ptr);
    }
}
