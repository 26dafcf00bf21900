//! Job status, client verbs and job types, with QEMU's transition and verb tables.
//!
//! The tables follow QEMU 10.0's `JobSTT` and `JobVerbTable` (`job.c`); the names are those of
//! `qapi/job.json`.

use std::fmt;

/// The status of a job (`JobStatus` in `qapi/job.json`). The order is QEMU's index order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Never seen by clients; the status before creation.
    Undefined,
    /// Created but not started.
    Created,
    /// The worker is running.
    Running,
    /// Paused at a pause point (was running).
    Paused,
    /// Ready to be completed (mirror, active commit).
    Ready,
    /// Paused at a pause point (was ready).
    Standby,
    /// Finished successfully, waiting for the other jobs of its transaction.
    Waiting,
    /// Every job of the transaction finished; waiting to be finalized.
    Pending,
    /// Failed or cancelled; waiting for its transaction to be aborted.
    Aborting,
    /// Finalized; waiting to be dismissed.
    Concluded,
    /// Dismissed: the job is gone.
    Null,
}

impl JobStatus {
    /// Every status, in QEMU's index order.
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// The name QMP uses for this status.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether a job may move from `self` to `to` (QEMU asserts on anything else).
    pub fn can_transition_to(self, to: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Undefined => to == Created,
            Created => matches!(to, Running | Aborting | Null),
            Running => matches!(to, Paused | Ready | Waiting | Aborting),
            Paused => to == Running,
            Ready => matches!(to, Standby | Waiting | Aborting),
            Standby => to == Ready,
            Waiting => matches!(to, Pending | Aborting),
            Pending => matches!(to, Aborting | Concluded),
            Aborting => matches!(to, Aborting | Concluded),
            Concluded => to == Null,
            Null => false,
        }
    }

    /// Whether a client verb is accepted in this status.
    pub fn allows(self, verb: JobVerb) -> bool {
        use JobStatus::*;
        match verb {
            JobVerb::Cancel => !matches!(self, Undefined | Aborting | Concluded | Null),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => {
                matches!(self, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(self, Ready | Standby),
            JobVerb::Finalize => self == Pending,
            JobVerb::Dismiss => self == Concluded,
        }
    }

    /// Whether the job's work is over (`job_is_completed` in QEMU): waiting or later.
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for JobStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A client command applied to a job (`JobVerb` in `qapi/job.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobVerb {
    /// `job-cancel`, `block-job-cancel`.
    Cancel,
    /// `job-pause`, `block-job-pause`.
    Pause,
    /// `job-resume`, `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete`, `block-job-complete`.
    Complete,
    /// `job-dismiss`, `block-job-dismiss`.
    Dismiss,
    /// `job-finalize`, `block-job-finalize`.
    Finalize,
    /// `block-job-change`.
    Change,
}

impl JobVerb {
    /// Every verb, in QEMU's index order.
    pub const ALL: [JobVerb; 8] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Complete,
        JobVerb::Dismiss,
        JobVerb::Finalize,
        JobVerb::Change,
    ];

    /// The name QMP uses for this verb.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Finalize => "finalize",
            JobVerb::Change => "change",
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of a job (`JobType` in `qapi/job.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobType {
    /// `block-commit`.
    Commit,
    /// `block-stream`.
    Stream,
    /// `blockdev-mirror`, `drive-mirror`.
    Mirror,
    /// `blockdev-backup`, `drive-backup`.
    Backup,
    /// `blockdev-create`.
    Create,
    /// `x-blockdev-amend`.
    Amend,
    /// `snapshot-load` (not in QSD).
    SnapshotLoad,
    /// `snapshot-save` (not in QSD).
    SnapshotSave,
    /// `snapshot-delete` (not in QSD).
    SnapshotDelete,
}

impl JobType {
    /// The name QMP uses for this type.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
            JobType::Create => "create",
            JobType::Amend => "amend",
            JobType::SnapshotLoad => "snapshot-load",
            JobType::SnapshotSave => "snapshot-save",
            JobType::SnapshotDelete => "snapshot-delete",
        }
    }

    /// Whether jobs of this type are block jobs: listed by `query-block-jobs`, addressed by
    /// `block-job-*` and announced with `BLOCK_JOB_*` events.
    pub fn is_block_job(self) -> bool {
        matches!(
            self,
            JobType::Commit | JobType::Stream | JobType::Mirror | JobType::Backup
        )
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for JobType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests;
