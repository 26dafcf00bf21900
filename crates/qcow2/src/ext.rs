//! Header extensions (qcow2.txt, "Header extensions"): parsed ones, and unknown ones kept
//! verbatim so a header rewrite preserves them.

use crate::error::{Error, Result};

/// End of the extension list.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// QEMU's limit on bitmaps in one image (`QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`, 64 MiB).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 << 20;
/// Size of one feature name table entry.
const FEATURE_ENTRY_LEN: usize = 48;

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name, without the zero padding.
    pub name: String,
}

/// The bitmaps extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Directory offset (cluster aligned).
    pub directory_offset: u64,
}

/// Every header extension of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format (`raw`, `qcow2`, ...).
    pub backing_format: Option<String>,
    /// External data file name.
    pub data_file: Option<String>,
    /// The full disk encryption extension, verbatim.
    pub crypto: Option<Vec<u8>>,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Extensions this library does not know: (type, data), in file order.
    pub unknown: Vec<(u32, Vec<u8>)>,
}

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

impl Extensions {
    /// Parse the extension area `bytes[start..end]` of cluster 0.
    pub(crate) fn parse(bytes: &[u8], start: u64, end: u64) -> Result<Self> {
        let mut ext = Extensions::default();
        let end = end.min(bytes.len() as u64);
        let mut offset = start;
        let mut seen: Vec<u32> = Vec::new();
        loop {
            // The list may also stop at the end of the area without an end marker.
            let Some(head_end) = offset.checked_add(8).filter(|e| *e <= end) else {
                return Ok(ext);
            };
            let at = offset as usize;
            let kind = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
            if kind == EXT_END {
                return Ok(ext);
            }
            let data_end = head_end + u64::from(len);
            if data_end > end {
                return Err(invalid(format!(
                    "header extension {kind:#x} at {offset:#x}: length {len} overruns the header area"
                )));
            }
            if seen.contains(&kind) {
                return Err(invalid(format!("header extension {kind:#x} appears twice")));
            }
            seen.push(kind);
            ext.add(kind, &bytes[head_end as usize..data_end as usize])?;
            offset = head_end + u64::from(len).div_ceil(8) * 8;
        }
    }

    fn add(&mut self, kind: u32, data: &[u8]) -> Result<()> {
        match kind {
            EXT_BACKING_FORMAT => {
                if data.len() > 16 {
                    return Err(invalid(format!(
                        "backing format extension too long ({} bytes)",
                        data.len()
                    )));
                }
                self.backing_format = Some(text(data));
            }
            EXT_DATA_FILE => self.data_file = Some(text(data)),
            EXT_CRYPTO => self.crypto = Some(data.to_vec()),
            EXT_FEATURE_TABLE => {
                self.feature_names = data
                    .chunks_exact(FEATURE_ENTRY_LEN)
                    .map(|e| FeatureName {
                        kind: e[0],
                        bit: e[1],
                        name: text(&e[2..]),
                    })
                    .collect();
            }
            EXT_BITMAPS => self.bitmaps = Some(parse_bitmaps(data)?),
            _ => self.unknown.push((kind, data.to_vec())),
        }
        Ok(())
    }

    /// Append the extensions in QEMU's order, then the end marker.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        if let Some(f) = &self.backing_format {
            put(out, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            put(out, EXT_DATA_FILE, f.as_bytes());
        }
        if let Some(c) = &self.crypto {
            put(out, EXT_CRYPTO, c);
        }
        if !self.feature_names.is_empty() {
            let mut table = Vec::with_capacity(self.feature_names.len() * FEATURE_ENTRY_LEN);
            for f in &self.feature_names {
                let mut entry = [0u8; FEATURE_ENTRY_LEN];
                entry[0] = f.kind;
                entry[1] = f.bit;
                let n = f.name.len().min(FEATURE_ENTRY_LEN - 2);
                entry[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                table.extend_from_slice(&entry);
            }
            put(out, EXT_FEATURE_TABLE, &table);
        }
        if let Some(b) = &self.bitmaps {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&b.directory_size.to_be_bytes());
            d.extend_from_slice(&b.directory_offset.to_be_bytes());
            put(out, EXT_BITMAPS, &d);
        }
        for (kind, data) in &self.unknown {
            put(out, *kind, data);
        }
        put(out, EXT_END, &[]);
    }

    /// The feature name table QEMU 10.0.2 writes into new v3 images.
    pub fn qemu_feature_table() -> Vec<FeatureName> {
        let f = |kind, bit, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

fn put(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(8) * 8, 0);
}

fn text(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

fn parse_bitmaps(data: &[u8]) -> Result<BitmapsExt> {
    if data.len() != 24 {
        return Err(invalid(format!(
            "bitmaps extension has length {} instead of 24",
            data.len()
        )));
    }
    let u32_at = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap_or_default());
    let u64_at = |i: usize| u64::from_be_bytes(data[i..i + 8].try_into().unwrap_or_default());
    let ext = BitmapsExt {
        nb_bitmaps: u32_at(0),
        directory_size: u64_at(8),
        directory_offset: u64_at(16),
    };
    if u32_at(4) != 0 {
        return Err(invalid(
            "bitmaps extension: reserved field is not zero".into(),
        ));
    }
    Ok(ext)
}

impl BitmapsExt {
    /// QEMU's checks of the extension's fields. They count only when the autoclear bit says
    /// the extension is valid: without it QEMU ignores the extension, however malformed.
    pub(crate) fn check(&self) -> Result<()> {
        if self.nb_bitmaps == 0 || self.nb_bitmaps > MAX_BITMAPS {
            return Err(invalid(format!(
                "bitmaps extension: {} bitmaps is out of range",
                self.nb_bitmaps
            )));
        }
        if self.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(invalid("bitmaps extension: directory too large".into()));
        }
        Ok(())
    }
}
