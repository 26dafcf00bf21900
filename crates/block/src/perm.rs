//! Permissions on graph edges, as QEMU's `BLK_PERM_*`.
//!
//! Every parent of a node (another node through a child edge, or a user such as an
//! export or a job) records two sets on its edge: `perm`, what it needs, and `shared`,
//! what it lets every other parent do.
//!
//! Invariants, checked before any edge changes and never broken afterwards:
//! - for any two parents A ≠ B of a node, `A.perm & !B.shared` is empty;
//! - no parent of a read-only node holds `write` or `resize` ("Block node is read-only");
//! - a node's cumulative perm (union over parents) and shared (intersection; all when it
//!   has no parents) determine the edges to its children and, for `file` nodes, which
//!   image lock bytes are held (see `driver::file`).

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};

/// A set of `BLK_PERM_*` bits.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Perm(u8);

impl Perm {
    /// Nothing.
    pub const NONE: Perm = Perm(0);
    /// Reads return consistent data (bit 0).
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// May change the data (bit 1).
    pub const WRITE: Perm = Perm(2);
    /// May write data that does not change what a reader sees (bit 2).
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// May change the size (bit 3).
    pub const RESIZE: Perm = Perm(8);
    /// Every permission.
    pub const ALL: Perm = Perm(15);

    /// QEMU's names, indexed by bit number.
    pub const NAMES: [&'static str; 4] = ["consistent-read", "write", "write-unchanged", "resize"];

    /// The raw bits (bit i = lock byte 100 + i / 200 + i).
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Builds from raw bits; unknown bits are dropped.
    pub fn from_bits(bits: u8) -> Perm {
        Perm(bits & Self::ALL.0)
    }

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no bit is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The names of the set bits in ascending bit order (as conflict messages list them).
    pub fn names(self) -> Vec<&'static str> {
        (0..4)
            .filter(|i| self.0 & (1 << i) != 0)
            .map(|i| Self::NAMES[i])
            .collect()
    }

    /// The names in the order `x-debug-query-block-graph` prints them (descending bits).
    pub fn names_for_dump(self) -> Vec<&'static str> {
        let mut names = self.names();
        names.reverse();
        names
    }

    /// Names joined by ", " as QEMU's conflict messages show them.
    pub fn joined_names(self) -> String {
        self.names().join(", ")
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, rhs: Perm) -> Perm {
        Perm(self.0 & rhs.0)
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Self::ALL.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm{:?}", self.names())
    }
}

/// How a parent uses a child edge, which decides the child's permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildRole {
    /// The parent passes requests through unchanged (raw without offset/size):
    /// the child gets exactly the parent's cumulative perm and shared sets.
    Filtered,
    /// The child stores the parent's data at some mapping (raw with a window):
    /// as filtered, but resizing the child under the parent is never shared.
    Data,
    /// The `file` child of a format driver, holding its data and metadata: always read,
    /// written and resized when the node is writable; others may only read it or write
    /// without changing what it reads.
    Metadata {
        /// The parent node is writable.
        writable: bool,
    },
    /// The source below a copy-before-write filter: the filter's users' permissions plus
    /// consistent reads (it copies old data); nobody else may write or resize it, or the
    /// copy would miss the change. With `discard` (backup's `discard-source`) the filter
    /// writes it too: copied clusters are discarded.
    CbwSource {
        /// The source is discarded behind the copy.
        discard: bool,
    },
    /// The target a copy-before-write filter copies to: written; others may read and write.
    CbwTarget,
    /// `snapshot-access`'s copy-before-write node: it reads the snapshot through the
    /// filter's state, not through the node, so it takes nothing and shares everything.
    Snapshot,
    /// A `backing` child: read when the parent's users need consistent reads; others
    /// may change it only when the parent's users allow writes.
    Cow,
    /// blkdebug's `image` child: as filtered, plus the permissions `take-child-perms`
    /// adds and minus those `unshare-child-perms` stops sharing.
    Debug { take: Perm, unshare: Perm },
}

impl ChildRole {
    /// [`ChildRole::child_perms`] for a parent that may have no parents of its own: a
    /// copy-before-write filter nobody uses yet takes nothing of its source and shares all.
    pub fn child_perms_of(self, perm: Perm, shared: Perm, has_parents: bool) -> (Perm, Perm) {
        match self {
            ChildRole::CbwSource { .. } if !has_parents => (Perm::NONE, Perm::ALL),
            _ => self.child_perms(perm, shared),
        }
    }

    /// The (perm, shared) for a child edge given the parent's cumulative sets.
    pub fn child_perms(self, perm: Perm, shared: Perm) -> (Perm, Perm) {
        match self {
            ChildRole::Filtered => (perm, shared),
            ChildRole::CbwSource { discard } => (
                perm | Perm::CONSISTENT_READ | if discard { Perm::WRITE } else { Perm::NONE },
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            ),
            ChildRole::Snapshot => (Perm::NONE, Perm::ALL),
            ChildRole::CbwTarget => (
                Perm::WRITE,
                Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED,
            ),
            ChildRole::Debug { take, unshare } => (perm | take, shared & !unshare),
            ChildRole::Data => (perm, shared & !Perm::RESIZE),
            ChildRole::Metadata { writable } => {
                let mut child = Perm::CONSISTENT_READ | (perm & Perm::WRITE_UNCHANGED);
                if writable {
                    child = child | Perm::WRITE | Perm::RESIZE;
                }
                let shared = (shared & !(Perm::WRITE | Perm::RESIZE)) | Perm::WRITE_UNCHANGED;
                (child, shared)
            }
            ChildRole::Cow => {
                let child = perm & Perm::CONSISTENT_READ;
                let mut others = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
                if shared.contains(Perm::WRITE) {
                    others = others | Perm::WRITE | Perm::RESIZE;
                }
                (child, others)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_order_is_descending_bits() {
        assert_eq!(
            Perm::ALL.names_for_dump(),
            ["resize", "write-unchanged", "write", "consistent-read"]
        );
        assert_eq!(
            (Perm::WRITE | Perm::CONSISTENT_READ).names_for_dump(),
            ["write", "consistent-read"]
        );
    }

    #[test]
    fn writable_format_file_child_is_written_and_resized_but_not_shared() {
        let (perm, shared) =
            ChildRole::Metadata { writable: true }.child_perms(Perm::NONE, Perm::ALL);
        assert_eq!(
            perm.names_for_dump(),
            ["resize", "write", "consistent-read"]
        );
        assert_eq!(
            shared.names_for_dump(),
            ["write-unchanged", "consistent-read"]
        );
    }

    #[test]
    fn unused_backing_child_takes_nothing_and_shares_all() {
        let (perm, shared) = ChildRole::Cow.child_perms(Perm::NONE, Perm::ALL);
        assert_eq!(perm, Perm::NONE);
        assert_eq!(shared, Perm::ALL);
    }

    #[test]
    fn not_stays_within_known_bits() {
        assert_eq!(!Perm::RESIZE, Perm::from_bits(7));
        assert_eq!(!Perm::ALL, Perm::NONE);
    }

    #[test]
    fn data_child_never_shares_resize() {
        let (perm, shared) = ChildRole::Data.child_perms(Perm::NONE, Perm::ALL);
        assert_eq!(perm, Perm::NONE);
        assert_eq!(
            shared.names_for_dump(),
            ["write-unchanged", "write", "consistent-read"]
        );
    }
}
