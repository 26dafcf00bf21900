//! The byte storage an image lives on, and the backing-data callback for copy-on-write.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

/// Random-access byte storage. Reads past the end of the storage must yield zeros: qemu-img
/// does not pad the last cluster of an image.
#[async_trait]
#[allow(clippy::len_without_is_empty)] // the interface the brief fixes
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`; bytes past the end read as zeros.
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `buf` at `offset`, growing the storage if needed.
    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every completed write durable.
    async fn flush(&self) -> io::Result<()>;
    /// The current length in bytes.
    async fn len(&self) -> io::Result<u64>;
    /// Truncate or extend (with zeros) to `len` bytes.
    async fn set_len(&self, len: u64) -> io::Result<()>;
}

/// The data below an image (its backing chain), read when a partial cluster is copied on
/// write. Bytes past the end of the backing data must be returned as zeros by the caller.
#[async_trait]
pub trait Backing: Send + Sync {
    /// Fill `buf` with the backing data at guest offset `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

fn too_big() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset too large")
}

/// Storage in memory, for tests and scratch images.
#[derive(Debug, Default, Clone)]
pub struct MemStorage {
    data: Arc<Mutex<Vec<u8>>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            data: Arc::new(Mutex::new(bytes)),
        }
    }

    /// A copy of the contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means another test thread panicked; the bytes are still valid.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Storage for MemStorage {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.lock();
        buf.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return Ok(());
        };
        if start < data.len() {
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut data = self.lock();
        let start = usize::try_from(offset).map_err(|_| too_big())?;
        let end = start.checked_add(buf.len()).ok_or_else(too_big)?;
        if end > data.len() {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| too_big())?;
        self.lock().resize(len, 0);
        Ok(())
    }
}

/// A [`std::fs::File`] driven through `spawn_blocking`.
#[derive(Debug, Clone)]
pub struct FileStorage {
    file: Arc<std::fs::File>,
}

impl FileStorage {
    /// Open `path` for reading, and for writing too if `writable`.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        Ok(Self::from_file(file))
    }

    /// Create (or truncate) `path` for reading and writing.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self::from_file(file))
    }

    /// Wrap an open file.
    pub fn from_file(file: std::fs::File) -> Self {
        Self {
            file: Arc::new(file),
        }
    }

    async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&std::fs::File) -> io::Result<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(io::Error::other)?
    }
}

#[async_trait]
impl Storage for FileStorage {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let len = buf.len();
        let data = self
            .run(move |f| {
                let mut tmp = vec![0u8; len];
                let mut done = 0;
                while done < len {
                    let n = f.read_at(&mut tmp[done..], offset + done as u64)?;
                    if n == 0 {
                        break; // past EOF: the rest stays zero
                    }
                    done += n;
                }
                Ok(tmp)
            })
            .await?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let data = buf.to_vec();
        self.run(move |f| f.write_all_at(&data, offset)).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.run(|f| f.sync_data()).await
    }

    async fn len(&self) -> io::Result<u64> {
        self.run(|f| Ok(f.metadata()?.len())).await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.run(move |f| f.set_len(len)).await
    }
}
