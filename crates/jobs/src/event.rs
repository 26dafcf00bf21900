//! Events the job engine emits, with QMP's names and members (`qapi/job.json`,
//! `qapi/block-core.json`), so the daemon forwards them unchanged.

use serde_json::{json, Map, Value};

use crate::{JobStatus, JobType};

/// What a block job's I/O was doing when it failed (`IoOperationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOperation {
    /// A read failed.
    Read,
    /// A write failed.
    Write,
}

impl IoOperation {
    /// The QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// What a block job does about an I/O error (`BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Retry the request.
    Ignore,
    /// Fail the job with the error.
    Report,
    /// Pause the job (a user pause); retry after `job-resume`.
    Stop,
}

impl ErrorAction {
    /// The QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
        }
    }
}

/// The common members of `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED` and `BLOCK_JOB_READY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockJobSnapshot {
    /// The job type.
    pub job_type: JobType,
    /// The job id (QSD reports it as `device`).
    pub device: String,
    /// Progress total.
    pub len: u64,
    /// Progress so far.
    pub offset: u64,
    /// Rate limit in bytes/s, 0 = unlimited.
    pub speed: u64,
}

/// One event, emitted by [`crate::JobManager`] at the moment QEMU emits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// `JOB_STATUS_CHANGE`.
    StatusChange {
        /// The job id.
        id: String,
        /// The new status.
        status: JobStatus,
    },
    /// `BLOCK_JOB_COMPLETED`; `error` only when the job failed.
    BlockJobCompleted {
        /// Type, device, len, offset, speed.
        info: BlockJobSnapshot,
        /// The failure text.
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED`.
    BlockJobCancelled(BlockJobSnapshot),
    /// `BLOCK_JOB_READY`.
    BlockJobReady(BlockJobSnapshot),
    /// `BLOCK_JOB_PENDING`.
    BlockJobPending {
        /// The job type.
        job_type: JobType,
        /// The job id.
        id: String,
    },
    /// `BLOCK_JOB_ERROR`.
    BlockJobError {
        /// The job id.
        device: String,
        /// The failed operation.
        operation: IoOperation,
        /// What the job does about it.
        action: ErrorAction,
    },
}

impl JobEvent {
    /// The QMP event name.
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::StatusChange { .. } => "JOB_STATUS_CHANGE",
            JobEvent::BlockJobCompleted { .. } => "BLOCK_JOB_COMPLETED",
            JobEvent::BlockJobCancelled(_) => "BLOCK_JOB_CANCELLED",
            JobEvent::BlockJobReady(_) => "BLOCK_JOB_READY",
            JobEvent::BlockJobPending { .. } => "BLOCK_JOB_PENDING",
            JobEvent::BlockJobError { .. } => "BLOCK_JOB_ERROR",
        }
    }

    /// The event's `data` member, with QEMU's member names and order.
    pub fn data(&self) -> Value {
        match self {
            JobEvent::StatusChange { id, status } => {
                json!({ "id": id, "status": status.as_str() })
            }
            JobEvent::BlockJobCompleted { info, error } => {
                let mut data = snapshot_data(info);
                if let Some(error) = error {
                    data.insert("error".into(), Value::from(error.clone()));
                }
                Value::Object(data)
            }
            JobEvent::BlockJobCancelled(info) | JobEvent::BlockJobReady(info) => {
                Value::Object(snapshot_data(info))
            }
            JobEvent::BlockJobPending { job_type, id } => {
                json!({ "type": job_type.as_str(), "id": id })
            }
            JobEvent::BlockJobError {
                device,
                operation,
                action,
            } => json!({
                "device": device,
                "operation": operation.as_str(),
                "action": action.as_str(),
            }),
        }
    }
}

fn snapshot_data(info: &BlockJobSnapshot) -> Map<String, Value> {
    let mut data = Map::new();
    data.insert("type".into(), Value::from(info.job_type.as_str()));
    data.insert("device".into(), Value::from(info.device.clone()));
    data.insert("len".into(), Value::from(info.len));
    data.insert("offset".into(), Value::from(info.offset));
    data.insert("speed".into(), Value::from(info.speed));
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> BlockJobSnapshot {
        BlockJobSnapshot {
            job_type: JobType::Backup,
            device: "j1".into(),
            len: 100,
            offset: 40,
            speed: 0,
        }
    }

    #[test]
    fn status_change_data_has_id_and_status() {
        let event = JobEvent::StatusChange {
            id: "j1".into(),
            status: JobStatus::Running,
        };
        assert_eq!(event.name(), "JOB_STATUS_CHANGE");
        assert_eq!(event.data(), json!({"id": "j1", "status": "running"}));
    }

    #[test]
    fn completed_data_carries_error_only_when_failed() {
        let ok = JobEvent::BlockJobCompleted {
            info: snapshot(),
            error: None,
        };
        let failed = JobEvent::BlockJobCompleted {
            info: snapshot(),
            error: Some("Input/output error".into()),
        };
        assert_eq!(
            ok.data(),
            json!({"type": "backup", "device": "j1", "len": 100, "offset": 40, "speed": 0})
        );
        assert_eq!(failed.data()["error"], "Input/output error");
    }

    #[test]
    fn pending_data_has_type_and_id() {
        let event = JobEvent::BlockJobPending {
            job_type: JobType::Mirror,
            id: "m".into(),
        };
        assert_eq!(event.name(), "BLOCK_JOB_PENDING");
        assert_eq!(event.data(), json!({"type": "mirror", "id": "m"}));
    }

    #[test]
    fn error_data_names_operation_and_action() {
        let event = JobEvent::BlockJobError {
            device: "j1".into(),
            operation: IoOperation::Write,
            action: ErrorAction::Stop,
        };
        assert_eq!(
            event.data(),
            json!({"device": "j1", "operation": "write", "action": "stop"})
        );
    }
}
