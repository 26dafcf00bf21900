//! Many requests in flight on one image: partial writes into the same unallocated clusters
//! (each allocation copies on write from the backing data), in-place rewrites, write_zeroes and
//! discards racing them. No update may be lost and the image must check clean.

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use qcow2::{Backing, CreateOptions, Image, MemStorage, OpenOptions, Storage};

const CS: u64 = 4096;
const CLUSTERS: u64 = 16;

/// Backing data: byte `i` of the disk is `i % 253`.
struct Pattern;

#[async_trait]
impl Backing for Pattern {
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 253) as u8;
        }
        Ok(())
    }
}

/// Memory storage whose every request yields to the scheduler a few times first, so
/// requests really interleave at their I/O points.
struct Yielding(MemStorage);

async fn yield_some(offset: u64) {
    for _ in 0..(offset / 512) % 4 + 1 {
        tokio::task::yield_now().await;
    }
}

#[async_trait]
impl Storage for Yielding {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        yield_some(offset).await;
        self.0.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        yield_some(offset).await;
        self.0.write_at(offset, buf).await
    }
    async fn flush(&self) -> io::Result<()> {
        tokio::task::yield_now().await;
        self.0.flush().await
    }
    async fn len(&self) -> io::Result<u64> {
        self.0.len().await
    }
    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len).await
    }
}

async fn image() -> (Arc<Image>, MemStorage) {
    let st = MemStorage::new();
    let file: Arc<dyn Storage> = Arc::new(Yielding(st.clone()));
    let opts = CreateOptions {
        cluster_size: CS,
        ..CreateOptions::new(CLUSTERS * CS)
    };
    qcow2::create(Arc::clone(&file), None, &opts).await.unwrap();
    let image = Image::open(file, OpenOptions::default()).await.unwrap();
    (Arc::new(image), st)
}

fn sector_byte(sector: u64) -> u8 {
    (sector % 200) as u8 + 1
}

/// Every 512-byte sector of 16 unallocated clusters written by its own task, all at once:
/// eight requests race for each cluster's allocation and copy-on-write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_partial_writes_to_unallocated_clusters_lose_nothing() {
    let (image, _) = image().await;
    let sectors = CLUSTERS * CS / 512;
    let mut tasks = Vec::new();
    // Odd sectors only: even ones must still show the backing data afterwards.
    for s in (1..sectors).step_by(2) {
        let image = Arc::clone(&image);
        tasks.push(tokio::spawn(async move {
            image
                .write(s * 512, &[sector_byte(s); 512], Some(&Pattern))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut buf = vec![0u8; (CLUSTERS * CS) as usize];
    let holes = image.read(0, &mut buf).await.unwrap();
    assert!(holes.is_empty(), "every cluster is allocated: {holes:?}");
    for s in 0..sectors {
        let got = &buf[(s * 512) as usize..((s + 1) * 512) as usize];
        if s % 2 == 1 {
            assert!(got.iter().all(|&b| b == sector_byte(s)), "sector {s} lost");
        } else {
            let want: Vec<u8> = (s * 512..(s + 1) * 512).map(|i| (i % 253) as u8).collect();
            assert!(got == want, "sector {s} lost its backing data");
        }
    }
    let report = image.check().await.unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    image.close().await.unwrap();
}

/// Rewrites, zeroing and discards of the same clusters in flight together, then a last
/// write of each sector in order: the result is the last writes, and the image is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_requests_in_flight_leave_a_clean_image() {
    let (image, st) = image().await;
    image
        .write(0, &vec![7u8; (CLUSTERS * CS) as usize], None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for round in 0..8u64 {
        for c in 0..CLUSTERS {
            let image = Arc::clone(&image);
            tasks.push(tokio::spawn(async move {
                let off = c * CS + (round % 8) * 512;
                match (round + c) % 4 {
                    0 => image.write(off, &[round as u8; 512], None).await,
                    1 => image.write_zeroes(c * CS, CS, true, None).await,
                    2 => image.discard(c * CS, CS, false).await,
                    _ => image.write(c * CS, &[0x55; CS as usize], None).await,
                }
                .unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    for c in 0..CLUSTERS {
        image
            .write(c * CS, &[c as u8 + 1; CS as usize], None)
            .await
            .unwrap();
    }
    image.flush().await.unwrap();
    let report = image.check().await.unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    image.close().await.unwrap();
    let reopened = Image::open(
        Arc::new(MemStorage::from_bytes(st.to_bytes())),
        OpenOptions::default(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; CS as usize];
    for c in 0..CLUSTERS {
        reopened.read(c * CS, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == c as u8 + 1), "cluster {c}");
    }
}
