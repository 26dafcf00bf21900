//! blockd's block layer: the graph of nodes, their permissions and drain gates, and the
//! drivers that do the I/O (`file`, `raw`, `null-co`, `qcow2`, and the fault-injecting
//! `blkdebug`).
//!
//! It knows nothing of JSON text, QMP or NBD: the daemon hands it typed options
//! ([`BlockdevOptions`]) and maps its [`Error`]s to QMP errors; exports and jobs do
//! I/O through [`Node`] and [`Backend`] handles.
//!
//! ```no_run
//! # async fn demo() -> Result<(), block::Error> {
//! use block::{BlockGraph, BlockdevOptions, Perm};
//! let mut graph = BlockGraph::new();
//! let opts: BlockdevOptions = serde_json::from_value(serde_json::json!(
//!     {"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": "a.img"}}
//! )).expect("valid options");
//! graph.add(opts).await?;
//! let user = graph.attach("r0", Perm::CONSISTENT_READ | Perm::WRITE,
//!                         Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED, "")?;
//! user.write(0, &[1; 512], Default::default()).await?;
//! # Ok(()) }
//! ```

pub mod debug;
pub mod dirty;
pub mod drain;
pub mod driver;
pub mod error;
pub mod filename;
pub mod graph;
pub mod node;
pub mod options;
pub mod perm;

pub use debug::{DebugEvent, IoType};
pub use driver::create::create_file;
pub use driver::qcow2::{create as create_qcow2, NodeStorage};
pub use driver::{
    BlockDriver, DriverInfo, Extent, FormatSpecific, Qcow2Info, WriteFlags, ZeroFlags,
};
pub use error::{Error, ErrorKind, Result};
pub use graph::{
    Appended, Backend, BlockGraph, DumpEdge, DumpNode, DumpNodeType, GraphDump, UserHandle,
};
pub use node::{CacheInfo, ImageInfo, Node, NodeFlags, NodeHold, NodeInfo};
pub use options::{
    BlkdebugOptions, BlockPermission, BlockdevOptions, BlockdevRef, CommonOptions, CreateOptions,
    DetectZeroes, Discard, DriverOptions, FileCreateOptions, FileOptions, InjectErrorOptions,
    NullOptions, PreallocMode, Qcow2CompressionType, Qcow2CreateOptions, Qcow2Options,
    Qcow2Version, RawOptions, SetStateOptions,
};
pub use perm::Perm;
