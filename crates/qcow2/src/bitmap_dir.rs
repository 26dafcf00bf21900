//! The bitmap directory and bitmap table entries (qcow2.txt, "Bitmaps"): parsing with every
//! check QEMU 10.0.2 makes (`block/qcow2-bitmap.c`), and the bytes to write back. No I/O here.

use bitmap::Granularity;

use crate::error::{Error, Result};
use crate::ext::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES};

/// QEMU's limit on bitmap table entries (`BME_MAX_TABLE_SIZE`).
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
/// QEMU's limit on the clusters of one bitmap's data, in bytes (`BME_MAX_PHYS_SIZE`, 512 MiB).
pub const MAX_DATA_BYTES: u64 = 512 << 20;
/// QEMU's limit on a bitmap name (`BME_MAX_NAME_SIZE`); qcow2.txt allows 65535.
pub const MAX_NAME_BYTES: usize = 1023;
/// Fixed part of a directory entry; the name follows (QEMU refuses extra data).
const ENTRY_HEADER_BYTES: usize = 24;
/// qcow2.txt: type 1 is the only type, a dirty tracking bitmap.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// Directory entry flags (qcow2.txt, "flags").
pub mod flags {
    /// The on-disk data is stale: the bitmap was in use when the image was last written.
    pub const IN_USE: u32 = 1 << 0;
    /// The bitmap is enabled: it must track every write.
    pub const AUTO: u32 = 1 << 1;
    /// Every flag QEMU accepts; it treats `extra_data_compatible` (bit 2) as reserved too.
    pub const KNOWN: u32 = IN_USE | AUTO;
}

/// Bitmap table entry bits 9..55: the data cluster offset.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bits 1..8 and 56..63 are reserved.
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry bit 0 without an offset: the cluster's bits are all ones.
pub const TABLE_ALL_ONES: u64 = 1;

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirEntry {
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    pub flags: u32,
    pub granularity: Granularity,
    pub name: String,
    /// `in_use` was already set when the image was opened: the data is lost (not stored).
    pub inconsistent: bool,
}

impl DirEntry {
    pub fn in_use(&self) -> bool {
        self.flags & flags::IN_USE != 0
    }
}

/// What one bitmap table entry says about its cluster of bitmap data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableEntry {
    /// Every bit of the cluster is clear.
    Zeros,
    /// Every bit of the cluster is set.
    Ones,
    /// The bits are stored in the cluster at this offset.
    Data(u64),
}

/// Decode a bitmap table entry as QEMU's `check_table_entry` accepts it.
pub(crate) fn table_entry(entry: u64, cs: u64) -> Result<TableEntry> {
    let off = entry & TABLE_OFFSET_MASK;
    let bad = entry & TABLE_RESERVED_MASK != 0
        || (off != 0 && (entry & TABLE_ALL_ONES != 0 || !off.is_multiple_of(cs)));
    if bad {
        return Err(Error::Invalid(format!(
            "bitmap table entry {entry:#x} is invalid"
        )));
    }
    Ok(match (off, entry & TABLE_ALL_ONES) {
        (0, 0) => TableEntry::Zeros,
        (0, _) => TableEntry::Ones,
        (off, _) => TableEntry::Data(off),
    })
}

/// Bitmap table entries that hold the data of a bitmap over `disk_bytes` bytes.
pub(crate) fn table_size_for(disk_bytes: u64, granularity: Granularity, cs: u64) -> u64 {
    disk_bytes
        .div_ceil(granularity.bytes())
        .div_ceil(8)
        .div_ceil(cs)
}

/// Bytes of the directory entry for a name of `name_len` bytes, padded to 8.
pub(crate) fn entry_bytes(name_len: usize) -> usize {
    (ENTRY_HEADER_BYTES + name_len).div_ceil(8) * 8
}

/// QEMU's `check_dir_entry`: limits of a bitmap table and whether it covers the disk.
fn check_entry(e: &DirEntry, cs: u64, disk_bytes: u64) -> bool {
    let data_bytes = u64::from(e.table_size) * cs;
    let fits = e.table_size != 0
        && e.table_offset != 0
        && e.table_offset.is_multiple_of(cs)
        && e.table_size <= MAX_TABLE_ENTRIES
        && data_bytes <= MAX_DATA_BYTES;
    // A bitmap left in use may be too small (the disk grew); its data is not loaded anyway.
    // With `fits`, the shift stays below 2^63 (2^29 bytes, 8 bits each, 2^31 bytes a bit).
    fits && (e.in_use() || (data_bytes * 8) << e.granularity.bits() >= disk_bytes)
}

/// Read a big-endian integer of `N` bytes at `at`.
fn be<const N: usize>(b: &[u8], at: usize) -> u64 {
    b[at..at + N]
        .iter()
        .fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
}

/// Parse and check the bitmap directory of an image with `nb_bitmaps` bitmaps (from the
/// header extension), clusters of `cs` bytes and a disk of `disk_bytes` bytes. Any bad
/// entry refuses the whole directory, as QEMU refuses to open such an image.
pub(crate) fn parse(
    dir: &[u8],
    nb_bitmaps: u32,
    cs: u64,
    disk_bytes: u64,
) -> Result<Vec<DirEntry>> {
    let broken = || Error::Invalid("Broken bitmap directory".into());
    if dir.is_empty() {
        return Err(Error::Invalid(
            "Requested bitmap directory size is zero".into(),
        ));
    }
    let mut entries: Vec<DirEntry> = Vec::new();
    let mut pos = 0;
    while pos < dir.len() {
        let head = dir.get(pos..pos + ENTRY_HEADER_BYTES).ok_or_else(broken)?;
        if entries.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(Error::Invalid(
                "More bitmaps found than specified in header extension".into(),
            ));
        }
        let name_len = be::<2>(head, 18) as usize;
        let extra = be::<4>(head, 20);
        let len = entry_bytes(name_len).saturating_add(extra as usize);
        let whole = dir.get(pos..pos.saturating_add(len)).ok_or_else(broken)?;
        if extra != 0 {
            return Err(Error::Invalid("Bitmap extra data is not supported".into()));
        }
        let raw_name = &whole[ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + name_len];
        let name = std::str::from_utf8(raw_name)
            .ok()
            .filter(|n| !n.is_empty() && !n.contains('\0'))
            .ok_or_else(|| {
                Error::Invalid(format!("bitmap directory entry at {pos:#x} has a bad name"))
            })?;
        let granularity = Granularity::from_bits(u32::from(head[17])).ok();
        let entry = DirEntry {
            table_offset: be::<8>(head, 0),
            table_size: be::<4>(head, 8) as u32,
            flags: be::<4>(head, 12) as u32,
            granularity: granularity.unwrap_or(Granularity::MIN),
            name: name.to_string(),
            inconsistent: false,
        };
        let valid = granularity.is_some()
            && head[16] == TYPE_DIRTY_TRACKING
            && entry.flags & !flags::KNOWN == 0
            && name_len <= MAX_NAME_BYTES
            && check_entry(&entry, cs, disk_bytes);
        if !valid {
            return Err(Error::Invalid(format!(
                "Bitmap '{name}' doesn't satisfy the constraints"
            )));
        }
        if entries.iter().any(|e| e.name == entry.name) {
            return Err(Error::Invalid(format!("Bitmap already exists: {name}")));
        }
        entries.push(DirEntry {
            inconsistent: entry.in_use(),
            ..entry
        });
        pos += len;
    }
    if entries.len() as u64 != u64::from(nb_bitmaps) {
        return Err(Error::Invalid(
            "Less bitmaps found than specified in header extension".into(),
        ));
    }
    Ok(entries)
}

/// The directory bytes for `entries`, after checking the limits QEMU checks before it
/// stores a directory.
pub(crate) fn to_bytes(entries: &[DirEntry], cs: u64, disk_bytes: u64) -> Result<Vec<u8>> {
    if entries.len() > MAX_BITMAPS as usize {
        return Err(Error::InvalidOption("Too many persistent bitmaps".into()));
    }
    let mut out = Vec::new();
    for e in entries {
        if e.name.is_empty() || e.name.len() > MAX_NAME_BYTES || !check_entry(e, cs, disk_bytes) {
            return Err(Error::InvalidOption(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                e.name
            )));
        }
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(e.granularity.bits() as u8);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    if out.len() as u64 > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(Error::InvalidOption("Bitmap directory is too large".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
