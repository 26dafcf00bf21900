//! The crate's error type.

use std::io;

/// Everything that can go wrong opening, reading, writing, checking or creating an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The first four bytes are not `QFI\xfb`.
    #[error("Image is not in qcow2 format")]
    BadMagic(u32),
    /// The file is shorter than a header.
    #[error("image is too short for a qcow2 header ({0} bytes)")]
    Truncated(u64),
    /// Only versions 2 and 3 exist.
    #[error("Unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// cluster_bits outside 9..=21.
    #[error("Unsupported cluster size: 2^{0}")]
    UnsupportedClusterSize(u32),
    /// refcount_order above 6.
    #[error("Reference count entry width too large; may not exceed 64 bits")]
    RefcountOrderTooLarge(u32),
    /// Encrypted images are not supported by this library.
    #[error("unsupported encryption method {0}")]
    Encrypted(u32),
    /// Unknown incompatible feature bits, with QEMU's wording.
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnsupportedFeatures(String),
    /// The corrupt bit forbids writable opens.
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    CorruptReadWrite,
    /// A header field or table is out of bounds or badly formed.
    #[error("{0}")]
    Invalid(String),
    /// A table does not start on a cluster boundary.
    #[error("{table} offset {offset:#x} invalid")]
    Unaligned {
        /// which table
        table: &'static str,
        /// its offset in the file
        offset: u64,
    },
    /// A table would be larger than QEMU allows.
    #[error("{0} too large")]
    TooLarge(&'static str),
    /// A table lies past the end of the file.
    #[error("{table} at {offset:#x} lies past the end of the file ({file_len:#x})")]
    PastEof {
        /// which table
        table: &'static str,
        /// its offset
        offset: u64,
        /// the file length
        file_len: u64,
    },
    /// Metadata found inconsistent while doing I/O.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// A write met corrupt metadata; the image is now marked corrupt and refuses writes.
    #[error("Marking image as corrupt: {0}; further corruption events will be suppressed")]
    MarkedCorrupt(String),
    /// A write to a read-only image.
    #[error("image is opened read-only")]
    ReadOnly,
    /// A guest request beyond the virtual disk.
    #[error("request at {offset:#x} length {len:#x} is beyond the disk size {size:#x}")]
    OutOfRange {
        /// guest offset
        offset: u64,
        /// request length
        len: u64,
        /// virtual size
        size: u64,
    },
    /// Something this library does not do (yet).
    #[error("{0}")]
    Unsupported(String),
    /// A compressed cluster failed to decompress.
    #[error("cannot decompress cluster at {0:#x}")]
    Decompress(u64),
    /// An image with an external data file was opened without one.
    #[error("image needs an external data file")]
    NoDataFile,
    /// Invalid creation options.
    #[error("{0}")]
    InvalidOption(String),
    /// Another snapshot has this name (the caller appends " on device '…'", as QEMU words it).
    #[error("Snapshot with name '{0}' already exists")]
    SnapshotExists(String),
    /// No snapshot matches; an absent field prints as `null`, as QEMU prints it.
    #[error(
        "Snapshot with id '{}' and name '{}' does not exist",
        .id.as_deref().unwrap_or("null"),
        .name.as_deref().unwrap_or("null")
    )]
    SnapshotNotFound {
        /// the ID asked for
        id: Option<String>,
        /// the name asked for
        name: Option<String>,
    },
    /// A snapshot to delete needs an ID or a name.
    #[error("Name or id must be provided")]
    SnapshotUnnamed,
    /// The image holds QEMU's maximum number of snapshots (QEMU fails with EFBIG).
    #[error("too many snapshots")]
    TooManySnapshots,
    /// An I/O error on the image, data file or backing callback.
    #[error("{0}")]
    Io(&'static str, #[source] io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Attach a description to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &'static str) -> Result<T> {
        self.map_err(|e| Error::Io(what, e))
    }
}
