//! The qcow2 driver against QEMU's tools: images written by qemu-img/qemu-io read back
//! byte for byte through a 3-deep backing chain, and images written through the driver
//! pass `qemu-img check` and read back with `qemu-io -c 'read -P'`.

use std::path::Path;
use std::process::Command;

use block::{BlockGraph, BlockdevOptions, Perm, WriteFlags};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// base (0x11 at 0, 0x12 at 1M), mid -> base (0x21 at 64k), top -> mid (0x31 at 96k..160k).
fn make_chain(dir: &Path) -> String {
    let (base, mid, top) = (
        path(dir, "base.qcow2"),
        path(dir, "mid.qcow2"),
        path(dir, "top.qcow2"),
    );
    run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "2M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 128k",
            "-c",
            "write -P 0x12 1M 64k",
            &base,
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &mid,
        ],
    );
    run("qemu-io", &["-c", "write -P 0x21 64k 64k", &mid]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &top,
        ],
    );
    run("qemu-io", &["-c", "write -P 0x31 96k 64k", &top]);
    top
}

async fn open(graph: &mut BlockGraph, image: &str) {
    let opts: BlockdevOptions = serde_json::from_value(serde_json::json!({
        "driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": image}
    }))
    .unwrap();
    graph.add(opts).await.unwrap();
}

#[tokio::test]
async fn three_deep_chain_reads_what_qemu_io_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path());
    let mut graph = BlockGraph::new();
    open(&mut graph, &top).await;
    let user = graph
        .attach("top", Perm::CONSISTENT_READ, Perm::ALL, "")
        .unwrap();
    let mut buf = vec![0u8; 2 << 20];
    user.read(0, &mut buf).await.unwrap();
    let mut expected = vec![0u8; 2 << 20];
    expected[..128 << 10].fill(0x11);
    expected[1 << 20..(1 << 20) + (64 << 10)].fill(0x12);
    expected[64 << 10..128 << 10].fill(0x21);
    expected[96 << 10..160 << 10].fill(0x31);
    assert!(
        buf == expected,
        "the chain reads differently from what qemu-io wrote"
    );
    drop(user);
    graph.close_all().await;
}

#[tokio::test]
async fn writes_over_a_chain_pass_qemu_img_check_and_read_back_in_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path());
    let mut graph = BlockGraph::new();
    open(&mut graph, &top).await;
    let user = graph
        .attach("top", Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL, "")
        .unwrap();
    // A partial cluster over data of the backing chain: copy-on-write keeps the rest.
    user.write(70 << 10, &[0x41; 4096], WriteFlags::default())
        .await
        .unwrap();
    user.write(1 << 20, &[0x42; 512], WriteFlags::default())
        .await
        .unwrap();
    drop(user);
    graph.close_all().await;
    run("qemu-img", &["check", "-q", &top]);
    run(
        "qemu-io",
        &[
            "-c",
            "read -P 0x21 64k 6k",
            "-c",
            "read -P 0x41 70k 4k",
            "-c",
            "read -P 0x21 74k 22k",
            "-c",
            "read -P 0x42 1M 512",
            "-c",
            "read -P 0x12 1049088 65024",
            "-c",
            "read -P 0x31 96k 64k",
            &top,
        ],
    );
}

#[tokio::test]
async fn opening_a_raw_file_as_qcow2_fails_as_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = path(dir.path(), "raw.img");
    run("qemu-img", &["create", "-q", "-f", "raw", &raw, "1M"]);
    let mut graph = BlockGraph::new();
    let opts: BlockdevOptions = serde_json::from_value(serde_json::json!({
        "driver": "qcow2", "node-name": "q",
        "file": {"driver": "file", "filename": raw}
    }))
    .unwrap();
    let err = graph.add(opts).await.unwrap_err();
    assert_eq!(err.to_string(), "Image is not in qcow2 format");
    assert!(graph.nodes().is_empty());
}
