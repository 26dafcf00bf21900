//! One monitor connection: greeting, negotiation, requests, replies, events.

use crate::event::{EventBus, Receiver, RecvError};
use async_trait::async_trait;
use qapi::json::Parser;
use qapi::output::to_wire;
use qapi::{schema, visit, ErrorClass, QmpError};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Runs validated commands. The daemon's control task implements it.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Executes `command` with arguments already checked against the schema.
    async fn execute(&self, command: &str, args: Value) -> Result<Value, QmpError>;

    /// Called once a successful reply to `command` has been written to the client.
    fn replied(&self, _command: &str) {}
}

/// How a monitor was configured on the command line.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// `pretty=on`: indented output.
    pub pretty: bool,
    /// The `package` string of the greeting and `query-version`.
    pub package: String,
}

/// Serves one client until it disconnects.
pub async fn serve<S>(stream: S, opts: SessionOptions, handler: Arc<dyn Handler>, events: EventBus)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let mut session = Session {
        writer,
        opts,
        command_mode: false,
        oob: false,
    };
    // Subscribe before the greeting so no event emitted after it is missed.
    let mut rx = events.subscribe();
    if session
        .send(&greeting(&session.opts.package))
        .await
        .is_err()
    {
        return;
    }
    let mut parser = Parser::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            biased;
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    if session.command_mode && session.send(&ev.to_json()).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
            n = reader.read(&mut buf) => {
                let items = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => parser.feed(&buf[..n]),
                };
                for item in items {
                    let sent = match item {
                        Ok(request) => session.request(request, handler.as_ref(), &mut rx).await,
                        Err(err) => {
                            let reply = error_reply(&QmpError::generic(err.to_string()), None);
                            session.send(&reply).await.map_err(|_| ())
                        }
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn greeting(package: &str) -> Value {
    let (major, minor, micro) = crate::QEMU_VERSION;
    json!({"QMP": {
        "version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": package},
        "capabilities": ["oob"],
    }})
}

fn error_reply(err: &QmpError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), err.to_json());
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

fn return_reply(value: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), value);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

struct Session<W> {
    writer: W,
    opts: SessionOptions,
    command_mode: bool,
    oob: bool,
}

/// A request whose shape has been checked.
struct Request {
    command: String,
    oob: bool,
    args: Option<Value>,
}

impl<W: AsyncWrite + Unpin + Send> Session<W> {
    async fn send(&mut self, msg: &Value) -> std::io::Result<()> {
        self.writer
            .write_all(to_wire(msg, self.opts.pretty).as_bytes())
            .await?;
        self.writer.flush().await
    }

    /// Handles one parsed request and writes its reply.
    async fn request(
        &mut self,
        request: Value,
        handler: &dyn Handler,
        rx: &mut Receiver,
    ) -> Result<(), ()> {
        let Value::Object(obj) = request else {
            let reply = error_reply(&QmpError::generic("QMP input must be a JSON object"), None);
            return self.send(&reply).await.map_err(|_| ());
        };
        let id = obj.get("id").cloned();
        let (result, command) = match self.check(&obj) {
            Ok(req) => {
                let command = req.command.clone();
                (self.dispatch(req, handler, rx).await, Some(command))
            }
            Err(err) => (Err(err), None),
        };
        let succeeded = result.is_ok();
        let reply = match result {
            Ok(value) => return_reply(value, id),
            Err(err) => error_reply(&err, id),
        };
        if self.send(&reply).await.is_err() {
            return Err(());
        }
        if let (true, Some(command)) = (succeeded, command) {
            handler.replied(&command);
        }
        Ok(())
    }

    /// QEMU's checks of the request object, member by member.
    fn check(&self, obj: &Map<String, Value>) -> Result<Request, QmpError> {
        let mut command: Option<(String, bool)> = None;
        let mut args = None;
        for (key, value) in obj {
            match key.as_str() {
                "execute" | "exec-oob" if key == "execute" || self.oob => {
                    let Value::String(name) = value else {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{key}' must be a string"
                        )));
                    };
                    if command.is_some() {
                        // QEMU walks the members in its hash order, which always
                        // meets 'exec-oob' first.
                        return Err(QmpError::generic(
                            "QMP input member 'execute' clashes with 'exec-oob'",
                        ));
                    }
                    command = Some((name.clone(), key == "exec-oob"));
                }
                "arguments" => {
                    if !value.is_object() {
                        return Err(QmpError::generic(
                            "QMP input member 'arguments' must be an object",
                        ));
                    }
                    args = Some(value.clone());
                }
                "id" => {}
                other => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{other}' is unexpected"
                    )))
                }
            }
        }
        let (command, oob) =
            command.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
        Ok(Request { command, oob, args })
    }

    async fn dispatch(
        &mut self,
        req: Request,
        handler: &dyn Handler,
        rx: &mut Receiver,
    ) -> Result<Value, QmpError> {
        let schema = schema::schema();
        let known = schema.commands.get(&req.command);
        if !self.command_mode && req.command != "qmp_capabilities" {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        let Some(cmd) = known else {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                format!("The command {} has not been found", req.command),
            ));
        };
        if req.oob {
            return Err(QmpError::generic(format!(
                "The command {} does not support OOB",
                req.command
            )));
        }
        if cmd.name == "qmp_capabilities" {
            return self.qmp_capabilities(visit::command_args(cmd, req.args.as_ref())?);
        }
        let args = visit::command_args(cmd, req.args.as_ref())?;
        // Forward events while the command runs, so that events it causes come
        // out before its reply, as QEMU sends them.
        let fut = handler.execute(&cmd.name, args);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                ev = rx.recv() => {
                    if let Ok(ev) = ev {
                        if self.send(&ev.to_json()).await.is_err() {
                            return (&mut fut).await;
                        }
                    }
                }
                result = &mut fut => {
                    // Events queued by the command itself go out first.
                    while let Ok(ev) = rx.try_recv() {
                        if self.send(&ev.to_json()).await.is_err() {
                            break;
                        }
                    }
                    return result;
                }
            }
        }
    }

    fn qmp_capabilities(&mut self, args: Value) -> Result<Value, QmpError> {
        if self.command_mode {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let enable: Vec<&str> = args
            .get("enable")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        // "oob" is the only capability and blockd always offers it.
        self.oob = enable.contains(&"oob");
        self.command_mode = true;
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    /// Answers every command with its own name, and `emit` with an event.
    struct Echo(EventBus);

    #[async_trait]
    impl Handler for Echo {
        async fn execute(&self, command: &str, args: Value) -> Result<Value, QmpError> {
            if command == "query-jobs" {
                self.0.emit(Event::new(
                    "JOB_STATUS_CHANGE",
                    Some(json!({"id": "j", "status": "created"})),
                ));
            }
            Ok(json!({"command": command, "args": args}))
        }
    }

    struct Client {
        lines: tokio::io::Lines<BufReader<tokio::io::ReadHalf<DuplexStream>>>,
        writer: tokio::io::WriteHalf<DuplexStream>,
    }

    impl Client {
        async fn start(bus: EventBus) -> Client {
            let (ours, theirs) = tokio::io::duplex(1 << 16);
            let handler: Arc<dyn Handler> = Arc::new(Echo(bus.clone()));
            tokio::spawn(serve(theirs, SessionOptions::default(), handler, bus));
            let (r, w) = tokio::io::split(ours);
            let mut client = Client {
                lines: BufReader::new(r).lines(),
                writer: w,
            };
            let greeting = client.read().await;
            assert_eq!(greeting["QMP"]["capabilities"], json!(["oob"]));
            client
        }

        async fn read(&mut self) -> Value {
            let line =
                tokio::time::timeout(std::time::Duration::from_secs(5), self.lines.next_line())
                    .await
                    .expect("a message within 5 s")
                    .expect("read")
                    .expect("connection open");
            serde_json::from_str(&line).expect("JSON")
        }

        async fn send(&mut self, text: &str) -> Value {
            self.writer.write_all(text.as_bytes()).await.expect("write");
            self.read().await
        }
    }

    #[tokio::test]
    async fn commands_before_negotiation_are_refused() {
        let mut c = Client::start(EventBus::new()).await;
        let reply = c.send(r#"{"execute": "query-jobs", "id": 7}"#).await;
        assert_eq!(reply["error"]["class"], "CommandNotFound");
        assert_eq!(
            reply["error"]["desc"],
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        assert_eq!(reply["id"], 7);
    }

    #[tokio::test]
    async fn negotiation_twice_is_refused() {
        let mut c = Client::start(EventBus::new()).await;
        assert_eq!(
            c.send(r#"{"execute": "qmp_capabilities"}"#).await,
            json!({"return": {}})
        );
        let reply = c.send(r#"{"execute": "qmp_capabilities"}"#).await;
        assert_eq!(
            reply["error"]["desc"],
            "Capabilities negotiation is already complete, command ignored"
        );
    }

    #[tokio::test]
    async fn validated_arguments_reach_the_handler() {
        let mut c = Client::start(EventBus::new()).await;
        c.send(r#"{"execute": "qmp_capabilities"}"#).await;
        let reply = c
            .send(r#"{"execute": "job-pause", "arguments": {"id": "j"}, "id": [1]}"#)
            .await;
        assert_eq!(
            reply["return"],
            json!({"command": "job-pause", "args": {"id": "j"}})
        );
        assert_eq!(reply["id"], json!([1]));
    }

    #[tokio::test]
    async fn invalid_arguments_never_reach_the_handler() {
        let mut c = Client::start(EventBus::new()).await;
        c.send(r#"{"execute": "qmp_capabilities"}"#).await;
        let reply = c
            .send(r#"{"execute": "job-pause", "arguments": {"id": 1}}"#)
            .await;
        assert_eq!(
            reply["error"]["desc"],
            "Invalid parameter type for 'id', expected: string"
        );
    }

    #[tokio::test]
    async fn request_shape_errors_use_qemus_texts() {
        let mut c = Client::start(EventBus::new()).await;
        let reply = c.send("[1]").await;
        assert_eq!(reply["error"]["desc"], "QMP input must be a JSON object");
        let reply = c.send(r#"{"execute": 1}"#).await;
        assert_eq!(
            reply["error"]["desc"],
            "QMP input member 'execute' must be a string"
        );
        let reply = c.send(r#"{"arguments": {}}"#).await;
        assert_eq!(reply["error"]["desc"], "QMP input lacks member 'execute'");
        let reply = c.send(r#"{"execute": "quit", "foo": 1}"#).await;
        assert_eq!(
            reply["error"]["desc"],
            "QMP input member 'foo' is unexpected"
        );
        let reply = c.send(r#"{"exec-oob": "quit"}"#).await;
        assert_eq!(
            reply["error"]["desc"],
            "QMP input member 'exec-oob' is unexpected"
        );
    }

    #[tokio::test]
    async fn exec_oob_is_refused_for_every_command_once_enabled() {
        let mut c = Client::start(EventBus::new()).await;
        c.send(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#)
            .await;
        let reply = c.send(r#"{"exec-oob": "query-jobs", "id": "x"}"#).await;
        assert_eq!(
            reply["error"]["desc"],
            "The command query-jobs does not support OOB"
        );
    }

    #[tokio::test]
    async fn unknown_commands_are_not_found() {
        let mut c = Client::start(EventBus::new()).await;
        c.send(r#"{"execute": "qmp_capabilities"}"#).await;
        let reply = c.send(r#"{"execute": "block-commit"}"#).await;
        assert_eq!(reply["error"]["class"], "CommandNotFound");
        assert_eq!(
            reply["error"]["desc"],
            "The command block-commit has not been found"
        );
    }

    #[tokio::test]
    async fn events_a_command_causes_come_before_its_reply() {
        let bus = EventBus::new();
        let mut c = Client::start(bus).await;
        c.send(r#"{"execute": "qmp_capabilities"}"#).await;
        let first = c.send(r#"{"execute": "query-jobs"}"#).await;
        assert_eq!(first["event"], "JOB_STATUS_CHANGE");
        assert!(first["timestamp"]["seconds"].is_i64());
        let reply = c.read().await;
        assert_eq!(reply["return"]["command"], "query-jobs");
    }

    #[tokio::test]
    async fn sessions_still_negotiating_get_no_events() {
        let bus = EventBus::new();
        let mut quiet = Client::start(bus.clone()).await;
        bus.emit(Event::new("JOB_STATUS_CHANGE", None));
        let reply = quiet.send(r#"{"execute": "qmp_capabilities"}"#).await;
        assert_eq!(reply, json!({"return": {}}));
    }

    #[tokio::test]
    async fn malformed_json_is_answered_and_the_session_survives() {
        let mut c = Client::start(EventBus::new()).await;
        let reply = c.send("{\"execute\": }").await;
        assert_eq!(reply["error"]["desc"], "JSON parse error, expecting value");
        assert!(reply.get("id").is_none());
        assert_eq!(
            c.send(r#"{"execute": "qmp_capabilities"}"#).await,
            json!({"return": {}})
        );
    }
}
