//! Black-box tests of introspection: `query-commands` and `query-qmp-schema`
//! agree with each other and with what blockd dispatches, and the schema is
//! closed (every type it refers to, it defines).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{json, Value};
use testkit::{start_qsd, Daemon, Qmp, Session};

fn blockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

fn session(binary: &std::path::Path) -> (Daemon, Qmp) {
    let mut daemon = Daemon::start(binary, &[] as &[&str]).unwrap();
    let qmp = daemon.qmp().unwrap();
    (daemon, qmp)
}

/// A negotiated session with qemu-storage-daemon, started again if its
/// monitor does not answer (see [`start_qsd`]).
fn qsd_session() -> (Daemon, Qmp) {
    start_qsd(None, &[] as &[&str], Session::Negotiated).unwrap()
}

fn command_names(qmp: &mut Qmp) -> BTreeSet<String> {
    let list = qmp.execute("query-commands", Value::Null).unwrap();
    list.as_array()
        .expect("query-commands returns a list")
        .iter()
        .map(|c| {
            c["name"]
                .as_str()
                .expect("a command has a name")
                .to_string()
        })
        .collect()
}

fn schema(qmp: &mut Qmp) -> Vec<Value> {
    qmp.execute("query-qmp-schema", Value::Null)
        .unwrap()
        .as_array()
        .expect("query-qmp-schema returns a list")
        .clone()
}

#[test]
fn schema_lists_exactly_the_commands_query_commands_lists() {
    let (_daemon, mut qmp) = session(&blockd());
    let commands = command_names(&mut qmp);
    let in_schema: BTreeSet<String> = schema(&mut qmp)
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(commands, in_schema);
    for needed in ["qmp_capabilities", "quit", "query-version", "blockdev-add"] {
        assert!(commands.contains(needed), "{needed} missing: {commands:?}");
    }
}

#[test]
fn every_listed_command_exists_in_qsd() {
    let (_ours, mut qmp) = session(&blockd());
    let (_theirs, mut qsd) = qsd_session();
    let ours = command_names(&mut qmp);
    let theirs = command_names(&mut qsd);
    // QEMU's system emulator has these; qemu-storage-daemon does not.
    let beyond_qsd = ["snapshot-save", "snapshot-load", "snapshot-delete"];
    let invented: Vec<&String> = ours
        .difference(&theirs)
        .filter(|c| !beyond_qsd.contains(&c.as_str()))
        .collect();
    assert!(invented.is_empty(), "not QSD commands: {invented:?}");
}

#[test]
fn every_listed_command_is_dispatched() {
    let (_daemon, mut qmp) = session(&blockd());
    for name in command_names(&mut qmp) {
        let reply = if name.starts_with("query-") || name.starts_with("x-debug-query-") {
            // Harmless: really run it.
            qmp.execute(&name, Value::Null)
        } else {
            // An invalid argument keeps side effects (quit!) from happening.
            qmp.execute(&name, json!({"no-such-argument": 1}))
        };
        if let Err(err) = reply {
            let not_found = format!("The command {name} has not been found");
            assert_ne!(err.desc, not_found, "{name} is listed but not dispatched");
            if name != "qmp_capabilities" {
                assert_ne!(err.class, "CommandNotFound", "{name}: {err}");
            }
        }
    }
    // The session survived every command.
    qmp.execute("query-version", Value::Null).unwrap();
}

#[test]
fn query_commands_run_without_arguments_succeed() {
    let (_daemon, mut qmp) = session(&blockd());
    for name in command_names(&mut qmp) {
        if name.starts_with("query-") || name.starts_with("x-debug-query-") {
            if let Err(err) = qmp.execute(&name, Value::Null) {
                panic!("{name}: {err}");
            }
        }
    }
}

#[test]
fn unimplemented_qsd_commands_are_not_found() {
    let (_daemon, mut qmp) = session(&blockd());
    let commands = command_names(&mut qmp);
    let (_qsd, mut qsd) = qsd_session();
    let qsd_commands = command_names(&mut qsd);
    for name in ["block-commit", "blockdev-mirror", "block-stream"] {
        assert!(qsd_commands.contains(name), "QSD has {name}");
        assert!(!commands.contains(name), "{name} is not listed");
        let err = qmp.execute(name, json!({})).unwrap_err();
        assert_eq!(err.class, "CommandNotFound");
        assert_eq!(err.desc, format!("The command {name} has not been found"));
    }
}

/// Names of the types an introspection entry refers to.
fn references(entry: &Value) -> Vec<String> {
    let mut refs = Vec::new();
    let mut add = |v: &Value| {
        if let Some(name) = v.as_str() {
            refs.push(name.to_string());
        }
    };
    for key in ["arg-type", "ret-type", "element-type"] {
        add(&entry[key]);
    }
    for list in ["members", "variants"] {
        if let Some(items) = entry[list].as_array() {
            for item in items {
                add(&item["type"]);
            }
        }
    }
    refs
}

#[test]
fn every_type_the_schema_refers_to_is_defined() {
    let (_daemon, mut qmp) = session(&blockd());
    let entries = schema(&mut qmp);
    let defined: BTreeSet<&str> = entries
        .iter()
        .map(|e| e["name"].as_str().expect("every entry has a name"))
        .collect();
    assert_eq!(defined.len(), entries.len(), "entry names are unique");
    let mut undefined = Vec::new();
    for entry in &entries {
        for name in references(entry) {
            if !defined.contains(name.as_str()) {
                undefined.push(format!("{} -> {name}", entry["name"]));
            }
        }
    }
    assert!(undefined.is_empty(), "undefined types: {undefined:?}");
}

#[test]
fn schema_entries_have_known_meta_types() {
    let (_daemon, mut qmp) = session(&blockd());
    for entry in schema(&mut qmp) {
        let meta = entry["meta-type"].as_str().unwrap_or_default();
        assert!(
            [
                "builtin",
                "enum",
                "array",
                "object",
                "alternate",
                "command",
                "event"
            ]
            .contains(&meta),
            "{entry}"
        );
        if meta == "command" {
            assert!(entry["arg-type"].is_string(), "{entry}");
            assert!(entry["ret-type"].is_string(), "{entry}");
        }
    }
}
