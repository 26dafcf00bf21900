//! The `qemu:dirty-bitmap:NAME` meta context beside `base:allocation` and
//! `qemu:allocation-depth`, spoken by hand: which queries list and select it, the ids QEMU
//! gives the contexts, and its BLOCK_STATUS extents (flag 1 for dirty blocks).

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::Command;

use common::{connect, hello, option, option_reply, request, Fixture};
use nbd::proto::*;

/// The payload of LIST_META_CONTEXT / SET_META_CONTEXT for export `disk`.
fn queries(list: &[&str]) -> Vec<u8> {
    let mut p = 4u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"disk");
    p.extend_from_slice(&(list.len() as u32).to_be_bytes());
    for q in list {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

/// Sends a meta-context option and collects the (id, name) replies up to the ACK.
fn contexts(s: &mut UnixStream, opt: u32, list: &[&str]) -> Vec<(u32, String)> {
    option(s, opt, &queries(list));
    let mut found = Vec::new();
    loop {
        let (_, ty, data) = option_reply(s);
        if ty == REP_ACK {
            return found;
        }
        assert_eq!(ty, REP_META_CONTEXT, "{}", String::from_utf8_lossy(&data));
        let id = u32::from_be_bytes(data[..4].try_into().unwrap());
        found.push((id, String::from_utf8(data[4..].to_vec()).unwrap()));
    }
}

fn structured() -> (Fixture, UnixStream) {
    let f = Fixture::new();
    let mut s = connect(&f);
    hello(&mut s, 3);
    option(&mut s, OPT_STRUCTURED_REPLY, b"");
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    (f, s)
}

fn go(s: &mut UnixStream) {
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(s, OPT_GO, &go);
    while option_reply(s).1 != REP_ACK {}
}

/// Reads structured block-status chunks up to the one flagged DONE: (context, extents).
fn status_chunks(s: &mut UnixStream) -> Vec<(u32, Vec<(u32, u32)>)> {
    let mut chunks = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([h[4], h[5]]);
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_BLOCK_STATUS);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        let word = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
        let extents = (4..data.len()).step_by(8).map(|i| (word(i), word(i + 4)));
        chunks.push((word(0), extents.collect()));
        if flags & REPLY_FLAG_DONE != 0 {
            return chunks;
        }
    }
}

fn write_through_qemu_io(f: &Fixture, command: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, &f.uri()])
        .output()
        .expect("qemu-io is needed (apt-get install qemu-utils)");
    assert!(out.status.success(), "{out:?}");
}

fn names(found: &[(u32, String)]) -> Vec<&str> {
    found.iter().map(|(_, n)| n.as_str()).collect()
}

#[test]
fn list_offers_the_bitmap_for_qemu_and_dirty_bitmap_wildcards_with_id_zero() {
    let (_f, mut s) = structured();
    let all = contexts(&mut s, OPT_LIST_META_CONTEXT, &[]);
    let qemu = contexts(&mut s, OPT_LIST_META_CONTEXT, &["qemu:"]);
    let bitmaps = contexts(&mut s, OPT_LIST_META_CONTEXT, &["qemu:dirty-bitmap:"]);
    assert_eq!(
        names(&all),
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:writes"
        ]
    );
    assert_eq!(
        names(&qemu),
        ["qemu:allocation-depth", "qemu:dirty-bitmap:writes"]
    );
    assert_eq!(names(&bitmaps), ["qemu:dirty-bitmap:writes"]);
    assert!(all.iter().all(|(id, _)| *id == 0));
}

#[test]
fn set_numbers_the_bitmap_after_the_fixed_contexts_in_id_order() {
    let (_f, mut s) = structured();
    let chosen = contexts(
        &mut s,
        OPT_SET_META_CONTEXT,
        &["qemu:dirty-bitmap:writes", "base:allocation"],
    );
    assert_eq!(
        chosen,
        [
            (0, "base:allocation".to_string()),
            (2, "qemu:dirty-bitmap:writes".to_string())
        ]
    );
}

#[test]
fn set_selects_nothing_for_wildcards_or_unknown_bitmaps() {
    let (_f, mut s) = structured();
    let chosen = contexts(
        &mut s,
        OPT_SET_META_CONTEXT,
        &[
            "qemu:",
            "qemu:dirty-bitmap:",
            "qemu:dirty-bitmap:nope",
            "qemu:dirty-bitmap:writesX",
        ],
    );
    assert_eq!(chosen, []);
}

#[test]
fn block_status_reports_written_blocks_dirty_beside_allocation() {
    let (f, mut s) = structured();
    write_through_qemu_io(&f, "write 1M 4k");
    contexts(
        &mut s,
        OPT_SET_META_CONTEXT,
        &["base:allocation", "qemu:dirty-bitmap:writes"],
    );
    go(&mut s);
    request(&mut s, CMD_BLOCK_STATUS, 0, 5, 0, 2 << 20);
    let chunks = status_chunks(&mut s);
    assert_eq!(
        chunks,
        [
            (
                0,
                vec![
                    (1 << 20, STATE_HOLE | STATE_ZERO),
                    (64 << 10, 0),
                    (960 << 10, 3)
                ]
            ),
            (
                2,
                vec![(1 << 20, 0), (64 << 10, STATE_DIRTY), (960 << 10, 0)]
            ),
        ]
    );
}

#[test]
fn block_status_req_one_gives_one_extent_of_the_bitmap() {
    let (f, mut s) = structured();
    write_through_qemu_io(&f, "write 128k 64k");
    contexts(&mut s, OPT_SET_META_CONTEXT, &["qemu:dirty-bitmap:writes"]);
    go(&mut s);
    request(
        &mut s,
        CMD_BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        6,
        96 << 10,
        1 << 20,
    );
    let first = status_chunks(&mut s);
    request(
        &mut s,
        CMD_BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        7,
        160 << 10,
        1 << 20,
    );
    let second = status_chunks(&mut s);
    assert_eq!(first, [(2, vec![(32 << 10, 0)])]);
    assert_eq!(second, [(2, vec![(32 << 10, STATE_DIRTY)])]);
}
