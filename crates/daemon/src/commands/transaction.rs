//! `transaction`: a list of actions that happen all together or not at all.
//!
//! Every node is drained for the whole transaction. Each action is prepared in order (its
//! undo record is kept even when preparing fails half way); the first failure aborts every
//! prepared action, newest first, and is the command's error. When all are prepared, they
//! are committed newest first, as QEMU does. Backups are created in prepare and started in
//! commit; with `completion-mode: grouped` they share one job transaction, so one failing
//! or cancelled backup cancels the others.

use jobs::TxnId;
use qapi::QmpError;
use serde::Deserialize;
use serde_json::Value;

use super::bitmap::{self, BitmapUndo};
use super::{args, backup, empty, snapshot, Reply};
use crate::control::State;

#[derive(Deserialize)]
struct TransactionArgs {
    actions: Vec<Action>,
    properties: Option<Properties>,
}

#[derive(Deserialize)]
struct Action {
    #[serde(rename = "type")]
    kind: String,
    data: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Properties {
    completion_mode: Option<String>,
}

/// A prepared action: what commit and abort do.
enum Prepared {
    Bitmap(BitmapUndo),
    /// A created backup job, started by commit, force-cancelled by abort.
    Backup(String),
    /// An external snapshot's overlay, in place.
    Snapshot(snapshot::Prepared),
    /// An internal snapshot, taken.
    Internal(snapshot::InternalPrepared),
}

impl Prepared {
    /// Commits; returns the id of a job started paused, to resume after the section.
    fn commit(self, state: &mut State) -> Result<Option<String>, QmpError> {
        match self {
            Prepared::Bitmap(undo) => undo.commit(),
            Prepared::Snapshot(p) => p.commit(state),
            Prepared::Internal(_) => {}
            Prepared::Backup(id) => {
                backup::start_paused(state, &id)?;
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    async fn abort(self, state: &mut State) {
        match self {
            Prepared::Bitmap(undo) => undo.abort(),
            Prepared::Snapshot(p) => p.abort(state).await,
            Prepared::Internal(p) => p.abort().await,
            Prepared::Backup(id) => {
                let State { jobs, graph, .. } = state;
                // A created job cancels at once (aborting, concluded, null).
                let _ = jobs.cancel(&id, true, graph);
            }
        }
    }
}

async fn prepare(
    state: &mut State,
    action: Action,
    txn: Option<TxnId>,
) -> Result<Prepared, QmpError> {
    let data = action.data;
    Ok(match action.kind.as_str() {
        "abort" => return Err(QmpError::generic("Transaction aborted using Abort action")),
        "block-dirty-bitmap-add" => Prepared::Bitmap(bitmap::prepare_add(state, data)?),
        "block-dirty-bitmap-remove" => Prepared::Bitmap(bitmap::prepare_remove(state, data).await?),
        "block-dirty-bitmap-clear" => Prepared::Bitmap(bitmap::prepare_clear(state, data)?),
        "block-dirty-bitmap-enable" => Prepared::Bitmap(bitmap::prepare_enable(state, data)?),
        "block-dirty-bitmap-disable" => Prepared::Bitmap(bitmap::prepare_disable(state, data)?),
        "block-dirty-bitmap-merge" => Prepared::Bitmap(bitmap::prepare_merge(state, data)?),
        "blockdev-backup" => {
            Prepared::Backup(backup::prepare_blockdev_backup(state, data, txn).await?)
        }
        "drive-backup" => Prepared::Backup(backup::prepare_drive_backup(state, data, txn).await?),
        "blockdev-snapshot-internal-sync" => {
            Prepared::Internal(snapshot::prepare_internal(state, data).await?)
        }
        "blockdev-snapshot-sync" => {
            Prepared::Snapshot(snapshot::prepare_snapshot_sync(state, data).await?)
        }
        "blockdev-snapshot" => Prepared::Snapshot(snapshot::prepare_snapshot(state, data).await?),
        other => {
            return Err(QmpError::generic(format!(
                "internal error: transaction action '{other}' has no handler"
            )))
        }
    })
}

pub fn transaction(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: TransactionArgs = args(a)?;
        run(state, a).await
    })
}

/// A command that QEMU runs as a transaction of one action of its own kind (`kind`, with
/// the command's arguments as the action's data).
pub async fn single(state: &mut State, kind: &str, data: Value) -> Result<Value, QmpError> {
    let action = Action {
        kind: kind.to_string(),
        data,
    };
    let a = TransactionArgs {
        actions: vec![action],
        properties: None,
    };
    run(state, a).await
}

async fn run(state: &mut State, a: TransactionArgs) -> Result<Value, QmpError> {
    {
        let grouped = a
            .properties
            .and_then(|p| p.completion_mode)
            .is_some_and(|m| m == "grouped");
        if grouped {
            if let Some(bad) = a
                .actions
                .iter()
                .find(|x| !matches!(x.kind.as_str(), "blockdev-backup" | "drive-backup"))
            {
                return Err(QmpError::generic(format!(
                    "Action '{}' does not support transaction property completion-mode = grouped",
                    bad.kind
                )));
            }
        }
        let txn = grouped.then(|| state.jobs.new_txn());
        let drained = state.graph.drain_all().await;
        state.jobs.drain_blip(1);
        let mut prepared = Vec::new();
        let mut failure = None;
        for action in a.actions {
            match prepare(state, action, txn).await {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let result = match failure {
            Some(e) => {
                for p in prepared.into_iter().rev() {
                    p.abort(state).await;
                }
                Err(e)
            }
            None => {
                let mut result = Ok(());
                let mut started = Vec::new();
                for p in prepared.into_iter().rev() {
                    match p.commit(state) {
                        Ok(Some(id)) => started.push(id),
                        Ok(None) => {}
                        Err(e) => result = result.and(Err(e)),
                    }
                }
                for id in started {
                    let _ = state.jobs.resume_internal(&id);
                }
                result
            }
        };
        block::BlockGraph::undrain_all(drained);
        // Overlays nobody uses go now, as in QEMU.
        state.graph.reap().await;
        result.map(|()| empty())
    }
}
