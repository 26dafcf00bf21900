//! Crafted hostile images: metadata offsets a write must not follow, and refcounts that claim
//! a huge used range.

use std::sync::Arc;

use crate::header::incompat;
use crate::{create, CreateOptions, Error, Header, Image, MemStorage, OpenOptions, Storage};

pub(crate) fn be(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

pub(crate) fn put(bytes: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A 64 MiB image with 64 KiB clusters and its first cluster written, as bytes.
async fn base() -> (Vec<u8>, Header) {
    let st = MemStorage::new();
    create(Arc::new(st.clone()), None, &CreateOptions::new(64 << 20))
        .await
        .unwrap();
    let image = Image::open(Arc::new(st.clone()), OpenOptions::default())
        .await
        .unwrap();
    image.write(0, &[1; 4096], None).await.unwrap();
    image.close().await.unwrap();
    let bytes = st.to_bytes();
    let h = Header::parse(&bytes).unwrap();
    (bytes, h)
}

pub(crate) async fn open(bytes: &[u8], read_only: bool) -> crate::Result<(Image, MemStorage)> {
    let st = MemStorage::from_bytes(bytes.to_vec());
    let file: Arc<dyn Storage> = Arc::new(st.clone());
    let opts = OpenOptions {
        read_only,
        ..OpenOptions::default()
    };
    Image::open(file, opts).await.map(|i| (i, st))
}

/// Point L1 entry 0 at `l2` (with the copied flag), write to guest cluster 0 and expect the
/// write refused with `want` in the message, the image marked corrupt and nothing else written.
async fn refused(l2: u64, want: &str) {
    let (mut bytes, h) = base().await;
    put(&mut bytes, h.l1_table_offset, l2 | 1 << 63);
    let (image, st) = open(&bytes, false).await.unwrap();
    let err = image.write(0, &[2; 512], None).await.unwrap_err();
    assert!(matches!(err, Error::MarkedCorrupt(_)), "{err}");
    let text = err.to_string();
    assert!(text.starts_with("Marking image as corrupt: "), "{text}");
    assert!(text.contains(want), "{text}");
    // Later writes are refused too, and the corrupt bit is on disk.
    let again = image.write(65536, &[3; 512], None).await.unwrap_err();
    assert!(matches!(again, Error::Corrupt(_)), "{again}");
    let after = st.to_bytes();
    let flags = be(&after, 72);
    assert_ne!(flags & incompat::CORRUPT, 0);
    let mut expect = bytes.clone();
    put(&mut expect, 72, flags);
    assert_eq!(after.len(), expect.len());
    assert!(after == expect, "metadata was written through");
    assert!(matches!(
        open(&after, false).await.unwrap_err(),
        Error::CorruptReadWrite
    ));
    // Read-only opens still work.
    open(&after, true).await.unwrap();
}

#[tokio::test]
async fn l2_table_over_the_l1_table_is_refused() {
    let (_, h) = base().await;
    refused(h.l1_table_offset, "overlaps with active L1 table").await;
}

#[tokio::test]
async fn l2_table_over_the_refcount_table_is_refused() {
    let (_, h) = base().await;
    refused(h.refcount_table_offset, "overlaps with refcount table").await;
}

#[tokio::test]
async fn l2_table_over_a_refcount_block_is_refused() {
    let (bytes, h) = base().await;
    let block = be(&bytes, h.refcount_table_offset);
    refused(block, "overlaps with refcount block").await;
}

#[tokio::test]
async fn l2_table_past_the_end_is_refused() {
    refused(1 << 40, "past the end of the image file").await;
}

#[tokio::test]
async fn unaligned_l2_table_is_refused() {
    refused(0x5_0200, "not cluster aligned").await;
}

#[tokio::test]
async fn reads_refuse_an_l2_table_past_the_end() {
    let (mut bytes, h) = base().await;
    put(&mut bytes, h.l1_table_offset, 1 << 40 | 1 << 63);
    let (image, st) = open(&bytes, true).await.unwrap();
    let mut buf = vec![0u8; 512];
    let err = image.read(0, &mut buf).await.unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    assert!(image.block_status(0, 512).await.is_err());
    assert_eq!(st.to_bytes().len(), bytes.len());
}

#[tokio::test]
async fn refcount_block_over_the_l1_table_is_not_written() {
    let (mut bytes, h) = base().await;
    put(&mut bytes, h.refcount_table_offset, h.l1_table_offset);
    let (image, st) = open(&bytes, false).await.unwrap();
    // A new cluster needs a refcount update in the bogus block.
    let err = image.write(1 << 20, &[2; 512], None).await.unwrap_err();
    assert!(matches!(err, Error::MarkedCorrupt(_)), "{err}");
    assert!(err.to_string().contains("active L1 table"), "{err}");
    let after = st.to_bytes();
    let l1 = h.l1_table_offset as usize;
    assert_eq!(after[l1..l1 + 512], bytes[l1..l1 + 512]);
}

#[tokio::test]
async fn data_cluster_over_the_refcount_table_is_not_written() {
    let (mut bytes, h) = base().await;
    let l2 = be(&bytes, h.l1_table_offset) & crate::l2::L1_OFFSET_MASK;
    put(&mut bytes, l2, h.refcount_table_offset | 1 << 63);
    let (image, st) = open(&bytes, false).await.unwrap();
    let err = image.write(0, &[2; 512], None).await.unwrap_err();
    assert!(
        err.to_string().contains("overlaps with refcount table"),
        "{err}"
    );
    let rt = h.refcount_table_offset as usize;
    assert_eq!(st.to_bytes()[rt..rt + 512], bytes[rt..rt + 512]);
}

/// Refcounts claiming every cluster of a 128 MiB file (and far past it) is in use: allocating must not scan it
/// (per allocation at most the budget, and later allocations start where the last one ended).
#[tokio::test]
async fn huge_claimed_used_range_allocates_by_appending() {
    let st = MemStorage::new();
    let opts = CreateOptions {
        cluster_size: 1024,
        ..CreateOptions::new(1 << 30)
    };
    create(Arc::new(st.clone()), None, &opts).await.unwrap();
    let mut bytes = st.to_bytes();
    let h = Header::parse(&bytes).unwrap();
    // One block full of ones, which every entry of a grown refcount table points at.
    let full = bytes.len().div_ceil(1024) * 1024;
    bytes.resize(full + 1024, 0);
    bytes[full..].fill(0xff);
    let tclusters = 64u64;
    let rt = bytes.len() as u64;
    bytes.resize(bytes.len() + (tclusters * 1024) as usize, 0);
    for i in 0..tclusters * 128 {
        put(&mut bytes, rt + i * 8, full as u64);
    }
    put(&mut bytes, 48, rt);
    bytes[56..60].copy_from_slice(&(tclusters as u32).to_be_bytes());
    assert_eq!(h.refcount_order, 4);
    // A long file (128 Ki clusters) the refcounts say is all in use.
    assert!(h.l1_table_offset < 1 << 20, "{h:?}");
    bytes.resize(128 << 20, 0);
    let (image, st) = open(&bytes, false).await.unwrap();
    for i in 0..8u64 {
        image
            .write(i * (1 << 20), &[i as u8 + 1; 512], None)
            .await
            .unwrap();
    }
    let scanned = image.meta.lock().await.rc.scanned;
    // 512 entries per block and 8192 blocks: 4 Mi clusters claimed used.
    assert!(
        scanned <= crate::refcount::SCAN_BUDGET + 64,
        "scanned {scanned}"
    );
    for i in 0..8u64 {
        let mut buf = [0u8; 512];
        image.read(i * (1 << 20), &mut buf).await.unwrap();
        assert_eq!(buf, [i as u8 + 1; 512]);
    }
    // Appended: the file grew by the new L2 tables and data only.
    assert!(st.to_bytes().len() < bytes.len() + 64 * 1024);
}

/// A long used prefix is scanned once: the hint moves past it.
#[tokio::test]
async fn free_hint_skips_the_used_prefix() {
    let (bytes, _) = base().await;
    let (image, _) = open(&bytes, false).await.unwrap();
    for i in 0..16u64 {
        image.write(i << 16, &[5; 65536], None).await.unwrap();
    }
    let scanned = image.meta.lock().await.rc.scanned;
    assert!(scanned < 64, "scanned {scanned}");
}
