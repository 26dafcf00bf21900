//! Running the external tools black-box tests use as oracles (qemu-img, qemu-io, nbdinfo,
//! ...), and small path helpers. A missing tool fails the test with the package to install.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The Debian package that provides `program`, for the failure message.
fn package_of(program: &str) -> &'static str {
    match program {
        "qemu-img" | "qemu-io" | "qemu-nbd" | "qemu-storage-daemon" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
        "fio" => "fio",
        "openssl" => "openssl",
        "gnutls-cli" | "psktool" | "certtool" => "gnutls-bin",
        _ => "the package that provides it",
    }
}

/// Runs `program` with `args` and returns its output; panics (failing the test) when it is
/// missing or exits with an error, showing what it printed.
pub fn tool(program: &str, args: &[&str]) -> Output {
    let out = try_tool(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `program` with `args` whatever its exit status; panics only when it is missing.
pub fn try_tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (install {}): {e}", package_of(program)))
}

/// The command line opening the qcow2 image `img` as node `node` over a `file` node `f`.
pub fn qcow2_node_args(img: &str, node: &str) -> Vec<String> {
    vec![
        "--blockdev".to_string(),
        format!("driver=file,node-name=f,filename={img}"),
        "--blockdev".to_string(),
        format!("driver=qcow2,node-name={node},file=f"),
    ]
}

/// `qemu-img create -q -f qcow2 -o OPTS IMG SIZE`.
pub fn create_qcow2(img: &str, opts: &str, size: &str) {
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, img, size],
    );
}

/// The guest data of qcow2 image `img` (or of its internal snapshot `snapshot`) as raw file
/// `out`, by `qemu-img convert`.
pub fn qcow2_to_raw(img: &str, snapshot: Option<&str>, out: &str) {
    let opt = snapshot.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert", "-f", "qcow2"];
    if let Some(o) = &opt {
        args.extend(["-l", o.as_str()]);
    }
    args.extend(["-O", "raw", img, out]);
    tool("qemu-img", &args);
}

/// The internal snapshot names `qemu-img snapshot -l` lists for `img`.
pub fn snapshot_names(img: &str) -> Vec<String> {
    let out = tool("qemu-img", &["snapshot", "-l", img]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// Asserts that `qemu-img check` finds no corruption in `img`: exit 0 (clean) or 3 (leaked
/// clusters only).
pub fn assert_no_corruption(img: &str) {
    let out = try_tool("qemu-img", &["check", img]);
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 3)),
        "qemu-img check exit {code:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `dir/name` as a string, for command lines.
pub fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// Waits until `path` exists (a socket a daemon creates after its monitor's).
pub fn wait_path(path: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !Path::new(path).exists() {
        assert!(Instant::now() < deadline, "{path} did not appear");
        std::thread::sleep(Duration::from_millis(10));
    }
}
