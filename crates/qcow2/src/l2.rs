//! L1 and L2 entries and the L2 table cache.
//!
//! The cache holds L2 tables keyed by their host offset. It is write-back: an update changes
//! the cached table and marks it dirty, and the image writes dirty tables out in its metadata
//! write-back (after the refcounts and data they depend on are durable, see `image.rs`).
//! Evicting a dirty table therefore needs that write-back first: [`L2Cache::victim`] names the
//! table an insert would evict so the caller can write back before inserting.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};

/// L1 entry: bits 9..55 are the L2 table offset.
pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// The host cluster's refcount is exactly 1.
pub const COPIED: u64 = 1 << 63;
/// The L2 entry describes a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry: reads as zeros (v3).
pub const ZERO_FLAG: u64 = 1;
/// Standard L2 entry: host cluster offset.
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard L2 entry bits that must be zero (zero flag excluded).
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Extended L2: every subcluster reads as zero.
pub const ALL_ZERO_BITMAP: u64 = 0xffff_ffff_0000_0000;
/// Subclusters per cluster with extended L2.
pub const SUBCLUSTERS: u32 = 32;

/// One L2 entry; `bitmap` is 0 for standard entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    /// The descriptor word.
    pub word: u64,
    /// The subcluster bitmap (extended L2 only).
    pub bitmap: u64,
}

/// What a guest range maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Data at this host offset (of the data file if there is one).
    Data(u64),
    /// Reads as zeros.
    Zero,
    /// Not allocated here: the backing chain (or zeros) supplies it.
    Unallocated,
    /// Compressed: the host bytes to read.
    Compressed { offset: u64, len: u64 },
}

/// Geometry needed to decode entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub extended: bool,
    pub data_file: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn entry_words(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8 / self.entry_words() as u64
    }
    pub fn subcluster_size(&self) -> u64 {
        if self.extended {
            self.cluster_size() / u64::from(SUBCLUSTERS)
        } else {
            self.cluster_size()
        }
    }

    /// Whether the entry points at a host cluster (offset 0 counts with a data file and COPIED).
    pub fn is_allocated(&self, e: L2Entry) -> bool {
        e.word & COMPRESSED == 0
            && (e.word & L2_OFFSET_MASK != 0 || (self.data_file && e.word & COPIED != 0))
    }

    /// Host byte offset and length of a compressed cluster (qcow2.txt, "Compressed Clusters
    /// Descriptor").
    pub fn compressed_extent(&self, word: u64) -> (u64, u64) {
        let x = 62 - (self.cluster_bits - 8);
        let offset = word & ((1u64 << x) - 1);
        let sectors = ((word >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (offset, sectors * 512 - (offset & 511))
    }

    /// Check an entry's structure; `Err` describes the corruption.
    pub fn validate(&self, e: L2Entry) -> Result<()> {
        let corrupt = |m: String| Err(Error::Corrupt(m));
        if e.word & COMPRESSED != 0 {
            if self.data_file {
                return corrupt("compressed cluster in an image with a data file".into());
            }
            if e.bitmap != 0 {
                return corrupt("compressed cluster has a subcluster bitmap".into());
            }
            return Ok(());
        }
        let off = e.word & L2_OFFSET_MASK;
        if off & (self.cluster_size() - 1) != 0 {
            return corrupt(format!(
                "data cluster offset {off:#x} is not cluster aligned"
            ));
        }
        if self.extended {
            if (e.bitmap as u32) & ((e.bitmap >> 32) as u32) != 0 {
                return corrupt("corrupted subcluster allocation bitmap".into());
            }
            if !self.is_allocated(e) && e.bitmap as u32 != 0 {
                return corrupt(
                    "Unallocated cluster has non-zero subcluster allocation map".into(),
                );
            }
        }
        Ok(())
    }

    /// The mapping of subcluster `sc` (0 for standard entries) of a cluster.
    pub fn mapping(&self, e: L2Entry, sc: u32) -> Mapping {
        if e.word & COMPRESSED != 0 {
            let (offset, len) = self.compressed_extent(e.word);
            return Mapping::Compressed { offset, len };
        }
        let allocated = self.is_allocated(e);
        let host = e.word & L2_OFFSET_MASK;
        if self.extended {
            if e.bitmap & (1 << sc) != 0 {
                Mapping::Data(host)
            } else if e.bitmap & (1 << (32 + sc)) != 0 {
                Mapping::Zero
            } else {
                Mapping::Unallocated
            }
        } else if e.word & ZERO_FLAG != 0 {
            Mapping::Zero
        } else if allocated {
            Mapping::Data(host)
        } else {
            Mapping::Unallocated
        }
    }
}

/// An L2 table as u64 words (two per entry with extended L2).
pub(crate) type L2Table = Arc<Vec<u64>>;

/// A bounded cache of L2 tables, least recently used evicted first.
#[derive(Debug)]
pub(crate) struct L2Cache {
    tables: HashMap<u64, Cached, crate::refcount::OffsetHash>,
    capacity: usize,
    tick: u64,
}

#[derive(Debug)]
struct Cached {
    table: L2Table,
    used: u64,
    dirty: bool,
}

impl L2Cache {
    /// A cache of at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        Self {
            tables: HashMap::default(),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    pub fn get(&mut self, offset: u64) -> Option<L2Table> {
        self.tick += 1;
        let tick = self.tick;
        self.tables.get_mut(&offset).map(|c| {
            c.used = tick;
            Arc::clone(&c.table)
        })
    }

    /// The table inserting `offset` would evict, and whether it is dirty.
    pub fn victim(&self, offset: u64) -> Option<(u64, bool)> {
        if self.tables.len() < self.capacity || self.tables.contains_key(&offset) {
            return None;
        }
        self.tables
            .iter()
            .min_by_key(|(_, c)| c.used)
            .map(|(k, c)| (*k, c.dirty))
    }

    /// Insert a table read from the file (`dirty` false) or built in memory (`dirty` true),
    /// evicting the least recently used one when full. The caller writes a dirty victim back
    /// first (see [`L2Cache::victim`]).
    pub fn insert(&mut self, offset: u64, table: L2Table, dirty: bool) {
        if let Some((oldest, _)) = self.victim(offset) {
            self.tables.remove(&oldest);
        }
        self.tick += 1;
        self.tables.insert(
            offset,
            Cached {
                table,
                used: self.tick,
                dirty,
            },
        );
    }

    /// Change one entry of a cached table and mark it dirty; `false` if it is not cached.
    pub fn update(&mut self, offset: u64, index: usize, entry: L2Entry, extended: bool) -> bool {
        let Some(c) = self.tables.get_mut(&offset) else {
            return false;
        };
        let t = Arc::make_mut(&mut c.table);
        let words = if extended { 2 } else { 1 };
        if let Some(w) = t.get_mut(index * words) {
            *w = entry.word;
        }
        if extended {
            if let Some(w) = t.get_mut(index * 2 + 1) {
                *w = entry.bitmap;
            }
        }
        c.dirty = true;
        true
    }

    /// The dirty tables (offset and contents), marking them clean.
    pub fn take_dirty(&mut self) -> Vec<(u64, L2Table)> {
        let mut out: Vec<(u64, L2Table)> = self
            .tables
            .iter_mut()
            .filter(|(_, c)| c.dirty)
            .map(|(k, c)| {
                c.dirty = false;
                (*k, Arc::clone(&c.table))
            })
            .collect();
        out.sort_unstable_by_key(|(k, _)| *k);
        out
    }

    /// Mark a table dirty again (its write failed).
    pub fn mark_dirty(&mut self, offset: u64) {
        if let Some(c) = self.tables.get_mut(&offset) {
            c.dirty = true;
        }
    }

    /// Whether any table waits to be written.
    pub fn has_dirty(&self) -> bool {
        self.tables.values().any(|c| c.dirty)
    }

    pub fn remove(&mut self, offset: u64) {
        self.tables.remove(&offset);
    }
}

/// Entry `index` of a table.
pub(crate) fn entry_at(table: &[u64], index: usize, extended: bool) -> L2Entry {
    if extended {
        L2Entry {
            word: table.get(index * 2).copied().unwrap_or(0),
            bitmap: table.get(index * 2 + 1).copied().unwrap_or(0),
        }
    } else {
        L2Entry {
            word: table.get(index).copied().unwrap_or(0),
            bitmap: 0,
        }
    }
}

/// Decode big-endian u64 words.
pub(crate) fn words_from_be(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
        .collect()
}

/// Encode u64 words big-endian.
pub(crate) fn words_to_be(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            cluster_bits: 16,
            extended: false,
            data_file: false,
        }
    }

    #[test]
    fn compressed_extent_decodes_qemu_layout() {
        // 64 KiB clusters: x = 54, so the sector count sits in bits 54..61.
        let word = COMPRESSED | (2u64 << 54) | 0x1_0200;
        assert_eq!(geo().compressed_extent(word), (0x1_0200, 3 * 512));
    }

    #[test]
    fn zero_flag_maps_to_zero() {
        let e = L2Entry {
            word: 0x5_0000 | ZERO_FLAG | COPIED,
            bitmap: 0,
        };
        assert_eq!(geo().mapping(e, 0), Mapping::Zero);
    }

    #[test]
    fn unaligned_data_offset_is_corrupt() {
        let e = L2Entry {
            word: 0x5_0200 | COPIED,
            bitmap: 0,
        };
        assert!(geo().validate(e).is_err());
    }

    #[test]
    fn cache_evicts_least_recently_used() {
        let mut c = L2Cache::new(2);
        c.insert(1, Arc::new(vec![1]), false);
        c.insert(2, Arc::new(vec![2]), false);
        c.get(1);
        c.insert(3, Arc::new(vec![3]), false);
        assert!(c.get(2).is_none());
    }
}
