//! Backing children attached after open, and overlays put above a node (external
//! snapshots).
//!
//! A format node that supports backing files can get one after it was opened (an overlay
//! added with `backing: null`), or lose it again: the parent edge is registered at the
//! backing node first, with the permissions a backing child of this node takes now, so a
//! conflict changes nothing; then, under a drain of the overlay, the child list and the
//! driver switch over. Appending an overlay to a node attaches the node as the overlay's
//! backing child and moves every other parent of the node onto the overlay: users
//! (exports, jobs) and node parents (a `raw` or `blkdebug` node opened on top of it, a
//! qcow2 node whose `file` it is), but not nodes that read it as their backing file.
//! Undoing it moves exactly those parents back and detaches the backing child again.

use std::sync::Arc;

use super::{remove_edge, update_edge, BlockGraph};
use crate::error::{Error, Result};
use crate::node::{Node, ParentEdge, ParentKey};
use crate::perm::ChildRole;

/// An overlay [`BlockGraph::append_overlay`] put in place, for
/// [`BlockGraph::undo_overlay`].
#[derive(Debug)]
pub struct Appended {
    base: Arc<Node>,
    overlay: Arc<Node>,
    /// The parent edges that moved from the base to the overlay.
    moved: Vec<ParentEdge>,
}

impl Appended {
    /// The node the overlay went above (now its backing child).
    pub fn base(&self) -> &Arc<Node> {
        &self.base
    }

    /// The overlay.
    pub fn overlay(&self) -> &Arc<Node> {
        &self.overlay
    }
}

impl BlockGraph {
    fn node(&self, name: &str) -> Result<Arc<Node>> {
        self.get(name)
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))
    }

    /// Makes node `backing` the backing child of node `overlay`, or with `None` takes its
    /// backing child away. Refused when it would make a cycle, when the driver has no
    /// backing files, and when the backing node cannot give what the overlay's parents
    /// need through it (QEMU's permission messages); nothing changes then.
    pub async fn attach_backing(&mut self, overlay: &str, backing: Option<&str>) -> Result<()> {
        let top = self.node(overlay)?;
        let new = backing.map(|name| self.node(name)).transpose()?;
        let old = top.backing();
        let key = ParentKey::Node(top.name().to_string());
        if let Some(new) = &new {
            if new.reaches(&top) {
                return Err(Error::Cycle {
                    child: new.name().to_string(),
                    role: "backing".into(),
                    parent: top.name().to_string(),
                });
            }
            if !top.driver().supports_backing() {
                return Err(Error::BackingNotSupported);
            }
            let same = old.as_ref().is_some_and(|o| Arc::ptr_eq(o, new));
            if !same && new.parents().iter().any(|e| e.key == key) {
                // One edge per parent and child: the overlay uses the node otherwise.
                return Err(already_child(new, &top));
            }
            let (perm, shared) = top.cumulative_perms();
            let (perm, shared) = ChildRole::Cow.child_perms(perm, shared);
            let edge = ParentEdge {
                key: key.clone(),
                desc: format!("node '{}'", top.name()),
                role: "backing".into(),
                perm,
                shared,
            };
            update_edge(new, key.clone(), Some(edge))?;
        }
        let swapped = {
            let _quiet = top.gate().drained().await;
            let swapped = top.driver().replace_backing(new.clone());
            if swapped.is_ok() {
                top.set_backing_child(new.clone());
            }
            swapped
        };
        match swapped {
            Ok(()) => {
                if let Some(old) = old.filter(|o| !new.as_ref().is_some_and(|n| Arc::ptr_eq(o, n)))
                {
                    remove_edge(&old, key);
                }
                Ok(())
            }
            Err(err) => {
                if let Some(new) = new.filter(|n| !old.as_ref().is_some_and(|o| Arc::ptr_eq(o, n)))
                {
                    remove_edge(&new, key);
                }
                Err(err)
            }
        }
    }

    /// Puts node `overlay` above node `base`: `base` becomes its backing child and every
    /// other parent of `base` (users, and node parents other than backing readers) moves
    /// onto it. Refused before anything changes when a parent's driver cannot change its
    /// child; on any failure nothing changed.
    pub async fn append_overlay(&mut self, base: &str, overlay: &str) -> Result<Appended> {
        let old = self.node(base)?;
        let new = self.node(overlay)?;
        let moved = movable_parents(&old, Some(overlay));
        self.check_movable(&old, Some(&new), &moved)?;
        self.attach_backing(overlay, Some(base)).await?;
        if let Err(err) = self.replace_node(&old, &new, &moved).await {
            let _ = self.attach_backing(overlay, None).await;
            return Err(err);
        }
        Ok(Appended {
            base: old,
            overlay: new,
            moved,
        })
    }

    /// Checks that an overlay could take the place of node `name` for its parents: that
    /// each node parent's driver can change that child (`copy-before-write` and
    /// `snapshot-access` cannot). What an external snapshot asks before it creates anything.
    pub fn check_replaceable(&self, name: &str) -> Result<()> {
        let node = self.node(name)?;
        self.check_movable(&node, None, &movable_parents(&node, None))
    }

    /// Checks, changing nothing, that every node parent among `edges` (parent edges of
    /// `from`) could use another node, and `to` when given, as that child instead.
    fn check_movable(
        &self,
        from: &Arc<Node>,
        to: Option<&Arc<Node>>,
        edges: &[ParentEdge],
    ) -> Result<()> {
        for edge in edges {
            let ParentKey::Node(name) = &edge.key else {
                continue;
            };
            let parent = self.node(name)?;
            if !parent.driver().can_replace_child(&edge.role) {
                return Err(Error::ChildNotReplaceable {
                    node: from.name().to_string(),
                    role: edge.role.clone(),
                    parent: name.clone(),
                    driver: parent.driver_name(),
                });
            }
            let Some(to) = to else {
                continue;
            };
            if to.reaches(&parent) {
                return Err(Error::Cycle {
                    child: to.name().to_string(),
                    role: edge.role.clone(),
                    parent: name.clone(),
                });
            }
            if to.parents().iter().any(|e| e.key == edge.key) {
                return Err(already_child(to, &parent));
            }
        }
        Ok(())
    }

    /// Undoes [`Self::append_overlay`]: the parents that moved go back to the base and the
    /// overlay loses its backing child (it stays in the graph).
    pub async fn undo_overlay(&mut self, appended: Appended) {
        let Appended {
            base,
            overlay,
            moved,
        } = appended;
        // The edges as they are now (a parent may have changed its permissions since, or
        // gone away).
        let now = overlay.parents();
        let back: Vec<ParentEdge> = moved
            .iter()
            .filter_map(|m| now.iter().find(|e| e.key == m.key).cloned())
            .collect();
        // Each parent held its edge on the base before, beside the overlay's backing edge
        // as it was then, so they fit again.
        let _ = self.replace_node(&overlay, &base, &back).await;
        // Both sides were in this arrangement before: detaching only relaxes edges.
        let _ = self.attach_backing(overlay.name(), None).await;
    }
}

/// The parent edges of `node` an overlay put in its place takes over: every user and
/// node parent but the overlay itself and the nodes reading `node` as their backing file.
fn movable_parents(node: &Node, overlay: Option<&str>) -> Vec<ParentEdge> {
    node.parents()
        .into_iter()
        .filter(|e| match &e.key {
            ParentKey::User(_) => true,
            ParentKey::Node(parent) => e.role != "backing" && Some(parent.as_str()) != overlay,
        })
        .collect()
}

/// QEMU's refusal of a second edge between the same parent and child.
fn already_child(child: &Node, parent: &Node) -> Error {
    Error::FormatOption(format!(
        "Node '{}' is already a child of node '{}'",
        child.name(),
        parent.name()
    ))
}
