//! Hostile snapshot tables and trees in whole images: open refuses what QEMU refuses, and
//! the operations refuse trees that would change the wrong refcounts, before changing
//! anything.

use std::sync::Arc;

use crate::hostile_tests::{be, put};
use crate::{create, CreateOptions, Error, Header, Image, MemStorage, NewSnapshot, OpenOptions};

/// A new image made with `opts` and its first 4 KiB written, open on memory.
async fn written_image(opts: CreateOptions) -> (Image, MemStorage) {
    let st = MemStorage::new();
    create(Arc::new(st.clone()), None, &opts).await.unwrap();
    let image = Image::open(Arc::new(st.clone()), OpenOptions::default())
        .await
        .unwrap();
    image.write(0, &[1; 4096], None).await.unwrap();
    (image, st)
}

/// Such an image with one snapshot "s" of it, as bytes.
async fn with_snapshot(opts: CreateOptions) -> (Vec<u8>, Header) {
    let (image, st) = written_image(opts).await;
    image.create_snapshot(&NewSnapshot::new("s")).await.unwrap();
    image.close().await.unwrap();
    let bytes = st.to_bytes();
    let h = Header::parse(&bytes).unwrap();
    (bytes, h)
}

fn small() -> CreateOptions {
    CreateOptions {
        cluster_size: 512,
        ..CreateOptions::new(4 << 20)
    }
}

async fn open(bytes: &[u8]) -> crate::Result<Image> {
    crate::hostile_tests::open(bytes, false)
        .await
        .map(|(i, _)| i)
}

/// Open `bytes`, let `op` fail, and check that the image was not changed.
async fn refuses_untouched(bytes: &[u8], want: &str, op: fn(&Image) -> OpFuture<'_>) {
    let (image, st) = crate::hostile_tests::open(bytes, false).await.unwrap();
    let err = op(&image).await.unwrap_err();
    assert!(err.to_string().contains(want), "{err}");
    assert!(st.to_bytes() == bytes, "the image changed");
}

type OpFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = crate::Result<crate::SnapshotInfo>> + 'a>>;

fn revert(image: &Image) -> OpFuture<'_> {
    Box::pin(image.revert_snapshot("s"))
}

fn delete(image: &Image) -> OpFuture<'_> {
    Box::pin(image.delete_snapshot(None, Some("s")))
}

#[tokio::test]
async fn open_rejects_too_much_extra_data() {
    let (mut bytes, h) = with_snapshot(small()).await;
    let at = h.snapshots_offset as usize + 36;
    bytes[at..at + 4].copy_from_slice(&2000u32.to_be_bytes());
    let err = open(&bytes).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Too much extra metadata in snapshot table entry 0"
    );
}

#[tokio::test]
async fn open_rejects_an_unaligned_snapshot_table() {
    let (mut bytes, h) = with_snapshot(small()).await;
    put(&mut bytes, 64, h.snapshots_offset + 8);
    let err = open(&bytes).await.unwrap_err();
    assert!(err.to_string().contains("Snapshot table offset"), "{err}");
}

#[tokio::test]
async fn open_rejects_too_many_snapshots() {
    let (mut bytes, _) = with_snapshot(small()).await;
    bytes[60..64].copy_from_slice(&65_537u32.to_be_bytes());
    let err = open(&bytes).await.unwrap_err();
    assert_eq!(err.to_string(), "Too many snapshots");
}

#[tokio::test]
async fn counts_past_the_table_read_zeros_as_qemu_does() {
    // A second entry past the table's end reads as zeros: an empty ID and name.
    let (mut bytes, _) = with_snapshot(small()).await;
    bytes[60..64].copy_from_slice(&2u32.to_be_bytes());
    let image = open(&bytes).await.unwrap();
    let list = image.snapshots().await;
    assert_eq!(list.len(), 2);
    assert_eq!(list[1].name, "");
}

#[tokio::test]
async fn revert_refuses_a_snapshot_l1_table_too_large() {
    let (mut bytes, h) = with_snapshot(small()).await;
    let at = h.snapshots_offset as usize + 8;
    bytes[at..at + 4].copy_from_slice(&(5u32 << 20).to_be_bytes());
    refuses_untouched(&bytes, "Snapshot L1 table too large", revert).await;
}

#[tokio::test]
async fn delete_refuses_an_unaligned_snapshot_l1_table() {
    let (mut bytes, h) = with_snapshot(small()).await;
    let at = h.snapshots_offset;
    let l1 = be(&bytes, at);
    put(&mut bytes, at, l1 + 8);
    refuses_untouched(&bytes, "Snapshot L1 table offset", delete).await;
}

#[tokio::test]
async fn revert_refuses_a_tree_that_points_at_the_refcount_table() {
    let (mut bytes, h) = with_snapshot(small()).await;
    let l1 = be(&bytes, h.snapshots_offset);
    let l2 = be(&bytes, l1) & crate::l2::L1_OFFSET_MASK;
    put(&mut bytes, l2 + 8, h.refcount_table_offset);
    let want = format!(
        "snapshot tree references cluster {:#x}",
        h.refcount_table_offset / 512
    );
    let (image, st) = crate::hostile_tests::open(&bytes, false).await.unwrap();
    let err = image.revert_snapshot("s").await.unwrap_err();
    assert!(err.to_string().contains(&want), "{err}");
    assert!(st.to_bytes() == bytes, "the image changed");
}

#[tokio::test]
async fn delete_refuses_a_tree_that_points_at_a_free_cluster() {
    let (mut bytes, h) = with_snapshot(small()).await;
    let l1 = be(&bytes, h.snapshots_offset);
    let l2 = be(&bytes, l1) & crate::l2::L1_OFFSET_MASK;
    put(&mut bytes, l2 + 8, 1000 * 512);
    refuses_untouched(&bytes, "(refcount 0)", delete).await;
}

#[tokio::test]
async fn one_bit_refcounts_cannot_share_clusters() {
    let opts = CreateOptions {
        refcount_bits: 1,
        ..small()
    };
    let (image, st) = written_image(opts).await;
    image.close().await.unwrap();
    let before = st.to_bytes();
    let err = image
        .create_snapshot(&NewSnapshot::new("s"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    assert!(st.to_bytes() == before, "the image changed");
}

#[tokio::test]
async fn check_reports_an_incomplete_v3_entry() {
    let (mut bytes, h) = with_snapshot(small()).await;
    // Extra data of 8 bytes: the entry is shorter and lacks the disk size.
    let at = h.snapshots_offset as usize;
    bytes[at + 36..at + 40].copy_from_slice(&8u32.to_be_bytes());
    let image = crate::hostile_tests::open(&bytes, true).await.unwrap().0;
    let report = image.check().await.unwrap();
    assert!(
        report
            .messages
            .iter()
            .any(|m| m == "ERROR snapshot table entry 0 is incomplete"),
        "{:?}",
        report.messages
    );
}

#[tokio::test]
async fn snapshots_are_refused_with_an_external_data_file() {
    let data = MemStorage::new();
    let opts = CreateOptions {
        data_file: Some("data.raw".into()),
        ..small()
    };
    let st = MemStorage::new();
    create(Arc::new(st.clone()), Some(Arc::new(data.clone())), &opts)
        .await
        .unwrap();
    let image = Image::open(
        Arc::new(st),
        OpenOptions {
            data_file: Some(Arc::new(data)),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let err = image
        .create_snapshot(&NewSnapshot::new("s"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
}
