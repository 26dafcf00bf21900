//! qcow2: the QEMU copy-on-write image format, over a small async byte storage.
//!
//! This crate knows nothing of QMP or the block graph. It opens, reads, writes, checks and
//! creates qcow2 images as QEMU 10.0.2 does (`docs/interop/qcow2.txt`). It never opens a backing
//! file: reads report the ranges that are not allocated in the image so the caller fills them
//! from its backing node, and writes that copy part of a cluster on write ask the caller's
//! [`Backing`] for the old data. Persistent dirty bitmaps are loaded on open and handed to the
//! caller, who tracks writes in them and stores them back ([`Image::take_bitmaps`],
//! [`Image::store_bitmaps`]). Internal snapshots are listed, created, deleted and reverted to
//! as QEMU keeps them ([`Image::snapshots`], [`Image::create_snapshot`],
//! [`Image::delete_snapshot`], [`Image::revert_snapshot`], [`Image::read_vm_state`]).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use qcow2::{CreateOptions, Image, MemStorage, OpenOptions};
//! let storage = Arc::new(MemStorage::new());
//! qcow2::create(storage.clone(), None, &CreateOptions::new(1 << 30)).await?;
//! let image = Image::open(storage, OpenOptions::default()).await?;
//! image.write(0, &[1; 4096], None).await?;
//! let mut buf = vec![0; 4096];
//! let holes = image.read(0, &mut buf).await?; // unallocated ranges, for the backing chain
//! assert!(holes.is_empty());
//! image.close().await?;
//! # Ok::<(), qcow2::Error>(()) }).unwrap();
//! ```
#![forbid(unsafe_code)]

mod bitmap_dir;
mod bitmap_ext;
mod check;
mod compress;
#[cfg(test)]
mod crash;
mod create;
mod error;
mod ext;
mod header;
mod image;
mod l2;
mod pin;
mod read;
mod refcount;
mod snapshot;
mod snapshot_table;
mod storage;
mod switch;
mod write;

pub use bitmap::{DirtyBitmap, Granularity};
pub use bitmap_ext::{BitmapInfo, BitmapTracking, LoadedBitmap, StoreBitmap};
pub use check::CheckReport;
pub use create::{create, CreateOptions, Preallocation};
pub use error::{Error, Result};
pub use ext::{BitmapsExt, Extensions, FeatureName};
pub use header::{autoclear, compat, incompat, CompressionType, Header};
pub use image::{Image, OpenOptions, DEFAULT_L2_CACHE_BYTES};
pub use read::{BlockKind, BlockStatus};
pub use snapshot::{NewSnapshot, SnapshotInfo};
pub use storage::{Backing, FileStorage, MemStorage, Storage};
#[cfg(test)]
mod hostile_tests;
