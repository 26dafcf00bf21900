//! QMP command handlers, one file per command family.
//!
//! [`COMMANDS`] is the dispatch table. Its names and the commands declared in
//! the schema are one set (checked by a test and at start-up), so
//! `query-commands` and `query-qmp-schema` list exactly what is dispatched.
//! `qmp_capabilities` is the only command a monitor session answers itself.

mod backup;
mod bitmap;
mod blockdev;
mod control;
mod job;
pub mod nbd;
mod object;
mod snapshot;
mod snapshot_job;
mod transaction;

use crate::control::State;
use qapi::QmpError;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;

/// What a handler returns.
pub type Reply<'a> = Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send + 'a>>;
/// A command handler: arguments already checked against the schema.
pub type Handler = for<'a> fn(&'a mut State, Value) -> Reply<'a>;

/// Commands answered by the monitor session, not by the control task.
pub const SESSION_COMMANDS: &[&str] = &["qmp_capabilities", "quit"];

/// Every command the control task dispatches.
pub const COMMANDS: &[(&str, Handler)] = &[
    ("query-version", control::query_version),
    ("query-commands", control::query_commands),
    ("query-qmp-schema", control::query_qmp_schema),
    ("blockdev-add", blockdev::blockdev_add),
    ("blockdev-del", blockdev::blockdev_del),
    ("block_resize", blockdev::block_resize),
    ("blockdev-create", blockdev::blockdev_create),
    ("x-blockdev-amend", blockdev::x_blockdev_amend),
    ("blockdev-backup", backup::blockdev_backup),
    ("drive-backup", backup::drive_backup),
    ("nbd-server-start", nbd::nbd_server_start),
    ("nbd-server-stop", nbd::nbd_server_stop),
    ("nbd-server-add", nbd::nbd_server_add),
    ("nbd-server-remove", nbd::nbd_server_remove),
    ("block-export-add", nbd::block_export_add),
    ("block-export-del", nbd::block_export_del),
    ("query-block-exports", nbd::query_block_exports),
    ("query-named-block-nodes", blockdev::query_named_block_nodes),
    ("query-block", blockdev::query_block),
    (
        "x-debug-query-block-graph",
        blockdev::x_debug_query_block_graph,
    ),
    ("query-jobs", job::query_jobs),
    ("job-pause", job::job_pause),
    ("job-resume", job::job_resume),
    ("job-cancel", job::job_cancel),
    ("job-complete", job::job_complete),
    ("job-finalize", job::job_finalize),
    ("job-dismiss", job::job_dismiss),
    ("query-block-jobs", job::query_block_jobs),
    ("block-job-set-speed", job::block_job_set_speed),
    ("block-job-cancel", job::block_job_cancel),
    ("block-job-pause", job::block_job_pause),
    ("block-job-resume", job::block_job_resume),
    ("block-job-complete", job::block_job_complete),
    ("block-job-finalize", job::block_job_finalize),
    ("block-job-dismiss", job::block_job_dismiss),
    ("block-job-change", job::block_job_change),
    ("block-dirty-bitmap-add", bitmap::add),
    ("block-dirty-bitmap-remove", bitmap::remove),
    ("block-dirty-bitmap-clear", bitmap::clear),
    ("block-dirty-bitmap-enable", bitmap::enable),
    ("block-dirty-bitmap-disable", bitmap::disable),
    ("block-dirty-bitmap-merge", bitmap::merge),
    ("x-debug-block-dirty-bitmap-sha256", bitmap::sha256),
    ("transaction", transaction::transaction),
    ("blockdev-snapshot-sync", snapshot::blockdev_snapshot_sync),
    ("snapshot-save", snapshot_job::snapshot_save),
    ("snapshot-load", snapshot_job::snapshot_load),
    ("snapshot-delete", snapshot_job::snapshot_delete),
    ("blockdev-snapshot", snapshot::blockdev_snapshot),
    (
        "blockdev-snapshot-internal-sync",
        snapshot::blockdev_snapshot_internal_sync,
    ),
    (
        "blockdev-snapshot-delete-internal-sync",
        snapshot::blockdev_snapshot_delete_internal_sync,
    ),
    ("object-add", object::object_add),
    ("object-del", object::object_del),
];

/// Runs one command on the control task.
pub async fn execute(state: &mut State, command: &str, args: Value) -> Result<Value, QmpError> {
    match COMMANDS.iter().find(|(name, _)| *name == command) {
        Some((_, handler)) => handler(state, args).await,
        None => Err(QmpError::new(
            qapi::ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )),
    }
}

/// Checks that the dispatch table and the schema declare the same commands.
pub fn check_against_schema() -> Result<(), String> {
    let schema = qapi::schema::schema();
    for name in schema.commands.keys() {
        let dispatched =
            COMMANDS.iter().any(|(n, _)| n == name) || SESSION_COMMANDS.contains(&name.as_str());
        if !dispatched {
            return Err(format!("command {name} is declared but has no handler"));
        }
    }
    for (name, _) in COMMANDS {
        if !schema.commands.contains_key(*name) {
            return Err(format!("command {name} has a handler but no declaration"));
        }
    }
    Ok(())
}

/// Reads validated arguments into a typed struct.
pub fn args<T: DeserializeOwned>(args: Value) -> Result<T, QmpError> {
    serde_json::from_value(args).map_err(|err| {
        QmpError::generic(format!(
            "internal error: arguments do not fit their type: {err}"
        ))
    })
}

/// An empty `{}` reply.
pub fn empty() -> Value {
    Value::Object(serde_json::Map::new())
}

/// The QMP form of a block layer error.
pub fn block_error(err: block::Error) -> QmpError {
    QmpError::generic(err.to_string())
}

/// The QMP form of a job engine error.
pub fn job_error(err: jobs::JobError) -> QmpError {
    let class = match err {
        jobs::JobError::BlockJobNotFound(_) => qapi::ErrorClass::DeviceNotActive,
        _ => qapi::ErrorClass::GenericError,
    };
    QmpError::new(class, err.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn dispatch_table_matches_the_schema() {
        assert_eq!(super::check_against_schema(), Ok(()));
    }
}
