//! A read that mapped a cluster before a discard freed it must still return the old data, even
//! if a write wants a new cluster while the read is in flight.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use qcow2::{BlockKind, CreateOptions, Image, MemStorage, OpenOptions, Storage};
use tokio::sync::{Notify, Semaphore};

/// Storage whose reads of one host offset stop until the test lets them go.
struct Gated {
    inner: MemStorage,
    /// The host offset whose read is held (`u64::MAX`: none).
    gate: AtomicU64,
    reached: Notify,
    release: Semaphore,
}

#[async_trait]
impl Storage for Gated {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset == self.gate.load(Ordering::SeqCst) {
            self.gate.store(u64::MAX, Ordering::SeqCst);
            self.reached.notify_one();
            let _ = self.release.acquire().await.map_err(io::Error::other)?;
        }
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_at(offset, buf).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
    async fn len(&self) -> io::Result<u64> {
        self.inner.len().await
    }
    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len).await
    }
}

async fn race(compressed_first: bool) {
    let storage = Arc::new(Gated {
        inner: MemStorage::new(),
        gate: AtomicU64::new(u64::MAX),
        reached: Notify::new(),
        release: Semaphore::new(0),
    });
    let file: Arc<dyn Storage> = storage.clone();
    let opts = CreateOptions {
        cluster_size: 4096,
        ..CreateOptions::new(1 << 20)
    };
    qcow2::create(Arc::clone(&file), None, &opts).await.unwrap();
    let image = Arc::new(Image::open(file, OpenOptions::default()).await.unwrap());
    let old: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    if compressed_first {
        image.write_compressed(0, &old).await.unwrap();
    } else {
        image.write(0, &old, None).await.unwrap();
    }
    let gate = match image.block_status(0, 4096).await.unwrap().kind {
        BlockKind::Data { host_offset } => host_offset,
        BlockKind::Compressed => {
            // The only compressed cluster sits at the start of the newest host cluster.
            let len = storage.len().await.unwrap();
            (len - 1) / 4096 * 4096
        }
        other => panic!("unexpected {other:?}"),
    };
    storage.gate.store(gate, Ordering::SeqCst);
    let reader = {
        let image = Arc::clone(&image);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            image.read(0, &mut buf).await.unwrap();
            buf
        })
    };
    storage.reached.notified().await;
    // The read has mapped cluster 0 and waits in the storage: free the cluster and allocate.
    image.discard(0, 4096, false).await.unwrap();
    // The write-back applies the deferred decrement: the cluster is free but pinned.
    image.flush().await.unwrap();
    for c in 1..4u64 {
        image.write(c * 4096, &[0xee; 4096], None).await.unwrap();
    }
    storage.release.add_permits(1);
    let got = reader.await.unwrap();
    assert!(got == old, "the read returned another cluster's data");
    // Once the read is done the freed cluster is reused again.
    image.write(8 * 4096, &[0x11; 4096], None).await.unwrap();
    let report = image.check().await.unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    if !compressed_first {
        let st = image.block_status(8 * 4096, 4096).await.unwrap();
        assert_eq!(st.kind, BlockKind::Data { host_offset: gate });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_racing_a_discard_and_reuse_returns_the_old_data() {
    race(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_of_a_compressed_cluster_racing_a_discard_returns_the_old_data() {
    race(true).await;
}
