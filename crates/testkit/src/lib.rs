//! Test support for the daemon: start a daemon process (blockd or
//! qemu-storage-daemon) with a QMP monitor in a temporary directory, speak
//! QMP to it, and replay scenario files against two daemons to compare their
//! transcripts.

pub mod daemon;
pub mod proc;
pub mod qmp;
pub mod scenario;
pub mod tools;

pub use daemon::{
    find_tool, probe_monitor, qsd_path, start_qsd, start_qsd_checked, Daemon, Session,
};
pub use qmp::{Message, Qmp, QmpErrorReply};
