//! Compressed clusters: raw deflate (QEMU's 4 KiB window) and zstd.

use crate::error::{Error, Result};
use crate::header::CompressionType;

/// Decompress `input` (the host bytes of a compressed cluster, possibly with trailing junk)
/// until `out` is full. `at` is only used for the error message.
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
    at: u64,
) -> Result<()> {
    let ok = match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Decompress(at))
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> bool {
    // A raw deflate stream; an inflater with the largest window decodes 4 KiB window streams.
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        // "buffer full" is success: QEMU stops once one cluster is produced.
        Ok(_) => d.total_out() == out.len() as u64,
        Err(_) => false,
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> bool {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let Ok(mut dec) = Decoder::new() else {
        return false;
    };
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        if dec.run(&mut inb, &mut outb).is_err() {
            return false;
        }
        if outb.pos() == outb.capacity() {
            return true;
        }
        if (inb.pos(), outb.pos()) == before || inb.pos() == input.len() {
            return false;
        }
    }
}

/// Raw deflate window QEMU compresses with (and the smallest it can inflate).
const DEFLATE_WINDOW_BITS: u8 = 12;

/// Compress one cluster as QEMU does (raw deflate with a 4 KiB window, or a zstd frame);
/// `None` if the result would not be smaller than `data.len() - 1` bytes, where QEMU writes
/// the cluster uncompressed.
pub(crate) fn compress(kind: CompressionType, data: &[u8]) -> Option<Vec<u8>> {
    let limit = data.len().checked_sub(1)?;
    let out = match kind {
        CompressionType::Deflate => {
            let mut c = flate2::Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                DEFLATE_WINDOW_BITS,
            );
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => out,
                _ => return None,
            }
        }
        CompressionType::Zstd => zstd::bulk::compress(data, 0).ok()?,
    };
    (out.len() <= limit).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_round_trips_with_trailing_junk() {
        let data = vec![7u8; 4096];
        let mut c = compress(CompressionType::Deflate, &data).unwrap();
        c.extend_from_slice(&[0xaa; 100]);
        let mut out = vec![0; 4096];
        decompress(CompressionType::Deflate, &c, &mut out, 0).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_round_trips_with_trailing_zeros() {
        let data = vec![9u8; 4096];
        let mut c = compress(CompressionType::Zstd, &data).unwrap();
        c.extend_from_slice(&[0; 300]);
        let mut out = vec![0; 4096];
        decompress(CompressionType::Zstd, &c, &mut out, 0).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn deflate_output_inflates_with_a_4k_window() {
        // Data whose repeats are 8 KiB apart: a 32 KiB window would reach back for them.
        let block: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        let data = [block.clone(), block].concat();
        let c = compress(CompressionType::Deflate, &data).unwrap();
        let mut d = flate2::Decompress::new_with_window_bits(false, DEFLATE_WINDOW_BITS);
        let mut out = vec![0; data.len()];
        d.decompress(&c, &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!((d.total_out(), out), (data.len() as u64, data));
    }

    #[test]
    fn incompressible_data_is_refused() {
        let mut x = 1u32;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        assert!(compress(CompressionType::Deflate, &data).is_none());
        assert!(compress(CompressionType::Zstd, &data).is_none());
    }

    #[test]
    fn garbage_fails_to_decompress() {
        let mut out = vec![0; 4096];
        assert!(decompress(CompressionType::Zstd, &[1, 2, 3], &mut out, 0).is_err());
    }
}
