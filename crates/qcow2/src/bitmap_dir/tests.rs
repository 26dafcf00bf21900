//! Hostile bitmap directories and table entries: each is refused, never a panic.

use super::*;

const CS: u64 = 65536;
const DISK: u64 = 1 << 30;

/// One raw directory entry: table at 0x50000 with one entry, 64 KiB granularity, no flags.
fn raw(name: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(&0x50000u64.to_be_bytes());
    e.extend_from_slice(&1u32.to_be_bytes());
    e.extend_from_slice(&0u32.to_be_bytes());
    e.push(TYPE_DIRTY_TRACKING);
    e.push(16);
    e.extend_from_slice(&(name.len() as u16).to_be_bytes());
    e.extend_from_slice(&0u32.to_be_bytes());
    e.extend_from_slice(name);
    e.resize(e.len().div_ceil(8) * 8, 0);
    e
}

fn with(at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut e = raw(b"b0");
    e[at..at + bytes.len()].copy_from_slice(bytes);
    e
}

fn err(dir: &[u8], nb: u32) -> String {
    parse(dir, nb, CS, DISK).unwrap_err().to_string()
}

#[test]
fn valid_entry_is_parsed() {
    let e = parse(&raw(b"b0"), 1, CS, DISK).unwrap();
    assert_eq!(
        e,
        vec![DirEntry {
            table_offset: 0x50000,
            table_size: 1,
            flags: 0,
            granularity: Granularity::from_bits(16).unwrap(),
            name: "b0".into(),
            inconsistent: false,
        }]
    );
}

#[test]
fn stored_directory_parses_back() {
    let mut entries = parse(&[raw(b"a"), raw(b"bcdefghijk")].concat(), 2, CS, DISK).unwrap();
    entries[1].flags = flags::AUTO;
    let back = parse(&to_bytes(&entries, CS, DISK).unwrap(), 2, CS, DISK).unwrap();
    assert_eq!(back, entries);
}

#[test]
fn entry_left_in_use_is_inconsistent() {
    let e = parse(&with(12, &flags::IN_USE.to_be_bytes()), 1, CS, DISK).unwrap();
    assert!(e[0].inconsistent);
}

#[test]
fn reserved_flag_is_refused() {
    let dir = with(12, &4u32.to_be_bytes());
    assert_eq!(err(&dir, 1), "Bitmap 'b0' doesn't satisfy the constraints");
}

#[test]
fn granularity_below_512_bytes_is_refused() {
    assert!(err(&with(17, &[8]), 1).contains("constraints"));
}

#[test]
fn granularity_above_2_gib_is_refused() {
    assert!(err(&with(17, &[32]), 1).contains("constraints"));
}

#[test]
fn granularity_of_255_bits_is_refused() {
    assert!(err(&with(17, &[255]), 1).contains("constraints"));
}

#[test]
fn unknown_type_is_refused() {
    assert!(err(&with(16, &[2]), 1).contains("constraints"));
}

#[test]
fn zero_table_offset_is_refused() {
    assert!(err(&with(0, &0u64.to_be_bytes()), 1).contains("constraints"));
}

#[test]
fn unaligned_table_offset_is_refused() {
    assert!(err(&with(0, &0x50200u64.to_be_bytes()), 1).contains("constraints"));
}

#[test]
fn empty_table_is_refused() {
    assert!(err(&with(8, &0u32.to_be_bytes()), 1).contains("constraints"));
}

#[test]
fn table_too_small_for_the_disk_is_refused() {
    // One 64 KiB cluster of bits at 512 bytes granularity covers 256 MiB.
    let dir = with(17, &[9]);
    assert!(parse(&dir, 1, CS, 256 << 20).is_ok());
    assert!(parse(&dir, 1, CS, (256 << 20) + 1).is_err());
}

#[test]
fn table_too_small_is_accepted_when_in_use() {
    let mut dir = with(17, &[9]);
    dir[12..16].copy_from_slice(&flags::IN_USE.to_be_bytes());
    assert!(parse(&dir, 1, CS, 1 << 50).unwrap()[0].inconsistent);
}

#[test]
fn table_over_512_mib_of_data_is_refused() {
    let dir = with(8, &8193u32.to_be_bytes());
    assert!(err(&dir, 1).contains("constraints"));
}

#[test]
fn huge_table_size_is_refused_without_overflow() {
    let mut dir = with(8, &u32::MAX.to_be_bytes());
    dir[17] = 31;
    assert!(parse(&dir, 1, 2 << 20, u64::MAX >> 1).is_err());
}

#[test]
fn extra_data_is_refused() {
    let mut dir = with(20, &8u32.to_be_bytes());
    dir.extend_from_slice(&[0; 8]);
    assert_eq!(err(&dir, 1), "Bitmap extra data is not supported");
}

#[test]
fn more_entries_than_the_header_says_are_refused() {
    let dir = [raw(b"a"), raw(b"b")].concat();
    assert!(err(&dir, 1).starts_with("More bitmaps found"));
}

#[test]
fn fewer_entries_than_the_header_says_are_refused() {
    assert!(err(&raw(b"a"), 2).starts_with("Less bitmaps found"));
}

#[test]
fn entry_overrunning_the_directory_is_refused() {
    let dir = with(18, &200u16.to_be_bytes());
    assert_eq!(err(&dir, 1), "Broken bitmap directory");
}

#[test]
fn truncated_entry_header_is_refused() {
    let mut dir = raw(b"a");
    dir.extend_from_slice(&[0; 8]);
    assert_eq!(err(&dir, 2), "Broken bitmap directory");
}

#[test]
fn empty_directory_is_refused() {
    assert!(err(&[], 1).contains("zero"));
}

#[test]
fn duplicate_names_are_refused() {
    let dir = [raw(b"a"), raw(b"a")].concat();
    assert_eq!(err(&dir, 2), "Bitmap already exists: a");
}

#[test]
fn empty_name_is_refused() {
    assert!(err(&raw(b""), 1).contains("bad name"));
}

#[test]
fn name_with_nul_is_refused() {
    assert!(err(&raw(b"a\0b"), 1).contains("bad name"));
}

#[test]
fn name_that_is_not_utf8_is_refused() {
    assert!(err(&raw(b"\xff\xfe"), 1).contains("bad name"));
}

#[test]
fn name_over_1023_bytes_is_refused() {
    assert!(err(&raw(&[b'n'; 1024]), 1).contains("constraints"));
}

#[test]
fn table_entries_decode() {
    assert_eq!(table_entry(0, CS).unwrap(), TableEntry::Zeros);
    assert_eq!(table_entry(1, CS).unwrap(), TableEntry::Ones);
    assert_eq!(table_entry(0x30000, CS).unwrap(), TableEntry::Data(0x30000));
}

#[test]
fn table_entry_with_offset_and_all_ones_is_refused() {
    assert!(table_entry(0x30001, CS).is_err());
}

#[test]
fn table_entry_with_reserved_bits_is_refused() {
    assert!(table_entry(0x100_0000_0003_0000, CS).is_err());
    assert!(table_entry(2, CS).is_err());
}

#[test]
fn unaligned_table_entry_is_refused() {
    assert!(table_entry(0x30200, CS).is_err());
}
