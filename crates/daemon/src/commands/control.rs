//! query-version, query-commands, query-qmp-schema.

use super::Reply;
use crate::control::State;
use serde_json::{json, Value};

pub fn query_version(_: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async {
        let (major, minor, micro) = qmp::QEMU_VERSION;
        Ok(json!({
            // Members in schema order: the writer then orders them as QEMU does.
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": crate::PACKAGE,
        }))
    })
}

pub fn query_commands(_: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async { Ok(qapi::introspect::query_commands(qapi::schema::schema())) })
}

pub fn query_qmp_schema(_: &mut State, _: Value) -> Reply<'_> {
    Box::pin(async { Ok(qapi::introspect::query_qmp_schema(qapi::schema::schema())) })
}
