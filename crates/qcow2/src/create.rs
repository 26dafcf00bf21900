//! Creating images laid out as `qemu-img create -f qcow2` lays them out: header in cluster 0,
//! a one-cluster refcount table in cluster 1, the first refcount block in cluster 2, then the
//! L1 table, allocated by growing the empty image to its size (as QEMU does).

use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::ext::Extensions;
use crate::header::{self, autoclear, compat, incompat, CompressionType, Header};
use crate::image::{Image, OpenOptions};
use crate::l2::{L2Entry, COPIED};
use crate::refcount::write_entry;
use crate::storage::Storage;

/// How much to allocate up front (`preallocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Metadata only as needed.
    #[default]
    Off,
    /// Every L2 table and data cluster allocated; data not written.
    Metadata,
    /// As `Metadata` (the storage trait has no fallocate; the file is extended sparsely).
    Falloc,
    /// As `Metadata`, with the data clusters written with zeros.
    Full,
}

/// Options of a new image, named as `qemu-img create -o` names them.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Set the lazy refcounts feature.
    pub lazy_refcounts: bool,
    /// Use extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// How compressed clusters are compressed.
    pub compression_type: CompressionType,
    /// Backing file name stored in the header.
    pub backing_file: Option<String>,
    /// Backing file format stored in the header.
    pub backing_fmt: Option<String>,
    /// External data file name stored in the header.
    pub data_file: Option<String>,
    /// The external data file is a valid raw image.
    pub data_file_raw: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
}

impl CreateOptions {
    /// QEMU's defaults for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidOption(m.to_string()));
        let v3 = "(use compat=1.1 or greater)";
        if !(2..=3).contains(&self.version) {
            return bad("Invalid compatibility level");
        }
        if !self.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&self.cluster_size) {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if !self.size.is_multiple_of(512) {
            return bad("Image size must be a multiple of 512 bytes");
        }
        if self.version < 3 {
            let needs = |what: &str| {
                Err(Error::InvalidOption(format!(
                    "{what} only supported with compatibility level 1.1 and above {v3}"
                )))
            };
            if self.refcount_bits != 16 {
                return Err(Error::InvalidOption(format!("Different refcount widths than 16 bits require compatibility level 1.1 or above {v3}")));
            }
            if self.lazy_refcounts {
                return needs("Lazy refcounts");
            }
            if self.extended_l2 {
                return needs("Extended L2 entries are");
            }
            if self.compression_type != CompressionType::Deflate {
                return needs("Non-zlib compression type is");
            }
            if self.data_file.is_some() {
                return needs("External data files are");
            }
        }
        if self.extended_l2 && self.cluster_size < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data-file-raw requires data-file");
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return bad("Backing file and data-file-raw cannot be used at the same time");
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return bad("Backing format cannot be used without backing file");
        }
        Ok(())
    }

    fn header(&self) -> Header {
        let cluster_bits = self.cluster_size.trailing_zeros();
        let mut incompatible = 0;
        let mut compatible = 0;
        let mut autoclear_bits = 0;
        if self.extended_l2 {
            incompatible |= incompat::EXTL2;
        }
        if self.compression_type != CompressionType::Deflate {
            incompatible |= incompat::COMPRESSION;
        }
        if self.data_file.is_some() {
            incompatible |= incompat::DATA_FILE;
        }
        if self.data_file_raw {
            autoclear_bits |= autoclear::DATA_FILE_RAW;
        }
        if self.lazy_refcounts {
            compatible |= compat::LAZY_REFCOUNTS;
        }
        let mut extensions = Extensions {
            backing_format: self.backing_fmt.clone(),
            data_file: self.data_file.clone(),
            ..Extensions::default()
        };
        if self.version >= 3 && self.cluster_size > 4096 {
            extensions.feature_names = Extensions::qemu_feature_table();
        }
        Header {
            version: self.version,
            cluster_bits,
            size: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: self.cluster_size,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear_bits,
            refcount_order: self.refcount_bits.trailing_zeros(),
            header_length: if self.version >= 3 {
                header::V3_HEADER_LEN
            } else {
                header::V2_HEADER_LEN
            },
            compression_type: self.compression_type,
            extra: Vec::new(),
            extensions,
            backing_file: self.backing_file.clone(),
        }
    }
}

/// Create an image on `file` (truncated first). `data` is the external data file's storage
/// when `opts.data_file` names one; it is sized to the virtual size as QEMU sizes it.
pub async fn create(
    file: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    opts: &CreateOptions,
) -> Result<()> {
    opts.check()?;
    if opts.data_file.is_some() != data.is_some() {
        return Err(Error::InvalidOption(
            "the data file name and its storage go together".into(),
        ));
    }
    let header = opts.header();
    let cs = opts.cluster_size as usize;
    let mut cluster0 = header.to_bytes()?;
    cluster0.resize(cs, 0);
    let reftable = (2 * opts.cluster_size).to_be_bytes();
    let mut refblock = vec![0u8; cs];
    for c in 0..3 {
        write_entry(&mut refblock, header.refcount_order, c, 1);
    }
    file.set_len(0).await.ctx("cannot truncate the image")?;
    // Two writes as QEMU makes them (the header cluster, then the refcount table and its
    // first block), failing with QEMU's texts: fault-injection tests match on them.
    file.write_at(0, &cluster0)
        .await
        .ctx("Could not write qcow2 header")?;
    let mut tables = reftable.to_vec();
    tables.resize(cs, 0);
    tables.extend_from_slice(&refblock);
    file.write_at(opts.cluster_size, &tables)
        .await
        .ctx("Could not write refcount table")?;
    file.flush().await.ctx("cannot flush the image")?;
    if let Some(d) = &data {
        d.set_len(opts.size)
            .await
            .ctx("cannot size the data file")?;
    }
    let image = Image::open(
        file,
        OpenOptions {
            lazy_refcounts: Some(false),
            data_file: data,
            ..OpenOptions::default()
        },
    )
    .await?;
    image.truncate(opts.size).await?;
    let prealloc = if opts.data_file_raw && opts.preallocation == Preallocation::Off {
        Preallocation::Metadata
    } else {
        opts.preallocation
    };
    if prealloc != Preallocation::Off {
        image.preallocate(prealloc == Preallocation::Full).await?;
    }
    image.close().await
}

impl Image {
    /// Allocate every L2 table and data cluster, in guest order, as QEMU's metadata
    /// preallocation does; `write_zeroes` also writes the data clusters.
    async fn preallocate(&self, write_zeroes: bool) -> Result<()> {
        let cs = self.geo.cluster_size();
        let clusters = self.size().div_ceil(cs);
        let mut meta = self.meta.lock().await;
        let mut end = 0;
        for gc in 0..clusters {
            let (l2_off, idx) = self.l2_for_write(&mut meta, gc).await?;
            let host = if self.geo.data_file {
                gc * cs
            } else {
                meta.rc.alloc(self.file.as_ref(), 1).await?
            };
            end = end.max(host + cs);
            self.set_l2_entry(
                &mut meta,
                l2_off,
                idx,
                L2Entry {
                    word: host | COPIED,
                    bitmap: 0,
                },
            )
            .await?;
        }
        drop(meta);
        if !self.geo.data_file && end > 0 {
            let len = self.file.len().await.ctx("cannot get the image size")?;
            if write_zeroes {
                let zeros = vec![0u8; cs as usize];
                let mut off = len.div_ceil(cs) * cs;
                while off < end {
                    self.file
                        .write_at(off, &zeros)
                        .await
                        .ctx("cannot write the image")?;
                    off += cs;
                }
            }
            if end > len {
                self.file
                    .set_len(end)
                    .await
                    .ctx("cannot extend the image")?;
            }
        }
        self.flush().await
    }
}
