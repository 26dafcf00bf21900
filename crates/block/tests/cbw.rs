//! The copy-before-write filter: inserted above a node that a writer is using, it makes
//! the target a point-in-time copy of the node, however hard the writer writes while the
//! background copy runs. Checked against the oracle `qemu-img compare`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use block::driver::cbw::{CbwDriver, CbwState, OnCbwError};
use block::{BlockGraph, BlockdevOptions, Perm, WriteFlags};

const SIZE: u64 = 8 << 20;
const CLUSTER: u64 = 64 << 10;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

async fn add(graph: &mut BlockGraph, json: serde_json::Value) {
    let opts: BlockdevOptions = serde_json::from_value(json).unwrap();
    graph.add(opts).await.unwrap();
}

/// A pseudo-random walk of 4 KiB writes over the whole disk.
fn write_offsets(seed: u64, n: usize) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (SIZE / 4096)) * 4096
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_the_copy_leave_a_point_in_time_target() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt, snap) = (
        path(dir.path(), "src.qcow2"),
        path(dir.path(), "tgt.raw"),
        path(dir.path(), "snap.qcow2"),
    );
    run("qemu-img", &["create", "-q", "-f", "qcow2", &src, "8M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x5a 0 3M",
            "-c",
            "write -P 0x6b 5M 2M",
            &src,
        ],
    );
    run("qemu-img", &["create", "-q", "-f", "raw", &tgt, "8M"]);
    // What the target must equal: the source as it is before the filter goes in.
    std::fs::copy(&src, &snap).unwrap();

    let mut graph = BlockGraph::new();
    let file = |name: &str, f: &str| serde_json::json!({"driver": "file", "node-name": name, "filename": f});
    add(&mut graph, file("sf", &src)).await;
    add(
        &mut graph,
        serde_json::json!({"driver": "qcow2", "node-name": "src", "file": "sf"}),
    )
    .await;
    add(&mut graph, file("tf", &tgt)).await;
    add(
        &mut graph,
        serde_json::json!({"driver": "raw", "node-name": "tgt", "file": "tf"}),
    )
    .await;
    // The writer is on the source before the filter exists, as an export would be.
    let writer = Arc::new(
        graph
            .attach(
                "src",
                Perm::CONSISTENT_READ | Perm::WRITE,
                Perm::CONSISTENT_READ,
                "w",
            )
            .unwrap(),
    );
    let (source, target) = (graph.get("src").unwrap(), graph.get("tgt").unwrap());
    let state = Arc::new(CbwState::new(
        source.clone(),
        target.clone(),
        CLUSTER,
        OnCbwError::BreakGuestWrite,
    ));
    let driver = CbwDriver::new(state.clone());
    let children = driver.children();
    let filter = graph
        .insert_filter("src", None, Box::new(driver), children)
        .await
        .unwrap();
    assert_eq!(
        writer.node().name(),
        filter.name(),
        "the writer moved onto the filter"
    );

    // The writer hammers the disk while the copy crawls from the start.
    let hammer = {
        let writer = writer.clone();
        tokio::spawn(async move {
            for (i, off) in write_offsets(7, 3000).into_iter().enumerate() {
                let byte = (i % 250) as u8 + 1;
                writer
                    .write(off, &[byte; 4096], WriteFlags::default())
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    for c in 0..state.clusters() {
        state.copy_cluster(c).await.unwrap();
        if c % 8 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
    hammer.await.unwrap();
    assert_eq!(state.remaining(), 0);
    state.detach();
    graph.remove_filter(filter.name()).unwrap();
    assert_eq!(
        writer.node().name(),
        "src",
        "the writer is back on the source"
    );
    target.flush().await.unwrap();
    writer.flush().await.unwrap();
    drop(writer);
    graph.close_all().await;

    run(
        "qemu-img",
        &["compare", "-q", "-f", "qcow2", "-F", "raw", &snap, &tgt],
    );
    run("qemu-img", &["check", "-q", &src]);
    // And the source holds every write: the last one to each offset.
    let mut last = std::collections::HashMap::new();
    for (i, off) in write_offsets(7, 3000).into_iter().enumerate() {
        last.insert(off, (i % 250) as u8 + 1);
    }
    let (mut sample, mut n) = (Vec::new(), 0);
    for (off, byte) in last {
        if n < 40 {
            sample.push("-c".to_string());
            sample.push(format!("read -P {byte} {off} 4096"));
            n += 1;
        }
    }
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    args.extend(sample.iter().map(String::as_str));
    args.push(&src);
    run("qemu-io", &args);
}
