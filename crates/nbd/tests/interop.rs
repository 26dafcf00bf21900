//! The server against real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy and fio's nbd
//! engine, over a unix socket, with an in-memory export that keeps track of which 64 KiB
//! blocks hold data (the rest are holes, so sparse reads and block status have something to
//! show).

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::Fixture;

fn tool(program: &str, package: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (apt-get install {package}): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn qemu_io_writes_reads_zeroes_and_discards() {
    let f = Fixture::new();
    let uri = f.uri();
    tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 128k",
            "-c",
            "write -P 0xcd 1M 4k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "discard 1M 64k",
            &uri,
        ],
    );
    tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "read -P 0 8M 1M",
            &uri,
        ],
    );
}

#[test]
fn qemu_img_info_map_and_convert_both_ways() {
    let f = Fixture::new();
    let uri = f.uri();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    tool(
        "qemu-img",
        "qemu-utils",
        &["create", "-q", "-f", "raw", path(&src), "16M"],
    );
    tool(
        "qemu-io",
        "qemu-utils",
        &["-f", "raw", "-c", "write -P 0x5a 2M 3M", path(&src)],
    );
    tool(
        "qemu-img",
        "qemu-utils",
        &["convert", "-n", "-f", "raw", "-O", "raw", path(&src), &uri],
    );
    let info = text(&tool(
        "qemu-img",
        "qemu-utils",
        &["info", "--output=json", &uri],
    ));
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    tool(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "raw", "-F", "raw", path(&src), &uri],
    );
    let map = text(&tool(
        "qemu-img",
        "qemu-utils",
        &["map", "--output=json", "-f", "raw", &uri],
    ));
    assert!(
        map.contains("\"start\": 2097152, \"length\": 3145728") && map.contains("\"data\": true"),
        "{map}"
    );
    let back = dir.path().join("back.raw");
    tool(
        "qemu-img",
        "qemu-utils",
        &["convert", "-f", "raw", "-O", "raw", &uri, path(&back)],
    );
    tool(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "raw", "-F", "raw", path(&src), path(&back)],
    );
}

#[test]
fn nbdinfo_lists_and_maps_every_context() {
    let f = Fixture::new();
    let uri = f.uri();
    tool(
        "qemu-io",
        "qemu-utils",
        &["-f", "raw", "-c", "write -P 1 1M 128k", &uri],
    );
    let list = text(&tool(
        "nbdinfo",
        "libnbd-bin",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", f.socket.display()),
        ],
    ));
    assert!(
        list.contains("export=\"disk\"") && list.contains("a test disk"),
        "{list}"
    );
    assert!(
        list.contains("base:allocation")
            && list.contains("qemu:allocation-depth")
            && list.contains("qemu:dirty-bitmap:writes"),
        "{list}"
    );
    let map = text(&tool("nbdinfo", "libnbd-bin", &["--map", &uri]));
    assert!(map.contains("1048576      131072    0  data"), "{map}");
    let depth = text(&tool(
        "nbdinfo",
        "libnbd-bin",
        &["--map=qemu:allocation-depth", &uri],
    ));
    assert!(depth.contains("1048576      131072    1"), "{depth}");
    let dirty = text(&tool(
        "nbdinfo",
        "libnbd-bin",
        &["--map=qemu:dirty-bitmap:writes", &uri],
    ));
    assert!(dirty.contains("1048576      131072    1  dirty"), "{dirty}");
    // The server notices the clients' close on its own time.
    for _ in 0..100 {
        if f.server.connections() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        f.server.connections(),
        0,
        "clients closed their connections"
    );
}

#[test]
fn nbdcopy_both_directions() {
    let f = Fixture::new();
    let uri = f.uri();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    tool(
        "qemu-img",
        "qemu-utils",
        &["create", "-q", "-f", "raw", path(&src), "16M"],
    );
    tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 5M 2M",
            "-c",
            "write -P 0x78 15M 1M",
            path(&src),
        ],
    );
    tool("nbdcopy", "libnbd-bin", &[path(&src), &uri]);
    let back = dir.path().join("back.raw");
    tool("nbdcopy", "libnbd-bin", &[&uri, path(&back)]);
    tool(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "raw", "-F", "raw", path(&src), path(&back)],
    );
}

#[test]
fn fio_random_read_write_queue_depth_32_verifies() {
    let f = Fixture::new();
    let socket = f.socket.display().to_string();
    let out = tool(
        "fio",
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri=nbd+unix:///disk?socket={socket}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=terse",
        ],
    );
    let t = text(&out);
    assert!(!t.contains("verify: bad"), "{t}");
}

#[test]
fn removing_an_export_safe_is_refused_while_a_client_is_connected() {
    let f = Fixture::new();
    let mut stream = std::os::unix::net::UnixStream::connect(&f.socket).unwrap();
    use std::io::{Read, Write};
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    stream.write_all(&3u32.to_be_bytes()).unwrap();
    // EXPORT_NAME "disk": transmission starts.
    let mut opt = nbd::proto::IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"disk");
    stream.write_all(&opt).unwrap();
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).unwrap();
    // The server records the export right after its reply went out.
    for _ in 0..100 {
        if f.server.in_use("disk") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(f.server.in_use("disk"));
    assert_eq!(
        f.server.remove_export("disk", false),
        Err(nbd::ExportError::InUse("disk".into()))
    );
    f.server.remove_export("disk", true).unwrap();
    // The hard removal closed the connection.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}
