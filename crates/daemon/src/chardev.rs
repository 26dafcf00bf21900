//! `--chardev`: character devices a QMP monitor talks through.
//!
//! The option uses QEMU's legacy QemuOpts syntax only (`socket,id=ID,path=PATH,...`; no
//! JSON form): the first item without `=` is the backend, `,,` is a literal comma, a bare
//! `KEY` means `KEY=on` and `noKEY` means `KEY=off` (both deprecated, with a warning), the
//! first `id=` wins and for other keys the last one does. Keys are checked against the one
//! list QEMU shares between all backends (so `null,id=a,path=x` is fine), with its types.
//!
//! blockd implements the `socket` (unix or TCP, server or client), `stdio` and `null`
//! backends. A server chardev serves one client at a time, like QEMU's: the caller asks
//! for the next connection only once the previous one has ended, while further clients
//! wait in the listen backlog. The unix socket file is removed when the chardev is dropped.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::pidfile::os_text;

/// A chardev option error, displayed as QSD's text (after the `--chardev VALUE: ` part).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChardevError {
    #[error("{0}")]
    Qemu(String),
    /// Valid for QSD, but blockd does not implement it.
    #[error("{0} is not supported by blockd")]
    Unsupported(String),
}

fn err(text: impl Into<String>) -> ChardevError {
    ChardevError::Qemu(text.into())
}

/// What `--chardev VALUE` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevOption {
    /// Create this chardev.
    Create(ChardevSpec),
    /// Print `text` on stdout and exit with status 0 (`success`) or 1, as QSD does for
    /// `--chardev help` (backend list, 0) and `--chardev socket,help` (option list, 1).
    Help { text: String, success: bool },
}

/// A parsed chardev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSpec {
    pub id: String,
    pub backend: Backend,
    /// Deprecation warnings to print (after the option's location) when it is processed.
    pub warnings: Vec<String>,
}

/// The chardev backends blockd implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Socket(SocketSpec),
    Stdio,
    Null,
}

/// `socket` backend options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSpec {
    pub addr: SocketAddr,
    /// Listen (`server=on`) rather than connect.
    pub server: bool,
    /// A server waits for its first client before start-up goes on (`wait`, default on).
    pub wait: bool,
    /// `nodelay=on` or `delay=off`: set TCP_NODELAY on TCP connections.
    pub nodelay: bool,
}

/// Where a socket chardev listens or connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddr {
    Unix {
        path: String,
        abstract_ns: bool,
    },
    Inet {
        host: String,
        port: String,
        ipv4: bool,
        ipv6: bool,
    },
}

/// Types of the keys QEMU's chardev option list accepts (`--chardev socket,help`).
const KEYS: &[(&str, KeyType)] = &[
    ("abstract", KeyType::Bool),
    ("append", KeyType::Bool),
    ("backend", KeyType::Str),
    ("chardev", KeyType::Str),
    ("chardevs.0", KeyType::Str),
    ("chardevs.1", KeyType::Str),
    ("chardevs.2", KeyType::Str),
    ("chardevs.3", KeyType::Str),
    ("clipboard", KeyType::Bool),
    ("cols", KeyType::Num),
    ("debug", KeyType::Num),
    ("delay", KeyType::Bool),
    ("fd", KeyType::Str),
    ("height", KeyType::Num),
    ("host", KeyType::Str),
    ("input-path", KeyType::Str),
    ("ipv4", KeyType::Bool),
    ("ipv6", KeyType::Bool),
    ("localaddr", KeyType::Str),
    ("localport", KeyType::Str),
    ("logappend", KeyType::Bool),
    ("logfile", KeyType::Str),
    ("mouse", KeyType::Bool),
    ("mux", KeyType::Bool),
    ("name", KeyType::Str),
    ("nodelay", KeyType::Bool),
    ("path", KeyType::Str),
    ("port", KeyType::Str),
    ("reconnect-ms", KeyType::Num),
    ("reconnect", KeyType::Num),
    ("rows", KeyType::Num),
    ("server", KeyType::Bool),
    ("signal", KeyType::Bool),
    ("size", KeyType::Size),
    ("telnet", KeyType::Bool),
    ("tight", KeyType::Bool),
    ("tls-authz", KeyType::Str),
    ("tls-creds", KeyType::Str),
    ("tn3270", KeyType::Bool),
    ("to", KeyType::Num),
    ("wait", KeyType::Bool),
    ("websocket", KeyType::Bool),
    ("width", KeyType::Num),
];

/// Backends QSD knows; those outside [`Backend`] are refused as unsupported.
const QSD_BACKENDS: &[&str] = &[
    "pty", "file", "udp", "memory", "stdio", "socket", "ringbuf", "null", "parallel", "pipe",
    "mux", "serial", "hub",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Bool,
    Num,
    Size,
    Str,
}

impl KeyType {
    fn label(self) -> &'static str {
        match self {
            KeyType::Bool => "bool (on/off)",
            KeyType::Num => "num",
            KeyType::Size => "size",
            KeyType::Str => "str",
        }
    }
}

/// The parsed `key=value` list, in order (id kept apart).
struct Opts {
    id: Option<String>,
    items: Vec<(String, String)>,
    warnings: Vec<String>,
    help: bool,
}

impl Opts {
    fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn bool(&self, key: &str, default: bool) -> bool {
        self.get(key)
            .and_then(qapi::keyval::parse_bool)
            .unwrap_or(default)
    }
}

/// Splits one item at `at`: returns (text with `,,` unescaped, next position).
fn value_at(s: &str, mut at: usize) -> (String, usize) {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    while at < bytes.len() {
        if bytes[at] == b',' {
            if bytes.get(at + 1) == Some(&b',') {
                out.push(b',');
                at += 2;
                continue;
            }
            return (String::from_utf8_lossy(&out).into_owned(), at + 1);
        }
        out.push(bytes[at]);
        at += 1;
    }
    (String::from_utf8_lossy(&out).into_owned(), at)
}

/// QemuOpts' `get_opt_name_value`: one `name[=value]` item.
fn name_value(
    s: &str,
    at: usize,
    first: bool,
    warn: &mut Vec<String>,
    help: &mut bool,
) -> (String, String, usize) {
    let rest = &s[at..];
    let len = rest.find(['=', ',']).unwrap_or(rest.len());
    if rest.as_bytes().get(len) == Some(&b'=') {
        let (value, next) = value_at(s, at + len + 1);
        return (rest[..len].to_string(), value, next);
    }
    if first {
        let (value, next) = value_at(s, at);
        return ("backend".to_string(), value, next);
    }
    let name = &rest[..len];
    let next = (at + len + 1).min(s.len());
    if name == "help" || name == "?" {
        *help = true;
        return (name.to_string(), String::new(), next);
    }
    let (key, value) = match name.strip_prefix("no") {
        Some(key) => (key, "off"),
        None => (name, "on"),
    };
    warn.push(format!(
        "warning: short-form boolean option '{name}' deprecated\nPlease use {key}={value} instead"
    ));
    (key.to_string(), value.to_string(), next)
}

/// QEMU's `id_wellformed`.
pub(crate) fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn parse_opts(s: &str) -> Result<Opts, ChardevError> {
    let mut opts = Opts {
        id: None,
        items: Vec::new(),
        warnings: Vec::new(),
        help: false,
    };
    let mut at = 0;
    let mut first = true;
    while at < s.len() {
        let (key, value, next) = name_value(s, at, first, &mut opts.warnings, &mut opts.help);
        first = false;
        at = next;
        if key == "id" {
            if opts.id.is_none() {
                opts.id = Some(value);
            }
            continue;
        }
        if key == "help" || key == "?" {
            continue;
        }
        opts.items.push((key, value));
    }
    if let Some(id) = &opts.id {
        if !id_wellformed(id) {
            return Err(err("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter."));
        }
    }
    if opts.help {
        return Ok(opts);
    }
    for (key, value) in &opts.items {
        let Some((_, ty)) = KEYS.iter().find(|(k, _)| k == key) else {
            return Err(err(format!("Invalid parameter '{key}'")));
        };
        let ok = match ty {
            KeyType::Bool => qapi::keyval::parse_bool(value).is_some(),
            KeyType::Num => qapi::keyval::parse_uint(value).is_some(),
            KeyType::Size => qapi::keyval::parse_size(value).is_ok(),
            KeyType::Str => true,
        };
        if !ok {
            return Err(err(match ty {
                KeyType::Bool => format!("Parameter '{key}' expects 'on' or 'off'"),
                KeyType::Num => format!("Parameter '{key}' expects a number"),
                _ => format!("Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."),
            }));
        }
    }
    Ok(opts)
}

/// Parses a `--chardev` value.
pub fn parse(value: &str) -> Result<ChardevOption, ChardevError> {
    let opts = parse_opts(value)?;
    if opts.help {
        let mut text = String::from("chardev options:\n");
        for (key, ty) in KEYS {
            text.push_str(&format!("  {key}=<{}>\n", ty.label()));
        }
        return Ok(ChardevOption::Help {
            text,
            success: false,
        });
    }
    let Some(backend) = opts.get("backend") else {
        let id = opts.id.as_deref().unwrap_or("(null)");
        return Err(err(format!("chardev: \"{id}\" missing backend")));
    };
    if backend == "help" || backend == "?" {
        let text = "Available chardev backend types: \n  socket\n  stdio\n  null\n".to_string();
        return Ok(ChardevOption::Help {
            text,
            success: true,
        });
    }
    let Some(id) = opts.id.clone() else {
        return Err(err("chardev: no id specified"));
    };
    let backend = match backend {
        "socket" => Backend::Socket(parse_socket(&opts)?),
        "stdio" => Backend::Stdio,
        "null" => Backend::Null,
        b if QSD_BACKENDS.contains(&b) => {
            return Err(ChardevError::Unsupported(format!("chardev backend '{b}'")));
        }
        b => return Err(err(format!("'{b}' is not a valid char driver name"))),
    };
    if opts.bool("mux", false) {
        return Err(ChardevError::Unsupported("'mux' option".into()));
    }
    if opts.get("logfile").is_some() {
        return Err(ChardevError::Unsupported("'logfile' option".into()));
    }
    Ok(ChardevOption::Create(ChardevSpec {
        id,
        backend,
        warnings: opts.warnings,
    }))
}

/// QEMU's `qemu_chr_parse_socket` plus `qmp_chardev_validate_socket`, in their order.
fn parse_socket(opts: &Opts) -> Result<SocketSpec, ChardevError> {
    let (path, host, port, fd) = (
        opts.get("path"),
        opts.get("host"),
        opts.get("port"),
        opts.get("fd"),
    );
    if path.is_some() as u8 + host.is_some() as u8 + fd.is_some() as u8 > 1 {
        return Err(err(
            "None or one of 'path', 'fd' or 'host' option required.",
        ));
    }
    if host.is_some() && port.is_none() {
        return Err(err("chardev: socket: no port given"));
    }
    if opts.get("delay").is_some() && opts.get("nodelay").is_some() {
        return Err(err("'delay' and 'nodelay' are mutually exclusive"));
    }
    let server = opts.bool("server", false);
    if server {
        for key in ["reconnect", "reconnect-ms"] {
            if opts.get(key).is_some() {
                return Err(err(format!(
                    "'{key}' option is incompatible with socket in server listen mode"
                )));
            }
        }
    } else {
        if opts.bool("websocket", false) {
            return Err(err("Websocket client is not implemented"));
        }
        if opts.get("wait").is_some() {
            return Err(err(
                "'wait' option is incompatible with socket in client connect mode",
            ));
        }
    }
    if opts.get("reconnect").is_some() && opts.get("reconnect-ms").is_some() {
        return Err(err("'reconnect' and 'reconnect-ms' are mutually exclusive"));
    }
    for key in ["telnet", "tn3270", "websocket"] {
        if opts.bool(key, false) {
            return Err(ChardevError::Unsupported(format!("socket option '{key}'")));
        }
    }
    for key in ["tls-creds", "tls-authz", "reconnect", "reconnect-ms"] {
        if opts.get(key).is_some() {
            return Err(ChardevError::Unsupported(format!("socket option '{key}'")));
        }
    }
    let addr = match (path, host) {
        (Some(path), _) => SocketAddr::Unix {
            path: path.to_string(),
            abstract_ns: opts.bool("abstract", false),
        },
        (None, Some(host)) => SocketAddr::Inet {
            host: host.to_string(),
            port: port.unwrap_or_default().to_string(),
            ipv4: opts.bool("ipv4", false),
            ipv6: opts.bool("ipv6", false),
        },
        (None, None) if fd.is_some() => {
            return Err(ChardevError::Unsupported("socket option 'fd'".into()));
        }
        // QEMU reads a missing address as file descriptor "".
        (None, None) => return Err(err("Unable to parse FD number ")),
    };
    Ok(SocketSpec {
        addr,
        server,
        wait: server && opts.bool("wait", true),
        nodelay: opts.bool("nodelay", false) || !opts.bool("delay", true),
    })
}

impl ChardevSpec {
    /// For a server that waits for its first client, the note QSD prints (after the
    /// option's location) before it blocks in [`open`].
    pub fn waiting_info(&self) -> Option<String> {
        let Backend::Socket(sock) = &self.backend else {
            return None;
        };
        if !sock.wait {
            return None;
        }
        let addr = match &sock.addr {
            SocketAddr::Unix { path, .. } => format!("unix:{path}"),
            SocketAddr::Inet { host, port, .. } => format!("tcp:{host}:{port}"),
        };
        Some(format!(
            "info: QEMU waiting for connection on: disconnected:{addr},server=on"
        ))
    }

    /// The error QSD gives when this chardev is added while `existing` are defined, or
    /// `None` if it may be added (ids must be unique; only one chardev may use stdio).
    pub fn conflict<'a>(
        &self,
        mut existing: impl Iterator<Item = &'a ChardevSpec>,
    ) -> Option<ChardevError> {
        let mut same_id = false;
        let mut stdio = false;
        for other in existing.by_ref() {
            same_id |= other.id == self.id;
            stdio |= other.backend == Backend::Stdio;
        }
        match self.backend {
            Backend::Stdio if stdio => Some(err("cannot use stdio by multiple character devices")),
            Backend::Socket(_) if same_id => Some(err("duplicate yank instance")),
            _ if same_id => Some(err(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                self.id
            ))),
            _ => None,
        }
    }
}

/// One connection's byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A connection through a chardev.
pub type Conn = Box<dyn Stream>;

enum Source {
    Unix {
        listener: UnixListener,
        path: Option<(PathBuf, u64)>,
    },
    Tcp {
        listener: TcpListener,
        nodelay: bool,
    },
    /// Client sockets and stdio: only the pending connection.
    Once,
}

/// An open chardev.
pub struct Chardev {
    source: Source,
    pending: Option<Conn>,
}

impl std::fmt::Debug for Chardev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chardev")
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

/// Opens a chardev: a server binds and listens now (and, with `wait`, waits for its first
/// client), a client connects now. Errors read as QSD's (`Failed to connect to 'PATH': No
/// such file or directory`); use `to_string()` on them.
pub async fn open(spec: &ChardevSpec) -> io::Result<Chardev> {
    let mut dev = match &spec.backend {
        Backend::Null => Chardev {
            source: Source::Once,
            pending: None,
        },
        Backend::Stdio => Chardev {
            source: Source::Once,
            pending: Some(Box::new(Stdio::new())),
        },
        Backend::Socket(sock) if sock.server => listen(sock).await?,
        Backend::Socket(sock) => Chardev {
            source: Source::Once,
            pending: Some(connect(sock).await?),
        },
    };
    if let Backend::Socket(SocketSpec { wait: true, .. }) = spec.backend {
        let first = dev.accept().await?;
        dev.pending = first;
    }
    Ok(dev)
}

fn context(err: io::Error, text: String) -> io::Error {
    io::Error::new(err.kind(), format!("{text}: {}", os_text(&err)))
}

async fn resolve(
    host: &str,
    port: &str,
    ipv4: bool,
    ipv6: bool,
) -> io::Result<Vec<std::net::SocketAddr>> {
    let fail = |e: io::Error| {
        let text = os_text(&e);
        let text = text
            .strip_prefix("failed to lookup address information: ")
            .unwrap_or(&text)
            .to_string();
        io::Error::new(
            e.kind(),
            format!("address resolution failed for {host}:{port}: {text}"),
        )
    };
    let Ok(port_num) = port.parse::<u16>() else {
        return Err(fail(io::Error::other(
            "Servname not supported for ai_socktype",
        )));
    };
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    let addrs = tokio::net::lookup_host((host, port_num))
        .await
        .map_err(fail)?;
    Ok(addrs
        .filter(|a| !(ipv4 && a.is_ipv6() || ipv6 && a.is_ipv4()))
        .collect())
}

async fn listen(sock: &SocketSpec) -> io::Result<Chardev> {
    match &sock.addr {
        SocketAddr::Unix { path, abstract_ns } => {
            let bound = if *abstract_ns {
                abstract_listener(path)
            } else {
                // QEMU replaces whatever the path names (a stale socket or not).
                let _ = std::fs::remove_file(path);
                UnixListener::bind(path)
            };
            let listener =
                bound.map_err(|e| context(e, format!("Failed to bind socket to {path}")))?;
            let path = if *abstract_ns {
                None
            } else {
                std::fs::metadata(path)
                    .ok()
                    .map(|m| (PathBuf::from(path), m.ino()))
            };
            Ok(Chardev {
                source: Source::Unix { listener, path },
                pending: None,
            })
        }
        SocketAddr::Inet {
            host,
            port,
            ipv4,
            ipv6,
        } => {
            let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
            for addr in resolve(host, port, *ipv4, *ipv6).await? {
                match TcpListener::bind(addr).await {
                    Ok(listener) => {
                        let source = Source::Tcp {
                            listener,
                            nodelay: sock.nodelay,
                        };
                        return Ok(Chardev {
                            source,
                            pending: None,
                        });
                    }
                    Err(e) => last = e,
                }
            }
            Err(context(last, "Failed to find an available port".into()))
        }
    }
}

fn abstract_listener(name: &str) -> io::Result<UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

async fn connect(sock: &SocketSpec) -> io::Result<Conn> {
    match &sock.addr {
        SocketAddr::Unix { path, abstract_ns } => {
            let stream = if *abstract_ns {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(path.as_bytes())?;
                std::os::unix::net::UnixStream::connect_addr(&addr).and_then(|s| {
                    s.set_nonblocking(true)?;
                    UnixStream::from_std(s)
                })
            } else {
                UnixStream::connect(path).await
            };
            let stream =
                stream.map_err(|e| context(e, format!("Failed to connect to '{path}'")))?;
            Ok(Box::new(stream))
        }
        SocketAddr::Inet {
            host,
            port,
            ipv4,
            ipv6,
        } => {
            let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
            for addr in resolve(host, port, *ipv4, *ipv6).await? {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        stream.set_nodelay(sock.nodelay)?;
                        return Ok(Box::new(stream));
                    }
                    Err(e) => last = e,
                }
            }
            Err(context(
                last,
                format!("Failed to connect to '{host}:{port}'"),
            ))
        }
    }
}

impl Chardev {
    /// The next connection: for a server the next client (call again only when the
    /// previous connection has ended; QEMU serves one client at a time), for a client
    /// socket or stdio its one connection and then `None`; `None` at once for `null`.
    pub async fn accept(&mut self) -> io::Result<Option<Conn>> {
        if let Some(conn) = self.pending.take() {
            return Ok(Some(conn));
        }
        match &self.source {
            Source::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                Ok(Some(Box::new(stream)))
            }
            Source::Tcp { listener, nodelay } => {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(*nodelay)?;
                Ok(Some(Box::new(stream)))
            }
            Source::Once => Ok(None),
        }
    }
}

impl Drop for Chardev {
    fn drop(&mut self) {
        if let Source::Unix {
            path: Some((path, ino)),
            ..
        } = &self.source
        {
            if std::fs::metadata(path).is_ok_and(|m| m.ino() == *ino) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The process's stdin and stdout as one stream.
struct Stdio {
    input: tokio::io::Stdin,
    output: tokio::io::Stdout,
}

impl Stdio {
    fn new() -> Self {
        Stdio {
            input: tokio::io::stdin(),
            output: tokio::io::stdout(),
        }
    }
}

impl AsyncRead for Stdio {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.input).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stdio {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.output).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.output).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.output).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn spec(value: &str) -> ChardevSpec {
        match parse(value).unwrap() {
            ChardevOption::Create(spec) => spec,
            other => panic!("not a spec: {other:?}"),
        }
    }

    fn error(value: &str) -> String {
        parse(value).unwrap_err().to_string()
    }

    #[test]
    fn unix_server_spec() {
        let s = spec("socket,id=m,path=/tmp/a.sock,server=on,wait=off");
        assert_eq!(s.id, "m");
        assert_eq!(
            s.backend,
            Backend::Socket(SocketSpec {
                addr: SocketAddr::Unix {
                    path: "/tmp/a.sock".into(),
                    abstract_ns: false
                },
                server: true,
                wait: false,
                nodelay: false,
            })
        );
    }

    #[test]
    fn double_comma_is_a_literal_comma() {
        let s = spec("socket,id=m,path=/tmp/a,,b,server=on,wait=off");
        let Backend::Socket(sock) = s.backend else {
            panic!()
        };
        assert_eq!(
            sock.addr,
            SocketAddr::Unix {
                path: "/tmp/a,b".into(),
                abstract_ns: false
            }
        );
    }

    #[test]
    fn server_waits_by_default() {
        let s = spec("socket,id=m,path=p,server=on");
        assert_eq!(
            s.waiting_info().unwrap(),
            "info: QEMU waiting for connection on: disconnected:unix:p,server=on"
        );
    }

    #[test]
    fn short_form_booleans_warn() {
        let s = spec("socket,id=a,path=p,server,nowait");
        let Backend::Socket(sock) = &s.backend else {
            panic!()
        };
        assert!(sock.server && !sock.wait);
        assert_eq!(s.warnings, [
            "warning: short-form boolean option 'server' deprecated\nPlease use server=on instead",
            "warning: short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
        ]);
    }

    #[test]
    fn first_id_wins() {
        assert_eq!(spec("null,id=a,id=b").id, "a");
    }

    #[test]
    fn keys_of_other_backends_are_accepted() {
        assert_eq!(spec("null,id=a,path=x").backend, Backend::Null);
    }

    #[test]
    fn tcp_spec() {
        let s = spec("socket,id=a,host=127.0.0.1,port=4444,server=on,wait=off,nodelay=on");
        let Backend::Socket(sock) = s.backend else {
            panic!()
        };
        assert!(sock.nodelay);
        assert_eq!(
            sock.addr,
            SocketAddr::Inet {
                host: "127.0.0.1".into(),
                port: "4444".into(),
                ipv4: false,
                ipv6: false,
            }
        );
    }

    #[test]
    fn stdio_spec() {
        assert_eq!(spec("stdio,id=a,signal=off").backend, Backend::Stdio);
    }

    #[test]
    fn errors_match_qsd() {
        assert_eq!(
            error("socket,path=p,server=on,wait=off"),
            "chardev: no id specified"
        );
        assert_eq!(
            error("{\"backend\":\"socket\"}"),
            "chardev: no id specified"
        );
        assert_eq!(error("id=a"), "chardev: \"a\" missing backend");
        assert_eq!(error("socket,id=a,path=p,foo=1"), "Invalid parameter 'foo'");
        assert_eq!(
            error("bogus,id=a"),
            "'bogus' is not a valid char driver name"
        );
        assert_eq!(error("socket,id=a"), "Unable to parse FD number ");
        assert_eq!(
            error("socket,id=a,path=p,server=maybe"),
            "Parameter 'server' expects 'on' or 'off'"
        );
        assert_eq!(
            error("socket,id=a,path=p,server=on,reconnect=x"),
            "Parameter 'reconnect' expects a number"
        );
        assert_eq!(
            error("socket,id=1a,path=p"),
            "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter."
        );
        assert_eq!(
            error("socket,id=a,host=h,port=1,path=x"),
            "None or one of 'path', 'fd' or 'host' option required."
        );
        assert_eq!(
            error("socket,id=a,host=h,server=on"),
            "chardev: socket: no port given"
        );
        assert_eq!(
            error("socket,id=a,path=p,server=on,wait=off,reconnect=1"),
            "'reconnect' option is incompatible with socket in server listen mode"
        );
        assert_eq!(
            error("socket,id=a,path=p,server=off,wait=off"),
            "'wait' option is incompatible with socket in client connect mode"
        );
    }

    #[test]
    fn unsupported_backend_is_refused_clearly() {
        assert_eq!(
            error("pty,id=a"),
            "chardev backend 'pty' is not supported by blockd"
        );
    }

    #[test]
    fn help_lists_backends_and_succeeds() {
        let ChardevOption::Help { text, success } = parse("help").unwrap() else {
            panic!()
        };
        assert!(success);
        assert!(text.starts_with("Available chardev backend types: \n"));
    }

    #[test]
    fn help_item_lists_options_and_fails() {
        let ChardevOption::Help { text, success } = parse("socket,help").unwrap() else {
            panic!()
        };
        assert!(!success);
        assert!(text.starts_with("chardev options:\n  abstract=<bool (on/off)>\n"));
    }

    #[test]
    fn conflicts_match_qsd() {
        let a = spec("null,id=a");
        let sock = spec("socket,id=a,path=p,server=on,wait=off");
        let io1 = spec("stdio,id=x");
        let io2 = spec("stdio,id=y");
        assert_eq!(
            a.conflict([&a].into_iter()).unwrap().to_string(),
            "attempt to add duplicate property 'a' to object (type 'container')"
        );
        assert_eq!(
            sock.conflict([&a].into_iter()).unwrap().to_string(),
            "duplicate yank instance"
        );
        assert_eq!(
            io2.conflict([&io1].into_iter()).unwrap().to_string(),
            "cannot use stdio by multiple character devices"
        );
        assert!(io1.conflict([&a].into_iter()).is_none());
    }

    #[tokio::test]
    async fn client_to_missing_socket_fails_as_qsd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.sock");
        let s = spec(&format!("socket,id=a,path={}", path.display()));

        let err = open(&s).await.unwrap_err();

        assert_eq!(
            err.to_string(),
            format!(
                "Failed to connect to '{}': No such file or directory",
                path.display()
            )
        );
    }

    #[tokio::test]
    async fn bind_in_missing_directory_fails_as_qsd() {
        let s = spec("socket,id=a,path=/nonexistent-dir/x.sock,server=on,wait=off");

        let err = open(&s).await.unwrap_err();

        assert_eq!(
            err.to_string(),
            "Failed to bind socket to /nonexistent-dir/x.sock: No such file or directory"
        );
    }

    #[tokio::test]
    async fn server_accepts_clients_one_after_another_and_unlinks_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        std::fs::write(&path, "stale").unwrap();
        let s = spec(&format!(
            "socket,id=m,path={},server=on,wait=off",
            path.display()
        ));
        let mut dev = open(&s).await.unwrap();

        let mut c1 = UnixStream::connect(&path).await.unwrap();
        let mut s1 = dev.accept().await.unwrap().unwrap();
        s1.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        c1.read_exact(&mut buf).await.unwrap();
        drop((c1, s1));
        let _c2 = UnixStream::connect(&path).await.unwrap();
        let s2 = dev.accept().await.unwrap();
        drop(dev);

        assert_eq!(&buf, b"hi");
        assert!(s2.is_some());
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn client_yields_one_connection_then_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let s = spec(&format!("socket,id=c,path={}", path.display()));

        let mut dev = open(&s).await.unwrap();
        let (_peer, _) = listener.accept().await.unwrap();

        assert!(dev.accept().await.unwrap().is_some());
        assert!(dev.accept().await.unwrap().is_none());
    }
}
