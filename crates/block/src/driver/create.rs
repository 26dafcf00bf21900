//! `blockdev-create` for the `file` driver.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::options::{FileCreateOptions, PreallocMode};
use sys::file::FallocMode;

/// Chunk written at a time by `preallocation=full`.
const FULL_CHUNK: u64 = 1 << 20;

/// Creates (or truncates) the file named in `opts` with the requested size and
/// preallocation, as QEMU's file driver does.
pub async fn create_file(opts: &FileCreateOptions) -> Result<()> {
    let prealloc = opts.preallocation.unwrap_or_default();
    if prealloc == PreallocMode::Metadata {
        return Err(Error::UnsupportedPreallocation(prealloc.as_str()));
    }
    let path = opts.filename.clone();
    let size = opts.size;
    let result = tokio::task::spawn_blocking(move || -> Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| Error::Create {
                path: path.clone(),
                source,
            })?;
        // Start from an empty file so no old data survives, then grow it.
        file.set_len(0)?;
        match prealloc {
            PreallocMode::Off | PreallocMode::Metadata => file.set_len(size)?,
            PreallocMode::Falloc => {
                if size > 0 {
                    sys::file::fallocate(&file, FallocMode::Allocate, 0, size)?;
                }
                file.set_len(size)?;
            }
            PreallocMode::Full => {
                let zeroes = vec![0u8; FULL_CHUNK as usize];
                let mut done = 0;
                while done < size {
                    let chunk = (size - done).min(FULL_CHUNK);
                    let len = usize::try_from(chunk).map_err(|_| io::Error::other("chunk"))?;
                    file.write_all_at(&zeroes[..len], done)?;
                    done += chunk;
                }
                file.sync_data()?;
            }
        }
        Ok(())
    })
    .await;
    match result {
        Ok(inner) => inner,
        Err(_) => Err(Error::Io(io::Error::other("create task failed"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn opts(path: &std::path::Path, size: u64, prealloc: PreallocMode) -> FileCreateOptions {
        FileCreateOptions {
            filename: path.to_string_lossy().into_owned(),
            size,
            preallocation: Some(prealloc),
            nocow: None,
            extent_size_hint: None,
        }
    }

    #[tokio::test]
    async fn create_off_makes_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        create_file(&opts(&path, 1 << 20, PreallocMode::Off))
            .await
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        assert_eq!(meta.blocks(), 0);
    }

    #[tokio::test]
    async fn create_full_allocates_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        create_file(&opts(&path, 1 << 20, PreallocMode::Full))
            .await
            .unwrap();
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 >= 1 << 20);
    }

    #[tokio::test]
    async fn create_metadata_is_refused_as_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let err = create_file(&opts(&dir.path().join("a"), 512, PreallocMode::Metadata))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "Unsupported preallocation mode: metadata");
    }

    #[tokio::test]
    async fn create_in_missing_dir_reads_like_qemu() {
        let err = create_file(&opts(
            std::path::Path::new("/nonexistent-dir/x.img"),
            512,
            PreallocMode::Off,
        ))
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Could not create '/nonexistent-dir/x.img': No such file or directory"
        );
    }
}
