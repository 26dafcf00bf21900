//! Helpers for tests that use QEMU's tools as oracles.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use qcow2::{FileStorage, Image, OpenOptions, Storage};

/// Run a QEMU tool; a missing tool fails naming the package to install.
pub fn run(tool: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}): install the qemu-utils package (QEMU 10.0.2)")
    });
    out
}

/// Run a QEMU tool and insist on success.
pub fn ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    ok("qemu-img", args)
}

/// `qemu-img create -f qcow2 -o OPTS IMG SIZE`.
pub fn create_qcow2(img: &str, opts: &str, size: &str) {
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, img, size]);
}

/// `qemu-io` with one `-c` per command on a qcow2 image.
pub fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = img.to_str().unwrap();
    args.push(p);
    let out = ok("qemu-io", &args);
    assert!(!out.contains("failed"), "qemu-io: {out}");
}

/// The guest contents as qemu-img reads them.
pub fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("oracle.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    std::fs::read(raw).unwrap()
}

pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

pub async fn open(path: &Path, read_only: bool) -> Image {
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(path, !read_only).unwrap());
    Image::open(
        st,
        OpenOptions {
            read_only,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Read the whole guest through the library, in chunks of `chunk` bytes; holes stay zero.
pub async fn read_all(img: &Image, chunk: usize) -> Vec<u8> {
    let size = img.size() as usize;
    let mut out = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos);
        img.read(pos as u64, &mut out[pos..pos + n]).await.unwrap();
        pos += n;
    }
    out
}

/// Assert equality without dumping megabytes.
pub fn assert_same(ours: &[u8], theirs: &[u8]) {
    assert_eq!(ours.len(), theirs.len(), "lengths differ");
    if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        panic!(
            "first difference at byte {i:#x}: ours {:#x}, qemu {:#x}",
            ours[i], theirs[i]
        );
    }
}
