//! Debug events (QEMU's `BlkdebugEvent`): named points of the block layer that a node, or
//! the format driver above it, announces just before it gets there. Only `blkdebug` nodes
//! act on them (arming error rules or changing state); every other driver ignores them.
//!
//! Who raises what, as QEMU does it:
//! - a node being written raises `pwritev` / `pwritev_zero` before and `pwritev_done` after
//!   the write on itself, and the `pwritev_rmw_*` events around the read-modify-write of an
//!   unaligned write;
//! - a node being flushed raises `flush_to_os`, and `flush_to_disk` when it was written
//!   since its last flush, on its primary child (`file` / `image`);
//! - `raw` raises `read_aio` / `write_aio` on its `file` child for every guest read/write;
//! - `qcow2` raises on its `file` child `read_aio` / `write_aio` once per guest request
//!   (QEMU raises them per cluster run, just before the data I/O) and `read_backing_aio`
//!   when a read falls through to the backing file. Its metadata events (`l1_update`,
//!   `l2_load`, `l2_update`, `refblock_update`, `cluster_alloc`, …) are accepted in rules
//!   but not raised yet: the qcow2 library has no hook for them;
//! - a `blkdebug` node raises `none` on itself once, when it opens.

use serde::Deserialize;

macro_rules! debug_events {
    ($($variant:ident = $name:literal,)*) => {
        /// `BlkdebugEvent`, in QEMU's order.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
        pub enum DebugEvent {
            $(#[serde(rename = $name)] $variant,)*
        }

        impl DebugEvent {
            /// Every event, in schema order.
            pub const ALL: &'static [DebugEvent] = &[$(DebugEvent::$variant,)*];

            /// The QAPI spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DebugEvent::$variant => $name,)*
                }
            }
        }
    };
}

debug_events! {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
}

impl DebugEvent {
    /// The event named `name` (QAPI spelling).
    pub fn parse(name: &str) -> Option<DebugEvent> {
        Self::ALL.iter().copied().find(|e| e.as_str() == name)
    }
}

/// `BlkdebugIOType`: the kind of request an error rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl IoType {
    /// Every type, in schema order.
    pub const ALL: [IoType; 6] = [
        IoType::Read,
        IoType::Write,
        IoType::WriteZeroes,
        IoType::Discard,
        IoType::Flush,
        IoType::BlockStatus,
    ];

    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::WriteZeroes => "write-zeroes",
            IoType::Discard => "discard",
            IoType::Flush => "flush",
            IoType::BlockStatus => "block-status",
        }
    }

    /// The type named `name` (QAPI spelling).
    pub fn parse(name: &str) -> Option<IoType> {
        Self::ALL.iter().copied().find(|t| t.as_str() == name)
    }

    /// This type's bit in a rule's mask.
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_qemus_48_in_order() {
        assert_eq!(DebugEvent::ALL.len(), 48);
        assert_eq!(DebugEvent::ALL[0].as_str(), "l1_update");
        assert_eq!(DebugEvent::parse("write_aio"), Some(DebugEvent::WriteAio));
        assert_eq!(DebugEvent::parse("preadv"), None);
    }

    #[test]
    fn events_deserialize_from_their_qapi_names() {
        let event: DebugEvent = serde_json::from_value(serde_json::json!("flush_to_disk")).unwrap();
        assert_eq!(event, DebugEvent::FlushToDisk);
    }
}
