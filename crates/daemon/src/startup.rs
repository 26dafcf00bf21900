//! From the command line to a running daemon, and back down at the end.

use crate::chardev::{self, Chardev, ChardevSpec};
use crate::cli::{Cli, ItemKind, MonitorSpec, OptValue};
use crate::control::{self, Exit, State};
use crate::daemonize::Readiness;
use crate::pidfile::PidFile;
use block::BlockdevOptions;
use qapi::visit::{self, Mode};
use qmp::{EventBus, SessionOptions};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs the daemon described by `cli` until it is told to stop.
pub async fn run(cli: Cli, readiness: Option<Readiness>) -> ExitCode {
    if let Err(err) = crate::commands::check_against_schema() {
        eprintln!("blockd: internal error: {err}");
        return ExitCode::from(1);
    }
    let events = EventBus::new();
    let (mut state, notices) = State::new(events.clone());
    let (handle, requests, mut quit_replied) = control::channel();
    let handler: Arc<dyn qmp::Handler> = Arc::new(handle);
    let mut specs: Vec<ChardevSpec> = Vec::new();
    let mut chardevs: HashMap<String, Chardev> = HashMap::new();
    let mut monitors = tokio::task::JoinSet::new();

    for item in &cli.items {
        for warning in item.warnings() {
            eprintln!("blockd: {warning}");
        }
        let result = match &item.kind {
            ItemKind::Chardev(spec) => {
                if let Some(err) = spec.conflict(specs.iter()) {
                    Err(err.to_string())
                } else {
                    if let Some(info) = spec.waiting_info() {
                        eprintln!("blockd: {}: {info}", item.location);
                    }
                    match chardev::open(spec).await {
                        Ok(dev) => {
                            chardevs.insert(spec.id.clone(), dev);
                            specs.push(spec.clone());
                            Ok(())
                        }
                        Err(err) => Err(err.to_string()),
                    }
                }
            }
            ItemKind::ChardevHelp { text, success } => {
                print!("{text}");
                return if *success {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                };
            }
            ItemKind::ObjectHelp { qom_type } => {
                print!("{}", crate::object::help(qom_type.as_deref()));
                return ExitCode::SUCCESS;
            }
            ItemKind::Trace => Ok(()),
            ItemKind::Invalid(err) => {
                eprintln!("blockd: {err}");
                return abort(readiness, &mut state).await;
            }
            // QSD looks the chardev up before it checks the mode.
            ItemKind::Monitor(spec)
                if spec.readline && specs.iter().any(|s| s.id == spec.chardev) =>
            {
                Err("Only QMP is supported".to_string())
            }
            ItemKind::Monitor(spec) => match chardevs.remove(&spec.chardev) {
                Some(dev) => {
                    monitors.spawn(monitor(dev, spec.clone(), handler.clone(), events.clone()));
                    Ok(())
                }
                None if specs.iter().any(|s| s.id == spec.chardev) => {
                    Err(crate::cli::chardev_in_use(&spec.chardev))
                }
                None => Err(crate::cli::chardev_not_found(&spec.chardev)),
            },
            ItemKind::Blockdev(value) => blockdev(&mut state, value).await,
            ItemKind::Object(value) => object(&mut state, value),
            ItemKind::NbdServer(value) => nbd_server(&mut state, value).await,
            ItemKind::Export(value) => export(&mut state, value),
        };
        if let Err(msg) = result {
            eprintln!("blockd: {}", item.error(msg));
            return abort(readiness, &mut state).await;
        }
    }
    if let Some(line) = &cli.announce {
        println!("{line}");
    }

    let _pidfile = match &cli.pidfile {
        Some(path) => match PidFile::create(path) {
            Ok(p) => Some(p),
            Err(err) => {
                eprintln!("blockd: {err}");
                state.graph.close_all().await;
                if let Some(r) = readiness {
                    r.failed();
                }
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    if let Some(r) = readiness {
        if r.ready().is_err() {
            return ExitCode::from(1);
        }
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    let exit = control::run(state, notices, requests, shutdown).await;
    if let Exit::Quit = exit {
        // Let the session that sent `quit` write its reply before the process ends.
        let _ = tokio::time::timeout(Duration::from_secs(5), quit_replied.recv()).await;
    }
    monitors.abort_all();
    drop(chardevs);
    ExitCode::SUCCESS
}

/// Start-up failed: undo what was set up and tell a waiting parent.
async fn abort(readiness: Option<Readiness>, state: &mut State) -> ExitCode {
    state.graph.close_all().await;
    if let Some(r) = readiness {
        r.failed();
    }
    ExitCode::from(1)
}

/// `--blockdev`: exactly `blockdev-add`.
async fn blockdev(state: &mut State, value: &OptValue) -> Result<(), String> {
    let (value, mode) = match value {
        OptValue::Keyval(v) => (v, Mode::Keyval),
        OptValue::Json(v) => (v, Mode::Json),
    };
    let canonical = visit::visit("BlockdevOptions", value, mode)?;
    let opts: BlockdevOptions = serde_json::from_value(canonical).map_err(|e| e.to_string())?;
    state
        .graph
        .add(opts)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn canonical(ty: &str, value: &OptValue) -> Result<serde_json::Value, String> {
    let (value, mode) = match value {
        OptValue::Keyval(v) => (v, Mode::Keyval),
        OptValue::Json(v) => (v, Mode::Json),
    };
    visit::visit(ty, value, mode)
}

/// `--nbd-server`: `nbd-server-start` with a flat `SocketAddress`.
async fn nbd_server(state: &mut State, value: &OptValue) -> Result<(), String> {
    let opts = canonical("NbdServerOptions", value)?;
    let listen = crate::commands::nbd::listen_addr(&opts["addr"], false)?;
    let tls = opts.get("tls-creds").and_then(serde_json::Value::as_str);
    let authz = opts.get("tls-authz").and_then(serde_json::Value::as_str);
    let max = opts
        .get("max-connections")
        .and_then(serde_json::Value::as_u64)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    crate::commands::nbd::start_server(state, &listen, tls, authz, max).await
}

/// `--export`: exactly `block-export-add`.
fn export(state: &mut State, value: &OptValue) -> Result<(), String> {
    let opts = canonical("BlockExportOptions", value)?;
    let args = serde_json::from_value(opts).map_err(|e| e.to_string())?;
    crate::commands::nbd::add_export(state, args)
}

/// `--object`: exactly `object-add`, with QEMU's hint under a bad id.
fn object(state: &mut State, value: &OptValue) -> Result<(), String> {
    let canonical = canonical("ObjectOptions", value)?;
    state.objects.add(&canonical).map_err(|err| match err.hint {
        Some(hint) => format!("{}\n{hint}", err.message),
        None => err.message,
    })
}

/// Serves a monitor's clients one after another, as QEMU's socket chardev does.
async fn monitor(
    mut dev: Chardev,
    spec: MonitorSpec,
    handler: Arc<dyn qmp::Handler>,
    events: EventBus,
) {
    let opts = SessionOptions {
        pretty: spec.pretty,
        package: crate::PACKAGE.to_string(),
    };
    while let Ok(Some(conn)) = dev.accept().await {
        qmp::serve(conn, opts.clone(), handler.clone(), events.clone()).await;
    }
}

/// SIGINT, SIGTERM and SIGHUP shut down like `quit`.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("blockd: cannot watch for signals");
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
    shutdown.cancel();
}
