//! The QMP client against qemu-storage-daemon: greeting, negotiation, error
//! replies and event buffering.

use std::time::Duration;

use serde_json::json;
use testkit::{Daemon, QmpErrorReply};

#[test]
fn execute_returns_error_class_and_desc() {
    let mut daemon = Daemon::start(&testkit::qsd_path(), &[] as &[&str]).unwrap();
    let mut qmp = daemon.qmp().unwrap();

    let err = qmp.execute("job-pause", json!({"id": "nope"})).unwrap_err();

    assert_eq!(
        err,
        QmpErrorReply {
            class: "GenericError".into(),
            desc: "Job not found".into()
        }
    );
}

#[test]
fn wait_event_finds_job_events_around_the_reply() {
    let mut daemon = Daemon::start(&testkit::qsd_path(), &[] as &[&str]).unwrap();
    let file = daemon.dir().join("c.img");
    let mut qmp = daemon.qmp().unwrap();

    qmp.execute(
        "blockdev-create",
        json!({"job-id": "c", "options": {"driver": "file", "filename": file, "size": 0}}),
    )
    .unwrap();
    let event = qmp
        .wait_event("JOB_STATUS_CHANGE", Duration::from_secs(10))
        .unwrap();

    assert_eq!(event["data"], json!({"id": "c", "status": "created"}));
}

#[test]
fn daemon_is_killed_on_drop() {
    let daemon = Daemon::start(&testkit::qsd_path(), &[] as &[&str]).unwrap();
    let pid = daemon.pid().unwrap();

    drop(daemon);

    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
