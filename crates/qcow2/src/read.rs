//! Guest reads and block status.

use std::ops::Range;

use crate::error::{Error, IoContext, Result};
use crate::image::Image;
use crate::l2::{entry_at, L2Entry, Mapping, L2_OFFSET_MASK};
use crate::pin::Pin;

/// What a guest range is, as [`Image::block_status`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Data stored at this host offset (of the data file if the image has one).
    Data {
        /// Host offset of the range's first byte.
        host_offset: u64,
    },
    /// Reads as zeros without consulting the backing chain.
    Zero,
    /// Not allocated in this image: read it from the backing chain (zeros without one).
    Unallocated,
    /// Stored compressed.
    Compressed,
}

/// One answer of [`Image::block_status`]: `len` bytes from the asked offset are `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// What the range is.
    pub kind: BlockKind,
    /// How many bytes it spans (at least 1 unless the request was empty).
    pub len: u64,
}

impl Image {
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// The L2 entry of guest cluster `gc` (zero if its L2 table is missing).
    pub(crate) async fn entry_of(&self, meta: &mut crate::image::Meta, gc: u64) -> Result<L2Entry> {
        let cs = self.geo.cluster_size();
        let per = self.geo.l2_entries();
        let Some(l2_off) = meta.l2_offset(gc / per, cs)? else {
            return Ok(L2Entry::default());
        };
        let table = self.l2_table(meta, l2_off).await?;
        let e = entry_at(&table, (gc % per) as usize, self.geo.extended);
        self.geo.validate(e)?;
        Ok(e)
    }

    /// Map `offset` and return how far (at most `max_len`, within one cluster) the same
    /// mapping goes. Data mappings carry the host offset of `offset` itself.
    pub(crate) async fn lookup(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let (m, len, _) = self.lookup_pinned(offset, max_len, false).await?;
        Ok((m, len))
    }

    /// [`Image::lookup`], and with `pin` also pin (under the metadata lock) the host clusters
    /// of the image file the cluster's data lives in, so they are not reused before the
    /// caller has read them.
    async fn lookup_pinned(
        &self,
        offset: u64,
        max_len: u64,
        pin: bool,
    ) -> Result<(Mapping, u64, Option<Pin>)> {
        let cs = self.geo.cluster_size();
        let gc = offset / cs;
        let in_cluster = offset % cs;
        let room = (cs - in_cluster).min(max_len);
        let (e, guard) = {
            let mut meta = self.meta.lock().await;
            let e = self.entry_of(&mut meta, gc).await?;
            let cb = self.geo.cluster_bits;
            let guard = match self.geo.mapping(e, 0) {
                _ if !pin => None,
                Mapping::Compressed { offset, len } => {
                    Some(meta.rc.pins.pin(offset >> cb, (offset + len - 1) >> cb))
                }
                _ if self.geo.data_file || !self.geo.is_allocated(e) => None,
                _ => {
                    let c = (e.word & L2_OFFSET_MASK) >> cb;
                    Some(meta.rc.pins.pin(c, c))
                }
            };
            (e, guard)
        };
        let scs = self.geo.subcluster_size();
        let first_sc = (in_cluster / scs) as u32;
        let m = self.geo.mapping(e, first_sc);
        let mut len = (scs - in_cluster % scs).min(room);
        let mut sc = first_sc + 1;
        while len < room && self.same_kind(self.geo.mapping(e, sc), m) {
            len = (len + scs).min(room);
            sc += 1;
        }
        let m = match m {
            Mapping::Data(host) => Mapping::Data(host + in_cluster),
            other => other,
        };
        Ok((m, len, guard))
    }

    fn same_kind(&self, a: Mapping, b: Mapping) -> bool {
        std::mem::discriminant(&a) == std::mem::discriminant(&b)
    }

    /// What the range at `offset` is and how far that goes (at most `len` bytes).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_range(offset, len)?;
        let mut done = 0;
        let mut kind = None;
        while done < len {
            let (m, n) = self.lookup(offset + done, len - done).await?;
            let k = match m {
                Mapping::Data(h) => BlockKind::Data { host_offset: h },
                Mapping::Zero => BlockKind::Zero,
                Mapping::Unallocated => BlockKind::Unallocated,
                Mapping::Compressed { .. } => BlockKind::Compressed,
            };
            match kind {
                None => kind = Some(k),
                Some(BlockKind::Data { host_offset }) => {
                    if k != (BlockKind::Data {
                        host_offset: host_offset + done,
                    }) {
                        break;
                    }
                }
                Some(prev) if prev != k => break,
                Some(_) => {}
            }
            done += n;
        }
        Ok(BlockStatus {
            kind: kind.unwrap_or(BlockKind::Unallocated),
            len: done,
        })
    }

    /// Read `buf.len()` guest bytes at `offset`. Ranges not allocated in this image are zeroed
    /// in `buf` and returned (in guest offsets) so the caller can fill them from the backing
    /// chain.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Vec<Range<u64>>> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        let mut holes: Vec<Range<u64>> = Vec::new();
        // Data of consecutive clusters that lie one after another in the file is read in
        // one request: (host offset, start in `buf`, length, the pins that keep it).
        let mut run: Option<(u64, usize, usize, Vec<Pin>)> = None;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            // The pin keeps the mapped host clusters from reuse until this piece is read.
            let (m, n, pin) = self.lookup_pinned(pos, len - done, true).await?;
            let at = done as usize;
            if let Mapping::Data(host) = m {
                match &mut run {
                    Some((h, _, l, pins)) if *h + *l as u64 == host => {
                        *l += n as usize;
                        pins.extend(pin);
                    }
                    _ => {
                        if let Some((h, start, l, _pins)) = run.take() {
                            self.read_run(h, &mut buf[start..start + l]).await?;
                        }
                        run = Some((host, at, n as usize, pin.into_iter().collect()));
                    }
                }
                done += n;
                continue;
            }
            if let Some((h, start, l, _pins)) = run.take() {
                self.read_run(h, &mut buf[start..start + l]).await?;
            }
            let out = &mut buf[at..at + n as usize];
            match m {
                Mapping::Data(_) => unreachable!("data is read in runs above"),
                Mapping::Zero => out.fill(0),
                Mapping::Unallocated => {
                    out.fill(0);
                    match holes.last_mut() {
                        Some(h) if h.end == pos => h.end = pos + n,
                        _ => holes.push(pos..pos + n),
                    }
                }
                Mapping::Compressed {
                    offset: c_off,
                    len: c_len,
                } => {
                    let cluster = self.read_compressed(c_off, c_len).await?;
                    let start = (pos % self.geo.cluster_size()) as usize;
                    out.copy_from_slice(&cluster[start..start + out.len()]);
                }
            }
            drop(pin);
            done += n;
        }
        if let Some((h, start, l, _pins)) = run.take() {
            self.read_run(h, &mut buf[start..start + l]).await?;
        }
        Ok(holes)
    }

    /// Reads guest data stored at host offset `host` (the caller holds its pins).
    async fn read_run(&self, host: u64, out: &mut [u8]) -> Result<()> {
        self.data()
            .read_at(host, out)
            .await
            .ctx("cannot read guest data")
    }

    /// Decompress the cluster stored at host bytes `off..off + len`.
    pub(crate) async fn read_compressed(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size();
        // qcow2.txt: the sector count field is cluster_bits - 8 bits wide, so len <= 2 * cs.
        let len = len.min(2 * cs);
        let mut input = vec![0u8; len as usize];
        self.file
            .read_at(off, &mut input)
            .await
            .ctx("cannot read a compressed cluster")?;
        let mut out = vec![0u8; cs as usize];
        crate::compress::decompress(self.compression, &input, &mut out, off)?;
        Ok(out)
    }
}
