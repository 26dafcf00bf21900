//! query-jobs and the job-* verbs.

use super::{args, empty, job_error, Reply};
use crate::control::State;
use qapi::QmpError;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct JobId {
    id: String,
}

fn job_id(value: Value) -> Result<String, QmpError> {
    args::<JobId>(value).map(|a| a.id)
}

pub fn query_jobs(state: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async move {
        serde_json::to_value(state.jobs.query_jobs()).map_err(|e| QmpError::generic(e.to_string()))
    })
}

pub fn job_pause(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        state.jobs.pause(&job_id(a)?).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn job_resume(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        state.jobs.resume(&job_id(a)?).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn job_cancel(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let State { jobs, graph, .. } = state;
        jobs.cancel(&job_id(a)?, true, graph).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn job_complete(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let State { jobs, graph, .. } = state;
        jobs.complete(&job_id(a)?, graph).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn job_finalize(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let State { jobs, graph, .. } = state;
        jobs.finalize(&job_id(a)?, graph).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn job_dismiss(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        state.jobs.dismiss(&job_id(a)?).map_err(job_error)?;
        Ok(empty())
    })
}

/// The legacy block-job layer names jobs `device` and answers only for block jobs.
#[derive(Deserialize)]
struct Device {
    device: String,
}

fn block_job(state: &State, value: Value, key: &str) -> Result<String, QmpError> {
    let id = match key {
        "device" => args::<Device>(value)?.device,
        _ => job_id(value)?,
    };
    state.jobs.check_block_job(&id).map_err(job_error)?;
    Ok(id)
}

pub fn query_block_jobs(state: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async move {
        serde_json::to_value(state.jobs.query_block_jobs())
            .map_err(|e| QmpError::generic(e.to_string()))
    })
}

#[derive(Deserialize)]
struct SetSpeed {
    speed: i64,
}

pub fn block_job_set_speed(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let speed = args::<SetSpeed>(a.clone())?.speed;
        let id = block_job(state, a, "device")?;
        state.jobs.set_speed(&id, speed).map_err(job_error)?;
        Ok(empty())
    })
}

#[derive(Deserialize)]
struct Cancel {
    force: Option<bool>,
}

pub fn block_job_cancel(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let force = args::<Cancel>(a.clone())?.force.unwrap_or(false);
        let id = block_job(state, a, "device")?;
        let State { jobs, graph, .. } = state;
        jobs.cancel(&id, force, graph).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn block_job_pause(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let id = block_job(state, a, "device")?;
        state.jobs.pause(&id).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn block_job_resume(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let id = block_job(state, a, "device")?;
        state.jobs.resume(&id).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn block_job_complete(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let id = block_job(state, a, "device")?;
        let State { jobs, graph, .. } = state;
        jobs.complete(&id, graph).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn block_job_finalize(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let id = block_job(state, a, "id")?;
        let State { jobs, graph, .. } = state;
        jobs.finalize(&id, graph).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn block_job_dismiss(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let id = block_job(state, a, "id")?;
        state.jobs.dismiss(&id).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn block_job_change(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let id = block_job(state, a, "id")?;
        state
            .jobs
            .apply_verb(&id, jobs::JobVerb::Change)
            .map_err(job_error)?;
        // Only mirror jobs take changes, and blockd runs none yet.
        Err(job_error(jobs::JobError::ChangeUnsupported))
    })
}
