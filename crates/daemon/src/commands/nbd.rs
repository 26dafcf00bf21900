//! NBD server and block export commands: `nbd-server-start`, `nbd-server-stop`,
//! `block-export-add`, `block-export-del`, `query-block-exports`, and the older
//! `nbd-server-add` / `nbd-server-remove`, with QEMU's checks and messages.

use std::path::PathBuf;
use std::sync::Arc;

use block::dirty::{Check, NodeBitmap};
use block::{Node, Perm};
use qapi::QmpError;
use qmp::Event;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, bitmap, empty, Reply};
use crate::control::State;
use crate::exports::{self, ExportRecord, Listen, NodeBackend};

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ServerArgs {
    addr: Value,
    tls_creds: Option<String>,
    tls_authz: Option<String>,
    max_connections: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExportArgs {
    pub id: String,
    pub node_name: String,
    pub writable: Option<bool>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub bitmaps: Option<Vec<Value>>,
    pub allocation_depth: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct AddArgs {
    device: String,
    name: Option<String>,
    description: Option<String>,
    writable: Option<bool>,
    bitmap: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct DelArgs {
    id: Option<String>,
    name: Option<String>,
    mode: Option<String>,
}

/// The listening address from a `SocketAddress` (flat, `legacy` false) or a
/// `SocketAddressLegacy` (the members under `data`).
pub fn listen_addr(addr: &Value, legacy: bool) -> Result<Listen, String> {
    let ty = addr.get("type").and_then(Value::as_str).unwrap_or_default();
    let body = if legacy { addr.get("data") } else { Some(addr) };
    let field = |name: &str| {
        body.and_then(|b| b.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    match ty {
        "unix" => Ok(Listen::Unix(PathBuf::from(
            field("path").unwrap_or_default(),
        ))),
        "inet" => Ok(Listen::Tcp {
            host: field("host").unwrap_or_default(),
            port: field("port").unwrap_or_default(),
        }),
        other => Err(format!(
            "blockd serves NBD on unix and inet sockets only, not '{other}'"
        )),
    }
}

/// `nbd-server-start` and `--nbd-server`.
pub async fn start_server(
    state: &mut State,
    listen: &Listen,
    tls_creds: Option<&str>,
    tls_authz: Option<&str>,
    max_connections: Option<u32>,
) -> Result<(), String> {
    if state.exports.nbd.is_some() {
        return Err("NBD server already running".into());
    }
    let tls = match tls_creds {
        Some(id) => Some(server_tls(state, id, tls_authz)?),
        None => None,
    };
    let server = exports::start(listen, max_connections.unwrap_or(100), tls).await?;
    state.exports.nbd = Some(server);
    Ok(())
}

/// The NBD server's TLS from credentials object `id` (a server endpoint) and, for x509
/// client certificates, authorization object `authz`.
fn server_tls(state: &State, id: &str, authz: Option<&str>) -> Result<nbd::Tls, String> {
    let creds = state.objects.tls_creds(id)?;
    if creds.endpoint() != tls::Endpoint::Server {
        return Err("Expecting TLS credentials with a server endpoint".into());
    }
    let authz = authz.map(|a| state.objects.authz(a)).transpose()?;
    let acceptor = creds.acceptor().map_err(|e| e.to_string())?;
    let check: nbd::PeerCheck = Arc::new(move |ssl| {
        creds
            .check_peer(ssl, authz.as_deref())
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    Ok(nbd::Tls { acceptor, check })
}

pub fn nbd_server_start(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: ServerArgs = args(a)?;
        let listen = listen_addr(&a.addr, true).map_err(QmpError::generic)?;
        start_server(
            state,
            &listen,
            a.tls_creds.as_deref(),
            a.tls_authz.as_deref(),
            a.max_connections,
        )
        .await
        .map_err(QmpError::generic)?;
        Ok(empty())
    })
}

fn not_running() -> QmpError {
    QmpError::generic("NBD server not running")
}

/// Removes every export (newest first, each with its event) and stops the server.
pub fn stop_server(state: &mut State) {
    let ids: Vec<String> = state.exports.list.keys().rev().cloned().collect();
    for id in ids {
        delete(state, &id, true);
    }
    state.exports.nbd = None;
}

pub fn nbd_server_stop(state: &mut State, _a: Value) -> Reply<'_> {
    Box::pin(async move {
        if state.exports.nbd.is_none() {
            return Err(not_running());
        }
        stop_server(state);
        Ok(empty())
    })
}

/// `block-export-add` and `--export`, in QEMU's order of checks.
pub fn add_export(state: &mut State, a: ExportArgs) -> Result<(), String> {
    if state.exports.list.contains_key(&a.id) {
        return Err(format!("Block export id '{}' is already in use", a.id));
    }
    if state.graph.get(&a.node_name).is_none() {
        return Err(format!(
            "Cannot find device='' nor node-name='{}'",
            a.node_name
        ));
    }
    let writable = a.writable.unwrap_or(false);
    if writable
        && state
            .graph
            .get(&a.node_name)
            .is_some_and(|n| n.is_read_only())
    {
        return Err("Cannot export read-only node as writable".into());
    }
    let Some(nbd) = &state.exports.nbd else {
        return Err("NBD server not running".into());
    };
    let name = a.name.clone().unwrap_or_else(|| a.node_name.clone());
    if nbd.server.export_names().contains(&name) {
        return Err(format!("NBD server already has export named '{name}'"));
    }
    if name.len() > nbd::proto::MAX_STRING {
        return Err(format!("export name '{name}' too long"));
    }
    if a.description
        .as_ref()
        .is_some_and(|d| d.len() > nbd::proto::MAX_STRING)
    {
        return Err("description too long".into());
    }
    let bitmaps = export_bitmaps(state, &a, writable)?;
    let perm = if writable {
        Perm::CONSISTENT_READ | Perm::WRITE
    } else {
        Perm::CONSISTENT_READ
    };
    let shared = Perm::ALL & !Perm::RESIZE;
    let serving = state
        .graph
        .attach(&a.node_name, perm, shared, "")
        .map_err(|e| e.to_string())?;
    let user = serving.handle();
    let export = nbd::Export {
        name: name.clone(),
        description: a.description.clone(),
        writable,
        allocation_depth: a.allocation_depth.unwrap_or(false),
        bitmaps: bitmaps.iter().map(|b| b.name().to_string()).collect(),
        backend: Arc::new(NodeBackend {
            user: serving,
            bitmaps: bitmaps.clone(),
        }),
    };
    // Busy only once nothing can fail: the backend's drop frees them.
    for bitmap in &bitmaps {
        bitmap.lock().busy = true;
    }
    nbd.server
        .add_export(export)
        .map_err(|_| format!("NBD server already has export named '{name}'"))?;
    state.exports.list.insert(
        a.id.clone(),
        ExportRecord {
            id: a.id,
            node_name: a.node_name,
            user: Some(user),
            name,
        },
    );
    Ok(())
}

/// The bitmaps export `a` offers, checked as QEMU checks them: a bare name is looked for
/// on the exported node and down its backing (or filtered) chain, `{node, name}` on any
/// node; busy and inconsistent bitmaps are refused, and so is an enabled bitmap found by
/// its bare name on a writable node when the export is read-only (QEMU lets the
/// `{node, name}` form through).
fn export_bitmaps(
    state: &State,
    a: &ExportArgs,
    writable: bool,
) -> Result<Vec<Arc<NodeBitmap>>, String> {
    let mut found = Vec::new();
    for spec in a.bitmaps.iter().flatten() {
        let (changing, bitmap) = match spec {
            Value::String(name) => {
                let (node, bitmap) = chain_bitmap(state, &a.node_name, name)
                    .ok_or_else(|| format!("Bitmap '{name}' is not found"))?;
                (!node.is_read_only(), bitmap)
            }
            other => {
                let field = |f: &str| other.get(f).and_then(Value::as_str).unwrap_or_default();
                let (_, bitmap) = bitmap::lookup(&state.graph, field("node"), field("name"))
                    .map_err(|e| e.desc)?;
                (false, bitmap)
            }
        };
        if changing && !writable && bitmap.lock().enabled {
            return Err(format!(
                "Enabled bitmap '{}' incompatible with readonly export",
                bitmap.name()
            ));
        }
        bitmap.check(Check::BusyInconsistent)?;
        found.push(bitmap);
    }
    Ok(found)
}

/// Bitmap `name` on node `top` or the first node below it (backing or filtered child)
/// that has one.
fn chain_bitmap(state: &State, top: &str, name: &str) -> Option<(Arc<Node>, Arc<NodeBitmap>)> {
    let mut node = state.graph.get(top);
    while let Some(n) = node {
        if let Some(bitmap) = n.bitmaps().get(name) {
            return Some((n, bitmap));
        }
        node = n.backing().or_else(|| n.filtered());
    }
    None
}

pub fn block_export_add(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: ExportArgs = args(a)?;
        add_export(state, a).map_err(QmpError::generic)?;
        Ok(empty())
    })
}

pub fn nbd_server_add(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: AddArgs = args(a)?;
        let name = a.name.clone().unwrap_or_else(|| a.device.clone());
        let export = ExportArgs {
            id: name.clone(),
            node_name: a.device,
            writable: a.writable,
            name: Some(name),
            description: a.description,
            bitmaps: a.bitmap.map(|b| vec![Value::from(b)]),
            allocation_depth: None,
        };
        if state.exports.nbd.is_none() {
            return Err(not_running());
        }
        if state.graph.get(&export.node_name).is_none() {
            let d = &export.node_name;
            return Err(QmpError::generic(format!(
                "Cannot find device='{d}' nor node-name='{d}'"
            )));
        }
        add_export(state, export).map_err(QmpError::generic)?;
        Ok(empty())
    })
}

/// Drops export `id` and emits `BLOCK_EXPORT_DELETED`.
fn delete(state: &mut State, id: &str, hard: bool) {
    let Some(record) = state.exports.list.shift_remove(id) else {
        return;
    };
    if let Some(nbd) = &state.exports.nbd {
        let _ = nbd.server.remove_export(&record.name, hard);
    }
    drop(record);
    state
        .events
        .emit(Event::new("BLOCK_EXPORT_DELETED", Some(json!({"id": id}))));
}

fn remove(state: &mut State, id: &str, mode: Option<&str>) -> Result<(), QmpError> {
    let Some(record) = state.exports.list.get(id) else {
        return Err(QmpError::generic(format!("Export '{id}' is not found")));
    };
    let hard = mode == Some("hard");
    if !hard {
        if let Some(nbd) = &state.exports.nbd {
            if nbd.server.in_use(&record.name) {
                return Err(QmpError::generic(format!("export '{id}' still in use")));
            }
        }
    }
    delete(state, id, hard);
    Ok(())
}

pub fn block_export_del(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: DelArgs = args(a)?;
        let id = a.id.unwrap_or_default();
        remove(state, &id, a.mode.as_deref())?;
        Ok(empty())
    })
}

pub fn nbd_server_remove(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: DelArgs = args(a)?;
        let name = a.name.unwrap_or_default();
        let id = state
            .exports
            .list
            .values()
            .find(|r| r.name == name)
            .map(|r| r.id.clone())
            .unwrap_or(name);
        remove(state, &id, a.mode.as_deref())?;
        Ok(empty())
    })
}

pub fn query_block_exports(state: &mut State, _a: Value) -> Reply<'_> {
    Box::pin(async move {
        let list: Vec<Value> = state
            .exports
            .list
            .values()
            .rev()
            .map(|r| {
                json!({
                    "id": r.id,
                    "type": "nbd",
                    "node-name": r.user.as_ref().and_then(|u| u.node())
                        .map_or_else(|| r.node_name.clone(), |n| n.name().to_string()),
                    "shutting-down": false
                })
            })
            .collect();
        Ok(Value::Array(list))
    })
}
