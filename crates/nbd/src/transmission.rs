//! The transmission phase: requests read in order, run concurrently (at most
//! [`crate::MAX_IN_FLIGHT`]), replies written whole as they complete.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use crate::handshake::{Session, CTX_BASE};
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

pub(crate) async fn run<S>(s: Session, mut rd: ReadHalf<S>, wr: WriteHalf<S>) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let s = Arc::new(s);
    let wr = Arc::new(Mutex::new(wr));
    let slots = Arc::new(Semaphore::new(crate::MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let result = loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("request slots closed"))?;
        let mut header = [0u8; 28];
        match rd.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let be32 =
            |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let be16 = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
        let be64 = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i..i + 8]);
            u64::from_be_bytes(b)
        };
        if be32(0) != REQUEST_MAGIC {
            break Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request magic",
            ));
        }
        let req = Request {
            flags: be16(4),
            cmd: be16(6),
            cookie: be64(8),
            offset: be64(16),
            len: u64::from(be32(24)),
        };
        let mut payload = Vec::new();
        if req.cmd == CMD_WRITE {
            if req.len > MAX_BUFFER {
                // The payload cannot be skipped safely: answer and drop the client.
                let f = fail(EINVAL, format!("len ({}) is larger than max len", req.len));
                let _ = send(&s, &wr, req, Err(f)).await;
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "write too large",
                ));
            }
            payload = vec![0u8; req.len as usize];
            if let Err(e) = rd.read_exact(&mut payload).await {
                break Err(e);
            }
        }
        if req.cmd == CMD_DISC {
            break Ok(());
        }
        let (s2, wr2) = (s.clone(), wr.clone());
        tasks.spawn(async move {
            let result = execute(&s2, req, payload).await;
            let sent = send(&s2, &wr2, req, result).await;
            drop(permit);
            sent
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

fn allowed_flags(cmd: u16, structured: bool) -> Option<u16> {
    let df = if structured { CMD_FLAG_DF } else { 0 };
    Some(match cmd {
        CMD_READ => CMD_FLAG_FUA | df,
        CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return None,
    })
}

async fn execute(s: &Session, req: Request, payload: Vec<u8>) -> Result<Success, Failure> {
    let Some(allowed) = allowed_flags(req.cmd, s.structured) else {
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
            b.write(req.offset, &payload, fua)
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
            let (len, flags) = if ctx == CTX_BASE {
                b.allocation(pos, want).await
            } else {
                b.depth(pos, want).await
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

fn chunk(out: &mut Vec<u8>, flags: u16, ty: u16, cookie: u64, payload: &[u8]) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

fn simple(out: &mut Vec<u8>, errno: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// A structured READ reply: holes where the data reads as zeros (unless DF), data elsewhere.
async fn read_chunks(s: &Session, req: Request, data: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    if data.is_empty() {
        chunk(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, &[]);
        return out;
    }
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    if req.flags & CMD_FLAG_DF == 0 {
        let end = req.offset + req.len;
        let mut pos = req.offset;
        while pos < end {
            let Ok((len, flags)) = s.export.backend.allocation(pos, end - pos).await else {
                pieces.clear();
                break;
            };
            let len = len.clamp(1, end - pos);
            let hole = flags & STATE_ZERO != 0;
            match pieces.last_mut() {
                Some(last) if last.2 == hole => last.1 += len,
                _ => pieces.push((pos, len, hole)),
            }
            pos += len;
        }
    }
    if pieces.is_empty() {
        pieces.push((req.offset, req.len, false));
    }
    let n = pieces.len();
    for (i, (off, len, hole)) in pieces.into_iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        let mut payload = off.to_be_bytes().to_vec();
        if hole && len <= u64::from(u32::MAX) {
            payload.extend_from_slice(&(len as u32).to_be_bytes());
            chunk(
                &mut out,
                flags,
                REPLY_TYPE_OFFSET_HOLE,
                req.cookie,
                &payload,
            );
        } else {
            let at = (off - req.offset) as usize;
            payload.extend_from_slice(&data[at..at + len as usize]);
            chunk(
                &mut out,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                &payload,
            );
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
    let mut out = Vec::new();
    match result {
        Err(f) if s.structured => {
            let msg = f.msg.as_bytes();
            let msg = &msg[..msg.len().min(4096)];
            let mut payload = f.errno.to_be_bytes().to_vec();
            payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            payload.extend_from_slice(msg);
            chunk(
                &mut out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                &payload,
            );
        }
        Err(f) => simple(&mut out, f.errno, req.cookie),
        Ok(Success::Done) => simple(&mut out, 0, req.cookie),
        Ok(Success::Data(data)) if s.structured => out = read_chunks(s, req, data).await,
        Ok(Success::Data(data)) => {
            simple(&mut out, 0, req.cookie);
            out.extend_from_slice(&data);
        }
        Ok(Success::Status(chunks)) => {
            let n = chunks.len();
            for (i, (ctx, extents)) in chunks.into_iter().enumerate() {
                let mut payload = ctx.to_be_bytes().to_vec();
                for (len, flags) in extents {
                    payload.extend_from_slice(&len.to_be_bytes());
                    payload.extend_from_slice(&flags.to_be_bytes());
                }
                let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                chunk(
                    &mut out,
                    flags,
                    REPLY_TYPE_BLOCK_STATUS,
                    req.cookie,
                    &payload,
                );
            }
        }
    }
    wr.lock().await.write_all(&out).await
}
