//! `null-co`: a node of a given size that drops writes and, with `read-zeroes`, reads
//! zeroes (QEMU 10.0's default leaves read buffers untouched).

use async_trait::async_trait;
use serde_json::{Map, Value};
use std::time::Duration;

use super::{BlockDriver, DriverInfo, Extent, WriteFlags, ZeroFlags};
use crate::error::{Error, Result};
use crate::filename::Filename;
use crate::options::NullOptions;

/// Default virtual size: 1 GiB, as QEMU.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// The `null-co` driver.
#[derive(Debug)]
pub struct NullDriver {
    opts: NullOptions,
    size: u64,
    read_zeroes: bool,
    latency: Option<Duration>,
}

impl NullDriver {
    /// Opens a null node from its options.
    pub fn open(opts: &NullOptions) -> Result<Self> {
        let size = opts.size.unwrap_or(DEFAULT_SIZE);
        if i64::try_from(size).is_err() {
            return Err(Error::NegativeSize);
        }
        Ok(Self {
            opts: opts.clone(),
            size,
            read_zeroes: opts.read_zeroes.unwrap_or(false),
            latency: opts
                .latency_ns
                .filter(|&ns| ns > 0)
                .map(Duration::from_nanos),
        })
    }

    async fn delay(&self) {
        if let Some(latency) = self.latency {
            tokio::time::sleep(latency).await;
        }
    }
}

#[async_trait]
impl BlockDriver for NullDriver {
    fn name(&self) -> &'static str {
        "null-co"
    }

    fn is_protocol(&self) -> bool {
        true
    }

    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        self.delay().await;
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(())
    }

    async fn write(&self, _offset: u64, _buf: &[u8], _flags: WriteFlags) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<Extent> {
        Ok(Extent {
            data: false,
            zero: self.read_zeroes,
            allocated: false,
            len,
        })
    }

    async fn truncate(&self, _size: u64) -> Result<()> {
        Err(Error::ResizeNotSupported)
    }

    fn filename(&self) -> Filename {
        // Only the strong options (size, read-zeroes) that were given appear.
        let mut options = Map::new();
        options.insert("driver".into(), Value::from("null-co"));
        if let Some(size) = self.opts.size {
            options.insert("size".into(), Value::from(size));
        }
        if let Some(zeroes) = self.opts.read_zeroes {
            options.insert("read-zeroes".into(), Value::from(zeroes));
        }
        let exact = (options.len() == 1).then(|| "null-co://".to_string());
        Filename { exact, options }
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            actual_size: Some(0),
            dirty_flag: None,
            format_specific: None,
            ..DriverInfo::default()
        }
    }
}
