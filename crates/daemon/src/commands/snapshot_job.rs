//! `snapshot-save`, `snapshot-load` and `snapshot-delete`: internal snapshots of a group of
//! devices taken, reverted and deleted together by a job, as QEMU's system emulator runs
//! them (qemu-storage-daemon has no such commands).
//!
//! Each command starts a job that is not dismissed automatically and returns at once; the
//! job's error carries QEMU's message. Save and load quiesce the devices between `STOP` and
//! `RESUME`: requests of their clients wait at the drained nodes meanwhile, none fails.
//!
//! blockd runs no guest, so the "VM state" it stores in the `vmstate` device's snapshot is
//! a small record of its own ([`VmStateRecord`]): the tag, the devices of the group, the
//! time and blockd's version. Load uses it to refuse a group that is not whole before it
//! reverts anything. A VM state written by QEMU is not blockd's record: load reverts the
//! disks and leaves it alone.
//!
//! The group is all-or-nothing: save checks every device first and deletes the snapshots
//! it made when one device fails; load checks every device (tag present, VM state usable,
//! group whole) before it reverts the first.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use block::drain::Drained;
use block::node::ParentKey;
use block::{BlockGraph, Node, NodeHold};
use jobs::{JobContext, JobDriver, JobOptions, JobType};
use qapi::QmpError;
use qmp::{Event, EventBus};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{args, empty, job_error, Reply};
use crate::control::State;

/// What opens a VM state blockd wrote, so that load tells it from a guest's.
const RECORD_MAGIC: &[u8] = b"blockd-vmstate 1\n";
/// The largest record load reads (a record names each device twice: a few hundred bytes
/// per device).
const RECORD_MAX: u64 = 1 << 20;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SaveLoadArgs {
    job_id: String,
    tag: String,
    vmstate: String,
    devices: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct DeleteArgs {
    job_id: String,
    tag: String,
    devices: Vec<String>,
}

/// One device of the group: its name as the client gave it and a hold on its node (so
/// `blockdev-del` waits until the job has run).
struct Device {
    name: String,
    hold: NodeHold,
}

impl Device {
    fn node(&self) -> &Arc<Node> {
        self.hold.node()
    }

    /// The snapshot called `tag` on this device (QEMU finds group snapshots by name).
    fn find(&self, tag: &str) -> Option<::qcow2::SnapshotInfo> {
        self.node()
            .driver()
            .snapshot_list()
            .into_iter()
            .find(|s| s.name == tag)
    }
}

/// The devices looked up as QEMU does, in its order of checks: an empty list, a name that
/// is no node, a node that cannot take snapshots (read-only, or a format without them).
fn resolve(graph: &BlockGraph, names: &[String]) -> Result<Vec<Device>, String> {
    if names.is_empty() {
        return Err("At least one device is required for snapshot".into());
    }
    let mut nodes = Vec::with_capacity(names.len());
    for name in names {
        let node = graph
            .get(name)
            .ok_or_else(|| format!("No block device node '{name}'"))?;
        nodes.push((name.clone(), node));
    }
    for (name, node) in &nodes {
        if !can_snapshot(node) {
            return Err(format!(
                "Device '{name}' is writable but does not support snapshots"
            ));
        }
    }
    Ok(nodes
        .into_iter()
        .map(|(name, node)| Device {
            name,
            hold: NodeHold::new(node),
        })
        .collect())
}

/// For load: a device a copy-before-write filter keeps a point in time of (a backup, a
/// fleecing export) is not reverted under it, which would change that point in time.
/// QEMU reverts anyway; blockd refuses before anything changed.
fn check_no_point_in_time(graph: &BlockGraph, devices: &[Device], tag: &str) -> Result<(), String> {
    for d in devices {
        for edge in d.node().parents() {
            let ParentKey::Node(parent) = &edge.key else {
                continue;
            };
            if graph
                .get(parent)
                .is_some_and(|p| p.driver_name() == "copy-before-write")
            {
                return Err(format!(
                    "Could not load snapshot '{tag}' on '{}': node '{parent}' (copy-before-write) \
                     keeps a point in time of it",
                    d.name
                ));
            }
        }
    }
    Ok(())
}

fn can_snapshot(node: &Node) -> bool {
    node.driver().can_snapshot() && !node.is_read_only()
}

/// The index of the `vmstate` device in the group.
fn vmstate_index(devices: &[Device], vmstate: &str) -> Result<usize, String> {
    let i = devices
        .iter()
        .position(|d| d.name == vmstate)
        .ok_or_else(|| format!("vmstate block device '{vmstate}' does not exist"))?;
    if !can_snapshot(devices[i].node()) {
        return Err(format!(
            "vmstate block device '{vmstate}' does not support snapshots"
        ));
    }
    Ok(i)
}

/// blockd's VM state: what load needs to know the group the snapshot belongs to.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
struct VmStateRecord {
    tag: String,
    devices: Vec<RecordDevice>,
    date_sec: u64,
    date_nsec: u32,
    version: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
struct RecordDevice {
    node_name: String,
    filename: String,
}

impl VmStateRecord {
    fn new(tag: &str, devices: &[Device]) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            tag: tag.to_string(),
            devices: devices
                .iter()
                .map(|d| RecordDevice {
                    node_name: d.name.clone(),
                    filename: d.node().filename(),
                })
                .collect(),
            date_sec: now.as_secs(),
            date_nsec: now.subsec_nanos(),
            version: format!("blockd {}", env!("CARGO_PKG_VERSION")),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = RECORD_MAGIC.to_vec();
        // A record of strings and numbers always serializes.
        bytes.extend(serde_json::to_vec(self).unwrap_or_default());
        bytes
    }

    /// `None` for a VM state blockd did not write; an error for a record of blockd's
    /// that does not parse.
    fn decode(bytes: &[u8]) -> Option<Result<Self, String>> {
        let body = bytes.strip_prefix(RECORD_MAGIC)?;
        Some(
            serde_json::from_slice(body)
                .map_err(|e| format!("blockd's VM state record is damaged: {e}")),
        )
    }

    /// The first device of the record missing from `devices` (matched by node name or
    /// by image file, so a group opened again under other node names still loads).
    fn missing_from<'a>(&'a self, devices: &[Device]) -> Option<&'a RecordDevice> {
        self.devices.iter().find(|r| {
            !devices
                .iter()
                .any(|d| d.name == r.node_name || d.node().filename() == r.filename)
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Save,
    Load,
    Delete,
}

impl Kind {
    fn job_type(self) -> JobType {
        match self {
            Kind::Save => JobType::SnapshotSave,
            Kind::Load => JobType::SnapshotLoad,
            Kind::Delete => JobType::SnapshotDelete,
        }
    }
}

/// The job of one of the three commands.
struct SnapshotJob {
    kind: Kind,
    tag: String,
    vmstate: String,
    /// The devices (or the lookup's error), taken by the run: the holds end with it.
    devices: Mutex<Option<Result<Vec<Device>, String>>>,
    events: EventBus,
}

#[async_trait]
impl JobDriver<BlockGraph> for SnapshotJob {
    fn job_type(&self) -> JobType {
        self.kind.job_type()
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        ctx.set_progress(0, 1);
        let devices = self
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| Err("the snapshot job ran twice".into()));
        let result = match self.kind {
            Kind::Save => self.save(&ctx, devices).await,
            Kind::Load => self.load(&ctx, devices).await,
            Kind::Delete => match devices {
                Ok(devices) => self.delete(devices).await,
                Err(err) => Err(err),
            },
        };
        ctx.set_progress(1, 1);
        result
    }
}

/// Drains every device (one point in time for the group) until the guards are dropped.
async fn quiesce(devices: &[Device]) -> Vec<Drained<'_>> {
    let mut drained = Vec::with_capacity(devices.len());
    for d in devices {
        drained.push(d.node().gate().drained().await);
    }
    drained
}

impl SnapshotJob {
    fn emit(&self, name: &str) {
        self.events.emit(Event::new(name, None));
    }

    async fn save(
        &self,
        ctx: &JobContext,
        devices: Result<Vec<Device>, String>,
    ) -> Result<(), String> {
        let devices = devices?;
        if devices.iter().any(|d| d.find(&self.tag).is_some()) {
            return Err(format!(
                "Snapshot '{}' already exists in one or more devices",
                self.tag
            ));
        }
        let vm = vmstate_index(&devices, &self.vmstate)?;
        self.emit("STOP");
        // QEMU drains every node when it stops the guest and again around the snapshot:
        // running block jobs show a pause for each.
        ctx.drain_all(2).await;
        let result = {
            let _quiet = quiesce(&devices).await;
            self.create_all(&devices, vm).await
        };
        self.emit("RESUME");
        result
    }

    /// Takes the snapshot on every device, the record on the `vm`-th; on a failure the
    /// ones made so far are deleted again.
    async fn create_all(&self, devices: &[Device], vm: usize) -> Result<(), String> {
        let record = VmStateRecord::new(&self.tag, devices).encode();
        let mut made: Vec<(&Device, String)> = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let vm_state: &[u8] = if i == vm { &record } else { &[] };
            match d.node().driver().snapshot_create(&self.tag, vm_state).await {
                Ok(info) => made.push((d, info.id)),
                Err(_) => {
                    for (done, id) in made.into_iter().rev() {
                        let _ = done.node().driver().snapshot_delete(Some(&id), None).await;
                    }
                    return Err(format!(
                        "Could not create snapshot '{}' on '{}'",
                        self.tag, d.name
                    ));
                }
            }
        }
        Ok(())
    }

    async fn load(
        &self,
        ctx: &JobContext,
        devices: Result<Vec<Device>, String>,
    ) -> Result<(), String> {
        self.emit("STOP");
        // Stopping the guest drains every node in QEMU (and the revert once more, below).
        ctx.drain_all(1).await;
        // QEMU leaves its guest stopped when a load fails; blockd has nothing half-loaded
        // to protect (it reverts nothing before every check passed) and resumes.
        let result = match devices {
            Ok(devices) => self.load_checked(ctx, &devices).await,
            Err(err) => Err(err),
        };
        self.emit("RESUME");
        result
    }

    async fn load_checked(&self, ctx: &JobContext, devices: &[Device]) -> Result<(), String> {
        let found: Option<Vec<::qcow2::SnapshotInfo>> =
            devices.iter().map(|d| d.find(&self.tag)).collect();
        let Some(found) = found else {
            return Err(format!(
                "Snapshot '{}' does not exist in one or more devices",
                self.tag
            ));
        };
        let vm = vmstate_index(devices, &self.vmstate)?;
        let vm_snapshot = &found[vm];
        if vm_snapshot.vm_state_size == 0 {
            return Err(
                "This is a disk-only snapshot. Revert to it  offline using qemu-img".into(),
            );
        }
        self.check_record(&devices[vm], vm_snapshot, devices)
            .await?;
        ctx.drain_all(1).await;
        let _quiet = quiesce(devices).await;
        for (d, snapshot) in devices.iter().zip(&found) {
            d.node().revert_snapshot(&snapshot.id).await.map_err(|e| {
                format!(
                    "Could not load snapshot '{}' on '{}': {e}",
                    self.tag, d.name
                )
            })?;
        }
        Ok(())
    }

    /// With blockd's record in the VM state: every device of the group saved is in the
    /// list loaded.
    async fn check_record(
        &self,
        vm_device: &Device,
        snapshot: &::qcow2::SnapshotInfo,
        devices: &[Device],
    ) -> Result<(), String> {
        let len = snapshot.vm_state_size.min(RECORD_MAX);
        let mut bytes = vec![0; usize::try_from(len).unwrap_or(0)];
        vm_device
            .node()
            .driver()
            .snapshot_vm_state(&snapshot.id, &mut bytes)
            .await
            .map_err(|e| {
                format!(
                    "Could not read the VM state of snapshot '{}' on '{}': {e}",
                    self.tag, vm_device.name
                )
            })?;
        let Some(record) = VmStateRecord::decode(&bytes) else {
            return Ok(());
        };
        let record = record?;
        if let Some(missing) = record.missing_from(devices) {
            return Err(format!(
                "Snapshot '{}' was saved with device '{}' ({}), which is not in the list",
                self.tag, missing.node_name, missing.filename
            ));
        }
        Ok(())
    }

    async fn delete(&self, devices: Vec<Device>) -> Result<(), String> {
        for d in &devices {
            let Some(snapshot) = d.find(&self.tag) else {
                continue;
            };
            let _quiet = d.node().gate().drained().await;
            d.node()
                .driver()
                .snapshot_delete(Some(&snapshot.id), Some(&snapshot.name))
                .await
                .map_err(|e| {
                    format!(
                        "Could not delete snapshot '{}' on '{}': {e}",
                        self.tag, d.name
                    )
                })?;
        }
        Ok(())
    }
}

fn start(
    state: &mut State,
    kind: Kind,
    job_id: String,
    tag: String,
    vmstate: String,
    devices: &[String],
) -> Result<Value, QmpError> {
    let opts = JobOptions {
        auto_dismiss: false,
        ..JobOptions::new(job_id, kind.job_type())
    };
    let resolved = resolve(&state.graph, devices).and_then(|d| {
        if kind == Kind::Load {
            check_no_point_in_time(&state.graph, &d, &tag)?;
        }
        Ok(d)
    });
    let job = SnapshotJob {
        kind,
        tag,
        vmstate,
        devices: Mutex::new(Some(resolved)),
        events: state.events.clone(),
    };
    let id = state.jobs.create(opts, Arc::new(job)).map_err(job_error)?;
    state.jobs.start(id.as_str()).map_err(job_error)?;
    Ok(empty())
}

pub fn snapshot_save(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: SaveLoadArgs = args(a)?;
        start(state, Kind::Save, a.job_id, a.tag, a.vmstate, &a.devices)
    })
}

pub fn snapshot_load(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: SaveLoadArgs = args(a)?;
        start(state, Kind::Load, a.job_id, a.tag, a.vmstate, &a.devices)
    })
}

pub fn snapshot_delete(state: &mut State, a: Value) -> Reply<'_> {
    Box::pin(async move {
        let a: DeleteArgs = args(a)?;
        start(
            state,
            Kind::Delete,
            a.job_id,
            a.tag,
            String::new(),
            &a.devices,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VmStateRecord {
        VmStateRecord {
            tag: "t".into(),
            devices: vec![RecordDevice {
                node_name: "a".into(),
                filename: "a.qcow2".into(),
            }],
            date_sec: 1,
            date_nsec: 2,
            version: "blockd 0".into(),
        }
    }

    #[test]
    fn record_round_trips() {
        let r = record();
        assert_eq!(VmStateRecord::decode(&r.encode()), Some(Ok(r)));
    }

    #[test]
    fn foreign_vm_state_is_not_a_record() {
        assert_eq!(VmStateRecord::decode(b"QEVM\0\0\0\x03"), None);
        assert_eq!(VmStateRecord::decode(b""), None);
    }

    #[test]
    fn damaged_record_is_an_error() {
        let mut bytes = record().encode();
        bytes.truncate(bytes.len() - 3);
        assert!(matches!(VmStateRecord::decode(&bytes), Some(Err(_))));
    }
}
