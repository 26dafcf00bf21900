//! What a job type supplies: the worker body and the control-side hooks.

use crate::{JobContext, JobType};

/// Why [`JobDriver::complete`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompleteError {
    /// The job type cannot be completed: QEMU's
    /// `The active block job '<id>' cannot be completed`.
    Unsupported,
    /// Completion failed with this text (e.g. mirror's `Node name '<n>' not found`).
    Failed(String),
}

/// One job type's behaviour. `C` is the daemon's control-side context (the graph owner); every
/// hook except [`JobDriver::run`] runs on the control task with `&mut C`.
#[async_trait::async_trait]
pub trait JobDriver<C>: Send + Sync + 'static {
    /// The job's type.
    fn job_type(&self) -> JobType;

    /// The job body, run in its own task. Call [`JobContext::pause_point`] between chunks; the
    /// error text becomes the job's `error`.
    async fn run(&self, ctx: JobContext) -> Result<(), String>;

    /// First finalization step, before `commit`/`abort`: graph changes that may fail. A failure
    /// aborts the whole transaction. Called only while the job is still successful.
    fn prepare(&self, _c: &mut C) -> Result<(), String> {
        Ok(())
    }

    /// Makes a successful job's result take effect.
    fn commit(&self, _c: &mut C) {}

    /// Undoes a failed or cancelled job.
    fn abort(&self, _c: &mut C) {}

    /// Releases what the job held, after `commit` or `abort`.
    fn clean(&self, _c: &mut C) {}

    /// Handles `job-complete` (mirror, active commit). The default refuses.
    fn complete(&self, _c: &mut C) -> Result<(), CompleteError> {
        Err(CompleteError::Unsupported)
    }

    /// Called on every cancel request; returns whether the cancel is forced. `ready` says the
    /// job is READY or STANDBY. The default treats every cancel as forced; mirror and active
    /// commit return `force` when ready, to allow a soft cancel.
    fn cancel(&self, _c: &mut C, _force: bool, _ready: bool) -> bool {
        true
    }

    /// How often QEMU drains every node while this job ends: before its completion event,
    /// and when it is dismissed. Every other running job shows a pause for each (see
    /// [`crate::JobManager::drain_blip`]).
    fn drains(&self) -> (u32, u32) {
        (0, 0)
    }

    /// Mirror only: `actively-synced` for `query-block-jobs`.
    fn actively_synced(&self) -> Option<bool> {
        None
    }
}
