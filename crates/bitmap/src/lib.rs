//! Dirty bitmaps: which parts of a disk changed, one bit per `granularity` bytes.
//!
//! The block layer keeps one [`DirtyBitmap`] per named bitmap of a node and marks every
//! completed write in it; backup, NBD block status and the qcow2 bitmaps extension read it.
//! This crate knows nothing of nodes, QMP or image formats. Its byte layout is QEMU's
//! (`docs/interop/qcow2.txt`, "Bitmaps"): bit `n` covers guest bytes
//! `n * granularity .. (n + 1) * granularity` and lives in byte `n / 8` at bit `n % 8`, least
//! significant bit first, so the bytes go to and from a qcow2 image as they are.
//!
//! State: the disk size, the granularity, one bit per chunk (a chunk is `granularity` bytes;
//! the last one may be partial) and the number of set bits.
//! Invariants: bits past the last chunk are always clear, and the count always equals the
//! number of set bits.
//!
//! ```
//! use bitmap::{DirtyBitmap, Granularity};
//! let mut b = DirtyBitmap::new(1 << 20, Granularity::new(65536)?);
//! b.set(1000, 10); // marks the whole first chunk
//! assert!(b.get(65535) && !b.get(65536));
//! assert_eq!(b.count(), 65536);
//! assert_eq!(b.dirty_extents(0, 1 << 20).collect::<Vec<_>>(), vec![0..65536]);
//! assert_eq!(b.to_bytes(), [&[1u8][..], &[0; 1][..]].concat());
//! # Ok::<(), bitmap::Error>(())
//! ```
#![forbid(unsafe_code)]

mod sha256;

use std::fmt;
use std::ops::Range;

/// What can go wrong building or combining bitmaps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A granularity that is not a power of two from 512 bytes to 2 GiB.
    #[error("granularity {0} is not a power of two from 512 bytes to 2 GiB")]
    Granularity(u64),
    /// Serialized bytes of the wrong length for the bitmap.
    #[error("bitmap data has {got} bytes instead of {want}")]
    DataLength {
        /// bytes given
        got: u64,
        /// bytes the bitmap serializes to
        want: u64,
    },
    /// Two bitmaps that cover different disk sizes.
    #[error("bitmaps cover different sizes ({0} and {1} bytes)")]
    SizeMismatch(u64, u64),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Bytes per bit of a bitmap: a power of two from 512 bytes to 2 GiB, the range QEMU accepts
/// for persistent bitmaps (`block/qcow2-bitmap.c` limits granularity_bits to 9..=31).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Granularity(u32);

impl Granularity {
    /// log2 of the smallest granularity, 512 bytes.
    pub const MIN_BITS: u32 = 9;
    /// log2 of the largest granularity, 2 GiB.
    pub const MAX_BITS: u32 = 31;
    /// The smallest granularity, 512 bytes.
    pub const MIN: Granularity = Granularity(Self::MIN_BITS);

    /// The granularity of `bytes` bytes.
    pub fn new(bytes: u64) -> Result<Self> {
        if !bytes.is_power_of_two() {
            return Err(Error::Granularity(bytes));
        }
        Self::from_bits(bytes.trailing_zeros()).map_err(|_| Error::Granularity(bytes))
    }

    /// The granularity of `1 << bits` bytes.
    pub fn from_bits(bits: u32) -> Result<Self> {
        if !(Self::MIN_BITS..=Self::MAX_BITS).contains(&bits) {
            return Err(Error::Granularity(1u64.checked_shl(bits).unwrap_or(0)));
        }
        Ok(Self(bits))
    }

    /// log2 of the granularity.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// The granularity in bytes.
    pub fn bytes(self) -> u64 {
        1 << self.0
    }
}

/// A dirty bitmap over a disk of `size` bytes (see the crate documentation).
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    size: u64,
    granularity: Granularity,
    /// Bit `n % 64` of word `n / 64` is chunk `n`; at least one word, as QEMU keeps.
    words: Vec<u64>,
    /// Set bits.
    dirty: u64,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("size", &self.size)
            .field("granularity", &self.granularity.bytes())
            .field("dirty_chunks", &self.dirty)
            .finish()
    }
}

/// Bits `lo..hi` of a word (`lo < hi <= 64`).
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

fn word_count(chunks: u64) -> usize {
    usize::try_from(chunks.div_ceil(64).max(1)).unwrap_or(usize::MAX)
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes.
    pub fn new(size: u64, granularity: Granularity) -> Self {
        let chunks = size.div_ceil(granularity.bytes());
        Self {
            size,
            granularity,
            words: vec![0; word_count(chunks)],
            dirty: 0,
        }
    }

    /// A bitmap over `size` bytes from its serialized bytes ([`DirtyBitmap::to_bytes`]).
    pub fn from_bytes(size: u64, granularity: Granularity, bytes: &[u8]) -> Result<Self> {
        let mut b = Self::new(size, granularity);
        if bytes.len() as u64 != b.serialized_len() {
            return Err(Error::DataLength {
                got: bytes.len() as u64,
                want: b.serialized_len(),
            });
        }
        b.deserialize(0, bytes);
        Ok(b)
    }

    /// Bytes of disk the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// Bits of the bitmap: the disk size divided by the granularity, rounded up.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.granularity.bytes())
    }

    /// Set bits.
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty
    }

    /// Dirty bytes as QEMU counts them (`count` in `query-named-block-nodes`): set bits times
    /// the granularity, so a dirty partial last chunk counts whole.
    pub fn count(&self) -> u64 {
        self.dirty << self.granularity.bits()
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.dirty == 0
    }

    /// Whether the chunk holding byte `offset` is dirty (false past the end).
    pub fn get(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let c = offset >> self.granularity.bits();
        self.words[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    /// The chunks `offset..offset + len` touches, clipped to the disk: `(first, end)`.
    fn touched(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return None;
        }
        let bits = self.granularity.bits();
        Some((offset >> bits, ((end - 1) >> bits) + 1))
    }

    /// Mark every chunk that `offset..offset + len` touches.
    pub fn set(&mut self, offset: u64, len: u64) {
        if let Some((first, end)) = self.touched(offset, len) {
            self.fill_chunks(first, end, true);
        }
    }

    /// Clear the chunks that `offset..offset + len` covers whole; a range reaching the end of
    /// the disk covers the partial last chunk. Chunks only partly covered stay as they are,
    /// so a reset never loses a change it did not see.
    pub fn reset(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let bits = self.granularity.bits();
        let first = offset.div_ceil(self.granularity.bytes());
        let last = if end >= self.size {
            self.chunks()
        } else {
            end >> bits
        };
        if first < last {
            self.fill_chunks(first, last, false);
        }
    }

    /// Clear every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
        self.dirty = 0;
    }

    /// Set or clear chunks `first..end` (`end <= chunks`).
    fn fill_chunks(&mut self, first: u64, end: u64, value: bool) {
        let mut c = first;
        while c < end {
            let w = (c / 64) as usize;
            let hi = (end - (w as u64) * 64).min(64);
            let m = mask(c % 64, hi);
            let old = self.words[w];
            let new = if value { old | m } else { old & !m };
            self.dirty = self.dirty + u64::from(new.count_ones()) - u64::from(old.count_ones());
            self.words[w] = new;
            c = (w as u64 + 1) * 64;
        }
    }

    /// The first chunk at or after `from` whose bit is `value`.
    fn next_chunk(&self, from: u64, value: bool) -> Option<u64> {
        let chunks = self.chunks();
        if from >= chunks {
            return None;
        }
        let flip = if value { 0 } else { u64::MAX };
        let mut w = (from / 64) as usize;
        let mut word = (self.words[w] ^ flip) & mask(from % 64, 64);
        loop {
            if word != 0 {
                let c = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (c < chunks).then_some(c);
            }
            w += 1;
            word = self.words.get(w)? ^ flip;
        }
    }

    /// The first byte at or after `offset` whose chunk is dirty (`value`) or clean.
    fn next_byte(&self, offset: u64, value: bool) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let bits = self.granularity.bits();
        let c = self.next_chunk(offset >> bits, value)?;
        Some((c << bits).max(offset))
    }

    /// The first dirty byte at or after `offset`.
    pub fn next_dirty(&self, offset: u64) -> Option<u64> {
        self.next_byte(offset, true)
    }

    /// The first clean byte at or after `offset`.
    pub fn next_clean(&self, offset: u64) -> Option<u64> {
        self.next_byte(offset, false)
    }

    /// The dirty ranges inside `offset..offset + len` (clipped to the disk), in order, each
    /// as long as it can be.
    pub fn dirty_extents(&self, offset: u64, len: u64) -> DirtyExtents<'_> {
        DirtyExtents {
            bitmap: self,
            pos: offset,
            end: offset.saturating_add(len).min(self.size),
        }
    }

    /// Mark everything `other` marks. Granularities may differ; sizes may not.
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<()> {
        if self.size != other.size {
            return Err(Error::SizeMismatch(self.size, other.size));
        }
        if self.granularity == other.granularity {
            for (w, o) in self.words.iter_mut().zip(&other.words) {
                *w |= o;
            }
            self.recount();
        } else {
            for r in other.dirty_extents(0, other.size) {
                self.set(r.start, r.end - r.start);
            }
        }
        Ok(())
    }

    /// Cover `size` bytes instead: new chunks are clean, chunks past the new end are dropped.
    pub fn resize(&mut self, size: u64) {
        self.size = size;
        let chunks = self.chunks();
        self.words.resize(word_count(chunks), 0);
        let tail = self.tail_mask();
        if let Some(last) = self.words.last_mut() {
            *last &= tail;
        }
        self.recount();
    }

    /// The bits of the last word that hold chunks.
    fn tail_mask(&self) -> u64 {
        match self.chunks() % 64 {
            0 if self.chunks() == 0 => 0,
            0 => u64::MAX,
            n => mask(0, n),
        }
    }

    fn recount(&mut self) {
        self.dirty = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// Length of the serialized bitmap: one bit per chunk, rounded up to whole bytes.
    pub fn serialized_len(&self) -> u64 {
        self.chunks().div_ceil(8)
    }

    /// Copy serialized bytes from `byte_offset` into `out`; bytes past the end are zeros.
    pub fn serialize(&self, byte_offset: u64, out: &mut [u8]) {
        let len = self.serialized_len();
        for (i, o) in out.iter_mut().enumerate() {
            let b = byte_offset.saturating_add(i as u64);
            *o = if b < len {
                self.words[(b / 8) as usize].to_le_bytes()[(b % 8) as usize]
            } else {
                0
            };
        }
    }

    /// The whole serialized bitmap.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0; usize::try_from(self.serialized_len()).unwrap_or(usize::MAX)];
        self.serialize(0, &mut out);
        out
    }

    /// Overwrite the bits that serialized bytes `byte_offset..` hold with `data`; bytes and
    /// bits past the last chunk are ignored.
    pub fn deserialize(&mut self, byte_offset: u64, data: &[u8]) {
        let len = self.serialized_len();
        let end = byte_offset.saturating_add(data.len() as u64).min(len);
        if byte_offset >= end {
            return;
        }
        let last_word = (self.chunks() - 1) / 64;
        let tail = self.tail_mask();
        let mut b = byte_offset;
        while b < end {
            let w = b / 8;
            let mut bytes = self.words[w as usize].to_le_bytes();
            let stop = ((w + 1) * 8).min(end);
            for at in b..stop {
                bytes[(at % 8) as usize] = data[(at - byte_offset) as usize];
            }
            let mut new = u64::from_le_bytes(bytes);
            if w == last_word {
                new &= tail;
            }
            let old = self.words[w as usize];
            self.dirty = self.dirty + u64::from(new.count_ones()) - u64::from(old.count_ones());
            self.words[w as usize] = new;
            b = stop;
        }
    }

    /// The SHA-256 QEMU's `x-debug-block-dirty-bitmap-sha256` reports, in lowercase hex: the
    /// hash of the bitmap's bits as 64-bit little-endian words (`hbitmap_sha256` hashes its
    /// lowest level, `max(1, ceil(chunks / 64))` host-order words, on a little-endian host).
    pub fn sha256(&self) -> String {
        let mut data = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            data.extend_from_slice(&w.to_le_bytes());
        }
        sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Iterator over dirty ranges, from [`DirtyBitmap::dirty_extents`].
#[derive(Debug, Clone)]
pub struct DirtyExtents<'a> {
    bitmap: &'a DirtyBitmap,
    pos: u64,
    end: u64,
}

impl Iterator for DirtyExtents<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.bitmap.next_dirty(self.pos).filter(|&d| d < self.end)?;
        let stop = self
            .bitmap
            .next_clean(start)
            .unwrap_or(self.bitmap.size)
            .min(self.end);
        self.pos = stop;
        Some(start..stop)
    }
}

#[cfg(test)]
mod tests;
