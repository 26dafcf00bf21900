//! query-jobs, query-block-jobs, the job-* verbs and the legacy block-job-* verbs.

use super::{args, empty, job_error, Reply};
use crate::control::State;
use block::BlockGraph;
use jobs::{JobError, JobManager, JobVerb};
use qapi::QmpError;
use serde::Deserialize;
use serde_json::Value;

/// How a verb names its job, and which jobs it may address.
#[derive(Clone, Copy)]
enum Lookup {
    /// `job-*`: `id`, any job.
    Job,
    /// `block-job-*` taking `device`: block jobs only (`DeviceNotActive` otherwise).
    BlockDevice,
    /// `block-job-finalize`/`-dismiss`/`-change` taking `id`: block jobs only.
    BlockId,
}

#[derive(Deserialize)]
struct VerbArgs {
    id: Option<String>,
    device: Option<String>,
    speed: Option<i64>,
    force: Option<bool>,
}

type Verb =
    fn(&mut JobManager<BlockGraph>, &str, &VerbArgs, &mut BlockGraph) -> Result<(), JobError>;

/// Looks the job up as `lookup` says and applies `verb` to it.
fn verb(state: &mut State, a: Value, lookup: Lookup, verb: Verb) -> Reply<'_> {
    Box::pin(async move {
        let a: VerbArgs = args(a)?;
        let id = match lookup {
            Lookup::BlockDevice => a.device.clone(),
            Lookup::Job | Lookup::BlockId => a.id.clone(),
        }
        .unwrap_or_default();
        if !matches!(lookup, Lookup::Job) {
            state.jobs.check_block_job(&id).map_err(job_error)?;
        }
        let State { jobs, graph, .. } = state;
        verb(jobs, &id, &a, graph).map_err(job_error)?;
        Ok(empty())
    })
}

fn to_json<T: serde::Serialize>(value: T) -> Result<Value, QmpError> {
    serde_json::to_value(value).map_err(|e| QmpError::generic(e.to_string()))
}

pub fn query_jobs(state: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async move { to_json(state.jobs.query_jobs()) })
}

pub fn query_block_jobs(state: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async move { to_json(state.jobs.query_block_jobs()) })
}

pub fn job_pause(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::Job, |jobs, id, _, _| jobs.pause(id))
}

pub fn job_resume(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::Job, |jobs, id, _, _| jobs.resume(id))
}

/// `job-cancel` is always a forced cancel.
pub fn job_cancel(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::Job, |jobs, id, _, g| jobs.cancel(id, true, g))
}

pub fn job_complete(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::Job, |jobs, id, _, g| jobs.complete(id, g))
}

pub fn job_finalize(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::Job, |jobs, id, _, g| jobs.finalize(id, g))
}

pub fn job_dismiss(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::Job, |jobs, id, _, _| jobs.dismiss(id))
}

pub fn block_job_set_speed(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::BlockDevice, |jobs, id, a, _| {
        jobs.set_speed(id, a.speed.unwrap_or_default())
    })
}

/// `block-job-cancel` is a soft cancel unless `force` is set.
pub fn block_job_cancel(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::BlockDevice, |jobs, id, a, g| {
        jobs.cancel(id, a.force.unwrap_or(false), g)
    })
}

pub fn block_job_pause(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::BlockDevice, |jobs, id, _, _| jobs.pause(id))
}

pub fn block_job_resume(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::BlockDevice, |jobs, id, _, _| jobs.resume(id))
}

pub fn block_job_complete(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::BlockDevice, |jobs, id, _, g| {
        jobs.complete(id, g)
    })
}

pub fn block_job_finalize(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::BlockId, |jobs, id, _, g| jobs.finalize(id, g))
}

pub fn block_job_dismiss(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::BlockId, |jobs, id, _, _| jobs.dismiss(id))
}

/// Only mirror jobs take changes, and blockd runs none yet.
pub fn block_job_change(s: &mut State, a: Value) -> Reply<'_> {
    verb(s, a, Lookup::BlockId, |jobs, id, _, _| {
        jobs.apply_verb(id, JobVerb::Change)?;
        Err(JobError::ChangeUnsupported)
    })
}
