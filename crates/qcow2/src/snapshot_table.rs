//! The snapshot table as stored (qcow2.txt, "Snapshots"): parsing with QEMU 10.0.2's limits
//! (`block/qcow2-snapshot.c`, `block/qcow2.h`) and serialising it again.
//!
//! Each entry is a 40-byte fixed part, extra data, the ID string and the name, padded to a
//! multiple of 8 bytes. Extra data QEMU does not know (past its 24 bytes) is kept and written
//! back unchanged, as QEMU does.

use crate::error::{Error, Result};

/// Bytes of the fixed part of an entry.
pub(crate) const FIXED_BYTES: usize = 40;
/// Extra data this library reads and writes: 64-bit VM state size, disk size, icount.
pub(crate) const KNOWN_EXTRA_BYTES: usize = 24;
/// qcow2.txt: version 3 entries need the VM state size and the disk size (16 bytes).
pub(crate) const V3_MIN_EXTRA_BYTES: u32 = 16;
/// QEMU's limit on one entry's extra data (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub(crate) const MAX_EXTRA_BYTES: u32 = 1024;
/// QEMU's limit on the whole table (`QCOW_MAX_SNAPSHOTS_SIZE`: 1 KiB per snapshot).
pub(crate) const MAX_TABLE_BYTES: u64 = 1024 * crate::header::MAX_SNAPSHOTS as u64;
/// The icount stored when none was recorded.
const NO_ICOUNT: u64 = u64::MAX;

/// One snapshot as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Host offset of the snapshot's L1 table (checked when used, as QEMU does).
    pub l1_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// The ID string's bytes (QEMU writes decimal numbers).
    pub id: Vec<u8>,
    /// The name's bytes.
    pub name: Vec<u8>,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// `None` when not recorded (stored as -1, or the extra data is too short to hold it).
    pub icount: Option<u64>,
    /// Extra data size as stored (`qemu-img check` wants at least 16 on version 3).
    pub extra_bytes: u32,
    /// Extra data past the known 24 bytes, kept as it is.
    pub unknown_extra: Vec<u8>,
}

/// The bytes before the first NUL, as QEMU's C strings see them.
pub(crate) fn c_str(bytes: &[u8]) -> &[u8] {
    bytes.split(|b| *b == 0).next().unwrap_or_default()
}

impl Entry {
    /// Whether the ID string equals `id` (compared as QEMU's `strcmp` does).
    pub fn has_id(&self, id: &str) -> bool {
        c_str(&self.id) == id.as_bytes()
    }

    /// Whether the name equals `name`.
    pub fn has_name(&self, name: &str) -> bool {
        c_str(&self.name) == name.as_bytes()
    }

    /// Bytes this entry takes in the table as written back (padding included).
    fn stored_len(&self) -> usize {
        let extra = KNOWN_EXTRA_BYTES + self.unknown_extra.len();
        (FIXED_BYTES + extra + self.id.len() + self.name.len()).div_ceil(8) * 8
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.l1_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        // A VM state too large for 32 bits reads as disk-only to older programs (qcow2.txt).
        let small = u32::try_from(self.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small.to_be_bytes());
        let extra = KNOWN_EXTRA_BYTES + self.unknown_extra.len();
        out.extend_from_slice(&(extra as u32).to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&self.disk_size.to_be_bytes());
        out.extend_from_slice(&self.icount.unwrap_or(NO_ICOUNT).to_be_bytes());
        out.extend_from_slice(&self.unknown_extra);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
        out.resize(start + self.stored_len(), 0);
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

/// Why a table could not be parsed from the bytes at hand.
#[derive(Debug)]
pub(crate) enum ParseError {
    /// The table is longer than the bytes given: at least this many are needed.
    Short(usize),
    /// The table is invalid (QEMU's message).
    Invalid(Error),
}

/// Parse `nb` entries from `bytes` (the table from its start; bytes past the end of the file
/// read as zeros, as QEMU reads them). `disk_size` stands in for entries too short to record
/// theirs. Returns the entries and the table's length in bytes.
pub(crate) fn parse(
    bytes: &[u8],
    nb: u32,
    disk_size: u64,
) -> std::result::Result<(Vec<Entry>, u64), ParseError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    for i in 0..nb {
        pos = pos.div_ceil(8) * 8;
        let fixed = bytes
            .get(pos..pos + FIXED_BYTES)
            .ok_or(ParseError::Short(pos + FIXED_BYTES))?;
        let extra_bytes = be32(fixed, 36);
        if extra_bytes > MAX_EXTRA_BYTES {
            return Err(ParseError::Invalid(Error::Invalid(format!(
                "Too much extra metadata in snapshot table entry {i}"
            ))));
        }
        let (id_len, name_len) = (usize::from(be16(fixed, 12)), usize::from(be16(fixed, 14)));
        let end = pos + FIXED_BYTES + extra_bytes as usize + id_len + name_len;
        if end as u64 > MAX_TABLE_BYTES {
            return Err(ParseError::Invalid(Error::Invalid(
                "Snapshot table is too big".into(),
            )));
        }
        let whole = bytes.get(pos..end).ok_or(ParseError::Short(end))?;
        entries.push(parse_entry(whole, extra_bytes as usize, id_len, disk_size));
        pos = end;
    }
    Ok((entries, pos as u64))
}

/// One entry from exactly its bytes (padding excluded); its sizes are already checked.
fn parse_entry(b: &[u8], extra_bytes: usize, id_len: usize, disk_size: u64) -> Entry {
    let extra = &b[FIXED_BYTES..FIXED_BYTES + extra_bytes];
    let known = |at: usize| (extra.len() >= at + 8).then(|| be64(extra, at));
    let strings = &b[FIXED_BYTES + extra_bytes..];
    Entry {
        l1_offset: be64(b, 0),
        l1_size: be32(b, 8),
        date_sec: be32(b, 16),
        date_nsec: be32(b, 20),
        vm_clock_nsec: be64(b, 24),
        vm_state_size: known(0).unwrap_or(u64::from(be32(b, 32))),
        disk_size: known(8).unwrap_or(disk_size),
        icount: known(16).filter(|v| *v != NO_ICOUNT),
        extra_bytes: extra_bytes as u32,
        unknown_extra: extra.get(KNOWN_EXTRA_BYTES..).unwrap_or_default().to_vec(),
        id: strings[..id_len].to_vec(),
        name: strings[id_len..].to_vec(),
    }
}

/// The table for `entries`, as QEMU writes it (24 bytes of known extra data each).
pub(crate) fn to_bytes(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        if e.id.len() > usize::from(u16::MAX) || e.name.len() > usize::from(u16::MAX) {
            return Err(Error::InvalidOption(
                "snapshot ID or name longer than 65535 bytes".into(),
            ));
        }
        e.write_to(&mut out);
        if out.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::TooLarge("Snapshot table"));
        }
    }
    Ok(out)
}

/// QEMU's next ID: one more than the largest numeric prefix among the IDs (`strtoul`).
pub(crate) fn next_id(entries: &[Entry]) -> String {
    let max = entries
        .iter()
        .map(|e| {
            let s = String::from_utf8_lossy(c_str(&e.id)).into_owned();
            let t = s.trim_start();
            let digits: String = t
                .strip_prefix('+')
                .unwrap_or(t)
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            // strtoul saturates at ULONG_MAX, and QEMU's "+ 1" then wraps to 0.
            digits
                .parse::<u64>()
                .unwrap_or(if digits.is_empty() { 0 } else { u64::MAX })
        })
        .max()
        .unwrap_or(0);
    max.wrapping_add(1).to_string()
}

#[cfg(test)]
mod tests;
