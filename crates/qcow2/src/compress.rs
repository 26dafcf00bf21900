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

/// Compress one cluster; `None` if the result would not be smaller than `data.len() - 1`
/// bytes. Test-only for now: QEMU inflates with a 4 KiB window, which this deflater (32 KiB
/// window) does not honour, so compressed writes wait for a window-limited deflater.
#[cfg(test)]
pub(crate) fn compress(kind: CompressionType, data: &[u8]) -> Option<Vec<u8>> {
    let limit = data.len().checked_sub(1)?;
    let out = match kind {
        CompressionType::Deflate => {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = Vec::with_capacity(data.len());
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
    fn garbage_fails_to_decompress() {
        let mut out = vec![0; 4096];
        assert!(decompress(CompressionType::Zstd, &[1, 2, 3], &mut out, 0).is_err());
    }
}
