//! Hostile and broken clients: each gets the protocol's error or a closed connection, never
//! a hang or a crash, and a well-behaved client on the same server is not affected.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

use common::{connect, hello, option, option_reply, request, Fixture};
use nbd::proto::*;

/// Whether the server closed the connection (EOF, or reset).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// A client in transmission on export `disk` (simple replies).
fn transmission(f: &Fixture) -> UnixStream {
    let mut s = connect(f);
    hello(&mut s, 3);
    option(&mut s, OPT_EXPORT_NAME, b"disk");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    s
}

/// Reads a simple reply and returns (error, cookie).
fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

/// A real client still works.
fn still_serves(f: &Fixture) {
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 9 0 4k",
            "-c",
            "read -P 9 0 4k",
            &f.uri(),
        ])
        .output()
        .expect("qemu-io is needed (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn garbage_instead_of_client_flags_or_option_magic_closes_the_connection() {
    let f = Fixture::new();
    let mut s = connect(&f);
    hello(&mut s, 0xdead_beef);
    assert!(closed(&mut s), "unknown client flags");
    let mut s = connect(&f);
    hello(&mut s, 3);
    s.write_all(b"GARBAGE!GARBAGE!GARBAGE!").unwrap();
    assert!(closed(&mut s), "bad option magic");
    still_serves(&f);
}

#[test]
fn oversized_and_truncated_options() {
    let f = Fixture::new();
    let mut s = connect(&f);
    hello(&mut s, 3);
    // A 1 GiB option length: dropped without reading (or allocating) it.
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&m).unwrap();
    assert!(closed(&mut s));
    // GO whose name length runs past the payload: ERR_INVALID, and the client may go on.
    let mut s = connect(&f);
    hello(&mut s, 3);
    option(&mut s, OPT_GO, &100u32.to_be_bytes());
    let (opt, ty, text) = option_reply(&mut s);
    assert_eq!(
        (opt, ty),
        (OPT_GO, REP_ERR_INVALID),
        "{}",
        String::from_utf8_lossy(&text)
    );
    option(&mut s, 99, b"");
    let (_, ty, text) = option_reply(&mut s);
    assert_eq!(ty, REP_ERR_UNSUP);
    assert_eq!(
        String::from_utf8_lossy(&text),
        "Unsupported option 99 (<unknown>)"
    );
    option(&mut s, OPT_ABORT, b"");
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    assert!(closed(&mut s));
    // Unknown export: GO says so, EXPORT_NAME drops the client.
    let mut s = connect(&f);
    hello(&mut s, 3);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"nope");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut s, OPT_GO, &go);
    let (_, ty, text) = option_reply(&mut s);
    assert_eq!(
        (ty, String::from_utf8_lossy(&text).as_ref()),
        (REP_ERR_UNKNOWN, "export 'nope' not present")
    );
    option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert!(closed(&mut s));
    // A client that sends half an option and vanishes.
    let mut s = connect(&f);
    hello(&mut s, 3);
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);
    still_serves(&f);
}

#[test]
fn bad_requests_get_their_error_numbers() {
    let f = Fixture::new();
    let mut s = transmission(&f);
    let size = 16u64 << 20;
    request(&mut s, CMD_READ, 0, 1, size - 512, 1024);
    assert_eq!(simple_reply(&mut s), (EINVAL, 1), "read past the end");
    request(&mut s, CMD_WRITE_ZEROES, 0, 2, size, 512);
    assert_eq!(simple_reply(&mut s), (ENOSPC, 2), "zeroes past the end");
    request(&mut s, CMD_READ, 0, 3, 0, 64 << 20);
    assert_eq!(simple_reply(&mut s), (EINVAL, 3), "read over 32 MiB");
    request(&mut s, 42, 0, 4, 0, 512);
    assert_eq!(simple_reply(&mut s), (EINVAL, 4), "unknown command");
    request(&mut s, CMD_READ, 1 << 9, 5, 0, 512);
    assert_eq!(simple_reply(&mut s), (EINVAL, 5), "unknown flag");
    request(&mut s, CMD_BLOCK_STATUS, 0, 6, 0, 512);
    assert_eq!(
        simple_reply(&mut s),
        (EINVAL, 6),
        "block status without contexts"
    );
    request(&mut s, CMD_READ, CMD_FLAG_DF, 7, 0, 512);
    assert_eq!(
        simple_reply(&mut s),
        (EINVAL, 7),
        "DF without structured replies"
    );
    request(&mut s, CMD_TRIM, 0, 8, u64::MAX - 10, 512);
    assert_eq!(simple_reply(&mut s), (EINVAL, 8), "offset overflow");
    // Unaligned requests are served (the export's minimum block is 1).
    request(&mut s, CMD_READ, 0, 9, 3, 5);
    assert_eq!(simple_reply(&mut s), (0, 9));
    let mut five = [0u8; 5];
    s.read_exact(&mut five).unwrap();
    // A write over 32 MiB: answered, then the client is dropped (its payload is not read).
    request(&mut s, CMD_WRITE, 0, 10, 0, 64 << 20);
    assert_eq!(simple_reply(&mut s), (EINVAL, 10));
    assert!(closed(&mut s));
    // A bad request magic drops the client.
    let mut s = transmission(&f);
    s.write_all(&[0x55; 28]).unwrap();
    assert!(closed(&mut s));
    still_serves(&f);
}

#[test]
fn a_client_vanishing_mid_write_loses_only_that_write() {
    let f = Fixture::new();
    let mut s = transmission(&f);
    request(&mut s, CMD_WRITE, 0, 1, 1 << 20, 65536);
    s.write_all(&[0xee; 1000]).unwrap();
    drop(s);
    still_serves(&f);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0 1M 64k", &f.uri()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hundreds_of_connections_at_once_are_served() {
    let f = Fixture::new();
    let mut clients: Vec<UnixStream> = (0..300).map(|_| transmission(&f)).collect();
    for (i, s) in clients.iter_mut().enumerate() {
        request(s, CMD_READ, 0, i as u64, (i as u64) * 512, 512);
    }
    for (i, s) in clients.iter_mut().enumerate() {
        assert_eq!(simple_reply(s), (0, i as u64));
        let mut data = [0u8; 512];
        s.read_exact(&mut data).unwrap();
    }
    drop(clients);
    still_serves(&f);
}

#[test]
fn extended_headers_framing_and_misuse() {
    let f = Fixture::new();
    // EXTENDED_HEADERS, then STRUCTURED_REPLY is refused and EXPORT_NAME drops the client.
    let mut s = connect(&f);
    hello(&mut s, 3);
    option(&mut s, OPT_EXTENDED_HEADERS, b"");
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    option(&mut s, OPT_EXTENDED_HEADERS, b"");
    assert_eq!(option_reply(&mut s).1, REP_ERR_INVALID);
    option(&mut s, OPT_STRUCTURED_REPLY, b"");
    assert_eq!(option_reply(&mut s).1, REP_ERR_EXT_HEADER_REQD);
    option(&mut s, OPT_EXPORT_NAME, b"disk");
    assert!(closed(&mut s));
    // GO in extended mode: a FLUSH gets a NONE chunk echoing the offset, a compact request
    // drops the client.
    let mut s = connect(&f);
    hello(&mut s, 3);
    option(&mut s, OPT_EXTENDED_HEADERS, b"");
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut s, OPT_GO, &go);
    while option_reply(&mut s).1 != REP_ACK {}
    let mut m = EXT_REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&CMD_FLUSH.to_be_bytes());
    m.extend_from_slice(&77u64.to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    s.write_all(&m).unwrap();
    let mut h = [0u8; 32];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &EXT_REPLY_MAGIC.to_be_bytes());
    assert_eq!(u16::from_be_bytes([h[4], h[5]]), REPLY_FLAG_DONE);
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_NONE);
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 77);
    assert_eq!(u64::from_be_bytes(h[24..32].try_into().unwrap()), 0);
    request(&mut s, CMD_FLUSH, 0, 78, 0, 0);
    assert!(closed(&mut s));
    still_serves(&f);
}
