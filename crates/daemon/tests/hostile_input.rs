//! Hostile QMP input never kills the session or the daemon: each input is
//! sent to blockd and to qemu-storage-daemon on a negotiated session, followed
//! by a sentinel `query-version`; both must answer with the same replies, the
//! sentinel included, and blockd must still be running.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use testkit::proc::RawConn;
use testkit::{qsd_path, start_qsd, Daemon, Session};

/// Generous limit for one reply (a 10 MB one included).
const LIMIT: Duration = Duration::from_secs(60);

/// Flushes QEMU's JSON lexer (0xff is never valid), then asks for the version.
const SENTINEL: &[u8] = b"\xff{\"execute\":\"query-version\",\"id\":\"sentinel\"}";

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

/// Replaces the value of `"package": "..."` (the vendor string differs).
fn mask_package(line: &str) -> String {
    const KEY: &str = "\"package\": \"";
    match line.find(KEY) {
        Some(at) => {
            let start = at + KEY.len();
            let end = start + line[start..].find('"').expect("closing quote");
            format!("{}<masked>{}", &line[..start], &line[end..])
        }
        None => line.to_string(),
    }
}

/// The reply lines `binary` gives to `input` followed by [`SENTINEL`], up to
/// and including the sentinel's, byte for byte except for the package string
/// (QEMU may print things that are not JSON, such as `inf`).
fn replies(binary: &Path, input: &[u8]) -> Vec<String> {
    let (mut daemon, mut conn) = if binary == qsd_path() {
        // Started again if its monitor does not answer (see `start_qsd`); the
        // greeting is read and the probe keeps the session in negotiation.
        let (daemon, qmp) = start_qsd(None, &[] as &[&str], Session::Negotiating).unwrap();
        (daemon, qmp.into_raw(LIMIT))
    } else {
        let mut daemon = Daemon::start(binary, &[] as &[&str]).unwrap();
        let stream = daemon.connect_stream(LIMIT).unwrap();
        let mut conn = RawConn::new(stream, LIMIT);
        conn.read_line().unwrap();
        (daemon, conn)
    };
    conn.send(br#"{"execute":"qmp_capabilities"}"#).unwrap();
    assert_eq!(conn.read_json().unwrap(), json!({"return": {}}));
    conn.send(input).unwrap();
    conn.send(SENTINEL).unwrap();
    let mut out = Vec::new();
    loop {
        let line = conn
            .read_line()
            .unwrap_or_else(|e| panic!("{}: {e:#}", binary.display()));
        let line = String::from_utf8(line).expect("QMP output is UTF-8");
        let done = line.ends_with("\"id\": \"sentinel\"}\r\n");
        out.push(mask_package(&line));
        if done {
            break;
        }
        assert!(out.len() < 100_000, "{}: endless replies", binary.display());
    }
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "{} died: {}",
        binary.display(),
        daemon.stderr()
    );
    out
}

/// Compares blockd's replies to QSD's, showing the first difference briefly.
fn same_as_qsd(input: &[u8]) {
    let theirs = replies(&qsd_path(), input);
    let ours = replies(&blockd(), input);
    let short = |text: &String| {
        if text.len() > 300 {
            format!("{}... ({} bytes)", &text[..300], text.len())
        } else {
            text.clone()
        }
    };
    assert_eq!(
        ours.len(),
        theirs.len(),
        "reply count differs; blockd: {:?}; qsd: {:?}",
        ours.iter().take(5).map(short).collect::<Vec<_>>(),
        theirs.iter().take(5).map(short).collect::<Vec<_>>()
    );
    for (n, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(a == b, "reply {n}: blockd {} != qsd {}", short(a), short(b));
    }
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

#[test]
fn random_bytes_get_qsd_errors_and_the_session_survives() {
    same_as_qsd(&noise(4096, 0x9e37_79b9_7f4a_7c15));
}

#[test]
fn random_printable_bytes_get_qsd_errors_and_the_session_survives() {
    let bytes: Vec<u8> = noise(4096, 42).iter().map(|b| b' ' + b % 95).collect();
    same_as_qsd(&bytes);
}

#[test]
fn ten_megabyte_string_argument_gets_qsd_error() {
    let big = "A".repeat(10 << 20);
    let request = format!(r#"{{"execute":"query-version","arguments":{{"x":"{big}"}}}}"#);
    same_as_qsd(request.as_bytes());
}

#[test]
fn ten_megabyte_command_name_gets_qsd_error() {
    let big = "b".repeat(10 << 20);
    let request = format!(r#"{{"execute":"{big}"}}"#);
    same_as_qsd(request.as_bytes());
}

#[test]
fn deep_array_nesting_gets_qsd_error() {
    let mut input = "[".repeat(100_000);
    input.push_str(&"]".repeat(100_000));
    same_as_qsd(input.as_bytes());
}

#[test]
fn deep_object_nesting_gets_qsd_error() {
    let input = format!(
        r#"{{"execute":"query-version","arguments":{}1{}}}"#,
        r#"{"a":"#.repeat(2000),
        "}".repeat(2000)
    );
    same_as_qsd(input.as_bytes());
}

#[test]
fn nesting_at_the_limit_is_accepted_like_qsd() {
    for depth in [1023, 1024, 1025] {
        let input = format!(
            r#"{{"execute":"query-version","id":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        same_as_qsd(input.as_bytes());
    }
}

#[test]
fn unclosed_nesting_then_flush_gets_qsd_error() {
    same_as_qsd("{\"a\":[".repeat(500).as_bytes());
}

#[test]
fn invalid_utf8_in_strings_gets_qsd_errors() {
    same_as_qsd(b"{\"execute\":\"query-\xc3\x28version\"}");
    same_as_qsd(b"{\"execute\":\"query-version\",\"id\":\"\xed\xa0\x80\"}");
    same_as_qsd(b"{\"execute\":\"query-version\",\"id\":\"\xc0\x80\"}");
    same_as_qsd(b"{\"execute\":\"query-version\",\"id\":\"\xf4\x90\x80\x80\"}");
}

#[test]
fn invalid_utf8_outside_strings_gets_qsd_errors() {
    same_as_qsd(b"\xc3\x28{\"execute\":\"query-jobs\"}");
    same_as_qsd(b"{\"execute\"\xfe:\"query-jobs\"}");
}

#[test]
fn bad_escapes_get_qsd_errors() {
    same_as_qsd(br#"{"execute":"query-version","id":"\ud800"}"#);
    same_as_qsd(br#"{"execute":"query-version","id":"\x41"}"#);
    same_as_qsd(br#"{"execute":"query-version","id":"\u00"}"#);
    same_as_qsd(br#"{"execute":"query-version","id":"\u0000"}"#);
}

#[test]
fn many_small_requests_in_one_write_all_get_answers() {
    let input = r#"{"execute":"query-jobs"}"#.repeat(2000);
    same_as_qsd(input.as_bytes());
}

#[test]
fn huge_numbers_and_odd_literals_get_qsd_errors() {
    same_as_qsd(format!(r#"{{"execute":"query-version","id":1{}}}"#, "0".repeat(30)).as_bytes());
    same_as_qsd(br#"{"execute":"query-version","id":-0.0e-999}"#);
    same_as_qsd(br#"{"execute":"query-version","id":NaN}"#);
    same_as_qsd(br#"{"execute":"query-version","id":truth}"#);
    same_as_qsd(b"{\"execute\":\"query-version\",\"id\":1}\x00\x01\x02");
}

/// QSD echoes an integer literal too large for a double as `inf` (not JSON);
/// blockd's JSON values cannot hold infinity, so it echoes the nearest finite
/// double instead (a documented difference, see `qapi::json`). The session
/// goes on either way.
#[test]
fn overflowing_number_id_is_echoed_as_the_largest_double() {
    let input = format!(
        r#"{{"execute":"query-version","id":-1{}}}"#,
        "0".repeat(400)
    );
    let ours = replies(&blockd(), input.as_bytes());
    assert_eq!(ours.len(), 3, "reply, stray 0xff, sentinel: {ours:?}");
    assert!(
        ours[0].ends_with("\"id\": -1.7976931348623157e+308}\r\n"),
        "{ours:?}"
    );
}
