//! The control task: the single owner of the block graph, the job table and
//! the user-creatable objects.
//!
//! Every QMP command, every job notice and every shutdown request runs here,
//! one at a time. Monitor sessions reach it through [`ControlHandle`], which
//! implements the QMP [`qmp::Handler`]. I/O never passes through this task:
//! exports and job workers hold node handles and do I/O directly.

use crate::commands;
use async_trait::async_trait;
use block::BlockGraph;
use jobs::{JobManager, NoticeReceiver};
use qapi::QmpError;
use qmp::{Event, EventBus};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// Everything the control task owns.
pub struct State {
    pub graph: BlockGraph,
    pub jobs: JobManager<BlockGraph>,
    /// The NBD server and the block exports.
    pub exports: crate::exports::Exports,
    /// Where events go (the jobs' own sink emits there too).
    pub events: EventBus,
    /// User-creatable objects (`--object`, `object-add`) by id.
    pub objects: crate::object::Objects,
    /// Set by `quit`: the loop ends once the reply is on its way.
    pub quit: bool,
}

/// A command for the control task.
pub struct Request {
    pub command: String,
    pub args: Value,
    pub reply: oneshot::Sender<Result<Value, QmpError>>,
}

/// The monitors' way into the control task.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Request>,
    quit_replied: mpsc::UnboundedSender<()>,
}

#[async_trait]
impl qmp::Handler for ControlHandle {
    async fn execute(&self, command: &str, args: Value) -> Result<Value, QmpError> {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            command: command.to_string(),
            args,
            reply,
        };
        if self.tx.send(req).await.is_err() {
            return Err(QmpError::generic("blockd is shutting down"));
        }
        rx.await
            .unwrap_or_else(|_| Err(QmpError::generic("blockd is shutting down")))
    }

    fn replied(&self, command: &str) {
        if command == "quit" {
            let _ = self.quit_replied.send(());
        }
    }
}

/// Why the control loop ended.
pub enum Exit {
    /// `quit`: the caller waits for its reply to be written, then exits.
    Quit,
    /// A signal asked for shutdown.
    Signal,
}

impl State {
    pub fn new(events: EventBus) -> (State, NoticeReceiver) {
        let sink = events.clone();
        let (jobs, notices) = JobManager::new(Box::new(move |ev: jobs::JobEvent| {
            sink.emit(Event::new(ev.name(), Some(ev.data())));
        }));
        let state = State {
            graph: BlockGraph::new(),
            jobs,
            exports: crate::exports::Exports::default(),
            events,
            objects: crate::object::Objects::default(),
            quit: false,
        };
        (state, notices)
    }
}

/// Creates the channel into the control task.
pub fn channel() -> (
    ControlHandle,
    mpsc::Receiver<Request>,
    mpsc::UnboundedReceiver<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let (quit_tx, quit_rx) = mpsc::unbounded_channel();
    (
        ControlHandle {
            tx,
            quit_replied: quit_tx,
        },
        rx,
        quit_rx,
    )
}

/// Runs commands and job notices until `quit` or a shutdown signal, then
/// shuts the graph down in QSD's order: jobs cancelled, nodes closed.
pub async fn run(
    mut state: State,
    mut notices: NoticeReceiver,
    mut requests: mpsc::Receiver<Request>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Exit {
    let exit = loop {
        tokio::select! {
            req = requests.recv() => {
                let Some(req) = req else { break Exit::Signal };
                let result = if req.command == "quit" {
                    shut_down(&mut state, &mut notices).await;
                    state.quit = true;
                    Ok(Value::Object(Default::default()))
                } else {
                    commands::execute(&mut state, &req.command, req.args).await
                };
                state.graph.reap().await;
                // The client may have gone: the answer is then dropped.
                let _ = req.reply.send(result);
                if state.quit {
                    break Exit::Quit;
                }
            }
            Some(notice) = notices.recv() => {
                state.jobs.handle_notice(notice, &mut state.graph);
                state.graph.reap().await;
            }
            () = shutdown.cancelled() => {
                shut_down(&mut state, &mut notices).await;
                break Exit::Signal;
            }
        }
    };
    exit
}

async fn shut_down(state: &mut State, notices: &mut NoticeReceiver) {
    state.jobs.shutdown(notices, &mut state.graph).await;
    // Clients are dropped and exports let go of their nodes before the nodes close.
    crate::commands::nbd::stop_server(state);
    state.graph.close_all().await;
}
