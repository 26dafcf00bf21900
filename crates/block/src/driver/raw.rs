//! `raw`: the format driver that shows its `file` child unchanged, or a window of it
//! (`offset`, `size`). It raises `read_aio` / `write_aio` on the child for every read and
//! write, as QEMU does. The child can be re-pointed after open (an overlay put in its
//! place by an external snapshot).

use async_trait::async_trait;
use serde_json::{Map, Value};
use std::sync::Arc;

use super::{BlockDriver, ChildSlot, DriverInfo, Extent, WriteFlags, ZeroFlags};
use crate::debug::DebugEvent;
use crate::error::{Error, Result};
use crate::filename::Filename;
use crate::node::Node;
use crate::perm::ChildRole;

/// Sector size `size` must be a multiple of.
const SECTOR: u64 = 512;

/// The `raw` driver over one child.
#[derive(Debug)]
pub struct RawDriver {
    child: ChildSlot,
    offset: u64,
    size: Option<u64>,
    given_offset: Option<u64>,
}

impl RawDriver {
    /// Opens a raw node over `child`, checking the window against the child's size.
    pub fn open(child: Arc<Node>, offset: Option<u64>, size: Option<u64>) -> Result<Self> {
        let file_size = child.size();
        let start = offset.unwrap_or(0);
        if start > file_size {
            return Err(Error::RawOffsetPastEnd {
                offset: start,
                file_size,
            });
        }
        if let Some(size) = size {
            if file_size - start < size {
                return Err(Error::RawWindowPastEnd {
                    offset: start,
                    size,
                    file_size,
                });
            }
            if size % SECTOR != 0 {
                return Err(Error::RawSizeUnaligned);
            }
        }
        Ok(Self {
            child: ChildSlot::new(child),
            offset: start,
            size,
            given_offset: offset,
        })
    }

    /// How the child edge passes permissions: a window is a data child that never
    /// lets others resize under it.
    pub fn child_role(&self) -> ChildRole {
        if self.given_offset.is_none() && self.size.is_none() {
            ChildRole::Filtered
        } else {
            ChildRole::Data
        }
    }
}

#[async_trait]
impl BlockDriver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        let available = self.child.get().size().saturating_sub(self.offset);
        match self.size {
            Some(size) => size.min(available),
            None => available,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let child = self.child.get();
        child.debug_event(DebugEvent::ReadAio);
        child.read(self.offset + offset, buf).await
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let child = self.child.get();
        child.debug_event(DebugEvent::WriteAio);
        child.write(self.offset + offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let child = self.child.get();
        child.write_zeroes(self.offset + offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.child.get().discard(self.offset + offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.child.get().flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let child = self.child.get();
        child.block_status(self.offset + offset, len).await
    }

    async fn truncate(&self, size: u64) -> Result<()> {
        if self.size.is_some() {
            return Err(Error::RawFixedSize);
        }
        let new = size.checked_add(self.offset).ok_or(Error::NegativeSize)?;
        self.child.get().truncate(new).await
    }

    fn filename(&self) -> Filename {
        let node = self.child.get();
        let child = node.driver().filename();
        let mut options = Map::new();
        options.insert("driver".into(), Value::from("raw"));
        if let Some(offset) = self.given_offset {
            options.insert("offset".into(), Value::from(offset));
        }
        if let Some(size) = self.size {
            options.insert("size".into(), Value::from(size));
        }
        let passthrough = options.len() == 1 && node.driver().is_protocol();
        options.insert("file".into(), Value::Object(child.options));
        Filename {
            exact: if passthrough { child.exact } else { None },
            options,
        }
    }

    /// The child's, as QEMU's raw format passes the question on.
    fn info(&self) -> DriverInfo {
        let child = self.child.get().driver().info();
        DriverInfo {
            actual_size: child.actual_size,
            dirty_flag: Some(child.dirty_flag.unwrap_or(false)),
            cluster_size: child.cluster_size,
            format_specific: None,
            ..DriverInfo::default()
        }
    }

    fn can_replace_child(&self, role_name: &str) -> bool {
        role_name == "file"
    }

    fn replace_child(&self, role_name: &str, node: Arc<Node>) -> Result<()> {
        self.child.replace("file", role_name, node)
    }
}
