//! The block graph: every node by name, the edges between them and the users on top.
//!
//! One owner (the daemon's control task) holds `&mut BlockGraph`; the data plane holds
//! `Arc<Node>` and [`Backend`] handles. Nodes are kept in creation order (children
//! before their parents); QSD lists them newest first.

use indexmap::IndexMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::driver::blkdebug;
use crate::driver::cbw::{CbwDriver, CbwState, SnapshotAccessDriver};
use crate::driver::file::{FileDriver, FileOpenFlags};
use crate::driver::null::NullDriver;
use crate::driver::raw::RawDriver;
use crate::driver::{BlockDriver, Extent, WriteFlags, ZeroFlags};
use crate::error::{Error, Result};
use crate::node::{cumulative, Child, Node, NodeFlags, NodeHold, NodeInfo, ParentEdge, ParentKey};
use crate::options::{
    BlkdebugOptions, BlockdevOptions, BlockdevRef, CbwOptions, DetectZeroes, Discard, DriverOptions,
};
use crate::perm::{ChildRole, Perm};

mod format;
mod overlay;

pub use overlay::Appended;

/// Longest node-name QEMU accepts.
const NODE_NAME_MAX: usize = 31;

static NEXT_USER_ID: AtomicU64 = AtomicU64::new(1);

/// The graph of block nodes.
#[derive(Debug, Default)]
pub struct BlockGraph {
    nodes: IndexMap<String, Arc<Node>>,
    users: Mutex<Vec<Weak<UserRecord>>>,
    implicit_counter: u64,
    /// Backing files being opened implicitly, nested (bounds a chain that loops).
    pub(crate) backing_depth: u32,
    /// Implicit nodes to close once nothing uses them (see [`BlockGraph::release_later`]).
    released: Vec<String>,
}

#[derive(Debug)]
struct UserRecord {
    id: u64,
    name: String,
    /// A block job's edge (dumped as a `block-job` vertex) rather than a block backend's.
    job: bool,
    /// The node the user is on; a filter inserted above it takes its place (see
    /// [`BlockGraph::insert_filter`]).
    node: Mutex<Arc<Node>>,
}

impl UserRecord {
    fn node(&self) -> Arc<Node> {
        match self.node.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_node(&self, node: Arc<Node>) {
        match self.node.lock() {
            Ok(mut guard) => *guard = node,
            Err(poisoned) => *poisoned.into_inner() = node,
        }
    }
}

/// A user of a node (export, job, temporary handle): holds a `root` edge with its
/// permissions until dropped. Requests through it are checked against what it took.
#[derive(Debug)]
pub struct Backend {
    record: Arc<UserRecord>,
    perm: Perm,
}

/// `x-debug-query-block-graph` output as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphDump {
    pub nodes: Vec<DumpNode>,
    pub edges: Vec<DumpEdge>,
}

/// Whether a dumped vertex is a node or a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpNodeType {
    BlockBackend,
    BlockDriver,
    BlockJob,
}

impl DumpNodeType {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DumpNodeType::BlockBackend => "block-backend",
            DumpNodeType::BlockDriver => "block-driver",
            DumpNodeType::BlockJob => "block-job",
        }
    }
}

/// One vertex of the dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpNode {
    pub id: u64,
    pub node_type: DumpNodeType,
    pub name: String,
}

/// One edge of the dump; perms in QEMU's printing order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpEdge {
    pub parent: u64,
    pub child: u64,
    pub name: String,
    pub perm: Vec<&'static str>,
    pub shared_perm: Vec<&'static str>,
}

fn validate_node_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !first_ok || !rest_ok {
        return Err(Error::InvalidNodeName(name.to_string()));
    }
    if name.len() > NODE_NAME_MAX {
        return Err(Error::NodeNameTooLong);
    }
    Ok(())
}

/// Two pseudo-random decimal digits, as QEMU appends to generated names.
fn two_random_digits() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(nanos / 1000) % 100
}

type Plan = Vec<(Arc<Node>, ParentKey, Option<ParentEdge>)>;

/// Works out every edge that changes when `key`'s edge on `node` becomes `new`,
/// checking conflicts (when `check`) without changing anything.
fn plan_edge(
    node: &Arc<Node>,
    key: ParentKey,
    new: Option<ParentEdge>,
    check: bool,
    plan: &mut Plan,
) -> Result<()> {
    let mut parents = node.parents();
    parents.retain(|e| e.key != key);
    if let Some(edge) = &new {
        if check {
            check_edge(node, edge, &parents)?;
        }
        parents.push(edge.clone());
    }
    let (perm, shared) = cumulative(&parents);
    if check {
        node.driver().check_perm(perm, shared)?;
    }
    plan.push((node.clone(), key, new));
    for child in node.children() {
        let (cp, cs) = node.role_of(&child).child_perms(perm, shared);
        let ckey = ParentKey::Node(node.name().to_string());
        let current = child.node.parents().into_iter().find(|e| e.key == ckey);
        if current.as_ref().map(|e| (e.perm, e.shared)) != Some((cp, cs)) {
            let edge = ParentEdge {
                key: ckey.clone(),
                desc: format!("node '{}'", node.name()),
                role: child.name.clone(),
                perm: cp,
                shared: cs,
            };
            plan_edge(&child.node, ckey, Some(edge), check, plan)?;
        }
    }
    Ok(())
}

/// Checks, changing nothing, that a new parent `parent` could hold a child edge named
/// `role_name` with `role` on `node` (image locks of other processes included): format
/// drivers check this before they read their child, as QEMU attaches children first.
pub(crate) fn precheck_child(
    node: &Arc<Node>,
    role: ChildRole,
    role_name: &str,
    parent: Option<&str>,
) -> Result<()> {
    let (perm, shared) = role.child_perms(Perm::NONE, Perm::ALL);
    let parent = parent.unwrap_or_default();
    let key = ParentKey::Node(parent.to_string());
    let edge = ParentEdge {
        key: key.clone(),
        desc: format!("node '{parent}'"),
        role: role_name.to_string(),
        perm,
        shared,
    };
    plan_edge(node, key, Some(edge), true, &mut Vec::new())
}

fn check_edge(node: &Node, edge: &ParentEdge, others: &[ParentEdge]) -> Result<()> {
    if node.is_read_only() && !(edge.perm & (Perm::WRITE | Perm::RESIZE)).is_empty() {
        return Err(Error::NodeReadOnly);
    }
    let conflict = |holder: &ParentEdge, blocker: &ParentEdge, perms: Perm| {
        Error::PermissionConflict(Box::new(crate::error::PermConflict {
            node: node.name().to_string(),
            perms: perms.joined_names(),
            holder: holder.desc.clone(),
            holder_role: holder.role.clone(),
            blocker: blocker.desc.clone(),
            blocker_role: blocker.role.clone(),
        }))
    };
    for other in others {
        let denied = edge.perm & !other.shared;
        if !denied.is_empty() {
            return Err(conflict(edge, other, denied));
        }
        let denied = other.perm & !edge.shared;
        if !denied.is_empty() {
            return Err(conflict(other, edge, denied));
        }
    }
    Ok(())
}

fn apply_plan(plan: Plan) {
    for (node, key, new) in plan {
        let (perm, shared) = {
            let mut parents = node.lock_parents();
            match (parents.iter_mut().find(|e| e.key == key), new) {
                (Some(slot), Some(edge)) => *slot = edge,
                (None, Some(edge)) => parents.insert(0, edge),
                (_, None) => parents.retain(|e| e.key != key),
            }
            cumulative(&parents)
        };
        node.driver().set_perm(perm, shared);
    }
}

/// Sets (or with `None` removes) `key`'s edge on `node` and everything below it.
fn update_edge(node: &Arc<Node>, key: ParentKey, new: Option<ParentEdge>) -> Result<()> {
    let check = new.is_some();
    let mut plan = Vec::new();
    plan_edge(node, key, new, check, &mut plan)?;
    apply_plan(plan);
    Ok(())
}

fn remove_edge(node: &Arc<Node>, key: ParentKey) {
    let mut plan = Vec::new();
    // Removing an edge only relaxes permissions, so planning without checks cannot fail.
    if plan_edge(node, key, None, false, &mut plan).is_ok() {
        apply_plan(plan);
    }
}

/// What opening a driver produced. `position` is where the node goes in the node list
/// when that is not the end (a format node comes before the backing chain it opened).
pub(crate) struct Opened {
    pub(crate) driver: Box<dyn BlockDriver>,
    pub(crate) children: Vec<Child>,
    pub(crate) flags: NodeFlags,
    pub(crate) position: Option<usize>,
}

impl Opened {
    fn leaf(driver: Box<dyn BlockDriver>, flags: NodeFlags) -> Self {
        Self {
            driver,
            children: Vec::new(),
            flags,
            position: None,
        }
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// The node named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(name).cloned()
    }

    /// All nodes, newest first (query-named-block-nodes order).
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.values().rev().cloned().collect()
    }

    /// Quiesces the whole graph for a section in which no outside request may run (a
    /// transaction): drains every node no other node uses, newest first. Requests only
    /// enter the graph there (users and jobs sit on top nodes), and the section's own work
    /// (a snapshot's table updates, a new overlay) can still reach the nodes below.
    /// [`Self::undrain_all`] reopens them.
    pub async fn drain_all(&self) -> Vec<Arc<Node>> {
        let roots: Vec<Arc<Node>> = self
            .nodes()
            .into_iter()
            .filter(|n| {
                !n.parents()
                    .iter()
                    .any(|e| matches!(e.key, ParentKey::Node(_)))
            })
            .collect();
        for node in &roots {
            node.gate().drain().await;
        }
        roots
    }

    /// Ends a [`Self::drain_all`] section.
    pub fn undrain_all(nodes: Vec<Arc<Node>>) {
        for node in nodes.iter().rev() {
            node.gate().undrain();
        }
    }

    /// `query-named-block-nodes` data, newest first.
    pub fn infos(&self) -> Vec<NodeInfo> {
        self.nodes.values().rev().map(|n| n.info()).collect()
    }

    /// `blockdev-add`: opens the node described by `opts` (and its inline children).
    pub async fn add(&mut self, opts: BlockdevOptions) -> Result<Arc<Node>> {
        self.add_node(opts, true).await
    }

    /// Opens a node the monitor does not own (a job's target image, say): a generated
    /// `#block…` name unless `opts` names it. It goes away with
    /// [`BlockGraph::release_later`] or when its last parent does.
    pub async fn add_implicit(&mut self, opts: BlockdevOptions) -> Result<Arc<Node>> {
        self.add_node(opts, false).await
    }

    /// Marks implicit node `name` for closing once nothing uses it; the owner of the graph
    /// calls [`BlockGraph::reap`] to close it (hooks that cannot wait use this).
    pub fn release_later(&mut self, name: &str) {
        self.released.push(name.to_string());
    }

    /// Closes the released nodes nothing uses any more (their implicit children too).
    pub async fn reap(&mut self) {
        let names = std::mem::take(&mut self.released);
        for name in names {
            let Some(node) = self.get(&name) else {
                continue;
            };
            if node.parents().is_empty() && !node.is_held() {
                self.delete(node).await;
            } else {
                self.released.push(name);
            }
        }
    }

    fn add_node(
        &mut self,
        opts: BlockdevOptions,
        is_root: bool,
    ) -> BoxFuture<'_, Result<Arc<Node>>> {
        Box::pin(async move {
            let common = &opts.common;
            // QEMU names an anonymous node once its file child is open.
            let given = match &common.node_name {
                Some(name) => {
                    validate_node_name(name)?;
                    if self.nodes.contains_key(name) {
                        return Err(Error::DuplicateNodeName(name.clone()));
                    }
                    Some(name.clone())
                }
                None if is_root => return Err(Error::RootNodeNeedsName),
                None => None,
            };
            let flags = NodeFlags {
                read_only: common.read_only.unwrap_or(false),
                auto_read_only: common.auto_read_only.unwrap_or(false),
                force_share: common.force_share.unwrap_or(false),
                active: common.active.unwrap_or(true),
                discard: common.discard.unwrap_or_default(),
                detect_zeroes: common.detect_zeroes.unwrap_or_default(),
                direct: common.cache.and_then(|c| c.direct).unwrap_or(false),
                no_flush: common.cache.and_then(|c| c.no_flush).unwrap_or(false),
            };
            if flags.force_share && !flags.read_only {
                return Err(Error::ForceShareNeedsReadOnly);
            }
            if flags.detect_zeroes == DetectZeroes::Unmap && flags.discard != Discard::Unmap {
                return Err(Error::DetectZeroesUnmapNeedsDiscard);
            }
            let mut slot = given;
            let opened = self.open_driver(&opts.driver, flags, &mut slot).await?;
            let name = self.name_now(&mut slot);
            let Opened {
                driver,
                children,
                flags,
                position,
            } = opened;
            let node = Arc::new(Node::new(name.clone(), !is_root, driver, flags, children));
            node.load_bitmaps().await;
            for child in node.children() {
                let edge = ParentEdge {
                    key: ParentKey::Node(name.clone()),
                    desc: format!("node '{name}'"),
                    role: child.name.clone(),
                    perm: Perm::NONE,
                    shared: Perm::ALL,
                };
                // A new node has no parents yet.
                let (perm, shared) = child.role.child_perms_of(edge.perm, edge.shared, false);
                let edge = ParentEdge {
                    perm,
                    shared,
                    ..edge
                };
                if let Err(err) = update_edge(&child.node, edge.key.clone(), Some(edge)) {
                    self.drop_implicit_children(&node).await;
                    return Err(err);
                }
            }
            match position {
                Some(index) if index <= self.nodes.len() => {
                    self.nodes.shift_insert(index, name, node.clone());
                }
                _ => {
                    self.nodes.insert(name, node.clone());
                }
            }
            Ok(node)
        })
    }

    async fn open_driver(
        &mut self,
        opts: &DriverOptions,
        mut flags: NodeFlags,
        name: &mut Option<String>,
    ) -> Result<Opened> {
        match opts {
            DriverOptions::Blkdebug(blkdebug) => self.open_blkdebug(blkdebug, flags, name).await,
            DriverOptions::CopyBeforeWrite(cbw) => self.open_cbw(cbw, flags).await,
            DriverOptions::SnapshotAccess(access) => {
                let child = self.open_child(&access.file, flags.read_only).await?;
                let driver = SnapshotAccessDriver::new(child.clone());
                Ok(Opened {
                    driver: Box::new(driver),
                    children: vec![Child {
                        name: "file".into(),
                        node: child,
                        role: ChildRole::Snapshot,
                    }],
                    flags,
                    position: None,
                })
            }
            DriverOptions::File(file) => {
                let open_flags = FileOpenFlags {
                    read_only: flags.read_only,
                    auto_read_only: flags.auto_read_only,
                    direct: flags.direct,
                    force_share: flags.force_share,
                };
                let (driver, read_only) = FileDriver::open(file, open_flags).await?;
                flags.read_only = read_only;
                Ok(Opened::leaf(Box::new(driver), flags))
            }
            DriverOptions::NullCo(null) => {
                Ok(Opened::leaf(Box::new(NullDriver::open(null)?), flags))
            }
            DriverOptions::Qcow2(qcow2) => self.open_qcow2(qcow2, flags, name).await,
            DriverOptions::Raw(raw) => {
                let child = self.open_child(&raw.file, flags.read_only).await?;
                match RawDriver::open(child.clone(), raw.offset, raw.size) {
                    Ok(driver) => {
                        let role = driver.child_role();
                        let children = vec![Child {
                            name: "file".into(),
                            node: child,
                            role,
                        }];
                        Ok(Opened {
                            driver: Box::new(driver),
                            children,
                            flags,
                            position: None,
                        })
                    }
                    Err(err) => {
                        self.forget_orphan(&child).await;
                        Err(err)
                    }
                }
            }
        }
    }

    /// Opens a `copy-before-write` node: its `file` (the source), its `target`, then the
    /// copy state, whose cluster is the largest of 64 KiB, the target's cluster and
    /// `min-cluster-size`, as QEMU's.
    async fn open_cbw(&mut self, opts: &CbwOptions, flags: NodeFlags) -> Result<Opened> {
        let source = self.open_child(&opts.file, flags.read_only).await?;
        let target = match self.open_child(&opts.target, false).await {
            Ok(target) => target,
            Err(err) => {
                self.forget_orphan(&source).await;
                return Err(err);
            }
        };
        let min = opts.min_cluster_size.unwrap_or(0);
        // Only what this bitmap marks dirty is copied before writes (and readable in a
        // snapshot-access view); the rest of the snapshot is the source itself.
        let mut only = None;
        let refused = if let Some(b) = &opts.bitmap {
            match self.get(&b.node) {
                None => Some(Error::FormatOption(format!("Node '{}' not found", b.node))),
                Some(node) => match node.bitmaps().get(&b.name) {
                    None => Some(Error::FormatOption(format!(
                        "Dirty bitmap '{}' not found",
                        b.name
                    ))),
                    Some(bitmap) => {
                        only = Some(bitmap.lock().bits.clone());
                        None
                    }
                },
            }
        } else if min != 0 && !min.is_power_of_two() {
            Some(Error::FormatOption(
                "Cannot create block-copy-state: min-cluster-size needs to be a power of 2".into(),
            ))
        } else if min > 1 << 31 {
            Some(Error::FormatOption(
                "Cannot create block-copy-state: min-cluster-size must be at most 2 GiB".into(),
            ))
        } else {
            None
        };
        if let Some(err) = refused {
            self.forget_orphan(&target).await;
            self.forget_orphan(&source).await;
            return Err(err);
        }
        let cluster = min
            .max(64 << 10)
            .max(target.driver().info().cluster_size.unwrap_or(0));
        let state = CbwState::new(
            source,
            target,
            cluster,
            opts.on_cbw_error.unwrap_or_default(),
        );
        if let Some(bits) = &only {
            state.skip_clean(bits, true);
        }
        let driver = CbwDriver::new(Arc::new(state));
        Ok(Opened {
            children: driver.children(),
            driver: Box::new(driver),
            flags,
            position: None,
        })
    }

    /// Opens a `blkdebug` node: its options and rules, then its `image` child, then the
    /// limits checked against that child. QEMU names and lists the node before it opens
    /// the child (the child is opened by the driver, not by the generic layer).
    async fn open_blkdebug(
        &mut self,
        opts: &BlkdebugOptions,
        flags: NodeFlags,
        name: &mut Option<String>,
    ) -> Result<Opened> {
        let prepared = blkdebug::prepare(opts)?;
        self.name_now(name);
        let position = self.nodes.len();
        let child = self.open_child(&opts.image, flags.read_only).await?;
        let role = prepared.child_role();
        match prepared.open(child.clone()) {
            Ok(driver) => Ok(Opened {
                driver: Box::new(driver),
                children: vec![Child {
                    name: "image".into(),
                    node: child,
                    role,
                }],
                flags,
                position: Some(position),
            }),
            Err(err) => {
                self.forget_orphan(&child).await;
                Err(err)
            }
        }
    }

    /// The node's name, generating QEMU's `#block…` name for an anonymous node now if it
    /// has none yet (QEMU names a node once its file child is open).
    pub(crate) fn name_now(&mut self, slot: &mut Option<String>) -> String {
        if let Some(name) = slot {
            return name.clone();
        }
        let name = format!("#block{}{:02}", self.implicit_counter, two_random_digits());
        self.implicit_counter += 1;
        *slot = Some(name.clone());
        name
    }

    /// Takes the next anonymous `#block…` name without making a node: QEMU names a node it
    /// opens and closes again at once (a filter whose job is refused) all the same.
    pub fn consume_anonymous_name(&mut self) {
        self.name_now(&mut None);
    }

    /// The child a `BlockdevRef` names: an existing node, or a new implicit one that
    /// inherits the parent's read-only flag.
    pub(crate) async fn open_child(
        &mut self,
        reference: &BlockdevRef,
        read_only: bool,
    ) -> Result<Arc<Node>> {
        match reference {
            BlockdevRef::Reference(name) => self.get(name).ok_or_else(|| Error::DeviceNotFound {
                device: name.clone(),
                node: name.clone(),
            }),
            BlockdevRef::Definition(inline) => {
                let mut inline = (**inline).clone();
                if read_only && inline.common.read_only.is_none() {
                    inline.common.read_only = Some(true);
                }
                self.add_node(inline, false).await
            }
        }
    }

    /// Removes `node` (and its implicit children) if it is implicit and nobody uses it:
    /// what an open that failed after opening its children leaves behind.
    pub(crate) async fn forget_orphan(&mut self, node: &Arc<Node>) {
        if node.is_implicit() && node.parents().is_empty() && self.nodes.contains_key(node.name()) {
            self.delete(node.clone()).await;
        }
    }

    async fn drop_implicit_children(&mut self, node: &Arc<Node>) {
        let _ = node.driver().close().await;
        for child in node.children() {
            remove_edge(&child.node, ParentKey::Node(node.name().to_string()));
            self.forget_orphan(&child.node).await;
        }
    }

    /// `blockdev-del`: removes a monitor-owned node nobody uses, and its implicit children.
    pub async fn remove(&mut self, name: &str) -> Result<()> {
        let node = self
            .get(name)
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))?;
        let parents = node.parents();
        if parents.iter().any(|e| matches!(e.key, ParentKey::User(_))) {
            return Err(Error::NodeHasUsers(name.to_string()));
        }
        if let Some(parent) = node.backing_parent() {
            return Err(Error::BackingInUse {
                node: name.to_string(),
                parent,
            });
        }
        // QEMU's order: users, a backing file in use, then ownership.
        if node.is_implicit() {
            return Err(Error::NotMonitorOwned(name.to_string()));
        }
        if !parents.is_empty() || node.is_held() {
            return Err(Error::NodeHasParents(name.to_string()));
        }
        self.delete(node).await;
        Ok(())
    }

    fn delete(&mut self, node: Arc<Node>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            node.gate().drain().await;
            self.nodes.shift_remove(node.name());
            // Nothing can report a close failure here (QEMU ignores it too); the image
            // stays as consistent as its last flush.
            let _ = node.close().await;
            for child in node.children() {
                remove_edge(&child.node, ParentKey::Node(node.name().to_string()));
                if child.node.is_implicit() && child.node.parents().is_empty() {
                    self.delete(child.node.clone()).await;
                }
            }
            node.gate().undrain();
        })
    }

    /// Closes every node, parents before children.
    pub async fn close_all(&mut self) {
        while let Some((_, node)) = self.nodes.pop() {
            // Flush goes through the gate, so it must come before the drain.
            let _ = node.flush().await;
            node.gate().drain().await;
            let _ = node.close().await;
            for child in node.children() {
                remove_edge(&child.node, ParentKey::Node(node.name().to_string()));
            }
            node.gate().undrain();
        }
    }

    /// Attaches a user to `node_name` holding `perm` and sharing `shared`. `name` is the
    /// user's name for messages and the graph dump ("" = an unnamed block device).
    pub fn attach(&self, node_name: &str, perm: Perm, shared: Perm, name: &str) -> Result<Backend> {
        let node = self
            .get(node_name)
            .ok_or_else(|| Error::NodeNotFound(node_name.to_string()))?;
        attach_user(&node, perm, shared, name, &self.users)
    }

    /// Attaches block job `job`'s edge named `role` (`main node`, `target`) to `node_name`.
    pub fn attach_job(
        &self,
        node_name: &str,
        perm: Perm,
        shared: Perm,
        job: &str,
        role: &str,
    ) -> Result<Backend> {
        let node = self
            .get(node_name)
            .ok_or_else(|| Error::NodeNotFound(node_name.to_string()))?;
        attach_as(&node, perm, shared, job, role, &self.users)
    }

    /// `x-blockdev-amend`'s checks, in QEMU's order: the node exists, `driver` (the
    /// options' branch) is the node's driver, and that driver can amend. The hold keeps
    /// the node out of `blockdev-del` until the job lets it go.
    pub fn amend_target(&self, node_name: &str, driver: &str) -> Result<NodeHold> {
        let node = self.get(node_name).ok_or_else(|| Error::DeviceNotFound {
            device: String::new(),
            node: node_name.to_string(),
        })?;
        if node.driver_name() != driver {
            return Err(Error::AmendChangesDriver);
        }
        if !node.driver().can_amend() {
            return Err(Error::AmendNotSupported);
        }
        Ok(NodeHold::new(node))
    }

    /// `block_resize`: looks the node up as QMP's `device` / `node-name`, takes the
    /// resize permission for the duration, drains the node and truncates it.
    pub async fn resize(
        &mut self,
        device: Option<&str>,
        node_name: Option<&str>,
        size: i64,
    ) -> Result<()> {
        let node = node_name
            .and_then(|n| self.get(n))
            .ok_or_else(|| Error::DeviceNotFound {
                device: device.unwrap_or("").to_string(),
                node: node_name.unwrap_or("").to_string(),
            })?;
        let size = u64::try_from(size).map_err(|_| Error::NegativeSize)?;
        if node.is_read_only() {
            return Err(Error::ImageReadOnly);
        }
        let user = attach_user(&node, Perm::RESIZE, Perm::ALL, "", &self.users)?;
        node.gate().drain().await;
        let result = node.truncate(size).await;
        node.gate().undrain();
        drop(user);
        result
    }

    /// Inserts a filter node above `below`: opens `driver` as node `name` (a generated
    /// `#block…` name when `None`) with `children` (the first is `below` itself), drains
    /// `below`, and moves every user of `below` onto the filter, so all their requests pass
    /// through it. Node parents of `below` cannot be moved yet: such a node is refused.
    pub async fn insert_filter(
        &mut self,
        below: &str,
        name: Option<String>,
        driver: Box<dyn BlockDriver>,
        children: Vec<Child>,
    ) -> Result<Arc<Node>> {
        let node = self
            .get(below)
            .ok_or_else(|| Error::NodeNotFound(below.to_string()))?;
        let parents = node.parents();
        // A parent that reads the node as its backing file writes nothing through it, so it
        // may keep reading the node directly: a filter only has to see writes. Any other
        // node parent would bypass the filter.
        if let Some(parent) = writing_node_parent(&parents) {
            return Err(Error::FormatOption(format!(
                "Cannot insert a filter above node '{below}': it is a child of node '{parent}'"
            )));
        }
        if let Some(name) = &name {
            validate_node_name(name)?;
            if self.nodes.contains_key(name) {
                return Err(Error::DuplicateNodeName(name.clone()));
            }
        }
        let mut slot = name;
        let name = self.name_now(&mut slot);
        let flags = NodeFlags {
            active: true,
            ..node.flags()
        };
        let filter = Arc::new(Node::new(name.clone(), true, driver, flags, children));
        let users: Vec<ParentEdge> = parents
            .into_iter()
            .filter(|e| matches!(e.key, ParentKey::User(_)))
            .collect();
        node.gate().drain().await;
        let result = self.move_parents(&node, &filter, &users);
        let result = result.and_then(|()| {
            for child in filter.children() {
                let key = ParentKey::Node(name.clone());
                let (perm, shared) = child.role.child_perms(Perm::NONE, Perm::ALL);
                let edge = ParentEdge {
                    key: key.clone(),
                    desc: format!("node '{name}'"),
                    role: child.name.clone(),
                    perm,
                    shared,
                };
                update_edge(&child.node, key, Some(edge))?;
            }
            // The users' permissions reach the source through the filter now.
            recompute_children(&filter)
        });
        if let Err(err) = result {
            for child in filter.children() {
                remove_edge(&child.node, ParentKey::Node(name.clone()));
            }
            let _ = self.move_parents(&filter, &node, &users);
            node.gate().undrain();
            return Err(err);
        }
        self.nodes.insert(name, filter.clone());
        node.gate().undrain();
        Ok(filter)
    }

    /// Makes node `name` read-only (QEMU reopens a snapshot's old image so): it takes
    /// no write on its file any more.
    pub fn reopen_read_only(&mut self, name: &str) -> Result<()> {
        let node = self
            .get(name)
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))?;
        reopen_subtree_read_only(&node)
    }

    /// Moves the parent edges `edges` of `from` (users, and node parents whose drivers can
    /// re-point the child) onto `to`, all or nothing: each edge is checked on `to` as it
    /// comes off `from`, and only when every one fits do the users and the parents' drivers
    /// switch over. The caller drained the node parents, then `from`.
    fn move_parents(&self, from: &Arc<Node>, to: &Arc<Node>, edges: &[ParentEdge]) -> Result<()> {
        let mut placed: Vec<&ParentEdge> = Vec::new();
        let mut failed = None;
        for edge in edges {
            remove_edge(from, edge.key.clone());
            if let Err(err) = update_edge(to, edge.key.clone(), Some(edge.clone())) {
                failed = Some(err);
                // It held this edge a moment ago, so it fits again.
                let _ = update_edge(from, edge.key.clone(), Some(edge.clone()));
                break;
            }
            placed.push(edge);
        }
        if failed.is_none() {
            failed = self.switch_parents(from, to, edges).err();
        }
        let Some(err) = failed else {
            return Ok(());
        };
        for edge in placed.into_iter().rev() {
            remove_edge(to, edge.key.clone());
            let _ = update_edge(from, edge.key.clone(), Some(edge.clone()));
        }
        Err(err)
    }

    /// Points the users and node parents among `edges` at `to` (their edges are there);
    /// a driver that refuses puts back the ones switched before it.
    fn switch_parents(&self, from: &Arc<Node>, to: &Arc<Node>, edges: &[ParentEdge]) -> Result<()> {
        let users = self.live_users();
        for (i, edge) in edges.iter().enumerate() {
            if let Err(err) = self.switch_parent(&users, edge, to) {
                for edge in edges[..i].iter().rev() {
                    // The driver took this child before the switch, so it takes it again.
                    let _ = self.switch_parent(&users, edge, from);
                }
                return Err(err);
            }
        }
        Ok(())
    }

    fn switch_parent(
        &self,
        users: &[Arc<UserRecord>],
        edge: &ParentEdge,
        to: &Arc<Node>,
    ) -> Result<()> {
        match &edge.key {
            ParentKey::User(id) => {
                if let Some(user) = users.iter().find(|u| u.id == *id) {
                    user.set_node(to.clone());
                }
            }
            ParentKey::Node(name) => {
                let parent = self
                    .get(name)
                    .ok_or_else(|| Error::NodeNotFound(name.clone()))?;
                parent.driver().replace_child(&edge.role, to.clone())?;
                parent.set_child_node(&edge.role, to.clone());
            }
        }
        Ok(())
    }

    /// Puts node `to` in the place of node `from` for the parents `edges` of `from`
    /// (see [`Self::move_parents`]): requests already inside a node parent finish on
    /// `from`, so the parents are drained first, then `from`, and reopened after the switch.
    pub(crate) async fn replace_node(
        &self,
        from: &Arc<Node>,
        to: &Arc<Node>,
        edges: &[ParentEdge],
    ) -> Result<()> {
        let parents: Vec<Arc<Node>> = edges
            .iter()
            .filter_map(|e| match &e.key {
                ParentKey::Node(name) => Some(
                    self.get(name)
                        .ok_or_else(|| Error::NodeNotFound(name.clone())),
                ),
                ParentKey::User(_) => None,
            })
            .collect::<Result<_>>()?;
        for parent in &parents {
            parent.gate().drain().await;
        }
        from.gate().drain().await;
        let result = self.move_parents(from, to, edges);
        from.gate().undrain();
        for parent in parents.iter().rev() {
            parent.gate().undrain();
        }
        result
    }

    /// Removes a filter that [`BlockGraph::insert_filter`] put in: its users go back to the
    /// node below (its first child) and the filter leaves the graph. Requests already in
    /// the filter finish there; new ones go straight to the node below.
    pub fn remove_filter(&mut self, name: &str) -> Result<()> {
        let filter = self
            .get(name)
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))?;
        let below = filter
            .children()
            .first()
            .map(|c| c.node.clone())
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))?;
        let edges: Vec<ParentEdge> = filter
            .parents()
            .into_iter()
            .filter(|e| matches!(e.key, ParentKey::User(_)))
            .collect();
        // Off the filter first (which relaxes its own edges), then the filter's edges go,
        // and only then do the users' edges fit on the node below.
        for edge in &edges {
            remove_edge(&filter, edge.key.clone());
        }
        for child in filter.children() {
            remove_edge(&child.node, ParentKey::Node(name.to_string()));
        }
        self.nodes.shift_remove(name);
        let users = self.live_users();
        let mut result = Ok(());
        for edge in edges {
            let ParentKey::User(id) = edge.key else {
                continue;
            };
            // Each of them held this edge on the node below before the filter came.
            if let Err(err) = update_edge(&below, edge.key.clone(), Some(edge)) {
                result = Err(err);
                continue;
            }
            if let Some(user) = users.iter().find(|u| u.id == id) {
                user.set_node(below.clone());
            }
        }
        result
    }

    /// `x-debug-query-block-graph`.
    pub fn debug_graph(&self) -> GraphDump {
        let mut ids: IndexMap<String, u64> = IndexMap::new();
        let mut next = 1u64;
        let mut id_of = |key: String, ids: &mut IndexMap<String, u64>| -> u64 {
            *ids.entry(key).or_insert_with(|| {
                let id = next;
                next += 1;
                id
            })
        };
        let mut nodes = Vec::new();
        let mut edges = Vec::new();
        // QEMU lists a job's nodes newest edge first.
        let mut users: Vec<Arc<UserRecord>> = Vec::new();
        for user in self.live_users() {
            let first = users
                .iter()
                .position(|u| u.job && user.job && u.name == user.name);
            match first {
                Some(at) => users.insert(at, user),
                None => users.push(user),
            }
        }
        for user in users {
            // A job is one vertex, whatever number of edges it holds.
            let key = if user.job {
                format!("job:{}", user.name)
            } else {
                format!("user:{}", user.id)
            };
            let seen = ids.contains_key(&key);
            let id = id_of(key, &mut ids);
            if !seen {
                nodes.push(DumpNode {
                    id,
                    node_type: if user.job {
                        DumpNodeType::BlockJob
                    } else {
                        DumpNodeType::BlockBackend
                    },
                    name: user.name.clone(),
                });
            }
            let user_node = user.node();
            let child = id_of(format!("node:{}", user_node.name()), &mut ids);
            if let Some(edge) = user_node
                .parents()
                .into_iter()
                .find(|e| e.key == ParentKey::User(user.id))
            {
                edges.push(dump_edge(id, child, &edge));
            }
        }
        for node in self.nodes.values() {
            let id = id_of(format!("node:{}", node.name()), &mut ids);
            nodes.push(DumpNode {
                id,
                node_type: DumpNodeType::BlockDriver,
                name: node.name().to_string(),
            });
            for child in node.children() {
                let cid = id_of(format!("node:{}", child.node.name()), &mut ids);
                let key = ParentKey::Node(node.name().to_string());
                if let Some(edge) = child.node.parents().into_iter().find(|e| e.key == key) {
                    edges.push(dump_edge(id, cid, &edge));
                }
            }
        }
        nodes.reverse();
        edges.reverse();
        GraphDump { nodes, edges }
    }

    fn live_users(&self) -> Vec<Arc<UserRecord>> {
        let mut users = match self.users.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        users.retain(|u| u.strong_count() > 0);
        users.iter().filter_map(Weak::upgrade).collect()
    }
}

/// A node parent that could write through the node: one that does not merely read it as
/// its backing file. Such a parent would bypass a filter put above the node, since only
/// users move onto a filter.
fn writing_node_parent(parents: &[ParentEdge]) -> Option<&str> {
    parents.iter().find_map(|e| match &e.key {
        ParentKey::Node(n) if e.role != "backing" => Some(n.as_str()),
        _ => None,
    })
}

/// Makes `node` read-only, and the children it opened itself (which inherit its options),
/// parents first so each recomputes what it takes from its children.
fn reopen_subtree_read_only(node: &Arc<Node>) -> Result<()> {
    node.set_reopened_read_only(true);
    recompute_children(node)?;
    for child in node.children() {
        if child.node.is_implicit() && child.role != ChildRole::Cow {
            reopen_subtree_read_only(&child.node)?;
        }
    }
    Ok(())
}

/// Sets the edges from `node` to its children from `node`'s current parents.
fn recompute_children(node: &Arc<Node>) -> Result<()> {
    let parents = node.parents();
    let (perm, shared) = cumulative(&parents);
    for child in node.children() {
        let key = ParentKey::Node(node.name().to_string());
        let role = node.role_of(&child);
        let (cp, cs) = role.child_perms_of(perm, shared, !parents.is_empty());
        let edge = ParentEdge {
            key: key.clone(),
            desc: format!("node '{}'", node.name()),
            role: child.name.clone(),
            perm: cp,
            shared: cs,
        };
        update_edge(&child.node, key, Some(edge))?;
    }
    Ok(())
}

fn dump_edge(parent: u64, child: u64, edge: &ParentEdge) -> DumpEdge {
    DumpEdge {
        parent,
        child,
        name: edge.role.clone(),
        perm: edge.perm.names_for_dump(),
        shared_perm: edge.shared.names_for_dump(),
    }
}

fn attach_user(
    node: &Arc<Node>,
    perm: Perm,
    shared: Perm,
    name: &str,
    users: &Mutex<Vec<Weak<UserRecord>>>,
) -> Result<Backend> {
    attach_as(node, perm, shared, name, "root", users)
}

/// Attaches a user whose edge is named `role`: `root` for block backends, anything else
/// (`main node`, `target`) for a block job named `name`.
fn attach_as(
    node: &Arc<Node>,
    perm: Perm,
    shared: Perm,
    name: &str,
    role: &str,
    users: &Mutex<Vec<Weak<UserRecord>>>,
) -> Result<Backend> {
    let id = NEXT_USER_ID.fetch_add(1, Ordering::Relaxed);
    let desc = if role != "root" {
        format!("block job '{name}'")
    } else if name.is_empty() {
        "an unnamed block device".to_string()
    } else {
        format!("block device '{name}'")
    };
    let edge = ParentEdge {
        key: ParentKey::User(id),
        desc,
        role: role.into(),
        perm,
        shared,
    };
    update_edge(node, ParentKey::User(id), Some(edge))?;
    let record = Arc::new(UserRecord {
        id,
        name: name.to_string(),
        job: role != "root",
        node: Mutex::new(node.clone()),
    });
    let mut list = match users.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    list.push(Arc::downgrade(&record));
    Ok(Backend { record, perm })
}

impl Drop for UserRecord {
    fn drop(&mut self) {
        remove_edge(&self.node(), ParentKey::User(self.id));
    }
}

/// A way to see which node a user is on without keeping its edge alive.
#[derive(Clone, Debug)]
pub struct UserHandle(std::sync::Weak<UserRecord>);

impl UserHandle {
    /// The user's node now; `None` once the user is gone.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.0.upgrade().map(|r| r.node())
    }
}

impl Backend {
    /// The node this user is attached to (a filter inserted above the node it attached
    /// to takes its place).
    pub fn node(&self) -> Arc<Node> {
        self.record.node()
    }

    /// A handle that follows the user's node and does not keep the user alive.
    pub fn handle(&self) -> UserHandle {
        UserHandle(Arc::downgrade(&self.record))
    }

    /// The permissions this user holds.
    pub fn perm(&self) -> Perm {
        self.perm
    }

    fn need(&self, perm: Perm, name: &'static str) -> Result<()> {
        if self.perm.contains(perm) {
            Ok(())
        } else {
            Err(Error::PermissionNotTaken(name))
        }
    }

    /// Reads through the node.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.node().read(offset, buf).await
    }

    /// Writes through the node (needs `write`).
    pub async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.need(Perm::WRITE, "write")?;
        self.node().write(offset, buf, flags).await
    }

    /// Zeroes through the node (needs `write`).
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.need(Perm::WRITE, "write")?;
        self.node().write_zeroes(offset, len, flags).await
    }

    /// Discards through the node (needs `write`).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.need(Perm::WRITE, "write")?;
        self.node().discard(offset, len).await
    }

    /// Flushes the node.
    pub async fn flush(&self) -> Result<()> {
        self.node().flush().await
    }

    /// Block status of the node.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.node().block_status(offset, len).await
    }

    /// Size of the node.
    pub fn size(&self) -> u64 {
        self.node().size()
    }
}
