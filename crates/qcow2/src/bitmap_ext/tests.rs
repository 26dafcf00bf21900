//! Storing and loading through memory, and hostile bitmap metadata in whole images.

use std::sync::Arc;

use super::*;
use crate::crash::crashes_of;
use crate::header::autoclear;
use crate::hostile_tests::{be, open, put};
use crate::{create, BitmapsExt, CreateOptions, Header, MemStorage};

const DISK: u64 = 64 << 20;

/// Bitmap `b` with 64 KiB granularity and its first 64 KiB dirty.
fn dirty_start() -> DirtyBitmap {
    let mut b = DirtyBitmap::new(DISK, Granularity::new(65536).unwrap());
    b.set(0, 1);
    b
}

/// `bitmap`, enabled, to store as `b`.
fn store_b(bitmap: &DirtyBitmap) -> StoreBitmap<'_> {
    StoreBitmap {
        name: "b",
        enabled: true,
        bitmap,
    }
}

/// An image holding bitmap `b` (stored by this library) as bytes, with the offsets of the
/// directory and of b's table.
async fn image_with_bitmap() -> (Vec<u8>, u64, u64) {
    let st = MemStorage::new();
    create(Arc::new(st.clone()), None, &CreateOptions::new(DISK))
        .await
        .unwrap();
    let (image, st) = open(&st.to_bytes(), false).await.unwrap();
    let b = dirty_start();
    image.store_bitmaps(&[store_b(&b)]).await.unwrap();
    image.close().await.unwrap();
    let bytes = st.to_bytes();
    let ext = Header::parse(&bytes).unwrap().extensions.bitmaps.unwrap();
    let table = be(&bytes, ext.directory_offset);
    (bytes, ext.directory_offset, table)
}

#[tokio::test]
async fn stored_bitmap_loads_back() {
    let (bytes, _, _) = image_with_bitmap().await;
    let (image, _) = open(&bytes, true).await.unwrap();
    let loaded = image.take_bitmaps().await;
    assert_eq!(
        loaded,
        vec![LoadedBitmap {
            name: "b".into(),
            enabled: true,
            inconsistent: false,
            bitmap: dirty_start(),
        }]
    );
}

#[tokio::test]
async fn stored_bitmap_leaves_a_clean_check() {
    let (bytes, _, _) = image_with_bitmap().await;
    let (image, _) = open(&bytes, true).await.unwrap();
    let report = image.check().await.unwrap();
    assert!(report.messages.is_empty(), "{:?}", report.messages);
}

#[tokio::test]
async fn all_ones_table_entry_loads_every_bit() {
    let (mut bytes, _, table) = image_with_bitmap().await;
    put(&mut bytes, table, 1);
    let (image, _) = open(&bytes, true).await.unwrap();
    let b = image.take_bitmaps().await.remove(0).bitmap;
    assert_eq!(b.count(), DISK);
}

#[tokio::test]
async fn table_entry_with_reserved_bits_refuses_the_open() {
    let (mut bytes, _, table) = image_with_bitmap().await;
    let entry = be(&bytes, table);
    put(&mut bytes, table, entry | 2);
    let err = open(&bytes, true).await.unwrap_err();
    assert!(
        err.to_string().starts_with("Could not read bitmap 'b'"),
        "{err}"
    );
}

#[tokio::test]
async fn table_of_the_wrong_size_refuses_the_open() {
    let (mut bytes, dir, _) = image_with_bitmap().await;
    let at = dir as usize + 8;
    bytes[at..at + 4].copy_from_slice(&2u32.to_be_bytes());
    let err = open(&bytes, true).await.unwrap_err();
    assert!(err.to_string().contains("instead of 1"), "{err}");
}

/// `bytes` with the bitmaps extension changed by `edit` and autoclear bits `autoclear`.
fn with_ext(bytes: &[u8], autoclear: u64, edit: impl FnOnce(&mut BitmapsExt)) -> Vec<u8> {
    let mut h = Header::parse(bytes).unwrap();
    edit(h.extensions.bitmaps.as_mut().unwrap());
    h.autoclear_features = autoclear;
    let cluster0 = h.to_bytes().unwrap();
    let mut out = bytes.to_vec();
    out[..cluster0.len()].copy_from_slice(&cluster0);
    out
}

#[tokio::test]
async fn unaligned_directory_refuses_the_open() {
    let (bytes, _, _) = image_with_bitmap().await;
    let bad = with_ext(&bytes, autoclear::BITMAPS, |e| e.directory_offset += 512);
    assert!(open(&bad, true).await.is_err());
}

#[tokio::test]
async fn extension_with_no_bitmaps_refuses_the_open() {
    let (bytes, _, _) = image_with_bitmap().await;
    let bad = with_ext(&bytes, autoclear::BITMAPS, |e| e.nb_bitmaps = 0);
    assert!(open(&bad, true).await.is_err());
}

#[tokio::test]
async fn malformed_extension_without_its_autoclear_bit_is_ignored() {
    let (bytes, _, _) = image_with_bitmap().await;
    let bad = with_ext(&bytes, 0, |e| e.directory_size = u64::MAX);
    let (image, _) = open(&bad, true).await.unwrap();
    assert!(image.bitmaps().await.is_empty());
}

#[tokio::test]
async fn extension_without_its_autoclear_bit_is_ignored() {
    let (mut bytes, _, _) = image_with_bitmap().await;
    bytes[95] &= !(autoclear::BITMAPS as u8);
    let (image, _) = open(&bytes, true).await.unwrap();
    assert!(image.bitmaps().await.is_empty());
}

#[tokio::test]
async fn read_write_open_drops_an_extension_without_its_autoclear_bit() {
    let (mut bytes, _, _) = image_with_bitmap().await;
    bytes[95] &= !(autoclear::BITMAPS as u8);
    let (image, st) = open(&bytes, false).await.unwrap();
    image.close().await.unwrap();
    assert_eq!(
        Header::parse(&st.to_bytes()).unwrap().extensions.bitmaps,
        None
    );
}

#[tokio::test]
async fn removing_an_in_use_bitmap_never_frees_metadata_its_table_names() {
    let (mut bytes, dir, table) = image_with_bitmap().await;
    let l1 = Header::parse(&bytes).unwrap().l1_table_offset;
    put(&mut bytes, table, l1);
    let at = dir as usize + 12;
    bytes[at..at + 4].copy_from_slice(&(flags::IN_USE | flags::AUTO).to_be_bytes());
    let (image, _) = open(&bytes, false).await.unwrap();
    image.remove_bitmap("b").await.unwrap();
    assert_eq!(image.check().await.unwrap().corruptions, 0);
}

#[tokio::test]
async fn bitmap_of_another_size_is_not_stored() {
    let (bytes, _, _) = image_with_bitmap().await;
    let (image, _) = open(&bytes, false).await.unwrap();
    let small = DirtyBitmap::new(DISK / 2, Granularity::new(65536).unwrap());
    let err = image.store_bitmaps(&[store_b(&small)]).await.unwrap_err();
    assert!(err.to_string().contains("covers"), "{err}");
}

#[tokio::test]
async fn bitmaps_are_not_stored_in_v2_images() {
    let st = MemStorage::new();
    let opts = CreateOptions {
        version: 2,
        ..CreateOptions::new(DISK)
    };
    create(Arc::new(st.clone()), None, &opts).await.unwrap();
    let (image, _) = open(&st.to_bytes(), false).await.unwrap();
    let b = dirty_start();
    let err = image.store_bitmaps(&[store_b(&b)]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Cannot store dirty bitmaps in qcow2 v2 files"
    );
}

#[tokio::test]
async fn crash_during_a_store_leaves_the_old_or_the_new_bitmap_and_no_corruption() {
    let (bytes, _, _) = image_with_bitmap().await;
    let mut new = dirty_start();
    new.set(DISK - 1, 1);
    let stored = new.clone();
    let states = crashes_of(&bytes, |image| async move {
        image.store_bitmaps(&[store_b(&stored)]).await.unwrap();
        image.close().await.unwrap();
    })
    .await;
    for state in states {
        let (image, _) = open(&state, true).await.unwrap();
        assert_eq!(image.check().await.unwrap().corruptions, 0);
        let b = image.take_bitmaps().await.remove(0);
        assert!(b.inconsistent || b.bitmap == dirty_start() || b.bitmap == new);
    }
}

#[tokio::test]
async fn crash_during_a_remove_leaves_the_bitmap_or_none_and_no_corruption() {
    let (bytes, _, _) = image_with_bitmap().await;
    let states = crashes_of(&bytes, |image| async move {
        image.remove_bitmap("b").await.unwrap();
        image.close().await.unwrap();
    })
    .await;
    for state in states {
        let (image, _) = open(&state, true).await.unwrap();
        assert_eq!(image.check().await.unwrap().corruptions, 0);
        assert!(image.take_bitmaps().await.len() <= 1);
    }
}
