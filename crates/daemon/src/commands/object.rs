//! object-add, object-del.

use super::{empty, Reply};
use crate::control::State;
use qapi::QmpError;
use serde_json::Value;

pub fn object_add(state: &mut State, args: Value) -> Reply<'_> {
    Box::pin(async move {
        state
            .objects
            .add(&args)
            .map_err(|err| QmpError::generic(err.message))?;
        Ok(empty())
    })
}

pub fn object_del(state: &mut State, args: Value) -> Reply<'_> {
    Box::pin(async move {
        let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
        state.objects.del(id).map_err(QmpError::generic)?;
        Ok(empty())
    })
}
