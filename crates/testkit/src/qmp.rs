//! A synchronous QMP client with read timeouts, so a hang fails the test
//! instead of blocking it forever.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::proc::RawConn;

/// Default time to wait for one message.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An error reply: `{"error": {"class": .., "desc": ..}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpErrorReply {
    pub class: String,
    pub desc: String,
}

impl fmt::Display for QmpErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QmpErrorReply {}

/// One message as read from the wire.
#[derive(Debug, Clone)]
pub struct Message {
    /// The line exactly as received, terminator included.
    pub line: String,
    pub value: Value,
}

impl Message {
    /// Whether the line ended with `"\r\n"`.
    pub fn has_crlf(&self) -> bool {
        self.line.ends_with("\r\n")
    }

    /// Whether this is an event (has an `event` member).
    pub fn is_event(&self) -> bool {
        self.value.get("event").is_some()
    }
}

/// Synchronous QMP client.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Value,
    events: VecDeque<Value>,
    timeout: Duration,
}

impl Qmp {
    /// Connects to the socket at `path` and reads the greeting.
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to {}", path.display()))?;
        Self::from_stream(stream)
    }

    /// Wraps a connected stream and reads the greeting.
    pub fn from_stream(stream: UnixStream) -> Result<Self> {
        Self::from_stream_timeout(stream, READ_TIMEOUT)
    }

    /// Like [`Qmp::from_stream`], every read (the greeting's included) waiting
    /// at most `timeout`.
    pub fn from_stream_timeout(stream: UnixStream, timeout: Duration) -> Result<Self> {
        let writer = stream.try_clone().context("cannot clone socket")?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            events: VecDeque::new(),
            timeout,
        };
        let greeting = qmp
            .read_raw()?
            .context("connection closed before greeting")?;
        if greeting.value.get("QMP").is_none() {
            bail!("expected a QMP greeting, got {}", greeting.line.trim_end());
        }
        qmp.greeting = greeting.value;
        Ok(qmp)
    }

    /// The greeting the server sent.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Sets how long a single read may block.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `qmp_capabilities` (no capabilities enabled).
    pub fn negotiate(&mut self) -> Result<()> {
        self.execute("qmp_capabilities", json!({}))
            .map_err(anyhow::Error::from)?;
        Ok(())
    }

    /// Runs `cmd` with `args` (pass `Value::Null` for none) and returns the
    /// `return` value or the error reply. Events read meanwhile are buffered.
    /// Panics on transport failures (closed connection, timeout).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, QmpErrorReply> {
        self.try_execute(cmd, args)
            .unwrap_or_else(|err| panic!("QMP {cmd}: {err:#}"))
    }

    /// Like [`Qmp::execute`] but reports transport failures as `Err`.
    pub fn try_execute(&mut self, cmd: &str, args: Value) -> Result<Result<Value, QmpErrorReply>> {
        let mut request = json!({ "execute": cmd });
        if !args.is_null() {
            request["arguments"] = args;
        }
        self.send(&request)?;
        let reply = self.read_reply()?;
        Ok(parse_reply(&reply))
    }

    /// Sends one JSON value as a request.
    pub fn send(&mut self, request: &Value) -> Result<()> {
        self.send_raw(request.to_string().as_bytes())
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .context("cannot write to QMP socket")?;
        Ok(())
    }

    /// Reads messages until a non-event one, buffering events.
    pub fn read_reply(&mut self) -> Result<Value> {
        loop {
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            } else {
                return Ok(msg);
            }
        }
    }

    /// Reads the next message of any kind (not from the event buffer).
    pub fn read_message(&mut self) -> Result<Value> {
        match self.read_raw()? {
            Some(msg) => Ok(msg.value),
            None => bail!("QMP connection closed"),
        }
    }

    /// Reads one line with the current timeout; `Ok(None)` at end of stream.
    pub fn read_raw(&mut self) -> Result<Option<Message>> {
        self.read_raw_timeout(self.timeout)
    }

    /// Reads one line waiting at most `timeout`; `Ok(None)` at end of stream.
    /// A timeout is an error whose root cause is an `io::Error` of kind
    /// `WouldBlock` or `TimedOut` (see [`is_timeout`]).
    pub fn read_raw_timeout(&mut self, timeout: Duration) -> Result<Option<Message>> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .context("cannot set read timeout")?;
        let mut buf = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    bail!(
                        "connection closed inside a message: {:?}",
                        String::from_utf8_lossy(&buf)
                    );
                }
                Ok(_) if buf.ends_with(b"\n") => break,
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // A partial line keeps the reader going until the deadline.
                    let left = deadline.saturating_duration_since(Instant::now());
                    if buf.is_empty() || left.is_zero() {
                        return Err(anyhow::Error::new(err).context(format!(
                            "no QMP message within {timeout:?} (partial: {:?})",
                            String::from_utf8_lossy(&buf)
                        )));
                    }
                    self.reader
                        .get_ref()
                        .set_read_timeout(Some(left))
                        .context("cannot set read timeout")?;
                }
                Err(err) => return Err(err).context("cannot read from QMP socket"),
            }
        }
        let line = String::from_utf8(buf).context("QMP message is not UTF-8")?;
        let value: Value = serde_json::from_str(line.trim_end())
            .with_context(|| format!("QMP message is not JSON: {line:?}"))?;
        Ok(Some(Message { line, value }))
    }

    /// Turns this into a raw connection (for byte-exact reads) whose reads
    /// wait at most `timeout`; bytes read but not yet consumed come first.
    /// Buffered events are dropped.
    pub fn into_raw(self, timeout: Duration) -> RawConn<UnixStream> {
        let buffered = self.reader.buffer().to_vec();
        RawConn::with_buffered(self.reader.into_inner(), buffered, timeout)
    }

    /// Takes all buffered events.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Returns the first event named `name` (buffered or arriving within
    /// `timeout`), removing it and the events before it from the buffer;
    /// other events that arrive meanwhile stay buffered.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
                let event = self.events.remove(pos).expect("position is in range");
                return Ok(event);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("event {name} did not arrive within {timeout:?}");
            }
            match self.read_raw_timeout(left) {
                Ok(Some(msg)) if msg.is_event() => self.events.push_back(msg.value),
                Ok(Some(msg)) => bail!("unexpected reply while waiting for {name}: {}", msg.value),
                Ok(None) => bail!("connection closed while waiting for {name}"),
                Err(err) if is_timeout(&err) => {}
                Err(err) => return Err(err),
            }
        }
    }
}

/// Whether `err` is a read timeout from [`Qmp::read_raw_timeout`].
pub fn is_timeout(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        })
    })
}

fn parse_reply(reply: &Value) -> Result<Value, QmpErrorReply> {
    if let Some(ret) = reply.get("return") {
        return Ok(ret.clone());
    }
    let err = reply.get("error");
    let field = |name: &str| {
        err.and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Err(QmpErrorReply {
        class: field("class"),
        desc: if err.is_some() {
            field("desc")
        } else {
            format!("not a QMP reply: {reply}")
        },
    })
}
