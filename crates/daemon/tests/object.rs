//! Black-box tests of user-creatable objects: `object-add` and `object-del`
//! over QMP and `--object` on the command line, against the blockd binary.

use std::path::PathBuf;

use serde_json::{json, Value};
use testkit::{Daemon, Qmp};

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

fn session(args: &[&str]) -> (Daemon, Qmp) {
    let mut daemon = Daemon::start(&blockd(), args).unwrap();
    let qmp = daemon.qmp().unwrap();
    (daemon, qmp)
}

fn psk_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.psk"), "alice:00112233\n").unwrap();
    dir
}

#[test]
fn object_add_then_del_frees_the_id() {
    let (_daemon, mut qmp) = session(&[]);
    let secret = json!({"qom-type": "secret", "id": "s0", "data": "x"});
    qmp.execute("object-add", secret.clone()).unwrap();
    qmp.execute("object-del", json!({"id": "s0"})).unwrap();
    assert_eq!(qmp.execute("object-add", secret).unwrap(), json!({}));
}

#[test]
fn object_add_of_a_taken_id_is_refused() {
    let (_daemon, mut qmp) = session(&[]);
    let secret = json!({"qom-type": "secret", "id": "s0", "data": "x"});
    qmp.execute("object-add", secret.clone()).unwrap();
    let err = qmp.execute("object-add", secret).unwrap_err();
    assert_eq!(
        err.desc,
        "attempt to add duplicate property 's0' to object (type 'container')"
    );
}

#[test]
fn object_from_the_command_line_can_be_deleted_over_qmp() {
    let dir = psk_dir();
    let object = format!(
        "tls-creds-psk,id=psk0,dir={},endpoint=server",
        dir.path().display()
    );
    let (_daemon, mut qmp) = session(&["--object", &object]);
    assert_eq!(
        qmp.execute("object-del", json!({"id": "psk0"})).unwrap(),
        json!({})
    );
}

#[test]
fn object_del_of_an_unknown_id_is_refused() {
    let (_daemon, mut qmp) = session(&[]);
    let err = qmp
        .execute("object-del", json!({"id": "nosuch"}))
        .unwrap_err();
    assert_eq!(
        (err.class.as_str(), err.desc.as_str()),
        ("GenericError", "object 'nosuch' not found")
    );
}

#[test]
fn tls_creds_that_fail_to_load_leave_the_id_free() {
    let dir = psk_dir();
    let (_daemon, mut qmp) = session(&[]);
    let missing = json!({"qom-type": "tls-creds-x509", "id": "t0",
                         "dir": dir.path().join("nosuch"), "endpoint": "server"});
    qmp.execute("object-add", missing).unwrap_err();
    let psk = json!({"qom-type": "tls-creds-psk", "id": "t0",
                     "dir": dir.path(), "endpoint": "server"});
    assert_eq!(qmp.execute("object-add", psk).unwrap(), json!({}));
}

#[test]
fn object_commands_are_in_the_schema() {
    let (_daemon, mut qmp) = session(&[]);
    let schema = qmp.execute("query-qmp-schema", Value::Null).unwrap();
    let names: Vec<&str> = schema
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.contains(&"object-add") && names.contains(&"object-del"));
}
