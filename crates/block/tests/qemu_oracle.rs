//! blockd's block layer checked against QEMU's own tools and daemon as oracles.
//! A missing tool fails the test with the package to install.

use block::{BlockGraph, BlockdevOptions, Perm, WriteFlags};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Output};

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {name} ({e}): install the qemu-utils package (qemu-system-common for qemu-storage-daemon)")
    })
}

fn opts(value: serde_json::Value) -> BlockdevOptions {
    serde_json::from_value(value).unwrap()
}

fn make_image(dir: &Path, size: u64) -> String {
    let path = dir.join("a.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test]
async fn data_written_by_blockd_reads_back_in_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), 1 << 20);
    let mut graph = BlockGraph::new();
    graph
        .add(opts(json!({"driver": "raw", "node-name": "r0",
                         "file": {"driver": "file", "filename": img, "cache": {"direct": true}}})))
        .await
        .unwrap();
    let user = graph
        .attach("r0", Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL, "")
        .unwrap();
    user.write(1000, &[0xab; 70000], WriteFlags { fua: true })
        .await
        .unwrap();
    drop(user);
    graph.close_all().await;
    let out = tool(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0xab 1000 70000", &img],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
}

#[tokio::test]
async fn discard_leaves_hole_seen_by_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), 1 << 20);
    let out = tool("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 1M", &img]);
    assert!(out.status.success());
    let mut graph = BlockGraph::new();
    let node = graph
        .add(opts(
            json!({"driver": "file", "node-name": "f0", "filename": img, "discard": "unmap"}),
        ))
        .await
        .unwrap();
    node.discard(0, 512 * 1024).await.unwrap();
    graph.close_all().await;
    let out = tool("qemu-img", &["map", "--output=json", "-f", "raw", &img]);
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(map[0]["start"], 0);
    assert_eq!(map[0]["length"], 512 * 1024);
    assert_eq!(map[0]["data"], false);
    assert_eq!(map[0]["zero"], true);
}

#[tokio::test]
async fn writer_lock_refuses_qemu_io_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), 1 << 20);
    let mut graph = BlockGraph::new();
    graph
        .add(opts(
            json!({"driver": "file", "node-name": "f0", "filename": img}),
        ))
        .await
        .unwrap();
    // A default writer: needs read+write, shares only read and unchanged writes.
    let _user = graph
        .attach(
            "f0",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            "",
        )
        .unwrap();
    let out = tool("qemu-io", &["-f", "raw", "-c", "write 0 512", &img]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Failed to get \"write\" lock"), "{stderr}");
    let out = tool("qemu-img", &["resize", "-f", "raw", &img, "2M"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Is another process using the image"),
        "{stderr}"
    );
}

/// Kills the daemon even when an assertion fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn image_held_by_qsd_is_refused_with_qemu_message() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), 1 << 20);
    let sock = dir.path().join("nbd.sock");
    // QSD exporting the image writable holds "write" and refuses to share "resize".
    let qsd = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={img}"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "type=nbd,id=e0,node-name=f0,writable=on",
        ])
        .spawn()
        .expect("cannot run qemu-storage-daemon: install the qemu-system-common package");
    let qsd = KillOnDrop(qsd);
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut graph = BlockGraph::new();
    graph
        .add(opts(
            json!({"driver": "file", "node-name": "f0", "filename": img}),
        ))
        .await
        .unwrap();
    let refuse_write = graph
        .attach("f0", Perm::CONSISTENT_READ, Perm::CONSISTENT_READ, "")
        .unwrap_err();
    let resize = graph.resize(None, Some("f0"), 4096).await.unwrap_err();
    drop(qsd);
    assert_eq!(
        refuse_write.to_string(),
        "Failed to get shared \"write\" lock"
    );
    assert_eq!(resize.to_string(), "Failed to get \"resize\" lock");
    assert_eq!(
        resize.hint().unwrap(),
        format!("Is another process using the image [{img}]?")
    );
}
