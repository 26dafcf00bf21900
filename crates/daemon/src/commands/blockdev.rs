//! blockdev-add, blockdev-del, block_resize, blockdev-create, x-blockdev-amend and the block
//! queries.

use super::{args, block_error, empty, job_error, Reply};
use crate::control::State;
use async_trait::async_trait;
use block::{
    Backend, BlockGraph, BlockdevOptions, BlockdevRef, CreateOptions, ImageInfo, Node, NodeHold,
    NodeInfo, Perm,
};
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
        // QEMU drains all nodes to close it: running jobs show a pause.
        state.jobs.drain_blip(1);
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
    /// For formats: the nodes the image is written through (with the job's write and
    /// resize permissions held), or why they could not be had; dropped when the job ends.
    nodes: std::sync::Mutex<Option<Result<FormatTarget, String>>>,
}

/// The `file` (and `data-file`) nodes a format's create job writes through.
struct FormatTarget {
    file: (Arc<Node>, Backend),
    data_file: Option<(Arc<Node>, Backend)>,
}

/// Looks a create job's node up and takes QEMU's permissions for writing an image on it
/// (write and resize, everything shared).
fn create_target(
    graph: &BlockGraph,
    reference: &BlockdevRef,
) -> Result<(Arc<Node>, Backend), String> {
    let BlockdevRef::Reference(name) = reference else {
        return Err("blockd needs an existing node (a node-name) for blockdev-create".into());
    };
    let node = graph
        .get(name)
        .ok_or_else(|| format!("Cannot find device='{name}' nor node-name='{name}'"))?;
    let user = graph
        .attach(name, Perm::WRITE | Perm::RESIZE, Perm::ALL, "")
        .map_err(|err| err.to_string())?;
    Ok((node, user))
}

fn format_target(
    graph: &BlockGraph,
    file: &BlockdevRef,
    data_file: Option<&BlockdevRef>,
) -> Result<FormatTarget, String> {
    let file = create_target(graph, file)?;
    let data_file = data_file.map(|d| create_target(graph, d)).transpose()?;
    Ok(FormatTarget { file, data_file })
}

#[async_trait]
impl JobDriver<BlockGraph> for CreateJob {
    fn job_type(&self) -> JobType {
        JobType::Create
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        ctx.set_progress(0, 1);
        let result = match &self.options {
            CreateOptions::File(file) => block::create_file(file).await.map_err(|e| e.to_string()),
            CreateOptions::Qcow2(qcow2) => {
                let target = match self.nodes.lock() {
                    Ok(mut guard) => guard.take(),
                    Err(poisoned) => poisoned.into_inner().take(),
                };
                match target {
                    Some(Ok(target)) => {
                        let data = target.data_file.as_ref().map(|(node, _)| node.clone());
                        block::create_qcow2(target.file.0.clone(), data, qcow2)
                            .await
                            .map_err(|e| e.to_string())
                    }
                    Some(Err(err)) => Err(err),
                    None => Err("the create job ran twice".to_string()),
                }
            }
            _ => return Err("Driver does not support blockdev-create".to_string()),
        };
        ctx.set_progress(1, 1);
        result
    }
}

pub fn blockdev_create(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: CreateArgs = args(a)?;
        if !matches!(
            a.options.get("driver").and_then(Value::as_str),
            Some("file" | "qcow2")
        ) {
            return Err(QmpError::generic("Driver does not support blockdev-create"));
        }
        let options: CreateOptions = args(a.options)?;
        let nodes = match &options {
            CreateOptions::Qcow2(q) => {
                Some(format_target(&state.graph, &q.file, q.data_file.as_ref()))
            }
            _ => None,
        };
        let opts = JobOptions {
            auto_dismiss: false,
            ..JobOptions::new(a.job_id, JobType::Create)
        };
        let id = state
            .jobs
            .create(
                opts,
                Arc::new(CreateJob {
                    options,
                    nodes: std::sync::Mutex::new(nodes),
                }),
            )
            .map_err(job_error)?;
        state.jobs.start(id.as_str()).map_err(job_error)?;
        Ok(empty())
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct AmendArgs {
    job_id: String,
    node_name: String,
    options: Value,
    force: Option<bool>,
}

/// The `amend` job of `x-blockdev-amend`. It holds the node (no edge, no permissions,
/// as QEMU's job holds a plain reference) until the job is dismissed.
struct AmendJob {
    hold: NodeHold,
    options: Value,
    force: bool,
}

#[async_trait]
impl JobDriver<BlockGraph> for AmendJob {
    fn job_type(&self) -> JobType {
        JobType::Amend
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        ctx.set_progress(0, 1);
        let result = self
            .hold
            .node()
            .driver()
            .amend(&self.options, self.force)
            .await
            .map_err(|e| e.to_string());
        ctx.set_progress(1, 1);
        result
    }
}

pub fn x_blockdev_amend(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: AmendArgs = args(a)?;
        let driver = a
            .options
            .get("driver")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let hold = state
            .graph
            .amend_target(&a.node_name, driver)
            .map_err(block_error)?;
        let opts = JobOptions {
            auto_dismiss: false,
            ..JobOptions::new(a.job_id, JobType::Amend)
        };
        let job = AmendJob {
            hold,
            options: a.options,
            force: a.force.unwrap_or(false),
        };
        let id = state.jobs.create(opts, Arc::new(job)).map_err(job_error)?;
        state.jobs.start(id.as_str()).map_err(job_error)?;
        Ok(empty())
    })
}

#[derive(Deserialize)]
struct QueryNodesArgs {
    flat: Option<bool>,
}

pub fn query_named_block_nodes(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: QueryNodesArgs = args(a)?;
        let flat = a.flat.unwrap_or(false);
        let mut infos = state.graph.infos();
        if flat {
            // QSD's flat form leaves out the backing chain and its depth.
            for info in &mut infos {
                info.backing_file_depth = 0;
                info.image.backing_image = None;
            }
        }
        Ok(Value::Array(infos.iter().map(block_device_info).collect()))
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
    if !info.dirty_bitmaps.is_empty() {
        let list = info.dirty_bitmaps.iter().map(dirty_info).collect();
        m.insert("dirty-bitmaps".into(), Value::Array(list));
    }
    Value::Object(m)
}

/// `BlockDirtyInfo`: `inconsistent` only when set, as QEMU shows it.
fn dirty_info(b: &block::dirty::BitmapInfo) -> Value {
    let mut m = Map::new();
    if let Some(name) = &b.name {
        m.insert("name".into(), name.clone().into());
    }
    m.insert("recording".into(), b.recording.into());
    m.insert("persistent".into(), b.persistent.into());
    m.insert("busy".into(), b.busy.into());
    m.insert("granularity".into(), b.granularity.into());
    m.insert("count".into(), b.count.into());
    if b.inconsistent {
        m.insert("inconsistent".into(), true.into());
    }
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
    if let Some(size) = image.cluster_size {
        m.insert("cluster-size".into(), size.into());
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
    if let Some(backing) = &image.full_backing_filename {
        m.insert("full-backing-filename".into(), backing.clone().into());
    }
    if let Some(format) = &image.backing_filename_format {
        m.insert("backing-filename-format".into(), format.clone().into());
    }
    if !image.snapshots.is_empty() {
        let list = image.snapshots.iter().map(super::snapshot::snapshot_info);
        m.insert("snapshots".into(), Value::Array(list.collect()));
    }
    if let Some(backing) = &image.backing_image {
        m.insert("backing-image".into(), image_info(backing));
    }
    Value::Object(m)
}

fn format_specific(fs: &block::FormatSpecific) -> Value {
    match fs {
        block::FormatSpecific::File => json!({"type": "file", "data": {}}),
        block::FormatSpecific::Qcow2(q) => {
            let mut data = Map::new();
            data.insert("compat".into(), q.compat.into());
            if let Some(name) = &q.data_file {
                data.insert("data-file".into(), name.clone().into());
            }
            if let Some(raw) = q.data_file_raw {
                data.insert("data-file-raw".into(), raw.into());
            }
            if let Some(ext) = q.extended_l2 {
                data.insert("extended-l2".into(), ext.into());
            }
            if let Some(lazy) = q.lazy_refcounts {
                data.insert("lazy-refcounts".into(), lazy.into());
            }
            if !q.bitmaps.is_empty() {
                let list = q
                    .bitmaps
                    .iter()
                    .map(|(name, granularity, flags)| {
                        json!({"flags": flags, "name": name, "granularity": granularity})
                    })
                    .collect();
                data.insert("bitmaps".into(), Value::Array(list));
            }
            if let Some(corrupt) = q.corrupt {
                data.insert("corrupt".into(), corrupt.into());
            }
            data.insert("refcount-bits".into(), q.refcount_bits.into());
            data.insert("compression-type".into(), q.compression_type.into());
            json!({"type": "qcow2", "data": data})
        }
        other => json!({"type": format!("{other:?}").to_lowercase(), "data": {}}),
    }
}
