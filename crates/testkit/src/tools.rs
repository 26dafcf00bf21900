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
