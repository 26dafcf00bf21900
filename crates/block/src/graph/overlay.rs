//! Backing children attached after open, and overlays put above a node (external
//! snapshots).
//!
//! A format node that supports backing files can get one after it was opened (an overlay
//! added with `backing: null`), or lose it again: the parent edge is registered at the
//! backing node first, with the permissions a backing child of this node takes now, so a
//! conflict changes nothing; then, under a drain of the overlay, the child list and the
//! driver switch over. Appending an overlay to a node attaches the node as the overlay's
//! backing child and moves the node's users onto the overlay; undoing it moves exactly
//! those users back and detaches the backing child again.

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
    /// The users' edges that moved from the base to the overlay.
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
                    role: "backing",
                    parent: top.name().to_string(),
                });
            }
            if !top.driver().supports_backing() {
                return Err(Error::BackingNotSupported);
            }
            let same = old.as_ref().is_some_and(|o| Arc::ptr_eq(o, new));
            if !same && new.parents().iter().any(|e| e.key == key) {
                // One edge per parent and child: the overlay uses the node otherwise.
                return Err(Error::FormatOption(format!(
                    "Node '{}' is already a child of node '{}'",
                    new.name(),
                    top.name()
                )));
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
        top.gate().drain().await;
        let swapped = top.driver().replace_backing(new.clone());
        if swapped.is_ok() {
            top.set_backing_child(new.clone());
        }
        top.gate().undrain();
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
    /// user of `base` (exports, jobs) moves onto it. On failure nothing changed.
    pub async fn append_overlay(&mut self, base: &str, overlay: &str) -> Result<Appended> {
        let old = self.node(base)?;
        let new = self.node(overlay)?;
        let moved: Vec<ParentEdge> = old
            .parents()
            .into_iter()
            .filter(|e| matches!(e.key, ParentKey::User(_)))
            .collect();
        self.attach_backing(overlay, Some(base)).await?;
        if let Err(err) = self.replace_for_users(base, overlay).await {
            // The users that moved before the one that did not fit go back.
            self.move_back(&new, &old, &moved).await;
            let _ = self.attach_backing(overlay, None).await;
            return Err(err);
        }
        Ok(Appended {
            base: old,
            overlay: new,
            moved,
        })
    }

    /// Undoes [`Self::append_overlay`]: the users that moved go back to the base and the
    /// overlay loses its backing child (it stays in the graph).
    pub async fn undo_overlay(&mut self, appended: Appended) {
        let Appended {
            base,
            overlay,
            moved,
        } = appended;
        self.move_back(&overlay, &base, &moved).await;
        // Both sides were in this arrangement before: detaching only relaxes edges.
        let _ = self.attach_backing(overlay.name(), None).await;
    }

    async fn move_back(&self, from: &Arc<Node>, to: &Arc<Node>, edges: &[ParentEdge]) {
        from.gate().drain().await;
        // Each user held its edge on `to` a moment ago, so it fits there again.
        let _ = self.move_users(from, to, edges);
        from.gate().undrain();
    }
}
