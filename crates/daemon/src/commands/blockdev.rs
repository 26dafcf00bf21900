//! blockdev-add, blockdev-del, block_resize, blockdev-create and the block queries.

use super::{args, block_error, empty, job_error, Reply};
use crate::control::State;
use async_trait::async_trait;
use block::{BlockGraph, BlockdevOptions, CreateOptions, ImageInfo, NodeInfo};
use jobs::{JobContext, JobDriver, JobOptions, JobType};
use qapi::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

pub fn blockdev_add(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let opts: BlockdevOptions = args(a)?;
        state.graph.add(opts).await.map_err(block_error)?;
        Ok(empty())
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NodeNameArg {
    node_name: String,
}

pub fn blockdev_del(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: NodeNameArg = args(a)?;
        state
            .graph
            .remove(&a.node_name)
            .await
            .map_err(block_error)?;
        Ok(empty())
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ResizeArgs {
    device: Option<String>,
    node_name: Option<String>,
    size: i64,
}

pub fn block_resize(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: ResizeArgs = args(a)?;
        state
            .graph
            .resize(a.device.as_deref(), a.node_name.as_deref(), a.size)
            .await
            .map_err(block_error)?;
        Ok(empty())
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct CreateArgs {
    job_id: String,
    options: Value,
}

/// The `create` job of `blockdev-create`.
struct CreateJob {
    options: CreateOptions,
}

#[async_trait]
impl JobDriver<BlockGraph> for CreateJob {
    fn job_type(&self) -> JobType {
        JobType::Create
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        ctx.set_progress(0, 1);
        let result = match &self.options {
            CreateOptions::File(file) => block::create_file(file).await,
            _ => return Err("Driver does not support blockdev-create".to_string()),
        };
        ctx.set_progress(1, 1);
        result.map_err(|err| err.to_string())
    }
}

pub fn blockdev_create(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: CreateArgs = args(a)?;
        if a.options.get("driver").and_then(Value::as_str) != Some("file") {
            return Err(QmpError::generic("Driver does not support blockdev-create"));
        }
        let options: CreateOptions = args(a.options)?;
        let opts = JobOptions {
            auto_dismiss: false,
            ..JobOptions::new(a.job_id, JobType::Create)
        };
        let id = state
            .jobs
            .create(opts, Arc::new(CreateJob { options }))
            .map_err(job_error)?;
        state.jobs.start(id.as_str()).map_err(job_error)?;
        Ok(empty())
    })
}

pub fn query_named_block_nodes(state: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async move {
        Ok(Value::Array(
            state.graph.infos().iter().map(block_device_info).collect(),
        ))
    })
}

/// QSD lists only named block backends, and it has none: exports use anonymous ones.
pub fn query_block(_: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async { Ok(Value::Array(vec![])) })
}

pub fn x_debug_query_block_graph(state: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async move {
        let dump = state.graph.debug_graph();
        let nodes: Vec<Value> = dump
            .nodes
            .iter()
            .map(|n| json!({"id": n.id, "type": n.node_type.as_str(), "name": n.name}))
            .collect();
        let edges: Vec<Value> = dump
            .edges
            .iter()
            .map(|e| {
                json!({"parent": e.parent, "child": e.child, "name": e.name,
                       "perm": e.perm, "shared-perm": e.shared_perm})
            })
            .collect();
        Ok(json!({"nodes": nodes, "edges": edges}))
    })
}

/// `BlockDeviceInfo` as QSD prints it: throttling fields are always zero.
fn block_device_info(info: &NodeInfo) -> Value {
    let mut m = Map::new();
    m.insert("file".into(), info.file.clone().into());
    m.insert("node-name".into(), info.node_name.clone().into());
    m.insert("ro".into(), info.ro.into());
    m.insert("drv".into(), info.drv.into());
    if let Some(backing) = &info.backing_file {
        m.insert("backing_file".into(), backing.clone().into());
    }
    m.insert("backing_file_depth".into(), info.backing_file_depth.into());
    m.insert("active".into(), info.active.into());
    m.insert("encrypted".into(), info.encrypted.into());
    m.insert("detect_zeroes".into(), info.detect_zeroes.as_str().into());
    for key in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        m.insert(key.into(), 0.into());
    }
    m.insert("image".into(), image_info(&info.image));
    m.insert(
        "cache".into(),
        json!({"writeback": info.cache.writeback, "direct": info.cache.direct,
               "no-flush": info.cache.no_flush}),
    );
    m.insert("write_threshold".into(), info.write_threshold.into());
    Value::Object(m)
}

fn image_info(image: &ImageInfo) -> Value {
    let mut m = Map::new();
    m.insert("virtual-size".into(), image.virtual_size.into());
    m.insert("filename".into(), image.filename.clone().into());
    m.insert("format".into(), image.format.into());
    if let Some(size) = image.actual_size {
        m.insert("actual-size".into(), size.into());
    }
    if let Some(fs) = &image.format_specific {
        m.insert("format-specific".into(), format_specific(fs));
    }
    if let Some(dirty) = image.dirty_flag {
        m.insert("dirty-flag".into(), dirty.into());
    }
    if let Some(backing) = &image.backing_filename {
        m.insert("backing-filename".into(), backing.clone().into());
    }
    if let Some(backing) = &image.backing_image {
        m.insert("backing-image".into(), image_info(backing));
    }
    Value::Object(m)
}

fn format_specific(fs: &block::FormatSpecific) -> Value {
    match fs {
        block::FormatSpecific::File => json!({"type": "file", "data": {}}),
        other => json!({"type": format!("{other:?}").to_lowercase(), "data": {}}),
    }
}
