//! The fixed-newstyle handshake: greeting, client flags, then options until `GO` or
//! `EXPORT_NAME` starts transmission (or the client aborts or breaks the protocol).

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::*;
use crate::{Export, Server};

/// Meta context ids, fixed as QEMU numbers them.
pub(crate) const CTX_BASE: u32 = 0;
pub(crate) const CTX_DEPTH: u32 = 1;
/// The first exported bitmap's id; bitmap `i` of the export is `CTX_BITMAP + i`.
pub(crate) const CTX_BITMAP: u32 = 2;
/// The prefix of a bitmap's context name.
const BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// What transmission needs from the handshake.
pub(crate) struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    /// Extended headers: 32-byte requests, every reply an extended chunk.
    pub extended: bool,
    /// Selected meta contexts (ids), in id order.
    pub contexts: Vec<u32>,
    pub size: u64,
}

/// State between options.
#[derive(Default)]
struct Negotiation {
    structured: bool,
    extended: bool,
    /// Selected contexts and the export they were selected for.
    contexts: Vec<u32>,
    contexts_for: Option<String>,
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, ty: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&opt.to_be_bytes());
    msg.extend_from_slice(&ty.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg).await
}

async fn error<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, ty: u32, text: &str) -> io::Result<()> {
    reply(w, opt, ty, text.as_bytes()).await
}

/// The export's transmission flags for a client in the given mode.
fn export_flags(server: &Server, export: &Export, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if server.multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    if export.writable {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    } else {
        flags |= FLAG_READ_ONLY;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

fn export_size(export: &Export) -> u64 {
    export.backend.size() / 512 * 512
}

/// A cursor over an option's payload; every read is bounds-checked.
struct Payload<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Payload<'a> {
    fn u16(&mut self) -> Option<u16> {
        let b = self.data.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.data.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.data.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(b)
    }
    fn done(&self) -> bool {
        self.pos == self.data.len()
    }
}

/// The client's handshake flags.
#[derive(Clone, Copy)]
pub(crate) struct ClientFlags {
    fixed: bool,
    no_zeroes: bool,
}

/// Sends the greeting and reads the client flags. `Ok(None)`: the client went away.
pub(crate) async fn greet<S>(io: &mut S) -> io::Result<Option<ClientFlags>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&greeting).await?;
    let client_flags = match io.read_u32().await {
        Ok(f) => f,
        // A probe that connects and goes away.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown client flags {client_flags:#x}"),
        ));
    }
    Ok(Some(ClientFlags {
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
    }))
}

/// Reads one option: (option, payload).
async fn read_option<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<(u32, Vec<u8>)> {
    let magic = io.read_u64().await?;
    if magic != IHAVEOPT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad option magic",
        ));
    }
    let opt = io.read_u32().await?;
    let len = io.read_u32().await?;
    if len > MAX_OPTION_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("option length {len} too large"),
        ));
    }
    let mut data = vec![0u8; len as usize];
    io.read_exact(&mut data).await?;
    Ok((opt, data))
}

/// With TLS required: refuses every option but STARTTLS, as QEMU does. `Ok(true)` once
/// STARTTLS was acknowledged (the TLS handshake comes next), `Ok(false)` when the client
/// must be dropped or gave up.
pub(crate) async fn until_starttls<S>(io: &mut S, flags: ClientFlags) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !flags.fixed {
        return Ok(false);
    }
    loop {
        let (opt, data) = read_option(io).await?;
        match opt {
            OPT_STARTTLS if data.is_empty() => {
                reply(io, opt, REP_ACK, &[]).await?;
                return Ok(true);
            }
            OPT_STARTTLS => {
                error(io, opt, REP_ERR_INVALID, "STARTTLS must not have a payload").await?;
            }
            // It cannot carry an error.
            OPT_EXPORT_NAME => return Ok(false),
            _ => {
                let text = format!("Option 0x{opt:x} not permitted before TLS");
                error(io, opt, REP_ERR_TLS_REQD, &text).await?;
                if opt == OPT_ABORT {
                    return Ok(false);
                }
            }
        }
    }
}

/// Runs the option phase. `Ok(None)`: the client went away or aborted. `tls`: the
/// connection is already encrypted (a second STARTTLS is invalid).
pub(crate) async fn negotiate<S>(
    server: &Server,
    io: &mut S,
    flags: ClientFlags,
    tls: bool,
) -> io::Result<Option<Session>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (fixed, no_zeroes) = (flags.fixed, flags.no_zeroes);
    let mut neg = Negotiation::default();
    loop {
        let (opt, data) = read_option(io).await?;
        if !fixed && opt != OPT_EXPORT_NAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unfixed newstyle client sent an option other than EXPORT_NAME",
            ));
        }
        match opt {
            OPT_EXPORT_NAME => {
                if neg.extended {
                    // It cannot carry an error, and extended headers forbid it.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "EXPORT_NAME after extended headers",
                    ));
                }
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = server.export(&name) else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("export '{name}' not present"),
                    ));
                };
                let flags = export_flags(server, &export, neg.structured);
                let size = export_size(&export);
                let mut msg = Vec::with_capacity(134);
                msg.extend_from_slice(&size.to_be_bytes());
                msg.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    msg.extend_from_slice(&[0u8; 124]);
                }
                io.write_all(&msg).await?;
                let contexts = selected_for(&neg, &name);
                return Ok(Some(Session {
                    export,
                    structured: neg.structured,
                    extended: false,
                    contexts,
                    size,
                }));
            }
            OPT_ABORT => {
                reply(io, opt, REP_ACK, &[]).await?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    error(io, opt, REP_ERR_INVALID, "LIST must not have a payload").await?;
                    continue;
                }
                for export in server.exports() {
                    let mut body = Vec::new();
                    body.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    body.extend_from_slice(export.name.as_bytes());
                    if let Some(d) = &export.description {
                        body.extend_from_slice(d.as_bytes());
                    }
                    reply(io, opt, REP_SERVER, &body).await?;
                }
                reply(io, opt, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    error(io, opt, REP_ERR_INVALID, "STARTTLS must not have a payload").await?;
                } else if tls {
                    error(io, opt, REP_ERR_INVALID, "TLS already enabled").await?;
                } else {
                    error(io, opt, REP_ERR_POLICY, "TLS not configured").await?;
                }
            }
            OPT_INFO | OPT_GO => {
                if let Some(session) = info_or_go(server, &neg, io, opt, &data).await? {
                    return Ok(Some(session));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error(
                        io,
                        opt,
                        REP_ERR_INVALID,
                        "STRUCTURED_REPLY must not have a payload",
                    )
                    .await?;
                } else if neg.extended {
                    let text = "extended headers already negotiated";
                    error(io, opt, REP_ERR_EXT_HEADER_REQD, text).await?;
                } else if neg.structured {
                    error(
                        io,
                        opt,
                        REP_ERR_INVALID,
                        "structured reply already negotiated",
                    )
                    .await?;
                } else {
                    neg.structured = true;
                    reply(io, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    let text = "EXTENDED_HEADERS must not have a payload";
                    error(io, opt, REP_ERR_INVALID, text).await?;
                } else if neg.extended {
                    let text = "extended headers already negotiated";
                    error(io, opt, REP_ERR_INVALID, text).await?;
                } else {
                    neg.extended = true;
                    neg.structured = true;
                    reply(io, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(server, &mut neg, io, opt, &data).await?;
            }
            _ => {
                let text = format!("Unsupported option {opt} ({})", opt_name(opt));
                error(io, opt, REP_ERR_UNSUP, &text).await?;
            }
        }
    }
}

fn selected_for(neg: &Negotiation, name: &str) -> Vec<u32> {
    if neg.contexts_for.as_deref() == Some(name) {
        neg.contexts.clone()
    } else {
        Vec::new()
    }
}

/// `INFO` and `GO`; returns the session when `GO` succeeded.
async fn info_or_go<W: AsyncWrite + Unpin>(
    server: &Server,
    neg: &Negotiation,
    wr: &mut W,
    opt: u32,
    data: &[u8],
) -> io::Result<Option<Session>> {
    let mut p = Payload { data, pos: 0 };
    let parsed = (|| {
        let n = p.u32()? as usize;
        if n > MAX_STRING {
            return Some(Err("name too long"));
        }
        let name = p.bytes(n)?;
        let count = p.u16()?;
        let mut requests = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            requests.push(p.u16()?);
        }
        if !p.done() {
            return None;
        }
        Some(Ok((String::from_utf8_lossy(name).into_owned(), requests)))
    })();
    let (name, requests) = match parsed {
        Some(Ok(v)) => v,
        Some(Err(text)) => {
            error(wr, opt, REP_ERR_INVALID, text).await?;
            return Ok(None);
        }
        None => {
            error(wr, opt, REP_ERR_INVALID, "Inconsistent lengths in option").await?;
            return Ok(None);
        }
    };
    let Some(export) = server.export(&name) else {
        let text = format!("export '{name}' not present");
        error(wr, opt, REP_ERR_UNKNOWN, &text).await?;
        return Ok(None);
    };
    if requests.contains(&INFO_NAME) {
        let mut body = INFO_NAME.to_be_bytes().to_vec();
        body.extend_from_slice(export.name.as_bytes());
        reply(wr, opt, REP_INFO, &body).await?;
    }
    if let Some(d) = &export.description {
        let mut body = INFO_DESCRIPTION.to_be_bytes().to_vec();
        body.extend_from_slice(d.as_bytes());
        reply(wr, opt, REP_INFO, &body).await?;
    }
    let asked_sizes = requests.contains(&INFO_BLOCK_SIZE);
    let min = if opt == OPT_INFO || asked_sizes {
        export.backend.min_block().max(1)
    } else {
        1
    };
    let mut body = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    body.extend_from_slice(&min.to_be_bytes());
    body.extend_from_slice(&min.max(4096).to_be_bytes());
    body.extend_from_slice(&(MAX_BUFFER as u32).to_be_bytes());
    reply(wr, opt, REP_INFO, &body).await?;
    let flags = export_flags(server, &export, neg.structured);
    let size = export_size(&export);
    let mut body = INFO_EXPORT.to_be_bytes().to_vec();
    body.extend_from_slice(&size.to_be_bytes());
    body.extend_from_slice(&flags.to_be_bytes());
    reply(wr, opt, REP_INFO, &body).await?;
    if opt == OPT_INFO && !asked_sizes && min > 1 {
        error(
            wr,
            opt,
            REP_ERR_BLOCK_SIZE_REQD,
            "request NBD_INFO_BLOCK_SIZE to use this export",
        )
        .await?;
        return Ok(None);
    }
    reply(wr, opt, REP_ACK, &[]).await?;
    if opt == OPT_INFO {
        return Ok(None);
    }
    Ok(Some(Session {
        contexts: selected_for(neg, &name),
        export,
        structured: neg.structured,
        extended: neg.extended,
        size,
    }))
}

/// The contexts export `export` offers, as (id, name), in id order.
fn offered(export: &Export) -> Vec<(u32, String)> {
    let mut v = vec![(CTX_BASE, "base:allocation".to_string())];
    if export.allocation_depth {
        v.push((CTX_DEPTH, "qemu:allocation-depth".to_string()));
    }
    v.extend(bitmap_contexts(export));
    v
}

/// The exported bitmaps' contexts.
fn bitmap_contexts(export: &Export) -> impl Iterator<Item = (u32, String)> + '_ {
    (CTX_BITMAP..)
        .zip(&export.bitmaps)
        .map(|(id, name)| (id, format!("{BITMAP_PREFIX}{name}")))
}

/// Which offered contexts `query` selects; `list` allows the wildcards `base:`, `qemu:`
/// and `qemu:dirty-bitmap:`. An exact bitmap name selects the first bitmap of that name.
fn matches(export: &Export, query: &str, list: bool) -> Vec<(u32, String)> {
    let wildcard = |name: &str| {
        list && match query {
            "base:" | "qemu:" => name.starts_with(query),
            BITMAP_PREFIX => name.starts_with(BITMAP_PREFIX),
            _ => false,
        }
    };
    let mut found: Vec<(u32, String)> = offered(export)
        .into_iter()
        .filter(|(_, name)| *name == query || wildcard(name))
        .collect();
    if query.starts_with(BITMAP_PREFIX) && query != BITMAP_PREFIX {
        found.truncate(1);
    }
    found
}

async fn meta_context<W: AsyncWrite + Unpin>(
    server: &Server,
    neg: &mut Negotiation,
    wr: &mut W,
    opt: u32,
    data: &[u8],
) -> io::Result<()> {
    let set = opt == OPT_SET_META_CONTEXT;
    if set {
        // A failed SET still clears the earlier selection.
        neg.contexts.clear();
        neg.contexts_for = None;
        if !neg.structured {
            return error(
                wr,
                opt,
                REP_ERR_INVALID,
                "structured replies not negotiated",
            )
            .await;
        }
    }
    let mut p = Payload { data, pos: 0 };
    let parsed = (|| {
        let n = p.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        let name = String::from_utf8_lossy(p.bytes(n)?).into_owned();
        let count = p.u32()?;
        let mut queries = Vec::new();
        for _ in 0..count {
            let len = p.u32()? as usize;
            let q = p.bytes(len)?;
            if len <= MAX_STRING {
                queries.push(String::from_utf8_lossy(q).into_owned());
            }
        }
        p.done().then_some((name, queries, count))
    })();
    let Some((name, queries, count)) = parsed else {
        return error(wr, opt, REP_ERR_INVALID, "Inconsistent lengths in option").await;
    };
    let Some(export) = server.export(&name) else {
        let text = format!("export '{name}' not present");
        return error(wr, opt, REP_ERR_UNKNOWN, &text).await;
    };
    let mut chosen: Vec<(u32, String)> = if count == 0 && !set {
        offered(&export)
    } else {
        queries
            .iter()
            .flat_map(|q| matches(&export, q, !set))
            .collect()
    };
    chosen.sort_unstable();
    chosen.dedup();
    for (id, ctx) in &chosen {
        let mut body = if set { *id } else { 0 }.to_be_bytes().to_vec();
        body.extend_from_slice(ctx.as_bytes());
        reply(wr, opt, REP_META_CONTEXT, &body).await?;
    }
    if set {
        neg.contexts = chosen.iter().map(|(id, _)| *id).collect();
        neg.contexts_for = Some(name);
    }
    reply(wr, opt, REP_ACK, &[]).await
}
