//! Opens arbitrary bytes as a qcow2 image, read-only and read-write, then reads, asks for block
//! status and checks it, as a daemon would after `blockdev-add`.
//!
//! Besides "no panic", libFuzzer's timeout and memory limit catch hangs and huge allocations
//! driven by header fields. Every storage read past the input yields zeros, as a short file
//! does; writes by the read-write open (dirty-bit repair) land in a copy of the input.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use qcow2::{Image, MemStorage, OpenOptions, Storage};

/// Most bytes one read asks for: enough to cross clusters, small enough to stay fast.
const READ_BYTES: u64 = 256 << 10;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime needs no resources")
    })
}

async fn exercise(image: &Image) {
    let size = image.size();
    let cs = image.cluster_size();
    // A few places: the start, a cluster in, the middle and the end of the disk.
    for at in [0, cs, size / 2, size.saturating_sub(1)] {
        if at >= size {
            continue;
        }
        let len = READ_BYTES.min(size - at);
        let mut buf = vec![0u8; len as usize];
        let _ = image.read(at, &mut buf).await;
        if let Ok(st) = image.block_status(at, len).await {
            assert!(st.len <= len);
        }
    }
    let _ = image.check().await;
}

async fn one(data: &[u8], read_only: bool) {
    let file: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(data.to_vec()));
    let opts = OpenOptions {
        read_only,
        l2_cache_bytes: 1 << 20,
        ..OpenOptions::default()
    };
    let Ok(image) = Image::open(file, opts).await else {
        return;
    };
    exercise(&image).await;
    if !read_only {
        let _ = image.close().await;
    }
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        one(data, true).await;
        one(data, false).await;
    });
});
