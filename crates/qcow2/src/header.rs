//! The image header: a raw on-disk layout type, then the validated [`Header`] the rest of the
//! crate uses. Field facts and limits follow `docs/interop/qcow2.txt` and QEMU 10.0.2's
//! `block/qcow2.h`.

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{Error, Result};
use crate::ext::Extensions;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster: 512 bytes (qcow2.txt: cluster_bits must be at least 9).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster QEMU accepts: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Widest refcount entry: 64 bits (qcow2.txt: refcount_order may not exceed 6).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// QEMU's limit on the active L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (`QCOW_MAX_REFTABLE_SIZE`, 8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on internal snapshots (`QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// qcow2.txt: the backing file name must be shorter than 1024 bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// qcow2.txt: host offsets use bits 9..55, so everything lives below 2^56.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the mandatory part of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Length of the version 3 header QEMU writes (with the compression type and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Incompatible feature bits (qcow2.txt, "incompatible_features").
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type field is not deflate.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits wide with subclusters.
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit this library understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image on its own.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every bit this library understands.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// The 104 mandatory bytes of a version 3 header as stored (a v2 header is the first 72).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Default)]
#[repr(C)]
pub(crate) struct RawHeader {
    pub magic: U32,
    pub version: U32,
    pub backing_file_offset: U64,
    pub backing_file_size: U32,
    pub cluster_bits: U32,
    pub size: U64,
    pub crypt_method: U32,
    pub l1_size: U32,
    pub l1_table_offset: U64,
    pub refcount_table_offset: U64,
    pub refcount_table_clusters: U32,
    pub nb_snapshots: U32,
    pub snapshots_offset: U64,
    pub incompatible_features: U64,
    pub compatible_features: U64,
    pub autoclear_features: U64,
    pub refcount_order: U32,
    pub header_length: U32,
}
const _: () = assert!(size_of::<RawHeader>() == 104);

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate with a 4 KiB window.
    #[default]
    Deflate,
    /// zstd frames.
    Zstd,
}

/// A validated header. Nothing outside this module sees the raw layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits, 0..=6.
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// How compressed clusters are compressed.
    pub compression_type: CompressionType,
    /// Header bytes past the compression type that this library does not know, kept verbatim.
    pub extra: Vec<u8>,
    /// Header extensions.
    pub extensions: Extensions,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// Peek the cluster size of a header so the caller knows how much of cluster 0 to read.
pub(crate) fn peek_cluster_bits(bytes: &[u8]) -> Result<u32> {
    let (raw, _) =
        RawHeader::read_from_prefix(bytes).map_err(|_| Error::Truncated(bytes.len() as u64))?;
    check_basics(&raw)?;
    Ok(raw.cluster_bits.get())
}

fn check_basics(raw: &RawHeader) -> Result<()> {
    if raw.magic.get() != MAGIC {
        return Err(Error::BadMagic(raw.magic.get()));
    }
    let version = raw.version.get();
    if !(2..=3).contains(&version) {
        return Err(Error::UnsupportedVersion(version));
    }
    let bits = raw.cluster_bits.get();
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(Error::UnsupportedClusterSize(bits));
    }
    Ok(())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are extended (128 bits, subclusters).
    pub fn has_extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Whether lazy refcounts are enabled in the image.
    pub fn has_lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// log2 of the number of L2 entries in one table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.has_extended_l2() { 4 } else { 3 }
    }

    /// Bytes of guest data one L1 entry maps.
    pub fn l1_span(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l1_span())
    }

    /// Parse and check cluster 0 (`bytes` must hold at least the header and its extensions;
    /// passing the whole first cluster is right).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let (raw, _) =
            RawHeader::read_from_prefix(bytes).map_err(|_| Error::Truncated(bytes.len() as u64))?;
        check_basics(&raw)?;
        let version = raw.version.get();
        let cluster_bits = raw.cluster_bits.get();
        let cluster_size = 1u64 << cluster_bits;
        if (bytes.len() as u64) < cluster_size.min(V3_HEADER_LEN as u64) {
            return Err(Error::Truncated(bytes.len() as u64));
        }
        let (incompatible, compatible, autoclear_bits, refcount_order, header_length) =
            if version == 2 {
                (0, 0, 0, 4, V2_HEADER_LEN)
            } else {
                (
                    raw.incompatible_features.get(),
                    raw.compatible_features.get(),
                    raw.autoclear_features.get(),
                    raw.refcount_order.get(),
                    raw.header_length.get(),
                )
            };
        if version == 3 && header_length < V3_MIN_HEADER_LEN {
            return Err(invalid("qcow2 header too short"));
        }
        if u64::from(header_length) > cluster_size || header_length as usize > bytes.len() {
            return Err(invalid("qcow2 header exceeds cluster size"));
        }
        let backing_offset = raw.backing_file_offset.get();
        if backing_offset > cluster_size {
            return Err(invalid("Invalid backing file offset"));
        }
        let (compression_type, extra) = parse_tail(bytes, header_length, incompatible)?;
        let ext_end = if backing_offset != 0 {
            backing_offset
        } else {
            cluster_size
        };
        let extensions = Extensions::parse(bytes, u64::from(header_length), ext_end)?;
        check_incompatible(incompatible, &extensions)?;
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(Error::RefcountOrderTooLarge(refcount_order));
        }
        let crypt = raw.crypt_method.get();
        if crypt != 0 {
            return Err(Error::Encrypted(crypt));
        }
        let backing_file = parse_backing_name(bytes, backing_offset, raw.backing_file_size.get())?;
        let header = Header {
            version,
            cluster_bits,
            size: raw.size.get(),
            l1_size: raw.l1_size.get(),
            l1_table_offset: raw.l1_table_offset.get(),
            refcount_table_offset: raw.refcount_table_offset.get(),
            refcount_table_clusters: raw.refcount_table_clusters.get(),
            nb_snapshots: raw.nb_snapshots.get(),
            snapshots_offset: raw.snapshots_offset.get(),
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear_bits,
            refcount_order,
            header_length,
            compression_type,
            extra,
            extensions,
            backing_file,
        };
        header.check_tables()?;
        Ok(header)
    }

    /// Check the table fields against QEMU's limits (not against the file size).
    fn check_tables(&self) -> Result<()> {
        if self.has_extended_l2() && self.cluster_bits < 14 {
            return Err(invalid(
                "extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.size > i64::MAX as u64 {
            return Err(invalid("Image size too large"));
        }
        let cs = self.cluster_size();
        if u64::from(self.l1_size) > MAX_L1_BYTES / 8 {
            return Err(invalid("Active L1 table too large"));
        }
        if u64::from(self.l1_size) < self.l1_entries_for(self.size) {
            return Err(invalid("L1 table is too small"));
        }
        validate_table(
            "L1 table",
            self.l1_table_offset,
            u64::from(self.l1_size) * 8,
            cs,
        )?;
        if self.l1_size == 0
            && self.l1_table_offset != 0
            && !self.l1_table_offset.is_multiple_of(cs)
        {
            return Err(Error::Unaligned {
                table: "L1 table",
                offset: self.l1_table_offset,
            });
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge("Reference count table"));
        }
        if self.refcount_table_clusters == 0 {
            return Err(invalid("Image does not contain a reference count table"));
        }
        validate_table(
            "Reference count table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid("Too many snapshots"));
        }
        if self.nb_snapshots > 0 && !self.snapshots_offset.is_multiple_of(cs) {
            return Err(Error::Unaligned {
                table: "Snapshot table",
                offset: self.snapshots_offset,
            });
        }
        Ok(())
    }

    /// The header, its extensions and the backing file name as one cluster-0 image.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let raw = self.to_raw();
        let mut out = raw.as_bytes().to_vec();
        out.truncate(if self.version == 2 {
            V2_HEADER_LEN as usize
        } else {
            V3_MIN_HEADER_LEN as usize
        });
        if self.version >= 3 && self.header_length > V3_MIN_HEADER_LEN {
            out.push(match self.compression_type {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            });
            out.extend_from_slice(&[0; 7]);
            out.extend_from_slice(&self.extra);
            out.resize(self.header_length as usize, 0);
        }
        self.extensions.write(&mut out);
        let cs = self.cluster_size() as usize;
        if let Some(name) = &self.backing_file {
            let offset = out.len() as u64;
            out.extend_from_slice(name.as_bytes());
            out[8..16].copy_from_slice(&offset.to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        if out.len() > cs {
            return Err(invalid(
                "header and extensions do not fit in the first cluster",
            ));
        }
        Ok(out)
    }

    fn to_raw(&self) -> RawHeader {
        RawHeader {
            magic: MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: 0.into(),
            backing_file_size: 0.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: 0.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
            incompatible_features: self.incompatible_features.into(),
            compatible_features: self.compatible_features.into(),
            autoclear_features: self.autoclear_features.into(),
            refcount_order: self.refcount_order.into(),
            header_length: self.header_length.into(),
        }
    }
}

/// qcow2.txt: a table is cluster aligned and its end must stay addressable.
pub(crate) fn validate_table(table: &'static str, offset: u64, bytes: u64, cs: u64) -> Result<()> {
    if !offset.is_multiple_of(cs)
        || offset
            .checked_add(bytes)
            .is_none_or(|e| e > MAX_HOST_OFFSET)
    {
        return Err(Error::Unaligned { table, offset });
    }
    Ok(())
}

fn parse_tail(
    bytes: &[u8],
    header_length: u32,
    incompatible: u64,
) -> Result<(CompressionType, Vec<u8>)> {
    let hl = header_length as usize;
    if hl <= V3_MIN_HEADER_LEN as usize {
        if incompatible & incompat::COMPRESSION != 0 {
            return Err(invalid(
                "compression type incompatible bit set without a compression type field",
            ));
        }
        return Ok((CompressionType::Deflate, Vec::new()));
    }
    let ct = match bytes[V3_MIN_HEADER_LEN as usize] {
        0 => CompressionType::Deflate,
        1 => CompressionType::Zstd,
        other => return Err(invalid(format!("Unknown compression type '{other}'"))),
    };
    let has_bit = incompatible & incompat::COMPRESSION != 0;
    if (ct == CompressionType::Deflate) == has_bit {
        return Err(invalid(if has_bit {
            "Deflate compression type must not have the compression type incompatible bit set"
        } else {
            "Compression type other than deflate requires the compression type incompatible bit"
        }));
    }
    let extra = bytes
        .get(V3_HEADER_LEN as usize..hl)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok((ct, extra))
}

fn check_incompatible(bits: u64, ext: &Extensions) -> Result<()> {
    let mut unknown = bits & !incompat::KNOWN;
    if unknown == 0 {
        return Ok(());
    }
    let mut parts = Vec::new();
    for f in &ext.feature_names {
        if f.kind == 0 && f.bit < 64 && unknown & (1 << f.bit) != 0 {
            parts.push(f.name.clone());
            unknown &= !(1 << f.bit);
        }
    }
    if unknown != 0 {
        parts.push(format!("Unknown incompatible feature: {unknown:x}"));
    }
    Err(Error::UnsupportedFeatures(parts.join(", ")))
}

fn parse_backing_name(bytes: &[u8], offset: u64, size: u32) -> Result<Option<String>> {
    if offset == 0 {
        return Ok(None);
    }
    if size > MAX_BACKING_NAME {
        return Err(invalid("Backing file name too long"));
    }
    let start = usize::try_from(offset).map_err(|_| invalid("Invalid backing file offset"))?;
    let name = bytes
        .get(start..start + size as usize)
        .ok_or_else(|| invalid("Invalid backing file offset"))?;
    Ok(Some(String::from_utf8_lossy(name).into_owned()))
}

#[cfg(test)]
mod tests;
