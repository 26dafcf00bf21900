use std::sync::Arc;

use super::*;
use crate::image::{Image, OpenOptions};
use crate::storage::MemStorage;

const CS: usize = 65536;

/// A minimal valid v3 image: header, refcount table at cluster 1, L1 at cluster 3.
fn image() -> Vec<u8> {
    let mut b = vec![0u8; 4 * CS];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, 16);
    b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    put32(&mut b, 36, 2);
    b[40..48].copy_from_slice(&(3 * CS as u64).to_be_bytes());
    b[48..56].copy_from_slice(&(CS as u64).to_be_bytes());
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 112);
    b
}

fn set32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn set64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn parse_err(b: &[u8]) -> String {
    Header::parse(&b[..CS]).unwrap_err().to_string()
}

#[test]
fn parse_accepts_minimal_v3_header() {
    let h = Header::parse(&image()[..CS]).unwrap();
    assert_eq!((h.version, h.cluster_size(), h.l1_size), (3, 65536, 2));
}

#[test]
fn parse_rejects_bad_magic() {
    let mut b = image();
    b[0] = 0;
    assert_eq!(parse_err(&b), "Image is not in qcow2 format");
}

#[test]
fn parse_rejects_version_4() {
    let mut b = image();
    set32(&mut b, 4, 4);
    assert_eq!(parse_err(&b), "Unsupported qcow2 version 4");
}

#[test]
fn parse_rejects_256_byte_clusters() {
    let mut b = image();
    set32(&mut b, 20, 8);
    assert_eq!(parse_err(&b), "Unsupported cluster size: 2^8");
}

#[test]
fn parse_rejects_4m_clusters() {
    let mut b = image();
    set32(&mut b, 20, 22);
    assert_eq!(parse_err(&b), "Unsupported cluster size: 2^22");
}

#[test]
fn parse_rejects_refcount_order_7() {
    let mut b = image();
    set32(&mut b, 96, 7);
    assert_eq!(
        parse_err(&b),
        "Reference count entry width too large; may not exceed 64 bits"
    );
}

#[test]
fn parse_rejects_unknown_incompatible_bits_with_qemus_message() {
    let mut b = image();
    set64(&mut b, 72, (1 << 5) | (1 << 40));
    assert_eq!(
        parse_err(&b),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000020"
    );
}

#[test]
fn parse_names_unknown_incompatible_bits_from_the_feature_table() {
    let mut b = image();
    set64(&mut b, 72, 1 << 9);
    set32(&mut b, 112, crate::ext::EXT_FEATURE_TABLE);
    set32(&mut b, 116, 48);
    b[120] = 0;
    b[121] = 9;
    b[122..127].copy_from_slice(b"fancy");
    assert_eq!(parse_err(&b), "Unsupported qcow2 feature(s): fancy");
}

#[test]
fn parse_rejects_huge_l1_size() {
    let mut b = image();
    set32(&mut b, 36, u32::MAX);
    assert_eq!(parse_err(&b), "Active L1 table too large");
}

#[test]
fn parse_rejects_l1_too_small_for_size() {
    let mut b = image();
    set64(&mut b, 24, 1 << 40);
    assert_eq!(parse_err(&b), "L1 table is too small");
}

#[test]
fn parse_rejects_unaligned_l1_table() {
    let mut b = image();
    set64(&mut b, 40, 3 * CS as u64 + 8);
    assert!(parse_err(&b).contains("L1 table offset"));
}

#[test]
fn parse_rejects_l1_table_beyond_host_limit() {
    let mut b = image();
    set64(&mut b, 40, !0xffff);
    assert!(parse_err(&b).contains("L1 table offset"));
}

#[test]
fn parse_rejects_huge_refcount_table() {
    let mut b = image();
    set32(&mut b, 56, 1 << 20);
    assert_eq!(parse_err(&b), "Reference count table too large");
}

#[test]
fn parse_rejects_too_many_snapshots() {
    let mut b = image();
    set32(&mut b, 60, MAX_SNAPSHOTS + 1);
    assert_eq!(parse_err(&b), "Too many snapshots");
}

#[test]
fn parse_rejects_extension_overrunning_the_cluster() {
    let mut b = image();
    set32(&mut b, 112, 0x1234_5678);
    set32(&mut b, 116, 0xffff_fff0);
    assert!(parse_err(&b).contains("overruns"));
}

#[test]
fn parse_rejects_long_backing_name() {
    let mut b = image();
    set64(&mut b, 8, 1024);
    set32(&mut b, 16, 5000);
    assert_eq!(parse_err(&b), "Backing file name too long");
}

#[test]
fn parse_rejects_header_longer_than_a_cluster() {
    let mut b = image();
    set32(&mut b, 100, CS as u32 + 8);
    assert_eq!(parse_err(&b), "qcow2 header exceeds cluster size");
}

#[test]
fn parse_rejects_unknown_compression_type() {
    let mut b = image();
    b[104] = 7;
    assert_eq!(parse_err(&b), "Unknown compression type '7'");
}

#[test]
fn parse_rejects_extended_l2_with_small_clusters() {
    let mut b = image();
    set32(&mut b, 20, 12);
    set64(&mut b, 72, incompat::EXTL2);
    set32(&mut b, 36, 512);
    set64(&mut b, 40, 3 * 4096);
    set64(&mut b, 48, 4096);
    assert!(Header::parse(&b[..4096])
        .unwrap_err()
        .to_string()
        .contains("extended L2"));
}

#[test]
fn unknown_extension_survives_a_rewrite() {
    let mut b = image();
    set32(&mut b, 112, 0x1234_5678);
    set32(&mut b, 116, 3);
    b[120..123].copy_from_slice(b"abc");
    let h = Header::parse(&b[..CS]).unwrap();
    let again = Header::parse(&{
        let mut c = h.to_bytes().unwrap();
        c.resize(CS, 0);
        c
    })
    .unwrap();
    assert_eq!(
        again.extensions.unknown,
        vec![(0x1234_5678, b"abc".to_vec())]
    );
}

async fn open_err(b: Vec<u8>) -> String {
    let st = Arc::new(MemStorage::from_bytes(b));
    Image::open(st, OpenOptions::default())
        .await
        .unwrap_err()
        .to_string()
}

#[tokio::test]
async fn open_rejects_l1_table_past_eof() {
    let mut b = image();
    set64(&mut b, 40, 100 * CS as u64);
    assert!(open_err(b)
        .await
        .contains("L1 table at 0x640000 lies past the end"));
}

#[tokio::test]
async fn open_rejects_refcount_table_past_eof() {
    let mut b = image();
    set64(&mut b, 48, 1 << 40);
    assert!(open_err(b).await.contains("Reference count table at"));
}

#[tokio::test]
async fn open_rejects_corrupt_image_read_write() {
    let mut b = image();
    set64(&mut b, 72, incompat::CORRUPT);
    assert_eq!(
        open_err(b).await,
        "qcow2: Image is corrupt; cannot be opened read/write"
    );
}

#[tokio::test]
async fn open_allows_corrupt_image_read_only() {
    let mut b = image();
    set64(&mut b, 72, incompat::CORRUPT);
    let st = Arc::new(MemStorage::from_bytes(b));
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    assert!(Image::open(st, opts).await.is_ok());
}

#[tokio::test]
async fn open_rejects_truncated_file() {
    assert!(open_err(vec![0x51, 0x46]).await.contains("too short"));
}

#[tokio::test]
async fn open_rejects_data_file_image_without_data_file() {
    let mut b = image();
    set64(&mut b, 72, incompat::DATA_FILE);
    assert_eq!(open_err(b).await, "image needs an external data file");
}
