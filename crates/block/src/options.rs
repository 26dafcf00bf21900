//! `blockdev-add` and `blockdev-create` options as QEMU's `qapi/block-core.json` defines
//! them. The daemon deserializes already-validated QMP values into these types; a new
//! driver adds one variant to [`DriverOptions`] (and [`CreateOptions`]) and nothing else.

use serde::Deserialize;

use crate::debug::{DebugEvent, IoType};
use crate::perm::Perm;

/// `BlockdevOptions`: the common base flattened with the driver's own members.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptions {
    /// Members every driver accepts.
    #[serde(flatten)]
    pub common: CommonOptions,
    /// The driver branch, tagged by `driver`.
    #[serde(flatten)]
    pub driver: DriverOptions,
}

/// The `BlockdevOptions` base members other than `driver`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct CommonOptions {
    pub node_name: Option<String>,
    pub discard: Option<Discard>,
    pub cache: Option<CacheOptions>,
    pub active: Option<bool>,
    pub read_only: Option<bool>,
    pub auto_read_only: Option<bool>,
    pub force_share: Option<bool>,
    pub detect_zeroes: Option<DetectZeroes>,
}

/// `BlockdevCacheOptions`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct CacheOptions {
    pub direct: Option<bool>,
    pub no_flush: Option<bool>,
}

/// `BlockdevDiscardOptions`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Discard {
    /// Discard requests succeed without doing anything (QEMU's default).
    #[default]
    Ignore,
    /// Discard requests are passed down (holes are punched).
    Unmap,
}

/// `BlockdevDetectZeroesOptions`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    Unmap,
}

impl DetectZeroes {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// The driver branch of `BlockdevOptions`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "driver", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DriverOptions {
    Blkdebug(Box<BlkdebugOptions>),
    CopyBeforeWrite(Box<CbwOptions>),
    File(FileOptions),
    Raw(RawOptions),
    NullCo(NullOptions),
    Qcow2(Box<Qcow2Options>),
    SnapshotAccess(SnapshotAccessOptions),
}

impl DriverOptions {
    /// The driver name as QMP spells it.
    pub fn driver_name(&self) -> &'static str {
        match self {
            DriverOptions::Blkdebug(_) => "blkdebug",
            DriverOptions::CopyBeforeWrite(_) => "copy-before-write",
            DriverOptions::SnapshotAccess(_) => "snapshot-access",
            DriverOptions::File(_) => "file",
            DriverOptions::Raw(_) => "raw",
            DriverOptions::NullCo(_) => "null-co",
            DriverOptions::Qcow2(_) => "qcow2",
        }
    }
}

/// `BlockdevOnOffAuto` as used by `locking`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnOffAuto {
    #[default]
    Auto,
    On,
    Off,
}

/// `BlockdevAioOptions`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Aio {
    #[default]
    Threads,
    Native,
    IoUring,
}

/// `BlockdevOptionsFile`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct FileOptions {
    pub filename: String,
    pub pr_manager: Option<String>,
    pub locking: Option<OnOffAuto>,
    pub aio: Option<Aio>,
    pub aio_max_batch: Option<i64>,
    pub drop_cache: Option<bool>,
    pub x_check_cache_dropped: Option<bool>,
}

/// `BlockdevOptionsCbw`: a copy-before-write filter over `file` copying to `target`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct CbwOptions {
    pub file: BlockdevRef,
    pub target: BlockdevRef,
    pub bitmap: Option<DirtyBitmapRef>,
    pub on_cbw_error: Option<crate::driver::cbw::OnCbwError>,
    /// Seconds a copy before a guest write may take (0: no limit).
    pub cbw_timeout: Option<u32>,
    pub min_cluster_size: Option<u64>,
}

/// `BlockDirtyBitmap`: a bitmap by node and name.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct DirtyBitmapRef {
    pub node: String,
    pub name: String,
}

/// `BlockdevOptionsGenericFormat` of `snapshot-access`: `file` is a copy-before-write node.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SnapshotAccessOptions {
    pub file: BlockdevRef,
}

/// `BlockdevOptionsBlkdebug`. The size limits stay signed as QMP gives them: QEMU refuses
/// negative values when it opens the node, with its own message.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct BlkdebugOptions {
    pub image: BlockdevRef,
    pub config: Option<String>,
    pub align: Option<i64>,
    pub max_transfer: Option<i64>,
    pub opt_write_zero: Option<i64>,
    pub max_write_zero: Option<i64>,
    pub opt_discard: Option<i64>,
    pub max_discard: Option<i64>,
    pub inject_error: Option<Vec<InjectErrorOptions>>,
    pub set_state: Option<Vec<SetStateOptions>>,
    pub take_child_perms: Option<Vec<BlockPermission>>,
    pub unshare_child_perms: Option<Vec<BlockPermission>>,
}

/// `BlkdebugInjectErrorOptions`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct InjectErrorOptions {
    pub event: DebugEvent,
    pub state: Option<i64>,
    pub iotype: Option<IoType>,
    pub errno: Option<i64>,
    pub sector: Option<i64>,
    pub once: Option<bool>,
    pub immediately: Option<bool>,
}

/// `BlkdebugSetStateOptions` (`new_state` is spelled with an underscore in QEMU's schema).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct SetStateOptions {
    pub event: DebugEvent,
    pub state: Option<i64>,
    pub new_state: i64,
}

/// `BlockPermission`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BlockPermission {
    ConsistentRead,
    Write,
    WriteUnchanged,
    Resize,
}

impl BlockPermission {
    /// The permission bit.
    pub fn perm(self) -> Perm {
        match self {
            BlockPermission::ConsistentRead => Perm::CONSISTENT_READ,
            BlockPermission::Write => Perm::WRITE,
            BlockPermission::WriteUnchanged => Perm::WRITE_UNCHANGED,
            BlockPermission::Resize => Perm::RESIZE,
        }
    }
}

/// `BlockdevOptionsRaw`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct RawOptions {
    pub file: BlockdevRef,
    pub offset: Option<u64>,
    pub size: Option<u64>,
}

/// `BlockdevOptionsNull`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct NullOptions {
    pub size: Option<u64>,
    pub latency_ns: Option<u64>,
    pub read_zeroes: Option<bool>,
}

/// `BlockdevOptionsQcow2`. `backing` is `None` when absent (open the backing file the
/// header names), `Some(None)` for an explicit `null` (no backing file).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Options {
    pub file: BlockdevRef,
    #[serde(default, deserialize_with = "present")]
    pub backing: Option<Option<BlockdevRef>>,
    pub data_file: Option<BlockdevRef>,
    pub lazy_refcounts: Option<bool>,
    pub pass_discard_request: Option<bool>,
    pub pass_discard_snapshot: Option<bool>,
    pub pass_discard_other: Option<bool>,
    pub discard_no_unref: Option<bool>,
    /// `Qcow2OverlapChecks`: accepted; blockd's metadata checks are always on.
    pub overlap_check: Option<serde_json::Value>,
    pub cache_size: Option<i64>,
    pub l2_cache_size: Option<i64>,
    pub l2_cache_entry_size: Option<i64>,
    pub refcount_cache_size: Option<i64>,
    pub cache_clean_interval: Option<i64>,
    /// `BlockdevQcow2Encryption`: blockd opens no encrypted image.
    pub encrypt: Option<serde_json::Value>,
}

/// Marks a member as present, so that an explicit `null` is `Some(None)`.
fn present<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// `BlockdevRef`: a child given inline or by the node-name of an existing node.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum BlockdevRef {
    Reference(String),
    Definition(Box<BlockdevOptions>),
}

/// `BlockdevCreateOptions`, tagged by `driver`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "driver", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum CreateOptions {
    File(FileCreateOptions),
    Qcow2(Qcow2CreateOptions),
}

/// `BlockdevQcow2Version`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Qcow2Version {
    V2,
    V3,
}

/// `Qcow2CompressionType`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Qcow2CompressionType {
    Zlib,
    Zstd,
}

/// `BlockdevCreateOptionsQcow2`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2CreateOptions {
    pub file: BlockdevRef,
    pub data_file: Option<BlockdevRef>,
    pub data_file_raw: Option<bool>,
    pub extended_l2: Option<bool>,
    pub size: u64,
    pub version: Option<Qcow2Version>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub encrypt: Option<serde_json::Value>,
    pub cluster_size: Option<u64>,
    pub preallocation: Option<PreallocMode>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: Option<i64>,
    pub compression_type: Option<Qcow2CompressionType>,
}

/// `BlockdevCreateOptionsFile`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct FileCreateOptions {
    pub filename: String,
    pub size: u64,
    pub preallocation: Option<PreallocMode>,
    pub nocow: Option<bool>,
    pub extent_size_hint: Option<u64>,
}

/// `PreallocMode`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PreallocMode {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl PreallocMode {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PreallocMode::Off => "off",
            PreallocMode::Metadata => "metadata",
            PreallocMode::Falloc => "falloc",
            PreallocMode::Full => "full",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_over_inline_file_deserializes() {
        let value = serde_json::json!({
            "driver": "raw", "node-name": "r0", "offset": 512,
            "file": {"driver": "file", "filename": "a.img", "cache": {"direct": true}}
        });
        let opts: BlockdevOptions = serde_json::from_value(value).unwrap();
        assert_eq!(opts.common.node_name.as_deref(), Some("r0"));
        let DriverOptions::Raw(raw) = opts.driver else {
            panic!("not raw")
        };
        assert_eq!(raw.offset, Some(512));
        let BlockdevRef::Definition(file) = raw.file else {
            panic!("not inline")
        };
        assert_eq!(file.common.cache.and_then(|c| c.direct), Some(true));
    }

    #[test]
    fn reference_by_name_deserializes() {
        let value = serde_json::json!({"driver": "raw", "file": "f0"});
        let opts: BlockdevOptions = serde_json::from_value(value).unwrap();
        assert_eq!(
            opts.driver,
            DriverOptions::Raw(RawOptions {
                file: BlockdevRef::Reference("f0".into()),
                offset: None,
                size: None
            })
        );
    }

    #[test]
    fn qcow2_backing_absent_null_and_reference_differ() {
        let absent: BlockdevOptions =
            serde_json::from_value(serde_json::json!({"driver": "qcow2", "file": "f"})).unwrap();
        let null: BlockdevOptions = serde_json::from_value(
            serde_json::json!({"driver": "qcow2", "file": "f", "backing": null}),
        )
        .unwrap();
        let named: BlockdevOptions = serde_json::from_value(
            serde_json::json!({"driver": "qcow2", "file": "f", "backing": "b"}),
        )
        .unwrap();
        let backing = |o: BlockdevOptions| match o.driver {
            DriverOptions::Qcow2(q) => q.backing,
            _ => panic!("not qcow2"),
        };
        assert_eq!(backing(absent), None);
        assert_eq!(backing(null), Some(None));
        assert_eq!(
            backing(named),
            Some(Some(BlockdevRef::Reference("b".into())))
        );
    }

    #[test]
    fn null_co_and_file_aio_deserialize() {
        let value = serde_json::json!({"driver": "null-co", "read-zeroes": true, "latency-ns": 5});
        let opts: BlockdevOptions = serde_json::from_value(value).unwrap();
        assert_eq!(opts.driver.driver_name(), "null-co");
        let value = serde_json::json!({"driver": "file", "filename": "a", "aio": "io_uring",
            "locking": "off", "detect-zeroes": "unmap", "discard": "unmap"});
        let opts: BlockdevOptions = serde_json::from_value(value).unwrap();
        assert_eq!(opts.common.detect_zeroes, Some(DetectZeroes::Unmap));
        let DriverOptions::File(file) = opts.driver else {
            panic!("not file")
        };
        assert_eq!(file.aio, Some(Aio::IoUring));
    }
}
