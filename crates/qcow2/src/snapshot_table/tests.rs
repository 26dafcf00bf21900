use super::*;

fn entry(id: &str, name: &str) -> Entry {
    Entry {
        l1_offset: 0x30000,
        l1_size: 2,
        id: id.as_bytes().to_vec(),
        name: name.as_bytes().to_vec(),
        date_sec: 1_700_000_000,
        date_nsec: 5,
        vm_clock_nsec: 7,
        vm_state_size: 0,
        disk_size: 1 << 30,
        icount: Some(0),
        extra_bytes: KNOWN_EXTRA_BYTES as u32,
        unknown_extra: Vec::new(),
    }
}

/// Set the fixed part's extra data size of the entry at `at`.
fn set_extra(bytes: &mut [u8], at: usize, extra: u32) {
    bytes[at + 36..at + 40].copy_from_slice(&extra.to_be_bytes());
}

fn invalid(r: std::result::Result<(Vec<Entry>, u64), ParseError>) -> String {
    match r {
        Err(ParseError::Invalid(e)) => e.to_string(),
        other => panic!("expected an invalid table, got {other:?}"),
    }
}

#[test]
fn entry_is_laid_out_as_qemu_writes_it() {
    let bytes = to_bytes(&[entry("1", "snap1")]).unwrap();
    // 40 fixed + 24 extra + "1" + "snap1" = 70, padded to 72.
    assert_eq!(bytes.len(), 72);
    assert_eq!(&bytes[64..70], b"1snap1");
    assert_eq!(&bytes[36..40], &24u32.to_be_bytes());
}

#[test]
fn table_round_trips_with_unknown_extra_data() {
    let mut e = entry("12", "x");
    e.unknown_extra = vec![9; 13];
    e.extra_bytes = 37;
    e.vm_state_size = 5 << 32;
    let table = vec![e, entry("13", "second")];
    let bytes = to_bytes(&table).unwrap();
    let (parsed, len) = parse(&bytes, 2, 0).unwrap();
    assert_eq!(parsed, table);
    assert_eq!(len, bytes.len() as u64);
}

#[test]
fn large_vm_state_leaves_the_32_bit_field_zero() {
    let mut e = entry("1", "a");
    e.vm_state_size = 1 << 32;
    let bytes = to_bytes(&[e]).unwrap();
    assert_eq!(&bytes[32..36], &[0; 4]);
}

#[test]
fn short_extra_data_falls_back_to_the_old_fields() {
    let mut bytes = to_bytes(&[entry("1", "a")]).unwrap();
    bytes[32..36].copy_from_slice(&4096u32.to_be_bytes());
    set_extra(&mut bytes, 0, 0);
    bytes.drain(40..64);
    let (parsed, _) = parse(&bytes, 1, 123).unwrap();
    assert_eq!(parsed[0].vm_state_size, 4096);
    assert_eq!(parsed[0].disk_size, 123);
    assert_eq!(parsed[0].icount, None);
    assert_eq!(parsed[0].name, b"a");
}

#[test]
fn icount_of_minus_one_is_none() {
    let mut e = entry("1", "a");
    e.icount = None;
    let bytes = to_bytes(&[e]).unwrap();
    assert_eq!(&bytes[56..64], &[0xff; 8]);
    assert_eq!(parse(&bytes, 1, 0).unwrap().0[0].icount, None);
}

#[test]
fn parse_rejects_extra_data_over_1024_bytes() {
    let mut bytes = to_bytes(&[entry("1", "a"), entry("2", "b")]).unwrap();
    set_extra(&mut bytes, 72, 1025);
    let msg = invalid(parse(&bytes, 2, 0));
    assert_eq!(msg, "Too much extra metadata in snapshot table entry 1");
}

#[test]
fn parse_rejects_a_table_over_64_mib() {
    // Entries with the longest ID and name each take 131112 bytes: 512 pass 64 MiB.
    let per = 131_112usize;
    let mut bytes = vec![0u8; per * 512];
    for i in 0..512 {
        bytes[i * per + 12..i * per + 16].copy_from_slice(&[0xff; 4]);
    }
    let msg = invalid(parse(&bytes, 512, 0));
    assert_eq!(msg, "Snapshot table is too big");
}

#[test]
fn parse_asks_for_the_rest_of_a_long_entry() {
    let bytes = to_bytes(&[entry("1", &"n".repeat(300))]).unwrap();
    let r = parse(&bytes[..100], 1, 0);
    assert!(
        matches!(r, Err(ParseError::Short(n)) if n == 40 + 24 + 1 + 300),
        "{r:?}"
    );
}

#[test]
fn names_compare_up_to_the_first_nul() {
    let e = entry("1", "ab\0cd");
    assert!(e.has_name("ab"));
    assert!(!e.has_name("ab\0cd"));
}

#[test]
fn next_id_is_one_past_the_largest_number() {
    let table = [entry("9", "a"), entry("10", "b"), entry("vm", "c")];
    assert_eq!(next_id(&table), "11");
    assert_eq!(next_id(&[]), "1");
    assert_eq!(next_id(&[entry("7abc", "x")]), "8");
}

#[test]
fn names_longer_than_65535_bytes_are_refused() {
    let long = "x".repeat(65_536);
    assert!(to_bytes(&[entry("1", &long)]).is_err());
}
