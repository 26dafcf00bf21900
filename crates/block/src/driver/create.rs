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
        // QEMU hands the size to ftruncate as a signed offset: past i64::MAX it is
        // a negative length, which the kernel refuses with EINVAL.
        if i64::try_from(size).is_err() {
            return Err(Error::Resize(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        // Start from an empty file so no old data survives, then grow it.
        file.set_len(0).map_err(Error::Resize)?;
        match prealloc {
            PreallocMode::Off | PreallocMode::Metadata => {
                file.set_len(size).map_err(Error::Resize)?;
                allocate_first_block(&file, size)?;
            }
            PreallocMode::Falloc => {
                if size > 0 {
                    sys::file::fallocate(&file, FallocMode::Allocate, 0, size)?;
                }
                file.set_len(size).map_err(Error::Resize)?;
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

/// Writes zeroes over the first block of a new sparse file, as QEMU does, so that
/// alignment probing with O_DIRECT later finds allocated data to read.
fn allocate_first_block(file: &std::fs::File, size: u64) -> Result<()> {
    const FIRST_BLOCK: u64 = 4096;
    let len = usize::try_from(size.min(FIRST_BLOCK)).map_err(|_| io::Error::other("block size"))?;
    if len > 0 {
        file.write_all_at(&vec![0u8; len], 0)?;
    }
    Ok(())
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
    async fn create_off_makes_a_sparse_file_with_its_first_block_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        create_file(&opts(&path, 1 << 20, PreallocMode::Off))
            .await
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        assert_eq!(meta.blocks() * 512, 4096);
    }

    #[tokio::test]
    async fn create_with_a_size_past_i64_fails_as_qemus_ftruncate() {
        let dir = tempfile::tempdir().unwrap();
        let err = create_file(&opts(&dir.path().join("a"), u64::MAX, PreallocMode::Off))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "Could not resize file: Invalid argument");
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
